"""Model sizes (issue 13): size-like parameters are bounded when binding, a model's weights (and, for
training, its gradients and optimizer state) are sized on the meta device before they are allocated,
and build_model / example_inputs refuse arguments they cannot use, naming them."""

import json
import resource
import time

import pytest
import torch
from omegaconf import OmegaConf

from mimo_spec import build_model
from mimo_spec.builders.binding import MAX_DIM, MAX_LAYERS
from mimo_spec.config import compose_config
from mimo_spec.errors import ConfigError, InputError
from mimo_spec.train.limits import check_model_memory, machine_memory, model_memory

CLIP = "modalities.images.submodules.encoders.clip.params"
PROJ = "modalities.images.submodules.input_projections.clip.params"


def _refused(overrides, **kw) -> tuple[str, str, str]:
    with pytest.raises(ConfigError) as e:
        build_model(compose_config(overrides), **kw)
    p = e.value.problems[0]
    return p.path, p.message, p.hint or ""


def test_sizes_and_layer_counts_are_bounded_on_meta_without_hanging():
    t0 = time.perf_counter()
    for override, path in [("model.params.vocab_size=1180591620717411303424", "model.params.vocab_size"),
                           ("model.params.hidden_size=1180591620717411303424", "model.params.hidden_size"),
                           ("model.params.vocab_size=4611686018427387904", "model.params.vocab_size"),
                           (f"model.params.max_seq_len={MAX_DIM + 1}", "model.params.max_seq_len")]:
        got, message, hint = _refused([override], device="meta")
        assert got == path and f"must be at most {MAX_DIM}" in message and str(MAX_DIM) in hint
    for override, path in [("model.params.num_layers=1180591620717411303424", "model.params.num_layers"),
                           ("model.params.num_layers=1000000000", "model.params.num_layers"),
                           (f"{CLIP}.num_layers=1000000000", f"{CLIP}.num_layers"),
                           (f"{PROJ}.num_layers=1000000000", f"{PROJ}.num_layers"),
                           (f"model.params.num_layers={MAX_LAYERS + 1}", "model.params.num_layers")]:
        got, message, _ = _refused([override], device="meta")
        assert got == path and f"must be at most {MAX_LAYERS} (a layer count)" in message
    # dimensions each within the bound whose product no 64-bit size can hold: refused at the node, no traceback
    with pytest.raises(ConfigError) as e:
        build_model(compose_config(["model.params.vocab_size=2147483647", "model.params.hidden_size=2147483520",
                                    "model.params.num_heads=2", "model.params.num_kv_heads=2"]), device="meta")
    found = {p.path: p.message for p in e.value.problems}
    assert "too large to address" in found["model"] and "model.params" in e.value.problems[0].hint
    assert "too large to address" in found["modalities.images.submodules.input_projections.clip"]
    assert time.perf_counter() - t0 < 30
    # the bounds themselves are allowed: the largest layer count builds on meta
    model = build_model(compose_config(["modality=[]", f"model.params.num_layers={MAX_LAYERS}"]), device="meta")
    assert len(model.language_model.layers) == MAX_LAYERS


def test_weights_are_sized_before_they_are_allocated():
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for overrides, what in [([f"{CLIP}.image_size=1048576"], "parameters"),
                            (["model.params.hidden_size=1048576", "model.params.ffn_hidden_size=1048576"], "parameters"),
                            (["modality=[audio_whisper]",
                              "modalities.audio.submodules.encoders.whisper.params.max_source_positions=2000000000"],
                             "parameters")]:  # Whisper's sinusoid table: a frozen parameter, as Hugging Face's
        path, message, hint = _refused(overrides, device="cpu")
        assert path == "model" and "needs at least" in message and what in message
        assert "dtype=bfloat16" in hint and "parallel=fsdp" in hint
    assert time.perf_counter() - t0 < 30
    # nothing of the terabytes was allocated (ru_maxrss is in KiB on Linux)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 2 * 2**20


