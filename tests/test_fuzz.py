"""Property-based fuzzing of the config schema: a config either builds (and runs a forward pass on
the batch the model makes for itself) or raises the framework's own ConfigError naming a node of the
fuzzed part of the tree; a crash in a component (TypeError, RuntimeError, ...) escapes and fails."""

import copy
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mimo_spec import build_model
from mimo_spec.config import compose_config
from mimo_spec.errors import ConfigError, InputError

from conftest import tiny_config

FUZZ = settings(max_examples=int(os.environ.get("MIMO_FUZZ_EXAMPLES", 60)), deadline=None,
                derandomize=os.environ.get("MIMO_FUZZ_RANDOM") is None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

small_ints = st.integers(min_value=-2, max_value=48)
values = st.one_of(small_ints, st.floats(allow_nan=True, allow_infinity=True, width=32), st.booleans(), st.none(),
                   st.sampled_from(["", "gpt", "clip_vit", "mlp", "x", "rope", "gelu", "rmsnorm", "???", "${nope}"]),
                   st.lists(small_ints, max_size=3))
LM_KEYS = ["vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "norm",
           "position_embedding", "mlp", "max_seq_len", "head_dim", "tie_embeddings", "dropout", "bogus"]
ENC_KEYS = ["image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "feature_layer",
            "feature_select", "class_token", "num_channels", "dynamic_image_size", "bogus"]
MODULES = st.sampled_from(["gpt", "clip_vit", "whisper_encoder", "mlp", "linear", "identity", "modality",
                           "pixel_shuffle_mlp", "patch_palette", "nope", "os.system", ""])


def _node_exists(cfg, path: str) -> bool:
    """Whether the config node a problem path names is in ``cfg`` (a missing key under it may be named)."""
    if not isinstance(cfg, dict):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg)
    keys = path.split(".")
    for cut in ("params", "module", "submodules"):  # <node>.params.<name>: the node must exist
        if cut in keys:
            keys = keys[:keys.index(cut)]
            break
    node = cfg
    for key in keys:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, str) and key == "0":  # a lone pattern read as a one-item list
            return True
        else:
            return False
    return True


def _build_and_run(cfg, fuzzed: tuple[str, ...]) -> None:
    """Build, make a tiny batch and run it. Nothing but the framework's own ConfigError may stop that,
    and only while building, each problem naming a config node inside the part of the tree that was
    fuzzed: a TypeError, RuntimeError or IndexError from a component is a bug and fails the test. A
    built model must take the batch it makes for itself; the one refusal allowed is one item per
    modality not fitting max_seq_len."""
    try:
        model = build_model(cfg, seed=0)
    except ConfigError as e:
        assert type(e) is ConfigError, f"building raised a {type(e).__name__}: {e}"
        assert e.problems
        for p in e.problems:
            assert p.path and p.message, p
            assert any(p.path == f or p.path.startswith(f + ".") for f in fuzzed), \
                f"problem outside the fuzzed tree {fuzzed}: {p}"
            assert _node_exists(cfg, p.path), f"problem names a node that is not in the config: {p}"
        return
    try:
        batch = model.example_inputs(1)
    except InputError as e:
        assert [p.path for p in e.problems] == ["model.params.max_seq_len"], e
        return
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert out.loss is not None


@FUZZ
@given(lm=st.dictionaries(st.sampled_from(LM_KEYS), values, max_size=4),
       enc=st.dictionaries(st.sampled_from(ENC_KEYS), values, max_size=3),
       token=st.one_of(small_ints, st.integers(240, 300), values),
       module=st.one_of(st.none(), MODULES))
def test_random_param_trees_build_or_raise_config_error(lm, enc, token, module):
    cfg = tiny_config()
    cfg["model"]["params"].update(lm)
    images = cfg["modalities"]["images"]
    images["submodules"]["encoders"]["clip"]["params"].update(enc)
    images["params"]["special_token_id"] = token
    if module is not None:
        images["submodules"]["input_projections"]["clip"]["module"] = module
    _build_and_run(cfg, ("model", "modalities.images"))


node = st.recursive(
    st.fixed_dictionaries({"module": MODULES}, optional={"params": st.dictionaries(st.text(max_size=8), values,
                                                                                      max_size=3)}),
    lambda children: st.fixed_dictionaries(
        {"module": MODULES}, optional={"submodules": st.dictionaries(
            st.sampled_from(["encoders", "input_projections", "decoder", "junk"]),
            st.one_of(children, st.dictionaries(st.sampled_from(["a", "b"]), children, max_size=2)), max_size=2)}),
    max_leaves=6)


@FUZZ
@given(modality=node, extra=st.dictionaries(st.sampled_from(["freeze", "allow_imports", "parallel", "modalities"]),
                                            st.one_of(values, st.lists(st.text(max_size=6), max_size=2)), max_size=2))
def test_random_modality_trees_build_or_raise_config_error(modality, extra):
    cfg = tiny_config()
    cfg["modalities"]["fuzz"] = modality
    for k, v in extra.items():
        if k != "modalities":
            cfg[k] = v
    _build_and_run(cfg, ("modalities.fuzz",) + tuple(k for k in extra if k != "modalities"))


OVERRIDE_KEYS = ["model.params.hidden_size", "model.params.num_heads", "model.params.num_layers", "model.params.norm",
                 "model.module", "modalities.images.params.special_token_id", "modalities.images.params.combine",
                 "modalities.images.submodules.encoders.clip.params.patch_size",
                 "modalities.images.submodules.encoders.clip.module",
                 "modalities.images.submodules.input_projections.clip.params.out_features", "model", "modality",
                 "dtype", "freeze", "model.params.hidden_sise"]
override_value = st.one_of(small_ints, st.sampled_from(["llama_tiny", "qwen2_tiny", "[vision_clip]", "[]", "gpt",
                                                       "whisper_encoder", "concat", "rmsnorm", "bfloat16", "[",
                                                       "'x'", "null", "[modalities.*]", "{a: 1}"]))


@FUZZ
@given(overrides=st.lists(st.tuples(st.sampled_from(OVERRIDE_KEYS), override_value,
                                    st.sampled_from(["", "+", "++", "~"])), max_size=4))
def test_random_override_lists_compose_build_or_raise_config_error(overrides):
    args = [f"{prefix}{key}" if prefix == "~" else f"{prefix}{key}={value}" for key, value, prefix in overrides]
    try:
        cfg = compose_config(args)
    except ConfigError:
        return
    # keep the fuzzed models small enough to build for real
    from omegaconf import OmegaConf

    hidden = OmegaConf.select(cfg, "model.params.hidden_size")
    if isinstance(hidden, int) and hidden > 256:
        return
    _build_and_run(copy.deepcopy(cfg), ("model", "modalities", "dtype", "freeze"))
