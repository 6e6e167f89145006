"""Preference training: ``train.objective: dpo`` (direct preference optimisation, Rafailov et al. 2023).

The data are preference pairs: a prompt (with its images, videos, audio) and a *chosen* and a *rejected*
answer (``mimo_spec.data.samples.pair_turns`` reads the record shapes). A pair is one planned row of the
loader, so a data-parallel share never splits it; collate makes it two adjacent rows (``2p`` chosen,
``2p + 1`` rejected) that share the prompt's items, decoded once (``mimo_spec.data.batch.collate_pairs``).
Each row's labels keep its final answer only.

Each step scores both answers, as sums of their tokens' log-probabilities
(:func:`mimo_spec.loss.sequence_log_probs`), under the policy (the model being trained) and a frozen
reference, and takes TRL's sigmoid DPO loss (:func:`mimo_spec.loss.dpo_loss`, ``train.dpo.beta`` and
``train.dpo.label_smoothing``), averaged over the step's pairs: every micro-batch's summed pair losses are
divided by the step's global pair count (``num_tokens`` of a pair batch), so micro-batches and
data-parallel ranks add up to the single-process gradient, as the token-weighted SFT loss does.

The reference (:class:`Reference`) is the model at the start of training: the same model with its adapters
switched off when it trains adapters only (``mimo_spec.peft``), else a frozen copy taken before the layout
wraps the model (a full replica on each rank, also under FSDP; also for adapters plus ``trainable`` modules,
whose weights move). It runs in eval mode; the policy's dropout is off (``train.dpo.disable_dropout``). A resumed run rebuilds it the same way
(from the seed or ``init_from``), so it never moves.

Logged per step: ``reward_chosen`` / ``reward_rejected`` (``beta * (policy - reference)`` log-probability of
each answer, mean over pairs), ``reward_margin`` (their difference), ``reward_accuracy`` (share of pairs whose
chosen reward is higher) and the policy's mean ``logp_chosen`` / ``logp_rejected``; evaluation reports the DPO
``eval_loss``, ``eval_reward_accuracy`` and ``eval_reward_margin``.

Layouts: one process, ddp, fsdp and tp (every rank holds the whole batch's pairs or its own whole pairs).
Refused: ``data.packing`` (a pair per row), pipeline stages and split layouts (the encoders or the LM on ranks
of their own), and data without pairs (``data.source: synthetic``).
"""

from __future__ import annotations

import contextlib
import copy

import torch

from mimo_spec.data.batch import model_kwargs
from mimo_spec.errors import ConfigError, DataError
from mimo_spec.loss import counted_positions, dpo_loss, sequence_log_probs
from mimo_spec.train.step import autocast, eval_samples, train_context

# the metrics columns of a DPO run (CSV, TensorBoard): per step, then evaluation's
STEP_FIELDS = ["reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logp_chosen", "logp_rejected"]
EVAL_FIELDS = ["eval_loss", "eval_reward_accuracy", "eval_reward_margin"]
PAIR_DATA_HINT = ("give data with chosen / rejected answers: data=llava_json (or webdataset / parquet) whose records "
                  "hold a prompt and \"chosen\" / \"rejected\" (README: Preference training (DPO))")


def adapter_switch(model):
    """A function returning a context that runs ``model`` without its adapters, when ``model`` trains adapters
    (``mimo_spec.peft``); else None (the reference is then a frozen copy).

    Adapters from ``mimo_spec.peft`` (``has_adapters(model)``; the context ``adapters_disabled(model)``), or a
    peft ``PeftModel`` given from Python (its ``disable_adapter()`` context)."""
    from mimo_spec.peft import adapters_disabled, has_adapters

    if has_adapters(model):
        return lambda: adapters_disabled(model)
    method = getattr(model, "disable_adapter", None)  # a peft PeftModel
    if callable(method) and getattr(model, "peft_config", None):
        return method
    return None


def trains_beyond_adapters(model) -> bool:
    """Whether ``model`` trains parameters besides its ``mimo_spec.peft`` adapters (``trainable`` modules such
    as a projector): switching the adapters off then is not the model training started from."""
    from mimo_spec.peft import is_adapter_key

    return any(p.requires_grad and not is_adapter_key(name) for name, p in model.named_parameters())


