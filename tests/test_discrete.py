"""Discrete modalities (#19): a tokenizer turns items into codes the LM reads and predicts.

Vocabulary mode (codes are LM tokens, Chameleon / Emu3) and head mode (an embedding and a head of the
modality's own, Janus); teacher-forced cross entropy on the codes against a loss written here; input items
embedded from their codes; the synthetic data's layout (begin, codes, end) and labels; evaluation's
per-modality loss and accuracy; the continuous decoder refusing cross_entropy at validation.
"""

import pytest
import torch
import torch.nn.functional as F

from mimo_spec import build_model
from mimo_spec.errors import ConfigError, InputError

from conftest import perturb, tiny_config

GEN, BEGIN, END, PLACE = 240, 241, 242, 243


def discrete_config(mode="vocab", image_input=False, positions=False):
    cfg = tiny_config()
    params = {"generation_token_id": GEN, "begin_token_id": BEGIN, "end_token_id": END,
              "output_loss_weight": 0.5}
    subs = {"tokenizer": {"module": "patch_palette", "params": {"image_size": 8, "patch_size": 4}}}
    if mode == "vocab":
        params["code_token_offset"] = 200  # 7 codes -> ids 200..206
    else:
        subs["code_embedding"] = {"module": "embedding", "params": {"num_embeddings": 7, "embedding_dim": 16}}
        subs["code_projection"] = {"module": "mlp", "params": {"in_features": 16, "out_features": 32}}
        subs["output_head"] = {"module": "mlp", "params": {"in_features": 32, "out_features": 7}}
    if image_input:
        params["special_token_id"] = PLACE
    if positions:
        subs["code_position_embedding"] = {"module": "embedding", "params": {"num_embeddings": 4, "embedding_dim": 32}}
    cfg["modalities"]["image_out"] = {"module": "modality", "params": params, "submodules": subs}
    return cfg


def _reference_code_loss(model, batch):
    """The code cross entropy from the LM's hidden states, written out: each code predicted from the
    position before it, by the LM head at the code ids (vocab mode) or the output head."""
    mod = model.modalities["image_out"]
    codes = mod.tokenizer.encode(batch["output_targets"]["image_out"])  # (N, 4)
    ids = batch["input_ids"]
    embeds = model.embed_inputs(ids, batch["modality_inputs"])
    gen_rows, gen_cols = (ids == GEN).nonzero(as_tuple=True)
    embeds = embeds.clone()
    embeds[gen_rows, gen_cols] = mod.embed_codes(codes.reshape(-1, 1))[:, 0]  # position 0 of its item each...
    if mod.code_position_embedding is not None:  # ... then each code's own position
        pos = torch.arange(codes.shape[1]).repeat(codes.shape[0])
        embeds[gen_rows, gen_cols] += mod.code_position_embedding.weight[pos] - mod.code_position_embedding.weight[0]
    hidden = model.language_model(embeds)
    states = hidden[gen_rows, gen_cols - 1]
    if mod.code_token_offset is not None:
        logits = model.language_model.logits(states)[:, 200:207]
    else:
        logits = mod.output_head(states)
    loss = F.cross_entropy(logits, codes.reshape(-1))
    return loss, (logits.argmax(-1) == codes.reshape(-1)).float().mean(), logits


