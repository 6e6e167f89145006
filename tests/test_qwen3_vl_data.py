"""Qwen3-VL videos in the data path (``data.qwen_vl``): each video laid out as its frame groups, each after its
``<t seconds>`` timestamp text and inside the video wrap, as transformers' Qwen3VLProcessor expands it; frames
sampled and resized by Qwen3VLVideoProcessor's rules (its ``sample_frames``, ``smart_resize`` and ``patchify``);
and a tiny Qwen3-VL model imported from transformers giving transformers' logits on the collated batch.

transformers' Qwen3VLVideoProcessor needs torchvision (not installed here): its module is loaded from its file
so that its torchvision-free methods (frame sampling, the size rule, the patch layout) are the reference; the
resize is the Pillow bicubic one transformers' Pillow-backend image processors use."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch

from mimo_spec.data import validate_data_config
from mimo_spec.data.preprocess import qwen3_video_size
from mimo_spec.data.media import MediaProcessor
from mimo_spec.data.samples import RecordDataset, SampleBuilder, widen_runs
from mimo_spec.data.sources import open_source
from mimo_spec.errors import ConfigError, DataError
from mimo_spec.loss import IGNORE_INDEX

PIL = pytest.importorskip("PIL.Image")
av = pytest.importorskip("av")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.qwen3_vl")

from test_native_data_more import QWEN_EXTRA, QWEN_SPECIALS, QWEN_VL_TEMPLATE, WRAP, noise_image  # noqa: E402

PATCH, TEMPORAL, MERGE = 4, 2, 2
PIXELS = {"min_pixels": 64, "max_pixels": 4096, "video_min_pixels": 256, "video_max_pixels": 4096}
# Qwen3-VL's layout before transformers 5 (and vLLM's): the video token bare, no outer markers
BARE_VIDEO_TEMPLATE = QWEN_VL_TEMPLATE.replace("'<|vision_start|><|video_pad|><|vision_end|>'", "'<|video_pad|>'")


def raw_video_module():
    """transformers' qwen3_vl video processing module, loaded from its file (its package guard wants torchvision)."""
    name = "transformers.models.qwen3_vl._video_processing_for_tests"
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(transformers.__file__), "models", "qwen3_vl",
                            "video_processing_qwen3_vl.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def write_video(path, frames=10, fps=4, size=(56, 40)):
    w, h = size
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt, s.options = w, h, "yuv420p", {"qscale": "1"}
        for k in range(frames):
            a = (rng.integers(0, 60, (h, w, 3)) + 18 * k).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def reference_video(path, video_min_pixels, video_max_pixels):
    """transformers' Qwen3-VL video processing of ``path``: (pixel_values_videos, video_grid_thw, VideoMetadata)."""
    from transformers.image_transforms import resize
    from transformers.video_utils import VideoMetadata

    m = raw_video_module()
    vp = m.Qwen3VLVideoProcessor(patch_size=PATCH, temporal_patch_size=TEMPORAL, merge_size=MERGE)
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        rate = float(stream.average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
    meta = VideoMetadata(total_num_frames=len(frames), fps=rate)
    indices = vp.sample_frames(meta)
    meta.frames_indices = indices
    h0, w0 = frames[0].shape[:2]
    h, w = m.smart_resize(len(indices), h0, w0, temporal_factor=TEMPORAL, factor=PATCH * MERGE,
                          min_pixels=video_min_pixels, max_pixels=video_max_pixels)
    x = np.stack([resize(frames[i], (h, w), resample=PIL.BICUBIC) for i in indices])  # the Pillow backends' resize
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    x = (x - 0.5) / 0.5
    patches, t, gh, gw = vp.patchify(x[None], patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL)
    return patches[0], torch.tensor([[t, gh, gw]]), meta


def processor_for(tok, template, video):
    """transformers' Qwen3VLProcessor with a Pillow Qwen2-VL image processor (Qwen3-VL's settings) and a video
    processor giving ``video`` (reference_video's output): the processor's own token expansion and timestamps."""
    m = raw_video_module()
    pixels, grid, meta = video

    class Videos(m.Qwen3VLVideoProcessor):
        def __call__(self, videos, **kwargs):
            return transformers.BatchFeature({"pixel_values_videos": pixels, "video_grid_thw": grid,
                                              "video_metadata": [meta]})

    class Processor(transformers.Qwen3VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name != "video_processor":
                return super().check_argument_for_proper_class(name, arg)

    images = transformers.Qwen2VLImageProcessorPil(patch_size=PATCH, temporal_patch_size=TEMPORAL, merge_size=MERGE,
                                                   image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                                   min_pixels=PIXELS["min_pixels"], max_pixels=PIXELS["max_pixels"])
    return Processor(image_processor=images, tokenizer=tok.tok, chat_template=template,
                     video_processor=Videos(patch_size=PATCH, temporal_patch_size=TEMPORAL, merge_size=MERGE))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(Qwen-like tokenizer with the tiny model's placeholders, HF Qwen3-VL model, our import of it)."""
    from test_templates import save_bpe

    from mimo_spec.interop import import_hf

    tok = save_bpe(tmp_path_factory.mktemp("tok"), QWEN_SPECIALS, QWEN_VL_TEMPLATE, extra=QWEN_EXTRA)
    ids = {t: tok.added_vocab[t] for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>")}
    torch.manual_seed(0)
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, head_dim=16,
                rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True,
                                 "rope_theta": 10000.0})
    vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=4, patch_size=PATCH,
                  temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    cfg = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                                     video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"])
    hf = transformers.Qwen3VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.3)
    _, model = import_hf(hf)
    return tok, hf, model.eval()


def dataset(tmp_path, tok, model, records, **extra):
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = validate_data_config({"source": "llava_json", "path": str(tmp_path / "data.jsonl"), "eval_fraction": 0.0,
                                "max_seq_len": 1024, "image_wrap": WRAP, "video_wrap": WRAP, **PIXELS, **extra})
    return RecordDataset(open_source(cfg, "train"), SampleBuilder(cfg, model, tok))


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


def test_qwen3_vl_sample_equals_processor_and_logits_equal_transformers(tmp_path, tiny):
    """A sample with an image and a video (10 frames at 4 fps: 5 sampled, 3 frame groups, the last one padded):
    its ids equal Qwen3VLProcessor's expansion of the same conversation, with the outer markers the text holds
    (transformers 5's chat template) and without (the bare video token); timestamps, markers and placeholders
    are never trained; the planned length equals the built one; the video's pixels and grid equal
    Qwen3VLVideoProcessor's rules, the image's the Qwen2-VL image processor with Qwen3-VL's 0.5 / 0.5; and the
    collated batch's logits equal transformers' Qwen3-VL on the processor's inputs."""
    from mimo_spec.data.batch import collate

    tok, hf, model = tiny
    noise_image(37, 61, 0).save(tmp_path / "0.png")
    write_video(tmp_path / "v.mp4")
    vpad, start, end = (tok.added_vocab[t] for t in ("<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))
    records = [  # the markers around the tag written in the data (transformers 5's chat template keeps them)
        {"images": ["0.png"], "videos": ["v.mp4"], "conversations": [
            human("<image>\nThen <|vision_start|><video><|vision_end|> What happens?"), gpt("It gets brighter.")]},
        # bare: no outer markers (Qwen3-VL's processor before transformers 5, vLLM)
        {"images": ["0.png"], "videos": ["v.mp4"], "conversations": [
            human("<image>\n<video>\nWhat happens?"), gpt("It gets brighter.")]}]
    ds = dataset(tmp_path, tok, model, records)
    video = reference_video(tmp_path / "v.mp4", PIXELS["video_min_pixels"], PIXELS["video_max_pixels"])
    assert video[2].frames_indices.tolist() == [0, 2, 4, 7, 9] and video[1].tolist() == [[3, 6, 8]]
    image = PIL.open(tmp_path / "0.png").convert("RGB")
    for k, (template, content) in enumerate([
            (QWEN_VL_TEMPLATE, [{"type": "text", "text": "\nThen "}, {"type": "video"},
                                {"type": "text", "text": " What happens?"}]),
            (BARE_VIDEO_TEMPLATE, [{"type": "text", "text": "\n"}, {"type": "video"},
                                   {"type": "text", "text": "\nWhat happens?"}])]):
        processor = processor_for(tok, template, video)
        messages = [{"role": "user", "content": [{"type": "image"}, *content]},
                    {"role": "assistant", "content": [{"type": "text", "text": "It gets brighter."}]}]
        want = processor(text=[processor.apply_chat_template(messages, tokenize=False)], images=[image],
                         videos=[np.zeros((5, 40, 56, 3), np.uint8)], return_tensors="pt")
        sample = ds[k]
        ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
        assert ids == want["input_ids"][0].tolist()
        assert ds.token_length(k) == len(ids)
        text = tok.decode(ids, skip_special_tokens=False)
        assert text.count("<0.2 seconds><|vision_start|>") == 1 and "<1.4 seconds>" in text and "<2.2 seconds>" in text
        assert ids.count(start) == ids.count(end) == 1 + 3 + (k == 0)
        trained = tok.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=False)
        assert trained == "It gets brighter.<|im_end|>"
        vit = sample["items"]["videos"]["vit"]
        torch.testing.assert_close(vit["pixel_values_videos"], video[0], rtol=0, atol=1e-6)
        assert vit["video_grid_thw"].tolist() == want["video_grid_thw"].tolist() == [[3, 6, 8]]
        torch.testing.assert_close(sample["items"]["images"]["vit"]["pixel_values"], want["pixel_values"],
                                   rtol=0, atol=0)
        # the batch through our import equals transformers on the processor's own inputs
        batch = collate([sample], 0)
        with torch.no_grad():
            ours = model(batch["input_ids"], batch["modality_inputs"], attention_mask=batch["attention_mask"]).logits
            ref = hf(**{n: want[n] for n in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                                             "image_grid_thw", "pixel_values_videos", "video_grid_thw")}).logits
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
        # a generation prompt is laid out the same way
        if k == 1:
            prompt_ids, _ = ds.builder.prompt("<image>\n<video>\nWhat happens?", images=[tmp_path / "0.png"],
                                              videos=[tmp_path / "v.mp4"])
            text = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
            want_prompt = processor(text=[text], images=[image], videos=[np.zeros((5, 40, 56, 3), np.uint8)],
                                    return_tensors="pt")["input_ids"][0]
            assert prompt_ids[0].tolist() == want_prompt.tolist()
    assert ids.count(vpad) == 3 * 12


@pytest.mark.parametrize("frames,fps,size", [(10, 4, (56, 40)), (37, 10, (200, 30)), (3, 30, (9, 9)),
                                             (900, 30, (640, 360)), (5, 1, (1000, 8))])
def test_qwen3_sampling_and_resize_rules_equal_transformers(frames, fps, size):
    """The frames sampled and the clip size planned follow Qwen3VLVideoProcessor.sample_frames and its
    smart_resize (bounds on frames x height x width), for long, short, tiny and very wide videos."""
    from mimo_spec.data.preprocess import qwen3_frame_indices
    from transformers.video_utils import VideoMetadata

    m = raw_video_module()
    vp = m.Qwen3VLVideoProcessor(patch_size=PATCH, temporal_patch_size=TEMPORAL, merge_size=MERGE, max_frames=64)
    want = vp.sample_frames(VideoMetadata(total_num_frames=frames, fps=fps)).tolist()
    got = qwen3_frame_indices(frames, fps, 2.0, 4, 64)
    assert got == want
    w, h = size
    for low, high in ((256, 4096), (4096, 25165824), (64, 10 ** 9)):
        want_hw = m.smart_resize(len(want), h, w, temporal_factor=TEMPORAL, factor=8, min_pixels=low, max_pixels=high)
        assert qwen3_video_size(len(got), h, w, TEMPORAL, 8, low, high) == tuple(want_hw)


def test_qwen_vl_option_defaults_and_checks(tmp_path, tiny):
    """auto follows the LM's mrope_frames_as_items; Qwen3-VL's pixel defaults and normalisation when left unset;
    a frame folder's timestamps at data.video_fps; a setting the LM's M-RoPE cannot take is a ConfigError naming
    data.qwen_vl; a 1-frame video is a DataError;
    truncation never cuts inside a video's frame groups."""
    from mimo_spec.data.samples import Dropped

    tok, _, model = tiny
    mp = MediaProcessor(model)
    vision = mp.native["images"][3]
    assert mp.qwen3 and mp.video_timestamps
    assert (vision.min_pixels, vision.max_pixels, vision.video_min_pixels, vision.video_max_pixels) == \
        (65536, 16777216, 4096, 25165824)
    assert list(vision.processor.image_mean) == [0.5] * 3
    with pytest.raises(ConfigError, match="data.qwen_vl"):
        MediaProcessor(model, qwen_vl="qwen2_vl")
    with pytest.raises(ConfigError, match="qwen_vl"):
        validate_data_config({"source": "llava_json", "path": "x", "qwen_vl": "qwen4"})
    write_video(tmp_path / "one.mp4", frames=1)
    with pytest.raises(DataError, match="one.mp4.*1 frame"):
        MediaProcessor(model, **PIXELS).video_plan(tmp_path / "one.mp4")
    folder = tmp_path / "frames"  # a frame folder: all its frames, taken as sampled at data.video_fps (2)
    folder.mkdir()
    for k in range(5):
        noise_image(40, 24, k).save(folder / f"f{k}.png")
    plan = MediaProcessor(model, **PIXELS).video_plan(folder)
    assert plan.indices == list(range(5)) and plan.timestamps == [0.25, 1.25, 2.0] and plan.grid[0] == 3
    write_video(tmp_path / "v.mp4")
    records = [{"videos": ["v.mp4"], "conversations": [human("Hi"), gpt("Yes."), human("<video>"), gpt("Bright.")]}]
    full = dataset(tmp_path, tok, model, records).encoded(0)
    first = full.input_ids.index(tok.added_vocab["<|video_pad|>"])
    stamp = len(tok.tok("<0.2 seconds>", add_special_tokens=False)["input_ids"])
    begin = first - 1 - stamp  # the first group's timestamp
    last_end = len(full.input_ids) - full.input_ids[::-1].index(tok.added_vocab["<|vision_end|>"])
    for cut, kept in ((begin, True), (begin + 1, False), (first + 20, False), (last_end - 1, False), (last_end, True)):
        if cut < 8:
            continue
        ds = dataset(tmp_path, tok, model, records, max_seq_len=cut, truncation="truncate")
        if not kept:
            with pytest.raises(Dropped, match="cut inside placeholders"):
                ds.encoded(0)
            continue
        try:
            enc = ds.encoded(0)
        except DataError as e:  # nothing trainable left before the video
            assert "no trainable tokens" in str(e)
            continue
        assert enc.input_ids == full.input_ids[:cut] and len(enc.media.get("videos", [])) == int(cut > first)


def test_widen_runs_lays_out_frame_groups():
    """widen_runs with groups: per group its text ids, the wrap, its placeholders, the wrap; the item's span
    covers them all; other items keep one run."""
    ids, labels = [1, 9, 2, 8, 3], [1, -100, 2, -100, 3]
    runs = [("videos", 1, 1), ("images", 3, 1)]
    out, lab, spans = widen_runs(ids, labels, runs, {"videos": [4], "images": [2]},
                                 {"videos": ([50], [51]), "images": ([50], [51])},
                                 {"videos": [[([70, 71], 2), ([72], 2)]]})
    assert out == [1, 70, 71, 50, 9, 9, 51, 72, 50, 9, 9, 51, 2, 50, 8, 8, 51, 3]
    assert [i for i, x in enumerate(lab) if x != -100] == [0, 12, 17]
    assert spans == [("videos", 1, 12), ("images", 13, 17)]
