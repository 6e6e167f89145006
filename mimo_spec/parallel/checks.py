"""Model-dependent layout checks (no process group): TP divisibility, pipeline stages, split layouts,
backends that cannot shard, and the batch split over data-parallel ranks. Layouts are
:class:`mimo_spec.parallel.layout.Layout` objects (this module is imported by that one)."""

from __future__ import annotations

from mimo_spec.errors import ProblemCollector
from mimo_spec.parallel.names import DEGREES, LANGUAGE


def _constructor_params(cls: type) -> dict:
    from mimo_spec.builders.binding import signature_of

    return signature_of(cls)[0]


def check_model(layout, model, problems: ProblemCollector) -> None:
    """Model-dependent checks: sizes that TP shards divide by tp, layers cover PP stages, backends that cannot shard.

    ``model`` may live on the meta device: only attributes and TP declarations are read.
    """
    from mimo_spec.parallel.plans import tp_divisibility

    for name, m in layout.modules.items():
        module = model.language_model if name == LANGUAGE else model.modalities[name]
        if m.tp > 1 and any(getattr(sub, "backend", None) == "te" for sub in module.modules()):
            owner = "model" if name == LANGUAGE else f"modalities.{name}"
            problems.add(m.at("tp"), f"{owner} uses transformer-engine layers (backend te), which mimo-spec does not "
                         "shard with DTensor tensor parallelism", "use tp: 1 (ddp/fsdp layouts), or backend: local")
        all_heads = next((n for n, sub in module.named_modules() if getattr(sub, "qk_norm_all_heads", False)), None)
        if m.tp > 1 and m.tp_plan != "none" and all_heads is not None:
            if name == LANGUAGE:
                what = "model.params.qk_norm_kind 'rmsnorm_all_heads' (OLMoE)"
            else:  # a vision tower's q/k norm over the full width (InternViT-6B's, clip_vit qk_norm with rmsnorm)
                what = f"modalities.{name}'s {all_heads} (a q/k norm over all heads' width, qk_norm)"
            problems.add(m.at("tp"), f"{what} normalises all heads' queries and keys together, which a "
                         "tensor-parallel share of the heads cannot compute",
                         "use tp: 1 (ddp, fsdp or ep layouts) for this module")
        if m.tp > 1 and m.tp_plan != "none":
            for where, attr, value in tp_divisibility(module):
                if value % m.tp:
                    owner = "language_model" if name == LANGUAGE else f"modalities.{name}"
                    hint = f"choose a tp that divides {value}"
                    if name == LANGUAGE and attr in _constructor_params(type(module)):
                        hint += f", or change model.params.{attr}"
                    problems.add(m.at("tp"), f"{owner}.{where}.{attr} = {value} does not divide by tp={m.tp}", hint)
        if m.ep > 1:
            _check_expert_parallel(name, m, module, problems)
        if m.sp > 1:
            _check_sequence_parallel(name, m, layout, module, model, problems)
        lm_layout = layout.modules[LANGUAGE]
        if name != LANGUAGE and (m.pp > 1 or lm_layout.pp > 1):
            _check_pipelined_modality(name, m, lm_layout, module, problems)
        if name == LANGUAGE and m.pp > 1 and getattr(module, "moe_layer_ids", ()):
            # the pipeline schedule's loss has no router terms
            problems.add(m.at("pp"), f"the language model has {len(module.moe_layer_ids)} mixture-of-experts layers "
                         "(model.params.num_experts), which pipeline parallelism does not shard yet",
                         "use ddp, fsdp or tp for the language module, with ep: N to split its experts over N "
                         "data-parallel ranks (parallel=ep2, parallel=fsdp_ep2)")
        if m.pp > 1 and name == LANGUAGE:
            layers = len(getattr(module, "layers", []))
            if layers == 0:
                problems.add(m.at("pp"), "pipeline stages split a language model's layers; this one has none")
            elif m.pp > layers:
                plural = "s" if layers != 1 else ""
                problems.add(m.at("pp"), f"{m.pp} pipeline stages but the language model has {layers} layer{plural}",
                             f"use pp <= {layers}, or raise model.params.num_layers")
            if m.microbatches < m.pp:
                problems.add(m.at("microbatches"), f"{m.microbatches} microbatches cannot fill {m.pp} stages",
                             f"use microbatches >= {m.pp}")
            if getattr(module, "tie_embeddings", False):
                problems.add(m.at("pp"), "tied embeddings cannot be split over pipeline stages (the embedding "
                             "lives in the first stage, the LM head in the last)", "set model.params.tie_embeddings=false")
    if not layout.colocated:
        check_split(layout, model, problems)


