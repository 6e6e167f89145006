"""Run by tests/test_parallel_tp.py under torchrun: vocab-parallel loss, tied embeddings under TP and
generation under parallel layouts, all in one process group (each launch costs seconds on CPU).

Usage: torchrun --nproc-per-node 2 tests/tp_worker.py OUT_DIR SCENARIO[,SCENARIO...]
Scenarios:
  loss:<layout>[:tied][:gather]  one forward/backward of a batch with ignored labels, a loss mask and
                                 packed documents, against an unsharded copy on the same rank; writes
                                 loss_<...>.json (losses, gradient and logits differences, collectives)
  train:<layout>[:tied][:qknorm] train 3 steps (tests/parallel_worker.py's config) into OUT_DIR/train_<...>
  resume:<run>:<layout>[:tied]   one more step (4 in all) from OUT_DIR/<run>'s checkpoint,
                                 into OUT_DIR/resume_<run>_<layout>
  generate:<layout>:<run>        action=generate from OUT_DIR/<run>'s checkpoint,
                                 into OUT_DIR/gen_<layout>_<run>/rank<r>
  plugin                         a plugin's own module class (and a subclass) with a registered TP plan,
                                 sharded over 2 ranks against an unsharded copy; writes plugin.json
  qv_attention                   GQA attention with q and v biases only (qkv_bias "qv", Whisper's), and one with
                                 per-head q/k LayerNorms (Chameleon's), sharded over 2 ranks against an
                                 unsharded copy; writes qv_attention.json
"""

import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from parallel_worker import config  # noqa: E402

TIED = "model.params.tie_embeddings=true"
QK_NORM = "++model.params.qk_norm=true"  # Qwen3's per-head q/k RMSNorms: one weight shared by all heads


