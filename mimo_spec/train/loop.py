"""The training job: data -> forward/backward -> optimizer, with metrics and checkpoints.

Resuming restores model, optimizer, schedule (a function of the step), RNG and
the data position, so a run stopped at step k and resumed reproduces the
uninterrupted run's losses exactly on CPU. SIGTERM saves a checkpoint and
ends the run cleanly (exit 0).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mimo_spec.errors import ConfigError, InputError
from mimo_spec.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from mimo_spec.train.metrics import MetricsWriter, NullMetrics, plot_loss, read_metrics, truncate_metrics
from mimo_spec.train.progress import Silent, log_line, progress_display, say
from mimo_spec.train.optim import build_optimizer, set_lr

FIELDS = ["step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "eval_loss", "eval_ppl"]


def _plain(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


class DataStream:
    """Deterministic sample order: epoch e is a permutation seeded by (seed, e).

    The position (samples consumed so far) is all a checkpoint needs to resume it.
    """

    def __init__(self, dataset, seed: int, position: int = 0):
        if len(dataset) == 0:
            raise InputError("the training set is empty", path="data", hint="check data.path / data.num_samples")
        self.dataset, self.seed, self.position = dataset, seed, position
        self._epoch, self._order = -1, None

    def take(self, n: int) -> list:
        out = []
        for _ in range(n):
            epoch, offset = divmod(self.position, len(self.dataset))
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order, self._epoch = torch.randperm(len(self.dataset), generator=g).tolist(), epoch
            out.append(self.dataset[self._order[offset]])
            self.position += 1
        return out


def _autocast(precision: str, device: torch.device | str = "cpu"):
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(x, device: torch.device | str):
    """Tensors, and nested dicts of them (``modality_inputs``), moved to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def model_kwargs(batch: dict, device: torch.device) -> dict:
    """The collated batch as MimoModel.forward keyword arguments, on ``device``."""
    kw = {"input_ids": to_device(batch["input_ids"], device), "labels": to_device(batch["labels"], device),
          "modality_inputs": to_device(batch.get("modality_inputs") or {}, device)}
    if batch.get("output_targets"):
        kw["output_targets"] = to_device(batch["output_targets"], device)
    return kw


