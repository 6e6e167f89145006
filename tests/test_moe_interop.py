"""Mixture-of-experts language models through import_hf / export_hf, against transformers (tiny perturbed
models, fp32, CPU): Mixtral, Qwen2-MoE (a gated shared expert, dense layers among routed ones) and
Qwen3-MoE (q/k norms, decoder_sparse_step) and OLMoE (q/k norms over all heads); logits and loss on a padded batch; export -> from_pretrained
with nothing missing or unexpected -> the same logits; the released per-expert layout and transformers 5's
fused one both import; features we do not model are refused by name. Qwen3-VL-MoE with an image."""

from __future__ import annotations

import functools
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mimo_spec import build_model  # noqa: E402
from mimo_spec.errors import ConfigError, InputError  # noqa: E402
from mimo_spec.interop import export_hf, import_hf  # noqa: E402

TOL = 1e-5
COMMON = dict(vocab_size=120, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=None)
FAMILIES = {
    # every layer routed; top-2 of 4, renormalised
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(COMMON, intermediate_size=24, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # layer 1 dense (mlp_only_layers), 0 and 2 routed; the shared expert and its sigmoid gate; q/k/v bias;
    # top-2 probabilities not renormalised
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(COMMON, intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                       num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                       mlp_only_layers=[1], decoder_sparse_step=1)),
    # every second layer routed (decoder_sparse_step 2); q/k norms; head_dim apart from hidden / heads
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(COMMON, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=2, head_dim=16,
                       num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=2)),
    # every layer routed, top-2 of 4 not renormalised (OLMoE's default); one RMSNorm over all heads' queries
    # (32 wide) and one over all keys (16)
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(COMMON, intermediate_size=24, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                   norm_topk_prob=False, rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
}


def _perturb(hf, seed: int = 1):
    with torch.no_grad():  # unit norms, zero biases and a zero-initialised router would hide swapped tensors
        g = torch.Generator().manual_seed(seed)
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for n, p in hf.named_parameters():
            if n.endswith(("gate.weight", "experts.gate_up_proj", "experts.down_proj")):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)  # routing decided by clear margins
    return hf.eval()


def _hf_model(family: str, **overrides):
    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    return _perturb(getattr(transformers, model_cls)(config))


@functools.lru_cache(maxsize=None)
def _pair(family: str):
    hf = _hf_model(family)
    cfg, model = import_hf(hf)
    return hf, cfg, model.eval()


def _batch():
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 120, (2, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b)[mask.bool()].abs().max().item()