@pytest.mark.parametrize("mode", ["vocab", "head"])
def test_code_loss_equals_a_reference_and_trains(mode):
    model = perturb(build_model(discrete_config(mode, positions=mode == "vocab"), seed=0))
    model.train()
    batch = model.example_inputs(2)
    ids = batch["input_ids"]
    # the layout: begin, 4 codes' placeholders, end; no LM label on the codes
    row = ids[0].tolist()
    start = row.index(BEGIN)
    assert row[start:start + 6] == [BEGIN, GEN, GEN, GEN, GEN, END]
    batch["labels"][ids == GEN] = -100
    out = model(**batch)
    want, acc, logits = _reference_code_loss(model, batch)
    torch.testing.assert_close(out.modality_losses["image_out"], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.modality_outputs["image_out"].reshape(-1, 7), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.modality_accuracy["image_out"], acc)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.output_codes["image_out"],
                               model.modalities["image_out"].tokenizer.encode(batch["output_targets"]["image_out"]))
    # the LM loss ignores the code positions (their labels are -100): it is the plain causal loss
    lm_logits = model.language_model.logits(model.language_model(
        model.embed_with_additions(ids, batch["modality_inputs"], None, {"image_out": out.output_codes["image_out"]})[0]))
    torch.testing.assert_close(out.lm_loss, F.cross_entropy(lm_logits[:, :-1].reshape(-1, 256),
                                                            batch["labels"][:, 1:].reshape(-1)), atol=1e-5, rtol=1e-5)
    # the tokenizer is frozen and takes no gradient; training lowers the code loss
    assert not any(p.requires_grad for p in model.modalities["image_out"].tokenizer.parameters())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(12):
        o = model(**batch)
        first = first if first is not None else float(o.modality_losses["image_out"])
        opt.zero_grad()
        o.loss.backward()
        opt.step()
    assert float(o.modality_losses["image_out"]) < 0.5 * first
    assert float(o.modality_accuracy["image_out"]) > 0.7


def test_input_items_are_embedded_from_their_codes_and_empty_shares_keep_the_graph():
    model = perturb(build_model(discrete_config("head", image_input=True), seed=0))
    mod = model.modalities["image_out"]
    assert mod.has_input and mod.has_output and mod.num_generation_tokens == 4
    batch = model.example_inputs(2)
    items = batch["modality_inputs"]["image_out"]["tokenizer"]["pixel_values"]
    assert items.shape == (2, 3, 8, 8)
    embeds = model.embed_inputs(batch["input_ids"], batch["modality_inputs"])
    want = mod.embed_codes(mod.tokenize(items)).reshape(-1, 32)
    torch.testing.assert_close(embeds[batch["input_ids"] == PLACE], want)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # the placeholder check names the path and both counts
    short = torch.stack([r[torch.arange(len(r)) != int((r == PLACE).nonzero()[0])] for r in batch["input_ids"]])
    with pytest.raises(InputError, match="input_ids hold 6 placeholder tokens .* but 8"):
        model(short, batch["modality_inputs"])
    with pytest.raises(InputError, match=r"output_targets.image_out.*\(N, 3, 8, 8\)|expected images \(N, 3, 8, 8\)"):
        model(**{**batch, "output_targets": {"image_out": batch["output_targets"]["image_out"][:, :, :4]}})
    # a data-parallel share without an item: zero loss term, the code head still in the graph
    ids = batch["input_ids"][:, :4]
    empty = model(ids, labels=ids, output_targets={"image_out": items[:0]})
    empty.loss.backward()
    assert mod.output_head.layers[0].weight.grad is not None


class _Painter(torch.nn.Module):
    """A continuous decoder of one's own (none is built in): hidden states -> pixels."""

    num_tokens = 4

    def __init__(self, in_features: int = 32):
        super().__init__()
        self.proj = torch.nn.Linear(in_features, 48)

    def forward(self, hidden):
        return self.proj(hidden).reshape(hidden.shape[0], 3, 8, 8)

    def example_targets(self, num_items, generator=None):
        return torch.rand(num_items, 3, 8, 8, generator=generator)


