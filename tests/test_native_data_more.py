"""More native-resolution data: SigLIP2 NaFlex images (transformers' SigLIP2 image processor, h*w placeholders
per image planned from the header, items padded to max_num_patches so a batch stacks), and Qwen's vision
start/end markers around every item's placeholders (``data.image_wrap`` / ``data.video_wrap``), against
transformers' Qwen2VLProcessor + a Qwen-style chat template and its M-RoPE ``get_rope_index``."""

import json
import sys
import pickle
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mimo_spec.data import validate_data_config
from mimo_spec.data.media import MediaProcessor
from mimo_spec.data.samples import RecordDataset, SampleBuilder
from mimo_spec.data.sources import open_source
from mimo_spec.data.tokenizer import ByteTokenizer
from mimo_spec.errors import ConfigError
from mimo_spec.loss import IGNORE_INDEX

sys.path.insert(0, str(Path(__file__).parent))
from test_native_data import gpt, human, runs_of  # noqa: E402

PIL = pytest.importorskip("PIL.Image")
transformers = pytest.importorskip("transformers")
siglip2 = pytest.importorskip("mimo_spec.components.vision.siglip2")

IMAGE_ID = 1000
PATCH, BUDGET = 4, 24  # 4x4-pixel patches, at most 24 of them per image
SIZES = [(37, 61), (200, 30), (9, 9)]  # tall, very wide (grid capped by the budget), tiny (grown to the budget)


def siglip_model(budget=BUDGET, projector="mlp"):
    """A stand-in model: a tiny siglip2_naflex image modality (what the data path reads)."""
    from mimo_spec.components.projectors import MLPProjector
    from mimo_spec.models.modality import Modality

    enc = siglip2.Siglip2NaFlex(patch_size=PATCH, num_patches=16, hidden_size=16, num_layers=1, num_heads=2,
                                ffn_hidden_size=32, max_num_patches=budget)
    proj = MLPProjector(16, 32, num_layers=2) if projector == "mlp" else projector
    images = Modality(special_token_id=IMAGE_ID, encoders={"sig": enc}, input_projections={"sig": proj})
    lm = types.SimpleNamespace(max_seq_len=4096, vocab_size=2048)
    return types.SimpleNamespace(modalities={"images": images}, language_model=lm)


def noise_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def hf_siglip(**kw):
    return transformers.Siglip2ImageProcessorPil(**{"patch_size": PATCH, "max_num_patches": BUDGET, **kw})


# ------------------------------------------------------------------------------------ SigLIP2 NaFlex
def test_naflex_images_equal_transformers_siglip2_processor(tmp_path):
    """pixel_values / pixel_attention_mask / spatial_shapes equal Siglip2ImageProcessorPil's (SigLIP's 0.5/0.5
    normalisation when data.image_mean/std keep CLIP's defaults) for images of different sizes and aspect ratios;
    the count planned from the header equals h*w of the built grid and the modality's own count."""
    model = siglip_model()
    mp = MediaProcessor(model)
    proc = hf_siglip()
    grids = set()
    for k, (w, h) in enumerate(SIZES):
        noise_image(w, h, k).save(tmp_path / f"{k}.png")
        got = mp.image(tmp_path / f"{k}.png")["sig"]
        want = proc(images=PIL.open(tmp_path / f"{k}.png").convert("RGB"), return_tensors="pt")
        assert set(got) == {"pixel_values", "pixel_attention_mask", "spatial_shapes"}
        torch.testing.assert_close(got["pixel_values"], want["pixel_values"], rtol=0, atol=0)
        assert torch.equal(got["pixel_attention_mask"], want["pixel_attention_mask"])
        assert torch.equal(got["spatial_shapes"], want["spatial_shapes"])
        gh, gw = want["spatial_shapes"][0].tolist()
        grids.add((gh, gw))
        assert got["pixel_values"].shape == (1, BUDGET, 3 * PATCH * PATCH) and gh * gw <= BUDGET
        assert mp.image_tokens(tmp_path / f"{k}.png") == gh * gw == int(want["pixel_attention_mask"].sum())
        assert mp.item_tokens("images", {"sig": got}) == [gh * gw]
        assert model.modalities["images"].item_tokens({"sig": got}) == [gh * gw]
        model.modalities["images"].validate_inputs({"sig": got}, "images")
    assert len(grids) == 3  # three different grids
    # explicit (non-CLIP) normalisation is used as given
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    got = MediaProcessor(model, image_mean=mean, image_std=std).image(tmp_path / "0.png")["sig"]
    want = hf_siglip(image_mean=mean, image_std=std)(images=PIL.open(tmp_path / "0.png").convert("RGB"),
                                                     return_tensors="pt")
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"], rtol=0, atol=0)


