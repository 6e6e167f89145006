"""Training batches: a ``torch.utils.data.DataLoader`` over a resumable, per-rank batch sampler.

The order is fixed by the seed alone: epoch ``e`` is ``torch.randperm(len(dataset))`` seeded with
``(seed * 1_000_003 + e) % 2**64``, and the global position ``p`` (samples read by the whole run) is
sample ``order_e[p % len]`` of epoch ``p // len`` (a dataset with its own ``order(seed)``, a weighted
mixture, says which sample each position is). Each global batch is ``batch_size`` rows planned by
:class:`~mimo_spec.data.packing.Planner`: one sample per row, or packed rows of ``data.max_seq_len``
tokens (``data.packing``).

A rank loads and collates only its *share* of every global batch: rows ``[lo, hi)``, which for
data parallelism is ``[i * B / dp, (i + 1) * B / dp)`` of data-parallel rank ``i`` (see
``ParallelContext.data_share``); a share of ``None`` is the whole global batch (one process, and
ranks that need every item: split-layout encoders, bridged modalities). Every rank plans the same
global batches (from the samples' token counts: text only), then reads and decodes only its rows.
The loader's state (:class:`~mimo_spec.data.packing.LoaderState`: the next position and the samples
packing deferred) is what a checkpoint stores, so a run resumes exactly under any layout and with
any ``data.num_workers``.

Samples are built (media decoded, synthetic items rendered) and collated in ``data.num_workers``
worker processes (0: in the training process). A sample depends only on its index, never on the
worker that builds it, so the batches -- and the losses -- are the same for every worker count.
A sample that cannot be used is skipped (``data.on_bad_sample: skip``) and reported in the batch's
``skipped`` list, or stops the run (``error``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from mimo_spec.data.batch import pad_batch
from mimo_spec.data.packing import LoaderState, Planner, collate_rows, skipped_from
from mimo_spec.errors import DataError, MimoError


def _empty(dataset) -> DataError:
    """The error for a training set without samples, naming the files it was read from."""
    files = getattr(getattr(dataset, "source", None), "files", None)
    files = files() if callable(files) else []
    if files:
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        return DataError(f"the training set is empty: no sample in {shown}", path="data.path",
                         hint="check the files (and data.eval_fraction / data.max_samples)")
    return DataError("the training set is empty", path="data", hint="check data.path / data.num_samples")


class SampleOrder:
    """The dataset index at each global position: epoch ``e`` is a permutation seeded by (seed, e)."""

    def __init__(self, size: int, seed: int):
        from mimo_spec.train.limits import machine_memory, require_fits

        if size == 0:
            raise DataError("the training set is empty", path="data", hint="check data.path / data.num_samples")
        # an epoch's order is one int64 permutation of the dataset, held in memory (two: a packed batch
        # may straddle two epochs)
        require_fits(16 * size, machine_memory(), f"the sample order of {size:,} training samples",
                     "data.num_samples", "lower data.num_samples (one epoch); more steps repeat the epochs")
        self.size, self.seed = int(size), int(seed)
        self._perms: dict[int, torch.Tensor] = {}

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(int(position), self.size)
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**64)
            perm = torch.randperm(self.size, generator=g)
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = perm
        return int(perm[offset])

    def __len__(self) -> int:
        return self.size


class PlanSampler(torch.utils.data.Sampler):
    """A batch sampler without end: from ``state`` on, for every global batch the planner plans, this
    share's entries: first ``("plan", plan, rows)``, then ``(row, position, index)`` per sample of the
    share's rows (``share = (lo, hi)``, None: all rows)."""

    def __init__(self, planner: Planner, share: tuple[int, int] | None = None, state: LoaderState = LoaderState()):
        lo, hi = share if share is not None else (0, planner.batch_size)
        if not 0 <= lo < hi <= planner.batch_size:
            raise ValueError(f"share {share} is not a non-empty part of a batch of {planner.batch_size}")
        self.planner, self.lo, self.hi, self.state = planner, lo, hi, state

    def __iter__(self):
        state = self.state
        while True:
            plan = self.planner.plan(state)
            rows = plan.rows[self.lo:self.hi]
            yield [("plan", plan, len(rows))] + [(r, pos, index) for r, row in enumerate(rows) for pos, index in row]
            state = plan.state


class _Entries(torch.utils.data.Dataset):
    """What a worker does with a sampler entry: builds the sample, or reports it skipped."""

    def __init__(self, dataset, on_bad_sample: str = "skip"):
        self.dataset, self.on_bad_sample = dataset, on_bad_sample

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, entry):
        if entry[0] == "plan":
            return entry
        row, position, index = entry
        from mimo_spec.data.samples import Dropped

        try:
            return ("row", row, self.dataset[index])
        except DataError as e:
            if self.on_bad_sample == "error" and not isinstance(e, Dropped):
                raise
            return ("skip", skipped_from(e, index, position))


