"""Loading configs and checkpoints never runs code the user did not ask for."""

import json
import pickle
import subprocess
import sys

import pytest
import torch

from mimo_spec import build_model
from mimo_spec.errors import ConfigError, InputError
from mimo_spec.registry import resolve

from conftest import ROOT, tiny_config
from test_bad_inputs import run_cli_in_process


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_pickle_checkpoint_is_refused(tmp_path):
    from mimo_spec.weights import load_weights

    marker = tmp_path / "pwned"
    model = build_model(tiny_config())
    for name in ("model.safetensors", "model.pt"):
        evil = tmp_path / name
        with open(evil, "wb") as f:
            pickle.dump({"language_model.token_embedding.weight": _Exploit(marker)}, f)
        with pytest.raises(InputError, match="not a safetensors file"):
            load_weights(model, evil)
    torch.save({"x": _Exploit(marker)}, tmp_path / "evil.pt")  # the torch format too
    with pytest.raises(InputError):
        load_weights(model, tmp_path / "evil.pt")
    assert not marker.exists()


def test_yaml_cannot_construct_objects(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError):
        build_model(evil)
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    (conf / "evil.yaml").write_text(f"module: !!python/object/apply:os.system ['touch {marker}']\n")
    code, _, err = run_cli_in_process(["action=validate", f"hydra.searchpath=[file://{tmp_path}/conf]", "model=evil"],
                                      tmp_path)
    assert code == 2 and "Traceback" not in err
    assert not marker.exists()


@pytest.mark.parametrize("target", ["os.system", "subprocess.Popen", "builtins.eval", "builtins.exec",
                                    "posix.system", "importlib.import_module", "pickle.loads", "shutil.rmtree",
                                    "os.path.join", "sys.exit"])
def test_system_callables_are_refused_even_under_a_broad_allowlist(target):
    with pytest.raises(ConfigError, match="refusing to import"):
        resolve("encoder", target, allow_imports=[target.split(".")[0]])


def test_nothing_outside_the_registry_is_imported_by_default(tmp_path):
    cfg = tiny_config()
    cfg["modalities"]["images"]["submodules"]["encoders"]["clip"]["module"] = "json.JSONDecoder"
    with pytest.raises(ConfigError, match="not allowlisted"):
        build_model(cfg)
    cfg["allow_imports"] = ["json"]
    with pytest.raises(ConfigError, match="not an nn.Module class"):
        build_model(cfg)


def _remote_code_folder(folder, marker, where="tokenizer_config.json"):
    """A Hugging Face folder whose ``auto_map`` points at a module in the folder that writes ``marker``."""
    folder.mkdir()
    (folder / "tok_code.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                        "from transformers import PreTrainedTokenizer\n"
                                        "class MyTok(PreTrainedTokenizer):\n    pass\n"
                                        "class MyConfig:\n    pass\n")
    (folder / "vocab.json").write_text('{"a": 0}')
    auto_map = {"AutoTokenizer": ["tok_code.MyTok", None], "AutoConfig": "tok_code.MyConfig"}
    content = {"tokenizer_class": "MyTok", "model_type": "llama", "auto_map": auto_map}
    (folder / where).write_text(json.dumps(content))
    return folder


def test_remote_code_in_a_tokenizer_or_checkpoint_folder_is_refused_without_a_prompt(tmp_path):
    """A tokenizer folder (auto_map in tokenizer_config.json or config.json) or a checkpoint's config.json
    asking for its own code is refused, and no code from the folder runs. Jobs have no terminal: with
    stdin a pipe that never answers, nothing waits on a "Do you wish to run the custom code?" prompt,
    even past mimo-spec's own check (transformers is always given trust_remote_code=False)."""
    marker = tmp_path / "ran"
    tok = _remote_code_folder(tmp_path / "tok", marker)
    tok2 = _remote_code_folder(tmp_path / "tok2", marker, where="config.json")
    ckpt = _remote_code_folder(tmp_path / "ckpt", marker, where="config.json")
    script = f"""
import mimo_spec.data.tokenizer as T
from mimo_spec.errors import MimoError
from mimo_spec.interop.hf_import import _auto_config, import_hf
for folder in ({str(tok)!r}, {str(tok2)!r}):
    try:
        T.HFTokenizer(folder)
    except MimoError as e:
        print("SCAN", e.problems[0].path, "asks to run code" in str(e))
try:
    import_hf({str(ckpt)!r})
except MimoError as e:
    print("IMPORT", e.kind, e.problems[0].path.endswith("config.json"), "auto_map" in str(e))
# past mimo-spec's own check: transformers itself must refuse, without asking
T.remote_code_request = lambda d: ""
try:
    T.HFTokenizer({str(tok)!r})
except MimoError as e:
    print("NOSCAN", e.problems[0].path, "trust_remote_code" in str(e))
from pathlib import Path
print("NOSCAN-CONFIG", type(_auto_config(Path({str(ckpt)!r}))).__name__)  # the shipped class, not the folder's
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=90)  # stdin stays open and silent: a prompt would hang here
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "Do you wish" not in out and "[y/N]" not in out, out
    assert [line for line in out.splitlines() if line.split(" ")[0].isupper()] == [
        "SCAN data.tokenizer True", "SCAN data.tokenizer True", "IMPORT checkpoint True True",
        "NOSCAN data.tokenizer True", "NOSCAN-CONFIG LlamaConfig"], out
    # the CLI, as a job runs it: stdin a pipe nobody writes to
    cli = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "action=validate", f"data.tokenizer={tok}"],
                           cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        out, err = cli.communicate(timeout=90)
    finally:
        cli.kill()
    assert cli.returncode == 2, err
    assert "data.tokenizer:" in err and "auto_map" in err and "Traceback" not in err and "Do you wish" not in out
    assert not marker.exists()


def test_a_shard_index_naming_a_file_outside_its_folder_is_refused(tmp_path):
    """model.safetensors.index.json may only name shards inside its own folder: ``..``, absolute paths
    and the like are refused, naming the index file and the entry, before any file is opened."""
    from mimo_spec.errors import CheckpointError
    from mimo_spec.interop.hf_safetensors import HFCheckpoint, write_safetensors

    outside = tmp_path / "secret.safetensors"
    write_safetensors(outside, {"w": torch.zeros(2)})
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    write_safetensors(ckpt / "inside.safetensors", {"a": torch.zeros(2)})
    write_safetensors(ckpt / "sub" / "nested.safetensors", {"b": torch.zeros(2)})
    index = ckpt / "model.safetensors.index.json"
    for bad in ["../secret.safetensors", str(outside), "sub/../../secret.safetensors", "./../secret.safetensors",
                "..\\secret.safetensors", "C:\\secret.safetensors", "", 7]:
        index.write_text(json.dumps({"weight_map": {"a": "inside.safetensors", "lm_head.weight": bad}}))
        with pytest.raises(CheckpointError) as e:
            HFCheckpoint(ckpt)
        (problem,) = e.value.problems
        assert problem.path == str(index), bad
        assert "'lm_head.weight'" in problem.message and repr(bad) in problem.message, problem
    index.write_text(json.dumps({"weight_map": ["inside.safetensors"]}))
    with pytest.raises(InputError, match="weight_map is a JSON list"):
        HFCheckpoint(ckpt)
    # inside the folder, a sub-folder included, is fine
    index.write_text(json.dumps({"weight_map": {"a": "inside.safetensors", "b": "sub/nested.safetensors"}}))
    assert sorted(HFCheckpoint(ckpt).tensors) == ["a", "b"]
