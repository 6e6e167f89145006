"""The training job: data -> forward/backward -> optimizer, with metrics and checkpoints.

Resuming restores model, optimizer, schedule (a function of the step), RNG and
the data position, so a run stopped at step k and resumed reproduces the
uninterrupted run's losses exactly on CPU. SIGTERM in the loop (even mid-step,
mid-evaluation or mid-save) saves a checkpoint of the last complete step and
ends the run cleanly (exit 0); before the loop it ends the job at once (exit
143, nothing to save). A non-finite loss ends it with a config error (exit 2).
"""

from __future__ import annotations

import functools
import math
import random
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mimo_spec.errors import ConfigError, DataError
from mimo_spec.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from mimo_spec.train.metrics import MetricsWriter, NullMetrics, plot_loss, read_metrics, truncate_metrics
from mimo_spec.train.progress import Silent, log_line, progress_display, say
from mimo_spec.train.optim import build_optimizer, set_lr
from mimo_spec.train.step import (RouterStats, clip_grads, evaluate,  # noqa: F401  (evaluate: jobs import it here)
                                  forward_backward)

if TYPE_CHECKING:  # pragma: no cover
    from omegaconf import DictConfig

    from mimo_spec.run_config import RunConfig

FIELDS = ["step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "padding_fraction", "skipped_samples",
          "eval_loss", "eval_ppl"]
# a mixture-of-experts LM's columns (before eval_loss): its routers' losses (unweighted; "loss" includes them
# weighted) and the most / least loaded expert's tokens over its layer's mean (1.0 / 1.0: perfectly balanced)
MOE_FIELDS = ["router_aux_loss", "router_z_loss", "expert_load_max", "expert_load_min"]



def output_fields(model) -> list[str]:
    """Evaluation's columns for each output modality: its loss, and a discrete one's code accuracy."""
    out = []
    for name, mod in model.modalities.items():
        if getattr(mod, "has_output", False):
            out.append(f"eval_{name}_loss")
            if getattr(mod, "tokenizer", None) is not None:
                out.append(f"eval_{name}_acc")
    return out


# keys that may change between a run and its resumption
RESUMABLE_CHANGES = ("action", "debug", "summary", "eval", "generate", "import_hf", "train.steps", "train.resume",
                     "train.stop_after_steps", "data_scan",
                     "train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint", "train.num_threads",
                     "train.device", "hydra", "parallel", "data.num_workers")


def _resume_candidates(resume: str, out_dir: Path) -> list[Path]:
    """Checkpoints to try, newest first.

    Two runs never share a run directory: starting fresh (``none``) or from another run's
    checkpoint in a directory that holds checkpoints is refused, and so is going back to an
    older checkpoint of this directory while newer ones are there.
    """
    from mimo_spec.rundir import check_fresh_start

    if resume in (None, "", "none", False):
        check_fresh_start(out_dir, "none")
        return []
    if resume == "auto":
        return list_checkpoints(out_dir / "checkpoints")[::-1]
    path = Path(resume)
    if (path / "state.json").exists():
        found = [path]
    else:
        found = (list_checkpoints(path / "checkpoints") or list_checkpoints(path))[::-1]
    if not found:
        raise ConfigError(f"no checkpoint found in {path}", path="train.resume",
                          hint="give a run directory, a checkpoints/step_NNNNNN folder, 'auto' or 'none'")
    own = (out_dir / "checkpoints").resolve()
    if found[0].resolve().parent != own:  # another run's checkpoint: only into a directory of its own
        check_fresh_start(out_dir, resume, source=path)
    else:
        step = _step_of(found[0])
        newer = [p.name for p in list_checkpoints(out_dir / "checkpoints") if _step_of(p) > step]
        if newer:
            raise ConfigError(f"train.resume={resume} goes back to {found[0].name} in {out_dir}, which also holds "
                              f"newer checkpoints ({', '.join(newer)}): the two histories would mix",
                              path="train.resume", hint="resume from it in a new directory (hydra.run.dir=<new dir> "
                              f"train.resume={found[0]}), or delete the newer checkpoints first")
    return found


def _step_of(ckpt: Path) -> int:
    digits = ckpt.name.rpartition("_")[2]
    return int(digits) if digits.isdigit() else -1


