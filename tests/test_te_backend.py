"""The transformer-engine backend: wiring, numerics against the local layers, checkpoints across backends.

transformer-engine needs CUDA, so most tests run against ``tests/te_standin`` (a
pure-PyTorch copy of the TE module interfaces mimo-spec uses: constructor
arguments, parameter names and order, ``_extra_state``, activation semantics).
``test_real_transformer_engine_matches_local`` runs against the real library
where CUDA and transformer-engine are installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from mimo_spec import build_model
from mimo_spec.components import te_backend
from mimo_spec.components.audio.whisper import WhisperEncoder
from mimo_spec.components.language.gpt import GPT
from mimo_spec.components.vision.clip_vit import ClipViT
from mimo_spec.errors import ConfigError

STANDIN = Path(__file__).parent / "te_standin"

LLAMA = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
             norm="rmsnorm", mlp="swiglu", max_seq_len=64)
GPT2 = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64, norm="layernorm",
            mlp="gelu", activation="gelu_tanh", position_embedding="learned", attention_bias=True, mlp_bias=True,
            tie_embeddings=True, max_seq_len=64)
VIT = dict(image_size=16, patch_size=4, hidden_size=32, num_layers=3, num_heads=4, ffn_hidden_size=64,
           activation="quick_gelu", feature_layer=-2)


@pytest.fixture
def standin(monkeypatch):
    """transformer_engine importable (the stand-in) and CUDA reported present."""
    monkeypatch.syspath_prepend(str(STANDIN))
    monkeypatch.setattr(te_backend, "cuda_available", lambda: True)
    yield
    for name in [n for n in sys.modules if n.startswith("transformer_engine")]:
        del sys.modules[name]


def _gpt_logits(model, ids):
    return model.logits(model(model.embed_tokens(ids)))


def _grads_by_checkpoint_name(model):
    renames = te_backend.te_parameter_renames(model)
    return {renames.get(n, n): p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shape", ["llama", "gpt2"])
def test_te_gpt_matches_local_forward_backward(standin, shape):
    kw = LLAMA if shape == "llama" else GPT2
    torch.manual_seed(0)
    local = GPT(**kw)
    te = GPT(**kw, backend="te")
    assert te.backend == "te" and te_backend.is_te_module(te.layers[0].mlp)
    # checkpoints use the local keys in both directions
    assert list(te.state_dict()) == list(local.state_dict())
    te.load_state_dict(local.state_dict())
    ids = torch.randint(0, 64, (2, 12))
    a, b = _gpt_logits(local, ids), _gpt_logits(te, ids)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    a.square().mean().backward()
    b.square().mean().backward()
    ga, gb = _grads_by_checkpoint_name(local), _grads_by_checkpoint_name(te)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-7, msg=k)
    # parameter order is the same in both backends (optimizer state keyed by index moves across)
    renames = te_backend.te_parameter_renames(te)
    assert [renames.get(n, n) for n, _ in te.named_parameters()] == [n for n, _ in local.named_parameters()]


def test_te_vit_matches_local_and_init_follows_mimo_scheme(standin):
    torch.manual_seed(0)
    local = ClipViT(**VIT)
    torch.manual_seed(0)
    te = ClipViT(**VIT, backend="te")
    # same init scheme: unit norm scales, zero biases, residual projections scaled down
    sd_te, sd_local = te.state_dict(), local.state_dict()
    assert torch.all(sd_te["layers.0.attn_norm.weight"] == 1) and torch.all(sd_te["layers.0.mlp.fc1.bias"] == 0)
    for key in ("layers.0.attn.out.weight", "layers.0.mlp.fc2.weight", "layers.0.attn.qkv.weight"):
        assert sd_te[key].std().item() == pytest.approx(sd_local[key].std().item(), rel=0.25), key
    te.load_state_dict(sd_local)
    px = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(te(pixel_values=px), local(pixel_values=px), rtol=1e-5, atol=1e-6)


def test_te_activation_without_kernel_is_refused_and_auto_falls_back(standin):
    with pytest.raises(ValueError, match=r"backend 'te' cannot run here: transformer-engine has no 'gelu' kernel "
                                         r"\(its 'gelu' is the tanh approximation\); te supports gelu_tanh"):
        WhisperEncoder(num_mel_bins=8, hidden_size=16, num_layers=1, num_heads=2, ffn_hidden_size=32,
                       max_source_positions=8, backend="te")
    whisper = WhisperEncoder(num_mel_bins=8, hidden_size=16, num_layers=1, num_heads=2, ffn_hidden_size=32,
                             max_source_positions=8, backend="auto")
    assert whisper.backend == "local"
    assert GPT(**LLAMA, backend="auto").backend == "te"


def test_te_unavailable_is_a_config_error_naming_the_node():
    # this machine has no CUDA (and no transformer-engine): te is refused, auto is local
    if te_backend.te_unavailable_reason() is None:
        pytest.skip("transformer-engine runs here")
    cfg = tiny_config()
    cfg["model"]["params"]["backend"] = "te"
    with pytest.raises(ConfigError) as e:
        build_model(cfg, device="meta")
    assert "model.params.backend: backend 'te' cannot run here" in str(e.value)
    assert "use backend: local or auto" in str(e.value)
    cfg = tiny_config(backend="te")
    with pytest.raises(ConfigError) as e:
        build_model(cfg, device="meta")
    assert str(e.value).count("cannot run here") == 1 and "backend: backend 'te' cannot run here" in str(e.value)
    model = build_model(tiny_config(backend="auto"), device="meta")
    assert model.language_model.backend == "local"
    assert model.modalities["images"].encoders["clip"].backend == "local"


def test_run_device_defaults_to_the_local_ranks_gpu(monkeypatch):
    from mimo_spec.parallel.env import run_device

    # with a GPU, the current one by index (cuda:0, not the index-less cuda, which compares unequal)
    assert run_device("cpu") == torch.device("cpu") and run_device(None) == (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert run_device(None) == torch.device("cuda", 1) and chosen == [1]


def test_te_model_on_cpu_is_a_config_error_naming_train_device(standin, tmp_path):
    from mimo_spec.train.loop import check_backend_device

    cfg = tiny_config(backend="te")
    cfg["model"]["params"].update(norm="rmsnorm", mlp="swiglu")
    model = build_model(cfg, device="meta")
    with pytest.raises(ConfigError) as e:
        check_backend_device(model, torch.device("cpu"))
    assert "train.device" in str(e.value) and "run on CUDA only, but the device is cpu" in str(e.value)
    assert "set train.device=cuda, or backend: local" in str(e.value)
    check_backend_device(model, torch.device("cuda"))  # no error
    check_backend_device(build_model(tiny_config(), device="meta"), torch.device("cpu"))


def test_cli_refuses_te_without_cuda_with_exit_2(cli):
    if te_backend.te_unavailable_reason() is None:
        pytest.skip("transformer-engine runs here")
    r = cli("action=summary", "backend=te")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "backend: backend 'te' cannot run here" in r.stderr and "hint: use backend: local or auto" in r.stderr
    r = cli("action=summary", "+model.params.backend=te")
    assert r.returncode == 2 and "model.params.backend: backend 'te' cannot run here" in r.stderr, r.stderr


def test_top_level_backend_reaches_every_component_and_summary(standin):
    from mimo_spec.summary import render_summary

    cfg = tiny_config(backend="te")
    cfg["model"]["params"].update(norm="rmsnorm", mlp="swiglu")
    cfg["modalities"]["images"]["submodules"]["encoders"]["clip"]["params"]["activation"] = "quick_gelu"
    meta = build_model(cfg, device="meta")  # summary / import builds: nothing allocated, TE's parts included
    assert all(p.is_meta for p in meta.parameters())
    model = build_model(cfg, seed=0)
    assert model.language_model.backend == "te"
    assert model.modalities["images"].encoders["clip"].backend == "te"
    text = render_summary(model)
    assert "gpt [te]" in text and "clip_vit [te]" in text and "TransformerBlock [te]" in text
    # a component's own params.backend wins over the top-level default
    cfg["modalities"]["images"]["submodules"]["encoders"]["clip"]["params"]["backend"] = "local"
    assert build_model(cfg, device="meta").modalities["images"].encoders["clip"].backend == "local"
    # the whole model gives the local model's loss from the same weights
    local_cfg = tiny_config()
    local_cfg["model"]["params"].update(norm="rmsnorm", mlp="swiglu")
    local = build_model(local_cfg, seed=0)
    model = build_model(tiny_config(backend="te", model=local_cfg["model"]), seed=1)
    model.load_state_dict(local.state_dict())
    batch = local.example_inputs(batch_size=2)
    torch.testing.assert_close(model(**batch).loss, local(**batch).loss, rtol=1e-5, atol=1e-6)


def test_te_refuses_tensor_parallel_layouts(standin):
    cfg = tiny_config(backend="te")
    cfg["model"]["params"].update(norm="rmsnorm", mlp="swiglu")
    cfg["parallel"] = {"default": {"tp": 2}}
    from mimo_spec.run_config import build_meta_model  # the layout is checked with the model by the app

    with pytest.raises(ConfigError) as e:
        build_meta_model(cfg)
    text = str(e.value)
    assert "parallel.default.tp" in text or "parallel.modules.language.tp" in text or ".tp:" in text, text
    assert "transformer-engine layers (backend te)" in text and "use tp: 1" in text


def _train_step(model, opt, batch):
    opt.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.mark.parametrize("fmt", ["safetensors", "dcp"])
@pytest.mark.parametrize("direction", ["local_to_te", "te_to_local"])
def test_training_checkpoints_move_between_backends(standin, tmp_path, fmt, direction):
    """Train 2 steps in one backend, checkpoint (weights + AdamW state), resume in the other:
    the third step equals the one the first backend takes."""
    import torch.distributed.checkpoint as dcp

    from safetensors.torch import save_file

    from mimo_spec.train.checkpoint import _canonical_states, _py_rng_state, load_checkpoint, save_checkpoint

    def make(backend):
        cfg = tiny_config(backend=backend)
        cfg["model"]["params"].update(norm="rmsnorm", mlp="swiglu")
        cfg["modalities"]["images"]["submodules"]["encoders"]["clip"]["params"]["activation"] = "quick_gelu"
        model = build_model(cfg, seed=0)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    first, second = ("local", "te") if direction == "local_to_te" else ("te", "local")
    src, src_opt = make(first)
    batch = src.example_inputs(batch_size=2)
    for _ in range(2):
        _train_step(src, src_opt, batch)
    if fmt == "safetensors":
        path = save_checkpoint(tmp_path / "ckpt", 2, src, src_opt, {}, keep_last=1)
    else:
        msd, osd = _canonical_states(src, src_opt, {})
        # backend-neutral keys: the local names, for the weights and the optimizer state alike
        assert "state.language_model.layers.0.mlp.fc1.weight.exp_avg" in osd
        assert "language_model.layers.0.attn_norm.weight" in msd
        assert all("fc1_weight" not in k and "layer_norm_weight" not in k for k in list(osd) + list(msd))
        path = tmp_path / "dcp"
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(path), no_dist=True)
        save_file({"torch_cpu": torch.get_rng_state()}, str(path / "rng.safetensors"))
        (path / "state.json").write_text(json.dumps({"step": 2, "format": "dcp", "python_rng": _py_rng_state()}))
    dst, dst_opt = make(second)
    dst_opt.zero_grad()
    load_checkpoint(path, dst, dst_opt)
    want = _train_step(src, src_opt, batch)
    got = _train_step(dst, dst_opt, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    after_src, after_dst = src.state_dict(), dst.state_dict()
    assert after_src.keys() == after_dst.keys()
    for k in after_src:
        torch.testing.assert_close(after_dst[k], after_src[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.skipif(te_backend.te_unavailable_reason() is not None, reason="needs CUDA and transformer-engine")
def test_real_transformer_engine_matches_local():
    # TE runs fp32 GEMMs in TF32 whatever torch's switches say: the local side does too, and the
    # tolerances are TF32's
    torch.backends.cuda.matmul.allow_tf32 = True
    for kw in (LLAMA, GPT2, dict(LLAMA, mlp_bias=False, attention_bias=False)):
        torch.manual_seed(0)
        with torch.device("cuda"):
            local = GPT(**kw)
            te = GPT(**kw, backend="te")
        assert list(te.state_dict()) == list(local.state_dict())
        te.load_state_dict(local.state_dict())
        ids = torch.randint(0, 64, (2, 16), device="cuda")
        a, b = _gpt_logits(local, ids), _gpt_logits(te, ids)
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-3)
        a.float().square().mean().backward()
        b.float().square().mean().backward()
        ga, gb = _grads_by_checkpoint_name(local), _grads_by_checkpoint_name(te)
        for k in ga:
            torch.testing.assert_close(gb[k], ga[k], rtol=1e-2, atol=1e-4, msg=k)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            torch.testing.assert_close(_gpt_logits(te, ids).float(), _gpt_logits(local, ids).float(),
                                       rtol=5e-2, atol=5e-2)
    with torch.device("meta"):  # deferred init: nothing on the GPU
        assert all(p.is_meta for p in GPT(**LLAMA, backend="te").parameters())


def test_hugging_face_export_of_a_te_model_equals_the_local_models(standin, tmp_path):
    from safetensors.torch import load_file

    from mimo_spec.config import compose_config
    from mimo_spec.interop import export_hf

    cfg, te_cfg = compose_config([]), compose_config(["backend=te"])
    local = build_model(cfg, seed=0)
    te = build_model(te_cfg, seed=1)
    assert te.language_model.backend == "te"
    te.load_state_dict(local.state_dict())
    tensors = []
    for model, c, out in ((local, cfg, tmp_path / "local"), (te, te_cfg, tmp_path / "te")):
        export_hf(model, c, out)
        tensors.append({k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()})
    assert tensors[0].keys() == tensors[1].keys() and len(tensors[0]) > 20
    for k in tensors[0]:
        assert torch.equal(tensors[0][k], tensors[1][k]), k
