"""Data: tokenizers, the data config, synthetic and LLaVA-JSON datasets, collation, bad input."""

import json
import pickle
import time
import wave

import pytest
import torch

from mimo_spec import build_model
from mimo_spec.config import compose_config
from mimo_spec.errors import ConfigError, InputError
from mimo_spec.data import build_dataset, collate, encode_prompt, validate_data_config
from mimo_spec.data.preprocess import CLIP_MEAN, CLIP_STD, log_mel
from mimo_spec.data.synthetic import render_image
from mimo_spec.data.tokenizer import ByteTokenizer, build_tokenizer

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def vlm():
    """The default tiny model: llama_tiny + vision_clip (16 placeholders per image, id 1000)."""
    return build_model(compose_config([]), seed=0)


@pytest.fixture(scope="module")
def av_model():  # + audio_whisper: 32 placeholders per clip, id 1001
    return build_model(compose_config(["modality=[vision_clip,audio_whisper]"]), seed=0)


def synth(model, split="train", **kw):
    cfg = {"source": "synthetic", "num_samples": 256, "eval_samples": 32, **kw}
    tok = build_tokenizer(cfg, model)
    return build_dataset(cfg, model, tok, split), tok


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


@pytest.fixture
def fixture_dir(tmp_path):
    """A small real-data fixture: PNGs, a WAV file and a LLaVA-style JSON."""
    (tmp_path / "img").mkdir(), (tmp_path / "wav").mkdir()
    for color, shape in (("red", "square"), ("blue", "circle")):
        img = (render_image(color, shape, 40) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        PIL.fromarray(img).save(tmp_path / "img" / f"{color}.png")
    PIL.fromarray((torch.ones(20, 60, 3) * 255).to(torch.uint8).numpy()).save(tmp_path / "img" / "wide.png")
    with wave.open(str(tmp_path / "wav" / "tone.wav"), "wb") as f:  # 0.5 s of 440 Hz, 16-bit, 16 kHz
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(16000)
        f.writeframes((0.3 * torch.sin(torch.arange(8000) * 2 * torch.pi * 440 / 16000) * 32767).short().numpy())
    records = [
        {"id": "a", "image": "red.png", "conversations": [human("<image>\nWhat is it?"), gpt("A red square.")]},
        {"id": "b", "images": ["red.png", "blue.png"],
         "conversations": [human("<image>\n<image>\nCompare."), gpt("Red, then blue."),
                           human("And now?"), gpt("Still two.")]},
        {"id": "c", "image": "wide.png", "conversations": [human("Colour?"), gpt("White.")]},  # no tag: prepended
        {"id": "d", "conversations": [{"from": "system", "value": "Be brief."}, human("Hi"), gpt("Hello.")]},
        {"id": "e", "audio": "tone.wav", "image": "blue.png",
         "conversations": [human("<image> <audio> Both?"), gpt("A circle and a tone.")]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records, indent=1))
    return tmp_path


def llava(model, d, split="train", **kw):
    cfg = {"source": "llava_json", "path": str(d / "data.json"), "image_folder": str(d / "img"),
           "audio_folder": str(d / "wav"), "eval_fraction": 0.0, **kw}
    tok = build_tokenizer(cfg, model)
    return build_dataset(cfg, model, tok, split), tok


def check_batch(model, batch):  # the model accepts the batch: host-side placeholder check, finite loss
    model.prepare_inputs(batch["input_ids"], batch["modality_inputs"], items_per_sample=batch["items_per_sample"])
    out = model(batch["input_ids"], batch["modality_inputs"], labels=batch["labels"],
                attention_mask=batch["attention_mask"], output_targets=batch.get("output_targets"))
    assert torch.isfinite(out.loss)
    return out


# ------------------------------------------------------------------------------ tokenizers
def test_byte_tokenizer_and_vocabulary_fit(vlm):
    tok = ByteTokenizer(300)
    ids = tok.encode("héllo <image>")
    assert ids[:2] == [104, 195] and max(ids) < 256
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (300, 301, 302, 303)
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == "héllo <image>"
    assert tok.decode([tok.bos_id, 104, tok.eos_id], skip_special_tokens=False) == "<bos>h<eos>"
    with pytest.raises(ConfigError, match=r"data.tokenizer: the tokenizer has 1025 ids .* vocabulary is 1024"):
        build_tokenizer({"special_tokens_start": 1022}, vlm)
    with pytest.raises(ConfigError, match=r"data.special_tokens_start: byte tokenizer id 1000 is also "
                                          r"modalities.images.params.special_token_id"):
        build_tokenizer({"special_tokens_start": 998}, vlm)


def save_hf_tokenizer(directory, words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(str(directory))


def test_local_hf_tokenizer_and_its_errors(tmp_path, vlm, fixture_dir):
    pytest.importorskip("transformers")
    words = "USER: ASSISTANT: What is it? A red square. Compare. Red, then blue. And now? Still two. Colour? " \
            "White. Hi Hello.".split()
    save_hf_tokenizer(tmp_path / "tok", words)
    ds, tok = llava(vlm, fixture_dir, tokenizer=str(tmp_path / "tok"), max_samples=4)  # no audio
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 4 + len(set(words)))
    assert tok.decode(tok.encode("A red square.")) == "A red square."
    answer = [t for t in ds[0]["labels"].tolist() if t != -100]
    assert tok.decode(answer, skip_special_tokens=False) == "A red square. </s>"
    check_batch(vlm, collate([ds[i] for i in range(len(ds))], tok.pad_id))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"data.tokenizer: .*empty holds no tokenizer files \(expected one of"):
        build_tokenizer({"tokenizer": str(tmp_path / "empty")}, vlm)
    with pytest.raises(ConfigError, match=r"data.tokenizer: no such tokenizer directory"):
        build_tokenizer({"tokenizer": str(tmp_path / "nope")}, vlm)
    save_hf_tokenizer(tmp_path / "big", [f"w{i}" for i in range(1100)])
    with pytest.raises(ConfigError, match=r"data.tokenizer: the tokenizer has 1104 ids"):
        build_tokenizer({"tokenizer": str(tmp_path / "big")}, vlm)