def test_validation_refuses_what_cannot_train():
    from mimo_spec.registry import register

    register("decoder", "test_painter")(_Painter)
    cfg = tiny_config()
    cfg["modalities"]["image_out"] = {"module": "modality", "params": {
        "generation_token_id": GEN, "output_loss": "cross_entropy"},
        "submodules": {"decoder": {"module": "test_painter"}}}
    with pytest.raises(ConfigError, match="modalities.image_out.params.output_loss"):
        build_model(cfg, device="meta")
    cfg = discrete_config()
    cfg["modalities"]["image_out"]["params"]["code_token_offset"] = 252  # 252 + 7 codes > vocab 256
    with pytest.raises(ConfigError, match="code_token_offset"):
        build_model(cfg, device="meta")
    cfg = discrete_config()
    cfg["modalities"]["image_out"]["params"]["output_loss"] = "mse"
    with pytest.raises(ConfigError, match="modalities.image_out.params.output_loss"):
        build_model(cfg, device="meta")
    cfg = discrete_config()
    cfg["modalities"]["image_out"]["params"]["begin_token_id"] = 250  # the image placeholder's id
    with pytest.raises(ConfigError, match="begin_token_id.*already used"):
        build_model(cfg, device="meta")


def test_palette_tokenizer_round_trip():
    from mimo_spec.components.tokenizers.palette import PatchPalette
    from mimo_spec.errors import ParamError

    tok = PatchPalette(image_size=8, patch_size=2, palette=[[0, 0, 0], [1, 0, 0], [0, 0, 1]])
    assert (tok.num_tokens, tok.grid, tok.codebook_size) == (16, (4, 4), 3)
    codes = torch.randint(3, (5, 16), generator=torch.Generator().manual_seed(0))
    images = tok.decode(codes)
    assert images.shape == (5, 3, 8, 8)
    assert torch.equal(tok.encode(images), codes)
    # a patch's code is the palette colour nearest its mean: 3 red pixels of 4 on black -> red
    img = torch.zeros(1, 3, 8, 8)
    img[0, 0, 0, :2] = 1.0
    img[0, 0, 1, 0] = 1.0
    assert tok.encode(img)[0, 0] == 1 and tok.encode(img)[0, 1] == 0
    with pytest.raises(ParamError):
        PatchPalette(image_size=8, patch_size=3)
    with pytest.raises(ParamError):
        PatchPalette(palette=[[2, 0, 0]])


def test_synthetic_draw_samples_and_eval_report_code_loss_and_accuracy():
    from omegaconf import OmegaConf

    from mimo_spec.config import compose_config
    from mimo_spec.data import build_dataset
    from mimo_spec.data.batch import collate, model_kwargs
    from mimo_spec.data.tokenizer import build_tokenizer
    from mimo_spec.data.config import validate_data_config
    from mimo_spec.train.step import evaluate

    cfg = compose_config(["modality=[vision_clip,image_gen]", "data.generation_fraction=1.0"])
    model = build_model(cfg, seed=0)
    mod = model.modalities["image_out"]
    data = validate_data_config(OmegaConf.to_container(cfg.data, resolve=True))
    tokenizer = build_tokenizer(data, model)
    ds = build_dataset(data, model, tokenizer, "eval")
    s = ds[0]
    ids, labels = s["input_ids"].tolist(), s["labels"].tolist()
    b = ids.index(mod.begin_token_id)
    assert ids[b:b + 66] == [mod.begin_token_id] + [mod.generation_token_id] * 64 + [mod.end_token_id]
    assert labels[b] == mod.begin_token_id and labels[b + 65] == mod.end_token_id
    assert set(labels[b + 1:b + 65]) == {-100}
    target = s["targets"]["image_out"]
    assert target.shape == (1, 3, 32, 32) and "draw a" in tokenizer.decode(ids[:b])
    result = evaluate(model, ds, lambda xs: collate(xs, tokenizer.pad_id), 4, 1)
    assert 0 < result["eval_image_out_loss"] and 0 <= result["eval_image_out_acc"] <= 1
    kwargs = model_kwargs(collate([ds[i] for i in range(4)], tokenizer.pad_id), "cpu", model)
    with torch.no_grad():
        out = model(**kwargs)
    torch.testing.assert_close(torch.tensor(result["eval_image_out_loss"]), out.modality_losses["image_out"])