def packed_batch(model) -> dict:
    """A batch that exercises every weighting of causal_lm_loss: ignored labels (-100 at the
    placeholders and a few more), a loss mask, and two packed documents per row."""
    batch = model.example_inputs(batch_size=4, text_tokens=12, seed=1)
    b, s = batch["input_ids"].shape
    batch["labels"][:, -2:] = -100
    batch["loss_mask"] = (torch.arange(s) % 5 != 0).long().expand(b, s).clone()
    batch["document_ids"] = (torch.arange(s) >= s // 2).long().expand(b, s).clone()
    return batch


class Collectives:
    """Records every collective issued while active (kind -> [element counts]), DTensor's included:
    DTensor ops are let through (NotImplemented) so the collectives they lower to are seen."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        seen: dict[str, list[int]] = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                from torch.distributed.tensor import DTensor

                if isinstance(func, torch._ops.HigherOrderOperator):
                    return func(*args, **(kwargs or {}))
                if any(t is DTensor for t in types):
                    return NotImplemented
                out = func(*args, **(kwargs or {}))
                if "c10d" in func.namespace and isinstance(out, torch.Tensor):
                    seen.setdefault(func._opname, []).append(out.numel())
                return out

        self.seen, self.mode = seen, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    def largest(self, kind: str) -> int:
        return max((n for op, sizes in self.seen.items() if kind in op for n in sizes), default=0)

    def count(self, kind: str) -> int:
        return sum(len(sizes) for op, sizes in self.seen.items() if kind in op)


def run_loss(out: Path, layout: str, flags: list[str]) -> None:
    """Sharded forward/backward vs. the same model unsharded on this rank: losses, every parameter's
    gradient, the gathered logits, and which collectives the sharded step issued."""
    from mimo_spec.builders import build_model
    from mimo_spec.parallel.parallelize import start_parallel
    from mimo_spec.parallel.tp import full_logits, is_vocab_sharded

    extra = [TIED] if "tied" in flags else []
    extra += ["+parallel.default.loss_parallel=false"] if "gather" in flags else []
    cfg = config(layout, extra)
    model = build_model(cfg, seed=0)
    ref = copy.deepcopy(model)
    batch = packed_batch(model)
    ref_out = ref(**batch)
    ref_out.loss.backward()
    drun = start_parallel(dict(cfg.parallel), {"batch_size": 4}, model)
    with Collectives() as comm, drun.train_context():  # forward and backward in the step's (loss-parallel) context
        got = model(**batch)
        held = got.logits  # what the model returns: vocab-sharded under loss_parallel
        got.loss.backward()
    logits = full_logits(got.logits)
    result = {"loss": float(got.loss), "ref_loss": float(ref_out.loss),
              "grad_rel_diff": grad_difference(model, ref, drun.fused),
              "logits_diff": float((logits - ref_out.logits).abs().max()), "logits_shape": list(logits.shape),
              "vocab_sharded": is_vocab_sharded(held), "vocab": model.language_model.vocab_size,
              "local_vocab": (held.to_local() if is_vocab_sharded(held) else held).shape[-1],
              "all_gathers": comm.count("all_gather"), "largest_all_gather": comm.largest("all_gather"),
              "largest_all_reduce": comm.largest("all_reduce"),
              "collectives": {k: len(v) for k, v in comm.seen.items()}}
    if drun.rank == 0:
        (out / ("loss_" + "_".join([layout, *flags]) + ".json")).write_text(json.dumps(result, indent=1))


def grad_difference(model, ref, fused: dict) -> float:
    """The largest gradient difference of any parameter, relative to that gradient's scale, with the
    sharded model's gradients gathered into the single-process layout."""
    from mimo_spec.parallel.tp import canonical

    grads = {k: p.grad for k, p in model.named_parameters()}
    worst = 0.0
    for k, p in ref.named_parameters():
        diff = (canonical(k, grads[k], fused) - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-12)
        worst = max(worst, float(diff))
    return worst


def run_plugin(out: Path) -> None:
    """A module class mimo-spec does not ship, given a TP plan through the registry, gets sharded by
    apply_tp; its subclass takes the same plan. Output and gradients against an unsharded copy."""
    import torch.nn as nn
    from torch.distributed.device_mesh import init_device_mesh

    from mimo_spec.parallel.env import init_distributed
    from mimo_spec.parallel.plans import register_tp_plan, tp_plan_for
    from mimo_spec.parallel.tp import apply_tp, canonical

    class PluginFFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    class Deeper(PluginFFN):
        pass

    register_tp_plan(PluginFFN, {"up": "colwise", "down": "rowwise"})
    env = init_distributed()
    torch.manual_seed(0)
    model = nn.Sequential(PluginFFN(), Deeper())
    ref = copy.deepcopy(model)
    x = torch.randn(3, 8)
    ref(x).sum().backward()
    apply_tp(model, init_device_mesh("cpu", (2,)), "")
    y = model(x)
    y.sum().backward()
    grads = {k: canonical(k, p.grad, {}) for k, p in model.named_parameters()}
    result = {"subclass_plan": tp_plan_for(model[1]) is tp_plan_for(model[0]),
              "placements": {k: str(p.placements) for k, p in model.named_parameters()},
              "local_rows": {k: p.to_local().shape[0] for k, p in model.named_parameters()},
              "out_diff": float((y - ref(x)).abs().max()),
              "grad_diff": max(float((grads[k] - p.grad).abs().max()) for k, p in ref.named_parameters())}
    if env.rank == 0:
        (out / "plugin.json").write_text(json.dumps(result, indent=1))


def run_qv_attention(out: Path) -> None:
    """Attention(qkv_bias="qv"): its own q_bias / v_bias are sharded with their heads (TPPlan.sharded), the
    bias-free qkv part by part. Output and gradients against an unsharded copy."""
    import torch.nn as nn
    from torch.distributed.device_mesh import init_device_mesh

    from mimo_spec.components.layers import Attention
    from mimo_spec.parallel.env import init_distributed
    from mimo_spec.parallel.tp import apply_tp, canonical

    env = init_distributed()
    torch.manual_seed(0)
    from mimo_spec.components.layers import RotaryEmbedding

    class Roped(nn.Module):  # RoPE after the q/k norms: else softmax ignores the key bias (its gradient is 0)
        def __init__(self, attn):
            super().__init__()
            self.attn, self.rope = attn, RotaryEmbedding(8)

        def forward(self, x):
            return self.attn(x, rope=self.rope(torch.arange(x.shape[1])[None], x.dtype))

    model = nn.Sequential(Attention(32, 4, 2, qkv_bias="qv", out_bias=True), Attention(32, 4, 2, qkv_bias="qv"),
                          Roped(Attention(32, 4, 2, qk_norm=1e-5, qk_norm_kind="layernorm_per_head")))  # Chameleon's
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.2)  # the q / v biases no longer zero
    ref = copy.deepcopy(model)
    x = torch.randn(2, 5, 32)
    (ref(x) ** 2).sum().backward()
    fused = apply_tp(model, init_device_mesh("cpu", (2,)), "")
    y = model(x)
    (y ** 2).sum().backward()
    grads = {k: canonical(k, p.grad, fused) for k, p in model.named_parameters()}
    result = {"placements": {k: str(p.placements) for k, p in model.named_parameters()},
              "local_rows": {k: p.to_local().shape[0] for k, p in model.named_parameters()},
              "out_diff": float((y - ref(x)).detach().abs().max() / y.detach().abs().max()),
              "grad_diff": max(float((grads[k] - p.grad).abs().max() / p.grad.abs().max())
                               for k, p in ref.named_parameters())}
    if env.rank == 0:
        (out / "qv_attention.json").write_text(json.dumps(result, indent=1))


