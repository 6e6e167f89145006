"""Native-resolution images and videos in the data path (Qwen2-VL style): transformers' Qwen2-VL image
processor, per-item placeholder runs planned from headers, videos from files (PyAV) and frame folders."""

import io
import json
import pickle
import tarfile
import types

import numpy as np
import pytest
import torch

from mimo_spec.data import validate_data_config
from mimo_spec.data.preprocess import QwenVision, sample_frame_indices
from mimo_spec.data.media import MediaProcessor
from mimo_spec.data.records import Media
from mimo_spec.data.samples import RecordDataset, SampleBuilder
from mimo_spec.data.sources import open_source
from mimo_spec.data.tokenizer import ByteTokenizer
from mimo_spec.errors import ConfigError, DataError

PIL = pytest.importorskip("PIL.Image")
av = pytest.importorskip("av")
transformers = pytest.importorskip("transformers")
qwen_vit = pytest.importorskip("mimo_spec.components.vision.qwen_vit")

IMAGE_ID, VIDEO_ID = 1000, 1002
# tiny geometry: 2x2-pixel patches, 2 frames per temporal patch, 2x2 merge: one token per 4x4 pixels
PATCH, TEMPORAL, MERGE = 2, 2, 2
PIXELS = {"min_pixels": 64, "max_pixels": 4096, "video_min_pixels": 64, "video_max_pixels": 1024}


def tiny_model(video: bool = True):
    """A stand-in model: a tiny qwen_vit + patch_merger image modality and (``video``) a video modality
    sharing its tower; only what the data path reads (modalities, the LM's limits)."""
    from mimo_spec.models.modality import Modality

    vit = qwen_vit.QwenViT(16, 1, 2, 32, patch_size=PATCH, temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE)
    images = Modality(special_token_id=IMAGE_ID, encoders={"vit": vit},
                      input_projections={"vit": qwen_vit.PatchMerger(16, 32, MERGE)})
    mods = {"images": images}
    if video:
        videos = Modality(special_token_id=VIDEO_ID, item_kind="video", inputs_from="images")
        videos.link_inputs(images)
        mods["videos"] = videos
    lm = types.SimpleNamespace(max_seq_len=4096, vocab_size=2048)
    return types.SimpleNamespace(modalities=mods, language_model=lm)


def hf_image_processor(min_pixels=PIXELS["min_pixels"], max_pixels=PIXELS["max_pixels"]):
    return transformers.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=PATCH,
                                                 temporal_patch_size=TEMPORAL, merge_size=MERGE)


def noise_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_video(path, frames, fps=10, codec="mpeg4", size=(48, 32)):
    """A video of ``frames`` frames; frame k is grey level 10 * k (plus a bright square), so it can be told apart."""
    w, h = size
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height = w, h
        s.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            s.options = {"qscale": "1"}
        for k in range(frames):
            a = np.full((h, w, 3), 10 * k, np.uint8)
            a[4:12, 4:12] = 250
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def grey(img) -> float:
    a = np.asarray(img, dtype=np.float64)
    return float(a[16:, 16:].mean())


def data_cfg(tmp_path, **kw):
    return validate_data_config({"source": "llava_json", "path": str(tmp_path / "data.jsonl"), "eval_fraction": 0.0,
                                 "max_seq_len": 4096, **PIXELS, **kw})


def write_jsonl(tmp_path, records):
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


def runs_of(ids, token):
    """Lengths of the runs of ``token`` in ``ids``."""
    out, n = [], 0
    for t in list(ids) + [None]:
        if t == token:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


