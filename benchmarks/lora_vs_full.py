"""LoRA vs full fine-tuning of the LLaVA benchmark shape (benchmarks/train_step_vs_hf.py): peak memory,
step time and optimizer state, side by side in one run.

LoRA: rank 16 (alpha 32) on every attention (fused q/k/v: one adapter per part, and the output) and
MLP Linear of the LM and the vision tower, the rest frozen. Full: every parameter trains. Both AdamW,
fp32, the same batch (4 x 256 tokens, one 64x64 image each). Each variant runs in its own process
(peak memory: on the CPU the process's peak resident set through the first step, above what it held before
building the model, which also counts what the allocator keeps; ``torch.cuda.max_memory_allocated`` on a
GPU; and, on either, "held at peak": weights + gradients + optimizer state + the activations autograd
saves, counted tensor by tensor); the variants alternate, ``--rounds`` times each, and the
medians are reported. Optimizer state is counted exactly (bytes of every tensor in ``optimizer.state``).

    .venv/bin/python benchmarks/lora_vs_full.py --steps 6 --threads 2
    python benchmarks/lora_vs_full.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

LORA = [{"modules": ["language_model.layers.*.attn.*", "language_model.layers.*.mlp.*",
                     "modalities.images.encoders.clip.layers.*.attn.*",
                     "modalities.images.encoders.clip.layers.*.mlp.*"], "type": "lora", "rank": 16, "alpha": 32}]


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _rss() -> int:
    """Peak resident set of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_variant(variant: str, steps: int, warmup: int, device: str) -> dict:
    """One variant in this process: step times, peak memory above the start, optimizer state bytes."""
    from train_step_vs_hf import batch, ours

    from mimo_spec import peft

    from mimo_spec.registry import load_builtins

    load_builtins()  # every component's module imported before the baseline: only the run's own memory counts
    dev = torch.device(device)
    base_rss = _current_rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    model = ours(-2)
    if variant == "lora":
        peft.add_adapters(model, LORA)
    model = model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids, labels, px = (t.to(dev) for t in batch())
    times, saved = [], {}

    def pack(t):  # the activations autograd keeps for the backward (each storage once)
        if t.device.type != "meta":
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for i in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if i == 0 else _nothing():
            out = model(ids, {"images": {"clip": {"pixel_values": px}}}, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if i == 0:  # later steps' RSS also holds what the allocator kept from earlier steps
            first_rss = _rss() - base_rss
    opt_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if torch.is_tensor(t) and t.dim() > 0)
    peak = (torch.cuda.max_memory_allocated() - base_cuda) if dev.type == "cuda" else first_rss
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in params)
    held = weights + grads + opt_bytes + sum(v for k, v in saved.items() if k not in
                                             {p.untyped_storage().data_ptr() for p in model.parameters()})
    return {"variant": variant, "step_s": statistics.median(times), "peak_bytes": peak, "optimizer_bytes": opt_bytes,
            "held_bytes": held,
            "trainable": sum(p.numel() for p in params), "parameters": sum(p.numel() for p in model.parameters()),
            "loss": float(out.loss)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="processes per variant, alternating")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # a child process: run one variant
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.warmup, args.device)))
        return
    results: dict[str, list[dict]] = {"full": [], "lora": []}
    for _ in range(args.rounds):
        for variant in ("full", "lora"):
            cmd = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--threads", str(args.threads), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def med(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in results[variant])

    print(f"LLaVA benchmark shape, {args.device}, fp32, AdamW, {args.threads} threads, {args.steps} steps x "
          f"{args.rounds} processes per variant (medians)")
    peak_name = "peak (CUDA)" if args.device.startswith("cuda") else "peak (RSS)"
    print(f"{'':6}{'trainable':>12}{'step (ms)':>11}{peak_name:>14}{'held at peak':>15}{'optimizer state':>17}")
    for v in ("full", "lora"):
        r = results[v][0]
        print(f"{v:6}{r['trainable']:>12,}{med(v, 'step_s') * 1e3:>11.1f}{med(v, 'peak_bytes') / 2**20:>10.1f} MiB"
              f"{med(v, 'held_bytes') / 2**20:>11.1f} MiB{med(v, 'optimizer_bytes') / 2**20:>13.2f} MiB")
    print("held at peak: weights + gradients + optimizer state + the activations autograd saves (counted exactly)")
    print(f"lora / full: step time {med('lora', 'step_s') / med('full', 'step_s'):.2f}x, {peak_name} "
          f"{med('lora', 'peak_bytes') / med('full', 'peak_bytes'):.2f}x, held at peak "
          f"{med('lora', 'held_bytes') / med('full', 'held_bytes'):.2f}x, optimizer state "
          f"{med('lora', 'optimizer_bytes') / med('full', 'optimizer_bytes'):.4f}x "
          f"({med('full', 'optimizer_bytes') / med('lora', 'optimizer_bytes'):.0f}x smaller)")


if __name__ == "__main__":
    main()