def _logits_and_loss(model, ids, mask, labels):
    out = model(ids, {}, attention_mask=mask, labels=labels)
    return out.logits, out.loss


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_import_export_equal_transformers(family, tmp_path):
    hf, cfg, model = _pair(family)
    ids, mask, labels = _batch()
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    logits, loss = _logits_and_loss(model, ids, mask, labels)
    assert _err(logits, ref.logits, mask) <= TOL
    assert abs(loss.item() - ref.loss.item()) <= TOL
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    p = cfg["model"]["params"]
    assert p["num_experts"] == 4 and p["num_experts_per_tok"] == 2 and p["router_scoring"] == "softmax"
    assert p["norm_topk_prob"] is (family not in ("qwen2_moe", "olmoe"))
    routed = [i for i, layer in enumerate(model.language_model.layers) if hasattr(layer.mlp, "router")]
    assert routed == {"mixtral": [0, 1], "qwen2_moe": [0, 2], "qwen3_moe": [1], "olmoe": [0, 1]}[family]
    if family == "olmoe":  # the q / k norms span all heads: 4 x 8 and 2 x 8 wide
        attn = model.language_model.layers[0].attn
        assert attn.q_norm.weight.shape == (32,) and attn.k_norm.weight.shape == (16,)

    # export: the family's class loads it with nothing missing or unexpected, and computes the same
    out_dir = export_hf(model, cfg, tmp_path / "out")
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == [FAMILIES[family][1]] and config["model_type"] == family
    back, info = type(hf).from_pretrained(out_dir, output_loading_info=True)
    assert not any(info.values()), info
    again = back.eval()(input_ids=ids, attention_mask=mask, labels=labels)
    assert _err(again.logits, ref.logits, mask) <= TOL and abs(again.loss.item() - ref.loss.item()) <= TOL
    # written as the releases are (one tensor per expert), which imports back to the same model
    from mimo_spec.interop.hf_safetensors import read_header

    keys = set(read_header(out_dir / "model.safetensors"))
    expert = ("model.layers.0.block_sparse_moe.experts.3.w3.weight" if family == "mixtral" else
              f"model.layers.{routed[0]}.mlp.experts.3.up_proj.weight")
    assert expert in keys, sorted(keys)[:20]
    cfg2, model2 = import_hf(out_dir)
    assert cfg2["model"] == cfg["model"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


@torch.no_grad()
def test_fused_checkpoint_imports(tmp_path):
    """A directory holding transformers 5's fused experts (experts.gate_up_proj (E, 2F, H)) imports too."""
    from mimo_spec.interop.hf_safetensors import write_safetensors

    hf, cfg, model = _pair("qwen2_moe")
    out = tmp_path / "fused"
    out.mkdir()
    hf.config.to_json_file(str(out / "config.json"))
    write_safetensors(out / "model.safetensors", {k: v.contiguous() for k, v in hf.state_dict().items()})
    cfg2, model2 = import_hf(out)
    assert cfg2["model"] == cfg["model"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_router_aux_loss_coef_maps_to_router_aux_loss_weight(family):
    """output_router_logits with router_aux_loss_coef: transformers adds coef x its load-balancing loss
    (padding left out) to the loss; ours computes the same loss."""
    from mimo_spec.interop.hf_import import _convert

    hf = _hf_model(family, output_router_logits=True, router_aux_loss_coef=0.05)
    cfg, model = import_hf(hf)
    assert cfg["model"]["params"]["router_aux_loss_weight"] == 0.05
    ids, mask, labels = _batch()
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    out = model.eval()(ids, {}, attention_mask=mask, labels=labels)
    assert abs(out.router_aux_loss.item() - ref.aux_loss.item()) <= TOL
    assert abs(out.loss.item() - ref.loss.item()) <= TOL and ref.loss > out.lm_loss + 0.05
    # without output_router_logits transformers adds nothing, whatever the coefficient
    config_cls, _, kwargs = FAMILIES[family]
    off = getattr(transformers, config_cls)(**kwargs, router_aux_loss_coef=0.05)
    assert _convert(off, "x").cfg["model"]["params"]["router_aux_loss_weight"] == 0.0


def test_unmodelled_moe_features_are_refused(tmp_path):
    from mimo_spec.interop.hf_import import _convert

    config_cls, _, kwargs = FAMILIES["mixtral"]
    with pytest.raises(InputError, match="router_jitter_noise"):
        _convert(getattr(transformers, config_cls)(**kwargs, router_jitter_noise=0.1), "config.json")
    with pytest.raises(InputError, match="relu6"):  # an expert activation we do not implement
        _convert(getattr(transformers, config_cls)(**{**kwargs, "hidden_act": "relu6"}), "config.json")
    with pytest.raises(InputError, match="clip_qkv 8.0: clamping"):  # OLMoE's optional q/k/v clamp
        _convert(transformers.OlmoeConfig(num_hidden_layers=1, clip_qkv=8.0), "config.json")
    # a released-layout checkpoint with a router bias (a tensor its config does not describe), an expert of
    # the wrong width and one missing: each named before any weight is read
    from mimo_spec.interop.hf_safetensors import read_header, write_safetensors

    _, cfg, model = _pair("mixtral")
    good = export_hf(model, cfg, tmp_path / "good")
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in read_header(good / "model.safetensors").items()}
    sd["model.layers.0.block_sparse_moe.gate.bias"] = torch.zeros(4)
    sd["model.layers.1.block_sparse_moe.experts.2.w1.weight"] = torch.zeros(23, 32)
    del sd["model.layers.0.block_sparse_moe.experts.3.w2.weight"]
    out = tmp_path / "broken"
    out.mkdir()
    (out / "config.json").write_text((good / "config.json").read_text())
    write_safetensors(out / "model.safetensors", sd)
    with pytest.raises(InputError) as err:
        import_hf(out)
    text = str(err.value)
    assert "unexpected tensors: model.layers.0.block_sparse_moe.gate.bias" in text
    assert "missing tensors: model.layers.0.block_sparse_moe.experts.3.w2.weight" in text
    assert "model.layers.1.block_sparse_moe.experts.2.w1.weight: checkpoint (23, 32), config expects (24, 32)" in text


@torch.no_grad()
def test_export_refuses_what_no_transformers_moe_computes(tmp_path):
    _, cfg, _ = _pair("mixtral")
    for change, name in (({"router_scoring": "sigmoid"}, "router_scoring"),
                         ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
                         ({"norm_topk_prob": False}, "norm_topk_prob"),
                         ({"router_bias_update_rate": 0.001}, "router_bias_update_rate")):
        bad = {**cfg, "model": {**cfg["model"], "params": {**cfg["model"]["params"], **change}}}
        with pytest.raises(ConfigError, match=name):
            export_hf(build_model(bad), bad, tmp_path / name)
    _, cfg, _ = _pair("qwen2_moe")  # Qwen2-MoE always gates its shared expert
    bad = {**cfg, "model": {**cfg["model"], "params": {**cfg["model"]["params"], "shared_expert_gate": False}}}
    with pytest.raises(ConfigError, match="shared_expert_gate"):
        export_hf(build_model(bad), bad, tmp_path / "ungated")


# ------------------------------------------------------------------ Qwen3-VL-MoE

IMG, VID, VS = 110, 111, 112


def _vl_hf(moe_width: int = 12, experts: int = 4, layers: int = 2, depth: int = 2, seed: int = 0):
    """A tiny Qwen3-VL-MoE (perturbed random weights), LM hidden size 32."""
    text = dict(COMMON, intermediate_size=40, moe_intermediate_size=moe_width, num_hidden_layers=layers, head_dim=16,
                num_experts=experts, num_experts_per_tok=2, decoder_sparse_step=1,
                rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True,
                                 "rope_theta": 10000.0})
    vision = dict(depth=depth, hidden_size=32, out_hidden_size=32, intermediate_size=48, num_heads=4, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    torch.manual_seed(seed)
    return _perturb(transformers.Qwen3VLMoeForConditionalGeneration(transformers.Qwen3VLMoeConfig(
        text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS,
        vision_end_token_id=VS + 1, tie_word_embeddings=False)))


@functools.lru_cache(maxsize=None)
def _vl_pair():
    hf = _vl_hf()
    cfg, model = import_hf(hf)
    return hf, cfg, model.eval()


def _vl_batch():
    gen = torch.Generator().manual_seed(3)
    grids = torch.tensor([[1, 4, 6], [1, 2, 2]])  # 6 and 1 tokens after the 2x2 merge
    rows = [[5, 6, VS] + [IMG] * 6 + [7, 8, 9], [10, VS] + [IMG] * 1 + [11, 12, 13, 14]]
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    labels = ids.masked_fill((ids == IMG) | (mask == 0), -100)
    pv = torch.randn(int(grids.prod(1).sum()), 3 * 2 * 4 * 4, generator=gen)
    hf_kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grids,
                 mm_token_type_ids=(ids == IMG).long())
    return hf_kw, {"images": {"vit": {"pixel_values": pv, "image_grid_thw": grids}}}, labels