_NO_DEFAULT = object()
# keys whose absence from an older record means another value than today's default: the run did not do it
_BEFORE_THE_KEY = {"train.dpo.disable_dropout": False}


def schema_default(path: str, new: dict) -> object:
    """The default a ``train.*`` / ``data.*`` key takes when a config leaves it out (its schema's), or
    _NO_DEFAULT: a checkpoint written before the key existed ran with that default."""
    import pydantic
    from pydantic_core import PydanticUndefined

    from mimo_spec.train.schema import TrainConfig

    if path in _BEFORE_THE_KEY:
        return _BEFORE_THE_KEY[path]
    parts = path.split(".")
    if parts[0] == "train":
        cls = TrainConfig
    elif parts[0] == "data":
        from mimo_spec.data.config import _CONFIG_CLASSES

        cls = _CONFIG_CLASSES.get(str((new.get("data") or {}).get("source", "synthetic")))
    else:
        return _NO_DEFAULT
    for i, name in enumerate(parts[1:], 1):
        field = getattr(cls, "model_fields", {}).get(name) if cls is not None else None
        if field is None:
            return _NO_DEFAULT
        if i == len(parts) - 1:
            value = field.get_default(call_default_factory=True)
            return _NO_DEFAULT if value is PydanticUndefined else (
                value.model_dump() if isinstance(value, pydantic.BaseModel) else value)
        cls = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation,
                                                                                     pydantic.BaseModel) else None
    return _NO_DEFAULT


def config_changes(old: dict, new: dict, prefix: str = "", root: dict | None = None) -> list[str]:
    """Dotted keys whose values differ between two configs (ignoring RESUMABLE_CHANGES). A key the old config
    lacks (a checkpoint from before the key existed) whose new value is its schema default is no change."""
    root = new if root is None else root
    out = []
    for key in sorted(set(old) | set(new), key=str):
        path = f"{prefix}{key}"
        if any(path == k or path.startswith(k + ".") for k in RESUMABLE_CHANGES):
            continue
        if path == "train.dpo" and ((root.get("train") or {}).get("objective", "sft") != "dpo"):
            continue  # DPO's settings do nothing in an SFT run
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, path + ".", root)
        elif a == "<absent>" and b == schema_default(path, root):
            continue
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


def _resume(resume, out_dir: Path, model, optimizer, current: dict, console, drun=None):
    """Load the newest good checkpoint; a damaged one (single-process or DCP) is reported and the
    previous one used. Every read failure is a CheckpointError (load_checkpoint turns DCP's
    CheckpointException, a BaseException, into one)."""
    from mimo_spec.errors import CheckpointError
    from mimo_spec.train.checkpoint import read_state

    damaged: list[str] = []
    for path in _resume_candidates(resume, out_dir):
        try:
            state = read_state(path)
            saved = state.get("config", {})
            if not isinstance(saved, dict) or type(state.get("data_position")) is not int:
                raise CheckpointError("corrupt state.json: no config object or data_position",
                                      path=str(path / "state.json"))
        except CheckpointError as e:
            say(console, f"warning: skipping damaged checkpoint {path}: {e}")
            damaged.append(f"{path} ({e.problems[0].path}: {e.problems[0].message})")
            continue
        changes = config_changes(saved, {k: v for k, v in current.items() if k != "hydra"})
        if changes:
            raise ConfigError(f"cannot resume from {path}: the config changed: " + "; ".join(changes[:10]),
                              path="train.resume", hint="resume with the original config, or start a new run in a "
                              "new directory (hydra.run.dir=<new dir>)")
        try:
            return path, load_checkpoint(path, model, optimizer, drun=drun)
        except CheckpointError as e:
            if getattr(e, "not_damage", False):  # sound, but not for this run (adapters on another base)
                raise
            say(console, f"warning: skipping damaged checkpoint {path}: {e}")
            damaged.append(f"{path} ({e.problems[0].path}: {e.problems[0].message})")
    if damaged:  # the model may hold half-loaded weights: never train on from there
        raise CheckpointError(f"every checkpoint is damaged: {'; '.join(damaged)}", path="train.resume",
                              hint="start a new run in a new directory (hydra.run.dir=<new dir>)")
    return None, None


class Diverged(ConfigError):
    """The loss, the gradient norm or the weights became inf / nan: the run stops without saving them."""


