"""Run by tests/test_parallel_peft.py under torchrun: LoRA / DoRA adapters trained under several layouts in
one process group (each launch costs seconds on CPU).

Usage: torchrun --nproc-per-node 2 tests/peft_worker.py OUT_DIR SCENARIO[,SCENARIO...]
A scenario is ``<layout>`` (3 steps of tests/parallel_worker.py's config with ADAPTERS) or ``<layout>:packed_ac``
(the same with data.packing and activation checkpointing of every block), into OUT_DIR/<layout>[_packed_ac].
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from parallel_worker import SPLIT2, config, settle  # noqa: E402

# LoRA on attention (fused q/k/v: one adapter per part), DoRA on the MLP (fused gate/up), LoRA on the vision
# tower's attention, the projector trained in full; perturbed inits (lr high enough that B moves off zero)
ADAPTERS = ["adapters=[{modules: 'language_model.layers.*.attn.*', type: lora, rank: 4, alpha: 8},"
            "{modules: ['language_model.layers.*.mlp.fc1', 'language_model.layers.*.mlp.fc2'], type: dora, rank: 4},"
            "{modules: 'modalities.images.encoders.clip.layers.*.attn.qkv', type: lora, rank: 2}]",
            "trainable=['modalities.*.input_projections.*']", "train.lr=0.01"]
PACKED_AC = ["data.packing=true", "data.max_seq_len=160",
             "+parallel.default.activation_checkpoint={mode: every, every: 1}"]


# layouts beyond the shipped ones: name -> (layout, overrides); split2: the images on rank 0, the LM on rank 1
VARIANTS = {"split2": ("hetero_split", SPLIT2)}


def peft_config(layout: str, packed_ac: bool = False, extra=()):
    layout, more = VARIANTS.get(layout, (layout, []))
    return config(layout, [*ADAPTERS, *more, *(PACKED_AC if packed_ac else []), *extra])


def main() -> None:
    from mimo_spec.train.loop import train

    out, scenarios = Path(sys.argv[1]), sys.argv[2].split(",")
    torch.set_num_threads(1)
    for sc in scenarios:
        layout, _, variant = sc.partition(":")
        train(peft_config(layout, variant == "packed_ac"), out / sc.replace(":", "_"))
        settle()
    from mimo_spec.parallel.env import shutdown_distributed

    shutdown_distributed()


if __name__ == "__main__":
    main()