@torch.no_grad()
def test_qwen3_vl_moe_import_export_equal_transformers(tmp_path):
    hf, cfg, model = _vl_pair()
    hf_kw, ours, labels = _vl_batch()
    ref = hf(**hf_kw, labels=labels)
    out = model(hf_kw["input_ids"], ours, attention_mask=hf_kw["attention_mask"], labels=labels)
    assert _err(out.logits, ref.logits, hf_kw["attention_mask"]) <= TOL
    assert abs(out.loss.item() - ref.loss.item()) <= TOL
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    assert cfg["model"]["params"]["num_experts"] == 4 and cfg["model"]["params"]["norm_topk_prob"] is True

    out_dir = export_hf(model, cfg, tmp_path / "out")
    assert json.loads((out_dir / "config.json").read_text())["architectures"] == [
        "Qwen3VLMoeForConditionalGeneration"]
    back, info = type(hf).from_pretrained(out_dir, output_loading_info=True)
    assert not any(info.values()), info
    again = back.eval()(**hf_kw, labels=labels)
    assert _err(again.logits, ref.logits, hf_kw["attention_mask"]) <= TOL
    # written as the releases are (fused experts, transposed: (E, H, 2F)); that directory imports back
    from mimo_spec.interop.hf_safetensors import read_header

    assert read_header(out_dir / "model.safetensors")[
        "model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 32, 24)
    cfg2, model2 = import_hf(out_dir)
    assert cfg2 == cfg
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


@torch.no_grad()
def test_qwen3_vl_moe_expert_orientation_read_as_transformers_reads_it(tmp_path):
    """transformers loads Qwen3-VL-MoE's fused experts either way round (transposed when the stored shape is not
    the in-memory one) and its own save_pretrained writes them untransposed: a directory it wrote imports with
    its numbers. With square experts (hidden = 2 x expert width) the shapes cannot tell: export writes them as
    transformers holds them, so from_pretrained computes our numbers, and reading such a directory warns."""
    hf, cfg, model = _vl_pair()
    hf_kw, ours, labels = _vl_batch()
    ref = hf(**hf_kw, labels=labels)
    hf.save_pretrained(tmp_path / "saved")
    from mimo_spec.interop.hf_safetensors import read_header

    key = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert read_header(tmp_path / "saved" / "model.safetensors")[key].shape == (4, 24, 32)  # not the release's
    _, imported = import_hf(tmp_path / "saved")
    out = imported.eval()(hf_kw["input_ids"], ours, attention_mask=hf_kw["attention_mask"], labels=labels)
    assert _err(out.logits, ref.logits, hf_kw["attention_mask"]) <= TOL
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), imported.state_dict().values()))

    square = _vl_hf(moe_width=16, experts=3, layers=1, depth=1, seed=1).eval()
    assert 2 * 16 == COMMON["hidden_size"]  # the gate/up tensor is (E, 32, 32)
    cfg_sq, ours_sq = import_hf(square)  # in memory: nothing ambiguous, no warning
    ref_sq = square(**hf_kw).logits
    with pytest.warns(UserWarning, match="square"):
        out_dir = export_hf(ours_sq, cfg_sq, tmp_path / "square")
    back, info = type(square).from_pretrained(out_dir, output_loading_info=True)
    assert not any(info.values()), info
    assert _err(back.eval()(**hf_kw).logits, ref_sq, hf_kw["attention_mask"]) <= TOL
    with pytest.warns(UserWarning, match="orientation cannot be told from their shapes"):
        _, again = import_hf(out_dir)
    assert _err(again.eval()(hf_kw["input_ids"], ours, attention_mask=hf_kw["attention_mask"]).logits, ref_sq,
                hf_kw["attention_mask"]) <= TOL


def test_olmoe_q_k_norms_over_all_heads_refuse_tensor_parallelism():
    """A tensor-parallel rank holds a share of the heads; OLMoE's norms need all of them: refused by name
    (the layout check), while ep and fsdp layouts of the same model resolve."""
    from mimo_spec.parallel.layout import resolve

    _, cfg, _ = _pair("olmoe")
    meta = build_model({**cfg, "modalities": {}}, device="meta")
    with pytest.raises(ConfigError) as e:
        resolve({"default": {"tp": 2}}, meta, 2)
    problem = {p.path: str(p) for p in e.value.problems}["parallel.default.tp"]
    assert "qk_norm_kind 'rmsnorm_all_heads'" in problem and "use tp: 1" in problem
    assert resolve({"default": {"dp_shard": 2}, "modules": {"language": {"ep": 2}}}, meta, 2).modules["language"].ep == 2
