"""Parallel layouts: the YAML schema, its checks (no process group needed) and the rank map.

A layout gives every module of the model (``language`` and each modality by
name) a rank span and parallel degrees; modules it does not name take
``default``::

    name: hetero_split
    default: {dp_shard: -1}                 # every module not named below
    modules:
      images:   {ranks: {offset: 0, size: 2}, dp_shard: -1}
      language: {ranks: {offset: 2, size: 2}, tp: 2}

Within a span, ranks are laid out row-major over ``(pp, dp_replicate, dp_shard,
tp)`` (tp innermost, so a TP group is neighbouring ranks). One degree may be
``-1``: the rest of the span. Spans are identical (colocated) or disjoint
(split) and together cover the world.

``ep`` (expert parallelism, a module with mixture-of-experts layers) is carved out of the module's
``dp_replicate x dp_shard`` data-parallel ranks rather than multiplied into the span: it must divide
them (and the experts of each MoE layer); see :mod:`mimo_spec.parallel.expert`.

``sp`` (Ulysses sequence parallelism, the language module) is carved out of the same data-parallel ranks: groups
of ``sp`` neighbouring data-parallel ranks see the same samples, each a contiguous ``1/sp`` slice of every
sequence; ``dp / sp`` data-parallel shares remain. See :mod:`mimo_spec.parallel.sequence`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from mimo_spec.errors import ConfigError, ProblemCollector, did_you_mean
from mimo_spec.parallel.names import DEGREES, LANGUAGE  # noqa: F401  (re-exported)

MODULE_KEYS = DEGREES + ("ep", "sp", "cp", "ranks", "tp_plan", "fsdp", "activation_checkpoint", "compile", "microbatches",
                         "pp_schedule", "loss_parallel")
PP_SCHEDULES = ("1f1b", "gpipe")
MAX_WORLD = 1 << 17  # ranks a layout may span: per-rank tables are built for each of them
TOP_KEYS = ("name", "world_size", "default", "modules")
TP_PLANS = ("default", "none")
AC_MODES = ("none", "full", "every")
FSDP_KEYS = ("reshard_after_forward", "param_dtype", "reduce_dtype")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModuleLayout:
    """One module's placement: its ranks and degrees, resolved for a world size."""

    name: str
    offset: int
    size: int
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    cp: int = 1
    tp_plan: str = "default"
    fsdp: dict[str, Any] = field(default_factory=dict)
    activation_checkpoint: dict[str, Any] = field(default_factory=lambda: {"mode": "none"})
    compile: bool | str = False  # True: torch.compile's default backend (inductor); a str: that backend
    microbatches: int = 1
    pp_schedule: str = "1f1b"
    path: str = ""  # where in the config this module's layout comes from (for errors)
    origin: dict[str, str] = field(default_factory=dict)  # key -> the config path that set it
    loss_parallel: bool = True  # under TP: the LM's logits stay vocab-sharded and the loss is vocab-parallel
    ep: int = 1  # expert parallelism: MoE experts split over groups of ep of the module's data-parallel ranks
    sp: int = 1  # sequence parallelism: each sequence split over groups of sp of the module's data-parallel ranks

    @property
    def shares(self) -> int:
        """Data-parallel shares of the batch: the data-parallel ranks, sp of them per share under sequence
        parallelism (they see the same samples)."""
        return self.dp // self.sp

    def sp_index(self, rank: int) -> tuple[int, int] | None:
        """(data-parallel share, place in its SP group) of ``rank``, or None when the rank does not hold it."""
        c = self.coords(rank)
        if c is None:
            return None
        return divmod(c["dp_replicate"] * self.dp_shard + c["dp_shard"], self.sp)

    def at(self, key: str) -> str:
        return self.origin.get(key, f"{self.path}.{key}")

    @property
    def ranks(self) -> range:
        return range(self.offset, self.offset + self.size)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, d) for d in DEGREES)

    def coords(self, rank: int) -> dict[str, int] | None:
        """This rank's coordinates in the module's mesh, or None when the rank does not hold it."""
        if rank not in self.ranks:
            return None
        local, out = rank - self.offset, {}
        for name, size in zip(reversed(DEGREES), reversed(self.shape)):
            local, out[name] = divmod(local, size)
        return {d: out[d] for d in DEGREES}


@dataclass
class Layout:
    name: str
    world_size: int
    modules: dict[str, ModuleLayout]

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    def holders(self, rank: int) -> list[str]:
        return [n for n, m in self.modules.items() if rank in m.ranks]

    @property
    def colocated(self) -> bool:
        return len({(m.offset, m.size) for m in self.modules.values()}) == 1


