"""Nothing Hydra instantiates runs unless it is shipped or allowlisted; every YAML file is bounded.

The hooks below are real: each would write a marker file if Hydra instantiated it (a pickle that
touches a file when loaded, a .pth file that runs when its folder is added to sys.path, a hubconf.py,
numpy.save, a log file outside the run directory). test_the_hooks_are_live shows that Hydra's own
blocklist lets each of them run; the other tests show that mimo-spec refuses them, naming the key,
before Hydra instantiates anything, on every route a config reaches Hydra by.
"""

import json
import pickle
import sys
import time
from pathlib import Path

import pytest
import yaml

from mimo_spec.errors import ConfigError

from test_bad_inputs import run_cli_in_process


class _Touch:
    """Pickles as a call of Path.touch: loading it creates the marker."""

    def __init__(self, path):
        self.path = Path(path)

    def __reduce__(self):
        return Path.touch, (self.path,)


def _hooks(tmp: Path) -> dict[str, tuple[dict, Path]]:
    """name -> (the keyword arguments of a Hydra-instantiated object, the marker it would write)."""
    import torch

    torch.save({"x": _Touch(tmp / "m_pickle_torch")}, tmp / "evil.pkl")
    (tmp / "evil_np.pkl").write_bytes(pickle.dumps({"x": _Touch(tmp / "m_pickle_numpy")}))
    (tmp / "site").mkdir(exist_ok=True)
    (tmp / "site" / "evil.pth").write_text(f"import pathlib; pathlib.Path({str(tmp / 'm_pth')!r}).touch()\n")
    (tmp / "hub").mkdir(exist_ok=True)
    (tmp / "hub" / "hubconf.py").write_text(f"import pathlib\npathlib.Path({str(tmp / 'm_hub')!r}).touch()\n"
                                            "def model():\n    return None\n")
    return {
        "numpy_save": ({"_target_": "numpy.save", "file": str(tmp / "m_npsave.npy"), "arr": [1]},
                       tmp / "m_npsave.npy"),
        "torch_load": ({"_target_": "torch.load", "f": str(tmp / "evil.pkl"), "weights_only": False},
                       tmp / "m_pickle_torch"),
        "numpy_load": ({"_target_": "numpy.load", "file": str(tmp / "evil_np.pkl"), "allow_pickle": True},
                       tmp / "m_pickle_numpy"),
        "site_addsitedir": ({"_target_": "site.addsitedir", "sitedir": str(tmp / "site")}, tmp / "m_pth"),
        "torch_hub_load": ({"_target_": "torch.hub.load", "repo_or_dir": str(tmp / "hub"), "model": "model",
                            "source": "local", "trust_repo": True}, tmp / "m_hub"),
    }


def _logging(handlers: dict) -> dict:
    return {"version": 1, "handlers": handlers, "root": {"handlers": list(handlers)},
            "disable_existing_loggers": False}


def test_the_hooks_are_live(tmp_path):
    """Without mimo-spec's check, Hydra itself instantiates each hook and the marker appears."""
    import logging

    from hydra._internal.callbacks import Callbacks
    from hydra.core.utils import configure_log
    from omegaconf import OmegaConf

    hooks = _hooks(tmp_path)
    saved_path = sys.path[:]
    try:
        for name, (kw, marker) in hooks.items():
            try:  # Hydra's own callbacks machinery, as Hydra.run uses it
                Callbacks(OmegaConf.create({"hydra": {"callbacks": {name: kw}}}))
            except Exception:  # noqa: BLE001 - the hook ran; what it returned is no callback
                pass
            assert marker.exists(), name
    finally:
        sys.path[:] = saved_path  # site.addsitedir added a folder
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        configure_log(OmegaConf.create(_logging({
            "evil": {"()": "numpy.save", "file": str(tmp_path / "m_log_factory.npy"), "arr": [1]},
        })), False)
    except ValueError:  # logging then complains that numpy.save returned no handler: too late
        pass
    configure_log(OmegaConf.create(_logging({"f": {"class": "logging.FileHandler", "filename": str(tmp_path / "m.log")}})),
                  False)
    for h in root.handlers[:]:
        root.removeHandler(h)
        if h not in saved:
            h.close()
    for h in saved:
        root.addHandler(h)
    root.setLevel(level)
    assert (tmp_path / "m_log_factory.npy").exists() and (tmp_path / "m.log").exists()


