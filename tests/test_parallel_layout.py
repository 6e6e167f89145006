"""Parallel layouts without any process: schema, checks (each error names its path), rank maps, launch env."""

import pytest
import torch

from mimo_spec import build_model
from mimo_spec.config import compose_config
from mimo_spec.errors import ConfigError
from mimo_spec.parallel.env import first_slurm_host, read_env
from mimo_spec.parallel.layout import render_rank_map, resolve
from mimo_spec.parallel.tp import interleave_index

SHIPPED = {"single": 1, "ddp": 2, "fsdp": 2, "tp2": 2, "tp2_fsdp": 4, "pp2": 4, "hetero_colocated": 4,
           "hetero_split": 4}


@pytest.fixture(scope="module")
def meta_model():
    return build_model(compose_config([]), device="meta")


def layout_of(name, world, model, train=None, **edits):
    from omegaconf import OmegaConf

    cfg = compose_config([f"parallel={name}"] + [f"{k}={v}" for k, v in edits.items()])
    return resolve(OmegaConf.to_container(cfg.parallel, resolve=True), model, world, train=train)


def problems(parallel, model, world, train=None):
    with pytest.raises(ConfigError) as e:
        resolve(parallel, model, world, train=train)
    return {p.path: p for p in e.value.problems}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_layout_resolves(name, meta_model):
    layout = layout_of(name, SHIPPED[name], meta_model)
    assert layout.world_size == SHIPPED[name]
    for m in layout.modules.values():
        assert m.pp * m.dp_replicate * m.dp_shard * m.tp == m.size


def test_degrees_and_rank_coordinates(meta_model):
    lay = layout_of("tp2_fsdp", 8, meta_model)
    lm = lay.modules["language"]
    assert (lm.tp, lm.dp_shard) == (2, 4)
    assert lm.coords(5) == {"pp": 0, "dp_replicate": 0, "dp_shard": 2, "tp": 1}  # tp innermost
    hetero = layout_of("hetero_colocated", 4, meta_model)
    assert (hetero.modules["language"].tp, hetero.modules["language"].dp_shard, hetero.modules["images"].dp_shard) \
        == (2, 2, 4)


def test_rank_map_of_a_split_layout(meta_model):
    text = render_rank_map(layout_of("hetero_split", 4, meta_model))
    lines = text.splitlines()
    assert "language: ranks 2-3" in text and "images: ranks 0-1" in text
    row = {int(line.split()[0]): line for line in lines if line.strip()[:1].isdigit()}
    assert row[0].split()[1] == "-" and "dps1" in row[1]          # rank 1: images only
    assert row[3].split()[1:5] == ["pp0", "dpr0", "dps0", "tp1"]   # rank 3: LM, second TP rank


def test_world_size_that_does_not_match(meta_model):
    p = problems({"name": "x", "modules": {}}, meta_model, 2)
    assert "do not match the span of 2 ranks" in p["parallel.default"].message
    p = problems({"default": {"tp": 2, "dp_replicate": -1}}, meta_model, 3)
    assert "3 ranks do not divide" in p["parallel.default.dp_replicate"].message


def test_overlapping_and_uncovered_spans(meta_model):
    p = problems({"modules": {"images": {"ranks": {"offset": 0, "size": 3}, "dp_shard": -1},
                              "language": {"ranks": {"offset": 2, "size": 2}, "tp": 2}}}, meta_model, 4)
    (path, problem), = p.items()
    assert path.endswith(".ranks") and "overlap" in problem.message and "identical" in problem.hint
    p = problems({"modules": {"images": {"ranks": {"offset": 0, "size": 1}},
                              "language": {"ranks": {"offset": 1, "size": 2}, "tp": 2}}}, meta_model, 4)
    assert "ranks [3] hold no module" in p["parallel.modules"].message


