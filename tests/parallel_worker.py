"""Run by tests/test_parallel_run.py under torchrun: several layouts in one process group.

Usage: torchrun --nproc-per-node N tests/parallel_worker.py OUT_DIR SCENARIO[,SCENARIO...]
A scenario is ``<layout>`` (train 3 steps), ``fsdp_ac`` (fsdp with activation checkpointing), ``mixed:<layout>``
(3 steps on data where some rank's share of a batch has no image), ``resume:<from>:<layout>`` (one more step from
<from>'s checkpoint under <layout>) or ``fail`` (rank 1 raises mid-run).
"""

import os
import sys
from pathlib import Path

import torch

from mimo_spec.config import compose_config
from mimo_spec.train.loop import train

COMMON = ["train.steps=3", "train.batch_size=4", "train.eval_every=0", "train.eval_batches=1",
          "train.checkpoint.every=0", "train.log_every=100", "data.num_samples=64", "data.eval_samples=4",
          "model.params.num_layers=2"]


# 70% of the samples text-only: some rank's share of a batch holds no image (steps 1 and 2)
MIXED = ["data.text_only_fraction=0.7"]


def config(layout: str, extra=()):
    return compose_config([f"parallel={layout}", *COMMON, *extra])


def main() -> None:
    out, scenarios = Path(sys.argv[1]), sys.argv[2].split(",")
    torch.set_num_threads(1)
    for sc in scenarios:
        if sc == "fail":
            if int(os.environ["RANK"]) == 1:
                raise RuntimeError("rank 1 fails on purpose")
            train(config("ddp", ["train.steps=50"]), out / "fail")
        elif sc.startswith("resume:"):
            _, source, layout = sc.split(":")
            train(config(layout, ["train.steps=4", f"train.resume={out / source}"]), out / f"resume_{source}_{layout}")
        elif sc == "split2":  # images on rank 0, the language model on rank 1
            train(config("hetero_split", ["parallel.default.ranks.size=1", "parallel.modules.language.tp=1",
                                          "parallel.modules.language.ranks={offset: 1, size: 1}"]), out / sc)
        elif sc.startswith("mixed:"):  # ranks whose share has no image still run the encoder (on none)
            layout = sc.split(":")[1]
            train(config(layout, MIXED), out / f"mixed_{layout}")
        elif sc == "pp2_gpipe":  # the other pipeline schedule
            train(config("pp2", ["parallel.default.pp_schedule=gpipe"]), out / sc)
        elif sc == "fsdp_ac":  # activation checkpointing of every 2nd block, under FSDP
            train(config("fsdp", ["+parallel.default.activation_checkpoint={mode: every, every: 2}"]), out / sc)
        else:
            train(config(sc), out / sc)
        settle()
    from mimo_spec.parallel.env import shutdown_distributed

    shutdown_distributed()


def settle() -> None:
    """Between scenarios: every rank frees the last scenario's process groups at the same point."""
    import gc

    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