# ------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("size", [(37, 61), (200, 30), (5, 7), (120, 120)])
def test_image_equals_transformers_qwen2vl_processor(tmp_path, size):
    """pixel_values and image_grid_thw equal transformers' Qwen2-VL image processor's, and the count planned from
    the header (nothing decoded) equals the grid's t*h*w / merge**2: sizes resized down (max_pixels), up
    (min_pixels), to the nearest multiple of patch*merge."""
    w, h = size
    noise_image(w, h).save(tmp_path / "a.png")
    mp = MediaProcessor(tiny_model(), **PIXELS)
    got = mp.image(tmp_path / "a.png")["vit"]
    want = hf_image_processor()(images=PIL.open(tmp_path / "a.png").convert("RGB"), return_tensors="pt")
    assert torch.equal(got["image_grid_thw"], want["image_grid_thw"])
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"], rtol=0, atol=0)
    t, gh, gw = want["image_grid_thw"][0].tolist()
    assert mp.image_tokens(tmp_path / "a.png") == t * gh * gw // MERGE**2
    assert got["pixel_values"].shape == (t * gh * gw, 3 * TEMPORAL * PATCH * PATCH)
    assert gh * PATCH * gw * PATCH <= PIXELS["max_pixels"] and gh * PATCH * gw * PATCH >= PIXELS["min_pixels"]


def test_image_planning_reads_header_only_and_follows_exif(tmp_path, monkeypatch):
    """A JPEG stored sideways (EXIF orientation 6) is counted upright, as it is decoded; a shard member's size
    comes from its first bytes (planning never reads the member whole)."""
    img = noise_image(60, 20)
    exif = PIL.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    mp = MediaProcessor(tiny_model(), **PIXELS)
    got = mp.image(tmp_path / "rot.jpg")["vit"]["image_grid_thw"][0].tolist()
    assert got == [1, 30, 10]  # 20 wide x 60 high once turned upright
    assert mp.image_tokens(tmp_path / "rot.jpg") == 30 * 10 // 4
    big = io.BytesIO()
    noise_image(300, 200).save(big, format="PNG")
    data = big.getvalue()
    (tmp_path / "shard.bin").write_bytes(b"x" * 100 + data)
    member = Media("shard.tar:k.png", path=tmp_path / "shard.bin", offset=100, length=len(data))
    from mimo_spec.data import records

    read = []
    original = records._SliceReader.readinto
    monkeypatch.setattr(records._SliceReader, "readinto", lambda self, b: read.append(original(self, b)) or read[-1])
    planned = mp.image_tokens(member)
    assert 0 < sum(read) < len(data) // 4
    assert planned == mp.item_tokens("images", mp.image(member))[0] == 26 * 38 // 4  # 300x200 -> 76x52 pixels


def test_local_processor_folder_and_geometry_check(tmp_path):
    """data.image_processor: a saved Qwen2-VL processor is used as it is (its own pixel bounds); one made for
    another patch size is refused naming both numbers."""
    hf_image_processor(min_pixels=256, max_pixels=1024).save_pretrained(tmp_path / "proc")
    noise_image(90, 70).save(tmp_path / "a.png")
    mp = MediaProcessor(tiny_model(), image_processor=str(tmp_path / "proc"), **PIXELS)
    grid = mp.image(tmp_path / "a.png")["vit"]["image_grid_thw"][0].tolist()
    t, gh, gw = grid
    assert gh * gw * PATCH * PATCH <= 1024 and mp.image_tokens(tmp_path / "a.png") == gh * gw // 4
    transformers.Qwen2VLImageProcessorPil(patch_size=4, merge_size=MERGE, temporal_patch_size=TEMPORAL) \
        .save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="patch_size is 4, the encoder's 2"):
        MediaProcessor(tiny_model(), image_processor=str(tmp_path / "other"), **PIXELS)


