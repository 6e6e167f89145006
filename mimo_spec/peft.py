"""LoRA / DoRA adapters on the model's Linear layers, from YAML or Python.

YAML (top level, beside ``freeze``)::

    adapters:
      - {modules: "language_model.layers.*.attn.*", type: lora, rank: 16, alpha: 32, dropout: 0.05}
      - {modules: ["language_model.layers.*.mlp.fc1", "language_model.layers.*.mlp.fc2"], type: dora, rank: 8}
    trainable: ["modalities.*.input_projections.*"]   # kept trainable beside the adapters

Python: ``add_adapters(model, [{"modules": ..., "rank": 16}], trainable=[...])``.

Every parameter of the model is frozen except the adapters and the ``trainable`` modules. Each
``modules`` glob (fnmatch over module names, as ``freeze``) must match at least one module, and every
module it matches must be an ``nn.Linear``: write the globs down to the layers (``*.attn.qkv``, not
``*.attn``).

Why our own adapter and not ``peft.inject_adapter_in_model``: peft wraps the Linear in a ``lora.Linear``
(the base moves to ``<name>.base_layer.weight``, which breaks every table that maps our state-dict keys
to Hugging Face's and checkpoints of the base), and one peft adapter on our fused ``attn.qkv`` /
``mlp.fc1`` would share one ``A`` across q, k and v, which no adapter on Hugging Face's separate
``q_proj`` / ``k_proj`` / ``v_proj`` equals. Here the base Linear stays as it is (same keys, same
tensor-parallel styles); its adapter is a child ``<linear>.adapter`` applied by a forward hook, with
one ``A``/``B`` (and DoRA magnitude) per part of a fused projection: the parts a TP plan declares
(:mod:`mimo_spec.parallel.plans`, ``fused``), so q, k, v of ``Attention.qkv`` and gate, up of a SwiGLU
``MLP.fc1`` each get their own. The arithmetic is peft's (0.21): ``y = base(x) + B A dropout(x) *
alpha / rank``; DoRA ``y = m / ||W + s B A||_row * (W x + s B A x) + bias`` with the norm detached,
computed per output row (so per part of a fused projection, equal to DoRA on the separate one).
``export_hf(..., adapters="peft")`` (:mod:`mimo_spec.interop.hf_export`) writes them in PEFT's layout
with Hugging Face names; ``adapters="merge"`` folds them in (:func:`base_view`).

Checkpoints of a model with adapters hold only what trains (:func:`trainable_keys`) and the base's
fingerprint (:func:`base_fingerprint`, recorded by :func:`base_loaded` once the base is in place).
A DoRA magnitude starts as the row norms of the base it was added to: after loading other base
weights, :func:`base_loaded` (or :func:`reset_magnitudes`) recomputes it.

Under tensor parallelism the adapter follows its base layer's style (:func:`shard_adapter`):
column-parallel base: ``A`` replicated, ``B`` (and the magnitude) sharded on rows; row-parallel base:
``A`` sharded on columns, ``B`` and the magnitude replicated. The few gradient sums this needs are in
the hook (an all-reduce of ``A x``'s gradient, resp. of ``B``'s and the magnitude's; DoRA's row norms
of a row-parallel weight sum their squares over the ranks), so the DTensor machinery never sees a
partial gradient. Dropout under TP draws each rank's own mask (use dropout 0 to match one process).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimo_spec.errors import ConfigError, ProblemCollector, did_you_mean

TYPES = ("lora", "dora")
ENTRY_KEYS = ("modules", "type", "rank", "alpha", "dropout")
# fused projections' part names (TP plans give the sizes); others are one part ""
PART_NAMES = {("Attention", "qkv"): ("q", "k", "v"), ("MLP", "fc1"): ("gate", "up")}


@dataclass(frozen=True)
class AdapterEntry:
    """One ``adapters:`` entry. ``alpha`` None: equal to ``rank`` (scaling 1)."""

    modules: tuple[str, ...]
    type: str = "lora"
    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0

    @property
    def scaling(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


def parse_adapters(raw: Any, problems: ProblemCollector, path: str = "adapters") -> list[AdapterEntry]:
    """``adapters:`` as entries; every problem added to ``problems`` at ``adapters.<i>.<key>``."""
    if raw is None:
        return []
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, (list, tuple)):
        problems.add(path, f"expected a list of adapter entries, got {type(raw).__name__} {raw!r}",
                     "e.g. adapters: [{modules: 'language_model.layers.*.attn.qkv', type: lora, rank: 16}]")
        return []
    out = []
    for i, entry in enumerate(raw):
        where = f"{path}.{i}"
        if isinstance(entry, AdapterEntry):
            out.append(entry)
            continue
        if not isinstance(entry, dict):
            problems.add(where, f"expected a mapping {{modules, type, rank, alpha, dropout}}, got {entry!r}")
            continue
        bad = len(problems.problems)
        for key in entry:
            if key not in ENTRY_KEYS:
                problems.add(f"{where}.{key}", "unknown key in an adapter entry", did_you_mean(str(key), ENTRY_KEYS))
        modules = entry.get("modules")
        if isinstance(modules, str):
            modules = [modules]
        if not modules or not isinstance(modules, (list, tuple)) or not all(isinstance(m, str) and m for m in modules):
            problems.add(f"{where}.modules", f"expected a module glob or a list of them, got {entry.get('modules')!r}",
                         "e.g. modules: 'language_model.layers.*.attn.qkv'")
        kind = entry.get("type", "lora")
        if kind not in TYPES:
            problems.add(f"{where}.type", f"unknown adapter type {kind!r}: expected lora or dora",
                         did_you_mean(str(kind), TYPES))
        rank = entry.get("rank", 8)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            problems.add(f"{where}.rank", f"expected a whole number >= 1, got {rank!r}", "e.g. rank: 16")
        alpha = entry.get("alpha")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                  or not math.isfinite(alpha) or alpha <= 0):
            problems.add(f"{where}.alpha", f"expected a number > 0 (or null: alpha = rank), got {alpha!r}")
        dropout = entry.get("dropout", 0.0)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            problems.add(f"{where}.dropout", f"expected a probability in [0, 1), got {dropout!r}")
        if len(problems.problems) == bad:
            out.append(AdapterEntry(tuple(modules), kind, int(rank), None if alpha is None else float(alpha),
                                    float(dropout)))
        else:
            out.append(None)  # keeps the indices of the later entries
    return out


class Adapter(nn.Module):
    """The adapter of one Linear (``<linear>.adapter``): per part ``p`` of its output rows (one part
    ``""`` for a plain Linear) ``lora_A_p`` (rank, in), ``lora_B_p`` (rows, rank) and, for DoRA,
    ``magnitude_p`` (rows,). Applied by :func:`_adapter_hook` on the Linear's output."""

    def __init__(self, linear: nn.Linear, parts: dict[str, int], entry: AdapterEntry):
        super().__init__()
        self.parts = tuple(parts)
        self.rank, self.scaling, self.dora = entry.rank, entry.scaling, entry.type == "dora"
        self.kind, self.alpha = entry.type, entry.rank if entry.alpha is None else entry.alpha
        self.dropout = nn.Dropout(entry.dropout) if entry.dropout > 0 else nn.Identity()
        self.enabled = True
        self.tp: str | None = None  # "colwise" | "rowwise" once sharded (shard_adapter)
        w = linear.weight
        kw = {"device": w.device, "dtype": w.dtype}
        for p, rows in parts.items():
            a = nn.Parameter(torch.empty(entry.rank, linear.in_features, **kw))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft's default init: B = 0, the model is unchanged
            self.register_parameter(self._n("lora_A", p), a)
            self.register_parameter(self._n("lora_B", p), nn.Parameter(torch.zeros(rows, entry.rank, **kw)))
            if self.dora:
                self.register_parameter(self._n("magnitude", p), nn.Parameter(torch.ones(rows, **kw)))
        if self.dora:
            self.reset_magnitude(linear)

    @staticmethod
    def _n(what: str, part: str) -> str:
        return f"{what}_{part}" if part else what

    def tensor(self, what: str, part: str) -> torch.Tensor:
        return getattr(self, self._n(what, part))

    @torch.no_grad()
    def reset_magnitude(self, linear: nn.Linear) -> None:
        """DoRA: magnitude = ||W + s B A|| per row (at B = 0 the layer's output is unchanged)."""
        if not self.dora or linear.weight.is_meta:
            return
        for p, w in zip(self.parts, self.split_rows(_full(linear.weight))):
            m = self.tensor("magnitude", p)
            m.copy_(_row_norm(w, _full(self.tensor("lora_B", p)) @ _full(self.tensor("lora_A", p)), self.scaling))

    def split_rows(self, t: torch.Tensor) -> list[torch.Tensor]:
        return list(t.split([self.tensor("lora_B", p).shape[0] for p in self.parts], dim=0))

    def delta_weights(self) -> list[torch.Tensor]:
        """Per part, s * B A (full tensors)."""
        return [self.scaling * (_full(self.tensor("lora_B", p)) @ _full(self.tensor("lora_A", p))) for p in self.parts]

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The base ``weight`` with this adapter folded in (LoRA: W + s B A; DoRA: m / ||W + s B A|| *
        (W + s B A), per row)."""
        out = []
        for p, w, d in zip(self.parts, self.split_rows(weight), self.delta_weights()):
            merged = w + d
            if self.dora:
                norm = torch.linalg.norm(merged, dim=1).to(w.dtype)
                merged = merged * (_full(self.tensor("magnitude", p)) / norm)[:, None]
            out.append(merged)
        return torch.cat(out)

    def extra_repr(self) -> str:
        parts = f", parts={'/'.join(self.parts)}" if self.parts != ("",) else ""
        return f"{self.kind}, rank={self.rank}, alpha={self.alpha:g}{parts}{', tp=' + self.tp if self.tp else ''}"


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _row_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    return torch.linalg.norm(weight + scaling * lora_weight, dim=1).to(weight.dtype)


class _SumGradOverTP(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the TP group (the ranks each add a part)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _adapter_hook(linear: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    adapter = linear._modules.get("adapter")
    if adapter is None or not adapter.enabled:
        return None
    return adapter_forward(adapter, linear, args[0], output)


def adapter_forward(adapter: Adapter, linear: nn.Linear, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``output`` (the base Linear's, before any TP output redistribution) plus the adapter's part.

    All arithmetic is on local tensors: under TP the output is column-sharded (colwise, rows of this
    rank's parts back to back) or a partial sum (rowwise), and the adapter's share is added to it."""
    group = None
    if adapter.tp is not None:
        group = adapter.tensor("lora_A", adapter.parts[0]).device_mesh.get_group()
    x_loc = _local(x)
    out_is_dt = hasattr(output, "to_local")
    out_loc = output.to_local() if out_is_dt else output
    xd = adapter.dropout(x_loc)
    parts = adapter.parts
    a_all = torch.cat([_local(adapter.tensor("lora_A", p)) for p in parts]) if len(parts) > 1 else \
        _local(adapter.tensor("lora_A", parts[0]))
    h_all = F.linear(xd.to(a_all.dtype), a_all)
    if adapter.tp == "colwise":  # each rank's B rows add a part of A x's gradient
        h_all = _SumGradOverTP.apply(h_all, group)
    hs = h_all.split(adapter.rank, dim=-1)
    base_wx = None
    if adapter.dora:
        w_loc = _local(linear.weight)
        if adapter.tp != "rowwise" and (isinstance(adapter.dropout, nn.Identity) or not adapter.training):
            bias = linear.bias
            base_wx = out_loc if bias is None else out_loc - _local(bias)
        else:  # peft: the base path on the dropped-out input (rowwise TP: this rank's partial sum)
            base_wx = F.linear(xd, w_loc)
        w_parts = w_loc.split([_local(adapter.tensor("lora_B", p)).shape[0] for p in parts], dim=0)
        wx_parts = base_wx.split([w.shape[0] for w in w_parts], dim=-1)
    deltas = []
    for i, p in enumerate(parts):
        b = _local(adapter.tensor("lora_B", p))
        if adapter.tp == "rowwise":  # every rank's partial A x meets the whole B
            b = _SumGradOverTP.apply(b, group)
        lora = F.linear(hs[i], b) * adapter.scaling
        if not adapter.dora:
            deltas.append(lora)
            continue
        m = _local(adapter.tensor("magnitude", p))
        with torch.no_grad():
            a_loc = _local(adapter.tensor("lora_A", p))
            sq = (w_parts[i] + adapter.scaling * (b @ a_loc)).float().pow(2).sum(dim=1)
            if adapter.tp == "rowwise":  # rows split over the ranks' columns: the squares summed
                import torch.distributed as dist

                dist.all_reduce(sq, group=group)
            norm = sq.sqrt().to(w_parts[i].dtype)
        if adapter.tp == "rowwise":
            m = _SumGradOverTP.apply(m, group)
        scale = m / norm
        deltas.append((scale - 1) * wx_parts[i] + scale * lora)
    delta = torch.cat(deltas, dim=-1) if len(deltas) > 1 else deltas[0]
    new = out_loc + delta.to(out_loc.dtype)
    if out_is_dt:
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(new, output.device_mesh, output.placements, shape=output.shape,
                                  stride=output.stride())
    return new