def _evil_global_file(tmp: Path, kind: str) -> str:
    """A `# @package _global_` config file that plants hooks in the hydra section."""
    hooks = _hooks(tmp)
    if kind == "callbacks":
        hydra = {"callbacks": {"evil": hooks["numpy_load"][0], "evil2": hooks["site_addsitedir"][0]}}
    else:
        hydra = {"job_logging": _logging({"evil": {"()": "site.addsitedir", "sitedir": str(tmp / "site")}}),
                 "hydra_logging": _logging({"evil": {"class": "logging.FileHandler",
                                                     "filename": str(tmp / "m_hydra.log")}})}
    return "# @package _global_\n" + yaml.safe_dump({"hydra": hydra})


def _files(tmp: Path) -> set[Path]:
    return {p for p in tmp.rglob("*") if p.is_file()}


def _refused(code, err, tmp: Path, before: set[Path], keys: list[str], may_add: tuple[str, ...] = ()) -> None:
    """Exit 2 naming each key; no marker, and no file at all: the check ran before Hydra did anything."""
    assert code == 2, err
    assert err.startswith("mimo-spec: config error") and "Traceback" not in err, err
    for key in keys:
        assert key in err, (key, err)
    new = [p.relative_to(tmp) for p in _files(tmp) - before if p.name not in may_add]
    assert not new, new


def test_hooks_on_the_command_line_are_refused_before_hydra_runs_them(tmp_path):
    hooks = _hooks(tmp_path)
    args = ["action=validate"]
    for name in ("numpy_save", "torch_load", "torch_hub_load"):
        kw = hooks[name][0]
        args += [f"+hydra.callbacks.{name}.{k}={v}" for k, v in kw.items()]
    before = _files(tmp_path)
    code, out, err = run_cli_in_process(args, tmp_path)
    _refused(code, err, tmp_path, before, [f"hydra.callbacks.{n}._target_" for n in ("numpy_save", "torch_load",
                                                                                "torch_hub_load")])
    assert "'torch.hub.load' is not allowed" in err


def test_multirun_launcher_sweeper_and_callbacks_are_refused(tmp_path):
    hooks = _hooks(tmp_path)
    launcher, _ = hooks["numpy_save"]
    args = ["-m", "action=validate", "model.params.num_layers=1,2", f"hydra.launcher._target_={launcher['_target_']}",
            f"+hydra.launcher.file={launcher['file']}", "+hydra.launcher.arr=[1]",
            "hydra.sweeper._target_=site.addsitedir", f"+hydra.sweeper.sitedir={tmp_path / 'site'}"]
    args += [f"+hydra.callbacks.evil.{k}={v}" for k, v in hooks["torch_load"][0].items()]
    before = _files(tmp_path)
    code, out, err = run_cli_in_process(args, tmp_path)
    _refused(code, err, tmp_path, before, ["hydra.launcher._target_", "hydra.sweeper._target_", "hydra.callbacks.evil._target_"])
    assert not (tmp_path / "multirun").exists() or not list((tmp_path / "multirun").rglob("metrics.json"))


def test_a_hook_in_one_point_of_a_sweep_is_refused_before_its_job_runs(tmp_path):
    """A searchpath option swept over (-m +extra=evil,plain) joins only its job's config: checked too."""
    group = tmp_path / "conf" / "extra"
    group.mkdir(parents=True)
    (group / "plain.yaml").write_text("# @package _global_\nseed: 1\n")
    (group / "evil.yaml").write_text("# @package _global_\n" + yaml.safe_dump({"hydra": {"job_logging": _logging(
        {"f": {"class": "logging.FileHandler", "filename": str(tmp_path / "m.log")}})}}))
    args = ["-m", "action=validate", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "+extra=evil,plain"]
    before = _files(tmp_path)
    code, out, err = run_cli_in_process(args, tmp_path)
    _refused(code, err, tmp_path, before, ["hydra.job_logging.handlers.f.filename", "outside the run directory"],
             may_add=("multirun.yaml",))
    assert not list(tmp_path.rglob("metrics.json"))


