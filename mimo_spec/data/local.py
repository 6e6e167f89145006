"""Local files the data path reads: user paths, and Hugging Face folders that must not run their own code.

A leaf module (standard library only; Hydra is asked for its original working directory when it runs).
"""

from __future__ import annotations

from pathlib import Path

# Files of a Hugging Face folder whose ``auto_map`` makes transformers import code from the folder.
REMOTE_CODE_FILES = ("tokenizer_config.json", "config.json", "processor_config.json", "preprocessor_config.json")


def remote_code_request(directory: Path) -> str:
    """Where a Hugging Face folder asks transformers to run its own code (``"config.json: auto_map
    AutoTokenizer -> tok.MyTok"``), or "" when it does not. Read as JSON only: nothing is imported."""
    import json

    for name in REMOTE_CODE_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # unreadable: transformers' own loading reports it
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            shown = ", ".join(f"{k} -> {v}" for k, v in auto_map.items()) if isinstance(auto_map, dict) else auto_map
            return f"{name}: auto_map {shown}"
    return ""


def resolve_path(path: str | Path) -> Path:
    """A user path: ``~`` expanded; relative paths against the directory the run was started in.

    Hydra may change the working directory, so its original one is used when it runs.
    """
    p = Path(str(path)).expanduser()
    if p.is_absolute():
        return p
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import get_original_cwd

        if HydraConfig.initialized():
            return Path(get_original_cwd()) / p
    except Exception:  # Hydra not running (tests, Python API)
        pass
    return Path.cwd() / p
