"""MimoModel: a language model plus modalities, merged at placeholder tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from mimo_spec.errors import InputError, ParamError
from mimo_spec.loss import IGNORE_INDEX, mimo_loss
from mimo_spec.models.alignment import (align_modality_embeddings, check_placeholder_counts, gather_before,
                                        gather_positions, split_items_by_placeholders)
from mimo_spec.models.inputs import check_devices, check_mapping, check_tensors, check_values, expected_placeholders
from mimo_spec.registry import register



@dataclass
class MimoOutput:
    """What a forward pass returns.

    logits: (B, S, V); under tensor parallelism a DTensor sharded on the vocabulary (the loss works on
    the shards; ``mimo_spec.parallel.tp.full_logits`` gathers them where all are needed).
    With ``forward(logits_at=positions)`` the logits are ``(K, V)``: only at those K flat positions of the
    ``(B, S)`` sequence (``logits_at`` keeps them; the training step asks for the positions whose next-token
    label counts, so the LM head skips image placeholders and padding). With ``forward(skip_logits=True)`` (the
    default when training with labels) and a plain head, ``logits`` is None: ``head_hidden`` (K, H) and
    ``head_weight`` (V, H) are kept instead and the loss runs the head chunk by chunk
    (:func:`mimo_spec.loss.linear_cross_entropy`: no (K, V) logits held for backward); ``full_logits()``
    computes them when they are wanted after all.
    modality_outputs: per output modality, the items decoded at its generation tokens; for a discrete
    modality the logits over its codes predicting each code position, (N, positions, num_codes).
    output_codes: per discrete output modality, the codes of its target items (N, positions) (what the
    logits are scored against).
    loss / lm_loss / modality_losses: filled by ``forward(labels=..., output_targets=...)``, a convenience
    that calls :func:`mimo_spec.loss.mimo_loss` (the training step calls it itself).
    router: a mixture-of-experts language model's router losses and per-expert token counts of this forward
    (:class:`mimo_spec.components.moe.RouterLosses`; None for a dense one, or in eval mode without labels);
    ``loss`` includes their weighted sum. router_aux_loss / router_z_loss: filled with ``loss``.
    """

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    modality_outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    modality_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    logits_at: torch.Tensor | None = None
    router: object | None = None
    router_aux_loss: torch.Tensor | None = None
    router_z_loss: torch.Tensor | None = None
    output_codes: dict[str, torch.Tensor] = field(default_factory=dict)
    modality_accuracy: dict[str, torch.Tensor] = field(default_factory=dict)
    head_hidden: torch.Tensor | None = None
    head_weight: torch.Tensor | None = None

    def full_logits(self) -> torch.Tensor:
        """The logits, also where ``forward(skip_logits=True)`` left them to the loss (computed here then)."""
        if self.logits is None and self.head_hidden is not None:
            return torch.nn.functional.linear(self.head_hidden, self.head_weight)
        return self.logits


def _or_empty(value):
    """An optional mapping argument: None -> {}; anything else as given (checked by the caller, so a
    tensor passed where a mapping belongs is an InputError, not an ambiguous truth value)."""
    return {} if value is None else value


def positions_from_document_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at every document boundary of a packed row.

    document_ids: (B, S) -> position_ids (B, S); vectorised, no host sync.
    """
    b, s = document_ids.shape
    idx = torch.arange(s, device=document_ids.device).expand(b, s)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return idx - first