def test_condition_dropout_trains_the_unconditional_row_guidance_samples_with_and_holdout_is_kept_out():
    """data.condition_dropout: that share of the training split's drawings loses its prompt exactly as
    generation's unconditional row does (every token before the begin token but the first -> pad, not
    scored); the rest of the sample (codes, targets) and the samples without an item stay as they were; the
    eval split is never touched. data.generation_holdout: those drawings never appear in training (but in
    eval), and a drawing that does not exist is refused naming the key."""
    from omegaconf import OmegaConf

    from mimo_spec.config import compose_config
    from mimo_spec.data import build_dataset
    from mimo_spec.data.config import validate_data_config
    from mimo_spec.data.tokenizer import build_tokenizer
    from mimo_spec.generation import unconditional_ids

    cfg = compose_config(["modality=[vision_clip,image_gen]", "data.generation_fraction=0.5",
                          "data.condition_dropout=0.4", "data.num_samples=200", "data.eval_samples=120",
                          "data.generation_holdout=[red ring,blue cross]"])
    model = build_model(cfg, seed=0)
    mod = model.modalities["image_out"]
    data = validate_data_config(OmegaConf.to_container(cfg.data, resolve=True))
    tokenizer = build_tokenizer(data, model)
    train, plain = build_dataset(data, model, tokenizer), build_dataset({**data.model_dump(), "condition_dropout": 0.0},
                                                                        model, tokenizer)
    assert len(train) == len(plain) == 200 and train.token_length(3) == plain.token_length(3)
    dropped = kept = 0
    for i in range(len(train)):
        got, ref = train[i], plain[i]
        assert torch.equal(got["labels"][-70:], ref["labels"][-70:])
        if not got.get("targets"):
            assert torch.equal(got["input_ids"], ref["input_ids"])
            continue
        torch.testing.assert_close(got["targets"], ref["targets"])
        b = ref["input_ids"].tolist().index(mod.begin_token_id)
        assert "red ring" not in tokenizer.decode(ref["input_ids"][:b].tolist())
        assert "blue cross" not in tokenizer.decode(ref["input_ids"][:b].tolist())
        if torch.equal(got["input_ids"], ref["input_ids"]):
            kept += 1
            continue
        dropped += 1
        want = unconditional_ids(ref["input_ids"][None, :b + 1], mod.begin_token_id, tokenizer.pad_id)[0]
        assert torch.equal(got["input_ids"][:b + 1], want)
        assert torch.equal(got["input_ids"][b:], ref["input_ids"][b:])
        assert set(got["labels"][1:b].tolist()) == {-100} and got["labels"][b] == mod.begin_token_id
    assert dropped + kept > 60 and 0.25 < dropped / (dropped + kept) < 0.55
    ev = build_dataset(data, model, tokenizer, "eval")
    prompts = [tokenizer.decode(ev[i]["input_ids"].tolist()) for i in range(len(ev)) if ev[i].get("targets")]
    assert all("draw a" in p for p in prompts) and any("red ring" in p or "blue cross" in p for p in prompts)
    with pytest.raises(ConfigError, match=r"data.generation_holdout.*'colour shape'.*'purple ring'"):
        validate_data_config({**data.model_dump(), "generation_holdout": ["purple ring"]})