@pytest.mark.parametrize("kind", ["callbacks", "logging"])
def test_hooks_in_a_searchpath_file_are_refused(tmp_path, kind):
    conf = tmp_path / "conf" / "modality"
    conf.mkdir(parents=True)
    (conf / "evil.yaml").write_text(_evil_global_file(tmp_path, kind))
    args = ["action=validate", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "modality=[vision_clip,evil]"]
    before = _files(tmp_path)
    code, out, err = run_cli_in_process(args, tmp_path)
    keys = (["hydra.callbacks.evil._target_", "hydra.callbacks.evil2._target_"] if kind == "callbacks" else
            ["hydra.job_logging.handlers.evil.()", "hydra.hydra_logging.handlers.evil.filename"])
    _refused(code, err, tmp_path, before, keys)
    # the Python API composes through the same check
    from mimo_spec.config import compose_config

    with pytest.raises(ConfigError) as e:
        compose_config([f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "modality=[vision_clip,evil]"])
    assert all(k in str(e.value) for k in keys), str(e.value)


def test_a_run_dirs_resolved_config_with_hooks_is_refused_on_rerun(tmp_path):
    """The README's recipe: re-run a run from its resolved_config.yaml with --config-dir."""
    run = tmp_path / "run"
    code, out, err = run_cli_in_process(["action=validate", f"hydra.run.dir={run}"], tmp_path)
    assert code == 0, err
    record = run / "resolved_config.yaml"
    text = record.read_text()
    hooks = _hooks(tmp_path)
    record.write_text(text + yaml.safe_dump({"hydra": {
        "callbacks": {"hub": hooks["torch_hub_load"][0]},
        "hydra_logging": _logging({"x": {"()": "numpy.save", "file": str(tmp_path / "m_f.npy"), "arr": [1]},
                                   "s": {"class": "logging.StreamHandler", "stream": "ext://numpy.save"}})}}))
    args = ["--config-dir", str(run), "--config-name", "resolved_config", "action=validate",
            f"hydra.run.dir={tmp_path / 'rerun'}"]
    before = _files(tmp_path)
    code, out, err = run_cli_in_process(args, tmp_path)
    _refused(code, err, tmp_path, before, ["hydra.callbacks.hub._target_", "hydra.hydra_logging.handlers.x.()",
                                   "hydra.hydra_logging.handlers.s.stream", "ext://numpy.save"])
    assert not (tmp_path / "rerun").exists()
    record.write_text(text)  # the untouched record re-runs
    code, out, err = run_cli_in_process(args, tmp_path)
    assert code == 0 and "config is valid" in out, err


def test_allow_imports_admits_only_classes_of_the_right_kind(tmp_path, monkeypatch):
    """A Callback class under allow_imports runs (its marker appears); a function there does not."""
    pkg = tmp_path / "my_hooks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\nfrom hydra.experimental.callback import Callback\n"
        "class Marker(Callback):\n    def __init__(self, path):\n        Path(path).touch()\n"
        "def touch(path):\n    Path(path).touch()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["action=validate", "allow_imports=[my_hooks,numpy,os]"]
    code, out, err = run_cli_in_process(
        base + ["+hydra.callbacks.ok._target_=my_hooks.Marker", f"+hydra.callbacks.ok.path={tmp_path / 'ok'}"],
        tmp_path)
    assert code == 0 and (tmp_path / "ok").exists(), err
    before = _files(tmp_path)
    code, out, err = run_cli_in_process(base + [
        "+hydra.callbacks.f._target_=my_hooks.touch", f"+hydra.callbacks.f.path={tmp_path / 'm_f'}",
        "+hydra.callbacks.np._target_=numpy.save", f"+hydra.callbacks.np.file={tmp_path / 'm_np.npy'}",
        "+hydra.callbacks.np.arr=[1]", "+hydra.callbacks.os._target_=os.system", "+hydra.callbacks.os.command=true",
    ], tmp_path)
    _refused(code, err, tmp_path, before, ["hydra.callbacks.f._target_: 'my_hooks.touch' is not a Callback class",
                                   "hydra.callbacks.np._target_: 'numpy.save' is not a Callback class",
                                   "hydra.callbacks.os._target_: refusing 'os.system'"])


