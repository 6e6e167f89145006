"""Cross-checks between components: sizes, special tokens, modality structure.

They run on modules built on the meta device (cheap), so a component states its
sizes once, as attributes, instead of in a second description.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from mimo_spec.errors import ParamError, ProblemCollector
from mimo_spec.spec import MimoSpec


def cross_check(spec: MimoSpec, lm: nn.Module | None, modalities: dict[str, nn.Module],
                problems: ProblemCollector) -> None:
    """Add every inconsistency between the built components to ``problems``."""
    hidden, vocab = getattr(lm, "hidden_size", None), getattr(lm, "vocab_size", None)
    if lm is None:  # the LM could not be built: fall back to what its params say
        params = spec.language_model.params
        hidden = params.get("hidden_size") if isinstance(params.get("hidden_size"), int) else None
        vocab = params.get("vocab_size") if isinstance(params.get("vocab_size"), int) else None
    token_owner: dict[int, str] = {}
    for name, mod in modalities.items():
        node = spec.modalities[name]
        p = node.path
        subs = node.submodules
        enc_names = list(getattr(mod, "encoders", {}).keys())
        proj_names = list(getattr(mod, "input_projections", {}).keys())
        source = getattr(mod, "inputs_from", None)
        if source is not None:  # its items go through another modality's encoders and projectors
            other = modalities.get(source)
            if other is None or other is mod or getattr(other, "inputs_from", None) is not None \
                    or not getattr(other, "encoders", None):
                usable = [n for n, m in modalities.items() if n != name and getattr(m, "encoders", None)
                          and getattr(m, "inputs_from", None) is None]
                problems.add(f"{p}.params.inputs_from", f"{source!r} is not another modality with encoders of "
                             "its own", f"name one of: {', '.join(usable) or 'none (add one)'}")
            if mod.special_token_id is None:
                problems.add(f"{p}.params.special_token_id", "missing: every input modality needs a special "
                             "(placeholder) token id", f"set {p}.params.special_token_id to an unused token id")
        elif not enc_names and getattr(mod, "decoder", None) is None and getattr(mod, "tokenizer", None) is None:
            problems.add(f"{p}.submodules", "a modality needs encoders (input), inputs_from (another modality's "
                         "encoders), a decoder (output) or a tokenizer (discrete items)",
                         f"add {p}.submodules.encoders")
        elif getattr(mod, "tokenizer", None) is not None and mod.special_token_id is None \
                and mod.generation_token_id is None:
            problems.add(f"{p}.params.generation_token_id", "missing: a discrete modality needs generation_token_id "
                         "(items to generate) and/or special_token_id (input items)",
                         f"set {p}.params.generation_token_id")
        if enc_names:
            if mod.special_token_id is None:
                problems.add(f"{p}.params.special_token_id", "missing: every input modality needs a special "
                             "(placeholder) token id", f"set {p}.params.special_token_id to an unused token id")
            if mod.combine == "per_item":
                for e in enc_names:
                    if e not in proj_names:
                        problems.add(f"{p}.submodules.input_projections.{e}",
                                     "missing: with combine=per_item each encoder needs a projector of the same "
                                     "name", f"add input_projections.{e} (encoders: {', '.join(enc_names)})")
                for q in proj_names:
                    if q not in enc_names:
                        problems.add(f"{p}.submodules.input_projections.{q}",
                                     "no encoder of this name (combine=per_item pairs projectors with encoders)",
                                     f"encoders: {', '.join(enc_names)}")
            elif len(proj_names) != 1:
                problems.add(f"{p}.submodules.input_projections",
                             f"combine=concat needs exactly one projector, got {len(proj_names)}")
        if getattr(mod, "decoder", None) is not None and mod.generation_token_id is None:
            problems.add(f"{p}.params.generation_token_id", "missing: an output modality needs a generation "
                         "token id", f"set {p}.params.generation_token_id")
        for key in ("special_token_id", "generation_token_id", "begin_token_id", "end_token_id"):
            tok = getattr(mod, key, None)
            if tok is None:
                continue
            path = f"{p}.params.{key}"
            if vocab is not None and not 0 <= tok < vocab:
                problems.add(path, f"token id {tok} is outside the vocabulary [0, {vocab})",
                             "use an id below model.params.vocab_size, or grow the vocabulary")
            if tok in token_owner:
                problems.add(path, f"token id {tok} is already used by {token_owner[tok]}",
                             "every modality needs its own distinct token ids")
            else:
                token_owner[tok] = path
        _check_sizes(p, subs, mod, hidden, problems)


def _check_sizes(p: str, subs: dict, mod: nn.Module, hidden: int | None, problems: ProblemCollector) -> None:
    encoders = getattr(mod, "encoders", {})
    projections = getattr(mod, "input_projections", {})
    if not encoders:
        pass
    elif mod.combine == "concat" and len(projections) == 1:
        (qname, proj), = projections.items()
        want = sum(getattr(e, "out_features", 0) for e in encoders.values())
        _expect(problems, f"{p}.submodules.input_projections.{qname}.params.in_features",
                getattr(proj, "in_features", None), want,
                "sum of the encoders' output sizes (" + " + ".join(f"{n} {e.out_features}" for n, e in encoders.items()) + ")")
    else:
        for ename, enc in encoders.items():
            if ename in projections:
                _expect(problems, f"{p}.submodules.input_projections.{ename}.params.in_features",
                        getattr(projections[ename], "in_features", None), getattr(enc, "out_features", None),
                        f"encoder {ename}'s output size")
    _check_token_counts(p, mod, problems)
    for qname, proj in projections.items():
        path = f"{p}.submodules.input_projections.{qname}.params.out_features"
        _expect(problems, path, getattr(proj, "out_features", None), hidden, "the language model's hidden_size")
    out_proj, decoder = getattr(mod, "output_projection", None), getattr(mod, "decoder", None)
    width = hidden
    if out_proj is not None:
        _expect(problems, f"{p}.submodules.output_projection.params.in_features",
                getattr(out_proj, "in_features", None), hidden, "the language model's hidden_size")
        width = getattr(out_proj, "out_features", None) or hidden
    if decoder is not None:
        _expect(problems, f"{p}.submodules.decoder.params.in_features", getattr(decoder, "in_features", None),
                width, "the output projection's out_features" if out_proj is not None
                else "the language model's hidden_size")


def _check_token_counts(p: str, mod: nn.Module, problems: ProblemCollector) -> None:
    """Each projector must take the token count its encoder gives for a native-size item (e.g. a
    pixel-shuffle projector's scale_factor must divide the encoder's token grid)."""
    encoders, projections = getattr(mod, "encoders", {}), getattr(mod, "input_projections", {})
    pairs = ([(next(iter(encoders)), q) for q in projections] if mod.combine == "concat"
             else [(e, e) for e in encoders if e in projections])
    for ename, qname in pairs:
        enc, proj = encoders[ename], projections[qname]
        if not hasattr(enc, "example_inputs") or not hasattr(proj, "tokens_out"):
            continue
        if getattr(enc, "grid_inputs", None):  # items of any size: an example item's count, from its grid
            # drawn on the host, where its generator is: the model may be built under a GPU device context,
            # where a CPU generator cannot draw (seen on an H200: preset=qwen2_vl_tiny could not be built)
            with torch.device("cpu"):
                tokens = int(enc.item_tokens(enc.example_inputs(1, generator=torch.Generator()))[0])
        elif hasattr(enc, "tokens_per_item"):
            with torch.device("meta"), _random_as_empty():  # shapes only, nothing allocated
                shape = tuple(next(iter(enc.example_inputs(1).values())).shape)
            tokens = enc.tokens_per_item(shape)
        else:
            continue
        try:
            proj.tokens_out(tokens)
        except ParamError as e:
            problems.add(f"{p}.submodules.input_projections.{qname}.params.{e.param}", e.problems[0].message,
                         f"encoder {ename} gives {tokens} tokens per item")


_RANDOM_FACTORIES = ("randn", "rand")


@contextlib.contextmanager
def _random_as_empty():
    """``torch.randn`` / ``torch.rand`` as ``torch.empty`` of the same size, for a shape check on meta.

    On the meta device torch's random factories run through its reference kernels, which import
    the compiler stack (torch._dynamo: seconds of ``action=summary``'s start-up); an example
    input's shape is all the check reads, and an empty meta tensor has it.
    """
    saved = {name: getattr(torch, name) for name in _RANDOM_FACTORIES}

    def empty(*size, generator=None, **kwargs):
        return torch.empty(*size, **{k: v for k, v in kwargs.items() if k in ("dtype", "device")})

    for name in _RANDOM_FACTORIES:
        setattr(torch, name, empty)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)


def _expect(problems: ProblemCollector, path: str, got, want, what: str) -> None:
    if got is None or want is None or got == want:
        return
    problems.add(path, f"size mismatch: expected {want} ({what}), got {got}", f"set it to {want}")
