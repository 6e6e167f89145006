"""Expert parallelism: training step time of a mixture-of-experts LM under EP 2 (and DDP, for reference) at 2
processes (gloo, CPU) against one process, with the share of the step spent in the experts' all-to-alls.

The model is the LLaVA-shaped one of parallel_step.py with an MoE LM: hidden --hidden (default 256), 4 layers,
--experts experts (default 8), top-2, each expert's FFN --expert-ffn (default 512), a shared expert; global
batch --batch on the synthetic data. Each process gets --threads threads.

    .venv/bin/python benchmarks/parallel_moe_ep.py --layouts single,ddp,ep2 --steps 6 --threads 1
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

A2A_OPS = ("all_to_all", "alltoall")  # the profiler's names of the all-to-all ops (dispatch, combine, backward)
WAIT_OPS = ("_c10d_functional::wait_tensor",)  # where a functional all-to-all blocks


def overrides(args) -> list[str]:
    h = args.hidden
    return [f"parallel={args.layout}", f"train.batch_size={args.batch}", "data.num_samples=256", "data.eval_samples=4",
            "model.params.vocab_size=4096", f"model.params.hidden_size={h}", "model.params.num_layers=4",
            "model.params.num_heads=8", "model.params.num_kv_heads=4", f"model.params.ffn_hidden_size={h * 11 // 4}",
            f"++model.params.num_experts={args.experts}", "++model.params.num_experts_per_tok=2",
            f"++model.params.moe_ffn_hidden_size={args.expert_ffn}",
            f"++model.params.shared_expert_ffn_hidden_size={args.expert_ffn}",
            "++model.params.router_aux_loss_weight=0.01",
            "modalities.images.submodules.encoders.clip.params.hidden_size=128",
            "modalities.images.submodules.encoders.clip.params.num_layers=2",
            "modalities.images.submodules.encoders.clip.params.ffn_hidden_size=512",
            "modalities.images.submodules.encoders.clip.params.image_size=64",
            "data.max_items_per_sample=1"]


def worker(args) -> None:
    import torch
    from omegaconf import OmegaConf

    from mimo_spec.builders import build_model
    from mimo_spec.config import compose_config
    from mimo_spec.data import build_dataset, collate
    from mimo_spec.data.tokenizer import build_tokenizer
    from mimo_spec.parallel.layout import resolve, world_size_from_env
    from mimo_spec.train.optim import build_optimizer
    from mimo_spec.train.schema import validate_train_config
    from mimo_spec.train.step import clip_grads, forward_backward

    torch.set_num_threads(args.threads)
    cfg = compose_config(overrides(args))
    model = build_model(cfg, seed=0)
    world = world_size_from_env() or 1
    tok = build_tokenizer(cfg.data, model)
    data = build_dataset(cfg.data, model, tok, "train")
    batch = collate([data[i] for i in range(args.batch)], tok.pad_id)
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

    def step():
        forward_backward(model, batch, total, device="cpu", drun=drun)
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
        for _ in range(args.steps):
            step()
    profiled = time.perf_counter() - t0
    a2a_us = sum(e.self_cpu_time_total for e in prof.key_averages()
                 if any(k in e.key for k in A2A_OPS) or (args.layout.startswith("ep") and e.key in WAIT_OPS))
    if drun is None or drun.rank == 0:
        tokens = int(batch["attention_mask"].sum())
        print(json.dumps({"layout": args.layout, "step_s": statistics.median(times),
                          "a2a_share": a2a_us / 1e6 / profiled, "tokens_per_s": tokens / statistics.median(times)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", default="single,ddp,ep2")
    p.add_argument("--layout", help=argparse.SUPPRESS)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-ffn", type=int, default=512)
    args = p.parse_args()
    if args.layout:
        return worker(args)
    rows = launch_layouts(__file__, args.layouts, args.nproc, args.threads, forwarded(args))
    base = next((r["step_s"] for r in rows if r["layout"] == "single"), None)
    print(f"{'layout':<10} {'procs':>5} {'step ms':>9} {'vs single':>10} {'tokens/s':>9} {'all-to-all':>11}")
    for r in rows:
        rel = f"{r['step_s'] / base:.2f}x" if base else "-"
        print(f"{r['layout']:<10} {r['procs']:>5} {r['step_s'] * 1e3:>9.1f} {rel:>10} {r['tokens_per_s']:>9.0f} "
              f"{r['a2a_share'] * 100:>10.1f}%")


if __name__ == "__main__":
    main()