def test_naflex_processor_folder_checked_against_the_encoder(tmp_path):
    """data.image_processor: a saved SigLIP2 processor with the encoder's patch size and budget is used (its own
    normalisation); another budget or patch size is refused naming both numbers; a non-SigLIP2 one is refused."""
    noise_image(50, 30).save(tmp_path / "a.png")
    hf_siglip(image_mean=[0.2, 0.3, 0.4]).save_pretrained(tmp_path / "ok")
    mp = MediaProcessor(siglip_model(), image_processor=str(tmp_path / "ok"))
    want = hf_siglip(image_mean=[0.2, 0.3, 0.4])(images=PIL.open(tmp_path / "a.png").convert("RGB"),
                                                 return_tensors="pt")
    torch.testing.assert_close(mp.image(tmp_path / "a.png")["sig"]["pixel_values"], want["pixel_values"],
                               rtol=0, atol=0)
    hf_siglip(max_num_patches=64).save_pretrained(tmp_path / "budget")
    with pytest.raises(ConfigError, match="max_num_patches 64, the encoder's max_num_patches is 24"):
        MediaProcessor(siglip_model(), image_processor=str(tmp_path / "budget"))
    hf_siglip(patch_size=8).save_pretrained(tmp_path / "patch")
    with pytest.raises(ConfigError, match="patch_size is 8, the encoder's 4"):
        MediaProcessor(siglip_model(), image_processor=str(tmp_path / "patch"))
    transformers.CLIPImageProcessorPil().save_pretrained(tmp_path / "clip")
    with pytest.raises(ConfigError, match="not a SigLIP2 NaFlex one"):
        MediaProcessor(siglip_model(), image_processor=str(tmp_path / "clip"))


def test_naflex_projector_that_changes_the_count_is_refused():
    """The data path gives an image h*w placeholders: a projector that merges patches is refused up front."""
    class Halving(torch.nn.Module):
        def tokens_out(self, n):
            return n // 2

    with pytest.raises(ConfigError, match="h\\*w placeholders"):
        MediaProcessor(siglip_model(projector=Halving()))


