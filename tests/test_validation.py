"""Bad configs: every problem named by its full config path, with a hint, all at once."""

import copy

import pytest

from mimo_spec import build_model
from mimo_spec.builders import validate_spec
from mimo_spec.config import compose_config
from mimo_spec.errors import ConfigError

from conftest import tiny_config

ENC = "modalities.images.submodules.encoders.clip"
PROJ = "modalities.images.submodules.input_projections.clip"


def problems_of(cfg):
    with pytest.raises(ConfigError) as e:
        build_model(cfg, device="meta")
    return {p.path: p for p in e.value.problems}, str(e.value)


def with_(cfg, path, value):
    cfg = copy.deepcopy(cfg)
    *parents, last = path.split(".")
    node = cfg
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return cfg


def test_unknown_parameter_suggests_the_right_one():
    probs, text = problems_of(with_(tiny_config(), "modalities.images.submodules.encoders.clip.params.hiden_size", 16))
    p = probs[f"{ENC}.params.hiden_size"]
    assert p.message == "unknown parameter of clip_vit" and p.hint == "did you mean hidden_size?"
    assert f"{ENC}.params.hiden_size: unknown parameter of clip_vit (did you mean hidden_size?)" in text


def test_wrong_types_and_missing_required():
    cfg = with_(tiny_config(), "model.params.num_layers", "four")
    cfg = with_(cfg, f"{ENC}.params.patch_size", KeyError)
    cfg = with_(cfg, "model.params.norm", "batchnorm")
    probs, _ = problems_of(cfg)
    assert "expected int, got str 'four'" in probs["model.params.num_layers"].message
    assert "missing required parameter of clip_vit (expected int)" in probs[f"{ENC}.params.patch_size"].message
    assert "one of 'layernorm', 'rmsnorm'" in probs["model.params.norm"].message
    assert all(p.hint for p in probs.values())


def test_unknown_registry_name_and_unknown_node_keys():
    cfg = with_(tiny_config(), f"{ENC}.module", "clip_vt")
    cfg = with_(cfg, "modalities.images.submodule", {})
    probs, _ = problems_of(cfg)
    assert probs[f"{ENC}.module"].message == "unknown encoder 'clip_vt'"
    assert probs[f"{ENC}.module"].hint == "did you mean clip_vit?"
    assert probs["modalities.images.submodule"].hint == "did you mean submodules?"


def test_size_mismatches_name_both_sizes():
    cfg = with_(tiny_config(), f"{PROJ}.params.in_features", 24)
    cfg = with_(cfg, f"{PROJ}.params.out_features", 48)
    probs, _ = problems_of(cfg)
    assert probs[f"{PROJ}.params.in_features"].message == \
        "size mismatch: expected 16 (encoder clip's output size), got 24"
    assert probs[f"{PROJ}.params.out_features"].message == \
        "size mismatch: expected 32 (the language model's hidden_size), got 48"


def test_special_tokens_distinct_in_range_and_present():
    cfg = tiny_config()
    audio = {"module": "modality", "params": {"special_token_id": 250}, "submodules": {
        "encoders": {"w": {"module": "whisper_encoder", "params": {
            "num_mel_bins": 8, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "ffn_hidden_size": 32,
            "max_source_positions": 8}}},
        "input_projections": {"w": {"module": "linear", "params": {"in_features": 16, "out_features": 32}}}}}
    cfg["modalities"]["audio"] = audio
    probs, _ = problems_of(cfg)
    assert "already used by modalities.images.params.special_token_id" in \
        probs["modalities.audio.params.special_token_id"].message
    probs, _ = problems_of(with_(tiny_config(), "modalities.images.params.special_token_id", 300))
    assert probs["modalities.images.params.special_token_id"].message == \
        "token id 300 is outside the vocabulary [0, 256)"
    probs, _ = problems_of(with_(tiny_config(), "modalities.images.params.special_token_id", KeyError))
    assert "every input modality needs a special" in probs["modalities.images.params.special_token_id"].message


def test_dotted_path_not_allowed_then_allowed():
    cfg = with_(tiny_config(), f"{PROJ}.module", "torch.nn.Identity")
    cfg[PROJ.split(".")[0]]["images"]["submodules"]["input_projections"]["clip"]["params"] = {}
    probs, _ = problems_of(cfg)
    assert "not allowlisted" in probs[f"{PROJ}.module"].message
    assert "allow_imports" in probs[f"{PROJ}.module"].hint
    cfg["allow_imports"] = ["mimo_spec.components"]
    cfg["modalities"]["images"]["submodules"]["input_projections"]["clip"] = {
        "module": "mimo_spec.components.projectors.LinearProjector", "params": {"in_features": 16, "out_features": 32}}
    model = build_model(cfg, device="meta")
    assert type(model.modalities["images"].input_projections["clip"]).__name__ == "LinearProjector"


