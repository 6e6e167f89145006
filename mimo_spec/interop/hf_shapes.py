"""What shape a MimoModel has, for the per-family exporters (each asks whether the model is its family's)."""

from __future__ import annotations

from typing import Any


def single_tower(model, encoder_cls: type, projector_cls: type) -> tuple[str, Any, str, Any, Any] | None:
    """(modality name, modality, encoder name, encoder, projector) when the model has exactly one modality,
    with one encoder of ``encoder_cls`` whose projector is a ``projector_cls``; None otherwise (another
    family's shape: the next exporter is asked)."""
    if len(model.modalities) != 1:
        return None
    name, mod = next(iter(model.modalities.items()))
    if len(mod.encoders) != 1:
        return None
    enc_name, enc = next(iter(mod.encoders.items()))
    proj = mod.input_projections[enc_name] if enc_name in mod.input_projections else None
    if not isinstance(enc, encoder_cls) or not isinstance(proj, projector_cls):
        return None
    return name, mod, enc_name, enc, proj