def write_llava(tmp_path, sizes=SIZES):
    for k, (w, h) in enumerate(sizes):
        noise_image(w, h, k).save(tmp_path / f"{k}.png")
    records = [{"id": "two", "images": ["0.png", "1.png"], "conversations": [human("<image> and <image>?"),
                                                                             gpt("Two noises.")]},
               {"id": "one", "image": "2.png", "conversations": [human("What is it?"), gpt("Noise.")]},
               {"id": "text", "conversations": [human("Hi"), gpt("Hello.")]}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path / "data.jsonl"


def test_naflex_samples_planned_counts_equal_built_and_batches_stack(tmp_path):
    """One placeholder run per image of its own h*w; planned length (encode: headers only) equals the built one;
    a collated batch stacks the images (all padded to max_num_patches) and the model's count matches."""
    from mimo_spec.data.batch import collate

    path = write_llava(tmp_path)
    cfg = validate_data_config({"source": "llava_json", "path": str(path), "eval_fraction": 0.0,
                                "max_seq_len": 1024})
    model = siglip_model()
    ds = RecordDataset(open_source(cfg, "train"), SampleBuilder(cfg, model, ByteTokenizer()))
    proc = hf_siglip()
    samples = []
    for i, files in enumerate((["0.png", "1.png"], ["2.png"], [])):
        sample = ds[i]
        samples.append(sample)
        want = [proc(images=PIL.open(tmp_path / f).convert("RGB"), return_tensors="pt") for f in files]
        counts = [int(x["spatial_shapes"].prod()) for x in want]
        assert runs_of(sample["input_ids"].tolist(), IMAGE_ID) == counts
        assert ds.token_length(i) == len(sample["input_ids"])
        if files:
            assert ds.encoded(i).item_tokens == {"images": counts}
            got = sample["items"]["images"]["sig"]
            for key in ("pixel_values", "pixel_attention_mask", "spatial_shapes"):
                assert torch.equal(got[key], torch.cat([x[key] for x in want]).to(got[key].dtype)), key
    again = pickle.loads(pickle.dumps(ds))[0]  # as DataLoader workers get it
    first = samples[0]["items"]["images"]["sig"]
    assert all(torch.equal(again["items"]["images"]["sig"][k], v) for k, v in first.items())
    batch = collate(samples, 0)
    inputs = batch["modality_inputs"]["images"]
    assert inputs["sig"]["pixel_values"].shape == (3, BUDGET, 3 * PATCH * PATCH)
    assert batch["items_per_sample"]["images"] == [2, 1, 0]
    assert sum(model.modalities["images"].item_tokens(inputs)) == int((batch["input_ids"] == IMAGE_ID).sum())


def test_tiny_siglip2_naflex_model_trains_on_llava_json(tmp_path):
    """modality=[siglip2_naflex] at toy sizes trains 2 steps on a llava_json dataset of images of three sizes."""
    from mimo_spec.config import compose_config
    from mimo_spec.train.loop import train
    from mimo_spec.train.metrics import read_metrics

    path = write_llava(tmp_path)
    e = "modalities.images.submodules.encoders.siglip2.params."
    overrides = ["modality=[siglip2_naflex]", "modalities.images.params.special_token_id=1000",
                 f"{e}patch_size={PATCH}", f"{e}num_patches=16", f"{e}hidden_size=32", f"{e}num_layers=1",
                 f"{e}num_heads=2", f"{e}ffn_hidden_size=64", f"{e}max_num_patches={BUDGET}",
                 f"{e}keep_unused_layers=false", f"{e}pooling_head=false",
                 "data=llava_json", f"data.path={path}", "data.eval_fraction=0", "data.max_seq_len=256",
                 "train.batch_size=2", "train.steps=2", "train.log_every=1", "train.eval_every=0",
                 "train.checkpoint.every=0"]
    result = train(compose_config(overrides), tmp_path / "run")
    assert result["status"] == "completed" and result["steps"] == 2
    losses = [float(r["loss"]) for r in read_metrics(tmp_path / "run" / "metrics.csv")]
    assert len(losses) == 2 and all(np.isfinite(losses)) and all(x > 0 for x in losses)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["bad_samples"] == 0 and metrics["dropped_samples"] == 0 and metrics["samples_read"] >= 3


def test_naflex_webdataset_and_parquet_give_the_same_samples(tmp_path):
    """The same images as tar shard members and as Parquet binary cells: the same planned counts, ids and pixels
    as the llava_json files."""
    import io
    import tarfile

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = write_llava(tmp_path)
    model = siglip_model()
    conv = [human("<image> and <image>?"), gpt("Two noises.")]
    pngs = [(tmp_path / f"{k}.png").read_bytes() for k in (0, 1)]
    with tarfile.open(tmp_path / "shard-0000.tar", "w") as tar:
        for name, data in (("s.json", json.dumps({"conversations": conv}).encode()), ("s.0.png", pngs[0]),
                           ("s.1.png", pngs[1])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"conversations": [json.dumps(conv)], "images": [pngs]}), tmp_path / "t.parquet")
    built = []
    for cfg in ({"source": "llava_json", "path": str(path)}, {"source": "webdataset", "path": str(tmp_path / "*.tar")},
                {"source": "parquet", "path": str(tmp_path / "t.parquet")}):
        cfg = validate_data_config({**cfg, "eval_fraction": 0.0, "max_seq_len": 1024})
        ds = RecordDataset(open_source(cfg, "train"), SampleBuilder(cfg, model, ByteTokenizer()))
        built.append((ds.token_length(0), ds[0]))
    (n, want), *others = built
    assert n == len(want["input_ids"]) and len(runs_of(want["input_ids"].tolist(), IMAGE_ID)) == 2
    for n2, got in others:
        assert n2 == n and torch.equal(got["input_ids"], want["input_ids"])
        for key, t in want["items"]["images"]["sig"].items():
            assert torch.equal(got["items"]["images"]["sig"][key], t), key


