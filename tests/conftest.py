import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

torch = pytest.importorskip("torch")
# under pytest-xdist each of the two workers gets one core
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def run_cli(args, cwd, env=None, timeout=120):
    """Run `python cli.py ARGS` in ``cwd``; returns the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


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
