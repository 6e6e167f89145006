"""Human-readable views of a model: the module tree with parameter counts, and the registry."""

from __future__ import annotations

import torch
import torch.nn as nn


def _fmt(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _counts(module: nn.Module, seen: set[int] | None = None) -> tuple[int, int]:
    """(trainable, frozen) parameter counts, each shared tensor counted once."""
    seen = set() if seen is None else seen
    trainable = frozen = 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen


def _label(module: nn.Module) -> str:
    label = getattr(module, "_registry_name", None) or type(module).__name__
    if isinstance(getattr(module, "inputs_from", None), str):  # its items go through another modality's weights
        label = f"{label} -> {module.inputs_from}"
    return f"{label} [te]" if getattr(module, "backend", None) == "te" else label


def summary_rows(model: nn.Module, depth: int = 3) -> list[tuple[str, str, int, int]]:
    """(indented name, component, trainable, frozen) rows down to ``depth`` levels."""
    rows: list[tuple[str, str, int, int]] = []

    def visit(module: nn.Module, name: str, level: int) -> None:
        t, f = _counts(module)
        rows.append(("  " * level + name, _label(module), t, f))
        if level + 1 >= depth:
            return
        children = list(module.named_children())
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(children) > 1:
            # runs of equal blocks (same component, same trainable / frozen counts) collapse into one row each,
            # with one block's counts: an MoE LM's dense first layer, a frozen layer or one with adapters keeps a
            # row of its own
            runs: list[list] = []
            for child_name, child in children:
                key = (_label(child), _counts(child))
                if runs and runs[-1][0] == key:
                    runs[-1][2] = child_name
                    runs[-1][3] += 1
                else:
                    runs.append([key, child_name, child_name, 1])
            if len(runs) < len(children):
                for (label, (t1, f1)), first, last, n in runs:
                    name_ = f"[{first}..{last}]" if n > 1 else f"[{first}]"
                    rows.append(("  " * (level + 1) + name_, f"{n} x {label}" if n > 1 else label, t1, f1))
                return
        for child_name, child in children:
            if isinstance(child, nn.ModuleDict):  # show dict entries directly: encoders.clip
                for key, grandchild in child.items():
                    visit(grandchild, f"{child_name}.{key}", level + 1)
            elif any(True for _ in child.parameters()):
                visit(child, child_name, level + 1)

    for name, child in model.named_children():
        if isinstance(child, nn.ModuleDict):
            for key, grandchild in child.items():
                visit(grandchild, f"{name}.{key}", 0)
        else:
            visit(child, name, 0)
    return rows


def render_summary(model: nn.Module, dtype: torch.dtype = torch.float32, depth: int = 3) -> str:
    """The module tree with parameter counts (trainable / frozen) and bytes at ``dtype``."""
    itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
    rows = summary_rows(model, depth)
    width = max([len(r[0]) for r in rows] + [20]) + 2
    kind_w = max([len(r[1]) for r in rows] + [10]) + 2
    head = f"{'module':<{width}}{'component':<{kind_w}}{'params':>10}{'trainable':>12}{'frozen':>10}{'bytes':>13}"
    lines = [head, "-" * len(head)]
    for name, kind, t, f in rows:
        lines.append(f"{name:<{width}}{kind:<{kind_w}}{_fmt(t + f):>10}{_fmt(t):>12}{_fmt(f):>10}"
                     f"{_bytes((t + f) * itemsize):>13}")
    t, f = _counts(model)
    lines.append("-" * len(head))
    lines.append(f"{'total':<{width}}{'':<{kind_w}}{_fmt(t + f):>10}{_fmt(t):>12}{_fmt(f):>10}"
                 f"{_bytes((t + f) * itemsize):>13}")
    lines.append(f"exact: {t + f:,} parameters ({t:,} trainable, {f:,} frozen) at {str(dtype).removeprefix('torch.')}")
    lines += _adapter_lines(model, t, t + f)
    lines += _active_lines(model)
    lines += _placeholder_lines(model)
    return "\n".join(lines)


def _adapter_lines(model: nn.Module, trainable: int, total: int) -> list[str]:
    """LoRA / DoRA adapters (mimo_spec.peft): their parameters per kind and rank, and what trains."""
    from mimo_spec.peft import adapters_of

    groups: dict[tuple[str, int], list[int]] = {}
    for _, _, ad in adapters_of(model):
        g = groups.setdefault((ad.kind, ad.rank), [0, 0])
        g[0] += 1
        g[1] += sum(p.numel() for p in ad.parameters())
    if not groups:
        return []
    count = sum(g[1] for g in groups.values())
    kinds = ", ".join(f"{kind} rank {rank} on {n} layers" for (kind, rank), (n, _) in sorted(groups.items()))
    return [f"adapters: {count:,} parameters ({kinds}); trainable with them: {trainable:,} of {total:,} "
            f"({100 * trainable / max(total, 1):.2f}%), the rest frozen"]


def _active_lines(model: nn.Module) -> list[str]:
    """A mixture-of-experts model's parameters per token: all but the routed experts a token skips."""
    from mimo_spec.components.moe import MoE, active_parameters

    counts = active_parameters(model)
    if counts is None:
        return []
    total, active = counts
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    routes = sorted({f"{m.top_k} of {m.num_experts}" for m in moes})
    return [f"active per token: {active:,} of {total:,} parameters ({_fmt(active)} of {_fmt(total)}; "
            f"{' / '.join(routes)} routed experts in each of {len(moes)} MoE layers)"]


def _first_tensor(inputs: dict) -> torch.Tensor:
    """The first keyword tensor of a modality's inputs ``{encoder: {name: tensor}}``."""
    return next(iter(next(iter(inputs.values())).values()))


def _placeholder_lines(model: nn.Module) -> list[str]:
    """Per input modality, the placeholders one item takes in the LM's sequence: a fixed count, or for
    items of any size (grid inputs) the count of the encoder's example item with its grid."""
    lines = []
    for name, mod in getattr(model, "modalities", {}).items():
        if not getattr(mod, "has_input", False) or not hasattr(mod, "item_tokens"):
            continue
        src = mod.src
        example = mod.example_inputs(1, generator=torch.Generator())
        tokens = mod.item_tokens(example)[0]
        declared = [g for enc in src.encoders.values() for g in (getattr(enc, "grid_inputs", None) or {})]
        given = [example[e][g] for e in example for g in declared if g in example[e]]
        if given:
            row = given[0][0]  # a mask row (an audio item's frames) is told by its count, not value by value
            shown = tuple(row.tolist()) if row.numel() <= 8 else f"{int(row.ne(0).sum())} of {row.numel()} set"
            lines.append(f"modalities.{name}: placeholders per item from its grid ({' or '.join(declared)}; e.g. "
                         f"{shown}: {tokens})")
        elif getattr(mod, "item_kind", None) == "video" and _first_tensor(example).dim() == 5:  # (N, frames, ...)
            frames = _first_tensor(example).shape[1]
            lines.append(f"modalities.{name}: placeholders per video from its frames (e.g. {frames} frames: {tokens})")
        else:
            lines.append(f"modalities.{name}: {tokens} placeholders per item")
    for name, mod in getattr(model, "modalities", {}).items():  # output modalities: positions per generated item
        if getattr(mod, "has_output", False) and getattr(mod, "tokenizer", None) is not None:
            mode = "LM tokens" if mod.code_token_offset is not None else "its own head"
            lines.append(f"modalities.{name}: generates items of {mod.num_generation_tokens} codes ({mod.num_codes} "
                         f"codes, as {mode}) between begin / end tokens {mod.begin_token_id} / {mod.end_token_id}")
    return lines


def render_registry() -> str:
    """Every registered component per kind: parameters with types and defaults, docstring's first line."""
    from mimo_spec.builders.binding import signature_of, type_name
    from mimo_spec.registry import REGISTRIES, load_builtins

    load_builtins()
    out = []
    for kind, reg in REGISTRIES.items():
        names = reg.names()
        if not names:
            continue
        out.append(f"{kind}:")
        for name in names:
            cls = reg.get(name)
            doc = (cls.__doc__ or "").strip().splitlines()
            out.append(f"  {name}  ({cls.__module__}.{cls.__qualname__})  {doc[0] if doc else ''}")
            params, subs, _ = signature_of(cls)
            for pname, (hint, default) in params.items():
                d = "required" if default is ... else f"default {default!r}"
                out.append(f"      {pname}: {type_name(hint)}  [{d}]")
            for sname, skind in subs.items():
                out.append(f"      submodules.{sname}: {skind or 'component'}")
    return "\n".join(out)