class _EntriesCollate:
    """Entries -> the collated share: rows of samples (packed or not), ``data_state`` (the loader state after
    this batch), ``skipped`` (samples left out while planning and loading) and ``planned`` (samples in the
    global batch)."""

    def __init__(self, pad_id: int, seq_len: int | None):
        self.pad_id, self.seq_len = int(pad_id), seq_len

    def __call__(self, entries: list) -> dict:
        _, plan, n_rows = entries[0]
        rows: list[list[dict]] = [[] for _ in range(n_rows)]
        skipped = list(plan.skipped)
        loaded = []
        for e in entries[1:]:
            if e[0] == "row":
                rows[e[1]].append(e[2])
            else:
                skipped.append(e[1])
                loaded.append(e[1])
        batch = collate_rows(rows, self.pad_id, self.seq_len)
        batch["data_state"] = plan.state
        batch["skipped"] = skipped
        batch["load_skipped"] = loaded  # this share's (every rank plans the global batch: plan.skipped is global)
        batch["planned"] = sum(len(r) for r in plan.rows) + len(plan.skipped)
        return batch


class _Polled(torch.utils.data.Dataset):
    """``dataset`` calling ``check()`` (a signal poll) before each sample: in-process loading only."""

    def __init__(self, dataset, check: Callable[[], None]):
        self.dataset, self.check = dataset, check

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
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

    def __getitem__(self, index):
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
    """This rank's micro-batches, in the run's order, from loader state ``state`` on.

    ``next()`` returns the next collated micro-batch (this rank's share of the next global batch)
    and advances :attr:`state`. ``rewind(state)`` goes back (a step cut short is undone); batches
    prefetched past it are dropped. ``check`` (in-process loading only) is called before each sample,
    so a signal stops a long batch early. ``seq_len``: packed rows of that many tokens (None: one
    sample per row, right-padded to the longest).
    """

    def __init__(self, dataset, pad_id: int, *, seed: int, batch_size: int, seq_len: int | None = None,
                 state: LoaderState | dict | int = LoaderState(), share: tuple[int, int] | None = None,
                 num_workers: int = 0, prefetch: int = 2, on_bad_sample: str = "skip",
                 check: Callable[[], None] | None = None, pin_memory: bool = False):
        if len(dataset) == 0:
            raise _empty(dataset)
        order = dataset.order(seed) if hasattr(dataset, "order") else SampleOrder(len(dataset), seed)
        self.planner = Planner(dataset, order, batch_size, seq_len or 0, seq_len is not None, on_bad_sample)
        self.dataset, self.pad_id, self.seed, self.seq_len = dataset, int(pad_id), int(seed), seq_len
        self.batch_size, self.share, self.num_workers = int(batch_size), share, int(num_workers)
        self.prefetch, self.on_bad_sample, self.check, self.pin_memory = int(prefetch), on_bad_sample, check, pin_memory
        self.state = state if isinstance(state, LoaderState) else LoaderState.from_dict(state)
        self._it = None

    @property
    def position(self) -> int:
        return self.state.position

    def _start(self) -> None:
        dataset: Any = _Entries(self.dataset, self.on_bad_sample)
        collate_fn: Any = _EntriesCollate(self.pad_id, self.seq_len)
        if self.num_workers == 0:
            dataset = _Polled(dataset, self.check) if self.check is not None else dataset
        else:
            dataset, collate_fn = _Carrying(dataset), _CarryingCollate(collate_fn)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=PlanSampler(self.planner, self.share, self.state),
            collate_fn=collate_fn, num_workers=self.num_workers,
            prefetch_factor=self.prefetch if self.num_workers else None, pin_memory=self.pin_memory,
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
        self.state = batch.pop("data_state")
        if self.share is not None:  # marks a share: ParallelContext.local_batch passes it through
            batch["share"] = self.share
        return batch

    def rewind(self, state: LoaderState | dict | int) -> None:
        self.close()
        self.state = state if isinstance(state, LoaderState) else LoaderState.from_dict(state)

    def close(self) -> None:
        """Stop the worker processes (a later ``next()`` starts them again at :attr:`state`)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def step_tokens(micro: list[dict], drun, pad_id: int, empty: dict | None = None) -> tuple[list[dict], int, int]:
    """One step's micro-batches made whole across ranks: (micro-batches, counted tokens, real tokens).

    Counted tokens (labels the loss counts) and real tokens (attention mask) are those of the global
    batches: they weight every micro-batch's loss and measure throughput. When ranks load shares
    (batches marked with their ``share``), one all-gather sums them over the data-parallel shares,
    each share is padded to its global batch's length (``batch.pad_batch``: packed rows' added positions
    get a document id of their own, so counts and losses stay those of the share), and a share without
    an item (or a target) of a modality its global batch has gets none of it from ``empty`` (see
    ``batch.empty_parts``): every tensor is then what slicing the collated global batch gave (rows of
    the packed global batch, with their ``document_ids`` and per-row ``items_per_sample``), as when one
    process collates all. Counted tokens are the batches' own ``num_tokens`` (for packed rows: without
    the first token of each document, as ``loss.token_weights`` counts).
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