def test_heads_not_divisible_by_tp(meta_model):
    p = problems({"modules": {"language": {"tp": 4}, "images": {"dp_replicate": 4}}}, meta_model, 4)
    assert "num_kv_heads = 2 does not divide by tp=4" in p["parallel.modules.language.tp"].message


def test_more_pipeline_stages_than_layers(meta_model):
    p = problems({"default": {"dp_replicate": -1}, "modules": {"language": {"pp": 4, "microbatches": 4}}},
                 meta_model, 4)
    assert "4 pipeline stages but the language model has 2 layers" in p["parallel.modules.language.pp"].message
    assert "model.params.num_layers" in p["parallel.modules.language.pp"].hint


def test_a_vision_q_k_norm_over_all_heads_refuses_tensor_parallelism():
    """A clip_vit with qk_norm and RMSNorm normalises all heads' width at once (InternViT-6B's): a TP share of
    the heads cannot compute it, so tp on the images module is a config error naming it (it passed the check and
    crashed in the first forward); the same tower under ddp resolves."""
    from mimo_spec import build_model
    from mimo_spec.config import compose_config
    from mimo_spec.parallel.layout import resolve

    e = "modalities.images.submodules.encoders.clip.params"
    meta = build_model(compose_config([f"+{e}.qk_norm=true", f"+{e}.norm=rmsnorm", f"+{e}.qkv_bias=false"]),
                       device="meta")
    p = problems({"default": {"tp": 2}}, meta, 2)
    message = p["parallel.default.tp"].message
    assert "modalities.images's encoders.clip.layers.0.attn.q_norm" in message and "all heads" in message
    assert resolve({"default": {"dp_replicate": 2}}, meta, 2).modules["images"].tp == 1


def test_unknown_tp_plan_module_and_key(meta_model):
    p = problems({"default": {"tp": 2, "tp_plan": "megatron"},
                  "modules": {"imagse": {"tp": 2}, "language": {"tp": 2, "dp_shrad": 1}}}, meta_model, 2)
    assert "unknown TP plan 'megatron'" in p["parallel.default.tp_plan"].message
    assert "did you mean images" in p["parallel.modules.imagse"].hint
    assert "did you mean dp_shard" in p["parallel.modules.language.dp_shrad"].hint


def test_context_parallel_is_refused(meta_model):
    p = problems({"default": {"dp_replicate": -1}, "modules": {"language": {"cp": 2}}}, meta_model, 2)
    assert "context parallelism is not supported" in p["parallel.modules.language.cp"].message


def test_batch_must_split_over_data_parallel_ranks(meta_model):
    p = problems({"default": {"dp_shard": -1}}, meta_model, 4, train={"batch_size": 6})
    assert "6 samples do not split over" in p["train.batch_size"].message


def test_problems_are_all_reported_at_once(meta_model):
    p = problems({"default": {"tp": 2, "cp": 2, "fsdp": {"param_dtype": "fp8"}, "compile": "yes"}}, meta_model, 2)
    assert {"parallel.default.cp", "parallel.default.fsdp.param_dtype", "parallel.default.compile"} <= set(p)


def test_the_app_checks_the_layout_with_the_model(meta_model, monkeypatch):
    """The layout is the run's, not the model's: build_model ignores it (and WORLD_SIZE); the app's
    meta build (run_config.build_meta_model) checks it, its problems joining the model's."""
    from mimo_spec.run_config import build_meta_model

    cfg = compose_config(["parallel=tp2", "model.params.num_kv_heads=1"])
    with pytest.raises(ConfigError) as e:
        build_meta_model(cfg)
    assert [p.path for p in e.value.problems] == ["parallel.default.tp"]
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "3")  # a world the layout cannot fit either
    assert build_model(cfg, device="meta").language_model.num_kv_heads == 1
    with pytest.raises(ConfigError) as e:
        build_meta_model(compose_config(["parallel=tp2", "model.params.num_kv_heads=1", "model.params.num_layers=0"]))
    # the model's problem and the layout's (against the launcher's world of 3) in one error
    assert {"model.params.num_layers", "parallel.default.dp_replicate"} <= {p.path for p in e.value.problems}