def test_llava_json_image_targets_are_read_from_files(tmp_path):
    """An assistant turn's <gen:image_out> takes the next file of "output_images": the sample's target is
    that image at the tokenizer's size and range, the run begin, codes, end."""
    import json

    from PIL import Image

    from mimo_spec.data import build_dataset
    from mimo_spec.data.config import validate_data_config
    from mimo_spec.data.synthetic import render_image
    from mimo_spec.data.tokenizer import build_tokenizer
    from mimo_spec.errors import DataError

    cfg = discrete_config()  # ids above the byte tokenizer's (0..258)
    cfg["model"]["params"]["vocab_size"] = 512
    cfg["modalities"]["images"]["params"]["special_token_id"] = 510
    cfg["modalities"]["image_out"]["params"].update(generation_token_id=GEN + 260, begin_token_id=BEGIN + 260,
                                                    end_token_id=END + 260, code_token_offset=460)
    model = build_model(cfg, seed=0)
    img = render_image("blue", "ring", 16)  # a 16 px file: squashed to the tokenizer's 8 px
    Image.fromarray((img * 255).round().byte().permute(1, 2, 0).numpy()).save(tmp_path / "ring.png")
    records = [{"id": "0", "output_images": ["ring.png"], "conversations": [
        {"from": "human", "value": "draw a blue ring"}, {"from": "gpt", "value": "Here: <gen:image_out>"}]},
        {"id": "1", "output_images": ["ring.png", "ring.png"], "conversations": [
            {"from": "human", "value": "draw"}, {"from": "gpt", "value": "<gen:image_out>"}]}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    data = validate_data_config({"source": "llava_json", "path": str(tmp_path / "data.jsonl"), "eval_fraction": 0.0,
                                 "packing": False, "check_files": False})
    ds = build_dataset(data, model, build_tokenizer(data, model))
    s = ds[0]
    target = s["targets"]["image_out"]
    assert target.shape == (1, 3, 8, 8)
    want = torch.nn.functional.interpolate(img[None], size=(8, 8), mode="bilinear", antialias=True)
    assert torch.equal(model.modalities["image_out"].tokenize(target), model.modalities["image_out"].tokenize(want))
    ids, labels = s["input_ids"].tolist(), s["labels"].tolist()
    begin, gen, end = BEGIN + 260, GEN + 260, END + 260
    b = ids.index(begin)
    assert ids[b:b + 6] == [begin, gen, gen, gen, gen, end] and labels[b:b + 6] == [begin] + [-100] * 4 + [end]
    with pytest.raises(DataError, match="output_images"):
        ds[1]
    # WebDataset: the target is a member of the sample, key.out.png
    import io
    import tarfile

    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for name, data in (("s0.json", json.dumps({"conversations": records[0]["conversations"]}).encode()),
                           ("s0.out.png", (tmp_path / "ring.png").read_bytes())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = validate_data_config({"source": "webdataset", "path": str(tmp_path / "shard-0.tar"), "eval_fraction": 0.0,
                                 "packing": False})
    s = build_dataset(data, model, build_tokenizer(data, model))[0]
    assert torch.equal(s["targets"]["image_out"], target) and s["items"] == {}


def test_image_targets_follow_the_data_image_resize_and_filter(tmp_path):
    """A non-square image to generate is brought to the tokenizer's square the way the data's input images
    are (data.image_resize with data.image_resample): crop as transformers' CLIP processor crops, pad and fit
    with the mean colour as LLaVA's / Janus's processors do, squash; each checked against an independent
    reference, and the modes differ from one another (so the test can fail)."""
    import json

    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor

    from mimo_spec.data import build_dataset
    from mimo_spec.data.config import validate_data_config
    from mimo_spec.data.targets import OutputTargets, image_range
    from mimo_spec.data.tokenizer import build_tokenizer
    from mimo_spec.errors import ConfigError

    cfg = discrete_config()
    cfg["model"]["params"]["vocab_size"] = 512
    cfg["modalities"]["images"]["params"]["special_token_id"] = 510
    cfg["modalities"]["image_out"]["params"].update(generation_token_id=GEN + 260, begin_token_id=BEGIN + 260,
                                                    end_token_id=END + 260, code_token_offset=460)
    model = build_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (10, 26, 3), dtype=np.uint8))  # 26 x 10: non-square
    wide.save(tmp_path / "wide.png")
    (tmp_path / "data.jsonl").write_text(json.dumps({"id": "0", "output_images": ["wide.png"], "conversations": [
        {"from": "human", "value": "draw"}, {"from": "gpt", "value": "<gen:image_out>"}]}))
    low, high = image_range(model.modalities["image_out"])
    mean = (0.25, 0.5, 0.75)

    def target(resize, resample):
        data = validate_data_config({"source": "llava_json", "path": str(tmp_path / "data.jsonl"),
                                     "eval_fraction": 0.0, "packing": False, "image_resize": resize,
                                     "image_resample": resample, "image_mean": list(mean)})
        t = build_dataset(data, model, build_tokenizer(data, model))[0]["targets"]["image_out"][0]
        return (t - low) / (high - low)  # back to [0, 1]

    def pixels(img):
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)

    fill = tuple(int(m * 255) for m in mean)
    crop = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}, do_normalize=False,
                              resample=Image.Resampling.LANCZOS)(images=wide, return_tensors="pt")["pixel_values"][0]
    square = Image.new("RGB", (26, 26), fill)
    square.paste(wide, (0, 8))
    fitted = Image.new("RGB", (8, 8), fill)
    fitted.paste(wide.resize((8, 3), Image.Resampling.BILINEAR), (0, 2))
    want = {("crop", "lanczos"): crop,
            ("pad", "bicubic"): pixels(square.resize((8, 8), Image.Resampling.BICUBIC)),
            ("fit", "bilinear"): pixels(fitted),
            ("squash", "nearest"): pixels(wide.resize((8, 8), Image.Resampling.NEAREST))}
    got = {key: target(*key) for key in want}
    for key in want:
        assert (got[key] - want[key]).abs().max() < 1e-5, key
    keys = list(want)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert (got[a] - got[b]).abs().max() > 0.05, (a, b)
    with pytest.raises(ConfigError, match="data.image_resample"):
        OutputTargets(model, image_resample="box")


