"""One modality: its encoders, input projections and (optionally) an output path."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimo_spec.errors import InputError
from mimo_spec.registry import register


@register("modality", "modality")
class Modality(nn.Module):
    """Encoders + projectors that turn a modality's items into LM embeddings,
    and an optional output path (output projection + decoder) that turns LM
    hidden states at generation tokens back into the modality.

    Several encoders combine either ``per_item`` (for each item, encoder A's
    projected tokens then encoder B's; one projector per encoder, keyed by the
    encoder's name) or by ``concat`` (features concatenated along channels, the
    DINO+SigLIP style, then one projector).
    """

    submodule_kinds = {"encoders": "encoder", "input_projections": "projector",
                       "output_projection": "projector", "decoder": "decoder"}

    def __init__(
        self,
        special_token_id: int | None = None,
        encoders: dict[str, nn.Module] | None = None,
        input_projections: dict[str, nn.Module] | None = None,
        combine: Literal["per_item", "concat"] = "per_item",
        generation_token_id: int | None = None,
        output_projection: nn.Module | None = None,
        decoder: nn.Module | None = None,
        output_loss: Literal["mse", "l1", "cross_entropy"] = "mse",
        output_loss_weight: float = 1.0,
    ):
        super().__init__()
        self.special_token_id = special_token_id
        self.encoders = nn.ModuleDict(encoders or {})
        self.input_projections = nn.ModuleDict(input_projections or {})
        self.combine = combine
        self.generation_token_id = generation_token_id
        self.output_projection = output_projection
        self.decoder = decoder
        self.output_loss = output_loss
        self.output_loss_weight = output_loss_weight

    @property
    def has_input(self) -> bool:
        return len(self.encoders) > 0

    @property
    def has_output(self) -> bool:
        return self.decoder is not None

    @property
    def num_generation_tokens(self) -> int:
        return int(getattr(self.decoder, "num_tokens", 0)) if self.decoder is not None else 0

    # ---- inputs ---------------------------------------------------------------------------
    def validate_inputs(self, inputs: dict, path: str, device: torch.device | None = None) -> int:
        """Check names, shapes (and, given ``device``, devices) of this modality's inputs (no host sync).
        Returns the item count."""
        from mimo_spec.models.inputs import check_devices, check_mapping, key_path

        if not isinstance(inputs, dict):
            raise InputError(f"expected a mapping of encoder name to keyword tensors, got {type(inputs).__name__}",
                             path=path, hint=f"encoders: {', '.join(self.encoders)}")
        check_mapping(inputs, path, "encoder name to keyword tensors")
        unknown = [k for k in inputs if k not in self.encoders]
        if unknown:
            raise InputError(f"unknown encoder {unknown[0]!r}", path=f"{path}.{unknown[0]}",
                             hint=f"this modality's encoders are: {', '.join(self.encoders)}")
        missing = [k for k in self.encoders if k not in inputs]
        if missing:
            raise InputError(f"missing inputs for encoder {missing[0]!r}", path=f"{path}.{missing[0]}",
                             hint="every configured encoder needs its inputs (never silently zero)")
        counts = set()
        for name, enc in self.encoders.items():
            where = f"{path}.{name}"
            kwargs = inputs[name]
            if not isinstance(kwargs, dict) or not kwargs:
                got = "an empty mapping" if isinstance(kwargs, dict) else type(kwargs).__name__
                raise InputError(f"expected a mapping of keyword name to tensor (items first), got {got}", path=where,
                                 hint="one tensor per encoder argument, e.g. {\"pixel_values\": images}")
            check_mapping(kwargs, where, "keyword name to tensor")
            enc.validate_inputs(kwargs, where)
            for kw, value in kwargs.items():  # whatever the encoder checks: items first, in every tensor
                if not isinstance(value, torch.Tensor) or value.dim() == 0:
                    raise InputError(f"expected a tensor with the items first (N, ...), got "
                                     f"{'a 0-d tensor' if isinstance(value, torch.Tensor) else type(value).__name__}",
                                     path=key_path(where, kw))
            if device is not None:
                check_devices(kwargs, device, where)
            counts.add(next(iter(kwargs.values())).shape[0])
        if len(counts) > 1:
            raise InputError(f"encoders got different item counts {sorted(counts)}", path=path,
                             hint="each encoder sees the same items")
        return counts.pop()

    def tokens_per_item(self, inputs: dict) -> int:
        """Embeddings one item contributes to the LM sequence, from input shapes only."""
        per_encoder = {n: enc.tokens_per_item(tuple(next(iter(inputs[n].values())).shape))
                       for n, enc in self.encoders.items()}
        if self.combine == "concat":
            proj = next(iter(self.input_projections.values()))
            return proj.tokens_out(next(iter(per_encoder.values())))
        return sum(self.input_projections[n].tokens_out(t) for n, t in per_encoder.items())

    def example_inputs(self, num_items: int, generator: torch.Generator | None = None) -> dict:
        return {n: enc.example_inputs(num_items, generator=generator) for n, enc in self.encoders.items()}

    def _encode_one(self, name: str, inputs: dict) -> torch.Tensor:
        encoder = self.encoders[name]
        if not any(p.requires_grad for p in encoder.parameters()):
            with torch.no_grad():  # frozen: no autograd graph for the encoder
                return encoder(**inputs)
        return encoder(**inputs)

    def encode(self, inputs: dict) -> torch.Tensor:
        """Items -> LM embeddings, flattened in item order: (num_items * tokens_per_item, H)."""
        if next(iter(next(iter(inputs.values())).values())).shape[0] == 0:
            # a data-parallel rank whose share of the batch holds no item: one blank item runs instead
            # (the same ops, so TP and FSDP collectives stay in step with the other ranks; empty tensors
            # trip DTensor's sharding rules) and none of it is kept
            blank = {enc: {kw: t.new_zeros((1, *t.shape[1:])) for kw, t in kws.items()} for enc, kws in inputs.items()}
            return self.encode(blank)[:0]
        if self.combine == "concat":
            feats = torch.cat([self._encode_one(n, inputs[n]) for n in self.encoders], dim=-1)
            out = next(iter(self.input_projections.values()))(feats)
        else:
            # per item: encoder A's tokens then encoder B's, so items never mix across samples
            out = torch.cat([self.input_projections[n](self._encode_one(n, inputs[n])) for n in self.encoders], dim=1)
        return out.flatten(0, 1)

    # ---- outputs --------------------------------------------------------------------------
    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, num_generation_tokens, H) LM hidden states -> (N, ...) decoded items."""
        if self.output_projection is not None:
            hidden = self.output_projection(hidden)
        return self.decoder(hidden)

    def output_loss_fn(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.output_loss == "mse":
            return F.mse_loss(prediction.float(), target.float())
        if self.output_loss == "l1":
            return F.l1_loss(prediction.float(), target.float())
        return F.cross_entropy(prediction.float().flatten(0, -2), target.flatten())
