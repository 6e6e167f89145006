"""One training micro-batch (forward, loss, backward) and one evaluation batch, for every layout.

The training loop calls :func:`forward_backward` per micro-batch, :func:`clip_grads` once per step and
:func:`evaluate` for the held-out loss; what differs between layouts stays here and in
``mimo_spec.parallel``:

- one process, data parallel (DDP / FSDP), tensor parallel: the model's forward, then
  :func:`mimo_spec.loss.mimo_loss` and the backward, all inside the layout's train context (torch's
  ``loss_parallel()`` when the LM head keeps its logits sharded on the vocabulary);
- pipeline stages: the schedule runs forward and backward, its last stage computing
  :func:`mimo_spec.loss.causal_lm_loss` with the global token count;
- split layouts: encoder ranks encode and send; language-model ranks take the embeddings as
  ``modality_embeddings=`` and run the step below.

Every micro-batch's loss is weighted by its share of the step's global token count, so gradients summed
over micro-batches and data-parallel ranks equal the single-process gradient of the whole batch.

Packed batches (rows of several samples, ``document_ids`` (B, S)) take the same paths under every
layout: the ids go to the model (positions restart and attention stays inside each document; pipeline
stages each take their microbatch's ids) and to the loss (no document's first token is counted), and
they are sliced, padded and split with their rows; ``items_per_sample`` then counts items per row.
"""

from __future__ import annotations

import contextlib
import math

import torch

from mimo_spec.data.batch import model_kwargs, to_device
from mimo_spec.loss import counted_positions, mimo_loss


