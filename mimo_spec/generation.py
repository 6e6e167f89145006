"""Generation: greedy or top-k/top-p sampling with a KV cache; output modalities are decoded too.

Under torchrun/SLURM every rank runs the same generation on its shard of the model
(:func:`start_parallel_generation`): tensor-parallel logits are gathered for the choice of the
next token, and rank 0's choice is broadcast so that no rank can drift from the others.
Pipeline and split layouts hold no whole model on a rank, so generation replicates it there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import math

import torch

from mimo_spec.errors import InputError

STRATEGIES = ("greedy", "sample")


@dataclass
class Generation:
    """What ``generate`` produced: new token ids (an item's positions included: its begin token, one
    generation token per code, its end token), the decoded output-modality items (``outputs[name]``) and,
    for discrete modalities, each item's codes (``codes[name]``: int64 (positions,) tensors, as
    ``Modality.tokenize`` lays them out; (positions, K) with the delay pattern). ``scores[name]``: with
    ``output_scores=True``, each item's (positions, num_codes) logits the codes were picked from (guided when
    ``guidance_scale`` != 1; (positions, K, codebook_size) with the delay pattern)."""

    tokens: list[int]
    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    codes: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    scores: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def _shown(value) -> str:
    """A setting's value for a message: short, and a tensor by its shape, never its printout."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_sampling(strategy: str, temperature: float, top_k: int, top_p: float, max_new_tokens: int = 1) -> None:
    """Refuse settings ``generate`` does not implement or that make no sense (an InputError naming the argument)."""
    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy {_shown(strategy)}: implemented are {', '.join(STRATEGIES)}",
                         path="strategy",
                         hint="greedy picks the most likely token; sample draws with temperature / top_k / top_p")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InputError(f"expected a positive integer, got {_shown(max_new_tokens)}", path="max_new_tokens")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise InputError(f"expected an integer >= 0 (0: off), got {_shown(top_k)}", path="top_k")
    if not (isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and 0.0 < top_p <= 1.0):
        raise InputError(f"expected a number in (0, 1] (1: off), got {_shown(top_p)}", path="top_p")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and math.isfinite(temperature)
            and temperature >= 0):
        raise InputError(f"expected a finite number >= 0, got {_shown(temperature)}", path="temperature")
    if strategy == "sample" and temperature <= 0:
        raise InputError("must be greater than 0 when sampling", path="temperature",
                         hint="strategy=greedy picks the most likely token")


def check_seed(seed) -> None:
    """``seed`` seeds a torch.Generator: an integer in [0, 2**63)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise InputError(f"expected an integer in [0, 2**63), got {_shown(seed)}", path="seed",
                         hint="any non-negative integer below 2**63 seeds the sampler")


def check_prompt(model, input_ids, modality_inputs) -> None:
    """The model's own input checks on one prompt: input_ids (1, S) with S >= 1, ids inside the vocabulary,
    known modalities with well-formed items, and one placeholder per item embedding (InputError naming
    the argument). One small host sync."""
    from mimo_spec.models.inputs import check_tensors, check_values, expected_placeholders

    check_tensors(model, input_ids, modality_inputs=modality_inputs)
    if input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise InputError(f"expected one prompt of shape (1, S) with S >= 1, got {tuple(input_ids.shape)}",
                         path="input_ids", hint="generate continues one prompt: call it once per prompt"
                         if input_ids.shape[0] != 1 else "the prompt needs at least one token")
    weight = next(model.parameters(), None)
    if weight is not None and not weight.is_meta and not input_ids.is_meta and weight.device != input_ids.device:
        raise InputError(f"input_ids is on {input_ids.device} but the model is on {weight.device}", path="input_ids",
                         hint=f"move the prompt and modality_inputs to the model's device, {weight.device}")
    model._validate(input_ids, modality_inputs, None, None, None)
    check_values(model, input_ids, placeholders=expected_placeholders(model, modality_inputs, None, None))


def pick_next(logits: torch.Tensor, strategy: str = "greedy", temperature: float = 1.0, top_k: int = 0,
              top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if strategy not in STRATEGIES:
        check_sampling(strategy, temperature, top_k, top_p)
    if strategy == "greedy":
        return logits.argmax(dim=-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1).cpu()  # the seeded generator lives on the CPU, whatever the model's device
    if bool(torch.isnan(probs).any()):  # on the host already: multinomial would fail with a bare error
        raise _nan_logits()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


def _nan_logits() -> InputError:
    return InputError("the next-token logits are NaN", path="model",
                      hint="NaN or inf in the inputs (pixel values, audio features, embeddings) or the weights")


def _agree(next_id: torch.Tensor) -> torch.Tensor:
    """Rank 0's token on every rank. The ranks compute the same logits, but a sampled choice (or an
    argmax tie) that differed by rounding would feed different tokens to collectives that must match."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return next_id
    next_id = next_id.contiguous()
    dist.broadcast(next_id, src=0)
    return next_id


