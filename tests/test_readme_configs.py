"""The README's config files, written out as a reader copies them (each block names its path,
``# my_conf/<group>/<name>.yaml``), compose and build; and a package directive Hydra would not read
is a config error naming the file and line (the README's own presets had one below a comment, which
Hydra silently ignores: "Could not override 'model@preset.model'")."""

import re

import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from mimo_spec.config import compose_config
from mimo_spec.errors import ConfigError

_BLOCK = re.compile(r"```yaml\n(.*?)```", re.S)
_PATH = re.compile(r"^# (my_conf/(\w+)/(\w+)\.yaml)", re.M)


def readme_configs() -> list[tuple[str, str, str, str]]:
    """(relative path, group, name, text) of every README YAML block that names its file."""
    found = []
    for block in _BLOCK.findall((ROOT / "README.md").read_text()):
        m = _PATH.search(block)
        if m:
            found.append((m.group(1), m.group(2), m.group(3), block))
    return found


def test_readme_config_files_compose_and_build(tmp_path):
    from mimo_spec.builders import build_model
    from mimo_spec.parallel.layout import resolve

    configs = readme_configs()
    groups = {group for _, group, _, _ in configs}
    assert {"preset", "modality", "parallel"} <= groups, groups  # the README shows all three kinds
    for rel, _, _, text in configs:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    search = f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"
    for rel, group, name, text in configs:
        if group == "preset":
            cfg = compose_config([search, f"preset={name}"])
            # the preset's own keys reached the top level (its package directive was read)
            assert "preset" not in cfg, rel
            model = build_model(cfg)
            assert sum(p.numel() for p in model.parameters()) > 0
            if "experts" in text:
                assert cfg.model.params.num_experts > 1, rel
        elif group == "modality":
            cfg = compose_config([search, f"modality=[vision_clip,{name}]"])
            package = re.search(r"^# @package modalities\.(\w+)", text, re.M).group(1)
            assert package in cfg.modalities, rel
            model = build_model(cfg)
            assert package in model.modalities
        else:
            cfg = compose_config([search, f"parallel={name}"])
            assert cfg.parallel.name == name, rel
            sp = cfg.parallel.get("modules", {}).get("language", {}).get("sp")
            if sp:  # a layout for a model whose heads sp divides (it says so)
                cfg = compose_config([search, f"parallel={name}", "model.params.num_kv_heads=4",
                                      "model.params.num_heads=8"])
            layout = resolve(OmegaConf.to_container(cfg.parallel, resolve=True), build_model(cfg, device="meta"), 8,
                             train={"batch_size": 8})
            assert layout.modules["language"].sp == (sp or 1), rel


@pytest.mark.parametrize("before", ["# my_conf/preset/p.yaml\n", "defaults:\n  - _self_\n"])
def test_a_package_directive_hydra_would_not_read_names_the_file_and_line(tmp_path, cli, before):
    conf = tmp_path / "my_conf" / "preset"
    conf.mkdir(parents=True)
    (conf / "p.yaml").write_text(before + "# @package _global_\ntrain: {steps: 2}\n")
    with pytest.raises(ConfigError) as e:
        compose_config([f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "preset=p"])
    line = before.count("\n") + 1
    assert f"p.yaml: line {line}, '# @package _global_', is not read" in str(e.value)
    assert "make it the file's first line" in str(e.value)
    r = cli(f"--config-dir={tmp_path / 'my_conf'}", "preset=p", "action=validate")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"p.yaml: line {line}, '# @package _global_', is not read" in r.stderr
    # first, the same file composes, its keys at the top level
    (conf / "p.yaml").write_text("# @package _global_\n" + before.replace("defaults:\n  - _self_\n", "")
                                 + "train: {steps: 2}\n")
    assert compose_config([f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "preset=p"]).train.steps == 2