def test_all_problems_reported_together():
    cfg = with_(tiny_config(), "model.params.hiden_size", 1)
    cfg = with_(cfg, f"{ENC}.params.num_layers", "x")
    cfg = with_(cfg, f"{PROJ}.params.out_features", 31)
    cfg = with_(cfg, "modalities.images.params.special_token_id", 999)
    with pytest.raises(ConfigError) as e:
        build_model(cfg, device="meta")
    paths = [p.path for p in e.value.problems]
    assert "model.params.hiden_size" in paths and f"{ENC}.params.num_layers" in paths
    assert str(e.value).startswith(f"{len(paths)} problems in the config:")


def test_constructor_errors_name_the_parameter_or_the_node():
    probs, _ = problems_of(with_(tiny_config(), "model.params.num_heads", 3))
    assert probs["model.params.num_heads"].message == "num_heads (3) must be divisible by num_kv_heads (2)"
    probs, _ = problems_of(with_(tiny_config(), f"{ENC}.params.image_size", 4))  # not about one parameter
    assert probs[f"{ENC}.params.image_size"].message == "image_size (4) must be at least patch_size (8)"


def test_swapping_a_module_from_the_command_line_replaces_the_whole_node():
    # clip_vit's params must not leak into the new whisper_encoder node
    with pytest.raises(ConfigError) as e:
        build_model(compose_config([f"{ENC}.module=whisper_encoder"]), device="meta")
    paths = {p.path for p in e.value.problems}
    assert f"{ENC}.params.patch_size" not in paths  # would be "unknown parameter" if it had survived
    assert f"{ENC}.params.num_layers" in paths  # a required whisper param, now missing
    cfg = compose_config([f"{ENC}.module=whisper_encoder", f"++{ENC}.params.hidden_size=64",
                          f"++{ENC}.params.num_layers=1", f"++{ENC}.params.num_heads=4",
                          f"++{ENC}.params.ffn_hidden_size=64"])
    assert set(cfg.modalities.images.submodules.encoders.clip.params) == {
        "hidden_size", "num_layers", "num_heads", "ffn_hidden_size"}
    model = build_model(cfg, device="meta")
    assert type(model.modalities["images"].encoders["clip"]).__name__ == "WhisperEncoder"


def test_choosing_a_group_option_replaces_the_node():
    cfg = compose_config(["model=gpt2_small"])
    assert cfg.model.params.position_embedding == "learned"
    assert "num_kv_heads" not in cfg.model.params  # llama_tiny's key did not survive


def test_validate_spec_returns_the_spec_for_a_valid_config():
    spec = validate_spec(tiny_config())
    assert spec.modalities["images"].submodules["encoders"]["clip"].path == ENC


def test_te_backend_where_it_cannot_run_is_a_config_error_naming_the_node():
    cfg = with_(tiny_config(), "model.params.backend", "te")
    cfg = with_(cfg, f"{ENC}.params.backend", "auto")  # auto falls back to the local layers
    probs, _ = problems_of(cfg)
    assert set(probs) == {"model.params.backend"}
    message = probs["model.params.backend"].message
    assert "backend 'te'" in message and "use backend: local or auto" in message


def test_build_model_refuses_a_misspelt_model_key_and_reads_the_configs_dtype():
    """build_model(dict) reads the model keys of a whole run's config: a near-miss of one (``modalites``) would
    build a model without it, so it is refused naming the key it resembles; keys of the user's own (values
    their YAML interpolates) and the run's other sections pass. The config's top-level dtype is the weights'
    when build_model is given none (an explicit dtype= wins)."""
    import torch
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose_config([]), resolve=True)
    typo = dict(cfg)
    typo["modalites"] = typo.pop("modalities")
    with pytest.raises(ConfigError) as e:
        build_model(typo, device="meta")
    problem = e.value.problems[0]
    assert problem.path == "modalites" and problem.hint == "did you mean modalities?"
    # the user's own keys pass (short words, a model key with a suffix or plural, other words); typos do not
    assert build_model(dict(cfg, my_width=512, mode=1, model_id="x", models=[], trainer={}, extra_files=[]),
                       device="meta").modalities
    for typo, key in (("freze", "freeze"), ("trainabel", "trainable"), ("backnd", "backend"), ("dtpye", "dtype")):
        with pytest.raises(ConfigError) as e:
            build_model(dict(cfg, **{typo: cfg.get(key)}), device="meta")
        assert e.value.problems[0].path == typo and e.value.problems[0].hint == f"did you mean {key}?"

    model = build_model(compose_config(["dtype=bfloat16"]), device="meta")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model = build_model(compose_config(["dtype=bfloat16"]), device="meta", dtype="float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
