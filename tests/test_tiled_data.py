"""Tiled images in the data path (``data.image_tiling``, mimo_spec/data/tiling.py): InternVL's dynamic tiles with a
thumbnail (transformers' GotOcr2ImageProcessor + InternVLProcessor) and Idefics3 / SmolVLM image splitting with
row/column tokens (Idefics3ImageProcessor / SmolVLMImageProcessor + Idefics3Processor's text): pixel values and
input ids equal transformers' for images of several sizes and aspect ratios, counts planned from the header,
tiles as the modality's items; a tiny model trains on the data and generates from the CLI path. LLaVA-NeXT /
OneVision anyres tiles equal their processors'; OneVision leaves each image of a multi-image sample untiled
(batch_num_images), and a batch mixing both kinds gives transformers' logits."""

import json
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mimo_spec.data import validate_data_config
from mimo_spec.data.samples import RecordDataset, SampleBuilder
from mimo_spec.data.sources import open_source
from mimo_spec.data.tokenizer import ByteTokenizer
from mimo_spec.errors import ConfigError, DataError
from mimo_spec.loss import IGNORE_INDEX

sys.path.insert(0, str(Path(__file__).parent))
from test_native_data import gpt, human, runs_of  # noqa: E402

PIL = pytest.importorskip("PIL.Image")
transformers = pytest.importorskip("transformers")