def disable_dropout(model) -> int:
    """Dropout off in ``model`` (``nn.Dropout`` modules and the layers' own ``dropout`` rates), as TRL's DPO
    does by default (``disable_dropout``): the policy's first log-probabilities are the reference's, the first
    loss log 2. Returns how many were switched off."""
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p, n = 0.0, n + 1
        elif isinstance(getattr(module, "dropout", None), float) and module.dropout > 0:
            module.dropout, n = 0.0, n + 1
    return n


class Reference:
    """The frozen reference model of DPO: ``model`` with its adapters switched off (``switch``), or a frozen
    copy (``frozen``: no gradients, eval mode; its own adapters, if any, switched off by ``switch``). Both run
    in eval mode (no dropout: the reference's log-probabilities do not vary)."""

    def __init__(self, model, frozen=None, switch=None):
        if frozen is None and switch is None:
            raise ValueError("a reference is a frozen copy or the adapter-free model")
        self.frozen, self.switch = frozen, switch

    @classmethod
    def of(cls, model) -> Reference:
        """The reference of ``model`` as it is now (call before training and before a layout wraps it): the
        adapter-free model when only adapters train, else a frozen copy (adapters plus ``trainable`` modules:
        those modules move, so switching the adapters off would not give the starting model back)."""
        switch = adapter_switch(model)
        if switch is not None and not trains_beyond_adapters(model):
            return cls(model, switch=switch)
        frozen = copy.deepcopy(model)
        frozen.requires_grad_(False)
        frozen.eval()
        return cls(model, frozen=frozen, switch=adapter_switch(frozen))

    def log_probs(self, model, batch: dict, device, precision: str) -> torch.Tensor:
        """Each row's answer log-probability (2P,) under the reference (no gradient, eval mode)."""
        target = self.frozen if self.frozen is not None else model
        was_training = target.training
        target.eval()
        try:
            with torch.no_grad(), (self.switch() if self.switch is not None else contextlib.nullcontext()):
                return row_log_probs(target, batch, device, precision)[0]
        finally:
            target.train(was_training)


def row_log_probs(model, batch: dict, device, precision: str):
    """(each row's summed answer log-probability (B,), the model's output) of one collated pair batch; the LM
    head runs only at the answers' positions."""
    kwargs = model_kwargs(batch, device, model)
    labels = kwargs.pop("labels")
    kwargs.pop("output_targets", None)
    kwargs["logits_at"] = counted_positions(batch["labels"]).to(device, non_blocking=True)
    lm = getattr(getattr(model, "module", model), "language_model", None)
    if getattr(lm, "moe_layer_ids", ()) and batch.get("attention_mask") is not None:
        kwargs["router_mask"] = batch["attention_mask"].to(device, non_blocking=True)
    with autocast(precision, device):
        out = model(**kwargs)
        logps = sequence_log_probs(out.logits, labels, positions=out.logits_at)
    return logps, out


class PairStats:
    """Sums over one step's (or evaluation's) valid pairs: loss, rewards, correct orderings, log-probabilities."""

    KEYS = ("loss", "chosen", "rejected", "correct", "logp_chosen", "logp_rejected", "pairs")

    def __init__(self):
        self.sums = dict.fromkeys(self.KEYS, 0.0)

    def add(self, losses, chosen, rejected, logp_chosen, logp_rejected, valid) -> None:
        v = valid.to(losses.dtype)
        for key, t in (("loss", losses.detach()), ("chosen", chosen), ("rejected", rejected),
                       ("correct", (chosen > rejected).to(v.dtype)), ("logp_chosen", logp_chosen.detach()),
                       ("logp_rejected", logp_rejected.detach())):
            self.sums[key] += float((t.to(v.dtype) * v).sum())
        self.sums["pairs"] += float(v.sum())

    def summed(self, drun=None) -> dict[str, float]:
        """The sums, over the data-parallel shares when ``drun`` is given (one all-reduce)."""
        if drun is None:
            return dict(self.sums)
        import torch.distributed as dist

        t = torch.tensor([self.sums[k] for k in self.KEYS], dtype=torch.float64)
        dist.all_reduce(t)
        replicas = drun.world_size // drun.dp_size  # ranks holding the same share (tensor parallel peers)
        return {k: float(x) / replicas for k, x in zip(self.KEYS, t)}