def _int(value: Any, path: str, problems: ProblemCollector, minimum: int = 1, allow_rest: bool = False) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or (value < minimum and not (allow_rest and value == -1)):
        problems.add(path, f"expected an integer >= {minimum}" + (" or -1 (the rest of the span)" if allow_rest else "")
                     + f", got {value!r}")
        return None
    return value


def _module_raw(parallel: dict, name: str) -> tuple[dict, str, dict[str, str]]:
    """A module's layout: ``default`` overlaid by ``modules.<name>`` (key by key), its path,
    and where each key came from."""
    modules = parallel.get("modules") or {}
    default = parallel.get("default") or {}
    own = modules.get(name) or {}
    if not isinstance(default, dict) or not isinstance(own, dict):
        bad = "parallel.default" if not isinstance(default, dict) else f"parallel.modules.{name}"
        return None, bad, {}
    origin = {k: f"parallel.default.{k}" for k in default}
    origin.update({k: f"parallel.modules.{name}.{k}" for k in own})
    return {**default, **own}, f"parallel.modules.{name}" if name in modules else "parallel.default", origin


def parse_layout(parallel: dict, module_names: list[str], world_size: int | None,
                 problems: ProblemCollector) -> Layout | None:
    """Resolve the layout for ``world_size`` (None: the layout's ``world_size``, else the smallest fitting one).

    Schema and rank checks only; model-dependent checks are in :mod:`mimo_spec.parallel.checks`.
    """
    from omegaconf import DictConfig, OmegaConf

    if isinstance(parallel, DictConfig) or any(isinstance(v, DictConfig) for v in (parallel or {}).values()):
        parallel = OmegaConf.to_container(OmegaConf.create(dict(parallel)), resolve=True)
    parallel = dict(parallel or {})
    for key in parallel:
        if key not in TOP_KEYS:
            problems.add(f"parallel.{key}", "unknown key", did_you_mean(key, TOP_KEYS))
    modules = parallel.get("modules") or {}
    if not isinstance(modules, dict):
        problems.add("parallel.modules", f"expected a mapping of module name to layout, got {modules!r}")
        return None
    for name in modules:
        if name not in module_names:
            problems.add(f"parallel.modules.{name}", "no such module in this model",
                         did_you_mean(name, module_names))
    if world_size is None and parallel.get("world_size") is not None:
        world_size = _int(parallel["world_size"], "parallel.world_size", problems)
    raw: dict[str, tuple[dict, str, dict]] = {}
    for name in module_names:
        node, path, origin = _module_raw(parallel, name)
        if node is None:
            problems.add(path, "expected a mapping of layout keys")
            continue
        for key in node:
            if key not in MODULE_KEYS:
                problems.add(origin[key], "unknown key", did_you_mean(key, MODULE_KEYS))
        raw[name] = (node, path, origin)
    given = "world_size" if world_size is not None else "parallel.world_size"
    if world_size is None:  # nothing says: the smallest world the layout fits
        world_size, given = _smallest_world(raw), None
    if world_size > MAX_WORLD:  # before anything is sized per rank
        where = given or _largest_degree(raw)
        problems.add(where, f"a world of {world_size:,} ranks is more than mimo-spec lays out (at most "
                     f"{MAX_WORLD:,})", "check the parallel degrees and the world size")
        _dedupe(problems)
        return None
    out: dict[str, ModuleLayout] = {}
    for name, (node, path, origin) in raw.items():
        m = _resolve_module(name, node, path, origin, world_size, problems)
        if m is not None:
            out[name] = m
    _dedupe(problems)
    if problems:
        return None
    _check_spans(out, raw, world_size, problems)
    return Layout(str(parallel.get("name", "custom")), world_size, out)


def _dedupe(problems: ProblemCollector) -> None:
    """Modules that share ``parallel.default`` would report its problems once each."""
    seen, kept = set(), []
    for p in problems.problems:
        if (p.path, p.message) not in seen:
            seen.add((p.path, p.message))
            kept.append(p)
    problems.problems[:] = kept


def _largest_degree(raw: dict[str, tuple[dict, str, dict]]) -> str:
    """The key whose value makes the layout's world largest (for an error naming it)."""
    best, where = 0, "parallel.default"
    for node, path, origin in raw.values():
        for key in DEGREES + ("ranks",):
            value = node.get(key)
            if isinstance(value, dict):
                value = sum(v for v in value.values() if isinstance(v, int))
            if isinstance(value, int) and value > best:
                best, where = value, origin.get(key, f"{path}.{key}")
    return where


