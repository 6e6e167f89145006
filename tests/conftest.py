import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

torch = pytest.importorskip("torch")
from ranks import run_script  # noqa: E402
# under pytest-xdist each of the two workers gets one core
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def run_cli(args, cwd, env=None, timeout=120):
    """Run `python cli.py ARGS` in ``cwd``; returns the CompletedProcess. The process is forked from a server
    that has imported torch and transformers once (tests/ranks.py), not started afresh: the same CLI code,
    environment, working directory, exit code and output, without 5-10 s of imports per call."""
    full_env = dict(os.environ)
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env.update(env or {})
    return run_script(ROOT / "cli.py", list(args), env=full_env, cwd=cwd, timeout=timeout)


@pytest.fixture
def cli(tmp_path):
    def _run(*args, **kw):
        return run_cli(list(args), tmp_path, **kw)

    _run.cwd = tmp_path
    return _run


def tiny_config(**overrides):
    """A small config as a plain dict: tiny LM + tiny CLIP image modality."""
    cfg = {
        "model": {"module": "gpt", "params": {
            "vocab_size": 256, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
            "ffn_hidden_size": 64, "max_seq_len": 128}},
        "modalities": {"images": {
            "module": "modality",
            "params": {"special_token_id": 250},
            "submodules": {
                "encoders": {"clip": {"module": "clip_vit", "params": {
                    "image_size": 16, "patch_size": 8, "hidden_size": 16, "num_layers": 2, "num_heads": 2,
                    "ffn_hidden_size": 32}}},
                "input_projections": {"clip": {"module": "mlp", "params": {"in_features": 16, "out_features": 32}}},
            }}},
    }
    cfg.update(overrides)
    return cfg


def subset_differences(expected, actual, path=""):
    """Where ``actual`` (a preset's resolved node) differs from ``expected`` (what import_hf makes of the released
    config), key by key: [] when every key import_hf sets has the same value (and type) in the preset."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: {actual!r} is not a mapping"]
        return [d for k, v in expected.items() for d in subset_differences(v, actual.get(k), f"{path}.{k}")]
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: {actual!r} != {expected!r}"]
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in subset_differences(e, a, f"{path}[{i}]")]
    same = actual == expected and (type(actual) is type(expected) or isinstance(expected, float))
    return [] if same else [f"{path}: {actual!r} != {expected!r}"]


def check_preset_is_the_release(preset, hf_class, hf_config, count, keys=("model", "modalities")):
    """The preset's parameter count equals transformers' model built on meta from the released config (and
    ``count``), and the preset holds what importing that config makes, value for value. Returns the model
    (on meta) and the resolved config."""
    import torch
    from omegaconf import OmegaConf

    from mimo_spec import build_model
    from mimo_spec.config import compose_config
    from mimo_spec.interop.hf_import import _convert

    with torch.device("meta"):
        theirs = sum(p.numel() for p in hf_class(hf_config).parameters())
    cfg = compose_config([f"preset={preset}"])
    ours = build_model(cfg, device="meta")
    assert sum(p.numel() for p in ours.parameters()) == theirs == count
    imported = _convert(hf_config, preset).cfg
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key in keys:
        assert subset_differences(imported.get(key) or {}, resolved[key], key) == []
    return ours, resolved, imported


def perturb(model, scale=0.05, louder=None, louder_scale=0.1, seed=1):
    """Add N(0, scale) noise to every parameter (norms at one and biases at zero would hide swapped tensors),
    and N(0, louder_scale) more to those whose name ``louder(name)`` picks (larger LM weights make greedy
    generation vary from token to token). Returns the model in eval mode."""
    import torch

    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
        if louder is not None:
            for n, p in model.named_parameters():
                if louder(n):
                    p.add_(torch.randn(p.shape, generator=g) * louder_scale)
    return model.eval()
