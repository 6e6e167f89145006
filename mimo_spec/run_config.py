"""One typed run config: what the app composed, checked once, handed to every job.

The app composes a config with Hydra, builds the model on the meta device (the model's own
checks plus the parallel layout's, one error listing every problem), then turns the rest of
the config into a :class:`RunConfig`: each section (``train``, ``data``, ``eval``,
``generate``, ``summary``) validated by its own schema exactly once, every problem reported
together in one ConfigError. Everything below the app (the training loop, the optimizer,
eval, generate, summary) reads typed attributes (``run.train.lr``), never the raw config.

The raw config survives in one place only: :meth:`RunConfig.recorded`, the resolved config a
checkpoint's ``state.json`` records (values read from the environment stay ``${oc.env:...}``)
and a resumed run compares against.

Imports stay lazy here: ``action=summary`` starts through this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable

from mimo_spec.errors import ConfigError, ProblemCollector

if TYPE_CHECKING:  # pragma: no cover
    from mimo_spec.data.config import DataConfig
    from mimo_spec.spec import MimoSpec
    from mimo_spec.train.schema import EvalConfig, GenerateConfig, SummaryConfig, TrainConfig

# the sections a run config may hold, each checked by its own schema
SECTIONS = ("train", "data", "eval", "generate", "summary")


@dataclass
class ParallelConfig:
    """The ``parallel`` layout as the config gives it (a plain mapping). Its schema and its fit to a
    model and a world size are checked by :mod:`mimo_spec.parallel.layout`, which resolves it into a
    :class:`~mimo_spec.parallel.layout.Layout` for a given world size."""

    layout: dict[str, Any] = field(default_factory=dict)
    world_size: int | None = None  # ``world_size=N`` on the command line (``action=layout``)

    def __bool__(self) -> bool:
        return bool(self.layout)


@dataclass
class RunConfig:
    """A whole run, typed: the model spec, the parallel layout and every checked section.

    A section the config does not hold is None (``summary`` defaults to its schema's defaults).
    """

    action: str
    model: MimoSpec
    parallel: ParallelConfig
    train: TrainConfig | None = None
    data: DataConfig | None = None
    eval: EvalConfig | None = None
    generate: GenerateConfig | None = None
    summary: SummaryConfig | None = None
    seed: int = 0
    dtype: str | None = None
    init_from: str | None = None
    allow_imports: list[str] = field(default_factory=list)
    source: Any = field(default=None, repr=False)  # the composed config (DictConfig or dict) it was made from
    # the command line's overrides (the CLI's): eval / generate check which of them a checkpoint's run can take
    command_overrides: tuple[str, ...] = ()

    @cached_property
    def recorded(self) -> dict[str, Any]:
        """The config a checkpoint records and a resumed run compares against: resolved, except that
        values from the environment stay ``${oc.env:...}``; without Hydra's own node."""
        from mimo_spec.env_secrets import record_config
        from omegaconf import DictConfig

        cfg = self.source
        recorded = record_config(cfg) if isinstance(cfg, DictConfig) else _plain_dict(cfg)
        recorded.pop("hydra", None)
        return recorded

    @property
    def train_seed(self) -> int:
        """The seed of a training run: ``train.seed`` when the train section sets one, else ``seed``."""
        if self.train is not None and "seed" in self.train.model_fields_set:
            return int(self.train.seed)
        return int(self.seed)

    @classmethod
    def from_config(cls, cfg: Any, *, spec: MimoSpec | None = None,
                    sections: tuple[str, ...] = SECTIONS) -> "RunConfig":
        """Check ``cfg`` (a composed DictConfig or a plain dict) once and type it.

        ``spec``: the model spec already checked (e.g. ``model.spec`` of the meta model the app
        built); else the config's model section is read into one (shape only). ``sections``: the
        sections this action needs (``action=summary`` needs only ``summary``); the others stay None.
        Raises one ConfigError listing every problem of every section, and of the top-level seed.
        """
        from mimo_spec.train.schema import SEED_MAX

        validators = _validators()
        problems = ProblemCollector()
        checked: dict[str, Any] = {}
        for section in sections:
            if section in cfg:
                try:
                    checked[section] = validators[section](cfg[section])
                except ConfigError as e:
                    problems.extend(e)
        seed = cfg.get("seed", 0)
        if "train" in sections and not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= SEED_MAX):
            problems.add("seed", f"expected an integer in [0, 2**63), got {type(seed).__name__} {seed!r}",
                         "set seed=0 (or any integer below 2**63)")
        problems.raise_if_any()
        if "summary" in sections and "summary" not in checked:
            checked["summary"] = validators["summary"](None)
        if spec is None:
            from mimo_spec.spec import from_config

            spec = from_config(cfg)
        allow = spec.allow_imports
        return cls(action=str(cfg.get("action", "train")), model=spec,
                   parallel=ParallelConfig(_plain_layout(cfg.get("parallel")), _world(cfg.get("world_size"))),
                   seed=seed if isinstance(seed, int) else 0, dtype=cfg.get("dtype"),
                   init_from=cfg.get("init_from") or None, allow_imports=list(allow), source=cfg, **checked)