TILE, PATCH = 32, 4  # 32-pixel tiles of 8x8 patches, pixel shuffle 2x2: 16 tokens per tile
PER_TILE = (TILE // PATCH) ** 2 // 4
SIZES = [(37, 61), (100, 24), (20, 20), (64, 64), (9, 150)]  # tall, wide, one tile, square grid, very tall
ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
EXTRA = ["<img>", "</img>", "<IMG_CONTEXT>", "<fake_token_around_image>", "<image>", "<global-img>",
         "<end_of_utterance>", "<video>", *ROW_COL]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A Qwen-like BPE tokenizer with InternVL's and Idefics3's special tokens, and Qwen's chat template."""
    from test_native_data_more import QWEN_SPECIALS, QWEN_VL_TEMPLATE
    from test_templates import save_bpe

    folder = tmp_path_factory.mktemp("tok")
    tok = save_bpe(folder, QWEN_SPECIALS, QWEN_VL_TEMPLATE, extra=EXTRA)
    tok.folder = folder
    return tok


def stand_in(image_id, seed=0):
    """A stand-in model (what the data path reads): a tiny clip_vit + pixel_shuffle_mlp image modality."""
    from mimo_spec.components.projectors import PixelShuffleMLPProjector
    from mimo_spec.components.vision.clip_vit import ClipViT
    from mimo_spec.models.modality import Modality

    torch.manual_seed(seed)
    images = Modality(special_token_id=image_id, encoders={"clip": ClipViT(TILE, PATCH, 16, 1, 2, 32)},
                      input_projections={"clip": PixelShuffleMLPProjector(16, 32, 2)})
    lm = types.SimpleNamespace(max_seq_len=8192, vocab_size=2048)
    return types.SimpleNamespace(modalities={"images": images}, language_model=lm)


def write_images(tmp_path):
    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate(SIZES):
        PIL.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    return [PIL.open(tmp_path / f"{k}.png").convert("RGB") for k in range(len(SIZES))]


def conversation(tag):
    """Turns with 5 image tags (llava_json) and the same as chat messages with the tag in string contents."""
    turns = [human(f"{tag}\nWhat is in the picture?"), gpt("A red square."),
             human(f"Compare {tag} with {tag}, then {tag} and {tag}."), gpt("The cat sits on the mat.")]
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
    return turns, messages


def dataset(tmp_path, tok, model, turns, files=None, **data):
    files = [f"{k}.png" for k in range(len(SIZES))] if files is None else files
    (tmp_path / "data.jsonl").write_text(json.dumps({"images": files,
                                                     "conversations": turns}) + "\n")
    cfg = validate_data_config({"source": "llava_json", "path": str(tmp_path / "data.jsonl"), "eval_fraction": 0.0,
                                "max_seq_len": 8192, **data})
    return RecordDataset(open_source(cfg, "train"), SampleBuilder(cfg, model, tok)), cfg


class _NoVideo:
    def check_argument_for_proper_class(self, name, arg):  # no video processor: those need torchvision
        if name != "video_processor":
            return super().check_argument_for_proper_class(name, arg)


def test_internvl_tiles_and_ids_equal_transformers(tmp_path, tok):
    """image_tiling internvl: pixel_values equal GotOcr2ImageProcessor's (crop_to_patches, thumbnail last) for five
    sizes, input_ids equal InternVLProcessor's on the same chat text (<img> + <IMG_CONTEXT> x 16 x tiles + </img>
    per image), tiles are the modality's items, planned lengths equal built ones, nothing of the image trained;
    the prompt path lays a prompt out the same way; min/max tiles and the thumbnail follow the options, and a saved
    processor folder gives the same samples."""
    images = write_images(tmp_path)
    hf = tok.tok
    context = hf.convert_tokens_to_ids("<IMG_CONTEXT>")
    start, end = hf.convert_tokens_to_ids("<img>"), hf.convert_tokens_to_ids("</img>")
    for key, value in dict(start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
                           video_token="<video>").items():
        setattr(hf, key, value)
        setattr(hf, key + "_id", hf.convert_tokens_to_ids(value))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # InternVL's (the scheme's default)
    gp = transformers.GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True,
                                               min_patches=1, max_patches=6, image_mean=mean, image_std=std)
    processor = type("P", (_NoVideo, transformers.InternVLProcessor), {})(
        image_processor=gp, tokenizer=hf, image_seq_length=PER_TILE, chat_template=hf.chat_template)
    turns, messages = conversation("<IMG_CONTEXT>")
    model = stand_in(context)
    ds, cfg = dataset(tmp_path, tok, model, turns, image_token="<IMG_CONTEXT>", image_tiling="internvl",
                      image_max_tiles=6)
    sample = ds[0]
    want = processor(text=[hf.apply_chat_template(messages, tokenize=False)], images=images, return_tensors="pt")
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    assert ids == want["input_ids"][0].tolist()
    got = sample["items"]["images"]["clip"]["pixel_values"]
    torch.testing.assert_close(got, want["pixel_values"], rtol=0, atol=0)
    tiles = [gp.get_number_of_image_patches(im.height, im.width, {"max_patches": 6}) for im in images]
    assert sample["num_items"] == {"images": sum(tiles)} and min(tiles) == 1 and max(tiles) > 2
    assert runs_of(ids, context) == [PER_TILE * t for t in tiles]
    assert ds.token_length(0) == len(ids) and ds.encoded(0).item_tokens == {"images": [PER_TILE * t for t in tiles]}
    assert all(lab == IGNORE_INDEX for t, lab in zip(ids, labels) if t in (start, end, context))
    assert ids.count(start) == ids.count(end) == len(SIZES)
    assert sum(model.modalities["images"].item_tokens(sample["items"]["images"])) == ids.count(context)
    again = pickle.loads(pickle.dumps(ds))[0]  # as DataLoader workers get it
    assert torch.equal(again["input_ids"], sample["input_ids"]) and torch.equal(
        again["items"]["images"]["clip"]["pixel_values"], got)
    # the prompt (generation) path
    prompt_ids, inputs = ds.builder.prompt("<IMG_CONTEXT>\nWhat is in the picture?", images=[tmp_path / "1.png"])
    text = hf.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    want1 = processor(text=[text], images=images[1:2], return_tensors="pt")
    assert prompt_ids[0].tolist() == want1["input_ids"][0].tolist()
    assert torch.equal(inputs["images"]["clip"]["pixel_values"], want1["pixel_values"])
    # options: at most 2 tiles, no thumbnail; the same as the processor's own values in a saved folder
    gp.max_patches = 2
    gp.save_pretrained(tmp_path / "proc")
    ds2, _ = dataset(tmp_path, tok, model, turns, image_token="<IMG_CONTEXT>", image_tiling="internvl",
                     image_max_tiles=2, image_thumbnail=False)
    ds3, _ = dataset(tmp_path, tok, model, turns, image_token="<IMG_CONTEXT>", image_processor=str(tmp_path / "proc"),
                     image_thumbnail=False)  # auto: the folder's class (GotOcr2) tiles by internvl
    a, b = ds2[0], ds3[0]
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(*(s["items"]["images"]["clip"]["pixel_values"]
                                                                        for s in (a, b)))
    two = [t - (t > 1) for t in (gp.get_number_of_image_patches(im.height, im.width) for im in images)]
    assert runs_of(a["input_ids"].tolist(), context) == [PER_TILE * t for t in two] and max(two) == 2
    full = gp(images=images[0], return_tensors="pt")["pixel_values"]  # 2 tiles + thumbnail: the thumbnail dropped
    assert torch.equal(a["items"]["images"]["clip"]["pixel_values"][:2], full[:2])


