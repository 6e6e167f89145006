"""Resource limits and signals for the jobs (train, eval, generate).

Memory: what a step, a dataset's sample order, a generation or a decoded file needs is
estimated *before* it is allocated and compared with what the machine (or the GPU) has; what
cannot fit is refused with an error naming the key or file, the estimate and the limit, instead
of swapping or being killed hours later. The estimates are lower bounds (what must be held at
the same time), so a config that fits is never refused.

Signals: :class:`JobSignals` makes SIGTERM / SIGINT end a job promptly. While nothing
consistent could be saved (building the model or the data, loading a checkpoint, evaluating or
generating as a job of its own) a signal ends the job at once with a message and exit code
128 + signal; while the training loop runs, it sets a flag the loop polls at consistent points
(between samples, micro-batches, eval batches and steps) and the loop saves a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any

from mimo_spec.errors import ConfigError

# ------------------------------------------------------------------------------------- memory


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def _cgroup_limit() -> int | None:
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(f).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def machine_memory() -> int:
    """Physical memory of this machine in bytes (or the container's limit, when lower)."""
    total = 0
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        try:
            for line in open("/proc/meminfo"):
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    if total <= 0:
        total = 2**62  # unknown: refuse nothing on memory grounds
    limit = _cgroup_limit()
    return min(total, limit) if limit else total


def device_memory(device: Any = None) -> int:
    """Memory of ``device``: the GPU's own for a CUDA device, else the machine's."""
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory)
    return machine_memory()


def require_fits(need: float, limit: int, what: str, path: str, hint: str, cls: type[ConfigError] = ConfigError,
                 where: str = "this machine") -> None:
    """Raise ``cls`` naming ``path`` when ``need`` bytes exceed ``limit``."""
    if need > limit:
        raise cls(f"{what} needs at least {human_bytes(need)}, more than the {human_bytes(limit)} of memory "
                  f"{where} has", path=path, hint=hint)


# ------------------------------------------------------------------------------------ signals


class Interrupted(SystemExit):
    """A job ended by SIGTERM / SIGINT where nothing consistent could be saved (exit 128 + signal)."""


class StopRequested(Exception):
    """Raised inside the training loop at a consistent point when a signal asked it to stop."""