def next_token_logits(lm, hidden: torch.Tensor) -> torch.Tensor:
    """The LM's logits for the last position (B, V), gathered when the head keeps them vocab-sharded (TP)."""
    from mimo_spec.parallel.tp import full_logits

    return full_logits(lm.logits(hidden[:, -1]))


def unconditional_ids(ids: torch.Tensor, begin_token_id: int | None, pad_id: int,
                      bos_id: int | None = None) -> torch.Tensor:
    """The unconditional row of classifier-free guidance, as Janus builds it: every token of ``ids`` (B, L)
    but the BOS tokens (``bos_id``; without one, the first token) and the item's begin tokens replaced by
    ``pad_id``."""
    keep = torch.zeros_like(ids, dtype=torch.bool)
    if bos_id is None:
        keep[:, 0] = True
    else:
        keep |= ids == bos_id
    if begin_token_id is not None:
        keep |= ids == begin_token_id
    return torch.where(keep, ids, torch.full_like(ids, pad_id))


def _check_guidance(model, output_modality, guidance_scale, pad_id) -> None:
    """``output_modality`` names an output modality; ``guidance_scale`` is a finite number and, when it is not 1,
    ``pad_id`` a token id (the unconditional row is made of it) and the LM no M-RoPE one."""
    outputs = [n for n, m in model.modalities.items() if m.has_output]
    if output_modality is not None and (not isinstance(output_modality, str) or output_modality not in outputs):
        raise InputError(f"expected the name of an output modality, got {_shown(output_modality)}",
                         path="output_modality", hint=f"this model's output modalities: {', '.join(outputs) or 'none'}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale):
        raise InputError(f"expected a finite number (1: no guidance), got {_shown(guidance_scale)}",
                         path="guidance_scale")
    if guidance_scale != 1:
        if pad_id is None or isinstance(pad_id, bool) or not isinstance(pad_id, int) \
                or not 0 <= pad_id < int(getattr(model.language_model, "vocab_size", 2**62)):
            raise InputError(f"expected the pad token id the unconditional row is made of, got {_shown(pad_id)}",
                             path="pad_id", hint="classifier-free guidance replaces the prompt by pad tokens "
                                                 "(Janus): pass the tokenizer's pad id")
        if getattr(model.language_model, "mrope_section", None) is not None:
            raise InputError("guidance with an M-RoPE language model is not implemented", path="guidance_scale",
                             hint="use guidance_scale=1")


def _restores_mode(fn):
    """``fn(model, ...)`` runs the model in eval mode and hands it back in the mode it was given in (a sample
    taken inside a training loop must not leave dropout off for the steps after it)."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        was = getattr(model, "training", None)
        try:
            return fn(model, *args, **kwargs)
        finally:
            if isinstance(model, torch.nn.Module) and was is not None:
                model.train(was)

    return wrapper


@_restores_mode
@torch.no_grad()
def generate(model, input_ids: torch.Tensor, modality_inputs: dict | None = None, *, max_new_tokens: int = 32,
             strategy: str = "greedy", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | list[int] | tuple[int, ...] | None = None, use_cache: bool = True,
             seed: int = 0, output_modality: str | None = None, guidance_scale: float = 1.0,
             pad_id: int | None = None, output_scores: bool = False, bos_id: int | None = None) -> Generation:
    """Continue one prompt (input_ids (1, S)) by up to ``max_new_tokens`` tokens, text and output items
    interleaved (an item the LM begins is started only if it fits in what is left; ``output_modality``'s item
    is generated whole).

    A discrete output modality (a tokenizer): when the LM emits its ``begin_token_id`` (or at once, with
    ``output_modality=name``), the item's codes are picked one by one with the KV cache, from logits over the
    modality's codes only (its own head, or the LM head restricted to its code ids), by the same
    ``strategy`` / ``temperature`` / ``top_k`` / ``top_p``; each code is fed back; then its ``end_token_id``
    and the text goes on. ``guidance_scale`` != 1: classifier-free guidance, as Janus: a second row whose
    tokens but the BOS tokens (``bos_id``; without one, the first token) and the begin token are ``pad_id`` runs
    beside the prompt, and codes are picked from
    ``uncond + guidance_scale * (cond - uncond)``. The codes are in ``codes[name]`` and the tokenizer's
    decoding of them in ``outputs[name]``.

    A continuous output modality (a decoder): when the LM emits its generation token, the rest of that item's
    generation tokens are fed in and the hidden states at all of them are decoded into the item.

    ``use_cache=False`` recomputes the whole sequence every step (the reference the cache must match).
    ``eos_id``: the token id (or ids: eos and a chat template's end-of-turn token) that ends the generation.
    """
    from mimo_spec.models.mimo import MimoModel

    if not isinstance(model, MimoModel):
        raise InputError(f"expected a MimoModel (from build_model), got {type(model).__name__}", path="model")
    if any(p.is_meta for p in model.parameters()):
        raise InputError("the model is on the meta device: it has no weights to generate with", path="model",
                         hint="build it on a real device (build_model(cfg, device='cpu')) or load a checkpoint")
    check_sampling(strategy, temperature, top_k, top_p, max_new_tokens)
    check_seed(seed)
    _check_guidance(model, output_modality, guidance_scale, pad_id)
    stop_ids = [] if eos_id is None else list(eos_id) if isinstance(eos_id, (list, tuple)) else [eos_id]
    vocab = getattr(model.language_model, "vocab_size", None)
    for stop in stop_ids:
        if not isinstance(stop, int) or isinstance(stop, bool):
            raise InputError(f"expected a token id (an integer), a list of them or None, got {type(stop).__name__}",
                             path="eos_id")
        if vocab is not None and not 0 <= stop < int(vocab):
            raise InputError(f"token id {stop} is outside the vocabulary [0, {vocab})", path="eos_id")
    modality_inputs = {} if modality_inputs is None else modality_inputs
    check_prompt(model, input_ids, modality_inputs)
    model.eval()
    lm = model.language_model
    gen = torch.Generator(device="cpu").manual_seed(seed)
    outputs = {name: m for name, m in model.modalities.items() if m.has_output}
    continuous = {m.generation_token_id: (name, m) for name, m in outputs.items() if not m.is_discrete}
    # begin tokens that start an item when the LM picks one: a tokenizer that cannot turn codes into pixels
    # (Chameleon's VQ) starts none, its begin token is text as in transformers (output_modality still asks it)
    begins = {m.begin_token_id: (name, m) for name, m in outputs.items()
              if m.is_discrete and m.begin_token_id is not None and getattr(m.tokenizer, "can_decode", True)}
    # text never picks a code of a vocabulary-mode modality (those ids are the items' own)
    code_ids = [m.code_token_ids for m in model.modalities.values()
                if getattr(m, "code_token_ids", None) is not None]
    code_ids = torch.cat(code_ids).to(input_ids.device) if code_ids else None
    extra = max((m.num_generation_tokens + 2 for m in outputs.values()), default=0)
    limit = getattr(lm, "max_seq_len", None)
    if getattr(lm, "position_embedding_kind", None) == "learned" and limit is not None \
            and input_ids.shape[1] + max_new_tokens + extra > limit:  # learned positions end at max_seq_len
        room = int(limit) - input_ids.shape[1] - extra
        raise InputError(f"a {input_ids.shape[1]}-token prompt" + (f" (+{extra} for an output item)" if extra else "")
                         + f" plus {max_new_tokens} new tokens exceeds the language model's max_seq_len {limit} "
                         "(learned positions)", path="max_new_tokens",
                         hint=f"ask for at most {room} new tokens" if room > 0 else "shorten the prompt")
    embeds, additions = model.embed_with_additions(input_ids, modality_inputs, None)  # (1, S, H); DeepStack {layer: (1, S, H)}
    positions, rope_deltas = model.positions_and_deltas(input_ids, modality_inputs, None, None)  # M-RoPE: (3, 1, S), (1, 1)
    max_len = embeds.shape[1] + max_new_tokens + extra
    if use_cache:  # refuse a cache that cannot fit before allocating it
        from mimo_spec.train.limits import check_generation_memory

        check_generation_memory(model, embeds.shape[1] + extra, max_new_tokens, embeds.device)
    st = _Decoding(model, lm, embeds, positions, rope_deltas, additions, use_cache, max_len, input_ids)
    result = Generation(tokens=[])
    pick = lambda logits: _agree(pick_next(logits, strategy, temperature, top_k, top_p, gen))  # noqa: E731

    def item(name, mod):  # a discrete item's codes, then its end token
        codes, scores = st.codes(mod, pick, guidance_scale, pad_id, bos_id)
        result.codes.setdefault(name, []).append(codes)
        if output_scores:
            result.scores.setdefault(name, []).append(scores)
        result.tokens.extend([mod.generation_token_id] * codes.shape[0])
        if getattr(mod.tokenizer, "can_decode", True):  # Chameleon's VQ holds no decoder: its codes only
            result.outputs.setdefault(name, []).append(mod.detokenize(codes[None])[0])
        if mod.end_token_id is not None:
            st.feed_ids([mod.end_token_id])
            result.tokens.append(mod.end_token_id)

    # a prompt that ends with an item's begin token (Janus's <begin_of_image> after the chat template) has begun
    # that item: its codes come next, and the begin token is not fed a second time
    last = int(input_ids[0, -1]) if input_ids.shape[1] else None
    if output_modality is not None:  # an item at once
        mod = outputs[output_modality]
        if mod.is_discrete:
            if mod.begin_token_id is not None and last != mod.begin_token_id:
                st.feed_ids([mod.begin_token_id])
                result.tokens.append(mod.begin_token_id)
            item(output_modality, mod)
        else:
            _continuous_item(st, output_modality, mod, result)
    elif last in begins:
        item(*begins[last])
    # the tokens an output item takes (its begin token, codes or generation tokens, end token): one is started
    # only while it fits in what is left of max_new_tokens, so the limit holds
    item_sizes = {**{t: m.num_generation_tokens + 1 + (m.end_token_id is not None) for t, (_, m) in begins.items()},
                  **{t: m.num_generation_tokens for t, (_, m) in continuous.items()}}
    while len(result.tokens) < max_new_tokens:
        logits = next_token_logits(lm, st.hidden)
        if code_ids is not None:
            logits = logits.index_fill(-1, code_ids, float("-inf"))
        room = max_new_tokens - len(result.tokens)
        too_big = [t for t, size in item_sizes.items() if size > room]
        if too_big:
            logits = logits.index_fill(-1, torch.tensor(too_big, device=logits.device), float("-inf"))
        # the token and whether the logits held NaN (greedy would pick one of them), in one read-back
        token, nan = torch.stack([pick(logits)[0].long(), torch.isnan(logits).any().long()]).tolist()
        if nan:
            raise _nan_logits()
        if token in continuous:
            _continuous_item(st, *continuous[token], result)
        else:
            st.feed_ids([token])
            result.tokens.append(token)
            if token in begins:
                item(*begins[token])
        if token in stop_ids:
            break
    return result


def _continuous_item(st: "_Decoding", name: str, mod, result: Generation) -> None:
    """A decoder's item: all its generation tokens fed at once, their hidden states decoded."""
    n = mod.num_generation_tokens
    st.feed_ids([mod.generation_token_id] * n)
    result.tokens.extend([mod.generation_token_id] * n)
    states = st.hidden[:, -n:]  # (1, n_gen, H): the item's generation tokens
    result.outputs.setdefault(name, []).append(mod.decode(states)[0])


class _Decoding:
    """One prompt's decoding state: the KV cache (or, without one, the whole sequence, recomputed each step),
    the ids so far (for guidance's unconditional row) and the last hidden states."""

    def __init__(self, model, lm, embeds, positions, rope_deltas, additions, use_cache, max_len, input_ids):
        self.lm, self.positions, self.rope_deltas, self.max_len = lm, positions, rope_deltas, max_len
        self.ids = input_ids.clone()
        self.device = input_ids.device
        self.cache = lm.new_kv_cache(1, max_len) if use_cache else None
        self.deep = {"layer_additions": additions} if additions else {}
        self.embeds = embeds
        self.hidden = lm(embeds, kv_cache=self.cache, position_ids=positions, **self.deep)

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def _new_positions(self, n: int):
        if self.positions is None:
            return None
        from mimo_spec.models.mrope import mrope_next_positions  # M-RoPE: text counts on from the prompt's largest

        return mrope_next_positions(self.rope_deltas, n, past_length=self.length)

    def feed(self, new_embeds: torch.Tensor, ids: list[int]) -> None:
        """Run the LM on ``new_embeds`` (1, n, H) standing at ``ids`` (the ids' own, or a code's placeholder)."""
        new_positions = self._new_positions(new_embeds.shape[1])
        if self.cache is not None:
            self.hidden = self.lm(new_embeds, kv_cache=self.cache, position_ids=new_positions)
        else:
            self.embeds = torch.cat([self.embeds, new_embeds], dim=1)
            if self.positions is not None:
                self.positions = torch.cat([self.positions, new_positions[None].expand(3, -1, -1)], dim=2)
            if self.deep:
                self.deep = {"layer_additions": {i: torch.cat([a, torch.zeros_like(new_embeds)], dim=1)
                                                 for i, a in self.deep["layer_additions"].items()}}
            self.hidden = self.lm(self.embeds, position_ids=self.positions, **self.deep)
        self.ids = torch.cat([self.ids, torch.tensor([ids], dtype=torch.long, device=self.device)], dim=1)

    def feed_ids(self, ids: list[int]) -> None:
        self.feed(self.lm.embed_tokens(torch.tensor([ids], dtype=torch.long, device=self.device)), ids)

    def codes(self, mod, pick, guidance_scale: float, pad_id: int | None, bos_id: int | None = None):
        """One discrete item's codes, picked one by one (with guidance: beside the unconditional row, both in
        one batch of 2). Returns (codes (positions,), the logits they were picked from (positions, num_codes)); with
        the delay pattern (positions, K) codes (``codebook_size`` at the pads) and (positions, K, codebook_size)
        logits."""
        n = mod.num_generation_tokens
        lm = self.lm
        guided = guidance_scale != 1
        codes, scores = [], []
        if guided:  # the unconditional row of the sequence so far, then both rows in one batch
            u_embeds = lm.embed_tokens(unconditional_ids(self.ids, mod.begin_token_id, pad_id, bos_id))
            if self.cache is not None:
                ucache = lm.new_kv_cache(1, self.max_len)
                u_hidden = lm(u_embeds, kv_cache=ucache)
                pair = lm.new_kv_cache(2, self.max_len)
                pair.k, pair.v = torch.cat([self.cache.k, ucache.k], 1), torch.cat([self.cache.v, ucache.v], 1)
                pair.key_mask = torch.cat([self.cache.key_mask, ucache.key_mask], 0)
                pair.length = self.cache.length
                del ucache
            else:
                rows = torch.cat([self.embeds, u_embeds], 0)
                u_hidden = lm(u_embeds)
            hidden = torch.cat([self.hidden[:, -1:], u_hidden[:, -1:]], 0)
        else:
            hidden = self.hidden[:, -1:]
        delayed = getattr(mod, "delayed", False)
        if delayed:  # the delay pattern: K codes per position, each from its own codebook, pads outside the item
            from mimo_spec.models.modality import delay_mask

            valid = delay_mask(n - mod.num_codebooks + 1, mod.num_codebooks, device=self.device)  # (n, K)
            pad_code = int(mod.tokenizer.codebook_size)
        for t in range(n):
            logits = mod.code_logits(hidden[:, -1]).float()  # (rows, num_codes); delay: (rows, K, codebook_size)
            if guided:
                logits = logits[1:] + guidance_scale * (logits[:1] - logits[1:])
            if delayed:  # codebook k's code where its frame t - k exists (each codebook sampled on its own)
                code = torch.full((mod.num_codebooks,), pad_code, dtype=torch.long, device=self.device)
                code[valid[t]] = pick(logits[0][valid[t]])
                codes.append(code[None])
                scores.append(logits[0])
                e = mod.embed_codes(code.view(1, 1, -1), start=t).to(self.hidden.dtype)  # (1, 1, H)
            else:
                code, e = self._flat_code(mod, logits, t, pick, codes, scores)
            if not guided:
                self.feed(e, [mod.generation_token_id])
                hidden = self.hidden[:, -1:]
                continue
            if self.cache is not None:
                hidden = lm(e.expand(2, -1, -1), kv_cache=pair)
            else:
                rows = torch.cat([rows, e.expand(2, -1, -1)], 1)
                hidden = lm(rows)
        if guided:  # the conditional row goes on alone
            if self.cache is not None:
                self.cache.k, self.cache.v = pair.k[:, :1], pair.v[:, :1]
                self.cache.key_mask, self.cache.length = pair.key_mask[:1], pair.length
            else:
                self.embeds = rows[:1]
            self.ids = torch.cat([self.ids, torch.full((1, n), mod.generation_token_id, device=self.device)], 1)
            self.hidden = hidden[:1]
        scores = torch.stack(scores)
        if bool(torch.isnan(scores).any()):  # once per item: the codes stay on the device while they are picked
            raise _nan_logits()
        return torch.cat(codes), scores

    def _flat_code(self, mod, logits, t, pick, codes, scores):
        """One position's code of a flat layout (several codebooks: the position's own codebook) and its
        embedding (1, 1, H)."""
        lo, hi = mod.code_range(t)  # several codebooks: this position's own
        if hi - lo < logits.shape[-1]:
            logits = torch.full_like(logits, float("-inf")).index_copy(
                -1, torch.arange(lo, hi, device=logits.device), logits[..., lo:hi])
        code = pick(logits)  # (1,)
        codes.append(code)
        scores.append(logits[0])
        return code, mod.embed_codes(code.view(1, 1), start=t).to(self.hidden.dtype)


def start_parallel_generation(model, parallel):
    """Shard a loaded ``model`` over the launcher's processes by the layout ``parallel``; returns the
    distributed run (None for one process): pass it to :func:`generate`. Rank 0 (or the only
    process) writes the outputs.

    Weights are loaded before this: sharding splits (and, for TP's fused projections, reorders)
    whatever the full model holds, so any checkpoint, single-process or distributed, works.
    """
    from omegaconf import DictConfig, OmegaConf

    from mimo_spec.parallel.parallelize import start_parallel

    plain = OmegaConf.to_container(parallel, resolve=True) if isinstance(parallel, DictConfig) else dict(parallel or {})
    return start_parallel(generation_layout(plain, model), None, model)


def generation_layout(parallel: dict, model) -> dict:
    """The layout generation runs under: ``parallel`` itself, or, for pipeline stages and split layouts
    (no rank holds the whole model, and decoding is token by token), the whole model replicated on
    every rank. Layout problems are raised here, before any process group starts."""
    import sys

    from mimo_spec.parallel.layout import resolve, world_size_from_env

    world = world_size_from_env()
    if not world or world == 1:
        return parallel
    layout = resolve(parallel, model, world)
    if layout.colocated and all(m.pp == 1 and m.sp == 1 for m in layout.modules.values()):  # sp: no KV cache
        return parallel
    from mimo_spec.parallel.env import read_env

    launched = read_env()
    if launched is None or launched.rank == 0:
        print(f"note: layout {layout.name} splits the model over ranks; generating with the whole model "
              "on every rank (as ddp)", file=sys.stderr)
    return {"name": f"{layout.name} (replicated for generation)", "default": {"dp_replicate": -1}}


def save_audio(samples: torch.Tensor, sampling_rate: int, path) -> None:
    """(samples,) floats in [-1, 1] -> a 16-bit mono WAV file."""
    import wave

    pcm = (samples.detach().float().clamp(-1, 1) * 32767).round().to(torch.int16).cpu().numpy()
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sampling_rate))
        f.writeframes(pcm.tobytes())


def save_image(tensor: torch.Tensor, path) -> None:
    """(C, H, W) floats (about [0, 1]) -> PNG."""
    from PIL import Image

    arr = (tensor.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.permute(1, 2, 0).cpu().numpy()
    if arr.shape[-1] == 1:
        arr = arr[..., 0]
    Image.fromarray(arr).save(path)