# --------------------------------------------------------------------------- adding adapters


def _fused_parts(parent: nn.Module | None, child: str, linear: nn.Linear) -> dict[str, int]:
    """The parts (name -> rows) of ``linear`` = ``parent.<child>``: a fused projection's, from its TP plan."""
    if parent is not None:
        from mimo_spec.parallel.plans import tp_plan_for

        plan = tp_plan_for(parent)
        sizes = plan.fused(parent).get(child) if plan is not None and plan.fused is not None else None
        if sizes:
            names = next((v for (cls, c), v in PART_NAMES.items() if c == child and
                          any(k.__name__ == cls for k in type(parent).__mro__)), None)
            names = names if names is not None and len(names) == len(sizes) else \
                tuple(f"part{i}" for i in range(len(sizes)))
            return dict(zip(names, sizes))
    return {"": linear.out_features}


def add_adapters(model: nn.Module, adapters: Iterable[Any], trainable: Iterable[str] = (), *,
                 path: str = "adapters", trainable_path: str = "trainable") -> nn.Module:
    """Freeze ``model`` and add the adapters of ``adapters`` (entries as in YAML, or AdapterEntry);
    ``trainable``: module globs that stay trainable. Returns ``model``; one ConfigError lists every
    problem (a glob matching nothing, a non-Linear module, a rank above the layer's size)."""
    problems = ProblemCollector()
    if isinstance(adapters, str):  # a glob string, not a list of entries (it would read as one entry per letter)
        problems.add(path, f"expected a list of adapter entries, got the string {adapters!r}",
                     f"e.g. [{{'modules': {adapters!r}, 'type': 'lora', 'rank': 16}}]")
        adapters = []
    entries = parse_adapters(list(adapters) if not isinstance(adapters, dict) else adapters, problems, path)
    trainable = [trainable] if isinstance(trainable, str) else list(trainable or ())
    if not all(isinstance(t, str) and t for t in trainable):
        problems.add(trainable_path, f"expected a list of module globs, got {trainable!r}")
        trainable = []
    if trainable and not entries:
        problems.add(trainable_path, "trainable modules are kept trainable beside adapters, and there are none",
                     "add adapters: [...], or use freeze: [...] alone")
    problems.raise_if_any()
    named = dict(model.named_modules())
    names = [n for n in named if n and not n.endswith(".adapter") and ".adapter." not in n]
    plan: dict[str, tuple[int, AdapterEntry]] = {}
    for i, entry in enumerate(entries):
        hits = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in entry.modules)]
        for g in entry.modules:
            if not any(fnmatch.fnmatchcase(n, g) for n in names):
                problems.add(f"{path}.{i}.modules", f"{g!r} matches no module",
                             did_you_mean(g, [n for n in names if isinstance(named[n], nn.Linear)])
                             or "globs match module names such as language_model.layers.0.attn.qkv "
                                "(action=summary shows the tree)")
        for n in hits:
            mod = named[n]
            if not isinstance(mod, nn.Linear):
                problems.add(f"{path}.{i}.modules", f"{n} is a {type(mod).__name__}, not a Linear: adapters go on "
                             "Linear layers", f"narrow the glob to the Linear layers, e.g. '{n}.*' matches "
                             f"{', '.join(c for c, m in mod.named_children() if isinstance(m, nn.Linear)) or 'none'}")
                continue
            if n in plan or "adapter" in mod._modules:
                problems.add(f"{path}.{i}.modules", f"{n} already has an adapter (entry {plan[n][0] if n in plan else '?'})",
                             "match every Linear with one entry only")
                continue
            parent_name, _, child = n.rpartition(".")
            parts = _fused_parts(named.get(parent_name) if "." in n else model, child, mod)
            smallest = min([mod.in_features, *parts.values()])
            if entry.rank > smallest:
                problems.add(f"{path}.{i}.rank", f"rank {entry.rank} is larger than {n} allows: min(in {mod.in_features}, "
                             f"out {'/'.join(str(v) for v in parts.values())}) = {smallest}",
                             f"use rank <= {smallest}")
                continue
            plan[n] = (i, entry)
    trainable_hits: list[str] = []
    for j, g in enumerate(trainable):
        hits = [n for n in names if fnmatch.fnmatchcase(n, g)]
        if not hits:
            problems.add(f"{trainable_path}.{j}", f"{g!r} matches no module",
                         did_you_mean(g, [n for n in names if n.count(".") <= 3])
                         or "globs match module names such as modalities.images.input_projections.clip")
        trainable_hits += hits
    problems.raise_if_any()
    # a later call keeps what earlier ones left training (their adapters and their trainable modules)
    kept = [p for p in model.parameters() if p.requires_grad] if has_adapters(model) else []
    model.requires_grad_(False)
    for p in kept:
        p.requires_grad_(True)
    for n, (i, entry) in plan.items():
        mod = named[n]
        parent_name, _, child = n.rpartition(".")
        parts = _fused_parts(named.get(parent_name) if "." in n else model, child, mod)
        mod.add_module("adapter", Adapter(mod, parts, entry))
        mod.register_forward_hook(_adapter_hook, prepend=True)
    for n in trainable_hits:
        named[n].requires_grad_(True)
    return model