def _check_expert_parallel(name: str, m, module, problems) -> None:
    """``ep`` needs MoE layers whose expert count it divides."""
    from mimo_spec.parallel.expert import moe_layers

    owner = "model" if name == LANGUAGE else f"modalities.{name}"
    moes = moe_layers(module)
    if not moes:
        problems.add(m.at("ep"), f"ep={m.ep} but {owner} has no mixture-of-experts layers ({owner}.params.num_experts "
                     "is not set)", "expert parallelism splits MoE experts over ranks; use ep: 1 for this module")
        return
    for experts in sorted({moe.num_experts for moe in moes}):
        if experts % m.ep:
            problems.add(m.at("ep"), f"ep={m.ep} does not divide the {experts} experts of each MoE layer "
                         f"({owner}.params.num_experts)", f"choose an ep that divides {experts}")


def _check_sequence_parallel(name: str, m, layout, module, model, problems) -> None:
    """``sp`` splits the language model's sequences: its attention heads (and kv heads) must divide by it, and
    what would need the whole sequence on one rank (an MoE router's batch losses, an output modality's
    decoder, encoders on other ranks or with another data-parallel layout) is refused."""
    if name != LANGUAGE:
        problems.add(m.at("sp"), f"sp={m.sp} on modality {name!r}: sequence parallelism splits the language model's "
                     "sequence (encoders run whole items on every rank of an SP group)",
                     f"set sp on parallel.modules.{LANGUAGE} only")
        return
    from mimo_spec.parallel.sequence import sp_unsupported

    why = sp_unsupported(module)
    if why is not None:
        problems.add(m.at("sp"), f"sp={m.sp}: the language model cannot run sequence parallel ({why})",
                     "sequence parallelism runs the built-in gpt language model; use sp: 1")
        return
    for attr in ("num_heads", "num_kv_heads"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value % m.sp:
            problems.add(m.at("sp"), f"sp={m.sp} does not divide the language model's {value} "
                         f"{'attention heads' if attr == 'num_heads' else 'key/value heads'} (model.params.{attr})",
                         "Ulysses sequence parallelism gives every rank of an SP group heads/sp of every attention "
                         f"layer; choose an sp that divides {value}")
    if getattr(module, "moe_layer_ids", ()):
        problems.add(m.at("sp"), f"sp={m.sp}: the language model has mixture-of-experts layers "
                     "(model.params.num_experts), whose router losses sequence parallelism does not gather yet",
                     "use sp: 1 with an MoE language model (ep: N splits its experts)")
    if not layout.colocated:
        problems.add(m.at("sp"), f"sp={m.sp} in a split layout (encoders on their own ranks) is not supported",
                     "use a colocated layout (parallel=sp2 or fsdp_sp2)")
    for mod_name, mod_layout in layout.modules.items():
        if mod_name == LANGUAGE:
            continue
        if getattr(model.modalities[mod_name], "has_output", False):
            problems.add(m.at("sp"), f"sp={m.sp}: output modality {mod_name!r} decodes from the language model's "
                         "hidden states, which sequence parallelism leaves split over ranks",
                         "use sp: 1 for a model with output modalities")
        if (mod_layout.dp_replicate, mod_layout.dp_shard) != (m.dp_replicate, m.dp_shard) and layout.colocated:
            problems.add(mod_layout.path, f"under sp={m.sp} ({m.at('sp')}) modality {mod_name!r} needs the language "
                         f"model's data-parallel layout (dp_replicate={m.dp_replicate}, dp_shard={m.dp_shard})",
                         "put dp_replicate / dp_shard in parallel.default")


def _check_pipelined_modality(name: str, m, lm, module, problems) -> None:
    """A modality next to a pipelined language model runs inside its first stage."""
    if lm.pp == 1:
        problems.add(m.at("pp"), "pipeline stages split a language model's layers",
                     "use pp only on the language module (split modalities with ranks: instead)")
        return
    if (m.offset, m.size) != (lm.offset, lm.size) or m.shape != lm.shape:
        want = ", ".join(f"{d}={getattr(lm, d)}" for d in DEGREES)
        problems.add(m.path, f"a modality next to a pipelined language model runs in its first stage, so it "
                     f"needs the language model's ranks and degrees ({want})",
                     "put pp / dp_* / tp in parallel.default, or give this modality the same values")
    if getattr(module, "has_output", False):
        problems.add(m.path, "an output modality cannot run under pipeline parallelism (its decoder needs "
                     "the last stage's hidden states)", "use pp: 1 for this model")


def check_batch(layout, batch_size: int, grad_accum: int, problems: ProblemCollector) -> None:
    """The global batch (``train.batch_size`` samples) splits evenly over every module's data-parallel ranks."""
    sp = layout.modules[LANGUAGE].sp  # the ranks of an SP group see the same samples (and encode the same items)
    for name, m in layout.modules.items():
        shares = m.dp // sp if m.dp % sp == 0 else m.dp
        if batch_size % shares:
            where = f"{name}'s {shares} data-parallel shares ({m.dp} ranks, sp={sp})" if shares != m.dp \
                else f"{name}'s {m.dp} data-parallel ranks"
            problems.add("train.batch_size", f"{batch_size} samples do not split over {where}",
                         f"use a multiple of {shares}")
        elif m.pp > 1 and (batch_size // m.dp) % m.microbatches:
            problems.add(m.at("microbatches"), f"the per-rank batch of {batch_size // m.dp} "
                         f"does not split into {m.microbatches} microbatches",
                         f"make train.batch_size a multiple of {m.dp * m.microbatches}")


def check_train(layout, train: dict, problems: ProblemCollector) -> None:
    """Training settings a layout cannot run: DPO's sequence log-probabilities need whole sequences on a rank,
    which sequence parallelism splits."""
    lm = layout.modules[LANGUAGE]
    if lm.sp > 1 and train.get("objective", "sft") == "dpo":
        problems.add(lm.at("sp"), f"sp={lm.sp} with train.objective dpo: preference training scores whole "
                     "sequences, which sequence parallelism splits over ranks", "use sp: 1 for DPO")


def check_split(layout, model, problems) -> None:
    """What a split layout must satisfy to run (``model`` None: the layout-only part)."""
    lm = layout.modules[LANGUAGE]
    if lm.pp > 1:
        problems.add(lm.at("pp"), "a split layout already pipelines the encoders into the language model; "
                     "pp > 1 on top of it is not supported", "use pp: 1, or a colocated layout such as parallel=pp2")
    for name, m in layout.modules.items():
        if name == LANGUAGE:
            continue
        if (m.offset, m.size) == (lm.offset, lm.size):  # partial overlaps are reported with the spans
            problems.add(m.path, f"in a split layout every modality sits apart from the language model, but "
                         f"{name} shares its ranks", "give it a span of its own (ranks: {offset: .., size: ..})")
        for key in ("pp", "tp"):
            if getattr(m, key) > 1:
                problems.add(m.at(key), f"a modality on its own ranks is data parallel only ({key} must be 1)",
                             "use dp_replicate / dp_shard for the encoder ranks")
        if model is not None and getattr(model.modalities[name], "has_output", False):
            problems.add(m.path, "an output modality must sit with the language model (its decoder reads the "
                         "language model's hidden states)", "use a colocated layout for this model")
