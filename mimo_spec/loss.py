"""The training losses, one place for every path (one process, tensor/pipeline parallel, split layouts, eval).

The model returns logits and, for output modalities, its decoded items (:class:`~mimo_spec.models.mimo.MimoOutput`);
the functions here turn them into losses. ``IGNORE_INDEX`` (-100) marks a label the loss skips, as in torch's
and Hugging Face's cross entropy; data, models and parallel code all take it from here.

Logits sharded on the vocabulary (tensor parallelism, a DTensor ``Shard(-1)``) go through the same code: the
caller runs forward *and* backward under torch's ``loss_parallel()`` context (``ParallelContext.train_context``),
where ``F.cross_entropy`` works on the shards and never gathers the (B, S, V) logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local value (the per-token losses of vocab-sharded logits are replicated), else ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None and hasattr(t, "placements") else t


def _like_logits(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Labels for DTensor logits: a DTensor replicated over the logits' mesh. Inside ``loss_parallel()`` the
    cross entropy then runs on the vocabulary shards; outside it DTensor gathers what it needs, so
    ``forward(labels=...)`` works anywhere. Plain logits: the labels as they are."""
    mesh = getattr(logits, "device_mesh", None)
    if mesh is None:
        return labels
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(labels, mesh, [Replicate()] * mesh.ndim, run_check=False)