def _diverged(what: str, step: int, ckpt_dir: Path) -> Diverged:
    kept = list_checkpoints(ckpt_dir)
    last = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was saved before it"
    return Diverged(f"{what} at step {step}: the training diverged; nothing from step {step} on was saved ({last})",
                    path="train", hint="lower train.lr, set train.grad_clip (e.g. 1.0), use train.precision=fp32 "
                    "or fp32 weights (dtype), then start again in a new run directory")


def _weights_finite(model, drun=None) -> bool:
    """True when every weight is finite (on every rank: all ranks agree)."""
    # one flag per weight, read back once: a read per weight is a device sync each (thousands for a 7B model)
    flags = [torch.isfinite(local).all() for p in model.parameters()
             for local in [p.to_local() if hasattr(p, "to_local") else p]
             if local.is_floating_point() and local.numel()]
    bad = bool(flags) and not bool(torch.stack([f.to(flags[0].device) for f in flags]).all())
    if drun is not None:
        bad = drun.any_rank(bad)
    return not bad


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), random.getstate(), cuda


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    if state[2] is not None:
        torch.cuda.set_rng_state_all(state[2])


def train(run: RunConfig | DictConfig | dict, out_dir: Path, *, console=None) -> dict[str, Any]:
    """Run the training job of ``run`` in ``out_dir``; returns the final metrics (also in metrics.json).

    ``run``: the typed :class:`~mimo_spec.run_config.RunConfig` (a composed config is checked into one).

    SIGTERM / SIGINT: before the loop, the job ends at once (exit 128 + signal, nothing to save);
    in the loop, at the next sample, micro-batch, eval batch or step, with a checkpoint of the
    last completed step (a step cut short is undone: data position and RNG as at its start).
    A non-finite loss, gradient norm or weight stops the run with :class:`Diverged` (exit 2),
    metrics.json saying ``failed``, and no checkpoint of the bad weights.
    """
    from mimo_spec.run_config import RunConfig
    from mimo_spec.train.limits import JobSignals

    if not isinstance(run, RunConfig):
        run = RunConfig.from_config(run)
    if run.train is None or run.data is None:
        missing = "train" if run.train is None else "data"
        raise ConfigError(f"missing: the {missing} section", path=missing, hint=f"see conf/config.yaml for the "
                          f"{missing} section")
    from mimo_spec.builders.build import parse_dtype

    if parse_dtype(run.dtype) == torch.float16:
        # AdamW's moments would live in fp16 (small squared gradients round to 0) and nothing scales the loss
        raise ConfigError("float16 weights do not train here: the optimizer's state would be fp16 and there is no "
                          "loss scaling, so the run diverges within a few steps", path="dtype",
                          hint="use dtype=bfloat16, or fp32 weights with train.precision=bf16 (eval and generate "
                               "take float16)")
    with JobSignals("building the model and the data") as stop:
        return _train(run, out_dir, console, stop)