def adapters_of(model: nn.Module) -> Iterator[tuple[str, nn.Module, Adapter]]:
    """(Linear name, Linear, its Adapter) of every adapted layer."""
    for name, mod in model.named_modules():
        ad = mod._modules.get("adapter") if isinstance(mod, nn.Linear) else None
        if isinstance(ad, Adapter):
            yield name, mod, ad


def has_adapters(model: nn.Module) -> bool:
    return next(adapters_of(model), None) is not None


def is_adapter_key(key: str) -> bool:
    return ".adapter." in key or key.startswith("adapter.")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model alone (e.g. DPO's reference) inside the block: every adapter skipped."""
    saved = [(ad, ad.enabled) for _, _, ad in adapters_of(model)]
    for ad, _ in saved:
        ad.enabled = False
    try:
        yield model
    finally:
        for ad, state in saved:
            ad.enabled = state


def reset_magnitudes(model: nn.Module) -> None:
    """DoRA magnitudes from the current base weights (after loading them: ``init_from``)."""
    for _, lin, ad in adapters_of(model):
        ad.reset_magnitude(lin)


def trainable_keys(model: nn.Module) -> list[str]:
    """State-dict keys an adapter checkpoint holds: every trainable parameter (adapters and ``trainable``)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def base_fingerprint(model: nn.Module) -> str:
    """A sha256 over the frozen (base) parameters' names, shapes, dtypes and bytes, in name order."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad or is_adapter_key(name):
            continue
        t = _full(p.detach()).contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def base_loaded(model: nn.Module) -> str | None:
    """Call once the base weights are in place (built from the seed, or loaded by ``init_from``):
    DoRA magnitudes from them, and their fingerprint kept on the model (``adapter_base_hash``) for
    the checkpoints to record. None without adapters."""
    if not has_adapters(model):
        return None
    reset_magnitudes(model)
    model.adapter_base_hash = base_fingerprint(model)
    return model.adapter_base_hash


def training_seed(cfg: Any) -> int:
    """The seed a recorded run config trained with (``train.seed``, else ``seed``): its base's init."""
    train = cfg.get("train") or {}
    seed = train.get("seed") if "seed" in train else cfg.get("seed", 0)
    return int(seed or 0)


def load_trained_base(model: nn.Module, cfg: Any) -> None:
    """For a job reading a training run's checkpoint (eval, generate): with adapters, the base they were
    trained on (``init_from``'s weights; else the seed's init, which the build made) and its fingerprint."""
    if not has_adapters(model):
        return
    if cfg.get("init_from"):
        from pathlib import Path

        from mimo_spec.weights import load_weights

        with base_view(model, merge=False):
            load_weights(model, Path(cfg["init_from"]) / "model.safetensors")
    base_loaded(model)


# --------------------------------------------------------------------------- tensor parallelism


def shard_adapter(linear: nn.Module, style: str, tp_mesh, where: str = "") -> None:
    """Shard ``linear.adapter`` along its (already sharded) base layer: ``colwise`` (A replicated, B and
    the magnitude by rows) or ``rowwise`` (A by columns, B and the magnitude replicated)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    ad = linear._modules.get("adapter")
    if ad is None:
        return
    if style not in ("colwise", "rowwise"):
        raise ConfigError(f"{where}: an adapter on a layer of TP style {style!r} (only column- or row-parallel "
                          "Linears take adapters under tensor parallelism)", path="adapters",
                          hint="leave this layer out of the adapters' globs")
    for name, p in list(ad.named_parameters(recurse=False)):
        is_a = name.startswith("lora_A")
        if style == "colwise":
            placement = Replicate() if is_a else Shard(0)
        else:
            placement = Shard(1) if is_a else Replicate()
        ad.register_parameter(name, nn.Parameter(distribute_tensor(p.data, tp_mesh, [placement]),
                                                 requires_grad=p.requires_grad))
    ad.tp = style


# --------------------------------------------------------------------------- export helpers


@contextlib.contextmanager
def base_view(model: nn.Module, merge: bool):
    """Inside the block ``model`` looks adapter-free: the adapters are detached (and with ``merge``,
    every adapted weight is the merged one). Everything is put back on exit."""
    saved = []
    try:
        for _, lin, ad in list(adapters_of(model)):
            weight = lin.weight
            del lin._modules["adapter"]
            lin.__dict__["_peft_detached"] = ad  # for the export's own bookkeeping (not a module: no state-dict keys)
            if merge:
                lin.weight = nn.Parameter(ad.merged_weight(weight.detach()), requires_grad=False)
            saved.append((lin, ad, weight))
        yield model
    finally:
        for lin, ad, weight in saved:
            lin.weight = weight
            lin.__dict__.pop("_peft_detached", None)
            lin.add_module("adapter", ad)