def token_weights(labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
                  document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The weight (B, S-1) of each predicted token: 0 for an ignored label, a masked position, or the first
    token of a packed document (never predicted from the previous document); else the loss_mask value (1)."""
    shift_labels = labels[:, 1:]
    weight = (shift_labels != IGNORE_INDEX).float()
    if loss_mask is not None:
        weight = weight * loss_mask[:, 1:].float()
    if document_ids is not None:
        weight = weight * (document_ids[:, 1:] == document_ids[:, :-1]).float()
    return weight


def counted_positions(labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
                      document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Flat positions ``b * S + s`` of the ``(B, S)`` inputs whose next-token prediction counts (weight > 0 in
    :func:`token_weights`): where the logits are needed. Computed where the labels are (the training step
    does it on the host, before the batch moves)."""
    weight = F.pad(token_weights(labels, loss_mask, document_ids), (0, 1))
    return weight.reshape(-1).nonzero().squeeze(1)


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum_i scale_i * CE(hidden_i @ weight.T, target_i)`` without keeping the (K, V) logits: the rows go
    through the head a chunk at a time, and each chunk's gradients (``scale * (softmax - onehot)`` through the
    two products of the head's backward) are taken right there, so backward only scales them by the upstream
    gradient. Saves the logits, their log-softmax and the loss's backward passes over them; holds the
    hidden states' and the head's gradients (K x H + V x H) from forward to backward instead."""

    @staticmethod
    def forward(ctx, hidden, weight, target, scale, chunk, grads):
        # needs_input_grad holds under no_grad too: ``grads`` says whether the caller records a graph
        need_h, need_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            t, sc = target[start:start + chunk], scale[start:start + chunk]
            # under autocast the product runs in autocast's dtype, as F.linear's would
            logp = torch.log_softmax((h @ weight.t()).float(), dim=-1)
            total = total - (logp.gather(1, t[:, None]).squeeze(1) * sc).sum()
            if not (need_h or need_w):
                continue
            g = logp.exp_()  # softmax, in place
            g[torch.arange(g.shape[0], device=g.device), t] -= 1.0
            g.mul_(sc[:, None])
            if torch.is_autocast_enabled(h.device.type):
                # both products in autocast's dtype, as F.linear's backward runs them; by hand, since the
                # in-place addmm_ below is not autocast and would run a full-precision GEMM (on a GPU 10x
                # slower: half of Qwen2-VL-2B's head on an H200)
                dtype = torch.get_autocast_dtype(h.device.type)
                g, h = g.to(dtype), h.to(dtype)
            else:
                g = g.to(h.dtype)
            if need_h:
                grad_h[start:start + chunk] = (g @ weight).to(hidden.dtype)
            if need_w and grad_w is not None and g.dtype == h.dtype == grad_w.dtype:
                grad_w.addmm_(g.t(), h)  # the GEMM adds into the sum: no (V, H) temporary and add per chunk
            elif need_w:  # a low-precision part, summed in fp32
                part = g.t() @ h
                grad_w = part.to(torch.float32) if grad_w is None else grad_w.add_(part)
        if need_w and grad_w is None:  # no row: a zero gradient still reaches the weight (DDP waits for it)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype), None, None, None, None)


LINEAR_CE_CHUNK_ELEMENTS = 2**24  # logits of one chunk at most (64 MiB in fp32)
# on a GPU a chunk may hold 16x more (1 GiB of fp32 logits; transformers' unfused head holds all of them, several
# times over): with a large vocabulary the 64 MiB chunk is ~100 rows, too few for the head's GEMMs to run at
# full rate, and under autocast each chunk adds a (V, H) fp32 part into the head's gradient. Qwen2-VL-2B's
# 151,936-token head at 8,192 rows on an H200: 75 chunks made the training step 1.4x transformers'
LINEAR_CE_CHUNK_ELEMENTS_GPU = 2**28
# on the CPU a chunk holds at most this many rows: enough for the head's GEMMs to run at full rate, and with a
# small vocabulary the chunk's logits stay cache-sized for the soft-max passes and the two backward GEMMs that
# read them (5% off the Mixtral-like training step of benchmarks/train_step_vs_hf_moe.py, vocabulary 4096)
LINEAR_CE_CHUNK_ROWS_CPU = 256


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         scale: torch.Tensor) -> torch.Tensor:
    """``sum_i scale_i * CE(hidden_i @ weight.T, target_i)`` (hidden (K, H), weight (V, H), target (K,) with
    -100 for a row that is not scored, scale (K,)): the LM loss of a plain (bias-free, unsharded) head without
    materialising the (K, V) logits: equal to ``F.cross_entropy`` on ``F.linear(hidden, weight)`` in value and
    gradients, a chunk of rows (``LINEAR_CE_CHUNK_ELEMENTS`` logits at most, ``LINEAR_CE_CHUNK_ELEMENTS_GPU`` on
    an accelerator; ``LINEAR_CE_CHUNK_ROWS_CPU`` rows at most on the CPU) at a time."""
    ignored = target == IGNORE_INDEX
    target = target.masked_fill(ignored, 0)
    scale = scale.float().masked_fill(ignored, 0.0)
    budget = LINEAR_CE_CHUNK_ELEMENTS if hidden.device.type in ("cpu", "meta") else LINEAR_CE_CHUNK_ELEMENTS_GPU
    chunk = max(1, budget // max(1, weight.shape[0]))
    if hidden.device.type == "cpu":
        chunk = min(chunk, LINEAR_CE_CHUNK_ROWS_CPU)
    return _LinearCrossEntropy.apply(hidden, weight, target, scale, chunk, torch.is_grad_enabled())


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
                   document_ids: torch.Tensor | None = None, *, num_tokens: float | None = None,
                   positions: torch.Tensor | None = None, head: tuple | None = None) -> torch.Tensor:
    """Next-token cross entropy over the counted positions (label not -100, loss_mask != 0, not a document start).

    logits: (B, S, V) (a vocab-sharded DTensor under tensor parallelism); labels, loss_mask, document_ids:
    (B, S), aligned with the inputs (shifted here). Returns the mean over this batch's counted tokens, or,
    given ``num_tokens`` (e.g. the global step's token count), the summed loss divided by it: the
    normalisation data-parallel ranks and pipeline microbatches share, so their gradients sum to the
    single-process gradient.
    """
    if positions is not None:  # logits (K, V) at flat positions of the (B, S) inputs (forward(logits_at=))
        target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1).index_select(0, positions)
        weight = F.pad(token_weights(labels, loss_mask, document_ids), (0, 1)).reshape(-1).index_select(0, positions)
        if head is not None:  # (hidden (K, H), head weight (V, H)): the head and the loss in one pass
            denom = weight.sum().clamp(min=1.0) if num_tokens is None else float(num_tokens)
            return linear_cross_entropy(head[0], head[1], target, weight / denom)
        logits = logits.float()
        per_token = F.cross_entropy(logits, _like_logits(target, logits), ignore_index=IGNORE_INDEX,
                                    reduction="none")
        total = (_local(per_token).reshape(-1) * weight).sum()
        return total / (weight.sum().clamp(min=1.0) if num_tokens is None else float(num_tokens))
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    per_token = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                _like_logits(shift_labels.reshape(-1), shift_logits), ignore_index=IGNORE_INDEX,
                                reduction="none")
    weight = token_weights(labels, loss_mask, document_ids).reshape(-1)
    total = (_local(per_token).reshape(-1) * weight).sum()
    return total / (weight.sum().clamp(min=1.0) if num_tokens is None else float(num_tokens))


@dataclass
class Losses:
    """``loss``: LM loss + weighted output-modality losses + weighted router losses (None when nothing was
    given to score); ``lm_loss``: the next-token loss (None without labels); ``modality_losses``: per output
    modality. A mixture-of-experts LM's routers: ``router_aux_loss`` (load balancing) and ``router_z_loss``
    (unweighted), ``expert_counts`` (MoE layers, E) tokens each expert received (no gradient)."""

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    modality_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    router_aux_loss: torch.Tensor | None = None
    router_z_loss: torch.Tensor | None = None
    expert_counts: torch.Tensor | None = None
    modality_accuracy: dict[str, torch.Tensor] = field(default_factory=dict)


def mimo_loss(modalities, output, *, labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
              document_ids: torch.Tensor | None = None, output_targets: dict[str, torch.Tensor] | None = None,
              num_tokens: float | None = None) -> Losses:
    """Every loss of one forward pass: the LM loss of ``output.logits`` (or, where the model skipped them, of
    ``output.head_hidden`` through ``output.head_weight`` by :func:`linear_cross_entropy`) and each output modality's
    ``output_loss_fn(prediction, target)`` weighted by its ``output_loss_weight``. A discrete modality (a
    tokenizer) is scored by teacher-forced cross entropy of its code logits against the target items' codes
    (``output.output_codes``; with the delay pattern the mean over its (position, codebook) entries that hold a
    code, the pads left out), and its accuracy (argmax == code) goes to ``modality_accuracy``.

    ``modalities``: the model's modalities (name -> Modality); ``output``: what the model returned
    (``logits``, ``modality_outputs``, ``router``). A mixture-of-experts LM's router losses (``output.router``)
    join the total with the LM's router_aux_loss_weight / router_z_loss_weight. A data-parallel share with no
    item of an output modality keeps that decoder in the graph at weight 0 (so every rank's backward runs the
    same collectives).
    """
    out = Losses()
    total = None
    if labels is not None:
        head = None
        if getattr(output, "logits", None) is None and getattr(output, "head_hidden", None) is not None:
            head = (output.head_hidden, output.head_weight)  # forward(skip_logits=True): the head runs here
        out.lm_loss = total = causal_lm_loss(output.logits, labels, loss_mask, document_ids, num_tokens=num_tokens,
                                             positions=getattr(output, "logits_at", None), head=head)
    for name, target in (output_targets or {}).items():
        mod = modalities[name]
        pred = output.modality_outputs[name]
        if getattr(mod, "tokenizer", None) is not None:  # codes: teacher-forced cross entropy
            target = output.output_codes[name]
        if target.shape[0] == 0:
            term = pred.float().sum() * 0.0
        elif getattr(mod, "tokenizer", None) is not None:
            targets = mod.code_targets(target) if hasattr(mod, "code_targets") else target  # delay pads: -100
            loss = F.cross_entropy(pred.float().reshape(-1, pred.shape[-1]), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
            out.modality_losses[name] = loss
            out.modality_accuracy[name] = mod.code_accuracy(pred.detach(), target)
            term = mod.output_loss_weight * loss
        else:
            loss = mod.output_loss_fn(pred, target)
            out.modality_losses[name] = loss
            term = mod.output_loss_weight * loss
        total = term if total is None else total + term
    router = getattr(output, "router", None)
    if router is not None:
        out.router_aux_loss, out.router_z_loss, out.expert_counts = router.aux_loss, router.z_loss, router.counts
        if router.loss is not None and total is not None:
            total = total + router.loss
    out.loss = total
    return out


# ---------------------------------------------------------------------------- preference training (DPO)


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor, *,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's summed log-probability of its labelled tokens (B,): ``sum_s log p(labels[s+1] | ..s)`` over
    the positions whose next label is not -100 (an answer's tokens). ``logits``: (B, S, V), or (K, V) at flat
    ``positions`` of the (B, S) inputs (``forward(logits_at=)``). The per-token log-probabilities are
    ``-cross_entropy``, so vocab-sharded logits work inside ``loss_parallel()`` as in :func:`causal_lm_loss`."""
    b, s = labels.shape
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    if positions is None:
        positions = torch.arange(b * s, device=labels.device)
        logits = logits.reshape(b * s, -1)
    target = target.index_select(0, positions)
    logits = logits.float()
    nll = _local(F.cross_entropy(logits, _like_logits(target, logits), ignore_index=IGNORE_INDEX,
                                 reduction="none")).reshape(-1)
    counted = (target != IGNORE_INDEX).to(nll.dtype)
    rows = torch.div(positions, s, rounding_mode="floor")
    return torch.zeros(b, dtype=nll.dtype, device=nll.device).index_add(0, rows, -nll * counted)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sigmoid DPO loss of each pair (Rafailov et al. 2023; with ``label_smoothing`` the conservative
    variant, as TRL's ``loss_type="sigmoid"``), from sequence log-probabilities (P,) of the chosen and rejected
    answers under the policy and the frozen reference:
    ``logits = (pi_c - pi_r) - (ref_c - ref_r)``,
    ``loss = -(1 - ls) * logsigmoid(beta * logits) - ls * logsigmoid(-beta * logits)``.
    Returns (losses (P,), chosen rewards ``beta * (pi_c - ref_c)``, rejected rewards ``beta * (pi_r - ref_r)``;
    the rewards carry no gradient)."""
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    losses = (-(1.0 - label_smoothing) * F.logsigmoid(beta * logits)
              - label_smoothing * F.logsigmoid(-beta * logits))
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards
