"""The ``train``, ``eval`` and ``generate`` config sections, checked with pydantic before a run starts.

Every float must be finite (``inf`` / ``nan`` are refused), seeds are integers in [0, 2**63),
and ``train.device`` must name a device this machine has.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from mimo_spec.errors import ConfigError, Problem, did_you_mean


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# torch.Generator.manual_seed takes at most 64 bits; the data order mixes the seed with the epoch
SEED_MAX = 2**63 - 1
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
DEVICE_TYPES = ("cpu", "cuda", "mps")


class CheckpointConfig(_Strict):
    every: pydantic.NonNegativeInt = 0
    keep_last: pydantic.NonNegativeInt = 2


class ParamGroupConfig(_Strict):
    modules: str | list[str]
    lr: pydantic.PositiveFloat | None = None
    weight_decay: pydantic.NonNegativeFloat | None = None


class DPOConfig(_Strict):
    """``train.dpo``: direct preference optimisation (``train.objective: dpo``, see ``mimo_spec.train.preference``)."""

    # how far the policy may move from the reference: the loss is -logsigmoid(beta * the log-ratio difference)
    beta: pydantic.PositiveFloat = 0.1
    # conservative DPO: the share of pairs assumed mislabelled (0: plain DPO)
    label_smoothing: float = Field(0.0, ge=0.0, le=0.5)
    # the policy's dropout off (TRL's default): its first log-probabilities equal the reference's (loss log 2)
    disable_dropout: bool = True


class TrainConfig(_Strict):
    steps: pydantic.PositiveInt
    batch_size: pydantic.PositiveInt
    grad_accum: pydantic.PositiveInt = 1
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: pydantic.PositiveFloat
    betas: tuple[Beta, Beta] = (0.9, 0.95)
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
    seed: Seed = 0
    num_threads: int | None = Field(None, ge=1, le=4096)
    device: str | None = None
    # sft: next-token loss on the answers; dpo: preference pairs (chosen / rejected answers) against a frozen reference
    objective: Literal["sft", "dpo"] = "sft"
    dpo: DPOConfig = DPOConfig()


class EvalConfig(_Strict):
    """``eval``: the held-out loss of a checkpoint (``action=eval``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)

    checkpoint: str | None = None
    batches: pydantic.PositiveInt | None = None  # null: the whole held-out split


class GenerateConfig(_Strict):
    """``generate``: continue a prompt from a checkpoint (``action=generate``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)

    checkpoint: str | None = None
    prompt: str = "Describe the image."
    images: list[str] = []
    audio: list[str] = []
    videos: list[str] = []  # video files or frame folders (a model with a video modality)
    max_new_tokens: pydantic.PositiveInt = 32
    strategy: Literal["greedy", "sample"] = "greedy"  # the strategies generate() implements
    temperature: float = Field(1.0, ge=0.0)
    top_k: pydantic.NonNegativeInt = 0  # 0: off
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # 1.0: off
    kv_cache: bool = True
    seed: Seed = 0
    output_modality: str | None = None  # start an item of this output modality at once (after the prompt)
    guidance_scale: float = 1.0  # classifier-free guidance of a discrete output modality's codes (1: off)

    @pydantic.field_validator("temperature")
    @classmethod
    def _sampling_needs_a_temperature(cls, value: float, info):
        if info.data.get("strategy") == "sample" and value <= 0:
            raise ValueError("must be greater than 0 when sampling (strategy=greedy picks the most likely token)")
        return value


SECTIONS: dict[str, type[BaseModel]] = {}  # filled below: section name -> schema


def check_device(value: Any, path: str = "train.device") -> None:
    """A device this machine can run a job on: cpu, cuda / cuda:N where CUDA has that GPU, mps where present."""
    import torch

    if value is None or value == "":
        return
    hint = "use cpu, cuda or cuda:N (or null: this process's GPU where there is one, else cpu)"
    try:
        device = torch.device(str(value))
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"unknown device {value!r}", path=path, hint=hint) from None
    if device.type == "meta":
        raise ConfigError("the meta device holds no data: a job cannot run on it", path=path,
                          hint="action=summary and action=validate build on meta by themselves; " + hint)
    if device.type not in DEVICE_TYPES:
        raise ConfigError(f"unsupported device type {device.type!r} in {value!r}", path=path, hint=hint)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {value!r} asked for, but CUDA is not available on this machine", path=path,
                              hint="use train.device=cpu, or run on a machine with a GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {value!r}: this machine has {torch.cuda.device_count()} GPU(s) "
                              f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})", path=path, hint=hint)
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device {value!r} asked for, but MPS is not available on this machine", path=path,
                          hint=hint)


def _fields_at(model: Any, loc: list[str]) -> dict:
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


def _plain(cfg: Any, section: str) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"expected a mapping, got {type(cfg).__name__} {cfg!r}", path=section,
                          hint=f"see conf/config.yaml for the {section} section")
    return dict(cfg)


def validate_section(section: str, cfg: Any, schema: type[BaseModel] | None = None) -> Any:
    """Check one config section against its schema; one ConfigError naming ``<section>.<key>`` per problem."""
    schema = schema or SECTIONS[section]
    raw = _plain(cfg, section)
    where = "conf/train/default.yaml" if section == "train" else "conf/config.yaml"
    try:
        return schema(**raw)
    except pydantic.ValidationError as e:
        problems = []
        for err in e.errors():
            loc = [str(p) for p in err["loc"]]
            path = ".".join([section, *loc])
            if err["type"] == "extra_forbidden":
                problems.append(Problem(path, "unknown key", did_you_mean(loc[-1], _fields_at(schema, loc))))
            elif err["type"] == "missing":
                problems.append(Problem(path, "missing required value", f"set {path}=..."))
            else:
                msg = err["msg"].lower().removeprefix("value error, ")
                got = err.get("input")
                problems.append(Problem(path, msg if isinstance(got, dict) else f"{msg}, got {got!r}",
                                        f"see {where} for the expected values"))
        raise ConfigError(problems) from None


def validate_train_config(train_cfg: Any) -> TrainConfig:
    """Raise one ConfigError naming ``train.<key>`` for every problem."""
    checked = validate_section("train", train_cfg, TrainConfig)
    check_device(checked.device)
    return checked


def validate_eval_config(eval_cfg: Any) -> EvalConfig:
    return validate_section("eval", eval_cfg, EvalConfig)


def validate_generate_config(generate_cfg: Any) -> GenerateConfig:
    return validate_section("generate", generate_cfg, GenerateConfig)


class SummaryConfig(_Strict):
    depth: Annotated[pydantic.StrictInt, Field(ge=1, le=1000)] = 3  # levels of the module tree action=summary prints


def validate_summary_config(summary_cfg: Any) -> SummaryConfig:
    return validate_section("summary", summary_cfg, SummaryConfig)


SECTIONS.update(train=TrainConfig, eval=EvalConfig, generate=GenerateConfig, summary=SummaryConfig)