def test_cli_layout_and_validate(cli):
    r = cli("action=layout", "parallel=hetero_split", "world_size=4")
    assert r.returncode == 0, r.stderr
    assert "layout hetero_split: world size 4" in r.stdout and "language: ranks 2-3" in r.stdout
    r = cli("action=layout", "parallel=tp2", "world_size=3")
    assert r.returncode == 2 and "parallel.default.dp_replicate" in r.stderr and "Traceback" not in r.stderr
    r = cli("action=validate", "parallel=tp2", "model.params.num_heads=6", "model.params.num_kv_heads=3",
            "model.params.hidden_size=96")
    assert r.returncode == 2 and "parallel.default.tp" in r.stderr and "num_kv_heads = 3" in r.stderr


def test_launch_environment_torchrun_and_slurm():
    env = read_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 4, 1, "n1", 1234)
    env = read_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                    "SLURM_NODELIST": "gpu[003-004,007]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 8, 1, "gpu003")
    assert 20000 <= env.master_port < 40000
    assert read_env({}) is None
    assert first_slurm_host("cpu1,cpu2") == "cpu1" and first_slurm_host("a[10-12]") == "a10"
    assert first_slurm_host("n[1,3-4]-ib,m2") == "n1-ib" and first_slurm_host("gpu[07-09].cluster") == "gpu07.cluster"


def test_fused_projection_is_sharded_part_by_part():
    # rows [q0 q1 q2 q3 | k0 k1 | v0 v1] -> rank 0 holds [q0 q1 k0 v0], rank 1 [q2 q3 k1 v1]
    idx = interleave_index([4, 2, 2], 2)
    assert idx.tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    w = torch.arange(8.0)
    assert torch.equal(w[idx][torch.argsort(idx)], w)


