"""Hydra multirun sweeps: per-job records, the summary table, failures, launchers, search, re-runs."""

import csv
import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mimo_spec.sweep import summarize

# a few tiny training steps per job: the sweeps below take seconds
FAST = ["train.steps=3", "data.num_samples=32", "data.eval_samples=8", "train.eval_every=0"]

CRASHING_PROJECTOR = '''
import torch


class Boom(torch.nn.Module):
    """A projector that builds and validates fine, then crashes in its first forward pass."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.proj = torch.nn.Linear(in_features, out_features)

    def tokens_out(self, tokens_in: int) -> int:
        return tokens_in

    def forward(self, x):
        raise RuntimeError("boom: this projector always crashes")


class HardExit(Boom):
    """A projector whose process dies without a word, as if killed for its memory."""

    def forward(self, x):
        import os

        os._exit(3)
'''

CRASHING_MODALITY = '''# @package modalities.images
module: modality
params: {special_token_id: 1000}
submodules:
  encoders:
    clip:
      module: clip_vit
      params: {image_size: 32, patch_size: 8, hidden_size: 32, num_layers: 1, num_heads: 2, ffn_hidden_size: 64}
  input_projections:
    clip:
      module: crashmod.Boom
      params:
        in_features: 32
        out_features: ${model.params.hidden_size}
'''


def _crashing_plugins(cwd: Path) -> list[str]:
    """Modality presets boom_images (raises) and dying_images (ends its process); the overrides to use them."""
    (cwd / "crashmod.py").write_text(CRASHING_PROJECTOR)
    (cwd / "conf" / "modality").mkdir(parents=True)
    (cwd / "conf" / "modality" / "boom_images.yaml").write_text(CRASHING_MODALITY)
    (cwd / "conf" / "modality" / "dying_images.yaml").write_text(
        CRASHING_MODALITY.replace("crashmod.Boom", "crashmod.HardExit"))
    return ["allow_imports=[crashmod]", f"hydra.searchpath=[file://{cwd / 'conf'}]"]


def _sweep_dir(cwd: Path) -> Path:
    found = list(cwd.glob("multirun/*/*/sweep_summary.csv"))
    assert len(found) == 1, list(cwd.rglob("*"))
    return found[0].parent


def _summary(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "sweep_summary.csv") as f:
        return list(csv.DictReader(f))


def test_sweep_over_groups_ranks_jobs_reports_a_crash_and_reruns_a_job(cli):
    plugins = _crashing_plugins(cli.cwd)
    r = cli("-m", "model=tiny", "train.lr=1e-3,3e-4", "modality=[vision_clip],[boom_images]", *plugins, *FAST,
            env={"PYTHONPATH": str(cli.cwd)})
    assert r.returncode == 1, r.stderr  # the sweep finished, and says that some job failed
    sweep = _sweep_dir(cli.cwd)
    rows = _summary(sweep)
    assert len(rows) == 4
    ok, failed = rows[:2], rows[2:]
    # the jobs that trained come first, best final_loss first; the crashed ones after, with their error
    assert [row["status"] for row in ok] == ["completed", "completed"]
    assert {row["train.lr"] for row in ok} == {"0.001", "0.0003"}
    assert all(row["modality"] == "[vision_clip]" for row in ok)
    assert float(ok[0]["final_loss"]) <= float(ok[1]["final_loss"]) and ok[0]["rank"] == "1"
    assert [row["status"] for row in failed] == ["failed", "failed"]
    assert all(row["modality"] == "[boom_images]" for row in failed)
    assert all(row["error"] == "RuntimeError: boom: this projector always crashes" for row in failed)
    for row in rows:  # every job wrote metrics.json, the crashed ones a traceback too
        metrics = json.loads((sweep / row["job"] / "metrics.json").read_text())
        assert metrics["status"] == row["status"]
        if row["status"] == "completed":
            assert {"final_loss", "tokens_per_s", "parameters", "wall_time_s"} <= metrics.keys()
        else:
            assert "boom" in metrics["error"] and "Traceback" in (sweep / row["job"] / "error.log").read_text()
    md = (sweep / "sweep_summary.md").read_text()
    assert "| rank | job | status | train.lr | modality | final_loss |" in md
    assert f"best: job {ok[0]['job']}" in md and "failed: job" in md and md.strip() in r.stdout

    # re-run the best job from its run directory alone: the same config, the same result
    job = sweep / ok[0]["job"]
    r = cli("--config-dir", str(job), "--config-name", "resolved_config", env={"PYTHONPATH": str(cli.cwd)})
    assert r.returncode == 0, r.stderr
    reruns = list(cli.cwd.glob("outputs/*/*/resolved_config.yaml"))
    assert len(reruns) == 1
    assert OmegaConf.load(reruns[0]) == OmegaConf.load(job / "resolved_config.yaml")
    again = json.loads((reruns[0].parent / "metrics.json").read_text())
    assert again["final_loss"] == pytest.approx(float(ok[0]["final_loss"]), rel=1e-3)


