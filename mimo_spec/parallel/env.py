"""Process-group start-up from the launcher's environment: torchrun, else SLURM (submitit).

``init_distributed()`` is the one place a process group starts: gloo on CPU,
nccl on CUDA. Under SLURM with no torchrun variables, rank, world size and the
rendezvous address come from SLURM's own variables, so a job launched by
submitit needs no wrapper script.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[003-005,007],cpu1`` -> ``gpu003``; text after the brackets is
    part of each name: ``n[1,3-4]-ib`` -> ``n1-ib``."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\]([^,\[]*))?", nodelist.strip())
    if head is None:
        return nodelist
    prefix, ranges, suffix = head.group(1), head.group(3), head.group(4) or ""
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def read_env(environ: dict | None = None) -> DistEnv | None:
    """The launcher's view of this process, or None when not launched by torchrun or SLURM.

    The one place mimo-spec reads rank and world size from the environment: everything else asks
    this function (or :func:`init_distributed`, or the process group once it runs)."""
    env = os.environ if environ is None else environ
    if str(env.get("WORLD_SIZE", "")).isdigit():  # torchrun (a WORLD_SIZE alone: rank 0 of it)
        return DistEnv(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and str(env.get("SLURM_NTASKS", "")).isdigit():
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = first_slurm_host(nodelist) if nodelist else env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")
        port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR", addr), port)
    return None


def init_distributed(timeout_s: float = 300.0) -> DistEnv:
    """Start the default process group (once) from torchrun's or SLURM's environment.

    Returns this process's DistEnv; a process not launched by either is a world of one
    (no process group is started).
    """
    import torch
    import torch.distributed as dist

    env = read_env()
    if env is None or env.world_size == 1 and not dist.is_initialized():
        return env or DistEnv(0, 1, 0, "127.0.0.1", 0)
    if dist.is_initialized():
        return env
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=env.rank,
                            world_size=env.world_size, timeout=timedelta(seconds=timeout_s))
    return env


def run_device(requested: str | None = None):
    """The device a job builds and runs its model on: ``requested`` (``train.device``) when set, else
    this process's GPU (the launcher's local rank, made current) where CUDA is available, else the CPU."""
    import torch

    if requested:
        from mimo_spec.train.schema import check_device

        check_device(requested)  # a clean error naming train.device for tpu0, meta, cuda without a GPU
        return torch.device(requested)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    env = read_env()
    index = env.local_rank % torch.cuda.device_count() if env is not None else torch.cuda.current_device()
    torch.cuda.set_device(index)  # before the model is built: each rank's weights on its own GPU
    return torch.device("cuda", index)


def device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def p2p(op: str, tensor, peer: int, group=None) -> None:
    """One blocking point-to-point transfer (``op`` "send" or "recv", ``peer`` a global rank), issued
    through ``batch_isend_irecv`` as torch.distributed.pipelining does: plain blocking send/recv on
    gloo was seen to abort a later collective ("terminate called without an active exception")."""
    import torch.distributed as dist

    fn = dist.isend if op == "send" else dist.irecv
    for work in dist.batch_isend_irecv([dist.P2POp(fn, tensor, peer, group)]):
        work.wait()


def shutdown_distributed() -> None:
    """End the process group in step on every rank (a barrier, then destroy): left to interpreter exit,
    gloo's groups are torn down at different moments on different ranks and a rank can abort
    ("terminate called without an active exception")."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