@register("model", "mimo")
class MimoModel(nn.Module):
    """A language model with any number of input/output modalities.

    ``forward(input_ids, modality_inputs)`` with
    ``modality_inputs = {modality: {encoder_name: {kwarg: tensor}}}``; items are
    ordered sample by sample, and each placeholder token in ``input_ids`` takes
    one embedding.
    """

    def __init__(self, language_model: nn.Module, modalities: dict[str, nn.Module] | None = None,
                 check_inputs: bool = False):
        super().__init__()
        self.language_model = language_model
        self.modalities = nn.ModuleDict(modalities or {})
        self.check_inputs = check_inputs
        for name, mod in self.modalities.items():  # a modality whose items go through another's encoders
            source = getattr(mod, "inputs_from", None)
            if source is None:
                continue
            other = self.modalities[source] if source in self.modalities else None
            if other is None or other is mod or getattr(other, "inputs_from", None) is not None or not other.has_input:
                usable = [n for n, m in self.modalities.items()
                          if n != name and m.has_input and getattr(m, "inputs_from", None) is None]
                raise ParamError(f"modalities.{name}.inputs_from",
                                 f"inputs_from ({source!r}) must name another modality with encoders of its own; "
                                 f"this model's: {', '.join(usable) or 'none'}")
            mod.link_inputs(other)
        # grid_items: what M-RoPE positions need of each modality with grid items, as plain data (pipeline
        # stages past the first drop the encoders and still compute positions, and slice a batch's grids
        # by item): placeholder, encoder name, grid input names, spatial merge, whether its items are videos
        self.grid_items: dict[str, tuple[int, str, tuple[str, ...], int, bool]] = {}
        for name, mod in self.modalities.items():
            if not mod.has_input or mod.special_token_id is None or not mod.src.encoders:
                continue
            enc_name, enc = next(iter(mod.src.encoders.items()))
            grids = tuple(getattr(enc, "grid_inputs", None) or {})
            merge = getattr(enc, "spatial_merge_size", None)
            if grids and merge is not None:  # fixed-size items: their placeholders count as text positions
                self.grid_items[name] = (mod.special_token_id, enc_name, grids, int(merge),
                                          mod.item_kind == "video")
        vocab = getattr(language_model, "vocab_size", None)
        for name, mod in self.modalities.items():  # discrete modalities: codes in the LM's vocabulary
            if getattr(mod, "tokenizer", None) is None:
                continue
            mod.link_language_model(language_model)
            last = None if mod.code_token_offset is None else mod.code_token_offset + mod.num_codes - 1
            if last is not None and vocab is not None and last >= int(vocab):
                raise ParamError(f"modalities.{name}.params.code_token_offset",
                                 f"codes map to LM ids up to {last}, outside the vocabulary [0, {vocab}) "
                                 f"({mod.num_codes} codes from {mod.code_token_offset})")
        lm_layers = getattr(language_model, "num_layers", None)
        for name, mod in self.modalities.items():
            deep = getattr(mod, "deepstack_lm_layers", None) or []
            if lm_layers is not None and any(i >= lm_layers for i in deep):
                raise ParamError(f"modalities.{name}.deepstack_lm_layers",
                                 f"deepstack_lm_layers ({deep}) must be layers of the {lm_layers}-layer language model")

    # ---- input preparation (host side, cheap) ---------------------------------------------
    def _validate(self, input_ids, modality_inputs, labels, loss_mask, output_targets,
                  document_ids=None, *, position_ids=None, attention_mask=None,
                  modality_embeddings=None, router_mask=None) -> dict[str, int]:
        """Check the batch's structure (types, dtypes, shapes, devices: no host sync); returns each
        input modality's item count."""
        check_tensors(self, input_ids, labels=labels, loss_mask=loss_mask, document_ids=document_ids,
                      position_ids=position_ids, attention_mask=attention_mask,
                      modality_embeddings=modality_embeddings, modality_inputs=modality_inputs,
                      router_mask=router_mask)
        seq = input_ids.shape[1]
        max_len = getattr(self.language_model, "max_seq_len", None)
        if max_len is not None and seq > max_len:
            raise InputError(f"sequence length {seq} exceeds the language model's max_seq_len {max_len}",
                             path="input_ids", hint="truncate the input or raise model.params.max_seq_len")
        counts: dict[str, int] = {}
        modality_inputs = check_mapping(_or_empty(modality_inputs), "modality_inputs",
                                        "modality name to encoder inputs")
        for name, inputs in modality_inputs.items():
            if name not in self.modalities or not self.modalities[name].has_input:
                known = [n for n, m in self.modalities.items() if m.has_input]
                raise InputError(f"unknown input modality {name!r}", path=f"modality_inputs.{name}",
                                 hint=f"this model's input modalities are: {', '.join(known) or 'none'}")
            counts[name] = self.modalities[name].validate_inputs(inputs, f"modality_inputs.{name}",
                                                                 device=input_ids.device)
        output_targets = check_mapping(_or_empty(output_targets), "output_targets",
                                       "output modality name to target tensors (N, ...)")
        for name, target in output_targets.items():
            if name not in self.modalities or not self.modalities[name].has_output:
                known = [n for n, m in self.modalities.items() if m.has_output]
                raise InputError(f"unknown output modality {name!r}", path=f"output_targets.{name}",
                                 hint=f"this model's output modalities are: {', '.join(known) or 'none'}")
            if not isinstance(target, torch.Tensor) or target.dim() == 0:
                raise InputError(f"expected a tensor of items (N, ...), got {type(target).__name__}"
                                 f"{' of shape ()' if isinstance(target, torch.Tensor) else ''}",
                                 path=f"output_targets.{name}")
            check_devices({name: target}, input_ids.device, "output_targets")
            if self.modalities[name].is_discrete:
                self.modalities[name].check_items(target, f"output_targets.{name}")
                continue
            decoder = self.modalities[name].decoder
            if hasattr(decoder, "example_targets") and not torch.compiler.is_compiling():
                try:
                    want = tuple(decoder.example_targets(0).shape[1:])  # an empty tensor: the item shape only
                except Exception:  # a decoder whose examples need items: its own loss checks the shape
                    want = tuple(target.shape[1:])
                if tuple(target.shape[1:]) != want:
                    raise InputError(f"expected targets of shape (N, {', '.join(map(str, want))}), got "
                                     f"{tuple(target.shape)}", path=f"output_targets.{name}",
                                     hint="one target per item, shaped as the decoder's output")
        return counts

    def prepare_inputs(self, input_ids: torch.Tensor, modality_inputs: dict | None = None,
                       items_per_sample: dict[str, list[int]] | None = None) -> None:
        """Check on the host that every sample has exactly as many placeholders as its items produce.

        ``items_per_sample[modality]`` (the data pipeline knows it) gives the item count of each
        sample; without it, counts are inferred from the placeholders and checked in total.
        Raises InputError naming the modality, the sample and both counts.
        """
        modality_inputs = _or_empty(modality_inputs)
        self._validate(input_ids, modality_inputs, None, None, None)
        items_per_sample = self._check_items_per_sample(items_per_sample, input_ids.shape[0])
        check_values(self, input_ids)
        expected = {}
        for name, mod in self.modalities.items():
            if not mod.has_input:
                continue
            if name not in modality_inputs:
                given = sum(items_per_sample.get(name, []))
                if given:
                    raise InputError(f"items_per_sample sums to {given} but no {name} items are given",
                                     path=f"items_per_sample.{name}",
                                     hint=f"pass the items as modality_inputs[{name!r}], or counts of 0")
                expected[name] = (mod.special_token_id, [0] * input_ids.shape[0])
                continue
            inputs = modality_inputs[name]
            per_item = mod.item_tokens(inputs)
            n_items = len(per_item)
            if items_per_sample and name in items_per_sample:
                counts = list(items_per_sample[name])
                if sum(counts) != n_items:
                    raise InputError(f"items_per_sample sums to {sum(counts)} but {n_items} items are given",
                                     path=f"items_per_sample.{name}",
                                     hint=f"count each sample's {name} items, in the order they are given")
                bounds = [sum(counts[:i]) for i in range(len(counts) + 1)]
                expected[name] = (mod.special_token_id, [sum(per_item[bounds[i]:bounds[i + 1]])
                                                         for i in range(len(counts))])
            else:
                split_items_by_placeholders(input_ids, mod.special_token_id, per_item, n_items, name)
        check_placeholder_counts(input_ids, expected)

    def _check_items_per_sample(self, items_per_sample, batch: int) -> dict[str, list[int]]:
        """``items_per_sample`` as {input modality: [one count >= 0 per sample]}; an InputError naming it otherwise."""
        if items_per_sample is None:
            return {}
        check_mapping(items_per_sample, "items_per_sample", "input modality name to per-sample item counts")
        known = [n for n, m in self.modalities.items() if m.has_input]
        out = {}
        for name, counts in items_per_sample.items():
            path = f"items_per_sample.{name}"
            if name not in known:
                raise InputError(f"unknown input modality {name!r}", path=path,
                                 hint=f"this model's input modalities are: {', '.join(known) or 'none'}")
            if isinstance(counts, torch.Tensor) and (counts.dim() != 1 or counts.is_meta):
                pass  # refused below, by type
            elif not isinstance(counts, (list, tuple, str)) and callable(getattr(counts, "tolist", None)):
                counts = counts.tolist()  # a 1-d tensor or array of counts; bool / float values are refused below
            bad = [i for i, c in enumerate(counts) if not isinstance(c, int) or isinstance(c, bool) or c < 0] \
                if isinstance(counts, (list, tuple)) else []
            if not isinstance(counts, (list, tuple)) or bad:
                got = (type(counts).__name__ if not isinstance(counts, (list, tuple)) else
                       f"{str(counts[bad[0]])[:40]} ({type(counts[bad[0]]).__name__}) for sample {bad[0]}")
                raise InputError(f"expected a list of item counts (one integer >= 0 per sample), got {got}",
                                 path=path, hint="e.g. [1, 0] for a batch of 2 where only sample 0 has an item")
            if len(counts) != batch:
                raise InputError(f"gives item counts for {len(counts)} samples but the batch has {batch}", path=path,
                                 hint="one count per row of input_ids")
            out[name] = list(counts)
        return out

    # ---- forward ---------------------------------------------------------------------------
    def embed_inputs(self, input_ids: torch.Tensor, modality_inputs: dict | None = None,
                     modality_embeddings: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Text embeddings with every modality's embeddings at its placeholders: (B, S) -> (B, S, H).

        ``modality_embeddings`` {modality: (sum of item tokens, H)} are already-encoded items
        (cached features, or encoders that ran on other ranks); they replace that modality's encoders.
        """
        return self.embed_with_additions(input_ids, modality_inputs, modality_embeddings)[0]

    def embed_with_additions(self, input_ids, modality_inputs=None, modality_embeddings=None, output_codes=None):
        """:meth:`embed_inputs`, and the DeepStack additions: (embeddings (B, S, H), DeepStack additions {LM layer: (B, S, H)}: zeros except at the
        placeholders of modalities with deepstack_projections). ``output_codes`` {discrete output modality:
        (N, positions) codes}: embedded at that modality's generation tokens (teacher forcing)."""
        modality_inputs, modality_embeddings = _or_empty(modality_inputs), _or_empty(modality_embeddings)
        check_tensors(self, input_ids, modality_embeddings=modality_embeddings, modality_inputs=modality_inputs)
        embeds = self.language_model.embed_tokens(input_ids)
        merged, deep = [], {}
        for name, mod in self.modalities.items():
            if name in modality_embeddings:
                if mod.has_input and mod.src.deepstack_projections is not None and modality_embeddings[name].shape[0]:
                    raise InputError(f"this modality also feeds language-model layers {mod.src.deepstack_lm_layers} "
                                     "from inner encoder layers (DeepStack); encoded items carry only its input "
                                     "embeddings", path=f"modality_embeddings.{name}",
                                     hint="pass the items themselves in modality_inputs")
                merged.append((mod.special_token_id, modality_embeddings[name].to(embeds.dtype)))
                continue
            if not mod.has_input:
                continue
            if name in modality_inputs:
                out, extra = mod.encode_deep(modality_inputs[name])
                merged.append((mod.special_token_id, out))
                for layer, e in zip(mod.src.deepstack_lm_layers, extra):
                    deep.setdefault(layer, []).append((mod.special_token_id, e))
            else:  # no item of this modality in the batch: there must be no placeholder either
                merged.append((mod.special_token_id, embeds.new_zeros(0, embeds.shape[-1])))
        for name, codes in (output_codes or {}).items():
            mod = self.modalities[name]
            merged.append((mod.generation_token_id, mod.embed_codes(codes).flatten(0, 1)))
        additions = {layer: align_modality_embeddings(torch.zeros_like(embeds), input_ids, parts)
                     for layer, parts in deep.items()}
        return align_modality_embeddings(embeds, input_ids, merged), additions

    def position_ids(self, input_ids: torch.Tensor, modality_inputs: dict | None = None, *,
                     attention_mask: torch.Tensor | None = None,
                     document_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """The positions the model uses when none are given, where they depend on the items: M-RoPE
        (a language model with ``mrope_section``) over the items' grids, (3, B, S), computed as
        transformers' ``get_rope_index`` does (:mod:`mimo_spec.models.mrope`). None otherwise (plain
        positions, restarting per document). Reads token ids and grids on the host: the data pipeline
        calls it before moving a batch to the device, so the forward pass does not have to."""
        return self.positions_and_deltas(input_ids, _or_empty(modality_inputs), attention_mask, document_ids)[0]

    def positions_and_deltas(self, input_ids, modality_inputs, attention_mask=None, document_ids=None):
        """(M-RoPE positions (3, B, S), rope_deltas (B, 1)) for a batch with grid items and a language model
        with ``mrope_section``, else (None, None); generation continues text positions from the deltas."""
        from mimo_spec.models.mrope import MropeStream, mrope_positions

        lm = self.language_model
        if getattr(lm, "mrope_section", None) is None:
            return None, None
        streams = []
        for name, (token, enc_name, grids, merge, video_kind) in self.grid_items.items():
            kwargs = (modality_inputs.get(name) or {}).get(enc_name) or {}
            grid_name = next((g for g in grids if g in kwargs), None)
            if grid_name is None:
                continue
            grid = kwargs[grid_name]
            video = video_kind or grid_name.startswith("video")
            interval = None
            tps = getattr(lm, "mrope_tokens_per_second", None)
            if video and tps is not None:
                spg = kwargs.get("second_per_grid_ts")
                spg = torch.ones(grid.shape[0]) if spg is None else spg.detach().float().cpu().flatten()
                interval = spg * float(tps)
            streams.append(MropeStream(name, token, grid, merge, interval,
                                       video and bool(getattr(lm, "mrope_frames_as_items", False))))
        if not streams:
            return None, None
        return mrope_positions(input_ids, streams, attention_mask=attention_mask, document_ids=document_ids)

    def forward(self, input_ids: torch.Tensor, modality_inputs: dict | None = None, *,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, output_targets: dict[str, torch.Tensor] | None = None,
                check_inputs: bool | None = None,
                modality_embeddings: dict[str, torch.Tensor] | None = None,
                logits_at: torch.Tensor | None = None, router_mask: torch.Tensor | None = None,
                skip_logits: bool | None = None) -> MimoOutput:
        """input_ids: (B, S) -> MimoOutput with logits (B, S, V) and, given labels/targets, the loss.

        ``router_mask``: (B, S), 1 at the tokens a mixture-of-experts LM's router losses count (default
        ``attention_mask``): the training step gives the batch's padding mask without masking attention.
        ``logits_at``: flat positions into ``(B * S)`` (int64, on the model's device): the LM head runs only
        there and the logits are ``(K, V)`` (see :class:`MimoOutput`); the loss then counts only those
        positions (pass every position whose next-token label counts, as the training step does).
        ``skip_logits`` (with ``logits_at``; default: in training mode with ``labels``): leave the head to the
        loss where it is a plain product on one device (see :class:`MimoOutput`); else the logits as usual."""
        modality_inputs = _or_empty(modality_inputs)
        output_targets = _or_empty(output_targets)
        self._validate(input_ids, modality_inputs, labels, loss_mask, output_targets, document_ids,
                       position_ids=position_ids, attention_mask=attention_mask,
                       modality_embeddings=modality_embeddings, router_mask=router_mask)
        if check_inputs if check_inputs is not None else self.check_inputs:
            self.prepare_inputs(input_ids, modality_inputs)  # per sample; before the totals below
        if not torch.compiler.is_compiling():  # value checks: one host sync, eager mode only
            check_values(self, input_ids, labels=labels, position_ids=position_ids, loss_mask=loss_mask,
                         placeholders=expected_placeholders(self, modality_inputs, modality_embeddings, output_targets))
        lm = self.language_model
        codes = {name: self.modalities[name].tokenize(target) for name, target in output_targets.items()
                 if self.modalities[name].is_discrete}  # the targets' codes: read (teacher forcing) and scored
        embeds, additions = self.embed_with_additions(input_ids, modality_inputs, modality_embeddings, codes)
        if position_ids is None:
            self._refuse_grid_embeddings(modality_embeddings)
            position_ids = self.position_ids(input_ids, modality_inputs, attention_mask=attention_mask,
                                             document_ids=document_ids)
        if document_ids is not None and position_ids is None:
            position_ids = positions_from_document_ids(document_ids)
        extra = {"layer_additions": additions} if additions else {}
        hidden = lm(embeds, position_ids=position_ids, attention_mask=attention_mask, document_ids=document_ids,
                    **extra)
        if logits_at is not None:  # the head (the widest GEMM) only where a loss is taken
            if logits_at.dim() != 1 or logits_at.dtype != torch.long:
                raise InputError(f"expected flat int64 positions (K,), got {logits_at.dtype} "
                                 f"{tuple(logits_at.shape)}", path="logits_at")
            at = hidden.reshape(-1, hidden.shape[-1]).index_select(0, logits_at)
            if skip_logits is None:
                skip_logits = self.training and labels is not None
            weight = self._fusable_head(lm) if skip_logits else None
            if weight is not None:
                out = MimoOutput(logits=None, logits_at=logits_at, head_hidden=at, head_weight=weight)
            else:
                out = MimoOutput(logits=lm.logits(at), logits_at=logits_at)
        else:
            out = MimoOutput(logits=lm.logits(hidden))
        if callable(getattr(lm, "router_losses", None)) and (self.training or labels is not None or output_targets):
            # MoE layers: aux losses over the real tokens
            out.router = lm.router_losses(router_mask if router_mask is not None else attention_mask)
        for name, target in output_targets.items():  # the target only gives the item count here
            mod = self.modalities[name]
            if mod.is_discrete:  # each code predicted from the position before it
                c = codes[name]
                states = gather_before(hidden, input_ids, mod.generation_token_id, c.shape[0] * c.shape[1])
                out.modality_outputs[name] = mod.code_logits(states).view(*c.shape, mod.num_codes)
                out.output_codes[name] = c
                continue
            n_gen = mod.num_generation_tokens
            states = gather_positions(hidden, input_ids, mod.generation_token_id, target.shape[0] * n_gen)
            out.modality_outputs[name] = mod.decode(states.view(target.shape[0], n_gen, -1))
        if labels is not None or output_targets:
            losses = mimo_loss(self.modalities, out, labels=labels, loss_mask=loss_mask, document_ids=document_ids,
                               output_targets=output_targets)
            out.loss, out.lm_loss, out.modality_losses = losses.loss, losses.lm_loss, losses.modality_losses
            out.router_aux_loss, out.router_z_loss = losses.router_aux_loss, losses.router_z_loss
            out.modality_accuracy = losses.modality_accuracy
        return out

    def _refuse_grid_embeddings(self, modality_embeddings) -> None:
        """M-RoPE positions follow each item's grid; encoded items of a grid modality carry none, so without
        ``position_ids`` their positions would silently be a text run's: an InputError says what to pass."""
        if not modality_embeddings or getattr(self.language_model, "mrope_section", None) is None:
            return
        for name, emb in modality_embeddings.items():
            if name in self.grid_items and emb.shape[0]:
                _, enc, grids, _, _ = self.grid_items[name]
                raise InputError("the language model's M-RoPE positions follow each item's grid, and encoded items "
                                 "carry none", path=f"modality_embeddings.{name}",
                                 hint=f"pass position_ids=model.position_ids(input_ids, {{'{name}': {{'{enc}': "
                                      f"{{'{grids[0]}': <the items' grids>}}}}}}), or the items themselves in "
                                      "modality_inputs")

    def _fusable_head(self, lm) -> torch.Tensor | None:
        """The LM head's weight when the loss may run the head itself: a plain product (the LM's
        ``fusable_head_weight``) outside FSDP, whose hooks gather and free the weight around module calls."""
        get = getattr(lm, "fusable_head_weight", None)
        if get is None:
            return None
        from torch.distributed.fsdp import FSDPModule

        if any(isinstance(m, FSDPModule) for m in (self, lm, getattr(lm, "lm_head", None))):
            return None
        return get()

    # ---- smoke-test inputs -----------------------------------------------------------------
    MAX_EXAMPLE_BATCH = 1024  # example batches are for smoke tests and tracing, not for training
    MAX_TEXT_TOKENS = 2**20  # without a language model's max_seq_len

    def _check_example_args(self, batch_size: object, text_tokens: object, seed: object) -> None:
        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(batch_size) or not 1 <= batch_size <= self.MAX_EXAMPLE_BATCH:
            raise InputError(f"expected an integer in [1, {self.MAX_EXAMPLE_BATCH}], got {type(batch_size).__name__} "
                             f"{batch_size!r}", path="batch_size",
                             hint=f"pass a batch_size from 1 to {self.MAX_EXAMPLE_BATCH} (e.g. the default 2)")
        max_len = getattr(self.language_model, "max_seq_len", None)
        limit = int(max_len) if is_int(max_len) and max_len > 0 else self.MAX_TEXT_TOKENS
        if not is_int(text_tokens) or not 0 <= text_tokens <= limit:
            raise InputError(f"expected an integer in [0, {limit}]" + (" (the language model's max_seq_len)"
                             if limit != self.MAX_TEXT_TOKENS else "") + f", got {type(text_tokens).__name__} "
                             f"{text_tokens!r}", path="text_tokens", hint=f"pass text_tokens from 0 to {limit}")
        if not is_int(seed) or not 0 <= seed < 2**63:
            raise InputError(f"expected an integer in [0, 2**63), got {type(seed).__name__} {seed!r}", path="seed",
                             hint="pass seed=0 (or any integer below 2**63)")

    def example_inputs(self, batch_size: int = 2, *, text_tokens: int = 8, seed: int = 0,
                       device: torch.device | str | None = None) -> dict:
        """A valid keyword batch (with labels) for whatever modalities this model has.

        Sample i carries one item of every input modality and, for output
        modalities, one item to generate. Placeholders get label -100.
        """
        self._check_example_args(batch_size, text_tokens, seed)
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, ValueError, TypeError):
                raise InputError(f"not a torch device: {device!r}", path="device",
                                 hint="e.g. 'cpu', 'cuda' or 'cuda:1'") from None
        g = torch.Generator().manual_seed(seed)
        lm = self.language_model
        specials = {m.special_token_id for m in self.modalities.values() if m.special_token_id is not None}
        specials |= {m.generation_token_id for m in self.modalities.values() if m.generation_token_id is not None}
        marks = {t for m in self.modalities.values() for t in (getattr(m, "begin_token_id", None),
                                                              getattr(m, "end_token_id", None)) if t is not None}
        code_ids = {int(i) for m in self.modalities.values() if getattr(m, "code_token_ids", None) is not None
                    for i in (range(m.code_token_offset, m.code_token_offset + m.num_codes)
                              if m.code_token_ids.is_meta else m.code_token_ids.tolist())}
        avoid = specials | marks | code_ids
        allowed = torch.tensor([i for i in range(min(lm.vocab_size, 4096 + len(avoid))) if i not in avoid])

        def text(n: int) -> torch.Tensor:
            return allowed[torch.randint(len(allowed), (n,), generator=g)]

        modality_inputs, targets, pieces = {}, {}, [[] for _ in range(batch_size)]
        for b in range(batch_size):
            pieces[b].append(text(text_tokens // 2))
        for name, mod in self.modalities.items():
            if mod.has_input:
                modality_inputs[name] = mod.example_inputs(batch_size, generator=g)
                per_item = mod.item_tokens(modality_inputs[name])
                for b in range(batch_size):
                    pieces[b].append(_wrapped(mod, mod.special_token_id, per_item[b]))
        for b in range(batch_size):
            pieces[b].append(text(text_tokens - text_tokens // 2))
        for name, mod in self.modalities.items():
            if mod.has_output:
                targets[name] = mod.example_targets(batch_size, generator=g)
                for b in range(batch_size):
                    pieces[b].append(_wrapped(mod, mod.generation_token_id, mod.num_generation_tokens))
        rows = [torch.cat(p) for p in pieces]
        longest = max(len(r) for r in rows)
        pad = int(allowed[0])  # items of different sizes: shorter rows end in text, with no labels
        input_ids = torch.stack([torch.cat([r, torch.full((longest - len(r),), pad)]) for r in rows]).long()
        lengths = [len(r) for r in rows]
        max_len = getattr(lm, "max_seq_len", None)
        if max_len is not None and input_ids.shape[1] > max_len:
            raise InputError(f"one item of every modality plus {text_tokens} text tokens needs "
                             f"{input_ids.shape[1]} positions, more than max_seq_len {max_len}",
                             path="model.params.max_seq_len", hint="raise max_seq_len or use fewer tokens per item")
        labels = input_ids.clone()
        for tok in specials:
            labels[input_ids == tok] = IGNORE_INDEX
        for b, n in enumerate(lengths):
            labels[b, n:] = IGNORE_INDEX
        batch = {"input_ids": input_ids, "modality_inputs": modality_inputs, "labels": labels}
        if targets:
            batch["output_targets"] = targets
        param = next(self.parameters(), None)
        dev = device if device is not None else (param.device if param is not None else "cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        return _to(batch, dev, dtype)


def _wrapped(mod, token: int, count: int) -> torch.Tensor:
    """An item's run in input_ids: ``count`` placeholders, between a discrete modality's begin / end tokens."""
    run = [torch.full((count,), token)]
    if getattr(mod, "begin_token_id", None) is not None:
        run.insert(0, torch.tensor([mod.begin_token_id]))
    if getattr(mod, "end_token_id", None) is not None:
        run.append(torch.tensor([mod.end_token_id]))
    return torch.cat(run)


def _to(obj, device, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if obj.is_floating_point() else obj.dtype)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj
