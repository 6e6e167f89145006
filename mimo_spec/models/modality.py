"""One modality: its encoders, input projections and (optionally) an output path."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimo_spec.errors import InputError, ParamError
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

    Items may differ in size (native-resolution encoders with ``grid_inputs``, see
    :mod:`mimo_spec.models.items`): each item then has its own token count (:meth:`item_tokens`).

    Args:
        special_token_id: the placeholder token of this modality's items in ``input_ids``.
        encoders, input_projections, combine: the input path (above).
        item_kind: what the items are ("image", "video", "audio"), for the data pipeline; None: read
            from the encoders' inputs.
        inputs_from: the name of another modality whose encoders and projectors this one's items go
            through (one set of weights: a video modality sharing an image tower); this modality then
            declares no encoders of its own.
        deepstack_projections: DeepStack (Qwen3-VL): one projector per extra feature map the encoder
            returns (``forward`` gives ``(features, [f_1, ..., f_k])``); projected map ``i`` is added
            to the language model's hidden states after layer ``deepstack_lm_layers[i]`` at this
            modality's placeholders.
        deepstack_lm_layers: those layers (default ``0 .. k-1``).
        item_layout: a stage after the projectors (a ``layout`` component) that arranges each item's
            projected tokens into what the language model sees, from the item's geometry in the
            encoder inputs: LLaVA-NeXT's tiles stitched into one grid, unpadded, with a learned newline
            after each row. ``item_tokens(tokens_in, encoder, inputs) -> list[int]`` gives each item's
            count after it (host data); ``forward(x, tokens_in, encoder, inputs)`` maps the flat projected
            tokens ``(sum(tokens_in), H)`` to ``(sum(item_tokens), H)``. ``encoder`` / ``inputs`` are the
            first encoder and its keyword inputs. A modality with ``inputs_from`` uses its source's.
        generation_token_id, output_projection, decoder, output_loss, output_loss_weight: the output path.
    """

    submodule_kinds = {"encoders": "encoder", "input_projections": "projector",
                       "output_projection": "projector", "decoder": "decoder",
                       "deepstack_projections": "projector", "item_layout": "layout"}

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
        item_kind: Literal["image", "video", "audio"] | None = None,
        inputs_from: str | None = None,
        deepstack_projections: list[nn.Module] | None = None,
        deepstack_lm_layers: list[int] | None = None,
        item_layout: nn.Module | None = None,
    ):
        super().__init__()
        if inputs_from is not None and (encoders or input_projections or deepstack_projections
                                        or item_layout is not None):
            raise ParamError("inputs_from", f"a modality with inputs_from ({inputs_from!r}) uses that modality's "
                             "encoders, projectors and item_layout: declare none of its own")
        if item_layout is not None and deepstack_projections:
            raise ParamError("item_layout", "item_layout and deepstack_projections cannot be combined (the "
                             "DeepStack maps would need the same arrangement)")
        deep = list(deepstack_projections or [])
        layers = list(range(len(deep))) if deepstack_lm_layers is None else list(deepstack_lm_layers)
        if len(layers) != len(deep) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            raise ParamError("deepstack_lm_layers", f"deepstack_lm_layers ({deepstack_lm_layers}) must be one "
                             f"language-model layer index >= 0 per deepstack projection ({len(deep)})")
        self.special_token_id = special_token_id
        self.encoders = nn.ModuleDict(encoders or {})
        self.input_projections = nn.ModuleDict(input_projections or {})
        self.deepstack_projections = nn.ModuleList(deep) if deep else None
        self.deepstack_lm_layers = layers
        self.item_layout = item_layout
        self.item_kind = item_kind
        self.inputs_from = inputs_from
        self._source: list[Modality] = []  # the modality named by inputs_from, linked by MimoModel (not a submodule)
        self.combine = combine
        self.generation_token_id = generation_token_id
        self.output_projection = output_projection
        self.decoder = decoder
        self.output_loss = output_loss
        self.output_loss_weight = output_loss_weight

    def link_inputs(self, source: "Modality") -> None:
        """Use ``source``'s encoders and projectors (``inputs_from``); MimoModel calls this."""
        self._source[:] = [source]

    @property
    def src(self) -> "Modality":
        """The modality whose encoders and projectors this one's items go through (itself, or inputs_from's)."""
        return self._source[0] if self._source else self

    @property
    def has_input(self) -> bool:
        return len(self.src.encoders) > 0

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
        from mimo_spec.models.items import check_grid_rows, count_items, host_inputs

        encoders = self.src.encoders
        if not isinstance(inputs, dict):
            raise InputError(f"expected a mapping of encoder name to keyword tensors, got {type(inputs).__name__}",
                             path=path, hint=f"encoders: {', '.join(encoders)}")
        check_mapping(inputs, path, "encoder name to keyword tensors")
        unknown = [k for k in inputs if k not in encoders]
        if unknown:
            raise InputError(f"unknown encoder {unknown[0]!r}", path=f"{path}.{unknown[0]}",
                             hint=f"this modality's encoders are: {', '.join(encoders)}")
        missing = [k for k in encoders if k not in inputs]
        if missing:
            raise InputError(f"missing inputs for encoder {missing[0]!r}", path=f"{path}.{missing[0]}",
                             hint="every configured encoder needs its inputs (never silently zero)")
        counts = set()
        for name, enc in encoders.items():
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
            check_grid_rows(enc, kwargs, where)
            if device is not None:  # grids are host data: they may stay on the CPU
                hosted = host_inputs(enc)
                check_devices({k: v for k, v in kwargs.items() if k not in hosted}, device, where)
            counts.add(count_items(enc, kwargs))
        if len(counts) > 1:
            raise InputError(f"encoders got different item counts {sorted(counts)}", path=path,
                             hint="each encoder sees the same items")
        return counts.pop()

    def item_tokens(self, inputs: dict) -> list[int]:
        """Embeddings each item contributes to the LM sequence (host data: shapes and grids only)."""
        tokens = self._projected_tokens(inputs)
        layout = self.src.item_layout
        if layout is None:
            return tokens
        first = next(iter(self.src.encoders))
        return [int(t) for t in layout.item_tokens(tokens, self.src.encoders[first], inputs[first])]

    def _projected_tokens(self, inputs: dict) -> list[int]:
        """Tokens of each item after the projectors (before any item_layout)."""
        from mimo_spec.models.items import count_items, grid_of

        src = self.src
        per_encoder = {}
        for n, enc in src.encoders.items():
            kwargs = inputs[n]
            if grid_of(enc, kwargs) is not None:
                per_encoder[n] = [int(t) for t in enc.item_tokens(kwargs)]
            else:
                per_encoder[n] = [enc.tokens_per_item(tuple(next(iter(kwargs.values())).shape))] \
                    * count_items(enc, kwargs)
        if src.combine == "concat":
            proj = next(iter(src.input_projections.values()))
            return [proj.tokens_out(t) for t in next(iter(per_encoder.values()))]
        totals = None
        for n, tokens in per_encoder.items():
            out = [src.input_projections[n].tokens_out(t) for t in tokens]
            totals = out if totals is None else [a + b for a, b in zip(totals, out)]
        return totals or []

    def tokens_per_item(self, inputs: dict) -> int:
        """Embeddings one item contributes, for items of one size; an InputError when they differ
        (native-resolution items: use :meth:`item_tokens`)."""
        from mimo_spec.models.items import modality_item_count

        counts = set(self.item_tokens(inputs)) if modality_item_count(self.src, inputs) else set()
        if not counts:  # no item: the count a size-less item would have is that of an example
            return self.item_tokens(self.example_inputs(1))[0]
        if len(counts) > 1:
            raise InputError(f"items of this modality make different token counts {sorted(counts)}",
                             hint="count them per item (Modality.item_tokens)")
        return counts.pop()

    def example_inputs(self, num_items: int, generator: torch.Generator | None = None) -> dict:
        """Valid random items: a video modality taking another modality's encoders gets their
        ``example_videos`` where they have it (else their ``example_inputs``)."""
        videos = self.item_kind == "video" and self.src is not self

        def example(enc):
            if videos and hasattr(enc, "example_videos"):
                return enc.example_videos(num_items, generator=generator)
            return enc.example_inputs(num_items, generator=generator)

        return {n: example(enc) for n, enc in self.src.encoders.items()}

    def _encode_one(self, name: str, inputs: dict):
        encoder = self.src.encoders[name]
        if not any(p.requires_grad for p in encoder.parameters()):
            with torch.no_grad():  # frozen: no autograd graph for the encoder
                return encoder(**inputs)
        return encoder(**inputs)

    def encode(self, inputs: dict) -> torch.Tensor:
        """Items -> LM embeddings, flattened in item order: (sum of item_tokens, H)."""
        return self.encode_deep(inputs)[0]

    def encode_deep(self, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Items -> (LM embeddings (sum of item_tokens, H), DeepStack embeddings: one (sum of
        item_tokens, H) per ``deepstack_projections`` entry, in order; [] without DeepStack)."""
        from mimo_spec.models.items import count_items, grid_of

        src = self.src
        first = next(iter(inputs))
        if count_items(src.encoders[first], inputs[first]) == 0:
            # a data-parallel rank whose share of the batch holds no item: one blank item runs instead
            # (the same ops, so TP and FSDP collectives stay in step with the other ranks; empty tensors
            # trip DTensor's sharding rules) and none of it is kept
            blank = {}
            for enc, kws in inputs.items():
                encoder = src.encoders[enc]
                given = grid_of(encoder, kws)
                if given is not None:  # an example item under the given names (grids stay on the host)
                    example = encoder.example_inputs(1, generator=torch.Generator())
                    made = grid_of(encoder, example)
                    names = {made[0]: given[0], **dict(zip(made[1], given[1]))}
                    example = {names.get(k, k): v for k, v in example.items()}
                    blank[enc] = {kw: example[kw] if kw == given[0] else example[kw].to(device=t.device, dtype=t.dtype)
                                  for kw, t in kws.items() if kw in example}
                else:
                    blank[enc] = {kw: t.new_zeros((1, *t.shape[1:])) for kw, t in kws.items()}
            out, deep = self.encode_deep(blank)
            return out[:0], [d[:0] for d in deep]
        feats, deep_feats = {}, {}
        for n in src.encoders:
            out = self._encode_one(n, inputs[n])
            feats[n], deep_feats[n] = (out[0], list(out[1])) if isinstance(out, tuple) else (out, [])
        if src.combine == "concat":
            proj = next(iter(src.input_projections.values()))
            out = proj(torch.cat(list(feats.values()), dim=-1))
            out = out.flatten(0, 1) if out.dim() == 3 else out
        elif len(feats) == 1:
            n = next(iter(feats))
            out = src.input_projections[n](feats[n])
            out = out.flatten(0, 1) if out.dim() == 3 else out
        else:  # per item: encoder A's tokens then encoder B's, so items never mix across samples
            parts = []
            for n, f in feats.items():
                p = src.input_projections[n](f)
                if p.dim() == 3:
                    parts.append(list(p.unbind(0)))
                else:
                    counts = [src.input_projections[n].tokens_out(t) for t in src.encoders[n].item_tokens(inputs[n])]
                    parts.append(list(p.split(counts)))
            out = torch.cat([t for item in zip(*parts) for t in item])
        if src.item_layout is not None:
            first = next(iter(src.encoders))
            out = src.item_layout(out, self._projected_tokens(inputs), src.encoders[first], inputs[first])
        deep = []
        if src.deepstack_projections is not None:
            maps = next((d for d in deep_feats.values() if d), [])
            if len(maps) != len(src.deepstack_projections):
                raise ValueError(f"the encoder returned {len(maps)} DeepStack feature maps for "
                                 f"{len(src.deepstack_projections)} deepstack_projections")
            for proj, f in zip(src.deepstack_projections, maps):
                d = proj(f)
                deep.append(d.flatten(0, 1) if d.dim() == 3 else d)
        return out, deep

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
