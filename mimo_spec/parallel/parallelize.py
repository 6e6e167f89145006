"""Apply a resolved layout to a built model, in torchtitan's order: TP (plans from
:mod:`mimo_spec.parallel.plans`), activation checkpointing (torch's composable ``checkpoint``),
compile, then FSDP2 (per block and per child module); and the per-step pieces a data-parallel
loop needs (the step's train context, local batch slice, bridged embeddings, the gradient sum of
replicated-only modules, global gradient norm).

One world mesh (``ParallelContext.world_mesh``) owns the ranks: every module spanning the world
takes its (pp, dp_replicate, dp_shard, tp) mesh by unflattening it; a split layout's span, a rank
range, gets a mesh of its own.

Gradients are *summed* over data-parallel ranks (FSDP2 with a divide factor of 1; replicated-only
modules by :meth:`ParallelContext.sync_grads`, once per step):
every rank's loss is already weighted by its share of the global token count, so the sum equals
the single-process gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from mimo_spec.errors import ConfigError
from mimo_spec.loss import token_weights
from mimo_spec.models.items import slice_modality_items
from mimo_spec.parallel.layout import DEGREES, LANGUAGE, Layout, ModuleLayout

# the (B, S) tensors of a collated batch, sliced by rows into data-parallel shares
ROW_KEYS = ("input_ids", "labels", "attention_mask", "document_ids", "loss_mask")


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


def apply_activation_checkpointing(module: nn.Module, ac: dict) -> None:
    """Recompute blocks in backward: ``full`` = every block, ``every: n`` = every n-th.

    torch's composable ``checkpoint`` (``torch.distributed._composable``, the hook-based form of
    ``checkpoint_wrapper``) on each chosen block: parameter and state-dict names stay those of the
    single-process model (a wrapper module would add ``_checkpoint_wrapped_module.`` to every name
    the optimizer groups, checkpoints and TP plans see), and it composes with FSDP2 and compile.
    """
    from torch.distributed._composable import checkpoint

    mode = ac.get("mode", "none")
    if mode == "none":
        return
    every = 1 if mode == "full" else int(ac["every"])
    for i, block in enumerate(_all_blocks(module)):
        if i % every == 0:
            checkpoint(block)


def is_checkpointed(block: nn.Module) -> bool:
    """True when :func:`apply_activation_checkpointing` made ``block`` recompute its activations in backward."""
    from torch.distributed._composable import checkpoint

    return checkpoint.state(block) is not None


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

    strip = set(DEGREES) | {"ep", "sp", "cp", "ranks", "microbatches", "pp_schedule"}

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


def grad_groups(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """``params`` (with gradients) grouped by their gradients' layout: plain tensors, then DTensors by mesh
    and placements (torch's foreach norms and scaling take one layout at a time); the order is the
    parameters', the same on every rank of a mesh."""
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        g = p.grad
        key = (id(g.device_mesh), tuple(g.placements)) if hasattr(g, "placements") else (None, ())
        groups.setdefault(key, []).append(p)
    return list(groups.values())


def check_executable(layout: Layout) -> None:
    """What this version can validate and draw but not run yet; raised before any process group starts."""
    from mimo_spec.errors import ProblemCollector

    problems = ProblemCollector()
    if not layout.colocated:
        from mimo_spec.parallel.checks import check_split

        check_split(layout, None, problems)
    problems.raise_if_any()


def _sum_grads(params, group) -> None:
    """Sum the gradients (their local shards) of ``params`` over ``group``, in place: one all-reduce of one
    flat buffer (parameters without a gradient are left out)."""
    import torch.distributed as dist

    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class ParallelContext:
    """One rank's view of a running layout: meshes per module, and how to shard and sync."""

    def __init__(self, layout: Layout, rank: int):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from mimo_spec.parallel.env import device_type

        check_executable(layout)
        self.layout, self.rank = layout, rank
        self.world_size = dist.get_world_size()
        # the one world mesh; every module spanning the world takes its (pp, dp_replicate, dp_shard, tp) mesh
        # from it by unflattening (modules with different degrees are different views of the same ranks)
        self.world_mesh = init_device_mesh(device_type(), (self.world_size,), mesh_dim_names=("world",))
        self._views: dict[tuple, Any] = {}
        self.meshes = {}
        for name, m in layout.modules.items():  # every rank builds every mesh (its groups are collective)
            if m.size == self.world_size:
                self.meshes[name] = self._world_view(m.shape, DEGREES)
            else:  # a split layout: this module's span only (a rank range, which a mesh cannot slice out)
                key = (m.offset, m.size, m.shape)
                if key not in self._views:
                    from torch.distributed.device_mesh import DeviceMesh

                    ranks = torch.arange(m.offset, m.offset + m.size).view(m.shape)
                    self._views[key] = DeviceMesh(device_type(), ranks, mesh_dim_names=DEGREES)
                self.meshes[name] = self._views[key]
        lm = layout.modules[LANGUAGE]
        coords = lm.coords(rank) or {d: 0 for d in DEGREES}  # 0s on ranks that only encode (split)
        # data-parallel shares of the batch (the ranks of an SP group see the same samples): dp_size of them,
        # dp_rank this rank's; sp_rank its place (sequence slice) in its SP group
        self.dp_size, self.pp = lm.shares, lm.pp
        self.split = None  # a SplitRunner when modules sit on different ranks
        self.pp_stage = coords["pp"]
        self.pipeline = None  # a PipelineRunner once start_pipeline() ran (pp > 1)
        self.batch_size = 0  # the run's global batch (train.batch_size; 0: unknown), set by start_parallel
        self.dp_rank, self.sp_rank = divmod(coords["dp_replicate"] * lm.dp_shard + coords["dp_shard"], lm.sp)
        self.sp = lm.sp  # sequence parallelism: each sequence split over the sp ranks of a share (sequence.py)
        self.sp_group = None
        self.fused: dict[str, torch.Tensor] = {}
        self.bridges: dict[str, Any] = {}  # modalities whose data-parallel layout differs from the LM's
        self.router_stats = None  # an MoE LM's router losses over the data-parallel batch (expert.GlobalRouterStats)
        # per module: the names of TP-replicated parameters whose gradients are summed over the TP ranks
        self.tp_partial: dict[str, list[str]] = {}
        # expert parallelism (ep > 1): module -> its (pp, edp, ep, tp) mesh, and its replicated expert parameters
        # (gradients summed by sync_grads over edp; FSDP-sharded ones are not listed)
        self.ep_meshes: dict[str, Any] = {}
        self.expert_params: dict[str, list[nn.Parameter]] = {}
        for name, m in layout.modules.items():
            if m.ep > 1:
                from mimo_spec.parallel.expert import EP_DIMS

                shape = (m.pp, m.dp // m.ep, m.ep, m.tp)
                if m.size == self.world_size:
                    self.ep_meshes[name] = self._world_view(shape, EP_DIMS)
                else:
                    from torch.distributed.device_mesh import DeviceMesh

                    ranks = torch.arange(m.offset, m.offset + m.size).view(shape)
                    self.ep_meshes[name] = DeviceMesh(device_type(), ranks, mesh_dim_names=EP_DIMS)

        if lm.sp > 1:  # (pp, shares, sp, tp): the SP groups (sp requires a colocated layout: the whole world)
            from mimo_spec.parallel.sequence import SP_DIMS

            self.sp_group = self._world_view((lm.pp, lm.dp // lm.sp, lm.sp, lm.tp), SP_DIMS)["sp"].get_group()

    def _world_view(self, shape: tuple[int, ...], names: tuple[str, ...]):
        """The world mesh unflattened to ``shape`` (dims ``names``), built once per shape (collective)."""
        key = (shape, names)
        if key not in self._views:
            self._views[key] = self.world_mesh._unflatten(0, shape, names)
        return self._views[key]

    # ---- building -----------------------------------------------------------------------
    def parallelize(self, model: nn.Module) -> nn.Module:
        """TP, activation checkpointing, compile and FSDP2 on every module, per its layout. FSDP2 sums its
        modules' data-parallel gradients; replicated-only modules are summed by :meth:`sync_grads`."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self._check_items_of_any_size(model)
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
                from mimo_spec.parallel.tp import tp_partial_params

                ids = {id(p) for p in tp_partial_params(module)}
                self.tp_partial[name] = [n for n, p in module.named_parameters() if id(p) in ids]
            experts: set[nn.Parameter] = set()
            if m.ep > 1:  # this rank's experts only, as DTensors over the EP group; tokens dispatched by all-to-all
                from mimo_spec.parallel.expert import shard_experts

                c = m.coords(self.rank)
                dp_index = c["dp_replicate"] * m.dp_shard + c["dp_shard"]
                self.expert_params[name] = shard_experts(module, self.ep_meshes[name]["ep"], dp_index % m.ep)
                experts = set(self.expert_params[name])
            if name == LANGUAGE and m.sp > 1:  # each rank runs its slice of every sequence; heads all-to-all
                from mimo_spec.parallel.sequence import install_sequence_parallel

                install_sequence_parallel(module, self.sp_group, m.sp, self.sp_rank)
            apply_activation_checkpointing(module, m.activation_checkpoint)
            compile_blocks(module, m.compile)
            if m.dp_shard > 1:  # FSDP2 (HSDP with dp_replicate > 1)
                mp = MixedPrecisionPolicy(param_dtype=_dtype(m.fsdp.get("param_dtype")),
                                          reduce_dtype=_dtype(m.fsdp.get("reduce_dtype")))
                dp_mesh = mesh["dp_replicate", "dp_shard"] if m.dp_replicate > 1 else mesh["dp_shard"]
                kw = {"mesh": dp_mesh, "mp_policy": mp,
                      "reshard_after_forward": m.fsdp.get("reshard_after_forward", True)}
                if experts and m.dp > m.ep:  # experts FSDP-sharded over the ranks holding the same experts
                    from mimo_spec.parallel.expert import moe_layers

                    for moe in moe_layers(module):
                        fully_shard(moe.experts, **{**kw, "mesh": self.ep_meshes[name]["edp"]})
                    self.expert_params[name], experts = [], set()  # FSDP reduces them (and the blocks skip them)
                elif experts:  # on no other rank: the blocks' FSDP leaves them alone (nothing to reduce)
                    kw["ignored_params"] = experts
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
            if name == LANGUAGE and m.dp > 1 and m.pp == 1:
                from mimo_spec.parallel.expert import install_router_stats  # MoE router losses over the batch

                self.router_stats = install_router_stats(module, self._dp_group(name, m))
            if name != LANGUAGE and self.layout.colocated and self._needs_bridge(m):
                self._bridge(name, model.modalities[name], m)
        return model

    def _check_items_of_any_size(self, model: nn.Module) -> None:
        """Refuse, naming the modality, what the pipeline, split and bridged layouts cannot carry: DeepStack
        (``deepstack_projections`` add feature maps at deeper language-model layers; the split and bridged
        layouts hand the language model one embedding per placeholder; a pipeline adds them on its first
        stage, so they must feed that stage's layers), and, split, a modality taking another's
        encoders (``inputs_from``) on other ranks than that modality (it encodes through them). Items of
        different sizes (grid inputs) they all carry."""
        bridged = any(self._needs_bridge(m) for n, m in self.layout.modules.items() if n != LANGUAGE)
        where = ("parallel: encoders on their own ranks" if not self.layout.colocated
                 else "parallel: a modality's data-parallel layout unlike the LM's" if bridged
                 else "parallel: pp > 1" if self.pp > 1 else None)
        if where is None:
            return
        modalities = getattr(model, "modalities", {})
        if self.pp > 1 and self.layout.colocated and not bridged:  # the first stage adds DeepStack features
            from mimo_spec.parallel.pipeline import stage_layers

            first = stage_layers(len(model.language_model.layers), self.pp)[0]
            for name, mod in modalities.items():
                src = getattr(mod, "src", mod)
                deep = list(getattr(src, "deepstack_lm_layers", None) or []) \
                    if getattr(src, "deepstack_projections", None) is not None else []
                late = [i for i in deep if i not in first]
                if late:
                    raise ConfigError(f"modality {name!r} adds DeepStack features after language-model layers "
                                      f"{late}, past the first pipeline stage's layers {first.start}..{first.stop - 1}",
                                      path=f"modalities.{getattr(mod, 'inputs_from', None) or name}."
                                           "params.deepstack_lm_layers",
                                      hint="fewer pipeline stages (parallel.default.pp), or DeepStack layers within "
                                           "the first stage")
            return
        for name, mod in modalities.items():
            if getattr(getattr(mod, "src", mod), "deepstack_projections", None) is not None:
                via = "" if getattr(mod, "src", mod) is mod else f" (through the encoders of {mod.inputs_from!r})"
                raise ConfigError(f"modality {name!r} feeds deeper language-model layers (deepstack_projections)"
                                  f"{via}, which this layout ({where}) does not support yet",
                                  path=f"modalities.{name}",
                                  hint="use single, ddp, fsdp or tp layouts (parallel=ddp|fsdp|tp2|tp2_fsdp)")
        if self.layout.colocated:
            return
        for name, mod in modalities.items():
            source = getattr(mod, "inputs_from", None)
            if source is None or name not in self.layout.modules or source not in self.layout.modules:
                continue
            m, s = self.layout.modules[name], self.layout.modules[source]
            if (m.offset, m.size) != (s.offset, s.size):
                raise ConfigError(f"modality {name!r} encodes through the encoders of {source!r} (inputs_from), which "
                                  f"sit on ranks {s.offset}..{s.offset + s.size - 1}, but it is placed on ranks "
                                  f"{m.offset}..{m.offset + m.size - 1}", path=m.path,
                                  hint=f"give {name} the ranks of {source} (ranks: {{offset: {s.offset}, "
                                       f"size: {s.size}}})")

    def sync_grads(self, model: nn.Module) -> None:
        """Sum the gradients of replicated-only modules (dp_replicate > 1, dp_shard == 1) over their
        data-parallel ranks: one all-reduce of one flat buffer per module, once per step (after the
        last micro-batch). FSDP2 reduces the sharded modules itself.

        Why not torch's ``replicate``: on FSDP2's machinery it makes every parameter a replicated
        DTensor and reduces per wrapped unit; measured on this project's CPU/gloo benchmark
        (``parallel_step.py``, ddp) it made the step 1.4x slower (about 200 ms of each step in
        ``FSDP::post_backward_reduce`` plus DTensor dispatch in the optimizer), while the
        all-reduce itself took the same time. ``DistributedDataParallel`` averages where these
        losses need a sum, reduces on every micro-batch of an accumulated step, and renames the
        parameters (``module.``), which checkpoints and parameter-group globs see.
        """
        for name, m in self.layout.modules.items():
            module = self._module(model, name)
            if module is None or self.rank not in m.ranks:
                continue
            if self.tp_partial.get(name):  # per-head q/k norms: each TP rank's gradient covers its heads only
                _sum_grads([module.get_parameter(n) for n in self.tp_partial[name]],
                           self.meshes[name]["tp"].get_group())
            experts = {id(p) for p in self.expert_params.get(name, ())}
            if experts and m.dp > m.ep:  # expert weights: summed over the ranks holding the same experts
                _sum_grads(self.expert_params[name], self.ep_meshes[name]["edp"].get_group())
            if m.dp_shard > 1 or m.dp_replicate == 1:
                continue
            _sum_grads([p for p in module.parameters() if id(p) not in experts],
                       self.meshes[name]["dp_replicate"].get_group())

    @staticmethod
    def _module(model: nn.Module, name: str) -> nn.Module | None:
        """The model part a layout entry places, or None when this rank does not hold it (a later pipeline stage)."""
        if name == LANGUAGE:
            return model.language_model
        return model.modalities[name] if name in model.modalities else None

    def start_pipeline(self, model: nn.Module, seq_len: int, pad_id: int) -> None:
        """Build this rank's pipeline stage and schedule (pp > 1); batches are padded to ``seq_len`` and to this
        data-parallel share's rows of the global batch (train.batch_size / dp)."""
        from mimo_spec.parallel.env import device_type
        from mimo_spec.parallel.pipeline import PipelineRunner

        lm = self.layout.modules[LANGUAGE]
        device = torch.device(device_type(), torch.cuda.current_device()) if device_type() == "cuda" else torch.device("cpu")
        self.pipeline = PipelineRunner(model, self.pp_stage, self.pp, lm.microbatches, lm.pp_schedule,
                                       self.meshes[LANGUAGE]["pp"].get_group(), device, seq_len, pad_id,
                                       rows=self.batch_size // self.dp_size)

    def _needs_bridge(self, m: ModuleLayout) -> bool:
        lm = self.layout.modules[LANGUAGE]
        return (m.dp_replicate, m.dp_shard) != (lm.dp_replicate, lm.dp_shard)

    def _dp_group(self, name: str, m: ModuleLayout):
        if m.dp_replicate > 1 and m.dp_shard > 1:  # both data-parallel dims as one: another view of the world
            return self._world_view((m.pp, m.dp_replicate * m.dp_shard, m.tp), ("pp", "dp", "tp"))["dp"].get_group()
        return self.meshes[name]["dp_replicate" if m.dp_replicate > 1 else "dp_shard"].get_group()

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
        self.bridges[name] = bridge

    def bridged_embeddings(self, batch: dict) -> dict[str, torch.Tensor]:
        """{modality: embeddings of this rank's local samples' items} for the bridged modalities (data-parallel
        layouts unlike the language model's), from the collated *global* ``batch``; the training step
        passes them to the model as ``modality_embeddings=``. Empty without bridges."""
        out = {}
        b = batch["input_ids"].shape[0]
        per = b // self.dp_size
        for name, bridge in self.bridges.items():
            items = (batch.get("modality_inputs") or {}).get(name)
            if items is None:  # no item of this modality in the batch
                continue
            counts = (batch.get("items_per_sample") or {}).get(name, [0] * b)
            out[name] = bridge(items, sum(counts[:self.dp_rank * per]), sum(counts[:(self.dp_rank + 1) * per]))
        return out

    # ---- each step ----------------------------------------------------------------------
    def data_share(self, batch_size: int) -> tuple[int, int] | None:
        """The samples [lo, hi) of every global batch of ``batch_size`` that this rank loads and collates:
        its data-parallel share [i*B/dp, (i+1)*B/dp), or None: the whole global batch.

        None (every rank of the run alike) where a rank needs more than its share: the split layout
        (encoder ranks encode chunks of the global batch's items for every language-model rank) and
        modalities bridged across data-parallel layouts (each encodes its chunk of the global items);
        and with one data-parallel share, where the share is the whole batch.
        """
        if self.dp_size == 1 or not self.layout.colocated or self.bridges:
            return None
        per = batch_size // self.dp_size
        return self.dp_rank * per, (self.dp_rank + 1) * per

    def local_batch(self, batch: dict, model: nn.Module) -> dict:
        """This rank's data-parallel share of a collated global batch (samples [i*B/dp, (i+1)*B/dp); for a
        packed batch rows, with their ``document_ids`` and their per-row ``items_per_sample``).

        A batch the loader built from this rank's share alone (``batch["share"]`` set, see
        :meth:`data_share`) is that share already and comes back as it is. Under sequence parallelism the
        share's rows stay whole and a loss mask scores only this rank's slice (``sequence.sequence_share``)."""
        out = self._share_of(batch, model)
        if self.sp > 1:
            from mimo_spec.parallel.sequence import sequence_share

            out = sequence_share(out, self.sp, self.sp_rank)
            self._count_tokens(out)
        return out

    def sequence_sum(self, value: float) -> float:
        """A per-rank value summed over this rank's SP group (a share's loss from its slices' parts); the value
        itself without sequence parallelism."""
        if self.sp == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, group=self.sp_group)
        return float(t)

    def _share_of(self, batch: dict, model: nn.Module) -> dict:
        if batch.get("share") is not None:
            self._count_tokens(batch)
            return batch
        b = batch["input_ids"].shape[0]
        if self.dp_size == 1:
            return batch
        if b % self.dp_size:  # rows would be lost (their tokens still count in the step's total)
            raise ValueError(f"a global batch of {b} rows cannot be split over {self.dp_size} data-parallel ranks")
        per = b // self.dp_size
        lo, hi = self.dp_rank * per, (self.dp_rank + 1) * per
        # every per-row tensor goes with its rows: a packed batch's document_ids, a loss mask
        out = {k: batch[k][lo:hi] for k in ROW_KEYS if batch.get(k) is not None}
        out["items_per_sample"], out["modality_inputs"] = {}, {}
        for name, counts in (batch.get("items_per_sample") or {}).items():
            start, stop = sum(counts[:lo]), sum(counts[:hi])
            out["items_per_sample"][name] = counts[lo:hi]
            items = (batch.get("modality_inputs") or {}).get(name)
            if items is None:
                continue
            if name in model.modalities:  # items of any size: packed inputs by their rows
                out["modality_inputs"][name] = slice_modality_items(model.modalities[name].src, items, start, stop)
            elif name in getattr(model, "grid_items", {}):
                # a pipeline stage without the encoders needs only the grids (its M-RoPE positions)
                enc, grids = model.grid_items[name][1], model.grid_items[name][2]
                kws = items.get(enc) or {}
                out["modality_inputs"][name] = {enc: {k: t[start:stop] for k, t in kws.items()
                                                      if k in grids or k == "second_per_grid_ts"}}
        if batch.get("output_targets"):
            out["output_targets"] = {}
            for name, target in batch["output_targets"].items():
                mod = model.modalities[name]
                per_sample = ((batch["input_ids"] == mod.generation_token_id).sum(1)
                              // max(mod.num_generation_tokens, 1)).tolist()
                out["output_targets"][name] = target[sum(per_sample[:lo]):sum(per_sample[:hi])]
        # the tokens the loss counts: no ignored label, masked position or first token of a packed document
        out["num_tokens"] = int(token_weights(out["labels"], out.get("loss_mask"), out.get("document_ids")).sum())
        self._count_tokens(out)
        return out

    def _count_tokens(self, share: dict) -> None:
        """An MoE LM's router losses weigh this rank's share by its counted tokens (expert.GlobalRouterStats)."""
        if self.router_stats is not None:
            self.router_stats.tokens = int(share["num_tokens"])

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

    def train_context(self):
        """What a training step's forward and backward run inside: torch's ``loss_parallel()`` when the
        language model's head keeps its logits sharded on the vocabulary (TP with ``loss_parallel``), so
        the cross entropy works on the shards in both directions; else nothing."""
        import contextlib

        lm = self.layout.modules[LANGUAGE]
        if lm.tp > 1 and lm.tp_plan != "none" and lm.loss_parallel and self.rank in lm.ranks:
            from torch.distributed.tensor.parallel import loss_parallel

            return loss_parallel()
        return contextlib.nullcontext()

    def grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        """The global gradient 2-norm (a plain scalar tensor, the same on every rank) of ``params``' gradients
        on this rank, over every module and shard: torch's ``get_total_norm`` per group of gradients that
        share a layout (plain, or DTensors of one mesh and placements, whose norm it reduces over the mesh);
        pipeline stages and split spans each hold other parameters, so their squared norms are summed."""
        import torch.distributed as dist

        sq = torch.zeros((), dtype=torch.float64)
        for group in grad_groups(params):
            n = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0)
            if hasattr(n, "full_tensor"):
                n = n.full_tensor()
            sq += n.double() ** 2
        if self.pp > 1:  # every stage holds other parameters
            dist.all_reduce(sq, group=self.meshes[LANGUAGE]["pp"].get_group())
        elif not self.layout.colocated:  # every span holds other modules: each span's ranks add 1/size of its share
            span = next(m.size for m in self.layout.modules.values() if self.rank in m.ranks)
            sq /= span
            dist.all_reduce(sq)
        return sq.sqrt().float()

    def scale_grads(self, params: list[nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
        """torch's ``clip_grads_with_norm_`` on every group of gradients sharing a layout (the global
        ``norm`` taken as replicated over each group's mesh)."""
        from torch.distributed.tensor.experimental import implicit_replication

        with implicit_replication():
            for group in grad_groups(params):
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)

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
    run.batch_size = int((train_cfg or {}).get("batch_size") or 0)
    run.parallelize(model)
    return run
