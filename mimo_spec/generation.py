"""Generation: greedy or top-k/top-p sampling with a KV cache; output modalities are decoded too.

Under torchrun/SLURM every rank runs the same generation on its shard of the model
(:func:`start_parallel_generation`): tensor-parallel logits are gathered for the choice of the
next token, and rank 0's choice is broadcast so that no rank can drift from the others.
Pipeline and split layouts hold no whole model on a rank, so generation replicates it there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import torch

from mimo_spec.errors import InputError

STRATEGIES = ("greedy", "sample")


@dataclass
class Generation:
    """What ``generate`` produced: new token ids and decoded output-modality items."""

    tokens: list[int]
    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)


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
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


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


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, modality_inputs: dict | None = None, *, max_new_tokens: int = 32,
             strategy: str = "greedy", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | list[int] | tuple[int, ...] | None = None, use_cache: bool = True,
             seed: int = 0) -> Generation:
    """Continue one prompt (input_ids (1, S)) by up to ``max_new_tokens`` tokens.

    When the LM emits an output modality's generation token, the rest of that
    item's generation tokens are fed in, and the LM hidden states at all of them
    are decoded into the item (e.g. an image). ``use_cache=False`` recomputes the
    whole sequence every step (the reference the cache must match). ``eos_id``: the token id (or ids:
    eos and a chat template's end-of-turn token) that ends the generation.
    """
    from mimo_spec.models.mimo import MimoModel

    if not isinstance(model, MimoModel):
        raise InputError(f"expected a MimoModel (from build_model), got {type(model).__name__}", path="model")
    if any(p.is_meta for p in model.parameters()):
        raise InputError("the model is on the meta device: it has no weights to generate with", path="model",
                         hint="build it on a real device (build_model(cfg, device='cpu')) or load a checkpoint")
    check_sampling(strategy, temperature, top_k, top_p, max_new_tokens)
    check_seed(seed)
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
    outputs_by_token = {m.generation_token_id: (name, m) for name, m in model.modalities.items() if m.has_output}
    extra = sum(m.num_generation_tokens for _, m in outputs_by_token.values())
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
    cache = lm.new_kv_cache(1, max_len) if use_cache else None
    deep = {"layer_additions": additions} if additions else {}
    hidden = lm(embeds, kv_cache=cache, position_ids=positions, **deep)
    result = Generation(tokens=[])
    while len(result.tokens) < max_new_tokens:
        next_id = _agree(pick_next(next_token_logits(lm, hidden), strategy, temperature, top_k, top_p, gen))
        token = int(next_id[0])
        if token in outputs_by_token:
            name, mod = outputs_by_token[token]
            chunk = torch.full((1, mod.num_generation_tokens), token, dtype=torch.long, device=input_ids.device)
            result.tokens.extend(chunk[0].tolist())
        else:
            chunk = next_id.view(1, 1)
            result.tokens.append(token)
        new_embeds = lm.embed_tokens(chunk)
        new_positions = None
        if positions is not None:  # M-RoPE: text after the prompt counts on from its largest position
            from mimo_spec.models.mrope import mrope_next_positions

            past = embeds.shape[1] if cache is None else cache.length
            new_positions = mrope_next_positions(rope_deltas, chunk.shape[1], past_length=past)
        if cache is not None:
            hidden = lm(new_embeds, kv_cache=cache, position_ids=new_positions)
        else:
            embeds = torch.cat([embeds, new_embeds], dim=1)
            if positions is not None:
                positions = torch.cat([positions, new_positions[None].expand(3, -1, -1)], dim=2)
            if deep:
                additions = {i: torch.cat([a, torch.zeros_like(new_embeds)], dim=1) for i, a in additions.items()}
                deep = {"layer_additions": additions}
            hidden = lm(embeds, position_ids=positions, **deep)
        if token in outputs_by_token:
            states = hidden[:, -chunk.shape[1]:]  # (1, n_gen, H): the item's generation tokens
            result.outputs.setdefault(name, []).append(mod.decode(states)[0])
        if token in stop_ids:
            break
    return result


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
    if layout.colocated and all(m.pp == 1 for m in layout.modules.values()):
        return parallel
    from mimo_spec.parallel.env import read_env

    launched = read_env()
    if launched is None or launched.rank == 0:
        print(f"note: layout {layout.name} splits the model over ranks; generating with the whole model "
              "on every rank (as ddp)", file=sys.stderr)
    return {"name": f"{layout.name} (replicated for generation)", "default": {"dp_replicate": -1}}


def save_image(tensor: torch.Tensor, path) -> None:
    """(C, H, W) floats (about [0, 1]) -> PNG."""
    from PIL import Image

    arr = (tensor.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.permute(1, 2, 0).cpu().numpy()
    if arr.shape[-1] == 1:
        arr = arr[..., 0]
    Image.fromarray(arr).save(path)