def test_the_estimate_counts_weights_gradients_and_optimizer_state():
    model = build_model(compose_config(["modality=[vision_clip]"]), device="meta")
    params = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model_memory(model) == (params, weights)
    assert model_memory(model, {"optimizer": "adamw"})[1] == weights + trainable * 4 * 3
    assert model_memory(model, {"optimizer": "sgd", "momentum": 0.9})[1] == weights + trainable * 4 * 2
    assert model_memory(model, {"optimizer": "sgd", "momentum": 0.0})[1] == weights + trainable * 4
    # a sharded layout spreads the training state, never the weights every process builds first
    assert model_memory(model, {"optimizer": "adamw"}, world=4)[1] == weights + trainable * 4 * 3 / 4
    # bfloat16 halves the weights and the gradients, not Adam's fp32 state
    bf16 = build_model(compose_config(["modality=[vision_clip]"]), device="meta", dtype="bfloat16")
    assert model_memory(bf16)[1] < weights
    # frozen weights have no gradients nor optimizer state
    frozen = build_model(compose_config(["modality=[vision_clip]", "freeze=[language_model]"]), device="meta")
    assert model_memory(frozen, {"optimizer": "adamw"})[1] < model_memory(model, {"optimizer": "adamw"})[1]


def test_llama3_8b_training_is_refused_only_where_it_cannot_fit():
    meta = build_model(compose_config(["model=llama3_8b", "modality=[]"]), device="meta")
    count, need = model_memory(meta, {"optimizer": "adamw"})
    assert count > 8 * 10**9 and need >= 16 * count  # fp32 weights + grads + 2 Adam states
    if need > machine_memory():
        with pytest.raises(ConfigError) as e:
            check_model_memory(meta, "cpu", {"optimizer": "adamw"})
        assert e.value.problems[0].path == "model" and f"{count:,} parameters" in str(e.value)
        assert "gradients and optimizer state" in str(e.value)
    check_model_memory(meta, "meta", {"optimizer": "adamw"})  # nothing is allocated on meta
    # a real model that fits builds on the CPU (after its meta copy was sized) with the same seeded weights
    cfg = compose_config(["modality=[vision_clip]"])
    a, b = build_model(cfg, seed=3), build_model(cfg, seed=3, train={"optimizer": "adamw"})
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_build_model_arguments_are_checked():
    cfg = compose_config(["modality=[]"])
    for kw, path in [(dict(seed=2**70), "seed"), (dict(seed="x"), "seed"), (dict(seed=-1), "seed"),
                     (dict(seed=True), "seed"), (dict(device="tpu"), "device"), (dict(device=3.5), "device"),
                     (dict(device="cuda:99"), "device"), (dict(dtype=torch.int64), "dtype"),
                     (dict(dtype="int8"), "dtype")]:
        with pytest.raises(ConfigError) as e:
            build_model(cfg, **kw)
        assert e.value.problems[0].path == path, kw
        assert e.value.problems[0].hint
    build_model(cfg, seed=2**63 - 1, device=torch.device("meta"), dtype=torch.bfloat16)


def test_example_inputs_arguments_are_checked():
    model = build_model(compose_config([]), seed=0)
    lm_max = model.language_model.max_seq_len
    t0 = time.perf_counter()
    for args, kw, path in [((0,), {}, "batch_size"), ((-1,), {}, "batch_size"), ((2.5,), {}, "batch_size"),
                           ((True,), {}, "batch_size"), ((10**12,), {}, "batch_size"),
                           ((2,), dict(text_tokens=10**12), "text_tokens"), ((2,), dict(text_tokens=-1), "text_tokens"),
                           ((2,), dict(text_tokens=lm_max + 1), "text_tokens"), ((2,), dict(seed=2**64), "seed")]:
        with pytest.raises(InputError) as e:
            model.example_inputs(*args, **kw)
        assert e.value.problems[0].path == path, (args, kw)
    with pytest.raises(InputError, match=f"0, {lm_max}.*max_seq_len"):
        model.example_inputs(2, text_tokens=lm_max + 1)
    assert time.perf_counter() - t0 < 5
    batch = model.example_inputs(3, text_tokens=4)
    assert batch["input_ids"].shape[0] == 3
    model(**batch)  # still a valid batch


def test_eval_refuses_a_checkpoint_whose_model_cannot_fit(tmp_path):
    from test_bad_inputs import run_cli_in_process

    ckpt = tmp_path / "step_000001"
    ckpt.mkdir()
    config = OmegaConf.to_container(compose_config([f"{CLIP}.image_size=1048576"]), resolve=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 1, "config": config}))
    code, out, err = run_cli_in_process(["action=eval", f"eval.checkpoint={ckpt}"], tmp_path)
    assert code == 2 and "mimo-spec: config error:" in err and "  model: the model (" in err, err
    assert "Traceback" not in err