def test_validate_over_a_sweep_reports_each_invalid_point(cli):
    r = cli("-m", "action=validate", "model=tiny,small", "model.params.num_kv_heads=2,3")
    assert r.returncode == 2, r.stderr
    rows = {(row["model"], row["model.params.num_kv_heads"]): row for row in _summary(_sweep_dir(cli.cwd))}
    assert {k: row["status"] for k, row in rows.items()} == {
        ("tiny", "2"): "valid", ("small", "2"): "valid", ("tiny", "3"): "invalid", ("small", "3"): "invalid"}
    assert rows[("tiny", "3")]["error"] == "model.params.num_heads: num_heads (4) must be divisible by num_kv_heads (3)"
    for model in ("tiny", "small"):
        assert f"invalid: job {rows[(model, '3')]['job']} (action=validate model={model} " \
               "model.params.num_kv_heads=3)" in r.stdout
    assert "num_heads (4) must be divisible by num_kv_heads (3)" in r.stdout
    assert "Traceback" not in r.stderr + r.stdout
    assert not list(cli.cwd.glob("multirun/*/*/*/checkpoints"))  # nothing trained

    r = cli("-m", "action=validate", "model=tiny", "sweep.direction=minimise")
    assert r.returncode == 2
    assert "sweep.direction: unknown direction 'minimise'" in r.stdout and "did you mean minimize?" in r.stdout


def test_sweep_over_a_missing_config_option_lists_the_available_ones(cli):
    r = cli("-m", "model=tiny,nonesuch", "action=validate")
    assert r.returncode == 2
    assert "model: no config option 'nonesuch' in group 'model'" in r.stderr
    assert "available: chameleon_7b, " in r.stderr and "small, smolvlm_256m" in r.stderr  # elided to fit
    assert "Traceback" not in r.stderr
    assert not list(cli.cwd.glob("multirun/*/*/*/.hydra"))  # checked before any job ran


def test_launcher_option_with_the_wrong_type_is_refused_before_launching(cli):
    cases = {
        ("hydra/launcher=slurm", "hydra.launcher.nodes=two"): "hydra.launcher.nodes: expected integer, got str 'two'",
        ("hydra/launcher=local", "hydra.launcher.timeout_min=1h"):
            "hydra.launcher.timeout_min: expected integer, got str '1h'",
        ("hydra/launcher=slurmm",): "did you mean slurm?",
    }
    for args, expected in cases.items():
        r = cli("-m", "model=tiny,small", "action=validate", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert expected in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert not list(cli.cwd.glob("multirun/*/*/*/.hydra"))


def test_slurm_launcher_config_makes_one_task_per_gpu(tmp_path, monkeypatch):
    """The sbatch script submitit would submit (no cluster here: a stand-in srun on PATH)."""
    submitit = pytest.importorskip("submitit")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import setup_globals
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    from mimo_spec.config import CONF_DIR

    (tmp_path / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=[
            "hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.partition=gpu", "hydra.launcher.account=proj", "hydra.launcher.timeout_min=90"],
            return_hydra_config=True)
    GlobalHydra.instance().clear()
    setup_globals()
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher" and launcher.params["tasks_per_node"] == 4
    # the executor the launcher builds from these params (hydra_submitit_launcher's launch())
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "submitit",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu",
                 "--account=proj", "--time=90"):
        assert f"#SBATCH {line}\n" in script, script
    assert "\nsrun " in script  # srun starts the 8 processes; each reads SLURM_PROCID / SLURM_NTASKS