def _train(run: RunConfig, out_dir: Path, console, stop) -> dict[str, Any]:
    from mimo_spec.builders import build_model
    from mimo_spec.data import build_dataset, empty_parts, max_length
    from mimo_spec.data.loader import TrainBatches, step_tokens
    from mimo_spec.data.packing import LoaderState
    from mimo_spec.train.bad_samples import SkipLog
    from mimo_spec.data.tokenizer import build_tokenizer
    from mimo_spec.parallel.env import read_env, run_device
    from mimo_spec.run_config import layout_check

    out_dir = Path(out_dir)
    tc = run.train
    seed = run.train_seed
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    torch.manual_seed(seed)
    random.seed(seed)
    device = run_device(tc.device)
    launched = read_env()
    # sized on meta first, with its training state (spread over the launched processes)
    model = build_model(run.model, seed=seed, device=device, dtype=run.dtype, train=tc,
                        world_size=launched.world_size if launched is not None else 1,
                        checks=[layout_check(run.parallel.layout)])
    check_backend_device(model, device)
    from mimo_spec.peft import base_loaded, base_view

    if run.init_from:  # start from imported weights (a resumed checkpoint then overrides them)
        from mimo_spec.weights import load_weights

        with base_view(model, merge=False):  # the base's tensors, strictly; the adapters start fresh
            load_weights(model, Path(run.init_from) / "model.safetensors")
    base_loaded(model)  # adapters: DoRA magnitudes from the base, its fingerprint for the checkpoints
    # the data follows the whole model's modalities: built before a pipeline stage drops some of them
    tokenizer = build_tokenizer(run.data, model)
    train_set = build_dataset(run.data, model, tokenizer, "train")
    eval_set = build_dataset(run.data, model, tokenizer, "eval")
    empty = empty_parts(model)  # what a rank's share lacks of its global batch (all modalities, before any drop)
    objective = None
    if tc.objective == "dpo":  # preference pairs; the reference is the model as it starts (before any layout)
        from mimo_spec.train.preference import DPO

        objective = DPO.prepare(run, model, train_set, eval_set)
    from mimo_spec.parallel.parallelize import apply_one_process, start_parallel

    layout_train = tc.model_dump()  # parallel/ reads the train section as a mapping
    drun = start_parallel(run.parallel.layout, layout_train, model)  # None: one process, the plain loop
    if drun is None:  # the layout's activation checkpointing and compile still apply
        apply_one_process(run.parallel.layout, model, layout_train)
    if objective is not None:
        objective.check_layout(drun)
    main = drun is None or drun.rank == 0
    if not main:
        console = Silent()
    model.train()
    collate_fn = functools.partial(collate_skipping, pad_id=tokenizer.pad_id)  # eval: unusable samples left out
    eval_set = SkippingDataset(eval_set)
    seq_len = max_length(run.data, model)
    if drun is not None and drun.pp > 1:  # stage-to-stage shapes are fixed: pad to the longest sample
        drun.start_pipeline(model, seq_len, tokenizer.pad_id)
    optimizer = build_optimizer(model, tc)
    batch_size, accum = tc.batch_size, tc.grad_accum
    steps, precision = tc.steps, tc.precision
    stop_after = tc.stop_after_steps or 0
    ckpt_every, keep_last = tc.checkpoint.every, tc.checkpoint.keep_last
    from mimo_spec.train.limits import StopRequested, check_step_memory

    check_step_memory(model, train_set, tc, device, world=drun.world_size if drun is not None else 1,
                      sample=measure_samples(train_set, seq_len if run.data.packing else None))

    start_step, data_state, skip_counts = 0, LoaderState(), None
    # the config as checkpoints record it: values from the environment (secrets) stay ${oc.env:...}
    source, state = _resume(tc.resume, out_dir, model, optimizer, run.recorded, console, drun)
    if source is not None:
        start_step = int(state["step"])
        data_state = LoaderState.from_dict(state.get("data_state", state["data_position"]))
        skip_counts = state.get("data_skipped")
        say(console, f"resumed from {source} at step {start_step}")
    # this rank loads and collates its share of every global batch (in data.num_workers processes)
    # (packed rows of data.max_seq_len tokens, or one sample per row)
    batches = TrainBatches(train_set, tokenizer.pad_id, seed=seed, batch_size=batch_size,
                           seq_len=seq_len if run.data.packing else None, state=data_state,
                           share=drun.data_share(batch_size) if drun is not None else None,
                           num_workers=run.data.num_workers, prefetch=run.data.prefetch,
                           on_bad_sample=run.data.on_bad_sample, pin_memory=device.type == "cuda",
                           check=stop.check if drun is None else None)  # one process stops at the next sample
    skips = SkipLog(out_dir if main else None, main, drun, run.data.max_bad_fraction, len(train_set), skip_counts)
    from mimo_spec.components.moe import MoE

    has_moe = any(isinstance(m, MoE) for m in model.modules())
    fields = FIELDS[:-2] + MOE_FIELDS + FIELDS[-2:] if has_moe else FIELDS
    if objective is not None:  # DPO: rewards and accuracy per step; evaluation's loss is the DPO loss
        from mimo_spec.train.preference import EVAL_FIELDS, STEP_FIELDS

        fields = fields[:-2] + STEP_FIELDS + EVAL_FIELDS
    fields = fields + output_fields(model)
    metrics = MetricsWriter(out_dir, fields, resume=source is not None) if main else NullMetrics()
    if source is not None and main:
        truncate_metrics(metrics, start_step)
    if main:  # every check has passed: the run starts, and its record is written now
        from mimo_spec.rundir import run_started

        run_started(out_dir)

    saved_at = {"step": start_step if source is not None else None}

    def save(step: int) -> Path:
        if not _weights_finite(model, drun):  # never a checkpoint of inf / nan weights
            raise _diverged("the weights are not finite", step, out_dir / "checkpoints")
        saved_at["step"] = step
        extra = {"data_position": batches.position, "data_state": batches.state.to_dict(),
                 "data_skipped": skips.counts(), "config": dict(run.recorded)}
        if drun is not None:
            from mimo_spec.train.checkpoint import save_distributed_checkpoint

            return save_distributed_checkpoint(out_dir / "checkpoints", step, model, optimizer, extra, keep_last, drun)
        return save_checkpoint(out_dir / "checkpoints", step, model, optimizer, extra, keep_last)

    status, last_loss, tokens_per_s = "completed", float("nan"), 0.0
    positions_seen = 0
    t_start, tokens_seen = time.perf_counter(), 0
    progress = progress_display(console, steps, start_step)

    def _loop() -> str:
        nonlocal last_loss, tokens_per_s, tokens_seen, positions_seen
        status = "completed"
        for step in range(start_step, steps):
            lr = set_lr(optimizer, step, tc)
            optimizer.zero_grad(set_to_none=True)
            state0, rng0 = batches.state, _rng_state()
            try:
                micro = []
                for _ in range(accum):
                    micro.append(batches.next())
                    vote()
                skips.update(micro)  # skipped samples logged and counted; too many stop the run
                # the global batches' token counts; shares padded to the global batch's length
                micro, total_tokens, real_tokens = step_tokens(micro, drun, tokenizer.pad_id, empty)
                positions = sum(int(b["input_ids"].numel()) for b in micro)
                total_tokens = max(1, total_tokens)
                t0 = time.perf_counter()
                step_loss = 0.0
                router = RouterStats()
                for n_micro, batch in enumerate(micro):
                    if n_micro and poll is not None:
                        poll()
                    # forward, loss, backward for this layout; one global token count normalises every
                    # micro-batch's gradient (mimo_spec/train/step.py)
                    step_loss += forward_backward(model, batch, total_tokens, device=device, precision=precision,
                                                  drun=drun, router_stats=router, objective=objective)
            except StopRequested:  # undo the step cut short: data position, RNG and gradients as at its start
                batches.rewind(state0)
                _set_rng_state(rng0)
                optimizer.zero_grad(set_to_none=True)
                if objective is not None:
                    objective.reset()
                if step > start_step and saved_at["step"] != step:
                    save(step)
                    say(console, f"received signal {stop.signal} during step {step + 1}: saved checkpoint at step "
                                 f"{step}, stopping (resume with train.resume)")
                else:
                    say(console, f"received signal {stop.signal} during step {step + 1}: "
                                 + (f"the checkpoint of step {step} is already saved" if saved_at["step"] == step
                                    else "no step completed, nothing to save") + ", stopping")
                return "interrupted"
            if drun is not None:  # (FSDP2 sums its gradients in backward; clip_grads sums the replicated ones)
                step_loss = drun.all_sum(step_loss)
            grad_norm = clip_grads(model, tc.grad_clip, drun)
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):  # same on every rank (all-summed)
                what = f"the loss is {step_loss}" if not math.isfinite(step_loss) else f"the gradient norm is {grad_norm}"
                raise _diverged(what, step + 1, out_dir / "checkpoints")
            optimizer.step()
            moe_row = _router_step(model, router, drun) if has_moe else {}
            elapsed = time.perf_counter() - t0
            tokens_seen += real_tokens
            local_real = sum(int(b["attention_mask"].sum()) for b in micro)
            if drun is not None:  # every share's positions (a ratio: each share's peers count alike)
                positions, local_real = drun.all_sum(float(positions)), drun.all_sum(float(local_real))
            padding = 1.0 - local_real / max(1.0, positions)
            positions_seen += positions
            tokens_per_s = real_tokens / max(elapsed, 1e-9)
            last_loss = step_loss
            done = step + 1
            row = {"step": done, "loss": round(step_loss, 6), "lr": lr, "grad_norm": round(grad_norm, 6),
                   "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(time.perf_counter() - t_start, 3),
                   "padding_fraction": round(padding, 4), "skipped_samples": skips.bad + skips.dropped, **moe_row}
            if objective is not None:  # every rank: the pair sums are all-reduced
                row.update(objective.step_row(drun))
            run_eval = evaluate if objective is None else objective.evaluate
            eval_every = tc.eval_every
            if len(eval_set) and ((eval_every and done % eval_every == 0) or done == steps):
                if drun is not None and (drun.split or drun.pipeline) is not None:  # no rank holds the whole model
                    scores = run_eval(model, eval_set, collate_fn, batch_size, tc.eval_batches, precision, device,
                                      drun=drun)
                else:
                    asked = (lambda: stop.signal is not None) if drun is None else \
                        (lambda: drun.any_rank(stop.signal is not None))
                    try:
                        scores = run_eval(model, eval_set, collate_fn, batch_size, tc.eval_batches, precision,
                                          device, should_stop=asked, drun=drun)
                    except StopRequested:  # the step itself is complete: its checkpoint is saved below
                        stop.signal = stop.signal or signal.SIGTERM
                        scores = {}
                row.update({k: v for k, v in scores.items() if k != "eval_tokens"})
            metrics.log(row)
            progress.update(done, step_loss, tokens_per_s)
            if done % tc.log_every == 0 or done == steps:
                say(console, log_line(row, steps))
            if drun is not None and drun.any_rank(stop.signal is not None) and stop.signal is None:
                stop.signal = signal.SIGTERM  # another rank was signalled: stop together (the save is collective)
            if stop.signal is not None or (stop_after and done - start_step >= stop_after and done < steps):
                save(done)
                why = f"received signal {stop.signal}" if stop.signal is not None else f"stop_after_steps={stop_after}"
                say(console, f"{why}: saved checkpoint at step {done}, stopping (resume with train.resume)")
                return "interrupted"
            if (ckpt_every and done % ckpt_every == 0) or done == steps:
                save(done)
        return status

    failure: Diverged | None = None
    # one process stops at the next sample; several stop together at the next micro-batch (a collective vote)
    poll = stop.check if drun is None else None

    def vote() -> None:
        if drun is not None and drun.any_rank(stop.signal is not None):
            stop.signal = stop.signal or signal.SIGTERM
            raise StopRequested()

    with stop.phase("training", defer=True), progress:
        try:
            status = _loop()
            if status == "completed":
                skips.require_some_used()  # a short run on unusable data trained on fillers only
        except Diverged as e:
            status, failure = "failed", e
            say(console, f"error: {e}")
        except DataError:
            # the data is unusable (too many bad samples): a fresh run that logged no step leaves no metrics
            if source is None and not metrics.rows_written:
                metrics.discard()
            raise
        finally:
            batches.close()  # the loader's worker processes end with the loop
    stop.doing, stop.deferred = "writing the run's metrics", True  # short: finish them, then end
    metrics.close()
    if main:
        plot_loss(metrics.path, out_dir / "loss.png")
    rows = read_metrics(metrics.path) if main else metrics.rows
    if not positions_seen and rows:  # no step ran here (the run was already complete): its own last numbers
        last_loss = float(rows[-1]["loss"])
    result = {
        "status": status, "steps": int(rows[-1]["step"]) if rows else start_step,
        "final_loss": last_loss, "first_loss": float(rows[0]["loss"]) if rows else float("nan"),
        "eval_loss": next((float(r["eval_loss"]) for r in reversed(rows) if r.get("eval_loss")), None),
        "tokens_per_s": (tokens_seen / max(time.perf_counter() - t_start, 1e-9) if positions_seen or not rows
                         else float(rows[-1].get("tokens_per_s") or 0.0)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "wall_time_s": time.perf_counter() - t_start, "bad_samples": skips.bad, "dropped_samples": skips.dropped,
        "samples_read": skips.read,
        "padding_fraction": (round(1.0 - tokens_seen / positions_seen, 4) if positions_seen else
                             float(rows[-1]["padding_fraction"]) if rows and rows[-1].get("padding_fraction") else None),
        "packing": bool(run.data.packing),
    }
    if failure is not None:  # metrics.json says why the run failed, and which checkpoint is still good
        kept = list_checkpoints(out_dir / "checkpoints")
        result.update(error=str(failure), last_checkpoint=str(kept[-1]) if kept else None)
    if main:
        from mimo_spec.atomic import write_json_atomic

        write_json_atomic(out_dir / "metrics.json", result)
    if failure is not None:
        if drun is not None:  # every rank failed at the same step (the values are all-reduced): end together
            from mimo_spec.parallel.env import shutdown_distributed

            shutdown_distributed()
        raise failure
    return result


def _router_step(model, router: RouterStats, drun) -> dict[str, float]:
    """After the optimizer step of a mixture-of-experts LM: the step's router numbers summed over the
    data-parallel ranks (layouts where every rank runs the whole LM; under pipeline stages no router numbers
    are collected, under split layouts each LM rank keeps its own), the aux-loss-free router biases moved
    by the step's expert loads (``router_bias_update_rate``), and the metrics row's MoE fields: CSV columns
    :data:`MOE_FIELDS`, and per layer ``expert_load_max/layer_i`` / ``expert_load_min/layer_i`` for
    TensorBoard."""
    from mimo_spec.components.moe import load_ratio

    if drun is not None and drun.split is None and drun.pipeline is None:  # every rank holds the numbers
        import torch.distributed as dist

        if router.counts is not None:
            router.aux_loss, router.z_loss = drun.all_sum(router.aux_loss), drun.all_sum(router.z_loss)
            dist.all_reduce(router.counts)  # summed over ranks (and replicas: ratios and signs stay the same)
    if router.counts is None:
        return {}
    lm = getattr(model, "language_model", None)
    if callable(getattr(lm, "update_router_bias", None)):
        lm.update_router_bias(router.counts)
    high, low = load_ratio(router.counts)
    row = {"router_aux_loss": round(router.aux_loss, 6), "router_z_loss": round(router.z_loss, 6),
           "expert_load_max": round(high, 4), "expert_load_min": round(low, 4)}
    layers = getattr(lm, "moe_layer_ids", None) or range(router.counts.shape[0])
    for i, counts in zip(layers, router.counts):
        high, low = load_ratio(counts[None])
        row[f"expert_load_max/layer_{i}"], row[f"expert_load_min/layer_{i}"] = high, low
    return row


def check_backend_device(model, device: torch.device, path: str = "train.device") -> None:
    """transformer-engine layers run on CUDA only: a te model on another device is a config error."""
    if device.type != "cuda" and any(getattr(m, "backend", None) == "te" for m in model.modules()):
        raise ConfigError(f"the model uses transformer-engine layers (backend te), which run on CUDA only, but "
                          f"the device is {device}", path=path, hint="set train.device=cuda, or backend: local")


class SkippingDataset(torch.utils.data.Dataset):
    """An eval set whose unusable samples (DataError: bad or dropped) come back as None: left out of the batch."""

    def __init__(self, dataset):
        self.dataset = dataset
        if hasattr(dataset, "max_len"):
            self.max_len = dataset.max_len

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        from mimo_spec.errors import DataError

        try:
            return self.dataset[index]
        except DataError:
            return None


def collate_skipping(samples: list, pad_id: int) -> dict:
    """``collate`` of the usable samples (a filler that trains nothing when none is)."""
    from mimo_spec.data.batch import collate, filler_sample

    kept = [s for s in samples if s is not None]
    return collate(kept or [filler_sample({"input_ids": torch.tensor([int(pad_id)])})], pad_id)


def measure_samples(dataset, seq_len: int | None, n: int = 8) -> tuple[float, float]:
    """(bytes, tokens) of a typical training row, for the memory check: the mean of the first ``n`` usable
    samples; a packed row holds ``seq_len`` tokens (and items in proportion)."""
    from mimo_spec.errors import DataError
    from mimo_spec.train.limits import tensor_bytes

    sizes = []
    for i in range(min(len(dataset), 4 * n)):
        try:
            s = dataset[i]
        except DataError:
            continue
        # a preference pair is two rows (chosen and rejected): its tokens are both rows'
        rejected = s.get("rejected_input_ids")
        rows = int(s["input_ids"].shape[0]) + (int(rejected.shape[0]) if rejected is not None else 0)
        sizes.append((tensor_bytes(s), rows))
        if len(sizes) == n:
            break
    if not sizes:
        return 0.0, float(seq_len or 0)
    nbytes = sum(b for b, _ in sizes) / len(sizes)
    tokens = sum(t for _, t in sizes) / len(sizes)
    if seq_len is None:
        return nbytes, tokens
    return nbytes * seq_len / max(tokens, 1.0), float(seq_len)


def model_max_len(model) -> int:
    return int(getattr(model.language_model, "max_seq_len", 0) or 2048)
