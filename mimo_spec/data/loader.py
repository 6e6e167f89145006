"""Training batches: a ``torch.utils.data.DataLoader`` over a resumable, per-rank batch sampler.

The order is fixed by the seed alone: epoch ``e`` is ``torch.randperm(len(dataset))`` seeded with
``(seed * 1_000_003 + e) % 2**64``, and the global position ``p`` (samples consumed by the whole
run) is sample ``order_e[p % len]`` of epoch ``p // len``. Each training micro-batch is the next
``batch_size`` positions of that order (the *global* batch, which may straddle two epochs).

A rank loads and collates only its *share* of every global batch: samples ``[lo, hi)``, which for
data parallelism is ``[i * B / dp, (i + 1) * B / dp)`` of data-parallel rank ``i`` (see
``ParallelContext.data_share``); a share of ``None`` is the whole global batch (one process, and
ranks that need every item: split-layout encoders, bridged modalities). The position, the one
number a checkpoint stores (``data_position`` in state.json), counts global samples, so a run
resumes exactly under any layout and with any ``data.num_workers``.

Samples are built (media decoded, synthetic items rendered) and collated in ``data.num_workers``
worker processes (0: in the training process). A sample depends only on its index, never on the
worker that builds it, so the batches -- and the losses -- are the same for every worker count.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from mimo_spec.data.batch import pad_batch
from mimo_spec.errors import DataError, MimoError


class SampleOrder:
    """The dataset index at each global position: epoch ``e`` is a permutation seeded by (seed, e)."""

    def __init__(self, size: int, seed: int):
        from mimo_spec.train.limits import machine_memory, require_fits

        if size == 0:
            raise DataError("the training set is empty", path="data", hint="check data.path / data.num_samples")
        # an epoch's order is one int64 permutation of the dataset, held in memory
        require_fits(8 * size, machine_memory(), f"the sample order of {size:,} training samples",
                     "data.num_samples", "lower data.num_samples (one epoch); more steps repeat the epochs")
        self.size, self.seed = int(size), int(seed)
        self._epoch, self._perm = -1, None

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(int(position), self.size)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**64)
            self._perm, self._epoch = torch.randperm(self.size, generator=g).tolist(), epoch
        return self._perm[offset]


class ShareSampler(torch.utils.data.Sampler):
    """A batch sampler without end: from global position ``start``, for every global batch of
    ``batch_size`` positions, the dataset indices of its samples ``share = (lo, hi)`` (None: all)."""

    def __init__(self, order: SampleOrder, batch_size: int, share: tuple[int, int] | None = None, start: int = 0):
        lo, hi = share if share is not None else (0, batch_size)
        if not 0 <= lo < hi <= batch_size:
            raise ValueError(f"share {share} is not a non-empty part of a batch of {batch_size}")
        self.order, self.batch_size, self.lo, self.hi, self.start = order, int(batch_size), lo, hi, int(start)

    def __iter__(self):
        position = self.start
        while True:
            yield [self.order[position + k] for k in range(self.lo, self.hi)]
            position += self.batch_size


class _Polled(torch.utils.data.Dataset):
    """``dataset`` calling ``check()`` (a signal poll) before each sample: in-process loading only."""

    def __init__(self, dataset, check: Callable[[], None]):
        self.dataset, self.check = dataset, check

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        self.check()
        return self.dataset[index]


class _Raised:
    """A user-facing error (bad data: a ``MimoError``) raised in a worker process, carried to the training
    process as it is (DataLoader would re-raise it as a new exception holding the worker's traceback)."""

    def __init__(self, error: MimoError):
        self.error = error


class _Carrying(torch.utils.data.Dataset):
    """``dataset`` in worker processes: a sample that raises a MimoError becomes a :class:`_Raised`."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except MimoError as e:
            return _Raised(e)


class _CarryingCollate:
    """``collate_fn`` in worker processes: passes a :class:`_Raised` sample (or collate's own MimoError) on."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, samples: list):
        raised = next((s for s in samples if isinstance(s, _Raised)), None)
        if raised is not None:
            return raised
        try:
            return self.collate_fn(samples)
        except MimoError as e:
            return _Raised(e)


class TrainBatches:
    """This rank's micro-batches, in the run's order, from global position ``position`` on.

    ``next()`` returns the next collated micro-batch (this rank's share of the next global batch)
    and advances :attr:`position` by the global ``batch_size``. ``rewind(position)`` goes back (a
    step cut short is undone); batches prefetched past it are dropped. ``check`` (in-process
    loading only) is called before each sample, so a signal stops a long batch early.
    """

    def __init__(self, dataset, collate_fn: Callable[[list], dict], *, seed: int, batch_size: int,
                 position: int = 0, share: tuple[int, int] | None = None, num_workers: int = 0,
                 check: Callable[[], None] | None = None):
        self.order = SampleOrder(len(dataset), seed)
        self.dataset, self.collate_fn, self.seed = dataset, collate_fn, int(seed)
        self.batch_size, self.share, self.num_workers, self.check = int(batch_size), share, int(num_workers), check
        self.position = int(position)
        self._it = None

    def _start(self) -> None:
        if self.num_workers == 0:
            dataset = _Polled(self.dataset, self.check) if self.check is not None else self.dataset
            collate_fn = self.collate_fn
        else:
            dataset, collate_fn = _Carrying(self.dataset), _CarryingCollate(self.collate_fn)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=ShareSampler(self.order, self.batch_size, self.share, self.position),
            collate_fn=collate_fn, num_workers=self.num_workers,
            # its own generator: starting an iterator draws a seed, which must not move the run's global RNG
            generator=torch.Generator().manual_seed(self.seed))
        self._it = iter(loader)

    def next(self) -> dict[str, Any]:
        if self._it is None:
            self._start()
        try:
            batch = next(self._it)
        except BaseException:  # e.g. a signal mid-batch: this iterator's sampler has moved on, start anew
            self.close()
            raise
        if isinstance(batch, _Raised):  # bad data found in a worker: the same error as loading in-process
            self.close()
            raise batch.error
        self.position += self.batch_size
        if self.share is not None:  # marks a share: ParallelContext.local_batch passes it through
            batch["share"] = self.share
        return batch

    def rewind(self, position: int) -> None:
        self.close()
        self.position = int(position)

    def close(self) -> None:
        """Stop the worker processes (a later ``next()`` starts them again at :attr:`position`)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def step_tokens(micro: list[dict], drun, pad_id: int, empty: dict | None = None) -> tuple[list[dict], int, int]:
    """One step's micro-batches made whole across ranks: (micro-batches, counted tokens, real tokens).

    Counted tokens (labels the loss counts) and real tokens (attention mask) are those of the global
    batches: they weight every micro-batch's loss and measure throughput. When ranks load shares
    (batches marked with their ``share``), one all-gather sums them over the data-parallel shares,
    each share is padded to its global batch's length, and a share without an item (or a target) of
    a modality its global batch has gets none of it from ``empty`` (see ``batch.empty_parts``): every
    tensor is then what slicing the collated global batch gave, as when one process collates all.
    """
    counted = sum(int(b["num_tokens"]) for b in micro)
    real = sum(int(b["attention_mask"].sum()) for b in micro)
    if drun is None or micro[0].get("share") is None:  # global batches: nothing to add up
        return micro, counted, real
    import torch.distributed as dist

    inputs, targets = sorted((empty or {}).get("inputs", {})), sorted((empty or {}).get("targets", {}))
    row = [drun.dp_rank, counted, real]
    for b in micro:
        row.append(int(b["input_ids"].shape[1]))
        row += [sum((b.get("items_per_sample") or {}).get(m, [])) for m in inputs]
        row += [int(b["output_targets"][m].shape[0]) if m in (b.get("output_targets") or {}) else 0 for m in targets]
    mine = torch.tensor(row, dtype=torch.int64)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    shares = {int(t[0]): t for t in gathered}  # one row per data-parallel share (its tp / pp peers agree)
    counted = sum(int(t[1]) for t in shares.values())
    real = sum(int(t[2]) for t in shares.values())
    per_micro = torch.stack(list(shares.values()))[:, 3:].view(len(shares), len(micro), -1)
    longest, totals = per_micro[:, :, 0].amax(0).tolist(), per_micro[:, :, 1:].sum(0).tolist()
    out = []
    for b, seq, total in zip(micro, longest, totals):
        b = pad_batch(b, int(seq), pad_id)
        have_in, have_out = b.get("modality_inputs") or {}, b.get("output_targets") or {}
        if any(n and m not in have_in for m, n in zip(inputs, total)):
            b["modality_inputs"] = {m: have_in.get(m, empty["inputs"][m]) for m, n in zip(inputs, total)
                                    if n or m in have_in}
        if any(n and m not in have_out for m, n in zip(targets, total[len(inputs):])):
            b["output_targets"] = {m: have_out.get(m, empty["targets"][m]) for m, n in
                                   zip(targets, total[len(inputs):]) if n or m in have_out}
        out.append(b)
    return out, counted, real