def autocast(precision: str, device: torch.device | str = "cpu"):
    """bf16 autocast for ``precision == "bf16"``, else nothing."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_context(drun=None):
    """The context a step's forward and backward run in: the layout's (loss-parallel under TP), else none."""
    return drun.train_context() if drun is not None else contextlib.nullcontext()


def _loss_of(model, batch: dict, device, precision: str, embeddings=None):
    """Forward and every loss of one (local) batch: (the model's output, :class:`~mimo_spec.loss.Losses`).

    ``embeddings``: {modality: embeddings of the batch's items} encoded elsewhere (split layouts, bridged
    modalities), or a function returning them (run inside the autocast), passed as ``modality_embeddings=``."""
    kwargs = model_kwargs(batch, device, model)
    labels, targets = kwargs.pop("labels"), kwargs.pop("output_targets", None)
    if labels is not None:  # the LM head only where the loss counts (not at placeholders or padding)
        kwargs["logits_at"] = counted_positions(batch["labels"], batch.get("loss_mask"),
                                                batch.get("document_ids")).to(device, non_blocking=True)
        kwargs["skip_logits"] = True  # a plain head runs inside the loss, chunk by chunk (no (K, V) logits kept)
    lm = getattr(getattr(model, "module", model), "language_model", None)
    if getattr(lm, "moe_layer_ids", ()) and batch.get("attention_mask") is not None:
        # padding is not routed for the aux losses (transformers counts the attention mask's tokens); attention
        # itself needs no mask for right padding
        kwargs["router_mask"] = batch["attention_mask"].to(device, non_blocking=True)
    with autocast(precision, device):
        if callable(embeddings):  # bridged modalities: encoded from the global batch, on this rank's samples
            embeddings = embeddings()
        if embeddings:  # items encoded elsewhere: those modalities' encoders do not run in the model
            kwargs["modality_inputs"] = {k: v for k, v in kwargs["modality_inputs"].items() if k not in embeddings}
            kwargs["modality_embeddings"] = embeddings
        # the targets give the model the item count to decode; the loss is computed below
        out = model(**kwargs, output_targets=targets)
        losses = mimo_loss(model.modalities, out, labels=labels, output_targets=targets,
                           loss_mask=_on(batch.get("loss_mask"), device),
                           document_ids=_on(batch.get("document_ids"), device))
    return out, losses


def _on(t, device):
    return None if t is None else t.to(device)


class RouterStats:
    """A mixture-of-experts LM's router numbers over one training step's micro-batches: ``aux_loss`` and
    ``z_loss`` (unweighted, each micro-batch weighted by its share of the step's tokens, like the loss) and
    ``counts`` (MoE layers, E): the tokens each expert received, summed. Empty (``counts`` None) for a
    dense LM, and under pipeline stages (the schedule computes the loss)."""

    def __init__(self):
        self.aux_loss, self.z_loss, self.counts = 0.0, 0.0, None

    def add(self, losses, weight: float) -> None:
        """Add one micro-batch's :class:`~mimo_spec.loss.Losses` (weight: its share of the step's tokens)."""
        if losses.expert_counts is None:
            return
        self.aux_loss += float(losses.router_aux_loss.detach()) * weight
        self.z_loss += float(losses.router_z_loss.detach()) * weight
        counts = losses.expert_counts.detach().to("cpu", torch.float64)
        self.counts = counts if self.counts is None else self.counts + counts


def forward_backward(model, batch: dict, total_tokens: int, *, device, precision: str = "fp32", drun=None,
                     router_stats: RouterStats | None = None, objective=None) -> float:
    """One micro-batch of a training step: forward, loss, backward (gradients accumulate).

    ``batch``: the collated global micro-batch; ``total_tokens``: the step's counted tokens over every
    micro-batch. Returns this micro-batch's share of the step loss (summed over ranks by the caller).
    ``router_stats``: where a mixture-of-experts LM's router losses and expert loads of the step are summed.
    ``objective``: preference training (``mimo_spec.train.preference.DPO``; its batches count pairs), else SFT.
    """
    if drun is not None and drun.split is not None:  # encoders on their own ranks (the global batch)
        with autocast(precision, device):
            return drun.split.run(batch, total_tokens, True, lambda local, emb: _lm_step(
                model, local, total_tokens, device, precision, drun, emb, router_stats))
    embeddings = None
    if drun is not None and drun.bridges:  # modalities with their own data-parallel layout read the global batch
        global_batch = batch
        embeddings = lambda: drun.bridged_embeddings(to_device(global_batch, device))  # noqa: E731
    if drun is not None:
        batch = drun.local_batch(batch, model)
    if drun is not None and drun.pipeline is not None:  # the schedule runs forward and backward
        with autocast(precision, device), train_context(drun):
            return drun.pipeline.train_batch(batch, total_tokens)
    if objective is not None:  # preference pairs: policy and reference log-probabilities (train/preference.py)
        return objective.train_step(model, batch, total_tokens, device=device, precision=precision, drun=drun)
    model.prepare_inputs(batch["input_ids"], batch.get("modality_inputs") or {},
                         items_per_sample=batch.get("items_per_sample"))
    return _lm_step(model, batch, total_tokens, device, precision, drun, embeddings, router_stats)


def _lm_step(model, batch: dict, total_tokens: int, device, precision: str, drun, embeddings=None,
             router_stats: RouterStats | None = None) -> float:
    with train_context(drun):
        _, losses = _loss_of(model, batch, device, precision, embeddings)
        weight = int(batch["num_tokens"]) / total_tokens
        stats = getattr(drun, "router_stats", None) if drun is not None else None
        if weight == 0 and losses.router_aux_loss is not None and getattr(stats, "micro_tokens", 0):
            # a share that counts no token still routed its tokens (parallel/expert.py: GlobalRouterStats)
            weight = float(stats.micro_tokens) / total_tokens
        (losses.loss * weight).backward()
    if router_stats is not None:
        router_stats.add(losses, weight)
    value = float(losses.loss.detach()) * weight
    # sequence parallelism: each rank scored its slice; the share's loss is their sum
    return drun.sequence_sum(value) if getattr(drun, "sp", 1) > 1 else value


def clip_grads(model, max_norm: float | None, drun=None) -> float:
    """Finish the step's gradients, then clip: replicated-only modules' gradients are summed over their
    data-parallel ranks (``ParallelContext.sync_grads``); the global gradient 2-norm over every module,
    shard, stage and span is returned, and gradients are scaled down to ``max_norm`` when it is set and
    exceeded (torch's ``clip_grads_with_norm_``). Called once per step, after the last micro-batch."""
    if drun is not None:  # data-parallel sums FSDP2 does not make (replicated-only modules)
        drun.sync_grads(model)
    params = [p for p in model.parameters() if p.grad is not None]
    if drun is not None:
        norm = drun.grad_norm(params)
    elif not params:
        return 0.0
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if max_norm and params:
        if drun is not None:  # DTensor gradients of several meshes: one layout at a time
            drun.scale_grads(params, float(max_norm), norm)
        else:
            torch.nn.utils.clip_grads_with_norm_(params, float(max_norm), norm)
    return float(norm)


# ---------------------------------------------------------------------------- evaluation


def eval_nll(model, batch: dict, *, device, precision: str = "fp32", drun=None, outputs: dict | None = None) -> float:
    """The summed next-token NLL of one collated (global) batch's counted tokens on this rank: the whole
    batch in one process; this rank's data-parallel share, or 0 where the rank holds no loss (pipeline
    stages before the last, encoder ranks), under a layout (the caller sums over ranks)."""
    if drun is not None and drun.split is not None:
        with torch.no_grad(), autocast(precision, device):
            return drun.split.run(batch, 1, False, lambda local, emb: _eval_local(model, local, device, precision,
                                                                                 drun, emb))
    if drun is not None and drun.pipeline is not None:
        with autocast(precision, device), train_context(drun):
            return drun.pipeline.eval_batch(drun.local_batch(batch, model))
    return _eval_local(model, batch, device, precision, drun, outputs=outputs)


def eval_samples(dataset, batch_size: int, max_batches: int | None, should_stop=None):
    """Each evaluation batch's samples, in order: the first ``max_batches`` (every one when 0 or None) batches of
    ``batch_size`` of ``dataset``; raises ``StopRequested`` when ``should_stop()`` says so before a batch."""
    from mimo_spec.train.limits import StopRequested

    n = len(dataset)
    for b, start in enumerate(range(0, n, batch_size)):
        if max_batches and b >= max_batches:
            return
        if should_stop is not None and should_stop():
            raise StopRequested()
        yield [dataset[i] for i in range(start, min(n, start + batch_size))]


def _eval_local(model, batch: dict, device, precision: str, drun, embeddings=None, outputs: dict | None = None) -> float:
    with torch.no_grad(), train_context(drun):
        _, losses = _loss_of(model, batch, device, precision, embeddings)
    if outputs is not None:  # output modalities: [loss * items, accuracy * items, items] summed over batches
        for name, loss in losses.modality_losses.items():
            n = int(batch["output_targets"][name].shape[0])
            acc = losses.modality_accuracy.get(name)
            sums = outputs.setdefault(name, [0.0, None if acc is None else 0.0, 0])
            sums[0] += float(loss) * n
            if acc is not None:
                sums[1] += float(acc) * n
            sums[2] += n
    return float(losses.lm_loss) * int(batch["num_tokens"])


def evaluate(model, dataset, collate_fn, batch_size: int, max_batches: int | None, precision: str = "fp32",
             device: torch.device | str = "cpu", should_stop=None, drun=None) -> dict[str, float]:
    """Token-weighted loss and perplexity over (the first ``max_batches`` batches of) ``dataset``.

    ``should_stop()`` is asked before each batch (every rank asks at the same batch); when it answers
    true, :class:`~mimo_spec.train.limits.StopRequested` is raised. Without ``drun`` (or a layout where
    every rank holds the whole model: ddp, fsdp, tp) every rank evaluates every batch itself; under a
    pipeline or split layout each data-parallel rank evaluates its share and the NLL is summed over
    ranks. Pipeline stages need every batch full size (fixed shapes), a split layout a multiple of the
    data-parallel degree: filler samples (no counted token) make up the difference.
    """
    from mimo_spec.data.batch import filler_sample

    shared = drun is not None and (drun.split or drun.pipeline) is not None
    model.eval()
    total_nll, total_tokens = 0.0, 0
    outputs: dict = {}  # output modalities' loss and accuracy (layouts where every rank evaluates every batch)
    try:
        for samples in eval_samples(dataset, batch_size, max_batches, should_stop):
            if shared:
                missing = batch_size - len(samples) if drun.pipeline is not None else -len(samples) % drun.dp_size
                samples += [filler_sample(samples[0])] * missing
            batch = collate_fn(samples)
            total_tokens += int(batch["num_tokens"])
            total_nll += eval_nll(model, batch, device=device, precision=precision, drun=drun,
                                  outputs=None if shared else outputs)
    finally:
        model.train()
    if shared:
        total_nll = drun.all_sum(total_nll)
    loss = total_nll / max(total_tokens, 1)
    result = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": total_tokens}
    for name, (loss_sum, acc_sum, n) in outputs.items():  # per output modality: eval_<name>_loss / _acc
        result[f"eval_{name}_loss"] = loss_sum / max(n, 1)
        if acc_sum is not None:
            result[f"eval_{name}_acc"] = acc_sum / max(n, 1)
    return result