def test_the_shipped_hydra_configs_pass_the_check(tmp_path):
    from mimo_spec.config import compose_config
    from mimo_spec.hydra_guard import check_hydra_config

    for overrides in ([], ["hydra/launcher=local"], ["hydra/launcher=slurm"], ["hydra/sweeper=optuna_lr_hidden"],
                      ["hydra/hydra_logging=hydra_debug", "hydra/job_logging=stdout"],
                      ["hydra/job_logging=disabled", "hydra/hydra_logging=none"]):
        cfg = compose_config(overrides)
        check_hydra_config(cfg)  # also done inside compose_config; explicit here
    with pytest.raises(ConfigError, match=r"hydra.job.env_set.LD_PRELOAD: a config may not set LD_PRELOAD"):
        compose_config(["+hydra.job.env_set.LD_PRELOAD=/tmp/x.so"])
    group = tmp_path / "conf" / "hydra" / "job_logging"  # a job_logging option of one's own
    group.mkdir(parents=True)
    (group / "mine.yaml").write_text(yaml.safe_dump(_logging({"file": {
        "class": "logging.FileHandler", "filename": "${hydra.runtime.output_dir}/${hydra.job.name}.log", "delay": True,
        ".": {"baseFilename": str(tmp_path / "m.log")}}})))
    with pytest.raises(ConfigError, match=r"hydra.job_logging.handlers.file\['.'\]: setting attributes"):
        compose_config([f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "hydra/job_logging=mine"])


