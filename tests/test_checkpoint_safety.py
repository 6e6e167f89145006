"""Checkpoint folders never run code, and a damaged multi-process (DCP) checkpoint falls back like a
single-process one. Every crafted file here is live: the control step shows that Python's own
unpickler (or torch's DCP planner) would write the marker file; mimo-spec must not."""

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mimo_spec import build_model
from mimo_spec.config import compose_config
from mimo_spec.errors import CheckpointError
from mimo_spec.train.checkpoint import _canonical_states, list_checkpoints, load_checkpoint
from mimo_spec.train.loop import train
from mimo_spec.train.optim import build_optimizer
from mimo_spec.train.schema import validate_train_config

from test_bad_inputs import run_cli_in_process

SMALL = ["data.num_samples=128", "data.eval_samples=8", "train.eval_every=0", "train.log_every=100000",
         "train.num_threads=1"]
RUN = [*SMALL, "train.steps=4", "train.checkpoint.every=2", "train.checkpoint.keep_last=3"]


class _Call:
    """Pickles as ``fn(*args)``: whatever unpickles it calls ``fn``."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _model_and_optimizer():
    cfg = compose_config(SMALL)
    model = build_model(cfg)
    return model, build_optimizer(model, validate_train_config(cfg.train))


def _to_dcp(src: Path, dst: Path, tamper=None) -> Path:
    """Rewrite single-process checkpoint ``src`` as the DCP folder a multi-process run writes
    (``.metadata`` + ``__0_0.distcp`` + rng.safetensors + state.json with ``"format": "dcp"``)."""
    model, opt = _model_and_optimizer()
    state = load_checkpoint(src, model, opt)
    msd, osd = _canonical_states(model, opt, {})
    if tamper:
        tamper(msd, osd)
    import torch.distributed.checkpoint as dcp

    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(dst), no_dist=True)
    shutil.copy(src / "rng.safetensors", dst / "rng.safetensors")
    state.pop("optimizer")
    (dst / "state.json").write_text(json.dumps({**state, "format": "dcp"}))
    return dst


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A single-process run with checkpoints at steps 2 and 4, and the same two as DCP folders."""
    base = tmp_path_factory.mktemp("ckpt")
    train(compose_config(RUN), base / "run")
    dcp_run = base / "dcp_run"
    (dcp_run / "checkpoints").mkdir(parents=True)
    for ckpt in list_checkpoints(base / "run" / "checkpoints"):
        _to_dcp(ckpt, dcp_run / "checkpoints" / ckpt.name)
    return base


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _payloads(marker: Path):
    """(name, bytes) of pickles that write ``marker`` when unpickled."""
    m = str(marker)
    touch = f"open({m!r}, 'w').close()"
    yield "os.system", pickle.dumps(_Call(os.system, f"touch {m}"))  # pickles as posix.system
    yield "os.system by name (protocol 0)", b"cos\nsystem\n(Vtouch " + m.encode() + b"\ntR."
    yield "builtins.eval", pickle.dumps(_Call(eval, touch))
    yield "builtins.exec", pickle.dumps(_Call(exec, touch))
    yield "subprocess.call", pickle.dumps(_Call(subprocess.call, ["touch", m]))
    yield "getattr(__import__('os'), 'system')", (
        b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(Vtouch " + m.encode() + b"\ntR.")
    yield "torch.load(weights_only=False) of a file", (  # torch.load(path, None, pickle): not weights_only
        b"ctorch\nload\n(V" + m.encode() + b".pt\nNcbuiltins\n__import__\n(Vpickle\ntRtR.")


def _nested_payloads(real_metadata: bytes, marker: Path):
    """A real DCP Metadata object with a reducer hidden inside it, at several depths."""
    def evil():
        return _Call(open, str(marker), "w")

    def in_state_dict_metadata(md):
        key = next(iter(md.state_dict_metadata))
        md.state_dict_metadata[key] = evil()

    def in_a_chunk(md):
        entry = next(v for v in md.state_dict_metadata.values() if hasattr(v, "chunks"))
        entry.chunks[0].offsets = evil()

    def in_tensor_properties(md):
        entry = next(v for v in md.state_dict_metadata.values() if hasattr(v, "chunks"))
        entry.properties.dtype = evil()

    def in_storage_meta(md):
        md.storage_meta.modules = [evil()]

    def in_planner_data(md):
        md.planner_data[next(iter(md.planner_data))] = evil()

    def as_storage_info(md):
        key = next(iter(md.storage_data))
        md.storage_data[key] = evil()

    for fn in (in_state_dict_metadata, in_a_chunk, in_tensor_properties, in_storage_meta, in_planner_data,
               as_storage_info):
        md = pickle.loads(real_metadata)  # our own file, written just now by DCP
        fn(md)
        yield f"nested reducer {fn.__name__}", pickle.dumps(md)


def _all_payloads(real_metadata: bytes, marker: Path):
    yield from _payloads(marker)
    yield from _nested_payloads(real_metadata, marker)


def test_crafted_dcp_metadata_never_runs_code(trained, tmp_path):
    good = trained / "dcp_run" / "checkpoints" / "step_000002"
    real = (good / ".metadata").read_bytes()
    control, marker = tmp_path / "control", tmp_path / "marker"
    torch.save({"x": _Call(open, str(control), "w")}, str(control) + ".pt")
    torch.save({"x": _Call(open, str(marker), "w")}, str(marker) + ".pt")
    names = []
    for (name, live), (_, payload) in zip(_all_payloads(real, control), _all_payloads(real, marker)):
        names.append(name)
        control.unlink(missing_ok=True)
        try:  # control: Python's unpickler (what DCP's reader uses) runs it
            pickle.loads(live)
        except Exception:  # noqa: BLE001 - some payloads fail after having run
            pass
        assert control.exists(), f"{name}: the crafted file is not live"
        ckpt = _copy(good, tmp_path / f"c{len(names)}")
        (ckpt / ".metadata").write_bytes(payload)
        for optimizer in (False, True):
            model, opt = _model_and_optimizer()
            with pytest.raises(CheckpointError) as e:
                load_checkpoint(ckpt, model, opt if optimizer else None)
            assert str(ckpt / ".metadata") in str(e.value), (name, str(e.value))
            assert not marker.exists(), name
    assert len(names) == 13


def test_dcp_folders_are_ours_or_refused(trained, tmp_path):
    """Only state.json's format marks a folder as DCP; metadata that points outside the folder, at a
    non-file, or at a truncated shard is refused; a real DCP folder still loads, bit for bit."""
    single = trained / "run" / "checkpoints" / "step_000002"
    good = trained / "dcp_run" / "checkpoints" / "step_000002"
    marker = tmp_path / "marker"
    evil = pickle.dumps(_Call(os.system, f"touch {marker}"))

    # a stray .metadata in a single-process folder is never read: the folder loads as single-process
    stray = _copy(single, tmp_path / "stray")
    (stray / ".metadata").write_bytes(evil)
    ref, ref_opt = _model_and_optimizer()
    load_checkpoint(single, ref, ref_opt)
    model, opt = _model_and_optimizer()
    load_checkpoint(stray, model, opt)
    assert not marker.exists()
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k

    # the DCP copy of the same checkpoint loads (in one process) to the same weights and optimizer state
    model, opt = _model_and_optimizer()
    load_checkpoint(good, model, opt)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    want, got = ref_opt.state_dict(), opt.state_dict()
    for idx, s in want["state"].items():
        for name, value in s.items():
            assert torch.equal(got["state"][idx][name], value), (idx, name)
    assert [g["lr"] for g in got["param_groups"]] == [g["lr"] for g in want["param_groups"]]

    # state.json says dcp, .metadata is missing: damaged, not single-process
    missing = _copy(good, tmp_path / "missing")
    (missing / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="says it is a DCP folder but it has no .metadata"):
        load_checkpoint(missing, *_model_and_optimizer())
    (missing / "state.json").write_text(json.dumps({**json.loads((missing / "state.json").read_text()),
                                                    "format": "pickle"}))
    with pytest.raises(CheckpointError, match="unknown checkpoint format 'pickle'"):
        load_checkpoint(missing, *_model_and_optimizer())

    # shard names from the metadata must be plain files inside the folder
    md = pickle.loads((good / ".metadata").read_bytes())
    shard = (good / "__0_0.distcp").read_bytes()
    (tmp_path / "outside.distcp").write_bytes(shard)
    for name in ("../outside.distcp", str(tmp_path / "outside.distcp"), ".metadata", "/dev/zero"):
        bad = _copy(good, tmp_path / f"path{len(list(tmp_path.iterdir()))}")
        for info in md.storage_data.values():
            info.relative_path = name
        (bad / ".metadata").write_bytes(pickle.dumps(md))
        with pytest.raises(CheckpointError, match="is not a plain file name inside the checkpoint folder") as e:
            load_checkpoint(bad, *_model_and_optimizer())
        assert str(bad / ".metadata") in str(e.value)

    # a FIFO (or device) would block the reader: refused before it is opened
    fifo = _copy(good, tmp_path / "fifo")
    (fifo / "__0_0.distcp").unlink()
    os.mkfifo(fifo / "__0_0.distcp")
    with pytest.raises(CheckpointError, match="shard file is not a regular file"):
        load_checkpoint(fifo, *_model_and_optimizer())
    (fifo / ".metadata").unlink()
    os.mkfifo(fifo / ".metadata")
    with pytest.raises(CheckpointError, match="metadata file is not a regular file"):
        load_checkpoint(fifo, *_model_and_optimizer())


def test_non_tensor_items_of_a_dcp_checkpoint_are_never_unpickled_freely(trained, tmp_path):
    """DCP itself writes any non-tensor value with torch.save; its planner reads it back with
    torch.load(weights_only=False). A checkpoint whose optimizer hyper-parameter is an object that
    writes a file when unpickled is refused."""
    import torch.distributed.checkpoint as dcp

    src = trained / "run" / "checkpoints" / "step_000002"
    control, marker = tmp_path / "control", tmp_path / "marker"

    def tamper(target):
        def fn(msd, osd):
            key = next(k for k in osd if k.startswith("param_groups.") and k.endswith(".lr"))
            osd[key] = _Call(open, str(target), "w")
        return fn

    live = _to_dcp(src, tmp_path / "live", tamper(control))
    model, opt = _model_and_optimizer()
    msd, osd = _canonical_states(model, opt, {})
    dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=str(live))  # control: torch's own planner runs it
    assert control.exists()

    evil = _to_dcp(src, tmp_path / "evil", tamper(marker))
    with pytest.raises(CheckpointError, match="cannot read distributed checkpoint") as e:
        load_checkpoint(evil, *_model_and_optimizer())
    assert str(evil) in str(e.value) and "Traceback" not in str(e.value)
    assert "weights-only unpickler (Unsupported global: GLOBAL io.open" in str(e.value), str(e.value)
    assert "weights_only` set to `False`" not in str(e.value)  # torch's unsafe advice is not passed on
    assert not marker.exists()


def _damage(ckpt: Path, how: str) -> None:
    if how == "truncated .metadata":
        data = (ckpt / ".metadata").read_bytes()
        (ckpt / ".metadata").write_bytes(data[: len(data) // 2])
    elif how == "truncated shard":
        data = (ckpt / "__0_0.distcp").read_bytes()
        (ckpt / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    elif how == "missing shard":
        (ckpt / "__0_0.distcp").unlink()
    elif how == "garbage shard":  # right length, wrong bytes
        data = (ckpt / "__0_0.distcp").read_bytes()
        (ckpt / "__0_0.distcp").write_bytes(b"\x00" * len(data))
    elif how == "missing rng":
        (ckpt / "rng.safetensors").unlink()


DAMAGES = ["truncated .metadata", "truncated shard", "missing shard", "garbage shard", "missing rng"]


def test_a_damaged_newest_dcp_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, capsys):
    # the reference: resuming from the intact DCP step 2 (and from the single-process step 2)
    ref_run = _copy(trained / "dcp_run", tmp_path / "ref")
    shutil.rmtree(ref_run / "checkpoints" / "step_000004")
    ref = train(compose_config([*RUN, "train.steps=5"]), ref_run)
    sp_run = _copy(trained / "run", tmp_path / "sp")
    shutil.rmtree(sp_run / "checkpoints" / "step_000004")
    assert train(compose_config([*RUN, "train.steps=5"]), sp_run)["final_loss"] == pytest.approx(ref["final_loss"])
    capsys.readouterr()
    for how in DAMAGES:
        run = _copy(trained / "dcp_run", tmp_path / how.replace(" ", "_"))
        newest = run / "checkpoints" / "step_000004"
        _damage(newest, how)
        result = train(compose_config([*RUN, "train.steps=5"]), run)
        out = capsys.readouterr().out
        assert f"warning: skipping damaged checkpoint {newest}" in out, (how, out)
        assert f"resumed from {run / 'checkpoints' / 'step_000002'} at step 2" in out, (how, out)
        assert result["final_loss"] == pytest.approx(ref["final_loss"]), how

    # every checkpoint damaged: a clear error, never training on from a half-loaded model
    run = _copy(trained / "dcp_run", tmp_path / "all")
    _damage(run / "checkpoints" / "step_000004", "truncated shard")
    _damage(run / "checkpoints" / "step_000002", "truncated .metadata")
    with pytest.raises(CheckpointError, match="every checkpoint is damaged") as e:
        train(compose_config([*RUN, "train.steps=5"]), run)
    assert "step_000002" in str(e.value) and "step_000004" in str(e.value)
    assert len(list_checkpoints(run / "checkpoints")) == 2  # nothing was written


def test_the_cli_refuses_crafted_checkpoint_folders(trained, tmp_path):
    """action=eval, action=generate and train.resume on a folder with a crafted .metadata: exit 2,
    no traceback, no marker; a stray .metadata in a single-process folder is ignored."""
    marker = tmp_path / "marker"
    evil = pickle.dumps(_Call(os.system, f"touch {marker}"))
    dcp_ckpt = _copy(trained / "dcp_run" / "checkpoints" / "step_000004", tmp_path / "dcp" / "step_000004")
    (dcp_ckpt / ".metadata").write_bytes(evil)
    stray = _copy(trained / "run" / "checkpoints" / "step_000004", tmp_path / "stray" / "step_000004")
    (stray / ".metadata").write_bytes(evil)
    cases = [["action=eval", f"eval.checkpoint={dcp_ckpt}"],
             ["action=generate", f"generate.checkpoint={dcp_ckpt}", "generate.prompt=hi", "generate.max_new_tokens=2"],
             [*RUN, "train.steps=6", f"train.resume={dcp_ckpt}"]]
    for i, args in enumerate(cases):
        code, out, err = run_cli_in_process([*args, f"hydra.run.dir={tmp_path / f'out{i}'}"], tmp_path)
        assert code == 2, (args, out, err)
        assert err.startswith("mimo-spec: checkpoint error"), (args, err)
        assert str(dcp_ckpt / ".metadata") in err and "Traceback" not in err, err
        assert not marker.exists(), args
    for i, args in enumerate([["action=eval", f"eval.checkpoint={stray}"],
                              ["action=generate", f"generate.checkpoint={stray}", "generate.prompt=hi",
                               "generate.max_new_tokens=2"]]):
        code, out, err = run_cli_in_process([*args, f"hydra.run.dir={tmp_path / f'ok{i}'}"], tmp_path)
        assert code == 0, (args, err)
        assert not marker.exists(), args


DCP_SAVE = r"""
import sys, types
import torch, torch.distributed as dist
from omegaconf import OmegaConf
from mimo_spec import build_model
from mimo_spec.config import compose_config
from mimo_spec.errors import StorageError
from mimo_spec.train.checkpoint import save_distributed_checkpoint
from mimo_spec.train.optim import build_optimizer
from mimo_spec.train.schema import validate_train_config

ckpts, init = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
cfg = compose_config(%r)
model = build_model(cfg)
opt = build_optimizer(model, validate_train_config(cfg.train))
model(**model.example_inputs(batch_size=2)).loss.backward()
opt.step()
drun = types.SimpleNamespace(rank=0, world_size=1, fused={}, layout=types.SimpleNamespace(name="ddp"))
from pathlib import Path
save_distributed_checkpoint(Path(ckpts), 2, model, opt, {"data_position": 8}, 3, drun)
try:
    save_distributed_checkpoint(Path(ckpts), 4, model, opt, {"data_position": 16}, 3, drun)
except StorageError as e:
    print("STORAGE ERROR:", e)
dist.destroy_process_group()
"""


def test_a_full_disk_during_a_multi_process_save_is_a_clean_error(tmp_path):
    """save_distributed_checkpoint (a real gloo process group of one) on a real filesystem with room
    for one checkpoint: the second is a StorageError naming the last good one, and that one loads."""
    import sys

    from test_faults import CKPT_KB, _tmpfs

    from conftest import ROOT

    with _tmpfs(tmp_path / "disk", CKPT_KB + 2500) as disk:
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", DCP_SAVE % (SMALL,), str(disk / "ckpts"),
                            f"file://{tmp_path / 'pg'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert "STORAGE ERROR:" in r.stdout and "No space left on device" in r.stdout, r.stdout + r.stderr[-2000:]
        assert f"the last good checkpoint is {disk / 'ckpts' / 'step_000002'}" in r.stdout, r.stdout
        assert [p.name for p in (disk / "ckpts").iterdir()] == ["step_000002"]  # the temporary folder is gone
        state = json.loads((disk / "ckpts" / "step_000002" / "state.json").read_text())
        assert state["format"] == "dcp" and (disk / "ckpts" / "step_000002" / ".metadata").exists()
        model, opt = _model_and_optimizer()
        assert load_checkpoint(disk / "ckpts" / "step_000002", model, opt)["step"] == 2