def evaluate(model, dataset, collate_fn, batch_size: int, max_batches: int | None, precision: str = "fp32",
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Token-weighted loss and perplexity over (the first ``max_batches`` batches of) ``dataset``."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    n = len(dataset)
    batches = range(0, n, batch_size)
    with torch.no_grad(), _autocast(precision, device):
        for b, start in enumerate(batches):
            if max_batches and b >= max_batches:
                break
            batch = collate_fn([dataset[i] for i in range(start, min(n, start + batch_size))])
            out = model(**model_kwargs(batch, device))
            tokens = int(batch["num_tokens"])
            total_nll += float(out.lm_loss) * tokens
            total_tokens += tokens
    model.train()
    loss = total_nll / max(total_tokens, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": total_tokens}


# keys that may change between a run and its resumption
RESUMABLE_CHANGES = ("action", "debug", "summary", "eval", "generate", "import_hf", "train.steps", "train.resume",
                     "train.stop_after_steps",
                     "train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint", "train.num_threads",
                     "train.device", "hydra", "parallel")


def _resume_candidates(resume: str, out_dir: Path) -> list[Path]:
    """Checkpoints to try, newest first."""
    if resume in (None, "", "none", False):
        return []
    if resume == "auto":
        return list_checkpoints(out_dir / "checkpoints")[::-1]
    path = Path(resume)
    if (path / "state.json").exists():
        return [path]
    found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
    if not found:
        raise ConfigError(f"no checkpoint found in {path}", path="train.resume",
                          hint="give a run directory, a checkpoints/step_NNNNNN folder, 'auto' or 'none'")
    return found[::-1]


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs (ignoring RESUMABLE_CHANGES)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        path = f"{prefix}{key}"
        if any(path == k or path.startswith(k + ".") for k in RESUMABLE_CHANGES):
            continue
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


def _resume(resume, out_dir: Path, model, optimizer, current: dict, console, drun=None):
    """Load the newest good checkpoint; a damaged one is reported and the previous one used."""
    import json

    damaged: list[str] = []
    for path in _resume_candidates(resume, out_dir):
        try:
            saved = json.loads((path / "state.json").read_text()).get("config", {})
        except (OSError, json.JSONDecodeError) as e:
            say(console, f"warning: skipping damaged checkpoint {path}: {e}")
            damaged.append(str(path))
            continue
        changes = config_changes(saved, {k: v for k, v in current.items() if k != "hydra"})
        if changes:
            raise ConfigError(f"cannot resume from {path}: the config changed: " + "; ".join(changes[:10]),
                              path="train.resume", hint="resume with the original config, or start fresh with "
                              "train.resume=none (or a new run directory)")
        try:
            return path, load_checkpoint(path, model, optimizer, drun=drun)
        except InputError as e:
            say(console, f"warning: skipping damaged checkpoint {path}: {e}")
            damaged.append(str(path))
    if damaged:  # the model may hold half-loaded weights: never train on from there
        raise InputError(f"every checkpoint is damaged: {', '.join(damaged)}", path="train.resume",
                         hint="start fresh with train.resume=none")
    return None, None


class _StopFlag:
    """Set by SIGTERM (and SIGINT): the loop saves a checkpoint and returns."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: DictConfig | dict, out_dir: Path, *, console=None) -> dict[str, Any]:
    """Run the training job of ``cfg`` in ``out_dir``; returns the final metrics (also in metrics.json)."""
    from mimo_spec.builders import build_model
    from mimo_spec.train.data import build_dataset, collate
    from mimo_spec.train.tokenizer import build_tokenizer

    out_dir = Path(out_dir)
    tc = _plain(cfg["train"])
    seed = int(tc.get("seed", cfg.get("seed", 0)))
    if tc.get("num_threads"):
        torch.set_num_threads(int(tc["num_threads"]))
    torch.manual_seed(seed)
    random.seed(seed)
    from mimo_spec.parallel.env import run_device

    device = run_device(tc.get("device"))
    model = build_model(cfg, seed=seed, device=device)
    check_backend_device(model, device)
    if cfg.get("init_from"):  # start from imported weights (a resumed checkpoint then overrides them)
        from mimo_spec.weights import load_weights

        load_weights(model, Path(cfg["init_from"]) / "model.safetensors")
    # the data follows the whole model's modalities: built before a pipeline stage drops some of them
    tokenizer = build_tokenizer(cfg["data"], model)
    train_set = build_dataset(cfg["data"], model, tokenizer, "train")
    eval_set = build_dataset(cfg["data"], model, tokenizer, "eval")
    from mimo_spec.parallel.apply import apply_one_process, start_parallel

    drun = start_parallel(_plain(cfg.get("parallel") or {}), tc, model)  # None: one process, the plain loop
    if drun is None:  # the layout's activation checkpointing and compile still apply
        apply_one_process(_plain(cfg.get("parallel") or {}), model, tc)
    main = drun is None or drun.rank == 0
    if not main:
        console = Silent()
    model.train()
    collate_fn = lambda samples: collate(samples, tokenizer.pad_id)  # noqa: E731
    if drun is not None and drun.pp > 1:  # stage-to-stage shapes are fixed: pad to the longest sample
        drun.start_pipeline(model, int(getattr(train_set, "max_len", model_max_len(model))), tokenizer.pad_id)
    optimizer = build_optimizer(model, tc)
    batch_size, accum = int(tc["batch_size"]), int(tc.get("grad_accum", 1))
    steps, precision = int(tc["steps"]), tc.get("precision", "fp32")
    stop_after = int(tc.get("stop_after_steps") or 0)
    ckpt_cfg = tc.get("checkpoint", {})
    ckpt_every, keep_last = int(ckpt_cfg.get("every", 0)), int(ckpt_cfg.get("keep_last", 2))

    start_step, position = 0, 0
    current = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    source, state = _resume(tc.get("resume", "auto"), out_dir, model, optimizer, current, console, drun)
    if source is not None:
        start_step, position = int(state["step"]), int(state["data_position"])
        say(console, f"resumed from {source} at step {start_step}")
    stream = DataStream(train_set, seed, position)
    metrics = MetricsWriter(out_dir, FIELDS, resume=source is not None) if main else NullMetrics()
    if source is not None and main:
        truncate_metrics(metrics, start_step)

    def save(step: int) -> Path:
        extra = {"data_position": stream.position, "config": _plain(cfg) if isinstance(cfg, dict) else
                 OmegaConf.to_container(cfg, resolve=True)}
        extra["config"].pop("hydra", None)
        if drun is not None:
            from mimo_spec.train.checkpoint import save_distributed_checkpoint

            return save_distributed_checkpoint(out_dir / "checkpoints", step, model, optimizer, extra, keep_last, drun)
        return save_checkpoint(out_dir / "checkpoints", step, model, optimizer, extra, keep_last)

    dropped = getattr(train_set, "num_dropped", 0)
    if dropped:
        say(console, f"data: dropped {dropped} samples ({getattr(train_set, 'drop_reasons', {})})")
    status, last_loss, tokens_per_s = "completed", float("nan"), 0.0
    t_start, tokens_seen = time.perf_counter(), 0
    progress = progress_display(console, steps, start_step)
    with _StopFlag() as stop, progress:
        for step in range(start_step, steps):
            lr = set_lr(optimizer, step, tc)
            optimizer.zero_grad(set_to_none=True)
            micro = [collate_fn(stream.take(batch_size)) for _ in range(accum)]
            total_tokens = max(1, sum(int(b["num_tokens"]) for b in micro))
            t0 = time.perf_counter()
            step_loss = 0.0
            for batch in micro:
                if drun is not None and drun.split is not None:  # encoders on their own ranks (global batch)
                    with _autocast(precision, device):
                        step_loss += drun.split.run(batch, total_tokens, train=True)
                    continue
                if drun is not None:
                    batch = drun.local_batch(batch, model)
                if drun is not None and drun.pipeline is not None:  # the schedule runs forward and backward
                    with _autocast(precision, device):
                        step_loss += drun.pipeline.train_batch(batch, total_tokens)
                    continue
                model.prepare_inputs(batch["input_ids"], batch.get("modality_inputs") or {},
                                     items_per_sample=batch.get("items_per_sample"))
                with _autocast(precision, device):
                    out = model(**model_kwargs(batch, device))
                # one global token count normalises every micro-batch's gradient
                weight = int(batch["num_tokens"]) / total_tokens
                (out.loss * weight).backward()
                step_loss += float(out.loss.detach()) * weight
            if drun is not None:
                drun.sync_grads(model)
                step_loss = drun.all_sum(step_loss)
                grad_norm = drun.clip_grad_norm(model, tc.get("grad_clip"))
            else:
                grad_norm = _clip(model, tc.get("grad_clip"))
            optimizer.step()
            elapsed = time.perf_counter() - t0
            real_tokens = sum(int(b["attention_mask"].sum()) for b in micro)
            tokens_seen += real_tokens
            tokens_per_s = real_tokens / max(elapsed, 1e-9)
            last_loss = step_loss
            done = step + 1
            row = {"step": done, "loss": round(step_loss, 6), "lr": lr, "grad_norm": round(grad_norm, 6),
                   "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(time.perf_counter() - t_start, 3)}
            eval_every = int(tc.get("eval_every", 0))
            if len(eval_set) and ((eval_every and done % eval_every == 0) or done == steps):
                if drun is not None and (drun.split or drun.pipeline) is not None:  # no rank holds the whole model
                    from mimo_spec.parallel.pipeline import evaluate_distributed

                    scores = evaluate_distributed(drun, eval_set, collate_fn, batch_size, tc.get("eval_batches"))
                else:
                    scores = evaluate(model, eval_set, collate_fn, batch_size, tc.get("eval_batches"), precision, device)
                row.update({k: v for k, v in scores.items() if k != "eval_tokens"})
            metrics.log(row)
            progress.update(done, step_loss, tokens_per_s)
            if done % int(tc.get("log_every", 10)) == 0 or done == steps:
                say(console, log_line(row, steps))
            if drun is not None and drun.any_rank(stop.signal is not None) and stop.signal is None:
                stop.signal = signal.SIGTERM  # another rank was signalled: stop together (the save is collective)
            if stop.signal is not None or (stop_after and done - start_step >= stop_after and done < steps):
                save(done)
                status = "interrupted"
                why = f"received signal {stop.signal}" if stop.signal is not None else f"stop_after_steps={stop_after}"
                say(console, f"{why}: saved checkpoint at step {done}, stopping (resume with train.resume)")
                break
            if (ckpt_every and done % ckpt_every == 0) or done == steps:
                save(done)
    metrics.close()
    if main:
        plot_loss(metrics.path, out_dir / "loss.png")
    rows = read_metrics(metrics.path) if main else metrics.rows
    result = {
        "status": status, "steps": int(rows[-1]["step"]) if rows else start_step,
        "final_loss": last_loss, "first_loss": float(rows[0]["loss"]) if rows else float("nan"),
        "eval_loss": next((float(r["eval_loss"]) for r in reversed(rows) if r.get("eval_loss")), None),
        "tokens_per_s": tokens_seen / max(time.perf_counter() - t_start, 1e-9),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "wall_time_s": time.perf_counter() - t_start, "dropped_samples": dropped,
    }
    if main:
        tmp = out_dir / ".metrics.json.tmp"
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out_dir / "metrics.json")
    return result


def check_backend_device(model, device: torch.device, path: str = "train.device") -> None:
    """transformer-engine layers run on CUDA only: a te model on another device is a config error."""
    if device.type != "cuda" and any(getattr(m, "backend", None) == "te" for m in model.modules()):
        raise ConfigError(f"the model uses transformer-engine layers (backend te), which run on CUDA only, but "
                          f"the device is {device}", path=path, hint="set train.device=cuda, or backend: local")


def model_max_len(model) -> int:
    return int(getattr(model.language_model, "max_seq_len", 0) or 2048)


def _clip(model, max_norm) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(params, float(max_norm)))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])))
