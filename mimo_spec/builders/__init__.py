"""Builders: specs in, nn.Modules out. One path: bind (validate) then build."""

from mimo_spec.builders.build import build_model, build_module, validate_spec

__all__ = ["build_model", "build_module", "validate_spec"]