def test_launcher_shell_lines_come_only_from_the_command_line(tmp_path):
    """submitit runs hydra.launcher.setup (and srun_args) as shell lines: a config file (a search-path preset)
    setting them is refused, naming the key, before anything runs; typed on the command line they stand. A line
    break in any launcher string (a new line of the sbatch script) is refused; a config file's sbatch options
    stand (submitit quotes their values), their names must be option names."""
    from mimo_spec.config import compose_config

    conf = tmp_path / "conf"
    (conf / "hydra" / "launcher").mkdir(parents=True)
    (conf / "extra").mkdir()
    marker = tmp_path / "m_setup"
    (conf / "hydra" / "launcher" / "mine.yaml").write_text(yaml.safe_dump({
        "_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
        "submitit_folder": "${hydra.sweep.dir}/.submitit/%j", "timeout_min": 5, "tasks_per_node": 1, "nodes": 1,
        "name": "${hydra.job.name}", "setup": [f"touch {marker}"]}))
    (conf / "extra" / "fast.yaml").write_text("# @package _global_\ndefaults:\n  - override /hydra/launcher: mine\n"
                                              "hydra:\n  mode: MULTIRUN\n")
    search = f"hydra.searchpath=[file://{conf}]"
    before = _files(tmp_path)
    code, out, err = run_cli_in_process([search, "+extra=fast", "action=validate", "seed=1",
                                         f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    _refused(code, err, tmp_path, before, ["hydra.launcher.setup", "only on the command line"])
    assert not marker.exists()
    # typed by the user, the same lines stand (the shipped SLURM launcher's documented option)
    compose_config(["hydra/launcher=slurm", "hydra.launcher.setup=[module load cuda/12.4]",  # no error
                    "+hydra.launcher.additional_parameters.mail-type=END"])
    with pytest.raises(ConfigError, match=r"hydra.launcher.partition: a line break"):
        compose_config(["hydra/launcher=slurm", "hydra.launcher.partition='gpu\ntouch x'"])
    # a shared preset's sbatch options (values shell-quoted by submitit) stand; a key that is no option name not
    (conf / "hydra" / "launcher" / "cluster.yaml").write_text(
        "defaults:\n  - slurm\nadditional_parameters:\n  mail-type: END\n  exclude: 'gpu[01-03]'\n"
        "  constraint: 'a100|h100'\n")
    compose_config([search, "hydra/launcher=cluster"])
    (conf / "hydra" / "launcher" / "bad.yaml").write_text(
        "defaults:\n  - slurm\nadditional_parameters:\n  'x; touch y': 1\n")
    with pytest.raises(ConfigError, match=r"is not an sbatch option name"):
        compose_config([search, "hydra/launcher=bad"])


# --- YAML: bounded, and every fault named by its file ----------------------------------------------------------
BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
               for p, c in zip([None, *"abcdefgh"], "abcdefghi"))


def _bad_yaml(tmp: Path) -> dict[str, tuple[str, str]]:
    """name -> (file text, message the error must contain)."""
    deep = "model:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(60)) + "  " * 61 + "v: 1\n"
    return {
        "alias_bomb": (BOMB, "expands to more than 50,000 values once its aliases are expanded"),
        "deep_flow": ("a: " + "[" * 20_000 + "]" * 20_000 + "\n", "nesting depth"),
        "deep_block": (deep, "nested more than 50 levels deep"),
        "set_tag": ("model: !!set {a, b}\n", "YAML tag '!!set' is not allowed"),
        "python_tag": ("model: !!python/object/apply:os.system [true]\n", "YAML tag '!!python/object/apply:os.system'"),
        "recursive_alias": ("a: &a [1, *a]\n", "refers to itself"),
        "syntax": ("model:\n  params: {a: 1\n", "YAML syntax error"),
        "duplicate_key": ("model: 1\nmodel: 2\n", "found duplicate key"),
    }


def test_bad_yaml_is_refused_quickly_by_build_model(tmp_path):
    from mimo_spec import build_model

    for name, (text, message) in _bad_yaml(tmp_path).items():
        f = tmp_path / f"{name}.yaml"
        f.write_text(text)
        start = time.perf_counter()
        with pytest.raises(ConfigError) as e:
            build_model(f)
        assert time.perf_counter() - start < 2, name
        assert str(e.value).startswith(str(f)) and message in str(e.value), (name, str(e.value))
    big = tmp_path / "big.yaml"
    big.write_text("model:\n  params:\n" + "".join(f"    k{i}: {'x' * 40}\n" for i in range(1_000_000)))
    assert big.stat().st_size > 50e6
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="config file is too large") as e:
        build_model(big)
    assert time.perf_counter() - start < 2 and str(e.value).startswith(str(big))
    params = "vocab_size: 64, num_layers: 1, ffn_hidden_size: 8, max_seq_len: 16"
    for name, (values, message) in {
        "env": ("hidden_size: '${oc.env:MIMO_SPEC_SURELY_UNSET_VAR}', num_heads: 2", "'MIMO_SPEC_SURELY_UNSET_VAR' not found"),
        "loop": ("hidden_size: '${model.params.num_heads}', num_heads: '${model.params.hidden_size}'",
                 "Recursive interpolation detected"),
    }.items():
        f = tmp_path / f"{name}.yaml"
        f.write_text(f"model:\n  module: gpt\n  params: {{{params}, {values}}}\n")
        with pytest.raises(ConfigError) as e:
            build_model(f)
        assert str(e.value).startswith("model.params.hidden_size: ") and message in str(e.value), str(e.value)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("model:\n  module: gpt  # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"{latin}: not UTF-8 text"):
        build_model(latin)
    fifo = tmp_path / "fifo.yaml"
    import os

    os.mkfifo(fifo)  # reading it would block forever
    with pytest.raises(ConfigError, match="not a regular file"):
        build_model(fifo)


def test_bad_yaml_in_a_config_dir_is_blamed_on_its_file_only(tmp_path):
    """--config-dir with a primary config, plus a broken file the run never loads (sorted first)."""
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "aaa_broken.yaml").write_text("module: gpt\nparams: {\n")  # never loaded
    for name, (text, message) in _bad_yaml(tmp_path).items():
        (conf / "run.yaml").write_text(text)
        start = time.perf_counter()
        code, out, err = run_cli_in_process(["--config-dir", str(conf), "--config-name", "run", "action=validate"],
                                            tmp_path)
        assert time.perf_counter() - start < 5, name
        assert code == 2 and "Traceback" not in err, (name, err)
        assert f"{conf / 'run.yaml'}:" in err and message in err and "aaa_broken" not in err, (name, err)


def test_hydra_flags_that_unpickle_or_import_are_refused(tmp_path):
    """--experimental-rerun unpickles the file it names; --config-path pkg://X imports X: both refused
    before Hydra looks at them (the pickle would touch its marker)."""
    marker = tmp_path / "m_rerun"
    (tmp_path / "config.pickle").write_bytes(pickle.dumps(_Touch(marker)))
    code, _, err = run_cli_in_process(["--experimental-rerun", str(tmp_path / "config.pickle")], tmp_path)
    assert code == 2 and "--experimental-rerun: refused" in err and "Traceback" not in err, err
    assert not marker.exists()
    assert "mimo_spec_never_imported_pkg" not in sys.modules
    for args in (["--config-path", "pkg://mimo_spec_never_imported_pkg"], ["-cp=pkg://mimo_spec_never_imported_pkg"]):
        code, _, err = run_cli_in_process([*args, "action=validate"], tmp_path)
        assert code == 2 and "a pkg:// config path imports that package" in err, err