def test_audio_codec_modality_flattens_its_codebooks_and_generates_a_clip(tmp_path):
    """A text-to-speech modality over a 2-codebook EnCodec: the K codes of each frame one after another,
    codebook k's offset by k * codebook_size; generated codes decode through the codec and save as a WAV."""
    import wave

    from mimo_spec.generation import generate, save_audio

    cfg = tiny_config()
    cfg["modalities"]["speech_out"] = {"module": "modality", "params": {
        "generation_token_id": GEN, "begin_token_id": BEGIN, "end_token_id": END, "code_token_offset": 200,
        "num_frames": 3},
        "submodules": {"tokenizer": {"module": "encodec", "params": {
            "sampling_rate": 8000, "bandwidth": 16.0, "target_bandwidths": [16.0], "hidden_size": 8, "num_filters": 4,
            "upsampling_ratios": [2, 2], "codebook_size": 16, "num_lstm_layers": 1}}}}
    model = perturb(build_model(cfg, seed=0))
    mod = model.modalities["speech_out"]
    assert (mod.num_codes, mod.num_generation_tokens, mod.item_kind) == (32, 6, "audio")
    batch = model.example_inputs(2)
    clips = batch["output_targets"]["speech_out"]
    assert clips.shape == (2, 12)  # 3 frames of hop 4
    out = model(**batch)
    codes = mod.tokenizer.encode(clips)  # (2, 2, 3)
    want = (codes + torch.tensor([0, 16]).view(1, 2, 1)).transpose(1, 2).reshape(2, 6)
    assert torch.equal(out.output_codes["speech_out"], want) and torch.isfinite(out.loss)
    torch.testing.assert_close(mod.detokenize(want), mod.tokenizer.decode(codes))
    with pytest.raises(InputError, match="code frames"):
        model(**{**batch, "output_targets": {"speech_out": clips[:, :8]}})
    gen = generate(model, batch["input_ids"][:1, :4], output_modality="speech_out", max_new_tokens=1)
    assert gen.tokens == [BEGIN] + [GEN] * 6 + [END]
    flat = gen.codes["speech_out"][0]
    assert flat.shape == (6,) and all(0 <= c < 16 for c in flat[0::2]) and all(16 <= c < 32 for c in flat[1::2])
    clip = gen.outputs["speech_out"][0]
    assert clip.shape == (12,)
    save_audio(clip, 8000, tmp_path / "a.wav")
    with wave.open(str(tmp_path / "a.wav")) as f:
        assert (f.getframerate(), f.getnframes(), f.getnchannels()) == (8000, 12, 1)


