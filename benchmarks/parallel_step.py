"""Per-step training time of the shipped layouts at 2 processes (gloo, CPU) against one process,
with the share of the step spent in collectives.

The model is the LLaVA-shaped one of train_step_vs_hf.py, scaled by --hidden (default: Llama-style
LM hidden 512, 4 layers, 8 heads, 4 KV heads, FFN 1408, vocab 4096; CLIP-style ViT hidden 256, 4 layers)
on the synthetic data, global batch --batch. Each process gets --threads threads (the single-process
baseline gets the same per process, so the 2-process runs use twice the cores).

    .venv/bin/python benchmarks/parallel_step.py --layouts single,ddp,fsdp,tp2 --steps 8 --threads 1
    .venv/bin/python benchmarks/parallel_step.py --layouts single,pp2,hetero_split:4   # LAYOUT:PROCS
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
from launch import launch_layouts  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all",
               "broadcast", "barrier", "all_gather_single", "reduce_scatter_single",
               # point to point: pipeline stages and split layouts
               "send", "recv", "batch_isend_irecv")  # not isend/irecv: P2POp checks their identity
# functional collectives (DTensor / TP) block in wait_tensor, which the profiler records
WAIT_OPS = ("_c10d_functional::wait_tensor",)
COMM_S = [0.0]


class _TimedWork:
    """An async collective's handle whose wait() is timed."""

    def __init__(self, work):
        self._work = work

    def wait(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return self._work.wait(*a, **k)
        finally:
            COMM_S[0] += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._work, name)


def time_collectives() -> None:
    """Count the wall time this process spends blocked in torch.distributed collectives."""
    import functools

    import torch.distributed as dist

    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        @functools.wraps(fn)
        def timed(*a, _fn=fn, **k):
            t0 = time.perf_counter()
            try:
                out = _fn(*a, **k)
            finally:
                COMM_S[0] += time.perf_counter() - t0
            if isinstance(out, list):  # batch_isend_irecv
                return [_TimedWork(w) for w in out]
            return _TimedWork(out) if hasattr(out, "wait") else out
        setattr(dist, name, timed)


def overrides(args) -> list[str]:
    h = args.hidden
    return [f"parallel={args.layout}", f"train.batch_size={args.batch}", "data.num_samples=256", "data.eval_samples=4",
            "model.params.vocab_size=4096", f"model.params.hidden_size={h}", "model.params.num_layers=4",
            "model.params.num_heads=8", "model.params.num_kv_heads=4", f"model.params.ffn_hidden_size={h * 11 // 4}",
            "modalities.images.submodules.encoders.clip.params.hidden_size=256",
            "modalities.images.submodules.encoders.clip.params.num_layers=4",
            "modalities.images.submodules.encoders.clip.params.ffn_hidden_size=1024",
            "modalities.images.submodules.encoders.clip.params.image_size=64",
            "data.max_items_per_sample=1"]


def worker(args) -> None:
    import torch

    from mimo_spec.builders import build_model
    from mimo_spec.config import compose_config
    from mimo_spec.parallel.layout import resolve, world_size_from_env
    from mimo_spec.data import build_dataset, collate
    from mimo_spec.train.step import clip_grads, forward_backward
    from mimo_spec.train.optim import build_optimizer
    from mimo_spec.train.schema import validate_train_config
    from mimo_spec.data.tokenizer import build_tokenizer

    torch.set_num_threads(args.threads)
    time_collectives()
    cfg = compose_config(overrides(args))
    model = build_model(cfg, seed=0)
    world = world_size_from_env() or 1
    drun = None
    if world > 1:
        from mimo_spec.parallel.parallelize import ParallelContext
        from mimo_spec.parallel.env import init_distributed

        layout = resolve(_plain(cfg.parallel), model, world, train=_plain(cfg.train))
    tok = build_tokenizer(cfg.data, model)  # the data follows the whole model: built before stages drop parts
    data = build_dataset(cfg.data, model, tok, "train")
    batch = collate([data[i] for i in range(args.batch)], tok.pad_id)
    if world > 1:
        drun = ParallelContext(layout, init_distributed().rank)
        drun.parallelize(model)
        if drun.pp > 1:
            drun.start_pipeline(model, int(batch["input_ids"].shape[1]), tok.pad_id)
    opt = build_optimizer(model, validate_train_config(cfg.train))
    total = int(batch["num_tokens"])

    def step():  # the training loop's micro-batch step and gradient clipping, for whatever layout
        forward_backward(model, batch, total, device="cpu", drun=drun)
        clip_grads(model, 1.0, drun)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    for _ in range(args.steps):  # step times without the profiler
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    from torch.profiler import ProfilerActivity, profile

    COMM_S[0] = 0.0
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # only for the functional collectives' waits
        for _ in range(args.steps):
            step()
    profiled = time.perf_counter() - t0
    comm_us = COMM_S[0] * 1e6 + sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in WAIT_OPS)
    if drun is None or drun.rank == 0:
        print(json.dumps({"layout": args.layout, "step_s": statistics.median(times),
                          "comm_share": comm_us / 1e6 / profiled, "tokens": int(batch["attention_mask"].sum())}))


def _plain(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", default="single,ddp,fsdp,tp2,pp2")
    p.add_argument("--layout", help=argparse.SUPPRESS)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    args = p.parse_args()
    if args.layout:
        return worker(args)
    rows = launch_layouts(__file__, args.layouts, args.nproc, args.threads,
                          ["--steps", str(args.steps), "--threads", str(args.threads), "--batch", str(args.batch),
                           "--hidden", str(args.hidden)])
    base = next((r["step_s"] for r in rows if r["layout"] == "single"), None)
    print(f"{'layout':<14} {'procs':>5} {'step ms':>9} {'vs single':>10} {'comm share':>11}")
    for r in rows:
        rel = f"{r['step_s'] / base:.2f}x" if base else "-"
        print(f"{r['layout']:<14} {r['procs']:>5} {r['step_s'] * 1e3:>9.1f} {rel:>10} {r['comm_share'] * 100:>10.1f}%")


if __name__ == "__main__":
    main()