def test_sweep_through_submitit_local_executor_aggregates_both_jobs(cli):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    r = cli("-m", "hydra/launcher=local", "model=tiny,small", *FAST, timeout=240)
    assert r.returncode == 0, r.stderr
    sweep = _sweep_dir(cli.cwd)
    rows = _summary(sweep)
    assert sorted(row["model"] for row in rows) == ["small", "tiny"]
    assert all(row["status"] == "completed" and float(row["final_loss"]) > 0 for row in rows)
    assert list((sweep / ".submitit").glob("*/*_0_log.out"))  # the jobs ran as submitit jobs
    assert "best: job" in (sweep / "sweep_summary.md").read_text()


def test_a_submitit_job_that_dies_is_reported_and_the_others_summarised(cli):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    plugins = _crashing_plugins(cli.cwd)
    r = cli("-m", "hydra/launcher=local", "modality=[vision_clip],[dying_images]", "model=tiny", *plugins, *FAST,
            env={"PYTHONPATH": str(cli.cwd)}, timeout=240)
    assert r.returncode == 1
    assert "the sweep stopped early: UncompletedJobError" in r.stderr
    rows = {row["modality"]: row for row in _summary(_sweep_dir(cli.cwd))}
    assert rows["[vision_clip]"]["status"] == "completed"
    assert rows["[dying_images]"]["status"] == "failed" and "did not finish" in rows["[dying_images]"]["error"]


def test_optuna_search_reports_the_best_trial(cli):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    r = cli("-m", "hydra/sweeper=optuna_lr_hidden", "hydra.sweeper.n_trials=2", "model=tiny", *FAST, timeout=240)
    assert r.returncode == 0, r.stderr
    sweep = _sweep_dir(cli.cwd)
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    rows = _summary(sweep)
    assert len(rows) == 2 and all(row["status"] == "completed" for row in rows)
    assert set(best.best_params) == {"train.lr", "model.params.hidden_size"}
    assert rows[0]["rank"] == "1"
    assert float(rows[0]["final_loss"]) == pytest.approx(best.best_value, rel=1e-3)
    assert rows[0]["model.params.hidden_size"] == str(best.best_params["model.params.hidden_size"])
    assert f"best: job {rows[0]['job']}" in r.stdout

    # every trial invalid: Optuna has no best trial; the table still lists them, exit 2, no traceback
    r = cli("-m", "hydra/sweeper=optuna_lr_hidden", "hydra.sweeper.n_trials=1", "model.params.num_kv_heads=3")
    assert r.returncode == 2
    assert "the sweep stopped early: ValueError: No trials are completed yet." in r.stderr
    assert "Traceback" not in r.stderr and "invalid: job 0" in r.stdout


def _job(sweep: Path, name: str, overrides: list[str], metrics: dict | None) -> None:
    (sweep / name / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), sweep / name / ".hydra" / "overrides.yaml")
    if metrics is not None:
        (sweep / name / "metrics.json").write_text(json.dumps(metrics))