def test_idefics3_and_smolvlm_splitting_equal_transformers(tmp_path, tok):
    """image_tiling idefics3: tiles row by row then the global image, equal to Idefics3ImageProcessor's, and the
    ids equal Idefics3Processor's (<fake_token_around_image><row_r_col_c> + 16 <image> per tile, a newline per
    row, the global image); a saved SmolVLMImageProcessor folder (auto: its class) gives SmolVLMProcessor's
    layout (its get_image_prompt_string); image_split false keeps the global image alone."""
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    images = write_images(tmp_path)
    hf = tok.tok
    image_id = hf.convert_tokens_to_ids("<image>")
    fake = hf.convert_tokens_to_ids("<fake_token_around_image>")
    ip = transformers.Idefics3ImageProcessorPil(size={"longest_edge": 4 * TILE}, max_image_size={"longest_edge": TILE})
    processor = transformers.Idefics3Processor(image_processor=ip, tokenizer=hf, image_seq_len=PER_TILE,
                                               chat_template=hf.chat_template)
    turns, messages = conversation("<image>")
    model = stand_in(image_id)
    ds, _ = dataset(tmp_path, tok, model, turns, image_tiling="idefics3")
    sample = ds[0]
    text = hf.apply_chat_template(messages, tokenize=False)
    want = processor(text=[text], images=images, return_tensors="pt", return_row_col_info=True)
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    assert ids == want["input_ids"][0].tolist()
    got = sample["items"]["images"]["clip"]["pixel_values"]
    torch.testing.assert_close(got, want["pixel_values"][0], rtol=0, atol=0)  # one sample: its tiles in order
    assert sample["num_items"] == {"images": got.shape[0]} and ds.token_length(0) == len(ids)
    assert all(lab == IGNORE_INDEX for t, lab in zip(ids, labels) if t in (image_id, fake))
    assert sum(model.modalities["images"].item_tokens(sample["items"]["images"])) == ids.count(image_id)
    assert set(runs_of(ids, image_id)) == {PER_TILE}
    # SmolVLM: its processor saved in a folder, larger longest edge (more tiles); the text is SmolVLMProcessor's
    sp = transformers.SmolVLMImageProcessorPil(size={"longest_edge": 5 * TILE}, max_image_size={"longest_edge": TILE})
    sp.save_pretrained(tmp_path / "smol")
    ds2, _ = dataset(tmp_path, tok, model, turns, image_processor=str(tmp_path / "smol"))
    s2 = ds2[0]
    out = sp(images=[images], return_row_col_info=True, return_tensors="pt")
    pieces = iter(get_image_prompt_string(r, c, PER_TILE, "<fake_token_around_image>", "<image>", "<global-img>")
                  for r, c in zip(out["rows"][0], out["cols"][0]))
    smol_text = "".join(part + (next(pieces) if k < len(SIZES) else "") for k, part in enumerate(text.split("<image>")))
    assert s2["input_ids"].tolist() == hf(smol_text, add_special_tokens=False)["input_ids"]
    assert torch.equal(s2["items"]["images"]["clip"]["pixel_values"], out["pixel_values"][0])
    assert max(r for r in out["rows"][0]) == 5  # the 9x150 image: 5 rows of one tile
    # unsplit: the global image alone per image
    ds3, _ = dataset(tmp_path, tok, model, turns, image_tiling="idefics3", image_split=False)
    s3 = ds3[0]
    assert s3["num_items"] == {"images": len(SIZES)} and "<row_" not in hf.decode(s3["input_ids"])
    want3 = processor(text=[text], images=images, do_image_splitting=False, return_tensors="pt")
    assert s3["input_ids"].tolist() == want3["input_ids"][0].tolist()
    assert torch.equal(s3["items"]["images"]["clip"]["pixel_values"], want3["pixel_values"][0])