def test_samples_have_one_run_per_image_with_its_own_count(tmp_path):
    """Placeholder runs per item equal each image's processor grid; the planned length (encode, no decoding)
    equals the built sample's; the packed inputs are the items' rows back to back."""
    sizes = [(37, 61), (100, 24), (16, 16)]
    for k, (w, h) in enumerate(sizes):
        noise_image(w, h, seed=k).save(tmp_path / f"{k}.png")
    write_jsonl(tmp_path, [
        {"id": "two", "images": ["0.png", "1.png"],
         "conversations": [human("<image> and <image>?"), gpt("Both.")]},
        {"id": "one", "image": "2.png", "conversations": [human("What?"), gpt("Noise.")]}])
    cfg = data_cfg(tmp_path)
    model = tiny_model()
    ds = RecordDataset(open_source(cfg, "train"), SampleBuilder(cfg, model, ByteTokenizer()))
    proc = hf_image_processor()
    for i, files in ((0, ["0.png", "1.png"]), (1, ["2.png"])):
        sample = ds[i]
        want = [proc(images=PIL.open(tmp_path / f).convert("RGB"), return_tensors="pt") for f in files]
        counts = [int(x["image_grid_thw"].prod()) // MERGE**2 for x in want]
        assert runs_of(sample["input_ids"].tolist(), IMAGE_ID) == counts
        assert ds.token_length(i) == len(sample["input_ids"]) == len(ds.encoded(i))
        assert ds.encoded(i).item_tokens == {"images": counts}
        got = sample["items"]["images"]["vit"]
        assert sample["num_items"]["images"] == len(files)
        assert torch.equal(got["image_grid_thw"], torch.cat([x["image_grid_thw"] for x in want]))
        torch.testing.assert_close(got["pixel_values"], torch.cat([x["pixel_values"] for x in want]), rtol=0, atol=0)
        # the model's own count agrees
        assert model.modalities["images"].item_tokens(sample["items"]["images"]) == counts


def test_truncation_keeps_whole_items(tmp_path):
    """truncation: truncate cuts after an item's run, dropping the later items and their counts."""
    noise_image(40, 40, 1).save(tmp_path / "a.png")  # 100 tokens
    noise_image(64, 64, 2).save(tmp_path / "b.png")  # 256 tokens
    write_jsonl(tmp_path, [{"images": ["a.png", "b.png"],
                            "conversations": [human("<image>x"), gpt("Yes, a long answer."),
                                              human("so much padding " * 6 + "<image>"),
                                              gpt("no")]}])
    cfg = data_cfg(tmp_path, max_seq_len=200, truncation="truncate")
    ds = RecordDataset(open_source(cfg, "train"), SampleBuilder(cfg, tiny_model(), ByteTokenizer()))
    enc = ds.encoded(0)
    assert len(enc) == 200 and enc.item_tokens == {"images": [100]} and len(enc.media["images"]) == 1
    assert runs_of(ds[0]["input_ids"].tolist(), IMAGE_ID) == [100]


# ------------------------------------------------------------------------------------------- videos
def test_frame_sampling_follows_transformers_rule():
    """transformers' Qwen2VLVideoProcessor.sample_frames (fps given): total / video_fps * fps frames, at least
    min_frames, at most max_frames, a multiple of temporal_patch_size, spread by arange(0, total, total / n)."""
    assert sample_frame_indices(23, 10.0, 2.0, 4, 768, 2) == [0, 5, 11, 17]  # 4.6 -> 4
    assert sample_frame_indices(23, 10.0, 5.0, 4, 768, 2) == [0, 2, 4, 6, 9, 11, 13, 16, 18, 20]  # 11.5 -> 10
    assert sample_frame_indices(23, 10.0, 5.0, 4, 3, 2) == [0, 11]  # the cap: 3 -> 2 (whole temporal patches)
    assert sample_frame_indices(100, 25.0, 0.5, 4, 768, 2) == [0, 25, 50, 75]  # 2 -> min_frames 4
    assert sample_frame_indices(1, 25.0, 2.0, 4, 768, 2) == [0]  # shorter than a temporal patch: kept
    assert sample_frame_indices(5, None, 2.0, 4, 768, 2) == [0, 1, 2, 3, 4]  # a frame folder: all its frames
    assert sample_frame_indices(9, None, 2.0, 4, 4, 2) == [0, 2, 4, 6]  # ... up to the cap


@pytest.mark.parametrize("container,codec", [("mp4", "mpeg4"), ("mkv", "ffv1")])
def test_video_file_sampled_at_fps_with_cap(tmp_path, container, codec):
    """Frames are picked at data.video_fps from the container's frame count and rate (mkv stores no count:
    its packets are counted), at most data.video_max_frames; the planned count equals the built grid's."""
    path = write_video(tmp_path / f"v.{container}", 23, fps=10, codec=codec)
    mp = MediaProcessor(tiny_model(), **PIXELS, video_fps=2.0)
    plan = mp.video_plan(path)
    assert (plan.frames, plan.fps, plan.width, plan.height) == (23, 10.0, 48, 32)
    assert plan.indices == [0, 5, 11, 17]
    vision = mp.native["videos"][3]
    frames = vision.read_frames(path, plan)
    assert [round(grey(f) / 10) for f in frames] == [0, 5, 11, 17]  # the frames picked are those frames
    out = mp.video(path)["vit"]
    t, gh, gw = out["video_grid_thw"][0].tolist()
    assert t == 2 and mp.video_tokens(path) == t * gh * gw // MERGE**2
    capped = MediaProcessor(tiny_model(), **PIXELS, video_fps=5.0, video_max_frames=3)
    assert capped.video_plan(path).indices == [0, 11]
    assert capped.video(path)["vit"]["video_grid_thw"][0, 0] == 1


def test_video_pixels_are_the_image_processor_frames_in_temporal_patches(tmp_path):
    """pixel_values_videos row (t, patch) holds frames 2t and 2t+1 of the patch, each equal to transformers' Qwen2-VL
    processing of that frame at the video pixel bounds (an odd last frame repeated), in the video processor's
    layout (C, T, p, p) per row."""
    path = write_video(tmp_path / "v.mp4", 12, fps=10)
    mp = MediaProcessor(tiny_model(), **PIXELS, video_fps=5.0)  # 6 frames -> 3 temporal patches
    vision = mp.native["videos"][3]
    plan = mp.video_plan(path)
    frames = vision.read_frames(path, plan)
    out = mp.video(path)["vit"]
    t, gh, gw = out["video_grid_thw"][0].tolist()
    assert t == 3 and len(frames) == 6
    proc = hf_image_processor(PIXELS["video_min_pixels"], PIXELS["video_max_pixels"])
    x = out["pixel_values_videos"].reshape(t, gh * gw, 3, TEMPORAL, PATCH, PATCH)
    for k, f in enumerate(frames):
        ref = proc(images=f, return_tensors="pt")
        assert ref["image_grid_thw"][0].tolist() == [1, gh, gw]
        ref = ref["pixel_values"].reshape(gh * gw, 3, TEMPORAL, PATCH, PATCH)[:, :, 0]
        torch.testing.assert_close(x[k // 2, :, :, k % 2], ref, rtol=0, atol=0)


def test_frame_folder_sorted_naturally_capped_and_padded(tmp_path):
    """A folder of frame images is a video: frames in natural name order (frame_2 before frame_10), all of
    them (an odd count repeats the last in the last temporal patch), at most video_max_frames."""
    folder = tmp_path / "clip"
    folder.mkdir()
    for k in range(11):
        PIL.fromarray(np.full((20, 28, 3), 20 * k, np.uint8)).save(folder / f"frame_{k + 1}.png")
    (folder / "notes.txt").write_text("not a frame")
    mp = MediaProcessor(tiny_model(), **PIXELS)
    plan = mp.video_plan(Media("clip", path=folder))
    assert [p.name for p in plan.files][:3] == ["frame_1.png", "frame_2.png", "frame_3.png"]
    assert plan.indices == list(range(11)) and plan.grid[0] == 6
    out = mp.video(Media("clip", path=folder))["vit"]
    t, gh, gw = out["video_grid_thw"][0].tolist()
    x = out["pixel_values_videos"].reshape(t, gh * gw, 3, TEMPORAL, PATCH, PATCH)
    assert torch.equal(x[5, :, :, 0], x[5, :, :, 1])  # frame 11 repeated
    assert not torch.equal(x[4, :, :, 0], x[4, :, :, 1])
    capped = MediaProcessor(tiny_model(), **PIXELS, video_max_frames=4)
    assert capped.video_plan(Media("clip", path=folder)).indices == [0, 2, 5, 8]


def test_llava_sample_with_images_and_videos(tmp_path):
    """<image> and <video> tags in one sample: each item's run has its own count (the video modality's id for
    videos), planned == built, and the video's inputs are pixel_values_videos + video_grid_thw."""
    noise_image(50, 30).save(tmp_path / "a.png")
    write_video(tmp_path / "v.mp4", 20, fps=10)
    (tmp_path / "frames").mkdir()
    for k in range(4):
        PIL.fromarray(np.full((24, 24, 3), 50 * k, np.uint8)).save(tmp_path / "frames" / f"{k:03d}.jpg")
    write_jsonl(tmp_path, [{"id": "mix", "image": "a.png", "videos": ["v.mp4", "frames"],
                            "conversations": [human("<video> then <image> then <video>?"), gpt("Three.")]}])
    cfg = data_cfg(tmp_path)
    ds = RecordDataset(open_source(cfg, "train"), SampleBuilder(cfg, tiny_model(), ByteTokenizer()))
    sample, enc = ds[0], ds.encoded(0)
    mp = MediaProcessor(tiny_model(), **PIXELS)
    video_counts = [mp.video_tokens(tmp_path / "v.mp4"), mp.video_tokens(Media("f", path=tmp_path / "frames"))]
    assert enc.item_tokens == {"images": [mp.image_tokens(tmp_path / "a.png")], "videos": video_counts}
    ids = sample["input_ids"].tolist()
    assert runs_of(ids, VIDEO_ID) == video_counts and runs_of(ids, IMAGE_ID) == enc.item_tokens["images"]
    assert ids.index(VIDEO_ID) < ids.index(IMAGE_ID)  # the text's order
    v = sample["items"]["videos"]["vit"]
    assert set(v) == {"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}
    assert sample["num_items"]["videos"] == 2
    # Qwen2.5-VL's M-RoPE time step: temporal_patch_size / video_fps per frame group of each video
    assert v["second_per_grid_ts"].tolist() == [v_plan.seconds_per_grid for v_plan in
                                                (mp.video_plan(tmp_path / "v.mp4"),
                                                 mp.video_plan(Media("f", path=tmp_path / "frames")))]
    assert [int(g.prod()) // MERGE**2 for g in v["video_grid_thw"]] == video_counts
    assert v["pixel_values_videos"].shape[0] == int(v["video_grid_thw"].prod(-1).sum())
    assert len(ids) == ds.token_length(0)
    again = pickle.loads(pickle.dumps(ds))[0]  # as a DataLoader worker builds it
    assert torch.equal(again["input_ids"], sample["input_ids"])
    assert torch.equal(again["items"]["videos"]["vit"]["pixel_values_videos"], v["pixel_values_videos"])


def test_webdataset_and_parquet_videos(tmp_path):
    """A shard's key.mp4 member and a Parquet ``videos`` cell (bytes) are the sample's videos."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("webdataset")
    video = write_video(tmp_path / "v.mp4", 8, fps=4).read_bytes()
    conv = [human("<video>What?"), gpt("Grey.")]
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in (("k1.json", json.dumps({"conversations": conv}).encode()), ("k1.mp4", video)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"conversations": [json.dumps(conv)], "videos": [[video]]}), tmp_path / "d.parquet")
    model = tiny_model()
    want = MediaProcessor(model, **PIXELS).video(tmp_path / "v.mp4")["vit"]
    for source, path in (("webdataset", "s.tar"), ("parquet", "d.parquet")):
        cfg = validate_data_config({"source": source, "path": str(tmp_path / path), "eval_fraction": 0.0,
                                    "max_seq_len": 4096, **PIXELS})
        ds = RecordDataset(open_source(cfg, "train"), SampleBuilder(cfg, model, ByteTokenizer()))
        got = ds[0]["items"]["videos"]["vit"]
        assert torch.equal(got["video_grid_thw"], want["video_grid_thw"])
        assert torch.equal(got["pixel_values_videos"], want["pixel_values_videos"])
        assert runs_of(ds[0]["input_ids"].tolist(), VIDEO_ID) == [int(want["video_grid_thw"].prod()) // 4]


# ------------------------------------------------------------------------------------------- bad input
def test_bad_videos_are_named(tmp_path):
    """An unreadable video, an empty or mixed-size frame folder, and tags that do not match the files each
    raise a DataError naming the sample, the file and, among several, the item ("video 2 of 2")."""
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video" * 10)
    (tmp_path / "empty").mkdir()
    (tmp_path / "mixed").mkdir()
    PIL.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "mixed" / "1.png")
    PIL.fromarray(np.zeros((20, 16, 3), np.uint8)).save(tmp_path / "mixed" / "2.png")
    write_video(tmp_path / "ok.mp4", 4)
    write_jsonl(tmp_path, [
        {"id": "bad", "videos": ["ok.mp4", "bad.mp4"], "conversations": [human("<video><video>"), gpt("x")]},
        {"id": "empty", "video": "empty", "conversations": [human("<video>"), gpt("x")]},
        {"id": "mixed", "video": "mixed", "conversations": [human("<video>"), gpt("x")]},
        {"id": "count", "video": "ok.mp4", "conversations": [human("<video> <video>"), gpt("x")]},
        {"id": "missing", "video": "nope.mp4", "conversations": [human("<video>"), gpt("x")]},
        {"id": "noimage", "image": "bad.mp4", "conversations": [human("<image>"), gpt("x")]}])
    cfg = data_cfg(tmp_path)
    ds = RecordDataset(open_source(cfg, "train"), SampleBuilder(cfg, tiny_model(), ByteTokenizer()))
    with pytest.raises(DataError, match=r"line 1 \(id 'bad'\).*video 2 of 2: cannot read video bad\.mp4"):
        ds.encoded(0)
    with pytest.raises(DataError, match=r"id 'empty'.*the video folder empty holds no frame images"):
        ds.encoded(1)
    with pytest.raises(DataError, match=r"id 'mixed'.*: frame 1 of video mixed is 16x20, but its first "
                                        r"frame .* 16x16"):
        ds[2]
    with pytest.raises(DataError, match=r"id 'count'.*2 <video> tag\(s\) in the text but 1 video file\(s\)"):
        ds.encoded(3)
    with pytest.raises(DataError, match=r"id 'missing'.*: video not found: nope\.mp4"):
        ds.encoded(4)
    with pytest.raises(DataError, match=r"id 'noimage'.*: cannot read image bad\.mp4"):
        ds.encoded(5)


def test_video_longer_than_the_limit_is_dropped_and_model_without_videos_refuses(tmp_path):
    """A video whose tokens pass data.max_seq_len is dropped (too long, counted before decoding); a video
    sample for a model without a video modality is a DataError saying what to add."""
    from mimo_spec.data.samples import Dropped

    write_video(tmp_path / "v.mp4", 24, fps=10)  # 4 frames of 36x24 pixels after resizing: 108 tokens
    write_jsonl(tmp_path, [{"video": "v.mp4", "conversations": [human("<video>"), gpt("x")]}])
    cfg = data_cfg(tmp_path, max_seq_len=64)
    ds = RecordDataset(open_source(cfg, "train"), SampleBuilder(cfg, tiny_model(), ByteTokenizer()))
    with pytest.raises(Dropped, match="too long"):
        ds.encoded(0)
    ds = RecordDataset(open_source(cfg, "train"), SampleBuilder(cfg, tiny_model(video=False), ByteTokenizer()))
    with pytest.raises(ConfigError, match="video input but the model has no video modality"):
        ds.encoded(0)


def test_config_checks():
    """Pixel bounds that contradict each other, and a merge the model does not do, are config errors."""
    with pytest.raises(ConfigError, match="data.min_pixels .*exceeds data.max_pixels"):
        MediaProcessor(tiny_model(), min_pixels=5000, max_pixels=4096)
    with pytest.raises(ConfigError, match="data.video_min_pixels .*exceeds data.video_max_pixels"):
        MediaProcessor(tiny_model(), **{**PIXELS, "video_min_pixels": 2000})
    model = tiny_model()
    model.modalities["images"].input_projections["vit"] = qwen_vit.PatchMerger(16, 32, 1)  # merges nothing
    with pytest.raises(ConfigError, match="spatial merge"):
        MediaProcessor(model, **PIXELS)
    with pytest.raises(ConfigError, match="video_token"):
        validate = validate_data_config({"source": "llava_json", "path": "x.jsonl", "video_token": "<image>"})
        SampleBuilder(validate, tiny_model(), ByteTokenizer())
    assert isinstance(MediaProcessor(tiny_model(), **PIXELS).native["images"][3], QwenVision)


# ------------------------------------------------------------------------------------------- the model
IMAGES_YAML = """# @package modalities.images
module: modality
params:
  special_token_id: 1000
submodules:
  encoders:
    vit:
      module: qwen_vit
      params: {hidden_size: 16, num_layers: 1, num_heads: 2, ffn_hidden_size: 32, patch_size: 2,
               temporal_patch_size: 2, spatial_merge_size: 2}
  input_projections:
    vit:
      module: patch_merger
      params: {in_features: 16, out_features: "${model.params.hidden_size}", spatial_merge_size: 2}
"""
VIDEOS_YAML = """# @package modalities.videos
module: modality
params:
  special_token_id: 1002
  item_kind: video
  inputs_from: images
"""


def test_model_takes_the_batch(tmp_path):
    """A built model (qwen_vit + patch_merger, a video modality sharing the tower) accepts a collated batch of
    images of mixed sizes and a video: the placeholder check per sample passes and the loss is finite; a prompt
    with a video encodes the same way."""
    from mimo_spec import build_model
    from mimo_spec.config import compose_config
    from mimo_spec.data import build_dataset, collate, encode_prompt
    from mimo_spec.data.tokenizer import build_tokenizer

    conf = tmp_path / "conf" / "modality"
    conf.mkdir(parents=True)
    (conf / "qwen_images.yaml").write_text(IMAGES_YAML)
    (conf / "qwen_videos.yaml").write_text(VIDEOS_YAML)
    model = build_model(compose_config([f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                                        "modality=[qwen_images,qwen_videos]"]), seed=0)
    noise_image(37, 61).save(tmp_path / "a.png")
    noise_image(20, 28, 1).save(tmp_path / "b.png")
    write_video(tmp_path / "v.mp4", 12, fps=10)
    write_jsonl(tmp_path, [
        {"images": ["a.png", "b.png"], "conversations": [human("<image> <image> hi"), gpt("ok")]},
        {"videos": ["v.mp4"], "image": "b.png", "conversations": [human("<video><image>"), gpt("fine")]}])
    cfg = {"source": "llava_json", "path": str(tmp_path / "data.jsonl"), "eval_fraction": 0.0, "max_seq_len": 512,
           **PIXELS}
    tok = build_tokenizer(cfg, model)
    ds = build_dataset(cfg, model, tok)
    batch = collate([ds[0], ds[1]], tok.pad_id)
    assert batch["items_per_sample"] == {"images": [2, 1], "videos": [0, 1]}
    model.prepare_inputs(batch["input_ids"], batch["modality_inputs"], items_per_sample=batch["items_per_sample"])
    out = model(batch["input_ids"], batch["modality_inputs"], attention_mask=batch["attention_mask"],
                labels=batch["labels"])
    assert torch.isfinite(out.loss)
    ids, inputs = encode_prompt("<video> What happens?", model, tok, cfg, videos=[tmp_path / "v.mp4"])
    assert runs_of(ids[0].tolist(), VIDEO_ID) == [int(inputs["videos"]["vit"]["video_grid_thw"].prod()) // 4]
    model.prepare_inputs(ids, inputs, items_per_sample={"videos": [1]})


def test_video_container_read_once_per_sample(tmp_path, monkeypatch):
    """Building a sample reads each video's container once for its plan (frames, grid): decoding reuses it."""
    from mimo_spec.data import preprocess

    write_video(tmp_path / "v.mkv", 10, fps=10, codec="ffv1")
    write_jsonl(tmp_path, [{"video": "v.mkv", "conversations": [human("<video>"), gpt("x")]}])
    cfg = data_cfg(tmp_path)
    ds = RecordDataset(open_source(cfg, "train"), SampleBuilder(cfg, tiny_model(), ByteTokenizer()))
    calls = []
    original = preprocess.video_info
    monkeypatch.setattr(preprocess, "video_info", lambda *a, **k: calls.append(a) or original(*a, **k))
    sample = ds[0]
    assert len(calls) == 1 and sample["num_items"]["videos"] == 1
