"""Optimizers, learning-rate schedules and per-module parameter groups, from YAML."""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import torch
import torch.nn as nn

from mimo_spec.errors import ConfigError, ProblemCollector, did_you_mean

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


def param_groups(model: nn.Module, train_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Split trainable parameters into groups by module-path globs.

    ``train.param_groups`` is a list of ``{modules: <glob or list>, lr: ..., weight_decay: ...}``;
    the first matching group wins; the rest use ``train.lr`` / ``train.weight_decay``.
    Biases and norm weights (1-D tensors) get no weight decay.
    """
    specs = list(train_cfg.get("param_groups") or [])
    problems = ProblemCollector()
    for i, g in enumerate(specs):
        unknown = [k for k in g if k not in ("modules", "lr", "weight_decay")]
        for k in unknown:
            problems.add(f"train.param_groups.{i}.{k}", "unknown key", did_you_mean(k, ["modules", "lr", "weight_decay"]))
        if "modules" not in g:
            problems.add(f"train.param_groups.{i}.modules", "missing: a module path glob or a list of them",
                         "e.g. modules: 'modalities.*.input_projections.*'")
    problems.raise_if_any()
    base_lr, base_wd = float(train_cfg["lr"]), float(train_cfg.get("weight_decay", 0.0))
    buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
    hits = [0] * len(specs)
    module_names = [n for n, _ in model.named_modules()]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        idx = -1
        for i, g in enumerate(specs):
            globs = g["modules"] if isinstance(g["modules"], (list, tuple)) else [g["modules"]]
            if any(fnmatch.fnmatchcase(owner, pat) or fnmatch.fnmatchcase(owner, pat + ".*") for pat in globs):
                idx = i
                hits[i] += 1
                break
        buckets.setdefault((idx, p.ndim >= 2), []).append(p)
    for i, n in enumerate(hits):
        if n == 0:
            problems.add(f"train.param_groups.{i}.modules", f"{specs[i]['modules']!r} matches no trainable parameter",
                         did_you_mean(str(specs[i]["modules"]), [m for m in module_names if m.count(".") <= 3]))
    problems.raise_if_any()
    groups = []
    for (idx, decays), params in sorted(buckets.items(), key=lambda kv: kv[0]):
        spec = specs[idx] if idx >= 0 else {}
        lr = float(spec.get("lr", base_lr))
        wd = float(spec.get("weight_decay", base_wd)) if decays else 0.0
        groups.append({"params": params, "lr": lr, "initial_lr": lr, "weight_decay": wd,
                       "name": f"{spec.get('modules', 'default')}{'' if decays else ' (no decay)'}"})
    if not groups:
        raise ConfigError("no trainable parameters: everything is frozen", path="freeze",
                          hint="unfreeze something, e.g. remove the language model from freeze")
    return groups


def build_optimizer(model: nn.Module, train_cfg: dict[str, Any]) -> torch.optim.Optimizer:
    name = train_cfg.get("optimizer", "adamw")
    groups = param_groups(model, train_cfg)
    if name == "adamw":
        betas = tuple(train_cfg.get("betas", (0.9, 0.95)))
        return torch.optim.AdamW(groups, lr=float(train_cfg["lr"]), betas=betas, eps=float(train_cfg.get("eps", 1e-8)))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=float(train_cfg["lr"]), momentum=float(train_cfg.get("momentum", 0.9)))
    raise ConfigError(f"unknown optimizer {name!r}", path="train.optimizer", hint=did_you_mean(name, OPTIMIZERS))


def lr_factor(step: int, train_cfg: dict[str, Any]) -> float:
    """Multiplier of each group's base lr at ``step`` (0-based): linear warmup, then the schedule."""
    total = int(train_cfg["steps"])
    warmup = int(train_cfg.get("warmup_steps", 0))
    schedule = train_cfg.get("schedule", "cosine")
    floor = float(train_cfg.get("min_lr_ratio", 0.0))
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}", path="train.schedule", hint=did_you_mean(schedule, SCHEDULES))
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, train_cfg: dict[str, Any]) -> float:
    """Apply the schedule for ``step``; returns the first group's lr (for logging)."""
    factor = lr_factor(step, train_cfg)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]
