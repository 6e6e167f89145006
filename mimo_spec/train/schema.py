"""The ``train`` config section, checked with pydantic before a run starts."""

from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict

from mimo_spec.errors import ConfigError, Problem, did_you_mean


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckpointConfig(_Strict):
    every: pydantic.NonNegativeInt = 0
    keep_last: pydantic.NonNegativeInt = 2


class ParamGroupConfig(_Strict):
    modules: str | list[str]
    lr: pydantic.PositiveFloat | None = None
    weight_decay: pydantic.NonNegativeFloat | None = None


class TrainConfig(_Strict):
    steps: pydantic.PositiveInt
    batch_size: pydantic.PositiveInt
    grad_accum: pydantic.PositiveInt = 1
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: pydantic.PositiveFloat
    betas: tuple[float, float] = (0.9, 0.95)
    eps: pydantic.PositiveFloat = 1e-8
    momentum: pydantic.NonNegativeFloat = 0.9
    weight_decay: pydantic.NonNegativeFloat = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: pydantic.NonNegativeInt = 0
    min_lr_ratio: float = pydantic.Field(0.0, ge=0.0, le=1.0)
    grad_clip: pydantic.PositiveFloat | None = None
    precision: Literal["fp32", "bf16"] = "fp32"
    param_groups: list[ParamGroupConfig] = []
    log_every: pydantic.PositiveInt = 10
    eval_every: pydantic.NonNegativeInt = 0
    eval_batches: pydantic.PositiveInt | None = None
    checkpoint: CheckpointConfig = CheckpointConfig()
    stop_after_steps: pydantic.PositiveInt | None = None
    resume: str | None = "auto"
    seed: int = 0
    num_threads: pydantic.PositiveInt | None = None
    device: str | None = None


def _fields_at(loc: list[str]) -> dict:
    model: Any = TrainConfig
    for part in loc[:-1]:
        if part.isdigit():  # a list index: stay on the item model
            continue
        field = model.model_fields.get(part)
        if field is None:
            return {}
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif getattr(ann, "__args__", None) and isinstance(ann.__args__[0], type) and issubclass(ann.__args__[0], BaseModel):
            model = ann.__args__[0]
    return model.model_fields


def validate_train_config(train_cfg: Any) -> TrainConfig:
    """Raise one ConfigError naming ``train.<key>`` for every problem."""
    from omegaconf import DictConfig, OmegaConf

    raw = OmegaConf.to_container(train_cfg, resolve=True) if isinstance(train_cfg, DictConfig) else dict(train_cfg or {})
    try:
        return TrainConfig(**raw)
    except pydantic.ValidationError as e:
        problems = []
        for err in e.errors():
            loc = [str(p) for p in err["loc"]]
            path = "train." + ".".join(loc)
            if err["type"] == "extra_forbidden":
                problems.append(Problem(path, "unknown key", did_you_mean(loc[-1], _fields_at(loc))))
            elif err["type"] == "missing":
                problems.append(Problem(path, "missing required value", f"set {path}=..."))
            else:
                problems.append(Problem(path, f"{err['msg'].lower()}, got {err.get('input')!r}",
                                        "see mimo_spec/conf/train/default.yaml for the expected values"))
        raise ConfigError(problems) from None
