"""Throughput of the training job: tokens/s and peak memory of the default job and of the
LLaVA-shaped benchmark model, and the time one checkpoint save adds to a step.

    .venv/bin/python benchmarks/train_job.py --steps 40
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LLAVA_SHAPED = [  # the shapes of benchmarks/train_step_vs_hf.py, trained on the synthetic data
    "model.params.vocab_size=4096", "model.params.hidden_size=512", "model.params.num_layers=4",
    "model.params.num_heads=8", "model.params.num_kv_heads=4", "model.params.ffn_hidden_size=1408",
    "model.params.max_seq_len=1024",
    "modalities.images.submodules.encoders.clip.params.image_size=64",
    "modalities.images.submodules.encoders.clip.params.patch_size=8",
    "modalities.images.submodules.encoders.clip.params.hidden_size=256",
    "modalities.images.submodules.encoders.clip.params.num_layers=4",
    "modalities.images.submodules.encoders.clip.params.ffn_hidden_size=1024",
    "train.batch_size=4",
]

CHILD = """
import json, resource, sys, time
from pathlib import Path
from mimo_spec.config import compose_config
from mimo_spec.train.loop import train
out = Path(sys.argv[1]); overrides = json.loads(sys.argv[2])
result = train(compose_config(overrides), out)
result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(result))
"""


def run(overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, tmp, json.dumps(overrides)], capture_output=True,
                             text=True, cwd=ROOT, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    base = [f"train.steps={args.steps}", "train.eval_every=0", "train.log_every=100000"]
    print(f"{'case':<44}{'tokens/s':>10}{'s/step':>9}{'peak RSS MB':>13}")
    for name, extra in (("default job (tiny VLM)", []), ("LLaVA-shaped benchmark model", LLAVA_SHAPED)):
        no_ckpt = run(base + extra + ["train.checkpoint.every=0", "train.checkpoint.keep_last=1"])
        every = run(base + extra + ["train.checkpoint.every=1", "train.checkpoint.keep_last=1"])
        step_s = no_ckpt["wall_time_s"] / args.steps
        print(f"{name:<44}{no_ckpt['tokens_per_s']:>10.0f}{step_s:>9.3f}{no_ckpt['peak_rss_mb']:>13.0f}")
        added = (every["wall_time_s"] - no_ckpt["wall_time_s"]) / args.steps
        print(f"{'  + a checkpoint save every step':<44}{'':>10}{added:>+9.3f}  "
              f"({added / step_s:+.0%} of a step)")


if __name__ == "__main__":
    main()