# ------------------------------------------------------------------------- Qwen's vision start / end markers
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_EXTRA = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
WRAP = ["<|vision_start|>", "<|vision_end|>"]
# Qwen2-VL's chat layout (default system prompt; an image item in a message is start, pad, end), written here
QWEN_VL_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QPATCH, QTEMPORAL, QMERGE = 2, 2, 2
QPIXELS = {"min_pixels": 64, "max_pixels": 4096}


def qwen_stand_in(image_id):
    """A stand-in model: a tiny qwen_vit + patch_merger image modality with placeholder ``image_id``."""
    qwen_vit = pytest.importorskip("mimo_spec.components.vision.qwen_vit")
    from mimo_spec.models.modality import Modality

    vit = qwen_vit.QwenViT(16, 1, 2, 32, patch_size=QPATCH, temporal_patch_size=QTEMPORAL, spatial_merge_size=QMERGE)
    images = Modality(special_token_id=image_id, encoders={"vit": vit},
                      input_projections={"vit": qwen_vit.PatchMerger(16, 32, QMERGE)})
    lm = types.SimpleNamespace(max_seq_len=4096, vocab_size=2048)
    return types.SimpleNamespace(modalities={"images": images}, language_model=lm)


def test_image_wrap_equals_qwen2vl_processor_and_chat_template(tmp_path):
    """data.image_wrap = [<|vision_start|>, <|vision_end|>] with a Qwen-like tokenizer: a llava_json sample's ids
    equal transformers' Qwen2VLProcessor on the Qwen chat layout of the same conversation (structured image
    contents), images of different sizes; the markers are never trained; a planned length equals the built one;
    markers the text already holds are not doubled."""
    from test_templates import save_bpe

    tok = save_bpe(tmp_path / "tok", QWEN_SPECIALS, QWEN_VL_TEMPLATE, extra=QWEN_EXTRA)
    pad, start, end = (tok.added_vocab[t] for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
    for k, (w, h) in enumerate([(37, 61), (100, 24), (30, 30)]):
        noise_image(w, h, k).save(tmp_path / f"{k}.png")
    turns = [human("<image>\nWhat is in the picture?"), gpt("A red square."),
             human("Compare <image> with <image>, please."), gpt("The cat sits on the mat.")]
    records = [{"id": "a", "images": ["0.png", "1.png", "2.png"], "conversations": turns},
               # the markers already in the text: kept once
               {"id": "b", "images": ["0.png"], "conversations": [
                   human("<|vision_start|><image><|vision_end|>\nWhat is in the picture?"), gpt("A red square.")]}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = validate_data_config({"source": "llava_json", "path": str(tmp_path / "data.jsonl"), "eval_fraction": 0.0,
                                "max_seq_len": 4096, "image_wrap": WRAP, **QPIXELS})
    model = qwen_stand_in(pad)
    ds = RecordDataset(open_source(cfg, "train"), SampleBuilder(cfg, model, tok))
    sample = ds[0]
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()

    image_proc = transformers.Qwen2VLImageProcessorPil(patch_size=QPATCH, temporal_patch_size=QTEMPORAL,
                                                       merge_size=QMERGE, **QPIXELS)
    class ImagesOnly(transformers.Qwen2VLProcessor):  # no video processor: that class needs torchvision
        def check_argument_for_proper_class(self, name, arg):
            if name != "video_processor":
                return super().check_argument_for_proper_class(name, arg)

    processor = ImagesOnly(image_processor=image_proc, tokenizer=tok.tok, chat_template=QWEN_VL_TEMPLATE)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is in the picture?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
                {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                             {"type": "text", "text": " with "}, {"type": "image"},
                                             {"type": "text", "text": ", please."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "The cat sits on the mat."}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    images = [PIL.open(tmp_path / f"{k}.png").convert("RGB") for k in range(3)]
    want = processor(text=[text], images=images, return_tensors="pt")
    assert ids == want["input_ids"][0].tolist()
    torch.testing.assert_close(sample["items"]["images"]["vit"]["pixel_values"], want["pixel_values"], rtol=0, atol=0)
    counts = [int(g.prod()) // QMERGE**2 for g in want["image_grid_thw"]]
    assert runs_of(ids, pad) == counts and ds.token_length(0) == len(ids)
    # every run: start marker, its placeholders, end marker; none of them trained
    for k, i in enumerate(i for i in range(len(ids)) if ids[i] == pad and ids[i - 1] != pad):
        assert ids[i - 1] == start and ids[i + counts[k]] == end
    assert ids.count(start) == ids.count(end) == 3
    assert all(lab == IGNORE_INDEX for t, lab in zip(ids, labels) if t in (start, end, pad))
    trained = tok.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=False)
    assert trained == "A red square.<|im_end|>The cat sits on the mat.<|im_end|>"
    # a generation prompt is laid out the same way
    prompt_ids, prompt_inputs = ds.builder.prompt("<image>\nWhat is in the picture?", images=[tmp_path / "0.png"])
    text = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    want_prompt = processor(text=[text], images=images[:1], return_tensors="pt")["input_ids"][0]
    assert prompt_ids[0].tolist() == want_prompt.tolist()
    # markers written in the data: not doubled (the same ids as the first turn of sample a)
    b = ds[1]["input_ids"].tolist()
    assert b.count(start) == b.count(end) == 1 and b == ids[:len(b)]


def test_wrap_refuses_placeholder_ids_and_keeps_truncation_outside_wraps(tmp_path):
    """A wrap that tokenises to a placeholder id is a ConfigError naming the key; truncation never cuts inside an
    item's markers (a cut between them and the placeholders drops the sample), and cuts around them keep whole
    wrapped items."""
    noise_image(40, 40, 1).save(tmp_path / "a.png")  # 100 tokens with the tiny Qwen geometry
    text = "x" * 20
    (tmp_path / "data.jsonl").write_text(json.dumps({"images": ["a.png"], "conversations": [
        human(text), gpt("Yes."), human("<image>"), gpt("A long answer here.")]}) + "\n")
    base = {"source": "llava_json", "path": str(tmp_path / "data.jsonl"), "eval_fraction": 0.0, **QPIXELS}
    model = qwen_stand_in(IMAGE_ID)
    byte = ByteTokenizer()
    with pytest.raises(ConfigError, match="data.image_wrap"):
        SampleBuilder(validate_data_config({**base, "image_wrap": ["<s>", chr(0)]}),
                      qwen_stand_in(0), byte)
    with pytest.raises(ConfigError, match="image_wrap"):
        validate_data_config({**base, "image_wrap": ["only one"]})
    full = RecordDataset(open_source(validate_data_config({**base, "image_wrap": ["<S>", "<E>"]}), "train"),
                         SampleBuilder(validate_data_config({**base, "image_wrap": ["<S>", "<E>"]}), model, byte))
    ids = full[0]["input_ids"].tolist()
    first = ids.index(IMAGE_ID)
    assert bytes(ids[first - 3:first]) == b"<S>" and bytes(ids[first + 100:first + 103]) == b"<E>"
    from mimo_spec.data.samples import Dropped

    for cut, kept in ((first + 101, False), (first - 1, False), (first + 103, True), (first - 3, True)):
        cfg = validate_data_config({**base, "image_wrap": ["<S>", "<E>"], "max_seq_len": cut, "truncation": "truncate"})
        ds = RecordDataset(open_source(cfg, "train"), SampleBuilder(cfg, model, byte))
        if not kept:
            with pytest.raises(Dropped, match="cut inside placeholders"):
                ds.encoded(0)
            continue
        enc = ds.encoded(0)
        assert enc.input_ids == ids[:cut] and len(enc.media.get("images", [])) == int(cut > first)


def test_wrapped_qwen2_vl_tiny_batch_positions_equal_get_rope_index(tmp_path):
    """preset=qwen2_vl_tiny, byte tokenizer, image_wrap and video_wrap: markers land around every item's run in
    order, and the M-RoPE positions of a collated batch (model.position_ids) equal transformers' get_rope_index."""
    from mimo_spec import build_model
    from mimo_spec.config import compose_config
    from mimo_spec.data.batch import collate
    from mimo_spec.data.tokenizer import build_tokenizer

    model = build_model(compose_config(["preset=qwen2_vl_tiny"]), seed=0)
    img_id, vid_id = (model.modalities[n].special_token_id for n in ("images", "videos"))
    for k, (w, h) in enumerate([(37, 61), (100, 24), (30, 30)]):
        noise_image(w, h, k).save(tmp_path / f"{k}.png")
    clip = tmp_path / "clip"
    clip.mkdir()
    for k in range(4):
        PIL.fromarray(np.full((24, 40, 3), 40 * k, np.uint8)).save(clip / f"f{k}.png")
    records = [{"images": ["0.png", "1.png"], "videos": ["clip"],
                "conversations": [human("<image> then <video> and <image>?"), gpt("Noise.")]},
               {"images": ["2.png"], "conversations": [human("What?"), gpt("A square.")]},
               {"conversations": [human("Hi"), gpt("Hello.")]}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = validate_data_config({"source": "llava_json", "path": str(tmp_path / "data.jsonl"), "eval_fraction": 0.0,
                                "max_seq_len": 512, "image_wrap": WRAP, "video_wrap": ["<|vision_start|>", "<|ve|>"],
                                "min_pixels": 256, "max_pixels": 2048, "video_min_pixels": 256,
                                "video_max_pixels": 1024})
    ds = RecordDataset(open_source(cfg, "train"), SampleBuilder(cfg, model, build_tokenizer(cfg, model)))
    samples = [ds[i] for i in range(3)]
    start, end, vend = (list(s.encode()) for s in (WRAP[0], WRAP[1], "<|ve|>"))
    ids = samples[0]["input_ids"].tolist()
    order = []
    i = 0
    while i < len(ids):  # walk the runs: each one between its markers
        if ids[i] in (img_id, vid_id):
            j = i
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            assert ids[i - len(start):i] == start
            assert ids[j:j + len(end if ids[i] == img_id else vend)] == (end if ids[i] == img_id else vend)
            order.append("image" if ids[i] == img_id else "video")
            i = j
        else:
            i += 1
    assert order == ["image", "video", "image"]
    batch = collate(samples, 0)
    inputs = batch["modality_inputs"]
    ours = model.position_ids(batch["input_ids"], inputs, attention_mask=batch["attention_mask"])
    text = dict(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                        "mrope_section": [4, 6, 6]})
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, spatial_merge_size=2, patch_size=4,
                  temporal_patch_size=2, in_channels=3)
    hf = transformers.Qwen2VLModel(transformers.Qwen2VLConfig(text_config=text, vision_config=vision,
                                                              image_token_id=img_id, video_token_id=vid_id)).eval()
    ids_t = batch["input_ids"]
    types_ = (ids_t == img_id).long() + 2 * (ids_t == vid_id).long()
    want, _ = hf.get_rope_index(ids_t, mm_token_type_ids=types_,
                                image_grid_thw=inputs["images"]["vit"]["image_grid_thw"],
                                video_grid_thw=inputs["videos"]["vit"]["video_grid_thw"],
                                attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].bool()
    assert torch.equal(ours[:, mask], want[:, mask])