class JobSignals:
    """SIGTERM / SIGINT handling for one job (see the module docstring).

    ``phase(doing)``: a signal ends the job at once (message on stderr, exit 128 + signal).
    ``phase(doing, defer=True)``: a signal only sets ``.signal``; the caller polls it.
    A signal that arrived during a deferred phase ends the job when an immediate phase begins.
    """

    def __init__(self, doing: str = "starting"):
        self.signal: int | None = None
        self.doing, self.deferred = doing, False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "JobSignals":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers (the caller's own apply)
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        if not self.deferred:
            self.abort()

    def abort(self, saved: str = "nothing was saved") -> None:
        """End the job now for the signal received: a message, then exit 128 + signal."""
        name = signal.Signals(self.signal).name if self.signal else "signal"
        print(f"mimo-spec: interrupted: {name} received while {self.doing}; {saved}", file=sys.stderr, flush=True)
        raise Interrupted(128 + int(self.signal or 15))

    @contextlib.contextmanager
    def phase(self, doing: str, defer: bool = False):
        old = (self.doing, self.deferred)
        self.doing, self.deferred = doing, defer
        try:
            if not defer and self.signal is not None:
                self.abort()
            yield self
        finally:
            self.doing, self.deferred = old

    def check(self) -> None:
        """Raise StopRequested when a signal has arrived (the loop's polling point)."""
        if self.signal is not None:
            raise StopRequested()


# --------------------------------------------------------------------------------- estimates

PER_SAMPLE_OVERHEAD = 1024  # a sample's Python objects (dicts, tensor headers) besides its tensor data


def tensor_bytes(x: Any) -> int:
    """Bytes of the tensors in a (nested) sample or batch."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(tensor_bytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(tensor_bytes(v) for v in x)
    return 0


def _lm_shape(model) -> tuple[int, int]:
    """(hidden size, layers) of the model's language model (0 when it does not say)."""
    lm = getattr(model, "language_model", None)
    hidden = int(getattr(lm, "hidden_size", 0) or 0)
    layers = int(getattr(lm, "num_layers", 0) or 0)
    return hidden, layers


def step_memory(model, sample_bytes: float, sample_tokens: float, batch_size: int, grad_accum: int,
                optimizer: str = "adamw", world: int = 1) -> dict[str, float]:
    """Lower bounds of what one training step holds at once.

    ``host``: the step's samples and their collated micro-batches (all micro-batches are
    collated before the first forward, so the global token count can weight each of them);
    ``device``: gradients and optimizer state of the trainable weights, plus the activations one
    micro-batch keeps for the backward pass (at least the input of every LM layer and one
    intermediate of the same size, in 4-byte floats), shared over ``world`` processes.
    """
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    states = {"adamw": 2, "sgd": 1}.get(optimizer, 2)
    hidden, layers = _lm_shape(model)
    activations = batch_size * sample_tokens * hidden * max(layers, 1) * 4 * 2
    return {"host": 2 * grad_accum * batch_size * (sample_bytes + PER_SAMPLE_OVERHEAD),
            "device": (trainable * (1 + states) + activations) / max(world, 1),
            "activations": activations / max(world, 1)}


def _measure(dataset, n: int = 8) -> tuple[float, float]:
    """Mean bytes and tokens of the first ``n`` samples of ``dataset``."""
    count = min(n, len(dataset))
    if count == 0:
        return 0.0, 0.0
    samples = [dataset[i] for i in range(count)]
    return (sum(tensor_bytes(s) for s in samples) / count,
            sum(int(s["input_ids"].shape[0]) for s in samples) / count)


def _setting(train: Any, name: str) -> Any:
    """One ``train`` setting from a TrainConfig; from a mapping of some of its keys (a Python caller
    sizing a model by hand), the key or else TrainConfig's own default (defaults live there only)."""
    if isinstance(train, dict):
        from mimo_spec.train.schema import TrainConfig

        return train[name] if name in train else TrainConfig.model_fields[name].default
    return getattr(train, name)


def check_step_memory(model, dataset, tc: Any, device: Any = None, world: int = 1,
                      sample: tuple[float, float] | None = None, host_only: bool = False) -> None:
    """Refuse a ``train.batch_size`` / ``train.grad_accum`` whose step cannot fit in memory, before
    any of it is allocated. ``sample``: (bytes, tokens) of a typical sample, else measured on ``dataset``.
    ``host_only``: only what every process holds whatever the layout (the step's samples), for a
    config checked before its world size is known."""
    import torch

    batch, accum = int(_setting(tc, "batch_size")), int(_setting(tc, "grad_accum") or 1)
    sample_bytes, sample_tokens = sample if sample is not None else _measure(dataset)
    need = step_memory(model, sample_bytes, sample_tokens, batch, accum, _setting(tc, "optimizer"), world)
    if host_only:
        need["device"] = 0.0
    host_limit = machine_memory()
    device = torch.device(device) if device is not None else torch.device("cpu")
    on_gpu = device.type == "cuda"
    one_micro = need["host"] / accum  # the samples of one micro-batch
    what = (f"one step of train.batch_size={batch} x train.grad_accum={accum} "
            f"(~{sample_tokens:.0f} tokens and {human_bytes(sample_bytes)} per sample)")
    hint_batch = "lower train.batch_size (raise train.grad_accum to keep the effective batch)"
    hint_accum = "lower train.grad_accum: every micro-batch of a step is collated before the first forward"
    if on_gpu:
        require_fits(need["device"], device_memory(device), what + " on the GPU", "train.batch_size", hint_batch,
                     where=f"the GPU {device}")
        require_fits(need["host"], host_limit, what, "train.grad_accum" if accum > 1 and one_micro < host_limit
                     else "train.batch_size", hint_accum if accum > 1 and one_micro < host_limit else hint_batch)
        return
    total = need["host"] + need["device"]
    if total > host_limit:
        alone = one_micro + need["device"]  # with grad_accum 1
        blame_accum = accum > 1 and alone <= host_limit
        require_fits(total, host_limit, what, "train.grad_accum" if blame_accum else "train.batch_size",
                     hint_accum if blame_accum else hint_batch)


def check_generation_memory(model, prompt_tokens: int, max_new_tokens: int, device: Any = None) -> None:
    """Refuse a KV cache for ``prompt_tokens + max_new_tokens`` that cannot fit (before allocating it)."""
    lm = getattr(model, "language_model", None)
    layers, kv_heads = int(getattr(lm, "num_layers", 0) or 0), int(getattr(lm, "num_kv_heads", 0) or 0)
    head_dim = int(getattr(lm, "head_dim", 0) or 0)
    weight = next(iter(model.parameters()), None)
    size = weight.element_size() if weight is not None else 4
    need = 2 * layers * (prompt_tokens + max_new_tokens) * kv_heads * head_dim * size
    require_fits(need, device_memory(device), f"the KV cache for {prompt_tokens} prompt + {max_new_tokens} new tokens",
                 "generate.max_new_tokens", "lower generate.max_new_tokens")


def model_memory(model, train: Any = None, world: int = 1) -> tuple[int, float]:
    """(parameter count, lower bound of the bytes one process holds for ``model``'s weights).

    The weights and buffers, at their element sizes (every process builds the whole model before a
    parallel layout shards it); for training (``train``: the train section) also the gradients of the
    trainable weights and the optimizer's state in fp32 (AdamW: 2 copies, SGD with momentum: 1),
    which a sharded layout spreads over ``world`` processes.
    """
    count = weights = trainable = grads = 0
    for p in model.parameters():
        count += p.numel()
        weights += p.numel() * p.element_size()
        if p.requires_grad:
            trainable += p.numel()
            grads += p.numel() * p.element_size()
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    need = float(weights)
    if train is not None:
        optimizer = _setting(train, "optimizer")
        states = 2 if optimizer == "adamw" else 1 if float(_setting(train, "momentum") or 0) > 0 else 0
        need += (grads + states * 4 * trainable) / max(int(world), 1)
    return count, need


def check_model_memory(model, device: Any = None, train: Any = None, world: int = 1) -> None:
    """Refuse a model whose weights (and, for training, gradients and optimizer state) cannot fit on
    ``device``, from a copy of it built on the meta device: before any weight is allocated."""
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "meta":
        return
    count, need = model_memory(model, train, world)
    on_gpu = device.type == "cuda"
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    what = (f"the model ({count:,} parameters" + (f" and {human_bytes(buffers)} of buffers" if buffers >= 2**20 else "")
            + (", with its gradients and optimizer state" if train else "") + ")")
    hint = ("use a smaller model, build it in bfloat16 (dtype=bfloat16), or shard it across more processes "
            "(e.g. parallel=fsdp under torchrun)" + (", or freeze part of it (freeze=[...]) / use "
                                                      "train.optimizer=sgd" if train else ""))
    require_fits(need, device_memory(device) if on_gpu else machine_memory(), what, "model", hint,
                 where=f"the GPU {device}" if on_gpu else "this machine")
