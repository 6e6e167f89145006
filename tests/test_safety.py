"""Loading configs and checkpoints never runs code the user did not ask for."""

import pickle

import pytest
import torch

from mimo_spec import build_model
from mimo_spec.errors import ConfigError, InputError
from mimo_spec.registry import resolve

from conftest import tiny_config
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
