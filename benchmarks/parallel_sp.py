"""Ulysses sequence parallelism: training step time on long packed multimodal rows under SP 2 (and DDP 2, for
reference) at 2 processes (gloo, CPU) against one process, with the share of the step spent
in the all-to-alls around attention, and tokens/s.

The model is the LLaVA-shaped one of parallel_step.py: a llama LM of hidden --hidden (default 256), 4 layers,
8 heads (4 kv heads), a CLIP tower (64 px images, 16 placeholders each); the global batch is --batch rows of
--seq tokens (default 2 x 2048) packed from synthetic samples with 0-2 images each (document ids keep the
samples apart). DDP gives each process one row; SP 2 gives each process every row's half. Each process gets
--threads threads.

    .venv/bin/python benchmarks/parallel_sp.py --layouts single,ddp,sp2 --steps 4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch import forwarded, launch_layouts  # noqa: E402

A2A_OPS = ("all_to_all", "alltoall")  # the profiler's names of the all-to-all ops (forward and backward)
WAIT_OPS = ("_c10d_functional::wait_tensor",)  # where a functional all-to-all blocks


def overrides(args) -> list[str]:
    h = args.hidden
    return [f"parallel={args.layout}", f"train.batch_size={args.batch}", "data.num_samples=64", "data.eval_samples=4",
            "model.params.vocab_size=4096", f"model.params.hidden_size={h}", "model.params.num_layers=4",
            "model.params.num_heads=8", "model.params.num_kv_heads=4", f"model.params.ffn_hidden_size={h * 11 // 4}",
            f"model.params.max_seq_len={max(2048, args.seq)}",
            "modalities.images.submodules.encoders.clip.params.hidden_size=128",
            "modalities.images.submodules.encoders.clip.params.num_layers=2",
            "modalities.images.submodules.encoders.clip.params.ffn_hidden_size=512",
            "modalities.images.submodules.encoders.clip.params.image_size=64"]


def packed_batch(model, rows: int, length: int) -> dict:
    """``rows`` packed rows of ``length`` tokens (tests/parallel_worker.py's synthetic packed samples)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from parallel_worker import pack_rows, packed_samples

    count = rows * length // 20
    batch, _ = pack_rows(packed_samples(model, 0, count), rows, length)
    return batch


def worker(args) -> None:
    import torch
    from omegaconf import OmegaConf

    from mimo_spec.builders import build_model
    from mimo_spec.config import compose_config
    from mimo_spec.parallel.layout import resolve, world_size_from_env
    from mimo_spec.train.optim import build_optimizer
    from mimo_spec.train.schema import validate_train_config
    from mimo_spec.train.step import clip_grads, forward_backward

    torch.set_num_threads(args.threads)
    cfg = compose_config(overrides(args))
    model = build_model(cfg, seed=0)
    world = world_size_from_env() or 1
    batch = packed_batch(model, args.batch, args.seq)
    drun = None
    if world > 1:
        from mimo_spec.parallel.env import init_distributed
        from mimo_spec.parallel.parallelize import ParallelContext

        plain = OmegaConf.to_container(cfg, resolve=True)
        layout = resolve(plain["parallel"], model, world, train=plain["train"])
        drun = ParallelContext(layout, init_distributed().rank)
        drun.parallelize(model)
    opt = build_optimizer(model, validate_train_config(cfg.train))
    total = int(batch["num_tokens"])
    losses = []

    def step():
        losses.append(forward_backward(model, batch, total, device="cpu", drun=drun))
        clip_grads(model, 1.0, drun)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(max(1, args.steps // 2)):
            step()
    profiled = time.perf_counter() - t0
    a2a_us = sum(e.self_cpu_time_total for e in prof.key_averages()
                 if any(k in e.key for k in A2A_OPS) or (args.layout.startswith("sp") and e.key in WAIT_OPS))
    first = losses[0] if drun is None else drun.all_sum(losses[0])
    if drun is None or drun.rank == 0:
        tokens = int(batch["attention_mask"].sum())
        print(json.dumps({"layout": args.layout, "step_s": statistics.median(times), "first_loss": first,
                          "a2a_share": a2a_us / 1e6 / profiled, "tokens_per_s": tokens / statistics.median(times)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", default="single,ddp,sp2")
    p.add_argument("--layout", help=argparse.SUPPRESS)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    args = p.parse_args()
    if args.layout:
        return worker(args)
    rows = launch_layouts(__file__, args.layouts, args.nproc, args.threads, forwarded(args))
    base = next((r["step_s"] for r in rows if r["layout"] == "single"), None)
    print(f"{args.batch} rows x {args.seq} tokens, packed, with images; hidden {args.hidden}, {args.threads} thread(s) "
          "per process")
    print(f"{'layout':<10} {'procs':>5} {'step ms':>9} {'vs single':>10} {'tokens/s':>9} {'all-to-all':>11} "
          f"{'first loss':>11}")
    for r in rows:
        rel = f"{r['step_s'] / base:.2f}x" if base else "-"
        print(f"{r['layout']:<10} {r['procs']:>5} {r['step_s'] * 1e3:>9.1f} {rel:>10} {r['tokens_per_s']:>9.0f} "
              f"{r['a2a_share'] * 100:>10.1f}% {r['first_loss']:>11.6f}")


if __name__ == "__main__":
    main()