def test_tiling_options_are_checked(tmp_path):
    """Bad tiling settings are ConfigErrors naming the data.* key; a truncation never cuts inside an image's
    tiles and text; a file whose pixels disagree with its header is a DataError."""
    write_images(tmp_path)
    model = stand_in(1000)
    byte = ByteTokenizer()
    turns = [human("<image> <image> <image> <image> <image>"), gpt("ok")]
    bad = [({"image_tiling": "internvl", "image_min_tiles": 5, "image_max_tiles": 2}, "data.image_min_tiles"),
           ({"image_tiling": "internvl", "image_longest_edge": 64}, "data.image_longest_edge"),
           ({"image_tiling": "idefics3", "image_max_tiles": 4}, "data.image_max_tiles"),
           ({"image_tiling": "idefics3", "image_wrap": ["<a>", "</a>"]}, "data.image_wrap"),
           ({"image_tiling": "llava_next"}, "data.image_tiling"),
           ({"image_tiling": "tiles"}, "data.image_tiling")]
    for options, key in bad:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            dataset(tmp_path, byte, model, turns, **options)
    with pytest.raises(ConfigError) as e:  # an anyres encoder needs its tiles
        dataset(tmp_path, byte, anyres_stand_in(1000, 1001), turns, image_tiling="none")
    assert e.value.problems[0].path == "data.image_tiling" and "takes image_sizes" in str(e.value)
    assert "data.image_tiling is none" in str(e.value) and "image_grid_thw" not in str(e.value), str(e.value)
    # one image_mean / image_std value serves every channel, in every scheme; two for RGB tiles name the key
    for scheme in ("none", "internvl", "idefics3"):
        one, _ = dataset(tmp_path, byte, model, turns, image_tiling=scheme, image_mean=[0.4], image_std=[0.2])
        three, _ = dataset(tmp_path, byte, model, turns, image_tiling=scheme, image_mean=[0.4] * 3,
                           image_std=[0.2] * 3)
        a, b = one[0]["items"]["images"]["clip"]["pixel_values"], three[0]["items"]["images"]["clip"]["pixel_values"]
        assert torch.equal(a, b), scheme
        with pytest.raises(ConfigError, match=r"data\.image_mean: image_mean needs 1 or 3 values"):
            dataset(tmp_path, byte, model, turns, image_tiling=scheme, image_mean=[0.4, 0.5], image_std=[0.2])[0][0]
    # a saved processor of another scheme, or for another tile size
    transformers.Idefics3ImageProcessorPil(max_image_size={"longest_edge": 48}).save_pretrained(tmp_path / "p48")
    with pytest.raises(ConfigError, match="48-pixel tiles"):
        dataset(tmp_path, byte, model, turns, image_processor=str(tmp_path / "p48"))
    with pytest.raises(ConfigError, match="data.image_tiling"):
        dataset(tmp_path, byte, model, turns, image_processor=str(tmp_path / "p48"), image_tiling="internvl")
    # truncation: a cut inside an image's parts drops the sample; a cut after whole images keeps them
    ds, _ = dataset(tmp_path, byte, model, turns + [human("x" * 50), gpt("y" * 50)], image_tiling="idefics3")
    full = len(ds[0]["input_ids"])
    for limit, kept in ((full - 40, 5), (200, None)):
        short, _ = dataset(tmp_path, byte, model, turns + [human("x" * 50), gpt("y" * 50)], image_tiling="idefics3",
                           truncation="truncate", max_seq_len=limit)
        if kept is None:
            with pytest.raises(DataError, match="cut inside placeholders"):
                short[0]
        else:
            assert short[0]["num_items"] == ds[0]["num_items"]
    # the pixels disagree with the header (a file replaced after planning): named
    enc = ds.encoded(0)
    PIL.new("RGB", (200, 20)).save(tmp_path / "0.png")
    with pytest.raises(DataError, match="0.png"):
        ds.builder.build(enc)


