"""The training losses, one place for every path (one process, tensor/pipeline parallel, eval).

``IGNORE_INDEX`` (-100) marks a label the loss skips, as in torch's and Hugging Face's
cross entropy; data, models and parallel code all take it from here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
                   document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross entropy over positions whose label is not -100 (and loss_mask != 0).

    logits: (B, S, V); labels, loss_mask, document_ids: (B, S), aligned with the inputs
    (shifted here). In packed rows the first token of a document is never predicted
    from the previous document, so the loss equals the unpacked batch's. Logits sharded on
    the vocabulary (tensor parallelism) take the vocab-parallel cross entropy: the full
    logits are never gathered, and the result is the same.
    """
    from mimo_spec.parallel.tp import is_vocab_sharded, vocab_parallel_cross_entropy

    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    if is_vocab_sharded(shift_logits):
        per_token = vocab_parallel_cross_entropy(shift_logits, shift_labels, IGNORE_INDEX).reshape(-1)
    else:
        per_token = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                    ignore_index=IGNORE_INDEX, reduction="none")
    weight = (shift_labels != IGNORE_INDEX).float().reshape(-1)
    if loss_mask is not None:
        weight = weight * loss_mask[:, 1:].float().reshape(-1)
    if document_ids is not None:
        weight = weight * (document_ids[:, 1:] == document_ids[:, :-1]).float().reshape(-1)
    return (per_token * weight).sum() / weight.sum().clamp(min=1.0)
