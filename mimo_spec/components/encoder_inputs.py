"""The checks every single-input encoder makes on its ``modality_inputs`` entry."""

from __future__ import annotations

import torch

from mimo_spec.errors import InputError, join_path


def the_only_input(inputs: dict, name: str, path: str, expected: str, hint: str) -> tuple[torch.Tensor, str]:
    """``inputs[name]`` as a floating-point tensor, and its path; anything else is an InputError.

    ``expected`` describes the shape for the message; ``hint`` says how to fix a wrong dtype.
    """
    for key in inputs:
        if key != name:
            raise InputError(f"unexpected input {key!r}", path=join_path(path, key),
                             hint=f"this encoder takes only {name}")
    where = join_path(path, name)
    if name not in inputs:
        raise InputError(f"missing input {name!r}", path=where, hint=f"got {sorted(inputs)}")
    x = inputs[name]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise InputError(f"{expected} as a floating-point tensor, got {type(x).__name__}"
                         f"{'' if not isinstance(x, torch.Tensor) else ' of ' + str(x.dtype)}", path=where, hint=hint)
    return x, where
