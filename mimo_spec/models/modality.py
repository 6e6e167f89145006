"""One modality: its encoders, input projections and (optionally) an output path."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimo_spec.errors import InputError, ParamError
from mimo_spec.registry import register

CODEBOOK_PATTERNS = ("flat", "delay")


def delay_codes(codes: torch.Tensor, pad: int) -> torch.Tensor:
    """MusicGen's delay pattern: codes (N, K, T) -> (N, T + K - 1, K), where codebook ``k`` is shifted ``k``
    positions later (position ``t`` holds ``codes[:, k, t - k]`` in column ``k``) and ``pad`` fills the entries
    where ``t - k`` is outside ``[0, T)`` (not yet started / already done)."""
    n, k, t = codes.shape
    out = codes.new_full((n, t + k - 1, k), pad)
    for i in range(k):
        out[:, i:i + t, i] = codes[:, i]
    return out


def undelay_codes(delayed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`delay_codes`: (N, T + K - 1, K) -> codes (N, K, T) (the pad entries dropped)."""
    n, p, k = delayed.shape
    t = p - k + 1
    return torch.stack([delayed[:, i:i + t, i] for i in range(k)], dim=1)


def delay_mask(num_frames: int, num_codebooks: int, device=None) -> torch.Tensor:
    """(T + K - 1, K) bool: the entries of the delayed layout that hold a code (``0 <= t - k < T``)."""
    t = torch.arange(num_frames + num_codebooks - 1, device=device).view(-1, 1)
    k = torch.arange(num_codebooks, device=device).view(1, -1)
    return (t - k >= 0) & (t - k < num_frames)


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
        generation_token_id, output_projection, decoder, output_loss, output_loss_weight: the output path
            (a continuous one: a decoder component of one's own paints the item from the LM hidden states, with
            an mse / l1 loss; none is built in: the patch decoder that was did not beat drawing the mean image).
        tokenizer: a discrete modality (Janus, Chameleon, Emu3, AnyGPT): a ``tokenizer`` component turns items
            into integer codes and back; the LM reads and predicts the codes (teacher-forced cross entropy,
            ``output_loss: cross_entropy``, weighted by ``output_loss_weight``). An item occupies
            ``begin_token_id``, one ``generation_token_id`` (output items) or ``special_token_id`` (input items)
            per code, ``end_token_id`` in ``input_ids``; the model tokenizes the raw items it is given
            (``output_targets[name]``: embedded and scored; ``modality_inputs[name]`` as
            ``{"tokenizer": {"pixel_values" | "input_values": items}}``: embedded only) without gradients.
        begin_token_id / end_token_id: the LM tokens before and after an item's codes (the LM emits the begin
            token to start an item in generation; the end token follows the codes).
        code_token_offset: vocabulary mode (Chameleon, Emu3): code ``c`` is LM token ``code_token_offset + c``
            (the buffer ``code_token_ids``, which an import may overwrite with any map), embedded by the LM's
            embedding and predicted by its head restricted to those ids.
        code_embedding / code_projection / output_head: head mode (Janus): codes -> ``code_embedding`` (e.g. an
            ``embedding`` projector) -> ``code_projection`` (optional, Janus's aligner) into the LM; LM hidden
            states -> ``output_head`` -> logits over the codes.
        code_position_embedding: optional, an ``embedding`` projector (positions x LM hidden size) added to the
            embedding of the code at each position of an item (a learned position within the image, which a
            small LM finds hard to count from RoPE alone); none in Janus / Chameleon.
        num_frames: audio tokenizers: code frames per generated item (a multi-codebook codec's K codes of a
            frame are laid out one after another, frame after frame: K * num_frames positions per item).
        codebook_pattern: how a multi-codebook tokenizer's K codes per frame are laid out: ``flat`` (one
            position per code, frame after frame, codebook k's codes offset by k * codebook_size) or ``delay``
            (MusicGen's delay pattern, head mode only: T + K - 1 positions, codebook k shifted k positions
            later; a position's input is the sum of its K codes' embeddings (``code_embedding`` with
            K * (codebook_size + 1) entries: codebook k's code c at ``k * (codebook_size + 1) + c``, its pad at
            ``k * (codebook_size + 1) + codebook_size``) and the head predicts the next position's K codes at
            once (``output_head`` out_features K * codebook_size); codes are then (N, positions, K) per-codebook
            values, ``codebook_size`` where an entry is padding).
    """

    submodule_kinds = {"encoders": "encoder", "input_projections": "projector",
                       "output_projection": "projector", "decoder": "decoder",
                       "deepstack_projections": "projector", "item_layout": "layout", "tokenizer": "tokenizer",
                       "code_embedding": "projector", "code_projection": "projector", "output_head": "projector",
                       "code_position_embedding": "projector"}

    def __init__(
        self,
        special_token_id: int | None = None,
        encoders: dict[str, nn.Module] | None = None,
        input_projections: dict[str, nn.Module] | None = None,
        combine: Literal["per_item", "concat"] = "per_item",
        generation_token_id: int | None = None,
        output_projection: nn.Module | None = None,
        decoder: nn.Module | None = None,
        output_loss: Literal["mse", "l1", "cross_entropy"] | None = None,
        output_loss_weight: float = 1.0,
        item_kind: Literal["image", "video", "audio"] | None = None,
        inputs_from: str | None = None,
        deepstack_projections: list[nn.Module] | None = None,
        deepstack_lm_layers: list[int] | None = None,
        item_layout: nn.Module | None = None,
        tokenizer: nn.Module | None = None,
        begin_token_id: int | None = None,
        end_token_id: int | None = None,
        code_token_offset: int | None = None,
        code_embedding: nn.Module | None = None,
        code_projection: nn.Module | None = None,
        output_head: nn.Module | None = None,
        num_frames: int | None = None,
        code_position_embedding: nn.Module | None = None,
        codebook_pattern: Literal["flat", "delay"] = "flat",
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
        self.output_loss_weight = output_loss_weight
        # ---- a discrete modality (a tokenizer): codes in the LM's vocabulary, or own embedding and head
        self.tokenizer = tokenizer
        self.begin_token_id, self.end_token_id = begin_token_id, end_token_id
        self.code_token_offset = code_token_offset
        self.code_embedding, self.code_projection, self.output_head = code_embedding, code_projection, output_head
        self.num_frames = num_frames
        self.code_position_embedding = code_position_embedding
        if codebook_pattern not in CODEBOOK_PATTERNS:
            raise ParamError("codebook_pattern", f"expected one of {', '.join(CODEBOOK_PATTERNS)}, got "
                             f"{codebook_pattern!r}")
        self.codebook_pattern = codebook_pattern
        self._language_model: list[nn.Module] = []  # linked by MimoModel (vocabulary mode embeds with it)
        if output_loss is None:
            output_loss = "cross_entropy" if tokenizer is not None else "mse"
        self.output_loss = output_loss
        if tokenizer is not None:
            self._check_discrete(decoder, output_projection, output_loss)
            if code_token_offset is not None:  # persistent: an import may map codes to any LM ids
                self.register_buffer("code_token_ids", torch.arange(self.num_codes, dtype=torch.long) + code_token_offset)
            else:
                self.code_token_ids = None
        else:
            self.code_token_ids = None
            if output_loss == "cross_entropy" and decoder is not None:
                raise ParamError("output_loss", "cross_entropy needs codes to score: this modality's decoder paints "
                                 "continuous items (use mse or l1), or give it a tokenizer (a discrete modality)")
            for key, value in (("begin_token_id", begin_token_id), ("end_token_id", end_token_id),
                               ("code_token_offset", code_token_offset), ("code_embedding", code_embedding),
                               ("output_head", output_head), ("code_projection", code_projection),
                               ("num_frames", num_frames),
                               ("codebook_pattern", None if codebook_pattern == "flat" else codebook_pattern)):
                if value is not None:
                    raise ParamError(key, f"{key} belongs to a discrete modality: add a tokenizer")

    def _check_discrete(self, decoder, output_projection, output_loss) -> None:
        tok = self.tokenizer
        if decoder is not None or output_projection is not None:
            raise ParamError("decoder", "a modality with a tokenizer predicts codes: it takes no decoder or "
                             "output_projection (its items are decoded by the tokenizer)")
        if output_loss != "cross_entropy":
            raise ParamError("output_loss", f"a discrete modality (a tokenizer) is trained with cross_entropy on "
                             f"its codes, not {output_loss}")
        vocab_mode = self.code_token_offset is not None
        if vocab_mode and (self.code_embedding is not None or self.output_head is not None
                           or self.code_projection is not None):
            raise ParamError("code_token_offset", "choose one: code_token_offset (codes are LM tokens) or "
                             "code_embedding / output_head (a head of the modality's own)")
        if not vocab_mode and self.code_embedding is None:
            raise ParamError("code_embedding", "a discrete modality needs code_token_offset (codes as LM tokens) "
                             "or code_embedding (+ output_head to generate)")
        if not vocab_mode and self.generation_token_id is not None and self.output_head is None:
            raise ParamError("output_head", "an output modality in head mode needs output_head (LM hidden -> "
                             "logits over the codes)")
        if vocab_mode and self.code_token_offset < 0:
            raise ParamError("code_token_offset", f"must be >= 0, got {self.code_token_offset}")
        kind = getattr(tok, "item_kind", "image")
        if kind == "audio" and self.generation_token_id is not None and (self.num_frames or 0) < 1:
            raise ParamError("num_frames", "an audio output modality needs num_frames (code frames per generated "
                             "item) >= 1")
        if self.item_kind is None:
            self.item_kind = kind
        if self.codebook_pattern == "delay":
            self._check_delay(vocab_mode)

    def _check_delay(self, vocab_mode: bool) -> None:
        """``codebook_pattern: delay``: several codebooks, head mode, embedding and head sized for K codebooks."""
        tok = self.tokenizer
        k, size = int(getattr(tok, "num_codebooks", 1)), int(tok.codebook_size)
        if k < 2:
            raise ParamError("codebook_pattern", f"the delay pattern interleaves several codebooks; this tokenizer "
                             f"has {k} (use codebook_pattern: flat)")
        if vocab_mode:
            raise ParamError("codebook_pattern", "the delay pattern predicts K codes per position with a head of "
                             "the modality's own (head mode: code_embedding + output_head), not with "
                             "code_token_offset (vocabulary mode); use codebook_pattern: flat there")
        rows = getattr(self.code_embedding, "in_features", None)
        if rows is not None and int(rows) != k * (size + 1):
            raise ParamError("code_embedding", f"code_embedding: with codebook_pattern: delay it holds each "
                             f"codebook's codes and its pad code: num_embeddings = K * (codebook_size + 1) = "
                             f"{k} * ({size} + 1) = {k * (size + 1)}, got {rows}")
        out = getattr(self.output_head, "out_features", None)
        if out is not None and int(out) != k * size:
            raise ParamError("output_head", f"output_head: with codebook_pattern: delay it predicts K codebooks at "
                             f"once: "
                             f"out_features = K * codebook_size = {k * size}, got {out}")

    # ---- a discrete modality ----------------------------------------------------------------
    @property
    def is_discrete(self) -> bool:
        return self.tokenizer is not None

    @property
    def delayed(self) -> bool:
        """Whether the codebooks are laid out by the delay pattern (``codebook_pattern: delay``)."""
        return self.codebook_pattern == "delay" and self.tokenizer is not None

    @property
    def num_codebooks(self) -> int:
        return int(getattr(self.tokenizer, "num_codebooks", 1))

    @property
    def num_codes(self) -> int:
        """The modality's code space: codebook_size per codebook, the codebooks one after another (flat); with
        the delay pattern, one codebook's (each entry of a position is a code of its own codebook)."""
        tok = self.tokenizer
        if self.delayed:
            return int(tok.codebook_size)
        return int(tok.codebook_size) * int(getattr(tok, "num_codebooks", 1))

    @property
    def input_key(self) -> str:
        """The keyword a discrete modality's raw items take in ``modality_inputs[name]["tokenizer"]``."""
        return "input_values" if getattr(self.tokenizer, "item_kind", "image") == "audio" else "pixel_values"

    def link_language_model(self, lm: nn.Module) -> None:
        """The LM whose embedding and head a vocabulary-mode modality uses; MimoModel calls this."""
        self._language_model[:] = [lm]

    def codes_per_item(self, num_samples: int | None = None) -> int:
        """Code positions of one item: an image tokenizer's num_tokens; audio: K * frames (of ``num_samples``
        samples, else ``num_frames``)."""
        tok = self.tokenizer
        if getattr(tok, "item_kind", "image") == "audio":
            frames = self.num_frames if num_samples is None else int(tok.num_frames(num_samples))
            if self.delayed:  # T + K - 1 positions of K codes each
                return int(frames or 0) + self.num_codebooks - 1
            return int(getattr(tok, "num_codebooks", 1)) * int(frames or 0)
        return int(tok.num_tokens)

    def tokenize(self, items: torch.Tensor) -> torch.Tensor:
        """Raw items -> (N, positions) int64 codes in the modality's code space, without gradients (several
        codebooks: frame after frame, codebook k's code offset by k * codebook_size)."""
        with torch.no_grad():
            codes = self.tokenizer.encode(items)
        if self.delayed:  # (N, K, T) -> (N, T + K - 1, K), pad = codebook_size
            return delay_codes(codes.long(), int(self.tokenizer.codebook_size))
        if codes.dim() == 3:  # (N, K, T) -> (N, T * K): frame-major, codebooks offset
            k = codes.shape[1]
            offsets = torch.arange(k, device=codes.device).view(1, k, 1) * int(self.tokenizer.codebook_size)
            codes = (codes + offsets).transpose(1, 2).reshape(codes.shape[0], -1)
        return codes.long()

    def detokenize(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, positions) codes (as :meth:`tokenize` gives them) -> decoded items."""
        k = int(getattr(self.tokenizer, "num_codebooks", 1))
        if self.delayed:
            with torch.no_grad():
                return self.tokenizer.decode(undelay_codes(codes))
        if getattr(self.tokenizer, "item_kind", "image") == "audio" or k > 1:
            size = int(self.tokenizer.codebook_size)
            codes = codes.reshape(codes.shape[0], -1, k).transpose(1, 2)  # (N, K, T)
            codes = codes - torch.arange(k, device=codes.device).view(1, k, 1) * size
        with torch.no_grad():
            return self.tokenizer.decode(codes)

    def code_range(self, position: int) -> tuple[int, int]:
        """The codes allowed at ``position`` of an item: with K codebooks, codebook ``position % K``'s."""
        k = int(getattr(self.tokenizer, "num_codebooks", 1))
        size = int(self.tokenizer.codebook_size)
        return ((position % k) * size, (position % k + 1) * size) if k > 1 else (0, size)

    def embed_codes(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Codes (..., T) at positions ``start .. start + T - 1`` of their items -> LM input embeddings (..., T, H).
        With the delay pattern codes are (..., T, K): each position's K codes (pads included) embedded from their
        codebook's rows and summed."""
        if self.delayed:
            k, size = codes.shape[-1], int(self.tokenizer.codebook_size)
            rows = codes + torch.arange(k, device=codes.device) * (size + 1)
            x = self.code_embedding(rows).sum(-2)
            x = self.code_projection(x) if self.code_projection is not None else x
            if self.code_position_embedding is not None:
                x = x + self.code_position_embedding(torch.arange(start, start + codes.shape[-2], device=codes.device))
            return x
        if self.code_token_offset is not None:
            x = self._language_model[0].embed_tokens(self.code_token_ids[codes])
        else:
            x = self.code_embedding(codes)
            x = self.code_projection(x) if self.code_projection is not None else x
        if self.code_position_embedding is not None:
            x = x + self.code_position_embedding(torch.arange(start, start + codes.shape[-1], device=codes.device))
        return x

    def code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM hidden states (..., H) -> logits over the modality's codes (..., num_codes); with the delay pattern
        the next position's K codes at once, (..., K, codebook_size)."""
        if self.delayed:
            logits = self.output_head(hidden)
            return logits.view(*logits.shape[:-1], self.num_codebooks, int(self.tokenizer.codebook_size))
        if self.code_token_offset is not None:
            logits = self._language_model[0].logits(hidden)
            if hasattr(logits, "full_tensor"):  # a vocab-sharded DTensor (tensor parallelism): the whole vocabulary
                logits = logits.full_tensor()
            return logits.index_select(-1, self.code_token_ids)
        return self.output_head(hidden)

    def _discrete_items(self, inputs: dict, path: str) -> torch.Tensor:
        """The raw items of a discrete modality's ``{"tokenizer": {key: items}}`` inputs (checked)."""
        from mimo_spec.models.inputs import check_mapping

        key = self.input_key
        if not isinstance(inputs, dict):
            raise InputError(f"expected {{'tokenizer': {{'{key}': items}}}}, got {type(inputs).__name__}", path=path)
        check_mapping(inputs, path, "'tokenizer' to keyword tensors")
        if list(inputs) != ["tokenizer"] or not isinstance(inputs["tokenizer"], dict) \
                or list(inputs["tokenizer"]) != [key]:
            got = list(inputs) if list(inputs) != ["tokenizer"] or not isinstance(inputs["tokenizer"], dict) \
                else list(inputs["tokenizer"])
            raise InputError(f"expected {{'tokenizer': {{'{key}': items}}}}, got keys {got}", path=path,
                             hint="a discrete modality tokenizes its raw items itself")
        items = inputs["tokenizer"][key]
        if not isinstance(items, torch.Tensor) or items.dim() < 2:
            raise InputError("expected a tensor with the items first (N, ...)", path=f"{path}.tokenizer.{key}")
        self.check_items(items, f"{path}.tokenizer.{key}")
        return items

    def check_items(self, items: torch.Tensor, path: str) -> None:
        """Raw items of the tokenizer's shape: images (N, C, S, S); audio (N, samples); floating point (shapes
        and dtype only: no values read)."""
        tok = self.tokenizer
        if not items.is_floating_point():  # uint8 pixels would be read as values up to 255, not [-1, 1] / [0, 1]
            raise InputError(f"expected floating-point items, got {items.dtype}", path=path,
                             hint="images as floats in the tokenizer's range (the data pipeline's), audio as "
                                  "float samples in [-1, 1]")
        if getattr(tok, "item_kind", "image") == "audio":
            if items.dim() != 2:
                raise InputError(f"expected audio clips (N, samples), got {tuple(items.shape)}", path=path)
            if path.startswith("output_targets") and int(tok.num_frames(items.shape[1])) != self.num_frames:
                raise InputError(f"clips of {items.shape[1]} samples make {tok.num_frames(items.shape[1])} code "
                                 f"frames; this modality generates {self.num_frames}", path=path,
                                 hint="cut or pad the target clips to num_frames frames of the codec")
            return
        size = int(tok.image_size)
        c = int(getattr(tok, "num_channels", getattr(tok, "in_channels", 3)))
        if items.dim() != 4 or tuple(items.shape[1:]) != (c, size, size):
            raise InputError(f"expected images (N, {c}, {size}, {size}), got {tuple(items.shape)}", path=path,
                             hint="one item per target, at the tokenizer's image_size")

    def example_items(self, num_items: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw items for example batches: the tokenizer's, audio cut to ``num_frames`` frames' samples."""
        tok = self.tokenizer
        if getattr(tok, "item_kind", "image") == "audio" and self.num_frames:  # clips of num_frames frames
            hop = int(getattr(tok, "hop_length", 0) or 0)
            if hop:
                return tok.example_targets(num_items, generator=generator, num_samples=hop * self.num_frames)
        return tok.example_targets(num_items, generator=generator)

    def link_inputs(self, source: "Modality") -> None:
        """Use ``source``'s encoders and projectors (``inputs_from``); MimoModel calls this."""
        self._source[:] = [source]

    @property
    def src(self) -> "Modality":
        """The modality whose encoders and projectors this one's items go through (itself, or inputs_from's)."""
        return self._source[0] if self._source else self

    @property
    def has_input(self) -> bool:
        if self.tokenizer is not None:  # a discrete modality takes input items when it has their placeholder
            return self.special_token_id is not None
        return len(self.src.encoders) > 0

    @property
    def has_output(self) -> bool:
        if self.tokenizer is not None:
            return self.generation_token_id is not None
        return self.decoder is not None

    @property
    def num_generation_tokens(self) -> int:
        """Positions one generated item takes in ``input_ids`` (its codes, or its decoder's tokens)."""
        if self.tokenizer is not None:
            return self.codes_per_item() if self.generation_token_id is not None else 0
        return int(getattr(self.decoder, "num_tokens", 0)) if self.decoder is not None else 0

    def example_targets(self, num_items: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Items to generate, for example batches (the tokenizer's or the decoder's)."""
        if self.tokenizer is not None:
            return self.example_items(num_items, generator=generator)
        return self.decoder.example_targets(num_items, generator=generator)

    # ---- inputs ---------------------------------------------------------------------------
    def validate_inputs(self, inputs: dict, path: str, device: torch.device | None = None) -> int:
        """Check names, shapes (and, given ``device``, devices) of this modality's inputs (no host sync).
        Returns the item count."""
        from mimo_spec.models.inputs import check_devices, check_mapping, key_path
        from mimo_spec.models.items import check_grid_rows, count_items, host_inputs

        if self.tokenizer is not None:
            items = self._discrete_items(inputs, path)
            if device is not None:
                check_devices({"tokenizer": inputs["tokenizer"]}, device, path)
            return int(items.shape[0])
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
        if self.tokenizer is not None:
            items = inputs["tokenizer"][self.input_key]
            per = self.codes_per_item(int(items.shape[-1]) if items.dim() == 2 else None)
            return [per] * int(items.shape[0])
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

        if self.tokenizer is not None:
            return self.item_tokens(inputs)[0] if self.item_tokens(inputs) else self.codes_per_item()
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
        if self.tokenizer is not None:
            return {"tokenizer": {self.input_key: self.example_items(num_items, generator=generator)}}
        videos = self.item_kind == "video" and self.src is not self

        def example(enc):
            if videos and hasattr(enc, "example_videos"):
                return enc.example_videos(num_items, generator=generator)
            return enc.example_inputs(num_items, generator=generator)

        return {n: example(enc) for n, enc in self.src.encoders.items()}

    def _encode_one(self, name: str, inputs: dict):
        encoder = self.src.encoders[name]
        if not any(p.requires_grad for p in encoder.parameters()):
            # frozen: no autograd graph, and run as at inference (Megatron's force_eval_mode for a frozen ViT):
            # no dropout, no training-time random crops (RADIO's position table), the features inference sees
            was_training = encoder.training
            encoder.train(False)
            try:
                with torch.no_grad():
                    return encoder(**inputs)
            finally:
                encoder.train(was_training)
        return encoder(**inputs)

    def encode(self, inputs: dict) -> torch.Tensor:
        """Items -> LM embeddings, flattened in item order: (sum of item_tokens, H)."""
        return self.encode_deep(inputs)[0]

    def encode_deep(self, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Items -> (LM embeddings (sum of item_tokens, H), DeepStack embeddings: one (sum of
        item_tokens, H) per ``deepstack_projections`` entry, in order; [] without DeepStack)."""
        from mimo_spec.models.items import count_items, grid_of

        if self.tokenizer is not None:  # codes of the raw items, embedded (no gradient into the tokenizer)
            codes = self.tokenize(self._discrete_items(inputs, "modality_inputs"))
            return self.embed_codes(codes).flatten(0, 1), []
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
                    with torch.device("cpu"):  # on the host with its generator (the caller may hold a GPU context)
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

    def code_targets(self, codes: torch.Tensor) -> torch.Tensor:
        """The codes as cross-entropy targets: the delay pattern's pad entries -100 (not scored)."""
        if self.delayed:
            return codes.masked_fill(codes >= int(self.tokenizer.codebook_size), -100)
        return codes

    def code_accuracy(self, logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The fraction of codes whose logits' argmax is the code (teacher forcing; the delay pattern's pads
        left out)."""
        targets = self.code_targets(codes)
        valid = targets != -100
        return ((logits.argmax(-1) == targets) & valid).float().sum() / valid.float().sum().clamp(min=1.0)