def test_activation_checkpointing_keeps_names_and_gradients():
    from mimo_spec.parallel.parallelize import apply_activation_checkpointing, is_checkpointed

    cfg = compose_config([])
    ref, ac = build_model(cfg, seed=0), build_model(cfg, seed=0)
    apply_activation_checkpointing(ac.language_model, {"mode": "every", "every": 2})
    assert is_checkpointed(ac.language_model.layers[0]) and not is_checkpointed(ac.language_model.layers[1])
    assert list(ac.state_dict()) == list(ref.state_dict())
    batch = ref.example_inputs(batch_size=2)
    ref(**batch).loss.backward()
    ac(**batch).loss.backward()
    for (name, p), q in zip(ref.named_parameters(), ac.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_split_layout_checks(meta_model):
    """Modalities on their own ranks are data parallel only and never share ranks with the LM."""
    p = problems({"default": {"ranks": {"offset": 0, "size": 2}, "tp": 2},
                  "modules": {"language": {"ranks": {"offset": 2, "size": 2}, "tp": 1, "pp": 2,
                                           "microbatches": 2}}},
                 meta_model, 4)
    assert "a modality on its own ranks is data parallel only (tp must be 1)" in p["parallel.default.tp"].message
    assert "pp > 1 on top of it is not supported" in p["parallel.modules.language.pp"].message
    any2any = build_model(compose_config(["modality=[vision_clip,image_gen]"]), device="meta")
    p = problems(compose_config(["parallel=hetero_split"]).parallel, any2any, 4)
    assert "an output modality must sit with the language model" in p["parallel.default"].message


def test_pipeline_checks(meta_model):
    """A modality next to a pipelined LM runs in its first stage: it must share the LM's degrees;
    output modalities and tied embeddings cannot be split over stages; the schedule is a known one."""
    p = problems({"default": {"dp_replicate": -1}, "modules": {"language": {"pp": 2, "microbatches": 2}}},
                 meta_model, 2)
    assert "runs in its first stage" in p["parallel.default"].message
    assert "pp=2, dp_replicate=1, dp_shard=1, tp=1" in p["parallel.default"].message
    # a default setting that fails for every module: named where it was set, once
    with pytest.raises(ConfigError) as e:
        resolve({"default": {"pp": 2, "microbatches": 3}}, meta_model, 2, train={"batch_size": 8})
    assert [p.path for p in e.value.problems] == ["parallel.default.microbatches"], e.value.problems
    assert e.value.problems[0].message == "the per-rank batch of 8 does not split into 3 microbatches"
    assert e.value.problems[0].hint == "make train.batch_size a multiple of 3"
    one = build_model(compose_config(["model.params.num_layers=1"]), device="meta")
    assert problems({"default": {"pp": 2}}, one, 2)["parallel.default.pp"].message.endswith("has 1 layer")
    p = problems({"default": {"pp": 2, "microbatches": 2, "pp_schedule": "1f1f"}}, meta_model, 2)
    assert "unknown pipeline schedule '1f1f'" in p["parallel.default.pp_schedule"].message
    assert "did you mean 1f1b" in p["parallel.default.pp_schedule"].hint
    tied = build_model(compose_config(["model.params.tie_embeddings=true"]), device="meta")
    p = problems({"default": {"pp": 2, "microbatches": 2}}, tied, 2)
    assert "tied embeddings cannot be split over pipeline stages" in p["parallel.default.pp"].message
    any2any = build_model(compose_config(["modality=[vision_clip,image_gen]"]), device="meta")
    p = problems({"default": {"pp": 2, "microbatches": 2}}, any2any, 2)
    assert any("output modality cannot run under pipeline" in q.message for q in p.values())
    layout = layout_of("pp2", 2, meta_model, train={"batch_size": 4})
    assert layout.modules["language"].pp == 2 and layout.modules["images"].shape == layout.modules["language"].shape


def test_one_process_runs_take_activation_checkpointing_and_compile(tmp_path):
    """Without torchrun a layout's degrees need more processes, but its activation checkpointing and
    per-block compile apply (with the same losses), and a compile backend is checked by name."""
    import csv

    from omegaconf import OmegaConf

    from mimo_spec.parallel.parallelize import apply_one_process, is_checkpointed
    from mimo_spec.train.loop import train

    overrides = ["+parallel.default.activation_checkpoint={mode: every, every: 2}",
                 "+parallel.modules.images={compile: aot_eager}"]
    cfg = compose_config(["parallel=fsdp", *overrides])
    model = build_model(cfg, seed=0)
    apply_one_process(OmegaConf.to_container(cfg.parallel, resolve=True), model)
    lm_blocks, vit_blocks = model.language_model.layers, model.modalities["images"].encoders["clip"].layers
    checkpointed = [is_checkpointed(b) for b in lm_blocks]  # torch's composable checkpoint on the block
    assert checkpointed == [i % 2 == 0 for i in range(len(lm_blocks))]
    assert all(b._compiled_call_impl is not None for b in vit_blocks)
    assert all(b._compiled_call_impl is None for b in lm_blocks)

    def losses(run):
        with open(run / "metrics.csv") as f:
            return [float(r["loss"]) for r in csv.DictReader(f)]

    base = ["train.steps=3", "data.num_samples=16", "data.eval_samples=0", "train.batch_size=4"]
    train(compose_config(base), tmp_path / "plain")
    train(compose_config(base + ["+parallel.default.activation_checkpoint={mode: full}",
                                 "+parallel.default.compile=aot_eager"]), tmp_path / "ac_compile")
    assert losses(tmp_path / "ac_compile") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)

    with pytest.raises(ConfigError) as e:
        resolve({"default": {"compile": "aot_eagre"}}, build_model(compose_config([]), device="meta"), 1)
    (problem,) = e.value.problems
    assert problem.path == "parallel.default.compile" and "unknown torch.compile backend 'aot_eagre'" in problem.message
    assert "aot_eager" in problem.hint