def _validators() -> dict[str, Callable[[Any], Any]]:
    from mimo_spec.train.schema import (validate_eval_config, validate_generate_config, validate_summary_config,
                                        validate_train_config)

    def data(value):
        from mimo_spec.data.config import validate_data_config

        return validate_data_config(value)

    return {"train": validate_train_config, "data": data, "eval": validate_eval_config,
            "generate": validate_generate_config, "summary": validate_summary_config}


def _plain_dict(cfg: Any) -> dict[str, Any]:
    from omegaconf import DictConfig

    return _resolved(cfg) if isinstance(cfg, DictConfig) else dict(cfg or {})


def _resolved(value: Any) -> Any:
    """``value`` as plain containers, resolved (OmegaConf's exception when a ``${...}`` fails)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _plain_layout(parallel: Any) -> dict[str, Any]:
    """The ``parallel`` mapping as plain containers ({} when it is none, or not a mapping, or a
    ``${...}`` in it fails: the model's check reports those)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        plain = _resolved(parallel)
    except OmegaConfBaseException:
        return {}
    return dict(plain) if isinstance(plain, dict) else {}


def _world(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def layout_check(parallel: Any, world_size: int | None = None, train: Any = None) -> Callable:
    """A check for :func:`~mimo_spec.builders.build_model`'s ``checks``: the ``parallel`` layout against
    the modules built on the meta device, its problems joining the model's in one ConfigError.

    The world size is ``world_size``, else the launcher's (torchrun / SLURM), else the layout's own.
    """
    def check(spec, lm, modalities: dict, problems: ProblemCollector) -> None:
        from types import SimpleNamespace

        from omegaconf.errors import OmegaConfBaseException

        from mimo_spec.parallel.layout import check_parallel_config

        try:
            plain = _resolved(parallel)
        except OmegaConfBaseException:  # a failed ${...}: the model's check has reported it
            return
        plain = plain or {}
        if not isinstance(plain, dict):
            problems.add("parallel", f"expected a parallel layout (a mapping), got {plain!r}",
                         "choose one with parallel=<layout>, e.g. parallel=single")
        elif plain:
            try:
                train_plain = _resolved(train) if train is not None else None
            except OmegaConfBaseException:  # the train section's own check reports it
                train_plain = None
            check_parallel_config(SimpleNamespace(parallel=plain, modalities=spec.modalities), lm, modalities,
                                  problems, world_size, train=train_plain if isinstance(train_plain, dict) else None)

    return check


def build_meta_model(cfg: Any):
    """The config's model on the meta device (nothing allocated), checked together with its parallel
    layout: one ConfigError lists the model's problems and the layout's."""
    from mimo_spec.builders import build_model

    # the batch and microbatch checks and world_size= (as action=layout takes it) as a launched run meets them
    check = layout_check(cfg.get("parallel"), _world(cfg.get("world_size")), train=cfg.get("train"))
    return build_model(cfg, device="meta", dtype=cfg.get("dtype"), checks=[check])
