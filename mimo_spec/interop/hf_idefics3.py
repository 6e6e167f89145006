"""Hugging Face interop for the idefics3 family (being built for issue #17)."""

from __future__ import annotations

from typing import Any

from mimo_spec.errors import InputError


def import_conversion(config: Any, where: str):
    raise InputError(f"importing {config.model_type!r} is not built yet", path=where)


def export(model, spec, lm_params: dict, dtype, extras: dict):
    return None