def _smallest_world(raw: dict[str, tuple[dict, str, dict]]) -> int:
    need = 1
    for node, _, _ in raw.values():
        ranks = node.get("ranks") or {}
        if isinstance(ranks, dict) and isinstance(ranks.get("offset"), int) and isinstance(ranks.get("size"), int):
            need = max(need, ranks["offset"] + ranks["size"])
        else:
            fixed = math.prod(v for v in (node.get(d, 1) for d in DEGREES) if isinstance(v, int) and v > 0)
            for key in ("ep", "sp"):  # carved out of the data-parallel ranks: at least that many of them
                v = node.get(key, 1)
                fixed = math.lcm(fixed, v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else fixed
            need = max(need, fixed)
    return need


def _resolve_module(name: str, node: dict, path: str, origin: dict[str, str], world: int,
                    problems: ProblemCollector) -> ModuleLayout | None:
    n0 = len(problems.problems)

    def at(key: str) -> str:
        head, _, rest = key.partition(".")
        where = origin.get(head, f"{path}.{head}")
        return f"{where}.{rest}" if rest else where

    ranks = node.get("ranks") or {}
    offset, size = 0, world
    if ranks:
        if not isinstance(ranks, dict) or set(ranks) - {"offset", "size"}:
            problems.add(at("ranks"), f"expected {{offset: int, size: int}}, got {ranks!r}")
        else:
            offset = _int(ranks.get("offset", 0), at("ranks.offset"), problems, minimum=0) or 0
            size = _int(ranks.get("size", world - offset), at("ranks.size"), problems) or 1
    degrees = {d: _int(node.get(d, 1), at(d), problems, allow_rest=True) for d in DEGREES}
    for d, v in degrees.items():
        if v is not None and v > size:
            problems.add(at(d), f"{d}={v:,} is more than the {size:,} ranks of this span (world size {world:,})",
                         "a degree is at most the number of ranks; use -1 to take the rest of the span")
            degrees[d] = None
    rest = [d for d, v in degrees.items() if v == -1]
    if len(rest) > 1:
        problems.add(at(rest[1]), f"only one degree may be -1 (already {rest[0]})")
    elif None not in degrees.values():
        fixed = math.prod(v for v in degrees.values() if v != -1)
        if rest:
            if size % fixed:
                problems.add(at(rest[0]), f"-1 cannot fill the span: {size} ranks do not divide by the "
                             f"other degrees ({fixed})", f"make the span a multiple of {fixed}")
            else:
                degrees[rest[0]] = size // fixed
        elif fixed != size:
            shown = " x ".join(f"{d}={v}" for d, v in degrees.items() if v != 1) or "all 1"
            problems.add(path, f"degrees ({shown}, product {fixed}) do not match the span of {size} ranks "
                         f"(world size {world})", f"use -1 on one degree to take the rest of the span, or run with "
                         f"{fixed} processes")
    ep = _int(node.get("ep", 1), at("ep"), problems)
    if ep and ep > 1 and None not in degrees.values() and -1 not in degrees.values():
        dp = degrees["dp_replicate"] * degrees["dp_shard"]
        if dp % ep:
            problems.add(at("ep"), f"ep={ep} does not divide the data-parallel degree dp_replicate x dp_shard = "
                         f"{degrees['dp_replicate']} x {degrees['dp_shard']} = {dp} ({path})",
                         "expert parallelism splits each MoE layer's experts over groups of ep data-parallel ranks; "
                         "choose an ep that divides dp_replicate x dp_shard")
        if degrees["pp"] > 1:
            problems.add(at("ep"), f"ep={ep} beside pp={degrees['pp']} ({at('pp')}) is not supported yet",
                         "expert parallelism runs beside data and tensor parallelism, not pipeline stages; "
                         "use pp: 1 for this module, or ep: 1")
    sp = _int(node.get("sp", 1), at("sp"), problems)
    if sp and sp > 1 and None not in degrees.values() and -1 not in degrees.values():
        dp = degrees["dp_replicate"] * degrees["dp_shard"]
        if dp % sp:
            problems.add(at("sp"), f"sp={sp} does not divide the data-parallel degree dp_replicate x dp_shard = "
                         f"{degrees['dp_replicate']} x {degrees['dp_shard']} = {dp} ({path})",
                         "sequence parallelism splits each sequence over groups of sp data-parallel ranks; "
                         "choose an sp that divides dp_replicate x dp_shard")
        for key, why in (("pp", "pipeline stages"), ("tp", "tensor parallelism")):
            if degrees[key] > 1:
                problems.add(at("sp"), f"sp={sp} beside {key}={degrees[key]} ({at(key)}) is not supported",
                             f"sequence parallelism runs beside data parallelism (ddp, fsdp), not {why}; use "
                             f"{key}: 1 for this module, or sp: 1")
        if ep and ep > 1:
            problems.add(at("sp"), f"sp={sp} beside ep={ep} ({at('ep')}) is not supported yet",
                         "use sp: 1 or ep: 1 for this module")
    cp = _int(node.get("cp", 1), at("cp"), problems)
    if cp and cp > 1:
        problems.add(at("cp"), "context parallelism is not supported",
                     "torch's context parallel needs CUDA attention kernels (no CPU/gloo rule); use sp: N "
                     "(Ulysses sequence parallelism) for the language module instead")
    tp_plan = node.get("tp_plan", "default")
    if tp_plan not in TP_PLANS:
        problems.add(at("tp_plan"), f"unknown TP plan {tp_plan!r}", did_you_mean(str(tp_plan), TP_PLANS))
    fsdp = node.get("fsdp") or {}
    if not isinstance(fsdp, dict):
        problems.add(at("fsdp"), f"expected a mapping, got {fsdp!r}", f"keys: {', '.join(FSDP_KEYS)}")
        fsdp = {}
    for key, value in fsdp.items():
        if key not in FSDP_KEYS:
            problems.add(at(f"fsdp.{key}"), "unknown key", did_you_mean(key, FSDP_KEYS))
        elif key != "reshard_after_forward" and value is not None and value not in DTYPES:
            problems.add(at(f"fsdp.{key}"), f"unknown dtype {value!r}", did_you_mean(str(value), DTYPES))
    ac = node.get("activation_checkpoint") or {"mode": "none"}
    if isinstance(ac, str):
        ac = {"mode": ac}
    if not isinstance(ac, dict) or ac.get("mode", "none") not in AC_MODES:
        problems.add(at("activation_checkpoint"), f"expected {{mode: none|full|every, every: n}}, got {ac!r}",
                     did_you_mean(str(ac.get("mode") if isinstance(ac, dict) else ac), AC_MODES))
        ac = {"mode": "none"}
    elif ac.get("mode") == "every":
        _int(ac.get("every"), at("activation_checkpoint.every"), problems)
    compile_ = node.get("compile", False)
    if isinstance(compile_, str):
        compile_ = _compile_backend(compile_, at("compile"), problems)
    elif not isinstance(compile_, bool):
        problems.add(at("compile"), f"expected true, false or a torch.compile backend name, got {compile_!r}")
    micro = _int(node.get("microbatches", 1), at("microbatches"), problems)
    loss_parallel = node.get("loss_parallel", True)
    if not isinstance(loss_parallel, bool):
        problems.add(at("loss_parallel"), f"expected true or false, got {loss_parallel!r}",
                     "true: under tp the logits stay sharded over the TP ranks for a vocab-parallel loss; "
                     "false: every TP rank gathers the full logits")
    schedule = node.get("pp_schedule", "1f1b")
    if schedule not in PP_SCHEDULES:
        problems.add(at("pp_schedule"), f"unknown pipeline schedule {schedule!r}",
                     did_you_mean(str(schedule), PP_SCHEDULES) or f"expected one of {', '.join(PP_SCHEDULES)}")
    if len(problems.problems) > n0:
        return None
    return ModuleLayout(name, offset, size, degrees["pp"], degrees["dp_replicate"], degrees["dp_shard"],
                        degrees["tp"], cp or 1, tp_plan, dict(fsdp), dict(ac), compile_, micro or 1, schedule, path,
                        dict(origin), loss_parallel=loss_parallel, ep=ep or 1, sp=sp or 1)


def _check_spans(modules: dict[str, ModuleLayout], raw: dict, world: int, problems: ProblemCollector) -> None:
    covered: set[int] = set()
    for (a, ma), (b, mb) in itertools.combinations(modules.items(), 2):
        same = (ma.offset, ma.size) == (mb.offset, mb.size)
        overlap = set(ma.ranks) & set(mb.ranks)
        if overlap and not same:
            problems.add(raw[b][2].get("ranks", f"{raw[b][1]}.ranks"), f"ranks {ma.offset}-{ma.offset + ma.size - 1} ({a}) and "
                         f"{mb.offset}-{mb.offset + mb.size - 1} ({b}) overlap without being the same span",
                         "spans must be identical (colocated) or disjoint (split)")
    for name, m in modules.items():
        if m.offset + m.size > world:
            problems.add(raw[name][2].get("ranks", f"{raw[name][1]}.ranks"), f"ranks {m.offset}-{m.offset + m.size - 1} lie outside the world "
                         f"of {world} ranks", f"run with at least {m.offset + m.size} processes")
        covered |= set(m.ranks)
    idle = sorted(set(range(world)) - covered)
    if idle and not problems:
        problems.add("parallel.modules", f"ranks {idle} hold no module (world size {world})",
                     "spans must cover every rank")


def resolve(parallel: dict, model, world_size: int | None, *, train: dict | None = None) -> Layout:
    """Parse and check a layout against a (meta) model; raises one ConfigError with every problem."""
    from mimo_spec.parallel.checks import check_batch, check_model, check_train

    problems = ProblemCollector()
    names = [LANGUAGE] + list(model.modalities.keys())
    layout = parse_layout(parallel, names, world_size, problems)
    if layout is not None:
        check_model(layout, model, problems)
        if train is not None:
            check_batch(layout, int(train.get("batch_size", 1)), int(train.get("grad_accum", 1)), problems)
            check_train(layout, train, problems)
    _dedupe(problems)
    problems.raise_if_any()
    return layout


def render_rank_map(layout: Layout) -> str:
    """A table: for every rank, the modules it holds with their (pp, dp_replicate, dp_shard, tp) coordinates."""
    lines = [f"layout {layout.name}: world size {layout.world_size}"]
    for name, m in layout.modules.items():
        degrees = ", ".join(f"{d}={getattr(m, d)}" for d in DEGREES)
        extra = [f"ep={m.ep}" if m.ep > 1 else "", f"sp={m.sp}" if m.sp > 1 else "", f"fsdp={m.fsdp}" if m.fsdp else "", f"ac={m.activation_checkpoint['mode']}"
                 if m.activation_checkpoint.get("mode", "none") != "none" else "", "compile" if m.compile else ""]
        extra_s = "  ".join(e for e in extra if e)
        lines.append(f"  {name}: ranks {m.offset}-{m.offset + m.size - 1}  {degrees}" + (f"  {extra_s}" if extra_s else ""))
    lines.append("rank  " + "  ".join(f"{n:<28}" for n in layout.modules))
    for r in range(layout.world_size):
        cells = []
        for m in layout.modules.values():
            c = m.coords(r)
            if c is None:
                cells.append(f"{'-':<28}")
                continue
            cell = "pp%d dpr%d dps%d tp%d" % tuple(c[d] for d in DEGREES)
            if m.ep > 1:  # this rank's place in its EP group (which experts it holds)
                cell += " ep%d" % ((c["dp_replicate"] * m.dp_shard + c["dp_shard"]) % m.ep)
            if m.sp > 1:  # this rank's slice of every sequence
                cell += " sp%d" % m.sp_index(r)[1]
            cells.append(f"{cell:<28}")
        lines.append(f"{r:>4}  " + "  ".join(cells))
    for name, m in layout.modules.items():
        if m.ep > 1:
            from mimo_spec.parallel.expert import ep_groups

            groups = ep_groups(m)
            lines.append(f"{name}: expert parallel ep={m.ep}, EP groups "
                         f"{' '.join('[' + ','.join(map(str, g)) + ']' for g in groups)} (rank ep<i> of a group holds "
                         f"experts [i*E/{m.ep}, (i+1)*E/{m.ep}) of every MoE layer); "
                         + (f"expert weights {'FSDP-sharded' if m.dp_shard > 1 else 'replicated'} over the "
                            f"{m.dp // m.ep} ranks holding the same experts" if m.dp > m.ep
                            else "each rank the only holder of its experts")
                         + f", everything else data parallel over all {m.dp} ranks")
        if m.sp > 1:
            from mimo_spec.parallel.sequence import sp_groups

            groups = sp_groups(m)
            lines.append(f"{name}: sequence parallel sp={m.sp}, SP groups "
                         f"{' '.join('[' + ','.join(map(str, g)) + ']' for g in groups)} (the ranks of a group see the "
                         f"same samples; rank sp<i> holds tokens [i*S/{m.sp}, (i+1)*S/{m.sp}) of every sequence, "
                         f"attention all-to-all over heads); {m.shares} data-parallel share(s); parameters "
                         + (f"FSDP-sharded over all {m.dp} ranks" if m.dp_shard > 1 else f"replicated on all {m.dp} ranks")
                         + "; encoders run whole on every rank of a group")
    return "\n".join(line.rstrip() for line in lines)


def world_size_from_env() -> int | None:
    """The launcher's world size (torchrun's WORLD_SIZE or SLURM_NTASKS), None when not launched by one
    (read by :func:`mimo_spec.parallel.env.read_env`, the one reader of the launch environment)."""
    from mimo_spec.parallel.env import read_env

    env = read_env()
    return env.world_size if env is not None else None


def check_parallel_config(spec, lm, modalities: dict, problems: ProblemCollector,
                          world_size: int | None = None, train: dict | None = None) -> Layout | None:
    """The hook ``build_model`` runs on the meta-built modules: layout problems join the other config problems.

    The world size is the launcher's (torchrun/SLURM) when there is one, else the layout's own.
    """
    from types import SimpleNamespace

    if not spec.parallel:
        return None
    names = [LANGUAGE] + list(spec.modalities.keys())
    n0 = len(problems.problems)
    layout = parse_layout(spec.parallel, names, world_size or world_size_from_env(), problems)
    if layout is not None and len(problems.problems) == n0 and lm is not None and len(modalities) == len(spec.modalities):
        from mimo_spec.parallel.checks import check_model

        found = ProblemCollector()
        check_model(layout, SimpleNamespace(language_model=lm, modalities=modalities), found)
        if train is not None:  # the per-rank batch and microbatches, the objective under the layout
            from mimo_spec.parallel.checks import check_batch, check_train

            try:
                batch, accum = int(train.get("batch_size", 1)), int(train.get("grad_accum", 1))
            except (TypeError, ValueError):  # the train section's own check reports it
                batch = accum = None
            if batch is not None:
                check_batch(layout, batch, accum, found)
                check_train(layout, train, found)
        _dedupe(found)
        problems.problems.extend(found.problems)
    return layout


def run_layout_action(cfg) -> int:
    """``action=layout [world_size=N]``: check the layout against the model (on meta) and print the rank map."""
    from omegaconf import DictConfig, OmegaConf

    from mimo_spec.builders import build_model

    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    world = plain.get("world_size")
    if world is not None and (isinstance(world, bool) or not isinstance(world, int) or world < 1):
        raise ConfigError(f"expected a positive integer, got {world!r}", path="world_size")
    if world is not None and world > MAX_WORLD:
        raise ConfigError(f"{world:,} ranks is more than mimo-spec lays out (at most {MAX_WORLD:,})",
                          path="world_size", hint="give the number of processes the run will start")
    model = build_model(cfg, device="meta", dtype=cfg.get("dtype"))
    layout = resolve(plain.get("parallel") or {}, model, world or world_size_from_env(), train=plain.get("train"))
    print(render_rank_map(layout))
    return 0


def _compile_backend(name: str, path: str, problems) -> str | bool:
    """A torch.compile backend name, checked against the registered ones (dynamo loads only here)."""
    from torch._dynamo import list_backends, lookup_backend

    known = [b for b in list_backends(exclude_tags=()) if not b.endswith("TESTING_ONLY")]  # torch's own test hooks
    if name not in known:
        problems.add(path, f"unknown torch.compile backend {name!r}: expected true, false or one of "
                     f"{', '.join(sorted(known))}", did_you_mean(name, known))
        return False
    import importlib.util

    # registered is not installed: these backends import their package only when they first compile
    package = {"tvm": "tvm", "openxla": "torch_xla", "openxla_eval": "torch_xla", "onnxrt": "onnxruntime",
               "tensorrt": "torch_tensorrt", "torch_tensorrt": "torch_tensorrt",
               "ipex": "intel_extension_for_pytorch"}.get(name)
    try:
        lookup_backend(name)
        missing = package is not None and importlib.util.find_spec(package) is None
    except Exception:  # noqa: BLE001 - whatever the backend's registration raises
        missing = True
    if missing:
        problems.add(path, f"torch.compile backend {name!r} cannot run here: "
                     f"{'its package ' + repr(package) + ' is not installed' if package else 'it does not load'}",
                     "install it, or use compile: true (inductor)")
        return False
    return name
