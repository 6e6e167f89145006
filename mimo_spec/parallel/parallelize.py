"""Apply a resolved layout to a built model, in torchtitan's order: TP, activation
checkpointing, compile, then FSDP2 (per block and per child module); and the per-step
pieces a data-parallel loop needs (local batch slice, gradient sync, global norm).

Gradients are *summed* over data-parallel ranks: every rank's loss is already
weighted by its share of the global token count, so the sum equals the
single-process gradient.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn

from mimo_spec.errors import ConfigError
from mimo_spec.parallel.layout import DEGREES, LANGUAGE, Layout, ModuleLayout


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks this rank holds (a pipeline stage drops the others to None)."""
    layers = getattr(module, "layers", None)
    return [b for b in layers if b is not None] if isinstance(layers, nn.ModuleList) else []


def _all_blocks(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``module`` and of every component inside it (a modality's encoders)."""
    return [b for sub in module.modules() for b in _blocks(sub)]


def _fsdp_units(module: nn.Module) -> list[nn.Module]:
    """What FSDP2 wraps, innermost first: every transformer block, every child with parameters (through
    ModuleList/ModuleDict containers), and ``module`` itself when it owns parameters directly.

    Children are wrapped one by one because models call some of them outside their parent's
    ``forward`` (``embed_tokens``, ``logits``, ``encode``), where a parent-level unshard would not run.
    """
    units: list[nn.Module] = []
    tied = _tied_children(module)

    def visit(parent: nn.Module) -> None:
        for child in parent.children():
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                visit(child)
            elif child not in tied and any(True for _ in child.parameters()):
                units.extend(b for b in _blocks(child) if b not in units)
                units.append(child)
    units.extend(_blocks(module))
    visit(module)
    if tied or any(True for _ in module.parameters(recurse=False)):
        units.append(module)
    return list(dict.fromkeys(units))


def _tied_children(module: nn.Module) -> set[nn.Module]:
    """Children whose weight the module also uses outside their forward: the token embedding of a
    language model whose head is tied to it (``GPT.logits`` multiplies by the embedding weight).
    FSDP keeps them in the module's own unit, unsharded by the methods that use them
    (:data:`TIED_METHODS`, registered with ``register_fsdp_forward_method``)."""
    emb = getattr(module, "token_embedding", None)
    return {emb} if getattr(module, "tie_embeddings", False) and emb is not None else set()


TIED_METHODS = ("embed_tokens", "logits")  # the methods of a tied language model that read the embedding


def _checkpointed(block: nn.Module, forward):
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def apply_activation_checkpointing(module: nn.Module, ac: dict) -> None:
    """Recompute blocks in backward: ``full`` = every block, ``every: n`` = every n-th. Names stay unchanged."""
    mode = ac.get("mode", "none")
    if mode == "none":
        return
    every = 1 if mode == "full" else int(ac["every"])
    for i, block in enumerate(_all_blocks(module)):
        if i % every == 0:
            block.forward = _checkpointed(block, block.forward)


def compile_blocks(module: nn.Module, backend: bool | str) -> None:
    """``torch.compile`` every transformer block (after TP and activation checkpointing, before FSDP):
    ``True`` with the default backend, a string with that backend, ``False`` not at all."""
    if backend is False:
        return
    kw = {"backend": backend} if isinstance(backend, str) else {}
    for block in _all_blocks(module):
        block.compile(**kw)


def apply_one_process(parallel: dict, model: nn.Module, train_cfg: dict | None = None) -> None:
    """A run in one process still takes its layout's per-module activation checkpointing and
    per-block compile; the degrees (which need more processes) are left out."""
    from mimo_spec.parallel.layout import resolve

    strip = set(DEGREES) | {"cp", "ranks", "microbatches", "pp_schedule"}

    def keep(node):
        return {k: v for k, v in node.items() if k not in strip} if isinstance(node, dict) else node

    plain = dict(parallel)
    plain["default"] = keep(parallel.get("default") or {})
    plain["modules"] = {name: keep(node) for name, node in (parallel.get("modules") or {}).items()}
    layout = resolve(plain, model, 1, train=train_cfg)
    for name, m in layout.modules.items():
        module = ParallelContext._module(model, name)
        if module is not None:
            apply_activation_checkpointing(module, m.activation_checkpoint)
            compile_blocks(module, m.compile)


def _dtype(name):
    return None if name is None else getattr(torch, name)


def check_executable(layout: Layout) -> None:
    """What this version can validate and draw but not run yet; raised before any process group starts."""
    from mimo_spec.errors import ProblemCollector

    problems = ProblemCollector()
    if not layout.colocated:
        from mimo_spec.parallel.split import check_split

        check_split(layout, None, problems)
    problems.raise_if_any()


class ParallelContext:
    """One rank's view of a running layout: meshes per module, and how to shard and sync."""

    def __init__(self, layout: Layout, rank: int):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from mimo_spec.parallel.env import device_type

        check_executable(layout)
        self.layout, self.rank = layout, rank
        self.world_size = dist.get_world_size()
        meshes: dict[tuple, Any] = {}
        self.meshes = {}
        for name, m in layout.modules.items():  # every rank builds every mesh (its groups are collective)
            key = (m.offset, m.size, m.shape)
            if key not in meshes:
                if m.size == self.world_size:
                    meshes[key] = init_device_mesh(device_type(), m.shape, mesh_dim_names=DEGREES)
                else:  # a split layout: this module's span only
                    from torch.distributed.device_mesh import DeviceMesh

                    ranks = torch.arange(m.offset, m.offset + m.size).view(m.shape)
                    meshes[key] = DeviceMesh(device_type(), ranks, mesh_dim_names=DEGREES)
            self.meshes[name] = meshes[key]
        lm = layout.modules[LANGUAGE]
        coords = lm.coords(rank) or {d: 0 for d in DEGREES}  # 0s on ranks that only encode (split)
        self.dp_size, self.pp = lm.dp, lm.pp
        self.split = None  # a SplitRunner when modules sit on different ranks
        self.pp_stage = coords["pp"]
        self.pipeline = None  # a PipelineRunner once start_pipeline() ran (pp > 1)
        self.dp_rank = coords["dp_replicate"] * lm.dp_shard + coords["dp_shard"]
        self.fused: dict[str, torch.Tensor] = {}
        self.bridges: dict[str, Any] = {}  # modalities whose data-parallel layout differs from the LM's

    # ---- building -----------------------------------------------------------------------
    def parallelize(self, model: nn.Module) -> nn.Module:
        """TP, activation checkpointing, compile and FSDP2 on every module, per its layout."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if self.pp > 1:  # this rank keeps only its stage; the other modules' parts are dropped
            from mimo_spec.parallel.pipeline import keep_stage

            keep_stage(model, self.pp_stage, self.pp)
        if not self.layout.colocated:  # this rank keeps only the modules whose span it is in
            from mimo_spec.parallel.split import SplitRunner, drop_unheld

            drop_unheld(model, self.layout, self.rank)
            self.split = SplitRunner(self, model)
        for name, m in self.layout.modules.items():
            if self.rank not in m.ranks:
                continue
            module, prefix = self._module(model, name), "language_model" if name == LANGUAGE else f"modalities.{name}"
            if module is None:
                continue
            mesh = self.meshes[name]
            if m.tp > 1 and m.tp_plan != "none":
                from mimo_spec.parallel.tp import apply_tp

                self.fused.update(apply_tp(module, mesh["tp"], prefix, loss_parallel=m.loss_parallel))
            apply_activation_checkpointing(module, m.activation_checkpoint)
            compile_blocks(module, m.compile)
            if m.dp_shard > 1:
                dp_mesh = mesh["dp_replicate", "dp_shard"] if m.dp_replicate > 1 else mesh["dp_shard"]
                mp = MixedPrecisionPolicy(param_dtype=_dtype(m.fsdp.get("param_dtype")),
                                          reduce_dtype=_dtype(m.fsdp.get("reduce_dtype")))
                kw = {"mesh": dp_mesh, "mp_policy": mp, "reshard_after_forward": m.fsdp.get("reshard_after_forward", True)}
                for unit in _fsdp_units(module):
                    fully_shard(unit, **kw)
                if _tied_children(module):
                    from torch.distributed.fsdp import register_fsdp_forward_method

                    for method in TIED_METHODS:
                        register_fsdp_forward_method(module, method)
                for sub in module.modules():
                    if hasattr(sub, "set_gradient_divide_factor"):
                        sub.set_gradient_divide_factor(1.0)  # a sum: losses carry the global token weight
                        sub.set_force_sum_reduction_for_comms(True)  # gloo has no pre-scaled sum
            if name != LANGUAGE and self.layout.colocated and self._needs_bridge(m):
                self._bridge(name, model.modalities[name], m)
        return model

    @staticmethod
    def _module(model: nn.Module, name: str) -> nn.Module | None:
        """The model part a layout entry places, or None when this rank does not hold it (a later pipeline stage)."""
        if name == LANGUAGE:
            return model.language_model
        return model.modalities[name] if name in model.modalities else None

    def start_pipeline(self, model: nn.Module, seq_len: int, pad_id: int) -> None:
        """Build this rank's pipeline stage and schedule (pp > 1); batches are padded to ``seq_len``."""
        from mimo_spec.parallel.env import device_type
        from mimo_spec.parallel.pipeline import PipelineRunner

        lm = self.layout.modules[LANGUAGE]
        device = torch.device(device_type(), torch.cuda.current_device()) if device_type() == "cuda" else torch.device("cpu")
        self.pipeline = PipelineRunner(model, self.pp_stage, self.pp, lm.microbatches, lm.pp_schedule,
                                       self.meshes[LANGUAGE]["pp"].get_group(), device, seq_len, pad_id)

    def _needs_bridge(self, m: ModuleLayout) -> bool:
        lm = self.layout.modules[LANGUAGE]
        return (m.dp_replicate, m.dp_shard) != (lm.dp_replicate, lm.dp_shard)

    def _dp_group(self, name: str, m: ModuleLayout):
        mesh = self.meshes[name]
        if m.dp_replicate > 1 and m.dp_shard > 1:
            return mesh["dp_replicate", "dp_shard"]._flatten().get_group()
        return mesh["dp_replicate" if m.dp_replicate > 1 else "dp_shard"].get_group()

    def _bridge(self, name: str, modality: nn.Module, m: ModuleLayout) -> None:
        import torch.distributed as dist

        from mimo_spec.parallel.bridge import ModalityBridge

        if getattr(modality, "has_output", False):
            raise ConfigError("an output modality must share the language model's data-parallel layout",
                              path=m.path, hint="give it the language model's dp_replicate / dp_shard")
        group = self._dp_group(name, m)
        lm = self.layout.modules[LANGUAGE]

        def lm_dp(rank):
            c = lm.coords(rank)
            return c["dp_replicate"] * lm.dp_shard + c["dp_shard"]
        consumers = sum(lm_dp(r) == self.dp_rank for r in dist.get_process_group_ranks(group))
        c = m.coords(self.rank)
        bridge = ModalityBridge(modality, group, c["dp_replicate"] * m.dp_shard + c["dp_shard"], consumers)
        modality.encode = bridge
        self.bridges[name] = bridge

    # ---- each step ----------------------------------------------------------------------
    def local_batch(self, batch: dict, model: nn.Module) -> dict:
        """This rank's data-parallel share of a collated global batch (samples [i*B/dp, (i+1)*B/dp))."""
        b = batch["input_ids"].shape[0]
        per = b // self.dp_size
        for name, bridge in self.bridges.items():
            items = (batch.get("modality_inputs") or {}).get(name)
            counts = (batch.get("items_per_sample") or {}).get(name, [0] * b)
            bridge.pending = None if items is None else (items, sum(counts[:self.dp_rank * per]),
                                                         sum(counts[:(self.dp_rank + 1) * per]))
        if self.dp_size == 1:
            return batch
        per = b // self.dp_size
        lo, hi = self.dp_rank * per, (self.dp_rank + 1) * per
        out = {k: batch[k][lo:hi] for k in ("input_ids", "labels", "attention_mask")}
        out["items_per_sample"], out["modality_inputs"] = {}, {}
        for name, counts in (batch.get("items_per_sample") or {}).items():
            start, stop = sum(counts[:lo]), sum(counts[:hi])
            out["items_per_sample"][name] = counts[lo:hi]
            if name in (batch.get("modality_inputs") or {}):
                out["modality_inputs"][name] = {enc: {kw: t[start:stop] for kw, t in kws.items()}
                                                for enc, kws in batch["modality_inputs"][name].items()}
        if batch.get("output_targets"):
            out["output_targets"] = {}
            for name, target in batch["output_targets"].items():
                mod = model.modalities[name]
                per_sample = ((batch["input_ids"] == mod.generation_token_id).sum(1)
                              // max(mod.num_generation_tokens, 1)).tolist()
                out["output_targets"][name] = target[sum(per_sample[:lo]):sum(per_sample[:hi])]
        out["num_tokens"] = int((out["labels"][:, 1:] != -100).sum())
        return out

    def sync_grads(self, model: nn.Module) -> None:
        """Sum gradients over data-parallel ranks for modules FSDP does not reduce (dp_shard == 1)."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        for name, m in self.layout.modules.items():
            module = self._module(model, name)
            if m.dp_shard > 1 or m.dp_replicate == 1 or module is None:
                continue
            grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                     for p in module.parameters() if p.grad is not None]
            if not grads:
                continue
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.meshes[name]["dp_replicate"].get_group())
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def all_sum(self, value: float) -> float:
        """Sum of a per-data-parallel-shard value. Each shard's value is held by its world/dp ranks, or
        under a pipeline by its last stage's ranks only (the others pass 0)."""
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        lm = self.layout.modules[LANGUAGE]
        return float(t) / (lm.size // self.dp_size // self.pp)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (e.g. a signal only some ranks received)."""
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> float:
        """Global gradient 2-norm over every module and shard (then clipped to ``max_norm``)."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads and self.pp == 1 and self.layout.colocated:
            return 0.0
        sq = torch.zeros((), dtype=torch.float64)
        for g in grads:
            n = torch.linalg.vector_norm(g.detach(), dtype=torch.float32)
            if isinstance(n, DTensor):
                n = n.full_tensor()
            sq += n.double() ** 2
        if self.pp > 1:  # every stage holds other parameters
            import torch.distributed as dist

            dist.all_reduce(sq, group=self.meshes[LANGUAGE]["pp"].get_group())
        elif not self.layout.colocated:  # every span holds other modules: each span's ranks add 1/size of its share
            import torch.distributed as dist

            span = next(m.size for m in self.layout.modules.values() if self.rank in m.ranks)
            sq /= span
            dist.all_reduce(sq)
        total = float(sq.sqrt())
        if max_norm and total > float(max_norm):
            coef = float(max_norm) / (total + 1e-6)
            for g in grads:
                g.mul_(coef)
        return total

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter as a full tensor in the single-process layout (collective: all ranks call it)."""
        from mimo_spec.parallel.tp import canonical

        return {k: canonical(k, v, self.fused) for k, v in model.state_dict().items()}


def start_parallel(parallel: dict, train_cfg: dict, model: nn.Module) -> ParallelContext | None:
    """Under torchrun/SLURM with more than one process: check the layout, start the process group and
    shard ``model``; None for one process. Every config problem is raised before any process group starts."""
    from mimo_spec.parallel.env import init_distributed
    from mimo_spec.parallel.layout import resolve, world_size_from_env

    world = world_size_from_env()
    if not world or world == 1:
        return None
    layout = resolve(parallel, model, world, train=train_cfg)
    check_executable(layout)
    env = init_distributed()
    run = ParallelContext(layout, env.rank)
    run.parallelize(model)
    return run