def test_summary_sorts_by_any_objective_and_flags_jobs_that_never_finished(tmp_path):
    _job(tmp_path, "0", ["train.lr=0.1", "seed=1"], {"status": "completed", "final_loss": 2.0, "tokens_per_s": 10.0})
    _job(tmp_path, "1", ["train.lr=0.01", "seed=1"], {"status": "completed", "final_loss": 1.0, "tokens_per_s": 30.0})
    _job(tmp_path, "2", ["train.lr=0.001", "seed=1"], {"status": "completed", "final_loss": 3.0, "tokens_per_s": 20.0})
    _job(tmp_path, "10", ["train.lr=1.0", "seed=1"], None)  # killed: no metrics.json
    out = summarize(tmp_path, "tokens_per_s", "maximize")
    assert [r["job"] for r in out["rows"]] == ["1", "2", "0", "10"]
    assert out["best"]["job"] == "1" and out["failed"][0]["job"] == "10"
    rows = _summary(tmp_path)
    assert list(rows[0])[:5] == ["rank", "job", "status", "train.lr", "tokens_per_s"]  # seed is not swept
    assert rows[-1]["status"] == "failed" and "did not finish" in rows[-1]["error"]
    out = summarize(tmp_path, "final_loss", "minimize")
    assert [r["job"] for r in out["rows"]] == ["1", "0", "2", "10"]
    out = summarize(tmp_path, "final_los", "minimize")
    assert out["best"] is None and "did you mean final_loss?" in out["text"]


def test_hydra_mode_multirun_still_sweeps_without_dash_m(cli, tmp_path):
    """A plain run skips Hydra's mode-probing compose; asking for MULTIRUN any other way still sweeps."""
    r = cli("hydra.mode=MULTIRUN", "action=validate", "model=tiny,small")
    assert r.returncode == 0, r.stderr
    assert {row["model"] for row in _summary(_sweep_dir(cli.cwd))} == {"tiny", "small"}

    extra = tmp_path / "extra"
    (extra / "preset").mkdir(parents=True)
    (extra / "preset" / "swept.yaml").write_text(
        "# @package _global_\nhydra:\n  mode: MULTIRUN\n  sweeper:\n    params:\n      model: tiny,small\n")
    r = cli("--config-dir", str(extra), "preset=swept", "action=validate")
    assert r.returncode == 0, r.stderr
    assert len(list(cli.cwd.glob("multirun/*/*/*/resolved_config.yaml"))) == 4


def test_a_sweep_rerun_in_its_dir_summarises_its_own_jobs_and_eval_sweeps_rank_by_eval_loss(cli, tmp_path):
    """The same sweep dir again with fewer points: the summary holds this sweep's jobs only (the earlier
    sweep's third folder is left out), and a job that had already finished keeps its final loss (re-running a
    completed run reported NaN and dropped it from the ranking). A sweep of action=eval over two checkpoints
    ranks them by eval_loss (read from each job's eval.json)."""
    sweep = tmp_path / "sweep"
    r = cli("-m", "train.lr=1e-3,3e-4,1e-4", *FAST, "train.checkpoint.every=3", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr
    first = {row["train.lr"]: float(row["final_loss"]) for row in _summary(sweep)}
    assert len(first) == 3
    r = cli("-m", "train.lr=1e-3,3e-4", *FAST, "train.checkpoint.every=3", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr
    rows = _summary(sweep)
    assert {row["job"] for row in rows} == {"0", "1"} and all(row["rank"] for row in rows)
    assert {row["train.lr"]: float(row["final_loss"]) for row in rows} == pytest.approx(
        {k: v for k, v in first.items() if k != "0.0001"}, abs=1e-4)
    assert "2 jobs, 2 ok" in r.stdout
    evals = tmp_path / "evals"
    r = cli("-m", "action=eval", f"eval.checkpoint={sweep / '0'},{sweep / '1'}", "sweep.objective=eval_loss",
            f"hydra.sweep.dir={evals}")
    assert r.returncode == 0, r.stderr
    rows = _summary(evals)
    assert [row["rank"] for row in rows] == ["1", "2"] and float(rows[0]["eval_loss"]) <= float(rows[1]["eval_loss"])
    assert "best: job" in r.stdout