def run_train(out: Path, layout: str, flags: list[str]) -> None:
    from mimo_spec.train.loop import train

    extra = ([TIED] if "tied" in flags else []) + ([QK_NORM] if "qknorm" in flags else [])
    train(config(layout, extra), out / ("train_" + "_".join([layout, *flags])))


def run_resume(out: Path, source: str, layout: str, flags: list[str]) -> None:
    from mimo_spec.train.loop import train

    extra = ([TIED] if "tied" in flags else []) + ["train.steps=4", f"train.resume={out / source}"]
    train(config(layout, extra), out / f"resume_{source}_{layout}")


def run_generate(out: Path, layout: str, source: str) -> None:
    """``action=generate`` as the CLI runs it (jobs.run_generate), every rank given its own output folder
    so the test sees which ranks wrote files."""
    from mimo_spec.config import compose_config
    from mimo_spec.jobs import run_generate

    rank = int(os.environ["RANK"])
    cfg = compose_config([f"parallel={layout}", "action=generate", f"generate.checkpoint={out / source}",
                          "generate.max_new_tokens=12", "generate.prompt=Describe the shape."])
    target = out / f"gen_{layout}_{source}" / f"rank{rank}"
    target.mkdir(parents=True, exist_ok=True)
    run_generate(cfg, target)


def main() -> None:
    out, scenarios = Path(sys.argv[1]), sys.argv[2].split(",")
    torch.set_num_threads(1)
    for sc in scenarios:
        kind, *args = sc.split(":")
        if kind == "loss":
            run_loss(out, args[0], args[1:])
        elif kind == "train":
            run_train(out, args[0], args[1:])
        elif kind == "resume":
            run_resume(out, args[0], args[1], args[2:])
        elif kind == "generate":
            run_generate(out, args[0], args[1])
        elif kind == "plugin":
            run_plugin(out)
        elif kind == "qv_attention":
            run_qv_attention(out)
        else:
            raise ValueError(f"unknown scenario {sc!r}")
        settle()
    from mimo_spec.parallel.env import shutdown_distributed

    shutdown_distributed()


def settle() -> None:
    """Between scenarios: every rank frees the last scenario's meshes and process groups at the same
    point (a rank collecting a group while the other still talks on it aborted gloo mid-run)."""
    import gc

    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