class DPO:
    """The ``dpo`` objective of a run: its config (``train.dpo``), its reference and the step's pair statistics."""

    def __init__(self, beta: float, label_smoothing: float, reference: Reference):
        self.beta, self.label_smoothing, self.reference = float(beta), float(label_smoothing), reference
        self.stats = PairStats()

    @classmethod
    def prepare(cls, run, model, train_set, eval_set=None) -> DPO:
        """Check the run can train on preference pairs, switch the datasets to pairs and take the reference.

        Raises ConfigError for packing or data without pairs (synthetic data); DataError (naming the file and
        record) when the first records of the training set hold no pair."""
        if getattr(run.data, "packing", False):
            raise ConfigError("train.objective dpo trains one preference pair per row; packed rows are not supported",
                              path="data.packing", hint="set data.packing=false")
        for dataset in (train_set, eval_set):
            if dataset is None:
                continue
            inner = getattr(dataset, "dataset", dataset)  # (an eval set wrapped to skip bad samples)
            if not callable(getattr(inner, "use_pairs", None)):
                raise ConfigError(f"train.objective dpo needs preference pairs, and data.source "
                                  f"{run.data.source} has none", path="train.objective", hint=PAIR_DATA_HINT)
            inner.use_pairs()
        check_pairs(train_set)
        tc = run.train
        if tc.dpo.disable_dropout:
            disable_dropout(model)
        return cls(tc.dpo.beta, tc.dpo.label_smoothing, Reference.of(model))

    @classmethod
    def for_checkpoint(cls, cfg, train, model, eval_set, *, device) -> DPO:
        """The objective of a DPO run's checkpoint, for ``action=eval``: ``eval_set`` switched to pairs and the
        run's reference rebuilt as training took it: ``model`` with its adapters off (the base they were trained
        on), else the model the run started from (its training seed's init, then ``init_from``'s weights), so
        the loss is the one the run reported. ``cfg``: the run's recorded config; ``train``: its train section."""
        inner = getattr(eval_set, "dataset", eval_set)
        if not callable(getattr(inner, "use_pairs", None)):
            raise ConfigError("this checkpoint was trained with train.objective dpo, which needs preference pairs, and "
                              f"its data.source {cfg['data'].get('source')} has none", path="data", hint=PAIR_DATA_HINT)
        inner.use_pairs()
        check_pairs(eval_set)
        switch = adapter_switch(model)
        if switch is not None and not cfg.get("trainable"):
            return cls(train.dpo.beta, train.dpo.label_smoothing, Reference(model, switch=switch))
        from pathlib import Path

        from mimo_spec.builders import build_model
        from mimo_spec.peft import training_seed

        start = build_model(cfg, seed=training_seed(cfg), device=device, dtype=cfg.get("dtype"))
        if cfg.get("init_from"):
            from mimo_spec.weights import load_weights

            load_weights(start, Path(cfg["init_from"]) / "model.safetensors")
        start.requires_grad_(False)
        start.eval()
        return cls(train.dpo.beta, train.dpo.label_smoothing, Reference(model, frozen=start))

    @staticmethod
    def check_layout(drun) -> None:
        """Pipeline stages and split layouts are refused (a ConfigError naming ``parallel``)."""
        if drun is None:
            return
        what = ("pipeline stages" if drun.pipeline is not None or getattr(drun, "pp", 1) > 1
                else "a split layout (encoders or the LM on ranks of their own)" if drun.split is not None
                else "modalities with their own data-parallel layout" if drun.bridges else None)
        if what is not None:
            raise ConfigError(f"train.objective dpo does not run under {what}", path="parallel",
                              hint="use parallel=single, ddp, fsdp or tp2 for preference training")

    # ---- training -------------------------------------------------------------------------
    def pair_losses(self, model, batch: dict, device, precision: str):
        """(per-pair losses (P,), chosen rewards, rejected rewards, policy log-probabilities of the chosen and
        rejected answers, the policy's output) of one collated pair batch."""
        policy, out = row_log_probs(model, batch, device, precision)
        ref = self.reference.log_probs(model, batch, device, precision)
        losses, chosen, rejected = dpo_loss(policy[0::2], policy[1::2], ref[0::2], ref[1::2], self.beta,
                                            self.label_smoothing)
        return losses, chosen, rejected, policy[0::2], policy[1::2], out

    def train_step(self, model, batch: dict, total_pairs: int, *, device, precision: str = "fp32",
                   drun=None) -> float:
        """Forward (policy and reference), DPO loss and backward of one micro-batch of pairs; returns its share
        of the step loss (summed pair losses over the step's ``total_pairs`` valid pairs)."""
        if "pair_valid" not in batch:
            raise DataError("train.objective dpo got a batch without preference pairs", path="data",
                            hint=PAIR_DATA_HINT)
        model.prepare_inputs(batch["input_ids"], batch.get("modality_inputs") or {},
                             items_per_sample=batch.get("items_per_sample"))
        with train_context(drun):
            losses, chosen, rejected, logp_c, logp_r, out = self.pair_losses(model, batch, device, precision)
            valid = batch["pair_valid"].to(losses.device)
            loss = (losses * valid.to(losses.dtype)).sum() / max(int(total_pairs), 1)
            router = getattr(out, "router", None)
            if router is not None and router.loss is not None:  # an MoE LM's router losses, weighted by pairs
                loss = loss + router.loss * (int(batch["num_tokens"]) / max(int(total_pairs), 1))
            loss.backward()
        self.stats.add(losses, chosen, rejected, logp_c, logp_r, valid)
        return float(loss.detach())

    def reset(self) -> None:
        """Forget the pair statistics of a step cut short."""
        self.stats = PairStats()

    def step_row(self, drun=None) -> dict[str, float]:
        """The step's metrics (:data:`STEP_FIELDS`, means over its pairs on every rank); starts the next step's sums."""
        s = self.stats.summed(drun)
        self.stats = PairStats()
        n = max(s["pairs"], 1.0)
        return {"reward_chosen": round(s["chosen"] / n, 6), "reward_rejected": round(s["rejected"] / n, 6),
                "reward_margin": round((s["chosen"] - s["rejected"]) / n, 6),
                "reward_accuracy": round(s["correct"] / n, 4), "logp_chosen": round(s["logp_chosen"] / n, 4),
                "logp_rejected": round(s["logp_rejected"] / n, 4)}

    # ---- evaluation -----------------------------------------------------------------------
    def evaluate(self, model, dataset, collate_fn, batch_size: int, max_batches: int | None,
                 precision: str = "fp32", device="cpu", should_stop=None, drun=None) -> dict[str, float]:
        """The DPO loss, reward accuracy and margin over (the first ``max_batches`` batches of ``batch_size``
        pairs of) ``dataset``; every rank evaluates every batch (one process, ddp, fsdp, tp)."""
        stats = PairStats()
        model.eval()
        try:
            for samples in eval_samples(dataset, batch_size, max_batches, should_stop):
                batch = collate_fn(samples)
                if "pair_valid" not in batch:  # every sample of the batch was unusable
                    continue
                with torch.no_grad(), train_context(drun):
                    losses, chosen, rejected, logp_c, logp_r, _ = self.pair_losses(model, batch, device, precision)
                stats.add(losses, chosen, rejected, logp_c, logp_r, batch["pair_valid"].to(losses.device))
        finally:
            model.train()
        s, m = stats.sums, max(stats.sums["pairs"], 1.0)
        if not s["pairs"]:
            return {}
        return {"eval_loss": s["loss"] / m, "eval_reward_accuracy": round(s["correct"] / m, 4),
                "eval_reward_margin": (s["chosen"] - s["rejected"]) / m}


def check_pairs(dataset, first: int = 8) -> None:
    """Raise the first record's DataError (naming its file and record) when none of the first ``first`` records of
    ``dataset`` is a preference pair: the data are not preference data. Other unusable records are left to the
    loader (``data.on_bad_sample``)."""
    errors = []
    for i in range(min(len(dataset), first)):
        try:
            dataset.encoded(i)
            return
        except DataError as e:
            if not any("no preference pair" in p.message for p in e.problems):
                return  # another problem: the loader reports or skips it
            errors.append(e)
    if errors:
        raise errors[0]
