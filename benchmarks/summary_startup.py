"""`mimo-spec action=summary` on the largest preset vs `import torch` and vs Hugging Face.

Runs each command several times in fresh processes, side by side in one run,
and reports median wall time and peak RSS, plus the ratios the spine issue
targets: summary wall - import-torch wall (target < 0.5 s) and peak RSS
(target < 400 MB). The reference is Hugging Face's LLaVA-1.5-7B built on the
meta device (transformers must be installed).

    .venv/bin/python benchmarks/summary_startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HF_LLAVA = """
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
                  text_config=LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
                  image_token_index=32000, vision_feature_layer=-2)
with torch.device("meta"):
    model = LlavaForConditionalGeneration(cfg)
print(sum(p.numel() for p in model.parameters()))
"""


def measure(cmd: list[str], cwd: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face reference")
    args = ap.parse_args()
    py = sys.executable
    cases = {
        "import torch": [py, "-c", "import torch"],
        "mimo-spec summary (llama3_70b + image + audio)": [
            py, str(ROOT / "cli.py"), "action=summary", "model=llama3_70b",
            "modality=[vision_clip,audio_whisper]", "hydra.run.dir=.", "hydra.output_subdir=null"],
        "mimo-spec summary (vicuna_7b + image)": [
            py, str(ROOT / "cli.py"), "action=summary", "model=vicuna_7b", "hydra.run.dir=.",
            "hydra.output_subdir=null"],
    }
    if not args.no_hf:
        cases["HF LLaVA-1.5-7B on meta"] = [py, "-c", HF_LLAVA]
    # A user's second run reads cached bytecode; where PYTHONDONTWRITEBYTECODE is set (as on some CI
    # machines) every run would recompile the package from source, so compile it once up front.
    subprocess.run([py, "-m", "compileall", "-q", str(ROOT / "mimo_spec")], check=True)
    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # interleaved, so load changes hit all cases alike
            for name, cmd in cases.items():
                wall, rss = measure(cmd, tmp)
                results.setdefault(name, []).append((wall, rss))
    base = statistics.median(w for w, _ in results["import torch"])
    print(f"{'case':<48}{'wall s':>9}{'minus import torch':>20}{'peak RSS MB':>13}")
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        rss = max(r for _, r in runs)
        print(f"{name:<48}{wall:>9.2f}{wall - base:>20.2f}{rss:>13.0f}")
    ours = statistics.median(w for w, _ in results["mimo-spec summary (llama3_70b + image + audio)"])
    if "HF LLaVA-1.5-7B on meta" in results:
        hf = statistics.median(w for w, _ in results["HF LLaVA-1.5-7B on meta"])
        print(f"\nratio mimo-spec summary (70B) / HF LLaVA-7B meta build: {ours / hf:.2f}x wall")
    print(f"mimo-spec summary overhead over import torch: {ours - base:.2f} s (target < 0.5 s)")


if __name__ == "__main__":
    main()