def test_condition_dropout_takes_the_conditions_input_images_with_it(tmp_path):
    """An image-editing record (an input image in the prompt, an image to generate): a dropped sample loses the
    image with its placeholders (the unconditional row has none), so the batch trains; a record with another
    input image after the item keeps its condition (its items cannot be split); kept samples keep theirs."""
    import json

    from omegaconf import OmegaConf
    from PIL import Image

    from mimo_spec.config import compose_config
    from mimo_spec.data import build_dataset, collate, model_kwargs
    from mimo_spec.data.config import validate_data_config
    from mimo_spec.data.synthetic import render_image
    from mimo_spec.data.tokenizer import build_tokenizer

    for name, (colour, shape) in {"in.png": ("red", "ring"), "out.png": ("blue", "ring")}.items():
        img = render_image(colour, shape, 32)
        Image.fromarray((img * 255).round().byte().permute(1, 2, 0).numpy()).save(tmp_path / name)
    edit = {"image": "in.png", "output_images": ["out.png"], "conversations": [
        {"from": "human", "value": "<image>\nmake it blue"}, {"from": "gpt", "value": "<gen:image_out>"}]}
    after = {"images": ["in.png", "in.png"], "output_images": ["out.png"], "conversations": [
        {"from": "human", "value": "<image>\nmake it blue"}, {"from": "gpt", "value": "<gen:image_out> like <image>"}]}
    (tmp_path / "data.jsonl").write_text(json.dumps({"id": "0", **edit}) + "\n" + json.dumps({"id": "1", **after}))
    for p, dropped_items in ((1.0, 0), (0.0, 1)):
        cfg = compose_config(["modality=[vision_clip,image_gen]", "data=llava_json", f"data.path={tmp_path}/data.jsonl",
                              f"data.image_folder={tmp_path}", "data.eval_fraction=0", f"data.condition_dropout={p}",
                              "data.packing=false"])
        model = build_model(cfg, seed=0)
        data = validate_data_config(OmegaConf.to_container(cfg.data, resolve=True))
        tok = build_tokenizer(data, model)
        ds = build_dataset(data, model, tok)
        order = sorted(range(len(ds)), key=lambda i: len(ds[i]["input_ids"]))
        first, second = ds[order[0]], ds[order[1]]
        image = model.modalities["images"].special_token_id
        assert first["num_items"]["images"] == dropped_items
        assert int((first["input_ids"] == image).sum()) == (16 if dropped_items else 0)
        assert second["num_items"]["images"] == 2 and int((second["input_ids"] == image).sum()) == 32
        out = model(**model_kwargs(collate([first, second], tok.pad_id), "cpu", model))
        assert torch.isfinite(out.loss)


def test_an_output_item_starts_only_while_it_fits_in_max_new_tokens(monkeypatch):
    """A model that always prefers the image's begin token: the first item (begin, 4 codes, end) fits and is
    generated; after it the begin token is masked once an item would pass max_new_tokens, so the generation
    stops at exactly max_new_tokens (an item started near the limit ran past it, 132 tokens for 80)."""
    import mimo_spec.generation as generation
    from mimo_spec.generation import generate

    model = build_model(discrete_config(), seed=0)
    mod = model.modalities["image_out"]
    size = mod.num_generation_tokens + 2
    real = generation.next_token_logits

    def prefer_begin(lm, hidden):
        logits = real(lm, hidden)
        return logits.index_fill(-1, torch.tensor([BEGIN]), 1e4)

    monkeypatch.setattr(generation, "next_token_logits", prefer_begin)
    ids = torch.tensor([[1, 5, 9]])
    for max_new in (size + 3, 2 * size, 2 * size + 1):
        out = generate(model, ids, max_new_tokens=max_new)
        assert len(out.tokens) == max_new, (max_new, out.tokens)
        assert len(out.codes["image_out"]) == max_new // size  # as many whole items as fit
        assert out.tokens[:size][0] == BEGIN and out.tokens[size - 1] == END