# --------------------------------------------------------------------------------- config
def test_data_config_validation():
    cfg = validate_data_config(compose_config([]).data)  # the shipped YAML files validate
    assert cfg.source == "synthetic" and cfg.tokenizer == "byte"
    cfg = validate_data_config(compose_config(["data=llava_json", "data.path=x.json"]).data)
    assert (cfg.source, cfg.path, cfg.truncation) == ("llava_json", "x.json", "drop")
    with pytest.raises(ConfigError, match=r"data.num_sampels: unknown key .*did you mean num_samples\?"):
        validate_data_config({"source": "synthetic", "num_sampels": 3})
    with pytest.raises(ConfigError, match=r"data.source: unknown data source 'llava' \(did you mean llava_json\?"):
        validate_data_config({"source": "llava"})
    with pytest.raises(ConfigError, match=r"data.path: required for source 'llava_json' \(set data.path=...\)"):
        validate_data_config(compose_config(["data=llava_json"]).data)  # path: ??? in the YAML
    with pytest.raises(ConfigError) as e:
        validate_data_config({"source": "llava_json", "truncation": "cut", "template": {"user_prefx": "U"}})
    text = str(e.value)
    assert "data.path: required for source 'llava_json'" in text
    assert "data.truncation: " in text and "'cut'" in text
    assert "data.template.user_prefx: unknown key" in text and "did you mean user_prefix?" in text


# ------------------------------------------------------------------------------ synthetic
def test_synthetic_is_deterministic_and_captions_match(vlm):
    a, tok = synth(vlm)
    b, _ = synth(vlm)
    for i in (0, 7, 255):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"])
        for m, enc in a[i]["items"].items():
            assert torch.equal(enc["clip"]["pixel_values"], b[i]["items"][m]["clip"]["pixel_values"])
    other, _ = synth(vlm, seed=1)
    ev, _ = synth(vlm, "eval")
    assert len(ev) == 32
    assert any(not torch.equal(a[i]["input_ids"], other[i]["input_ids"]) for i in range(8))
    assert any(not torch.equal(a[i]["input_ids"], ev[i]["input_ids"]) for i in range(8))
    # the caption names what the image shows: the colour dominates at the shape's centre (or edge: ring)
    s = next(a[i] for i in range(64) if a[i]["num_items"]["images"] == 1)
    _, color, shape = tok.decode(t for t in s["labels"].tolist() if t != -100).split()
    img = s["items"]["images"]["clip"]["pixel_values"][0]
    unnorm = img * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    centre_or_edge = unnorm[:, 16, 16] if shape != "ring" else unnorm[:, 16, 4:28].max(dim=1).values
    assert int(centre_or_edge.argmax()) == {"red": 0, "green": 1, "blue": 2, "yellow": 0}[color]
    tight, _ = synth(vlm, max_seq_len=140)  # two images no longer fit: samples get at most one
    assert max(len(tight[i]["input_ids"]) for i in range(64)) <= 140
    assert {tight[i]["num_items"]["images"] for i in range(64)} == {0, 1}
    with pytest.raises(ConfigError, match=r"data.max_seq_len: one images item takes 16 placeholder tokens"):
        synth(vlm, max_seq_len=60)


def test_synthetic_follows_the_modalities():
    any_model = build_model(compose_config(["modality=[vision_clip,audio_whisper,image_gen]"]), seed=0)
    ds, tok = synth(any_model)
    mods = any_model.modalities
    per_item = {n: mods[n].tokens_per_item(mods[n].example_inputs(1)) for n in ("images", "audio")}
    assert per_item == {"images": 16, "audio": 32}
    kinds, counts = set(), {"images": set(), "audio": set()}
    for i in range(len(ds)):
        s = ds[i]
        for n in per_item:
            counts[n].add(s["num_items"][n])
            assert int((s["input_ids"] == mods[n].special_token_id).sum()) == s["num_items"][n] * per_item[n]
            assert (s["labels"][s["input_ids"] == mods[n].special_token_id] == -100).all()
        gen = int((s["input_ids"] == mods["image_out"].generation_token_id).sum())
        assert gen == 64 * len(s["targets"].get("image_out", []))  # 8 x 8 palette codes per image
        assert int((s["input_ids"] == mods["image_out"].begin_token_id).sum()) == len(s["targets"].get("image_out", []))
        kinds.add("gen" if gen else "text" if not any(s["num_items"].values()) else "items")
        assert s["input_ids"][0] == tok.bos_id and s["labels"][-1] == tok.eos_id
    assert kinds == {"gen", "text", "items"} and counts == {"images": {0, 1, 2}, "audio": {0, 1, 2}}
    out = check_batch(any_model, collate([ds[i] for i in range(16)], tok.pad_id))
    assert "image_out" in out.modality_losses