def test_a_checkpoints_own_allow_imports_is_not_trusted(tmp_path):
    """A state.json is a file from disk: the imports it allows need this command's allow_imports."""
    import json

    from conftest import tiny_config

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg = tiny_config(allow_imports=["mimo_spec_evil_pkg"], data={"source": "synthetic"})
    cfg["modalities"]["images"]["submodules"]["input_projections"]["clip"]["module"] = "mimo_spec_evil_pkg.Proj"
    (ckpt / "state.json").write_text(json.dumps({"step": 1, "config": cfg}))
    pkg = tmp_path / "mimo_spec_evil_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"import pathlib\npathlib.Path({str(tmp_path / 'm_import')!r}).touch()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        for action in ("eval", "generate"):
            code, _, err = run_cli_in_process([f"action={action}", f"{action}.checkpoint={ckpt}"], tmp_path)
            assert code == 2 and "allow_imports: the checkpoint's config imports mimo_spec_evil_pkg" in err, err
            assert not (tmp_path / "m_import").exists()
    finally:
        sys.path.remove(str(tmp_path))


def test_images_are_decoded_only_by_pillows_own_raster_formats(tmp_path):
    """An EPS file named .png would make Pillow run Ghostscript: refused as a data error."""
    from PIL import Image

    from mimo_spec.errors import DataError
    from mimo_spec.data.preprocess import load_image

    (tmp_path / "evil.png").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(DataError, match="cannot read image"):
        load_image(tmp_path / "evil.png", "generate.images.0")
    Image.new("RGB", (5, 3)).save(tmp_path / "ok.png")
    assert load_image(tmp_path / "ok.png").size == (5, 3)


# --- interpolation bombs and command-line values Hydra's parser cannot take (issue #13 red team) ---
def _bomb_files(tmp: Path) -> None:
    conf = tmp / "conf" / "modality"
    conf.mkdir(parents=True, exist_ok=True)
    refs = lambda i: "[" + ",".join([f"'${{l{i - 1}}}'"] * 10) + "]"  # noqa: E731
    (conf / "ibomb.yaml").write_text("# @package _global_\nl0: [1,1,1,1,1,1,1,1,1,1]\n"
                                     + "".join(f"l{i}: {refs(i)}\n" for i in range(1, 10)))
    (conf / "sbomb.yaml").write_text("# @package _global_\ns0: ab\n"
                                     + "".join(f"s{i}: '${{s{i - 1}}}${{s{i - 1}}}'\n" for i in range(1, 40)))
    # oc.decode reads an escaped interpolation: the escape hides nothing from the count
    (conf / "decode.yaml").write_text("# @package _global_\nl0: [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"l{i}: [" + ",".join([f"'${{oc.decode:\"\\${{l{i - 1}}}\"}}'"] * 10) + "]\n" for i in range(1, 8)))


def test_interpolation_bombs_are_refused_in_seconds(tmp_path):
    """Each of these kept OmegaConf resolving for hours; each is refused, naming the key, in seconds."""
    _bomb_files(tmp_path)
    search = f"hydra.searchpath=[file://{tmp_path}/conf]"
    cmd_line = ["+l0=[1,1,1,1,1,1,1,1,1,1]"] + [
        f"+l{i}=[" + ",".join([f"${{l{i - 1}}}"] * 10) + "]" for i in range(1, 7)]
    for args, where, what in (
            ([search, "modality=[vision_clip,ibomb]"], "l4:", "expands to more than 50,000 values"),
            ([search, "modality=[vision_clip,sbomb]"], "s16:", "expands to more than 50,000 values"),
            ([search, "modality=[vision_clip,decode]"], "l4:", "expands to more than 50,000 values"),
            (cmd_line, "l4:", "expands to more than 50,000 values")):
        start = time.monotonic()
        code, _, err = run_cli_in_process(["action=validate", *args], tmp_path)
        took = time.monotonic() - start
        assert code == 2 and where in err and what in err and "Traceback" not in err, err
        assert took < 10, (args[-1], took)
    # the routes that skip YAML files: a dict to build_model, a checkpoint's recorded config (state.json)
    from mimo_spec import build_model
    from mimo_spec.config import compose_config
    from omegaconf import OmegaConf

    bomb = {"b0": [1] * 10, **{f"b{i}": [f"${{b{i - 1}}}"] * 10 for i in range(1, 10)}}
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"b4: expands to more than 50,000 values"):
        build_model({**OmegaConf.to_container(compose_config([]), resolve=True), **bomb})
    assert time.monotonic() - start < 10
    run = tmp_path / "run"
    code, _, err = run_cli_in_process(["train.steps=2", "train.checkpoint.every=2", "train.eval_every=0",
                                       "data.num_samples=16", "data.eval_samples=4", f"hydra.run.dir={run}"], tmp_path)
    assert code == 0, err
    state = run / "checkpoints" / "step_000002" / "state.json"
    recorded = json.loads(state.read_text())
    recorded["config"].update(bomb)
    state.write_text(json.dumps(recorded))
    start = time.monotonic()
    code, _, err = run_cli_in_process(["action=eval", f"eval.checkpoint={run}", f"hydra.run.dir={tmp_path / 'ev'}"],
                                      tmp_path)
    assert code == 2 and "b4: expands to more than 50,000 values" in err and "Traceback" not in err, err
    assert time.monotonic() - start < 20


