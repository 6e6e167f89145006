"""build_model from every input form, meta builds, seeds, YAML round trips, YAML-only modalities."""

import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from mimo_spec import build_model
from mimo_spec.builders import build_module
from mimo_spec.config import compose_config
from mimo_spec.spec import from_config

from conftest import tiny_config


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_build_from_dict_dictconfig_yaml_path_and_spec(tmp_path):
    cfg = tiny_config()
    path = tmp_path / "model.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    spec = from_config(cfg)
    models = [build_model(x, seed=3) for x in (cfg, OmegaConf.create(cfg), str(path), path, spec)]
    for m in models[1:]:
        assert _same_weights(models[0], m)
    assert models[0].modalities["images"].encoders["clip"].out_features == 16


def test_meta_device_allocates_nothing():
    model = build_model(compose_config(["model=vicuna_7b"]), device="meta")
    params = list(model.parameters())
    assert sum(p.numel() for p in params) > 6_700_000_000
    assert all(p.device.type == "meta" for p in params)
    assert all(b.device.type == "meta" for b in model.buffers())


def test_same_seed_same_weights_and_rng_untouched():
    state = torch.random.get_rng_state()
    a, b, c = build_model(tiny_config(), seed=1), build_model(tiny_config(), seed=1), build_model(tiny_config(), seed=2)
    assert torch.equal(state, torch.random.get_rng_state())
    assert _same_weights(a, b) and not _same_weights(a, c)


def test_dtype_is_applied():
    model = build_model(tiny_config(), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_spec_round_trips_through_yaml(tmp_path):
    spec = from_config(compose_config(["modality=[vision_clip,audio_whisper]"]))
    text = spec.to_yaml()
    again = from_config(OmegaConf.create(text))
    assert again == spec
    assert again.modalities["audio"].submodules["encoders"]["whisper"].path == \
        "modalities.audio.submodules.encoders.whisper"
    (tmp_path / "spec.yaml").write_text(text)
    assert _same_weights(build_model(spec, seed=0), build_model(tmp_path / "spec.yaml", seed=0))


def test_several_modalities_in_one_override_and_text_only():
    cfg = compose_config(["modality=[vision_clip,audio_whisper]"])
    assert set(cfg.modalities) == {"images", "audio"}
    model = build_model(cfg, seed=0)
    batch = model.example_inputs(2)
    assert set(batch["modality_inputs"]) == {"images", "audio"}
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)
    text_only = build_model(compose_config(["modality=[]"]), seed=0)
    assert len(text_only.modalities) == 0
    assert torch.isfinite(text_only(**text_only.example_inputs(2)).loss)


def test_a_new_modality_is_one_yaml_file(tmp_path):
    (tmp_path / "modality").mkdir()
    (tmp_path / "modality" / "depth_maps.yaml").write_text(textwrap.dedent("""\
        # @package modalities.depth
        module: modality
        params:
          special_token_id: 1010
        submodules:
          encoders:
            vit:
              module: clip_vit
              params: {image_size: 16, patch_size: 4, num_channels: 1, hidden_size: 32, num_layers: 1,
                       num_heads: 2, ffn_hidden_size: 64}
          input_projections:
            vit:
              module: linear
              params:
                in_features: 32
                out_features: ${model.params.hidden_size}
        """))
    cfg = compose_config([f"hydra.searchpath=[file://{tmp_path}]", "modality=[vision_clip,depth_maps]"])
    model = build_model(cfg, seed=0)
    assert set(model.modalities) == {"images", "depth"}
    batch = model.example_inputs(2)
    assert batch["modality_inputs"]["depth"]["vit"]["pixel_values"].shape == (2, 1, 16, 16)
    assert torch.isfinite(model(**batch).loss)


def test_build_module_builds_one_component():
    enc = build_module({"module": "clip_vit", "params": {"image_size": 16, "patch_size": 8, "hidden_size": 16,
                                                         "num_layers": 1, "num_heads": 2, "ffn_hidden_size": 32}})
    assert enc(torch.randn(3, 3, 16, 16)).shape == (3, 4, 16)


def test_freeze_globs_freeze_modules():
    cfg = tiny_config(freeze=["modalities.*.encoders.*"])
    model = build_model(cfg)
    enc = model.modalities["images"].encoders["clip"]
    assert not any(p.requires_grad for p in enc.parameters())
    assert all(p.requires_grad for p in model.language_model.parameters())
    from mimo_spec.errors import ConfigError
    with pytest.raises(ConfigError, match="freeze.0: 'modalities.*.encoderz' matches no module"):
        build_model(tiny_config(freeze=["modalities.*.encoderz"]))


def test_summary_collapses_only_runs_of_equal_blocks():
    """A layer list collapses into runs of blocks with the same component and counts: an MoE LM's dense first
    layer, a frozen layer and a layer with adapters each keep a row of their own (one row of 3 blocks showed the
    first block's counts for all); every row's counts are its blocks' own."""
    from mimo_spec.config import compose_config
    from mimo_spec.summary import summary_rows

    def layer_rows(*overrides):
        model = build_model(compose_config(["model.params.num_layers=3", *overrides]), device="meta")
        rows = summary_rows(model, depth=3)
        start = next(i for i, r in enumerate(rows) if r[0].strip() == "layers")
        blocks = model.language_model.layers
        counts = [(sum(p.numel() for p in b.parameters() if p.requires_grad),
                   sum(p.numel() for p in b.parameters() if not p.requires_grad)) for b in blocks]
        depth = len(rows[start][0]) - len(rows[start][0].lstrip()) + 2  # the rows right under "layers"
        below = []
        for r in rows[start + 1:]:
            if len(r[0]) - len(r[0].lstrip()) < depth:
                break
            if len(r[0]) - len(r[0].lstrip()) == depth:
                below.append((r[0].strip(), r[2], r[3]))
        return below, counts

    rows, counts = layer_rows()
    assert rows == [("[0..2]", *counts[0])]
    rows, counts = layer_rows("+model.params.num_experts=4", "+model.params.mlp_only_layers=[0]")
    assert rows == [("[0]", *counts[0]), ("[1..2]", *counts[1])] and counts[0] != counts[1]
    rows, counts = layer_rows("freeze=[language_model.layers.0]")
    assert rows == [("[0]", *counts[0]), ("[1..2]", *counts[1])] and counts[0][0] == 0
    rows, counts = layer_rows("adapters=[{modules: 'language_model.layers.1.attn.*', rank: 4}]")
    assert rows == [(str(i), *counts[i]) for i in range(3)] and counts[1] != counts[0] == counts[2]