def test_default_model_learns_the_synthetic_data():
    """A plain AdamW loop (lr 1e-3, batch 8, 150 steps; ~5 s on 2 cores) cuts the loss clearly,
    and the model reads each image's colour (the caption's first letter after "a ") from its pixels."""
    model = build_model(compose_config([]), seed=0)
    ds, tok = synth(model, num_samples=1200)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, t0, threads = [], time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast, and immune to a busy machine's oversubscription
    try:
        for step in range(150):
            batch = collate([ds[step * 8 + j] for j in range(8)], tok.pad_id)
            loss = model(batch["input_ids"], batch["modality_inputs"], labels=batch["labels"],
                         attention_mask=batch["attention_mask"]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    print(f"loss first5={first:.3f} last10={last:.3f} curve={[round(x, 2) for x in losses[::10]]} "
          f"time={time.perf_counter() - t0:.1f}s")
    assert last < 0.4 * first
    ev, _ = synth(model, "eval", eval_samples=64)
    singles = [ev[i] for i in range(len(ev)) if ev[i]["num_items"]["images"] == 1]
    batch = collate(singles, tok.pad_id)
    with torch.no_grad():
        pred = model(batch["input_ids"], batch["modality_inputs"]).logits.argmax(-1)
    right = 0
    for row, s in enumerate(singles):
        colour_at = int((s["labels"] != -100).nonzero()[0]) + 2  # "a " then the colour's first letter
        right += int(pred[row, colour_at - 1] == s["labels"][colour_at])
    print(f"colour read from the image: {right}/{len(singles)}")
    assert len(singles) >= 10 and right >= 0.8 * len(singles)


# -------------------------------------------------------------------------------- collate
def test_collate_pads_and_groups_items(vlm):
    ds, tok = synth(vlm)
    picks = [next(i for i in range(256) if ds[i]["num_items"]["images"] == n) for n in (2, 0, 1)]
    samples = [ds[i] for i in picks]
    b = collate(samples, tok.pad_id)
    lengths = [len(s["input_ids"]) for s in samples]
    assert b["input_ids"].shape == (3, max(lengths)) and b["input_ids"].dtype == torch.long
    assert b["attention_mask"].sum(1).tolist() == lengths
    for i, n in enumerate(lengths):
        assert (b["input_ids"][i, n:] == tok.pad_id).all() and (b["labels"][i, n:] == -100).all()
    assert b["items_per_sample"] == {"images": [2, 0, 1]}
    pixels = b["modality_inputs"]["images"]["clip"]["pixel_values"]
    assert pixels.shape == (3, 3, 32, 32)  # sample by sample: two of sample 0, one of sample 2
    assert torch.equal(pixels[2], samples[2]["items"]["images"]["clip"]["pixel_values"][0])
    assert b["num_tokens"] == int((b["labels"][:, 1:] != -100).sum()) > 0 and "output_targets" not in b
    text_only = collate([samples[1]], tok.pad_id)
    assert text_only["modality_inputs"] == {} and text_only["items_per_sample"] == {"images": [0]}
    check_batch(vlm, b)


# ----------------------------------------------------------------------------- llava_json
def test_llava_json_samples(av_model, fixture_dir):
    ds, tok = llava(av_model, fixture_dir)
    assert len(ds) == 5
    img_id, aud_id = (av_model.modalities[m].special_token_id for m in ("images", "audio"))
    expect = {"a": (1, 0), "b": (2, 0), "c": (1, 0), "d": (0, 0), "e": (1, 1)}
    for i, (images, audio) in enumerate(expect.values()):
        s = ds[i]
        assert s["num_items"] == {"images": images, "audio": audio}
        assert int((s["input_ids"] == img_id).sum()) == 16 * images
        assert int((s["input_ids"] == aud_id).sum()) == 32 * audio
    trained = tok.decode([t for t in ds[1]["labels"].tolist() if t != -100], skip_special_tokens=False)
    assert trained == "Red, then blue.<eos>Still two.<eos>"
    assert tok.decode(ds[1]["input_ids"]) == ("USER: \n\nCompare. ASSISTANT: Red, then blue."
                                           "USER: And now? ASSISTANT: Still two.")
    assert tok.decode(ds[3]["input_ids"].tolist()) == "Be brief. USER: Hi ASSISTANT: Hello."
    red = ds[0]["items"]["images"]["clip"]["pixel_values"][0]
    expect_red = (torch.tensor([0.9, 0.1, 0.1]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert red.shape == (3, 32, 32) and torch.allclose(red[:, 16, 16], expect_red, atol=0.03)
    wide = ds[2]["items"]["images"]["clip"]["pixel_values"][0]  # padded to square with the mean colour
    assert torch.allclose(wide[:, 0, 16], torch.zeros(3), atol=0.02) and wide[0, 16, 16] > 1.5
    assert ds[4]["items"]["audio"]["whisper"]["input_features"].shape == (1, 80, 64)
    check_batch(av_model, collate([ds[i] for i in range(5)], tok.pad_id))


def test_prompt_matches_the_training_layout(av_model, fixture_dir):
    cfg = {"source": "synthetic"}
    tok = build_tokenizer(cfg, av_model)
    ids, inputs = encode_prompt("What is shown?", av_model, tok, cfg, images=[fixture_dir / "img" / "red.png"])
    assert tok.decode(ids[0]) == "USER: \nWhat is shown? ASSISTANT: " and int((ids == 1000).sum()) == 16
    ds, _ = synth(av_model)
    s = next(ds[i] for i in range(64) if ds[i]["num_items"] == {"images": 1, "audio": 0})
    assert torch.equal(ids[0], s["input_ids"][: ids.shape[1]])  # the prompt is the sample up to its answer
    assert inputs["images"]["clip"]["pixel_values"].shape == (1, 3, 32, 32)
    ids, inputs = encode_prompt("<audio> then <image>?", av_model, tok, cfg, images=[fixture_dir / "img" / "red.png"],
                                audio=[fixture_dir / "wav" / "tone.wav"])
    assert ids[0].tolist().index(1001) < ids[0].tolist().index(1000) and set(inputs) == {"images", "audio"}
    av_model.prepare_inputs(ids, inputs)
    with pytest.raises(InputError, match=r"prompt: 2 <image> tag\(s\) in the prompt but 1 file\(s\)"):
        encode_prompt("<image><image>", av_model, tok, cfg, images=[fixture_dir / "img" / "red.png"])


def test_llava_eval_split_and_pickling(av_model, fixture_dir):
    tr, _ = llava(av_model, fixture_dir, eval_fraction=0.4, seed=3)
    ev, _ = llava(av_model, fixture_dir, "eval", eval_fraction=0.4, seed=3)
    where = lambda d: {d.encoded(i).where for i in range(len(d))}  # noqa: E731
    assert len(ev) == 2 and len(tr) == 3 and not where(tr) & where(ev)
    (fixture_dir / "held.json").write_text(json.dumps([{"conversations": [human("x"), gpt("y")]}]))
    ev2, _ = llava(av_model, fixture_dir, "eval", eval_path=str(fixture_dir / "held.json"))
    assert len(ev2) == 1 and where(ev2) == {"held.json: sample 0"}
    syn, _ = synth(av_model)
    for d in (tr, syn):  # datasets keep ids and shapes, not the model: cheap to send to DataLoader workers
        blob = pickle.dumps(d)
        assert len(blob) < 200_000 and torch.equal(pickle.loads(blob)[1]["input_ids"], d[1]["input_ids"])


def test_audio_features_and_wav_formats(tmp_path):
    from mimo_spec.data.preprocess import read_wav, resample

    transformers = pytest.importorskip("transformers")
    wav = 0.3 * torch.sin(2 * torch.pi * 440 * torch.arange(16000) / 16000) + 0.01 * torch.randn(16000)
    ref = transformers.WhisperFeatureExtractor(feature_size=80)(wav.numpy(), sampling_rate=16000,
                                                                 return_tensors="pt")["input_features"][0]
    assert torch.allclose(log_mel(wav, 80, 3000), ref, atol=1e-4)
    values = [0, 2**23 - 1, -(2**23), -1]  # 24-bit stereo: left, right pairs
    with wave.open(str(tmp_path / "s24.wav"), "wb") as f:
        f.setnchannels(2), f.setsampwidth(3), f.setframerate(8000)
        f.writeframes(b"".join(v.to_bytes(3, "little", signed=True) for v in values))
    x, rate = read_wav(tmp_path / "s24.wav")
    assert rate == 8000 and torch.allclose(x, torch.tensor([0.5, -0.5]), atol=1e-6)  # channels averaged
    assert resample(torch.ones(80), 8000, 16000).shape == (160,)
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    with pytest.raises(InputError, match=r"s3: cannot read WAV file .*bad.wav: the file ends early .*\(audio is read by"):
        read_wav(tmp_path / "bad.wav", where="s3")


def write_json(d, records):
    (d / "data.json").write_text(json.dumps(records))


def long_sample_file(d, *turns):
    write_json(d, [{"id": "long", "images": ["red.png", "blue.png"], "conversations": list(turns)},
                   {"id": "short", "conversations": [human("Hi"), gpt("Hello.")]}])


def test_truncation_never_cuts_placeholders(vlm, fixture_dir):
    from mimo_spec.data.samples import Dropped

    # layout: bos + "USER: " (7 ids) | image run 16 | "\n" | image run 16 | ...: runs at 7..22 and 24..39
    long_sample_file(fixture_dir, human("<image>\n<image>" + " word" * 30), gpt("An answer."))
    ds, _ = llava(vlm, fixture_dir, max_seq_len=30)
    assert len(ds) == 2 and ds.token_length(1) < 30  # samples are read when asked for: the long one is dropped then
    with pytest.raises(Dropped, match=r"sample 0 \(id 'long'\): too long: \d+ tokens, the limit is 30") as e:
        ds.token_length(0)
    assert e.value.reason == "too_long"
    ds, _ = llava(vlm, fixture_dir, max_seq_len=30, truncation="truncate")  # cut at 30: inside run 2
    with pytest.raises(Dropped) as e:
        ds[0]
    assert e.value.reason == "cut_inside_placeholders" and "(id 'long')" in str(e.value)
    ds, _ = llava(vlm, fixture_dir, max_seq_len=60, truncation="truncate")  # both runs fit, the answer does not
    with pytest.raises(InputError, match=r"sample 0 \(id 'long'\): no trainable tokens left after truncating"):
        ds[0]
    long_sample_file(fixture_dir, human("<image> Q?"), gpt("Red" + "." * 60), human("<image> And?"), gpt("Blue."))
    ds, tok = llava(vlm, fixture_dir, max_seq_len=100, truncation="truncate")
    s = ds[0]  # the second image's run lies past the cut: it and its image are gone
    assert len(s["input_ids"]) == 100 and s["num_items"] == {"images": 1} and ds.encoded(0).truncated
    assert int((s["input_ids"] == 1000).sum()) == 16 and tok.decode(s["labels"][s["labels"] >= 0]).startswith("Red.")
    check_batch(vlm, collate([ds[0], ds[1]], tok.pad_id))


def test_a_training_set_of_only_unusable_samples_stops_with_a_data_error(vlm, fixture_dir):
    from mimo_spec.data.loader import TrainBatches
    from mimo_spec.train.bad_samples import SkipLog

    long_sample_file(fixture_dir, human("<image>\n<image>" + " word" * 30), gpt("An answer."))
    write_json(fixture_dir, json.loads((fixture_dir / "data.json").read_text())[:1])
    ds, tok = llava(vlm, fixture_dir, max_seq_len=60)
    with pytest.raises(InputError, match=r"samples in a row could not be used; the last: too long"):
        TrainBatches(ds, tok.pad_id, seed=0, batch_size=2, seq_len=60).next()  # packed: planning finds it
    log = SkipLog(None, True, None, 0.01, len(ds))
    with pytest.raises(InputError, match=r"data: none of the 2 samples read could be used"):
        log.update([TrainBatches(ds, tok.pad_id, seed=0, batch_size=2).next()])  # unpacked: loading finds it


# ------------------------------------------------------------------------------ bad input
def test_bad_input_is_named_with_file_sample_and_path(vlm, fixture_dir):
    with pytest.raises(InputError, match=r"data.path: data file not found: .*nope.json"):
        build_dataset({"source": "llava_json", "path": str(fixture_dir / "nope.json")}, vlm, ByteTokenizer())
    (fixture_dir / "data.json").write_text('[\n  {"conversations": []},\n  {"id": 2,, }\n]')
    with pytest.raises(InputError, match=r"data.json: not valid JSON at line 3, column 12: Expecting property name"):
        llava(vlm, fixture_dir)
    (fixture_dir / "data.jsonl").write_text('{"conversations": []}\n{"id": \n')
    ds, _ = llava(vlm, fixture_dir, path=str(fixture_dir / "data.jsonl"))  # JSON Lines are read line by line
    with pytest.raises(InputError, match=r"data.jsonl: not valid JSON at line 2"):
        ds[1]
    with pytest.raises(InputError, match=r"data.jsonl: line 1: missing or empty 'conversations'"):
        ds[0]  # each bad line is its own sample's problem: the loader skips it (data.on_bad_sample)
    write_json(fixture_dir, [
        {"id": "ok", "image": "red.png", "conversations": [human("<image>"), gpt("Red.")]},
        {"id": "gone", "image": "missing.png", "conversations": [human("<image>"), gpt("?")]},
        {"id": "tags", "image": "red.png", "conversations": [human("<image><image>"), gpt("?")]},
        {"id": "mute", "conversations": [human("Hi"), gpt("  ")]},
        {"id": "role", "conversations": [{"from": "bot", "value": "x"}]},
    ])
    ds, _ = llava(vlm, fixture_dir)
    problems = {}
    for i in range(len(ds)):
        try:
            ds[i]
        except InputError as e:
            problems[i] = str(e)
    assert sorted(problems) == [1, 2, 3, 4]
    assert "sample 1 (id 'gone'): " in problems[1] and "missing.png" in problems[1]
    assert "sample 2 (id 'tags'): 2 <image> tag(s) in the text but 1 image file(s)" in problems[2]
    assert "sample 3 (id 'mute'): no assistant answer" in problems[3]
    assert "sample 4 (id 'role'): conversations[0] must be" in problems[4]
    (fixture_dir / "img" / "broken.png").write_bytes(b"\x89PNG not really")
    write_json(fixture_dir, [{"id": "x", "image": "broken.png", "conversations": [human("<image>"), gpt("?")]}])
    ds, _ = llava(vlm, fixture_dir)
    with pytest.raises(InputError, match=r"data.json: sample 0 \(id 'x'\): cannot read image .*broken.png"):
        ds[0]
    write_json(fixture_dir, [{"id": "y", "audio": "tone.wav", "conversations": [human("<audio>"), gpt("?")]}])
    with pytest.raises(ConfigError, match=r"sample 0 \(id 'y'\): the sample has audio input but the model has no "
                                         r"audio modality \(add one, e.g. modality=\[audio_whisper\]"):
        llava(vlm, fixture_dir)[0][0]


# ------------------------------------------------------------------------------- the loader
def _same(a, b) -> bool:
    """Two (nested) batches hold equal tensors and values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_the_sample_order_is_the_seeded_epoch_permutation():
    from mimo_spec.data.loader import PlanSampler, SampleOrder
    from mimo_spec.data.packing import LoaderState, Planner

    # the reference: epoch e is randperm(n) seeded by (seed * 1_000_003 + e) % 2**64, epochs back to back
    n, seed = 10, 7
    ref = [int(i) for e in range(3) for i in
           torch.randperm(n, generator=torch.Generator().manual_seed((seed * 1_000_003 + e) % 2**64))]
    order = SampleOrder(n, seed)
    assert [order[p] for p in range(3 * n)] == ref
    # batches of 4 from position 6 straddle the epochs; rank r of 2 loads samples [2r, 2r + 2) of each
    planner = Planner(None, order, 4, 0, packing=False)  # one sample per row: no lengths needed
    for share in ((0, 2), (2, 4), None):
        it = iter(PlanSampler(planner, share, LoaderState(6)))
        lo, hi = share or (0, 4)
        got = [[index for row, _, index in next(it)[1:]] for _ in range(5)]
        assert got == [ref[6 + 4 * b + lo: 6 + 4 * b + hi] for b in range(5)]
    with pytest.raises(ValueError):
        PlanSampler(planner, (3, 3))


def test_each_rank_loads_its_share_and_workers_change_nothing(vlm):
    from mimo_spec.data.batch import pad_batch
    from mimo_spec.data.loader import TrainBatches, step_tokens

    ds, tok = synth(vlm)
    pad = tok.pad_id
    whole = TrainBatches(ds, pad, seed=3, batch_size=8, state=250)  # crosses the epoch end at 256
    ranks = [TrainBatches(ds, pad, seed=3, batch_size=8, state=250, share=(4 * r, 4 * r + 4)) for r in (0, 1)]
    workers = TrainBatches(ds, pad, seed=3, batch_size=8, state=250, num_workers=2)
    for _ in range(3):
        g = whole.next()
        assert _same(workers.next(), g)  # built and collated in 2 worker processes: the same batch
        shares = [r.next() for r in ranks]
        for r, share in enumerate(shares):
            lo, hi = 4 * r, 4 * r + 4
            assert share["share"] == (lo, hi)
            # the share, padded to the global batch's length, is the global batch's rows [lo, hi)
            padded = pad_batch(share, g["input_ids"].shape[1], tok.pad_id)
            for k in ("input_ids", "labels", "attention_mask"):
                assert torch.equal(padded[k], g[k][lo:hi]), k
            for m, counts in g["items_per_sample"].items():
                assert share["items_per_sample"][m] == counts[lo:hi]
                if sum(counts[lo:hi]):
                    start, stop = sum(counts[:lo]), sum(counts[:hi])
                    px = g["modality_inputs"][m]["clip"]["pixel_values"][start:stop]
                    assert torch.equal(share["modality_inputs"][m]["clip"]["pixel_values"], px)
        assert sum(s["num_tokens"] for s in shares) == g["num_tokens"]
        assert step_tokens([g], None, tok.pad_id)[1:] == (g["num_tokens"], int(g["attention_mask"].sum()))
    assert whole.position == workers.position == ranks[0].position == 250 + 3 * 8  # global samples
    # rewinding (a step cut short) replays the same batches, workers restarted at the position
    workers.rewind(250 + 8)
    whole.rewind(250 + 8)
    assert _same(workers.next(), whole.next())
    workers.close()


def test_packed_shares_workers_and_resume_state(vlm):
    """Packed batches: every rank plans the same global batch and loads its rows; workers change nothing;
    the loader state (position + deferred samples) resumes the same sequence of batches."""
    from mimo_spec.data.loader import SampleOrder, TrainBatches

    ds, tok = synth(vlm)
    pad, seq = tok.pad_id, 160
    kw = dict(seed=3, batch_size=4, seq_len=seq)
    whole = TrainBatches(ds, pad, **kw, state=240)
    ranks = [TrainBatches(ds, pad, **kw, state=240, share=(2 * r, 2 * r + 2)) for r in (0, 1)]
    workers = TrainBatches(ds, pad, **kw, state=240, num_workers=2)
    order, used, states = SampleOrder(len(ds), 3), [], []
    for _ in range(4):
        states.append(whole.state)
        g = whole.next()
        assert _same(workers.next(), g)
        assert g["input_ids"].shape == (4, seq) and g["document_ids"].shape == (4, seq)
        shares = [r.next() for r in ranks]
        for r, share in enumerate(shares):
            lo, hi = 2 * r, 2 * r + 2
            for k in ("input_ids", "labels", "attention_mask", "document_ids"):
                assert torch.equal(share[k], g[k][lo:hi]), k
        # an independent check of the packing: each row holds whole samples back to back, in document order
        for row in range(4):
            docs = g["document_ids"][row]
            real = g["attention_mask"][row].bool()
            for d in docs[real].unique().tolist():
                span = (docs == d) & real
                ids = g["input_ids"][row][span]
                match = [p for p in range(240, 240 + 64) if p not in used and torch.equal(ds[order[p]]["input_ids"], ids)]
                assert match, (row, d)
                used.append(match[0])
            # the padding tail is one more document
            assert (docs[~real] == len(docs[real].unique())).all()
        counted = ((g["labels"][:, 1:] != -100) & (g["document_ids"][:, 1:] == g["document_ids"][:, :-1])).sum()
        assert g["num_tokens"] == int(counted)
    assert len(set(used)) == len(used)  # no sample twice
    # positions 240.. were used in order except those deferred: nothing skipped before the last position
    assert set(range(240, whole.state.position)) - set(used) <= set(whole.state.deferred)
    # resuming from a saved state replays the same batches
    again = TrainBatches(ds, pad, **kw, state=states[2].to_dict())
    whole.rewind(states[2])
    assert _same(again.next(), whole.next())
    workers.close()


def test_training_with_workers_matches_and_resumes_exactly(tmp_path):
    from mimo_spec.train.loop import train
    from mimo_spec.train.metrics import read_metrics

    small = ["data.num_samples=64", "data.eval_samples=0", "train.log_every=1000", "train.eval_every=0",
             "train.batch_size=4", "train.steps=3", "train.checkpoint.every=0"]

    def losses(run):
        return [float(r["loss"]) for r in read_metrics(run / "metrics.csv")]

    train(compose_config(small), tmp_path / "inline")
    train(compose_config([*small, "data.num_workers=2"]), tmp_path / "workers")
    assert losses(tmp_path / "workers") == losses(tmp_path / "inline")  # bit for bit
    # stopped after 1 step, resumed with workers (they start at the saved position): the same run
    first = train(compose_config([*small, "train.stop_after_steps=1"]), tmp_path / "split")
    assert first["status"] == "interrupted"
    train(compose_config([*small, "data.num_workers=2"]), tmp_path / "split")
    assert losses(tmp_path / "split") == losses(tmp_path / "inline")


def test_bad_media_found_in_a_worker_is_the_same_data_error(av_model, fixture_dir):
    from mimo_spec.data.loader import TrainBatches
    from mimo_spec.errors import DataError

    (fixture_dir / "img" / "blue.png").write_bytes(b"not a png at all")  # found only when decoded
    ds, tok = llava(av_model, fixture_dir)
    messages = []
    for workers in (0, 2):
        batches = TrainBatches(ds, tok.pad_id, seed=0, batch_size=len(ds), num_workers=workers, on_bad_sample="error")
        with pytest.raises(DataError) as e:
            batches.next()
        messages.append(str(e.value))
        assert batches.position == 0  # nothing consumed
    assert messages[0] == messages[1] and "blue.png" in messages[0] and "Traceback" not in messages[1], messages


def test_training_skips_and_logs_bad_samples_and_reports_padding(fixture_dir, capsys):
    """A training run on real files with an unreadable image and a missing one: both skipped, logged once each to
    bad_samples.jsonl with id, file and reason, counted in the progress line and metrics.json (with the padding)."""
    from mimo_spec.train.loop import train

    (fixture_dir / "img" / "cut.png").write_bytes((fixture_dir / "img" / "red.png").read_bytes()[:60])
    records = json.loads((fixture_dir / "data.json").read_text())
    records += [{"id": "cut", "image": "cut.png", "conversations": [human("<image>"), gpt("?")]},
                {"id": "gone", "image": "gone.png", "conversations": [human("<image>"), gpt("?")]}]
    (fixture_dir / "data.json").write_text(json.dumps(records))
    overrides = ["modality=[vision_clip,audio_whisper]", "data=llava_json", f"data.path={fixture_dir / 'data.json'}",
                 f"data.image_folder={fixture_dir / 'img'}", f"data.audio_folder={fixture_dir / 'wav'}",
                 "data.eval_fraction=0", "data.max_bad_fraction=0.5", "data.max_seq_len=200", "train.batch_size=2",
                 "train.steps=4", "train.log_every=1", "train.eval_every=0", "train.checkpoint.every=0"]
    result = train(compose_config(overrides), fixture_dir / "run")
    logged = [json.loads(line) for line in (fixture_dir / "run" / "bad_samples.jsonl").read_text().splitlines()]
    # 4 steps of 2 packed rows go through the 7 samples several times: each read of a bad one is logged once
    assert {e["id"] for e in logged} == {"cut", "gone"} and len({e["position"] for e in logged}) == len(logged)
    assert all(e["kind"] == "bad" and e["file"].endswith("data.json") for e in logged)
    assert "gone.png" in next(e["reason"] for e in logged if e["id"] == "gone")
    assert "truncated" in next(e["reason"] for e in logged if e["id"] == "cut")
    metrics = json.loads((fixture_dir / "run" / "metrics.json").read_text())
    assert metrics["bad_samples"] == result["bad_samples"] == len(logged) and metrics["samples_read"] >= 7
    # packed rows of 200 tokens: the padding of what was trained, as the rows' attention masks say
    assert 0.0 < metrics["padding_fraction"] < 1.0 and metrics["packing"] is True
    out = capsys.readouterr().out
    assert f"skipped {len(logged)}" in out and "pad " in out, out


def test_user_mistakes_in_data_are_named(fixture_dir, tmp_path, vlm):
    """What a user gets wrong is said where it is: llava_json lays chats out with the tokenizer's own template
    (as every source does, data.template unset); a template that is not Jinja is a config error naming
    data.tokenizer before any sample is read; a record that cannot be parsed, or whose media field is wrong, is
    logged with its file, line and id; a sample needing a modality the model lacks is a config error even under
    on_bad_sample=skip; a short unpacked run on data of which nothing is usable is a data error, not a run that
    trained on fillers; a sweep's table shows the reason of every kind of error, not its header."""
    from test_templates import CHATML, CHATML_SPECIALS, save_bpe

    from mimo_spec.data.config import validate_data_config
    from mimo_spec.data.sources import open_source
    from mimo_spec.data.tokenizer import HFTokenizer, resolve_template
    from mimo_spec.errors import DataError
    from mimo_spec.sweep import _first_line
    from mimo_spec.train.loop import train

    save_bpe(tmp_path / "chatml", CHATML_SPECIALS, CHATML)
    for source in ("llava_json", "parquet", "webdataset"):
        data = validate_data_config(compose_config([f"data={source}", "data.path=x"]).data)
        assert resolve_template(data.template, HFTokenizer(tmp_path / "chatml")) == CHATML, source
    save_bpe(tmp_path / "broken", CHATML_SPECIALS, "{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ConfigError) as e:
        llava(vlm, fixture_dir, tokenizer=str(tmp_path / "broken"))
    assert e.value.problems[0].path.startswith("data.tokenizer") and "not valid Jinja" in str(e.value), str(e.value)

    lines = [json.dumps({"id": "ok", "conversations": [human("Hi"), gpt("Hello.")]}), '{"id": "cut", "conv',
             json.dumps({"id": "num", "image": 5, "conversations": [human("<image>"), gpt("?")]})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    src = open_source(validate_data_config({"source": "llava_json", "path": str(tmp_path / "d.jsonl"),
                                            "eval_fraction": 0.0}), "train")
    infos = []
    for k in (1, 2):
        with pytest.raises(DataError) as e:
            src.record(k)
        infos.append(e.value.record_info)
    assert infos[0] == {"where": "d.jsonl: line 2", "file": str(tmp_path / "d.jsonl"), "id": None}
    assert infos[1] == {"where": "d.jsonl: line 3 (id 'num')", "file": str(tmp_path / "d.jsonl"), "id": "num"}

    base = ["data=llava_json", f"data.path={fixture_dir / 'data.json'}", f"data.image_folder={fixture_dir / 'img'}",
            f"data.audio_folder={fixture_dir / 'wav'}", "data.eval_fraction=0", "train.eval_every=0",
            "train.checkpoint.every=0", "train.log_every=1000"]
    with pytest.raises(ConfigError, match="audio input but the model has no audio modality"):  # vision only
        train(compose_config([*base, "data.max_bad_fraction=0.9", "train.steps=4"]), tmp_path / "no_audio")
    bad = [{"id": f"b{k}", "image": "gone.png", "conversations": [human("<image>"), gpt("?")]} for k in range(40)]
    (fixture_dir / "bad.json").write_text(json.dumps(bad))
    for packing in ("true", "false"):
        with pytest.raises(DataError, match="none of the .* samples read could be used"):
            train(compose_config([*base, f"data.path={fixture_dir / 'bad.json'}", f"data.packing={packing}",
                                  "train.batch_size=2", "train.steps=3"]), tmp_path / f"bad_{packing}")

    for kind in ("data", "checkpoint", "config"):
        assert _first_line(f"mimo-spec: {kind} error:\n  data.path: it is gone\n      hint: x") == \
            "data.path: it is gone"
    assert _first_line("mimo-spec: config errors:\n  a: one\n  b: two") == "a: one"
    assert _first_line("RuntimeError: boom") == "RuntimeError: boom"


def test_an_empty_training_file_is_named(tmp_path, vlm):
    from mimo_spec.data.loader import TrainBatches
    from mimo_spec.errors import DataError

    (tmp_path / "data.json").write_text("[]")
    (tmp_path / "img").mkdir(), (tmp_path / "wav").mkdir()
    ds, tok = llava(vlm, tmp_path)
    with pytest.raises(DataError) as e:
        TrainBatches(ds, tok.pad_id, seed=0, batch_size=2)
    assert e.value.problems[0].path == "data.path" and str(tmp_path / "data.json") in str(e.value), str(e.value)
    assert "num_samples" not in str(e.value)  # a synthetic-data key: not this source's
    for key in ("image_folder", "audio_folder"):  # a folder that is not there: one config error, not bad samples
        with pytest.raises(ConfigError) as e:
            llava(vlm, tmp_path, **{key: str(tmp_path / "nowhere")})
        assert e.value.problems[0].path == f"data.{key}" and str(tmp_path / "nowhere") in str(e.value)