def test_tiny_tiled_model_trains_and_generates(tmp_path, tok):
    """A SmolVLM-shaped model (clip_vit + pixel_shuffle_mlp, llama_tiny) trains 2 steps on llava_json data tiled by
    a saved SmolVLM processor (and one step with InternVL's tiles), and action=generate (the CLI's job) continues a
    prompt with an image through the same path."""
    from mimo_spec.config import compose_config
    from mimo_spec.jobs import run_generate
    from mimo_spec.train.loop import train
    from mimo_spec.train.metrics import read_metrics

    write_images(tmp_path)
    hf = tok.tok
    transformers.SmolVLMImageProcessorPil(size={"longest_edge": 2 * TILE},
                                          max_image_size={"longest_edge": TILE}).save_pretrained(tmp_path / "smol")
    records = [{"images": [f"{k}.png"], "conversations": [human("<image>\nWhat is it?"), gpt(f"Noise number {k}.")]}
               for k in range(len(SIZES))]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    e = "modalities.images.submodules.encoders.clip.params."
    p = "modalities.images.submodules.input_projections.clip."
    overrides = [f"modalities.images.params.special_token_id={hf.convert_tokens_to_ids('<image>')}",
                 f"{e}image_size={TILE}", f"{e}patch_size={PATCH}", f"{e}num_layers=1", f"{p}module=pixel_shuffle_mlp",
                 f"++{p}params.in_features=64", "++" + p + "params.out_features=${model.params.hidden_size}",
                 "data=llava_json", f"data.path={tmp_path / 'data.jsonl'}", f"data.tokenizer={tok.folder}",
                 f"data.image_processor={tmp_path / 'smol'}", "data.eval_fraction=0", "data.max_seq_len=512",
                 "train.batch_size=2", "train.steps=2", "train.log_every=1", "train.eval_every=0",
                 "train.checkpoint.every=0"]
    result = train(compose_config(overrides), tmp_path / "run")
    assert result["status"] == "completed" and result["steps"] == 2
    losses = [float(r["loss"]) for r in read_metrics(tmp_path / "run" / "metrics.csv")]
    assert len(losses) == 2 and all(np.isfinite(losses))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["bad_samples"] == 0 and metrics["dropped_samples"] == 0
    # InternVL-shaped: the same model, images as InternVL's tiles inside <img> ... </img> (one step)
    internvl = [o for o in overrides if "image_processor" not in o and "train.steps" not in o]
    result = train(compose_config(internvl + ["data.image_tiling=internvl", "data.image_max_tiles=4",
                                              "train.steps=1"]), tmp_path / "run_internvl")
    assert result["status"] == "completed" and result["steps"] == 1
    assert json.loads((tmp_path / "run_internvl" / "metrics.json").read_text())["bad_samples"] == 0
    out = tmp_path / "gen"
    out.mkdir()
    cfg = compose_config(overrides + ["action=generate", f"generate.checkpoint={tmp_path / 'run'}",
                                      f"generate.images=[{tmp_path / '1.png'}]", "generate.prompt=What is it?",
                                      "generate.max_new_tokens=3"])
    assert run_generate(cfg, out) == 0
    record = json.loads((out / "generation.json").read_text())
    assert len(record["tokens"]) == 3


# ----------------------------------------------------------------------------------- LLaVA-NeXT / OneVision
NEXT_PINS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]  # CLIP-like 28-px tiles of 7-px patches
OV_PINS = [[30 * a, 30 * b] for a in (1, 2, 3) for b in (1, 2, 3)]  # SigLIP-like 30-px tiles: a 4x4 grid