def test_expansion_counts_references_without_resolving():
    """The count follows absolute, relative and resolver references; a config that uses references
    in moderation passes, a cycle is left to OmegaConf (no endless recursion here)."""
    from mimo_spec.safe_yaml import MAX_NODES, check_expansion

    ok = {"model": {"dim": 64, "heads": "${.dim}", "ffn": "${oc.select:model.dim,1}"},
          "enc": {"dim": "${..model.dim}", "all": "${model}", "names": "${oc.dict.keys:model}"},
          "paths": [f"/data/{i}.jsonl" for i in range(2000)], "copy": "${paths}", "cycle": "${cycle}"}
    check_expansion(ok)
    big = {"base": list(range(MAX_NODES // 10)), "refs": ["${base}"] * 11}
    with pytest.raises(ConfigError, match="expands to more than") as e:
        check_expansion(big)
    assert e.value.problems[0].path == "refs"
    rel = {"a": {"base": list(range(MAX_NODES // 10)), "refs": ["${..base}"] * 11}}  # ${..x} from a list item
    with pytest.raises(ConfigError, match="expands to more than"):
        check_expansion(rel)
    text = {"s": "x" * 1_000_000, "t": "${s}" * 11}
    with pytest.raises(ConfigError, match="characters once its interpolations are followed") as e:
        check_expansion(text)
    assert e.value.problems[0].path == "t"
    # oc.decode parses what its argument resolves to: '$' and '{l0}' join into ${l0}
    joined = {"dollar": "$", "l0": list(range(10))}
    for i in range(1, 6):
        joined[f"k{i}"] = f"{{l{i - 1}}}"
        joined[f"l{i}"] = [f"${{oc.decode:${{dollar}}${{k{i}}}}}"] * 10
    from omegaconf import OmegaConf

    assert OmegaConf.to_container(OmegaConf.create(joined).l2, resolve=True)[0][0] == list(range(10))
    with pytest.raises(ConfigError, match="expands to more than") as e:
        check_expansion(joined)
    assert e.value.problems[0].path == "l4"


def test_command_line_values_hydra_cannot_parse_are_refused_before_it_tries(tmp_path):
    """A 120 KB list took Hydra's override parser minutes; 100 levels of nesting ended in a RecursionError."""
    for arg, what in (("+b0=[" + ",".join(["1"] * 60_000) + "]", "+b0=...: the override is 120,005 characters long"),
                      ("+b0=[" + ",".join(["1"] * 8_000) + "]", "+b0=...: the override holds 7,999 values"),
                      ("+x=" + "{a:" * 100 + "1" + "}" * 100, "+x=...: the value is nested 100 levels deep"),
                      ("+x=" + "[" * 100 + "1" + "]" * 100, "+x=...: the value is nested 100 levels deep")):
        start = time.monotonic()
        code, _, err = run_cli_in_process(["action=validate", arg], tmp_path)
        assert code == 2 and f"overrides: {what}" in err and "Traceback" not in err, err
        assert time.monotonic() - start < 5
    # a long list of paths and a quoted value with brackets are ordinary use
    paths = ",".join(f"/data/shards/part_{i:05d}.jsonl" for i in range(500))
    code, out, err = run_cli_in_process(["action=validate", f"+extra_files=[{paths}]",
                                         "+note='[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[['"], tmp_path)
    assert code == 0 and "config is valid" in out, err
