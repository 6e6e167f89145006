"""More bad inputs, from the Python API and data files: each one an InputError / DataError naming the
argument or file and saying what is wrong, never a raw IndexError / RuntimeError / TypeError /
RecursionError, and never a message that prints a whole tensor."""

import io
import json
import wave

import pytest
import torch

from mimo_spec import build_model
from mimo_spec.errors import DataError, InputError

from conftest import tiny_config

IMG = 250  # tiny_config's image placeholder: vocab 256, 4 placeholders per 16x16 image


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(), seed=0).eval()


@pytest.fixture(scope="module")
def batch(model):
    return model.example_inputs(2)


def _raises(fn, cls, path, *messages):
    """fn() raises ``cls`` whose text starts with ``path:`` and holds every message; no tensor printout."""
    with pytest.raises(cls) as e:
        fn()
    text = str(e.value)
    assert text.startswith(path + ":"), text
    for m in messages:
        assert m in text, (m, text)
    assert "tensor(" not in text and len(text) < 600, text
    return text


# ------------------------------------------------------------------------------ deeply nested JSON
def test_deeply_nested_json_is_a_data_error_naming_the_file_and_the_limit(tmp_path):
    import sys

    from mimo_spec.data.config import validate_data_config
    from mimo_spec.data.sources import open_source

    def read_records(path):  # every record of the file, through the llava_json source (indexing, then reading)
        source = open_source(validate_data_config({"source": "llava_json", "path": str(path), "eval_fraction": 0,
                                                   "index_dir": str(tmp_path / "index")}), "train")
        return [source.record(i) for i in range(len(source))]

    limit = f"about {sys.getrecursionlimit()} levels"
    deep = "[" * 5000 + "]" * 5000
    files = {
        "open.json": "[" * 100_000,  # unclosed too: the depth is what fails first
        "conv.json": '[{"id": "a",\n "conversations": ' + deep + "}]",
        "conv.jsonl": '{"id": 1, "conversations": []}\n\n{"id": 2, "conversations": ' + deep + "}\n",
        "keys.json": '{"a": ' * 3000 + "1" + "}" * 3000,
    }
    # a JSON list file is indexed element by element: the line where the too-deep sample starts
    lines = {"open.json": "line 1", "conv.json": "line 1", "conv.jsonl": "line 3"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        if name == "keys.json":  # one huge object, not a list of samples: refused before its depth matters
            _raises(lambda: read_records(tmp_path / name), DataError, "data.path", str(tmp_path / name),
                    "expected a JSON list of samples, got an object")
            continue
        _raises(lambda: read_records(tmp_path / name), DataError, "data.path", str(tmp_path / name),
                "nested too deeply", lines[name], limit)
    # an integer longer than Python converts is a ValueError inside json: a DataError too, with the line
    for name, text, where in (("big.json", '[{"id": ' + "1" * 5000 + "}]", "cannot read the JSON: "),
                              ("big.jsonl", '{"id": 1}\n{"id": ' + "1" * 5000 + "}\n", "at line 2: ")):
        (tmp_path / name).write_text(text)
        _raises(lambda: read_records(tmp_path / name), DataError, "data.path", str(tmp_path / name), where,
                "4300 digits")
    # brackets inside strings are text, not nesting: a sample with many of them still reads
    ok = tmp_path / "brackets.json"
    ok.write_text(json.dumps([{"id": "[" * 5000, "conversations": [{"from": "gpt", "value": "{" * 5000}]}]))
    assert read_records(ok)[0].id == "[" * 5000
    # JSON Lines split at newlines only: U+2028 inside a string is part of the line
    sep = tmp_path / "sep.jsonl"
    sep.write_text('{"id": "a\u2028b", "conversations": []}\n', encoding="utf-8")
    assert read_records(sep)[0].id == "a\u2028b"


def test_deeply_nested_json_from_the_cli(tmp_path):
    """The whole path: data=llava_json with a too-deep file exits 2 with a data error, no traceback; a
    sample nested just under the reader's limit is refused by the sample checks, with a bounded message."""
    from test_bad_inputs import run_cli_in_process

    (tmp_path / "deep.json").write_text("[" * 100_000)
    code, out, err = run_cli_in_process(["data=llava_json", f"data.path={tmp_path}/deep.json", "train.steps=1",
                                         "data.eval_fraction=0"], tmp_path)
    assert code == 2 and "Traceback" not in err and err.startswith("mimo-spec: data error"), err
    assert "data.path" in err and "deep.json" in err and "nested too deeply" in err and "hint:" in err, err

    nested = "[" * 600 + "]" * 600
    (tmp_path / "nested.json").write_text(
        '[{"id": ' + nested + ', "conversations": [{"from": ' + nested + ', "value": "x"}]}]')
    code, out, err = run_cli_in_process(["data=llava_json", f"data.path={tmp_path}/nested.json", "train.steps=1",
                                         "data.eval_fraction=0"], tmp_path)
    assert code == 2 and "Traceback" not in err and err.startswith("mimo-spec: data error"), err
    assert "nested.json: sample 0" in err and "conversations[0] must be" in err and "hint:" in err, err
    assert len(err) < 1000, err  # the nested values are shown shortened, not printed whole

    # a lone surrogate escape is valid JSON but not text: the sample is named, no UnicodeEncodeError
    turns = '[{"from": "human", "value": "hi \\ud800 there"}, {"from": "gpt", "value": "yo"}]'
    (tmp_path / "surrogate.json").write_text(f'[{{"id": "s", "conversations": {turns}}}]')
    code, out, err = run_cli_in_process(["data=llava_json", f"data.path={tmp_path}/surrogate.json", "train.steps=1",
                                         "data.eval_fraction=0"], tmp_path)
    assert code == 2 and "Traceback" not in err and err.startswith("mimo-spec: data error"), err
    assert "surrogate.json: sample 0 (id 's')" in err and "\\ud800" in err and "not valid Unicode" in err, err


# ------------------------------------------------------------------------------------- generate
def test_generate_refuses_bad_prompts_and_seeds(model, batch):
    from mimo_spec.generation import generate

    ids = torch.tensor([[1, 2, 3]])
    px = batch["modality_inputs"]["images"]["clip"]["pixel_values"]
    one_image = {"images": {"clip": {"pixel_values": px[:1]}}}
    cases = [
        (dict(input_ids=torch.full((1, 3), 10**6)), "input_ids", "token id 1000000 is outside the vocabulary"),
        (dict(input_ids=torch.full((1, 3), -2)), "input_ids", "token id -2 is outside the vocabulary"),
        (dict(input_ids=torch.ones(2, 3, dtype=torch.long)), "input_ids", "shape (1, S)", "got (2, 3)"),
        (dict(input_ids=torch.ones(1, 0, dtype=torch.long)), "input_ids", "S >= 1", "got (1, 0)"),
        (dict(input_ids=torch.ones(3, dtype=torch.long)), "input_ids", "(batch, seq)"),
        (dict(input_ids=ids.float()), "input_ids", "integer token ids"),
        (dict(input_ids=[[1, 2]]), "input_ids", "as a tensor, got list"),
        (dict(seed=2**70), "seed", "[0, 2**63)"),
        (dict(seed=-1), "seed", "got -1"),
        (dict(seed=True), "seed", "got True"),
        (dict(seed=1.5), "seed", "got 1.5"),
        (dict(input_ids=torch.tensor([[1, IMG, IMG, 2]]), modality_inputs=one_image), "modality_inputs.images",
         "input_ids hold 2 placeholder tokens (id 250) but 4 embeddings are given"),
        (dict(input_ids=torch.tensor([[1, IMG, IMG, IMG, IMG, 2]])), "modality_inputs.images",
         "input_ids hold 4 placeholder tokens (id 250) but 0 embeddings are given"),
        (dict(modality_inputs={"audio": {}}), "modality_inputs.audio", "unknown input modality 'audio'"),
        (dict(modality_inputs={"images": px[:1]}), "modality_inputs.images", "expected a mapping"),
        (dict(input_ids=torch.ones(1, 129, dtype=torch.long)), "input_ids", "exceeds the language model's max_seq_len"),
        (dict(eos_id=2.0), "eos_id", "got float"),
        (dict(temperature=torch.ones(50)), "temperature", "got a tensor of shape (50,)"),
        (dict(top_p=True), "top_p", "got True"),
        (dict(strategy="x" * 500), "strategy", "unknown strategy 'xxx", "..."),
    ]
    for changes, path, *messages in cases:
        kwargs = dict(input_ids=ids, modality_inputs=None, max_new_tokens=2, seed=0)
        kwargs.update(changes)
        _raises(lambda: generate(model, kwargs.pop("input_ids"), kwargs.pop("modality_inputs"), **kwargs),
                InputError, path, *messages)
    # the edges that are fine: the largest seed, an image with its 4 placeholders, sampling
    out = generate(model, torch.tensor([[1, IMG, IMG, IMG, IMG, 2]]), one_image, max_new_tokens=3,
                   strategy="sample", seed=2**63 - 1)
    assert len(out.tokens) == 3 and all(0 <= t < 256 for t in out.tokens)
    # learned positions end at max_seq_len: refused before generating, naming max_new_tokens and the room left
    cfg = tiny_config()
    cfg["model"]["params"].update(position_embedding="learned", max_seq_len=16)
    learned = build_model(cfg, seed=0).eval()
    _raises(lambda: generate(learned, torch.ones(1, 10, dtype=torch.long), max_new_tokens=7), InputError,
            "max_new_tokens", "a 10-token prompt plus 7 new tokens exceeds the language model's max_seq_len 16",
            "at most 6 new tokens")
    assert len(generate(learned, torch.ones(1, 10, dtype=torch.long), max_new_tokens=6).tokens) == 6


# --------------------------------------------------------------------- model(...) / prepare_inputs
def test_malformed_modality_inputs_and_targets_name_keys_not_tensors(model, batch):
    ids, labels = batch["input_ids"], batch["labels"]
    px = batch["modality_inputs"]["images"]["clip"]["pixel_values"]
    cases = [
        (dict(modality_inputs={"images": {"clip": px}}), "modality_inputs.images.clip",
         "expected a mapping of keyword name to tensor", "got Tensor"),
        (dict(modality_inputs={"images": {"clip": {}}}), "modality_inputs.images.clip", "got an empty mapping"),
        (dict(modality_inputs={"images": {"clip": {px[0, 0, 0, 0]: px}}}), "modality_inputs.images.clip.<Tensor key>",
         "expected names (strings) as keys, got a Tensor"),
        (dict(modality_inputs={"images": {"clip": {"pixel_values": px.to("meta")}}}),
         "modality_inputs.images.clip.pixel_values", "is on meta but input_ids is on cpu"),
        (dict(modality_inputs={"images": {"clip": {"pixel_values": px[0, 0, 0, 0]}}}),
         "modality_inputs.images.clip.pixel_values", "expected shape (N, 3, 16, 16)"),
        (dict(modality_inputs={3: {}}), "modality_inputs.<int key>", "expected names (strings) as keys"),
        (dict(modality_inputs=px), "modality_inputs", "expected a mapping", "got Tensor"),
        (dict(modality_inputs=px, modality_embeddings={"images": torch.zeros(8, 32)}), "modality_inputs",
         "expected a mapping", "got Tensor"),
        (dict(output_targets=[1]), "output_targets", "expected a mapping", "got list"),
        (dict(output_targets=px), "output_targets", "got Tensor"),
        (dict(output_targets={"images": px}), "output_targets.images", "unknown output modality"),
        (dict(modality_inputs={}, modality_embeddings={("images",): torch.zeros(8, 32)}),
         "modality_embeddings.<tuple key>", "expected names (strings) as keys"),
    ]
    for changes, path, *messages in cases:
        kwargs = dict(modality_inputs=batch["modality_inputs"], labels=labels)
        kwargs.update(changes)
        _raises(lambda: model(ids, **kwargs), InputError, path, *messages)
        if "output_targets" not in changes and "modality_embeddings" not in changes:
            _raises(lambda: model.prepare_inputs(ids, kwargs["modality_inputs"]), InputError, path, *messages)


def test_items_per_sample_is_checked(model, batch):
    ids, inputs = batch["input_ids"], batch["modality_inputs"]
    model.prepare_inputs(ids, inputs, {"images": [1, 1]})  # the good counts pass, as a list
    model.prepare_inputs(ids, inputs, {"images": torch.tensor([1, 1])})  # or as a tensor
    no_image = ids.masked_fill(ids == IMG, 3)
    model.prepare_inputs(no_image, {}, {"images": [0, 0]})  # zero counts for an absent modality
    cases = [
        ({"images": "12"}, "items_per_sample.images", "expected a list of item counts", "got str"),
        ({"images": [1, -1]}, "items_per_sample.images", "one integer >= 0 per sample"),
        ({"images": [True, True]}, "items_per_sample.images", "one integer >= 0 per sample"),
        ({"images": [1.0, 1.0]}, "items_per_sample.images", "one integer >= 0 per sample"),
        ({"images": [2]}, "items_per_sample.images", "for 1 samples but the batch has 2"),
        ({"images": [2, 0]}, "modality_inputs.images", "sample 0 has 4 placeholder tokens", "produce 8 embeddings"),
        ({"images": [1, 2]}, "items_per_sample.images", "sums to 3 but 2 items are given"),
        ({"video": [1, 1]}, "items_per_sample.video", "unknown input modality 'video'"),
        ([1, 1], "items_per_sample", "expected a mapping", "got list"),
    ]
    for items, path, *messages in cases:
        _raises(lambda: model.prepare_inputs(ids, inputs, items), InputError, path, *messages)
    _raises(lambda: model.prepare_inputs(no_image, {}, {"images": [1, 0]}), InputError, "items_per_sample.images",
            "sums to 1 but no images items are given")


# ------------------------------------------------------------------------------------- WAV files
def _wav(frames: int, width: int = 2, channels: int = 1, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(b"\x10\x00" * frames * channels * (width // 2) + b"\x10" * frames * channels * (width % 2))
    return buf.getvalue()


def test_damaged_wav_files_say_what_is_wrong(tmp_path):
    from mimo_spec.data.preprocess import read_wav

    good = _wav(1600)
    cases = {
        "empty": (b"", "the file is empty"),
        "riff_only": (b"RIFF", "the file ends early (4 bytes)"),
        "header_cut": (good[:30], "the file ends early (30 bytes)"),
        "no_data": (good[:44], "holds no audio frames (the header declares some, but the file ends before them)"),
        "cut_in_first_frame": (good[:45], "holds no audio frames"),
        "zero_frames": (_wav(0), "holds no audio frames"),
        "avi": (b"RIFF\x00\x00\x00\x00AVI LIST" + bytes(40), "not a RIFF WAVE file"),
        "mp3": (b"ID3\x03" + bytes(100), "not a RIFF WAVE file"),
        "text": (b"just some text, not audio", "not a RIFF WAVE file"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / f"{name}.wav"
        path.write_bytes(data)
        text = _raises(lambda: read_wav(path, where=f"sample {name}"), DataError, f"sample {name}",
                       f"cannot read WAV file {path}: ", reason)
        assert f"{path}: (" not in text and not text.split("\n")[0].rstrip().endswith(":"), text
    # a file cut inside a frame keeps its whole frames; stereo 16-bit cut after 2.5 frames -> 2 samples
    stereo = _wav(100, channels=2)
    (tmp_path / "cut.wav").write_bytes(stereo[: 44 + 10])
    x, rate = read_wav(tmp_path / "cut.wav")
    assert x.shape == (2,) and rate == 16000


def test_output_targets_are_checked():
    cfg = tiny_config()
    cfg["modalities"]["image_out"] = {"module": "modality", "params": {"generation_token_id": 251,
                                                                       "code_token_offset": 200},
                                      "submodules": {"tokenizer": {"module": "patch_palette", "params": {
                                          "image_size": 8, "patch_size": 4}}}}
    model = build_model(cfg, seed=0)
    batch = model.example_inputs(2)
    target = batch["output_targets"]["image_out"]
    assert model(**batch).loss is not None  # the good batch runs
    cases = [
        (target[:, :, :4], "output_targets.image_out", "expected images (N, 3, 8, 8)", "got (2, 3, 4, 8)"),
        (target[:, 0], "output_targets.image_out", "expected images (N, 3, 8, 8)"),
        (target[0, 0, 0, 0], "output_targets.image_out", "of shape ()"),
        (target.to("meta"), "output_targets.image_out", "is on meta but input_ids is on cpu"),
        (target[:1], "output_targets.image_out", "input_ids hold 8 generation tokens (id 251) but 4 target tokens",
         "4 generation tokens per target item"),
    ]
    for bad, path, *messages in cases:
        _raises(lambda: model(**{**batch, "output_targets": {"image_out": bad}}), InputError, path, *messages)


def test_damaged_images_say_what_is_wrong(tmp_path):
    from PIL import Image

    from mimo_spec.data.preprocess import load_image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buf, "PNG")
    png = buf.getvalue()
    for name, data, reason in (("empty.png", b"", "the file is empty"),
                               ("half.png", png[: len(png) // 2], "truncated"),
                               ("text.png", b"not an image at all", "cannot identify image file")):
        (tmp_path / name).write_bytes(data)
        _raises(lambda: load_image(tmp_path / name, "sample 0"), DataError, "sample 0",
                f"cannot read image {tmp_path / name}: ", reason)


def test_negative_loss_mask_meta_weights_and_an_empty_moe_batch(tmp_path):
    """A negative loss weight would turn the loss's sign; a model whose weights are (partly) still on the meta
    device computes with uninitialised memory (F.linear of a CPU and a meta tensor returns garbage): both are
    InputErrors naming the argument. An MoE LM takes an empty batch as the dense one does (loss 0), where its
    combine step raised a reshape error."""
    from mimo_spec.config import compose_config
    from mimo_spec.weights import load_weights

    model = build_model(tiny_config(), seed=0)
    ids = torch.randint(0, 200, (2, 12))
    mask = torch.ones(2, 12)
    mask[1, 3] = -1.0
    _raises(lambda: model(ids, labels=ids, loss_mask=mask), InputError, "loss_mask", "negative weight (min -1)")
    assert torch.isfinite(model(ids, labels=ids, loss_mask=mask.clamp(min=0)).loss)

    meta = build_model(tiny_config(), device="meta")
    _raises(lambda: meta(ids, labels=ids), InputError, "model", "weights are on the meta device")
    # a partial file loaded with strict=False leaves the missing weight on meta: named when the model runs
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "language_model.lm_head.weight"}
    save_file(state, str(tmp_path / "part.safetensors"))
    load_weights(meta, tmp_path / "part.safetensors", strict=False)
    _raises(lambda: meta(ids, labels=ids), InputError, "model", "meta device", "language_model.lm_head.weight")

    moe = build_model(compose_config(["+model.params.num_experts=4", "+model.params.num_experts_per_tok=2"]), seed=0)
    for empty in (torch.zeros(0, 5, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long)):
        out = moe(empty, labels=empty)
        assert float(out.loss) == 0.0
        out.loss.backward()


def test_generate_hands_the_model_back_in_its_mode():
    """generate runs in eval mode and restores the caller's mode: sampling inside a training loop must not
    leave dropout off for the steps after it (it used to return the model in eval mode)."""
    from mimo_spec.generation import generate

    model = build_model(tiny_config(), seed=0).train()
    generate(model, torch.randint(0, 200, (1, 6)), max_new_tokens=2)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    generate(model, torch.randint(0, 200, (1, 6)), max_new_tokens=2)
    assert not model.training


def test_python_api_refusals_name_the_argument():
    """Bad device names, an adapter glob given as a bare string, a wrong-shaped router_mask, integer image
    targets and NaN logits in generation: each an error naming the argument (they raised bare torch errors,
    produced one error per letter of the glob, or generated from garbage)."""
    from mimo_spec.config import compose_config
    from mimo_spec.errors import ConfigError
    from mimo_spec.generation import pick_next
    from mimo_spec.peft import add_adapters

    model = build_model(tiny_config(), seed=0)
    _raises(lambda: model.example_inputs(2, device="gpu"), InputError, "device", "not a torch device: 'gpu'")
    with pytest.raises(ConfigError) as e:
        add_adapters(build_model(tiny_config(), seed=0), "language_model.layers.*.attn.qkv")
    assert len(e.value.problems) == 1 and "got the string 'language_model.layers.*.attn.qkv'" in str(e.value)

    moe = build_model(compose_config(["+model.params.num_experts=4", "+model.params.num_experts_per_tok=2"]), seed=0)
    ids = torch.randint(0, 200, (2, 12))
    _raises(lambda: moe(ids, labels=ids, router_mask=torch.ones(2, 11)), InputError, "router_mask",
            "expected shape (2, 12)")

    gen = build_model(compose_config(["modality=[vision_clip,image_gen]"]), seed=0)
    batch = gen.example_inputs(1)
    targets = batch["output_targets"]
    name = next(iter(targets))
    bad = {name: {"tokenizer": {k: (v * 255).to(torch.uint8) for k, v in targets[name]["tokenizer"].items()}}} \
        if isinstance(targets[name], dict) else {name: (targets[name] * 255).to(torch.uint8)}
    _raises(lambda: gen(**{**batch, "output_targets": bad}), InputError, f"output_targets.{name}", "floating-point items")

    logits = torch.zeros(1, 8)
    logits[0, 3] = float("nan")
    _raises(lambda: pick_next(logits, "sample"), InputError, "model", "logits are NaN")
    from mimo_spec.generation import generate

    # NaN weights: the text loop (greedy would pick the NaN's id) and an image item's codes (checked once per item)
    for where, kwargs in (("language_model.lm_head.weight", {}), ("modalities.image_out", {"output_modality": "image_out"})):
        broken = build_model(compose_config(["modality=[vision_clip,image_gen]"]), seed=0).eval()
        with torch.no_grad():
            if where.startswith("language_model"):
                broken.get_parameter(where)[5, 0] = float("nan")
            else:
                next(p for n, p in broken.named_parameters() if n.startswith(where) and p.dim() == 2).fill_(float("nan"))
        _raises(lambda: generate(broken, torch.tensor([[5, 17, 42]]), max_new_tokens=3, **kwargs), InputError,
                "model", "logits are NaN")