def anyres_stand_in(image_id, video_id, onevision=False):
    """A stand-in LLaVA-NeXT (or OneVision: anyres_max_2, 2x downscaled video frames, a newline per video) model:
    an anyres image modality and a video modality sharing its tower."""
    from mimo_spec.components.projectors import MLPProjector
    from mimo_spec.components.vision.anyres import AnyRes, AnyResLayout
    from mimo_spec.components.vision.clip_vit import ClipViT
    from mimo_spec.models.modality import Modality

    tile = 30 if onevision else 28
    layout = AnyResLayout(32, max_tiles=2, video_downscale=2, video_newline=True) if onevision else AnyResLayout(32)
    images = Modality(special_token_id=image_id, item_layout=layout,
                      encoders={"vit": AnyRes(ClipViT(tile, 7, 32, 1, 2, 48), OV_PINS if onevision else NEXT_PINS)},
                      input_projections={"vit": MLPProjector(32, 32)})
    videos = Modality(special_token_id=video_id, item_kind="video", inputs_from="images")
    videos.link_inputs(images)
    lm = types.SimpleNamespace(max_seq_len=8192, vocab_size=2048)
    return types.SimpleNamespace(modalities={"images": images, "videos": videos}, language_model=lm)


def test_llava_next_and_onevision_anyres_equal_transformers(tmp_path, tok):
    """image_tiling auto on an anyres encoder: one item per image, its tiles (base image, then the crops of the best
    pinpoint) equal LlavaNextImageProcessor's pixel_values[i, :tiles] with its image_sizes, and the ids equal
    LlavaNextProcessor's (<image> x its own count, from the header); OneVision (anyres_max_N) a single-image sample
    equal to LlavaOnevisionProcessor's; a video gives data.video_num_frames frames spread evenly as transformers
    samples them, each frame as the image processor makes it, and video_tokens placeholders."""
    from mimo_spec.components.vision.anyres import anyres_geometry, video_tokens
    from test_native_data import write_video

    av = pytest.importorskip("av")
    images = write_images(tmp_path)
    hf = tok.tok
    image_id, video_id = hf.convert_tokens_to_ids("<image>"), hf.convert_tokens_to_ids("<video>")
    turns, messages = conversation("<image>")
    model = anyres_stand_in(image_id, video_id)
    ds, _ = dataset(tmp_path, tok, model, turns)
    sample = ds[0]
    ip = transformers.LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                 image_grid_pinpoints=NEXT_PINS)
    processor = transformers.LlavaNextProcessor(image_processor=ip, tokenizer=hf, patch_size=7,
                                                vision_feature_select_strategy="default",
                                                num_additional_image_tokens=1, chat_template=hf.chat_template)
    want = processor(text=[hf.apply_chat_template(messages, tokenize=False)], images=images, return_tensors="pt")
    ids = sample["input_ids"].tolist()
    assert ids == want["input_ids"][0].tolist() and ds.token_length(0) == len(ids)
    got = sample["items"]["images"]["vit"]
    tiles = model.modalities["images"].encoders["vit"].rows_per_item("image_sizes", got["image_sizes"])
    assert torch.equal(got["image_sizes"], want["image_sizes"]) and sample["num_items"]["images"] == len(SIZES)
    want_tiles = torch.cat([want["pixel_values"][i, :n] for i, n in enumerate(tiles)])
    torch.testing.assert_close(got["pixel_values"], want_tiles, rtol=0, atol=0)
    assert runs_of(ids, image_id) == model.modalities["images"].item_tokens(sample["items"]["images"])
    assert torch.equal(pickle.loads(pickle.dumps(ds))[0]["input_ids"], sample["input_ids"])
    # OneVision: one image per sample (transformers tiles only a sample's single image)
    ov = anyres_stand_in(image_id, video_id, onevision=True)
    op = transformers.LlavaOnevisionImageProcessorPil(size={"height": 30, "width": 30}, image_grid_pinpoints=OV_PINS,
                                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
    oproc = type("P", (_NoVideo, transformers.LlavaOnevisionProcessor), {})(
        image_processor=op, tokenizer=hf, num_image_tokens=16, vision_aspect_ratio="anyres_max_2",
        vision_feature_select_strategy="full", chat_template=hf.chat_template)
    for k in (0, 3):  # tall, and a square one shrunk by anyres_max_2
        s1 = dataset(tmp_path, tok, ov, turns[:2], files=[f"{k}.png"])[0][0]
        want1 = oproc(text=[hf.apply_chat_template(messages[:2], tokenize=False)], images=[images[k]],
                      return_tensors="pt")
        assert s1["input_ids"].tolist() == want1["input_ids"][0].tolist()
        assert torch.equal(s1["items"]["images"]["vit"]["pixel_values"], want1["pixel_values"][0])
    # videos: 10 frames -> 4 spread evenly, each frame through the image processor's resize and crop
    write_video(tmp_path / "v.mp4", 10, fps=5, size=(48, 32))
    (tmp_path / "v.jsonl").write_text(json.dumps({"video": "v.mp4", "conversations": [human("<video> what?"),
                                                                                      gpt("a square")]}) + "\n")
    cfg = validate_data_config({"source": "llava_json", "path": str(tmp_path / "v.jsonl"), "eval_fraction": 0.0,
                                "max_seq_len": 8192, "video_num_frames": 4})
    dv = RecordDataset(open_source(cfg, "train"), SampleBuilder(cfg, model, tok))[0]
    x = dv["items"]["videos"]["vit"]["pixel_values_videos"]
    with av.open(str(tmp_path / "v.mp4")) as c:
        frames = [f.to_image() for f in c.decode(c.streams.video[0])]
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    picked = default_sample_indices_fn(VideoMetadata(total_num_frames=10, fps=5), num_frames=4).tolist()
    clip = transformers.CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    want_v = clip(images=[frames[i] for i in picked], return_tensors="pt")["pixel_values"]
    assert x.shape == (1, 4, 3, 28, 28) and torch.equal(x[0], want_v) and dv["num_items"]["videos"] == 1
    n = video_tokens(4, anyres_geometry(model.modalities["videos"]))
    assert runs_of(dv["input_ids"].tolist(), video_id) == [n] == model.modalities["videos"].item_tokens(
        dv["items"]["videos"])


@torch.no_grad()
def test_onevision_multi_image_samples_untiled_equal_transformers(tmp_path, tok):
    """OneVision tiles only a sample's single image (LlavaOnevisionImageProcessor's batch_num_images): a llava_json
    record with 2 images of different sizes gives each image padded to a square and resized to one tile
    (image_sizes [h, w, 0]) and LlavaOnevisionProcessor's placeholders (base tile + newline), a record with 1 image
    its tiles ([h, w, 1]); pixel values and ids equal transformers' token by token, counts planned from the
    headers, and the collated mixed batch through a tiny OneVision imported from transformers gives its logits
    and loss (batch_num_images [2, 1]). The prompt path plans the same way."""
    from mimo_spec.components.vision.anyres import anyres_geometry, anyres_image_tokens
    from mimo_spec.data.batch import collate, model_kwargs
    from mimo_spec.interop import import_hf

    images = write_images(tmp_path)
    hf = tok.tok
    image_id, video_id = hf.convert_tokens_to_ids("<image>"), hf.convert_tokens_to_ids("<video>")
    siglip = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4, image_size=30, patch_size=7, vision_use_head=False)
    text = dict(model_type="qwen2", vocab_size=len(hf), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    config = transformers.LlavaOnevisionConfig(vision_config=siglip, text_config=text, image_token_index=image_id,
                                               video_token_index=video_id, image_grid_pinpoints=OV_PINS,
                                               vision_aspect_ratio="anyres_max_2")
    torch.manual_seed(0)
    ref = transformers.LlavaOnevisionForConditionalGeneration(config)
    g = torch.Generator().manual_seed(1)
    for p in ref.parameters():  # zero biases, unit norms and a zero newline would hide swapped tensors
        p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ref.eval()
    _, model = import_hf(ref)
    model.eval()
    op = transformers.LlavaOnevisionImageProcessorPil(size={"height": 30, "width": 30}, image_grid_pinpoints=OV_PINS,
                                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
    oproc = type("P", (_NoVideo, transformers.LlavaOnevisionProcessor), {})(
        image_processor=op, tokenizer=hf, num_image_tokens=16, vision_aspect_ratio="anyres_max_2",
        vision_feature_select_strategy="full", chat_template=hf.chat_template)
    two = [human("Compare <image> with <image>."), gpt("The left one is wider.")]
    one = [human("<image>\nWhat is in the picture?"), gpt("A red square.")]
    records = [{"images": ["1.png", "0.png"], "conversations": two}, {"images": ["3.png"], "conversations": one}]
    (tmp_path / "ov.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = validate_data_config({"source": "llava_json", "path": str(tmp_path / "ov.jsonl"), "eval_fraction": 0.0,
                                "max_seq_len": 4096})
    ds = RecordDataset(open_source(cfg, "train"), SampleBuilder(cfg, model, tok))
    texts = [hf.apply_chat_template([{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                                     for t in turns], tokenize=False) for turns in (two, one)]
    geo = anyres_geometry(model.modalities["images"])
    samples = [ds[0], ds[1]]
    for k, (sample, pics) in enumerate(zip(samples, ([images[1], images[0]], [images[3]]))):
        want = oproc(text=[texts[k]], images=[pics], return_tensors="pt")
        ids = sample["input_ids"].tolist()
        assert ids == want["input_ids"][0].tolist() and ds.token_length(k) == len(ids)
        got = sample["items"]["images"]["vit"]
        tiled = int(len(pics) == 1)
        assert got["image_sizes"].tolist() == [[im.height, im.width, tiled] for im in pics]
        pv = want["pixel_values"]  # (images, tiles, C, S, S): a multi-image sample's images one tile each
        torch.testing.assert_close(got["pixel_values"], pv.flatten(0, 1) if not tiled else pv[0], rtol=0, atol=0)
        counts = [anyres_image_tokens(im.height, im.width, geo, bool(tiled)) for im in pics]
        assert runs_of(ids, image_id) == counts == model.modalities["images"].item_tokens(sample["items"]["images"])
        assert ds.encoded(k).item_tokens == {"images": counts}
    assert runs_of(samples[0]["input_ids"].tolist(), image_id) == [17, 17]  # 4x4 tokens + newline each
    assert samples[1]["items"]["images"]["vit"]["pixel_values"].shape[0] > 1  # the single image is tiled
    # one batch mixing both: transformers' logits and loss (its padded 5-D pixels, batch_num_images [2, 1])
    batch = collate(samples, pad_id=0)
    assert batch["modality_inputs"]["images"]["vit"]["image_sizes"][:, 2].tolist() == [0, 0, 1]
    want = oproc(text=texts, images=[[images[1], images[0]], [images[3]]], return_tensors="pt", padding=True)
    assert want["batch_num_images"].tolist() == [2, 1]
    out = model(**model_kwargs(batch, "cpu", model))
    mask = batch["attention_mask"]
    hf_out = ref(input_ids=batch["input_ids"], attention_mask=mask, pixel_values=want["pixel_values"],
                 image_sizes=want["image_sizes"], batch_num_images=want["batch_num_images"], labels=batch["labels"])
    assert (out.logits - hf_out.logits)[mask.bool()].abs().max().item() <= 1e-5
    assert abs(out.loss.item() - hf_out.loss.item()) <= 1e-5
    # the prompt path: two images untiled, one alone tiled
    prompt_ids, inputs = ds.builder.prompt("Compare <image> with <image>.", images=[tmp_path / "1.png",
                                                                                   tmp_path / "0.png"])
    assert runs_of(prompt_ids[0].tolist(), image_id) == [17, 17]
    assert inputs["images"]["vit"]["image_sizes"][:, 2].tolist() == [0, 0]
    _, inputs1 = ds.builder.prompt("<image>\nWhat is it?", images=[tmp_path / "3.png"])
    assert inputs1["images"]["vit"]["image_sizes"].tolist() == [[64, 64, 1]]
