"""Timing shared by the side-by-side benchmarks: steps run alternately (who goes first alternates too),
wall and process-CPU seconds per step, and the peak memory one step holds."""

from __future__ import annotations

import ctypes
import time
from pathlib import Path
from typing import Callable

import torch


def alternate(steps: dict[str, Callable[[], object]], warmup: int, repeats: int,
              sync: Callable[[], None] = lambda: None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run each of ``steps`` ``warmup + repeats`` times, interleaved (the order flips every round, so neither
    side always runs on a warm cache); returns ({name: wall seconds}, {name: process CPU seconds}) of the
    timed rounds. Process CPU time is less sensitive to other processes on shared cores."""
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    order = list(steps.items())
    for i in range(warmup + repeats):
        for name, fn in order if i % 2 == 0 else order[::-1]:
            sync()
            t, c = time.perf_counter(), time.process_time()
            fn()
            sync()
            if i >= warmup:
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    return wall, cpu


def _status(field: str) -> int:
    """A /proc/self/status size in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_step_memory(step, device: torch.device) -> int | None:
    """Bytes the step's peak holds above what was resident before it (None where it cannot be measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap memory back to the OS, so the next step's shows
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set to the current one
        base = _status("VmRSS")
    except (OSError, KeyError):
        return None
    step()
    return _status("VmHWM") - base


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:8.1f} MiB"


def adamw(params, lr: float = 1e-4, fused: bool = True) -> torch.optim.Optimizer:
    """The optimizer both sides of a training-step benchmark use: torch's fused AdamW kernel, which is what
    mimo-spec's trainer builds (``train/optim.py``) and transformers' Trainer uses by default
    (``optim="adamw_torch_fused"``); ``fused=False`` (``--optimizer loop``) gives torch's per-tensor loop, which
    the earlier figures were measured with."""
    return torch.optim.AdamW(params, lr=lr, fused=True if fused else None)


def host_speed() -> str:
    """How fast the machine runs right now, to read a ratio against: a 1024^2 fp32 GEMM and 32 MiB written
    into freshly allocated memory (a new buffer each time, so the page faults count: on some VMs they cost
    ~10 us each in slow phases, and a ratio measured then mostly measures who allocates more)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x = torch.randn(8 * 2**20)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    gemm = (time.perf_counter() - t) / 5
    t = time.perf_counter()
    for _ in range(5):
        x.mul(2.0)
    fresh = (time.perf_counter() - t) / 5
    return f"host: 1024^2 GEMM {2 * 1024**3 / gemm / 1e9:.0f} GFLOP/s, fresh 32 MiB written at {x.nbytes / fresh / 1e9:.1f} GB/s"


# where a step's time goes, by the self time of torch's ops: work both sides of a comparison run alike
# (the same products and attention on the same shapes, the same fused AdamW) against everything else
SHARED_WORK = {
    "GEMM": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm",
             "aten::mkldnn_convolution", "aten::convolution_backward", "aten::linear", "aten::matmul"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                  "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_backward",
                  "aten::_scaled_dot_product_efficient_attention",
                  "aten::_scaled_dot_product_efficient_attention_backward",
                  "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_cudnn_attention_backward"),
    "optimizer": ("aten::_fused_adamw_",),
}


def breakdown(steps: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, dict[str, float]]:
    """Per step (CPU self time, seconds) of each of ``steps``, profiled ``repeats`` times after one warm-up:
    {name: {"GEMM", "attention", "optimizer", "other", "total"}}. On the CPU the shared kinds are what both
    sides of a comparison run on the same shapes, so ``(GEMM + attention + optimizer of ours) / total of theirs``
    is the lowest ratio ours could reach by cutting everything else."""
    from torch.profiler import ProfilerActivity, profile

    kind_of = {op: kind for kind, ops in SHARED_WORK.items() for op in ops}
    out = {}
    for name, fn in steps.items():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                fn()
        parts = dict.fromkeys((*SHARED_WORK, "other", "total"), 0.0)
        for e in prof.key_averages():
            t = e.self_cpu_time_total / 1e6 / repeats
            parts[kind_of.get(e.key, "other")] += t
            parts["total"] += t
        out[name] = parts
    return out


def print_breakdown(parts: dict[str, dict[str, float]], ours: str = "mimo-spec") -> None:
    """A table of ``breakdown``'s figures in ms/step, and for each other side the ratio's floor: ours' shared
    work over their total (no change to what ours runs besides could bring the ratio below it)."""
    cols = (*SHARED_WORK, "other", "total")
    print(f"\nwhere the step's time goes (profiled CPU self time, ms/step):\n{'':16s}" + "".join(f"{c:>11s}" for c in cols))
    for name, p in parts.items():
        print(f"{name:16s}" + "".join(f"{p[c] * 1000:11.1f}" for c in cols))
    shared = sum(parts[ours][k] for k in SHARED_WORK)
    for name, p in parts.items():
        if name != ours:
            print(f"  ours / {name}: {parts[ours]['total'] / p['total']:.2f}x profiled; floor with no 'other' "
                  f"time at all {shared / p['total']:.2f}x; 'other' alone {parts[ours]['other'] / p['other']:.2f}x")


def print_device_profile(steps: dict[str, Callable[[], object]], repeats: int = 3, rows: int = 14) -> None:
    """On a GPU: for each of ``steps``, the ops that take the most device time (profiled ``repeats`` steps after
    one warm-up; self time per step) and the step's total kernel time, to read two sides' steps against."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for name, fn in steps.items():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                fn()
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
        ops = sorted((e for e in events if e.device_type == DeviceType.CPU and e.self_device_time_total > 0),
                     key=lambda e: -e.self_device_time_total)
        print(f"\n{name}: kernels {kernels / 1000 / repeats:.1f} ms/step; ops by device self time (ms/step, calls/step):")
        for e in ops[:rows]:
            print(f"  {e.self_device_time_total / 1000 / repeats:8.2f}  {e.count / repeats:6.0f}  {e.key}")
