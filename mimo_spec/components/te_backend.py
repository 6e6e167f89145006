"""The transformer-engine layer backend (``backend: te``), CUDA only.

A block built with ``backend="te"`` keeps mimo-spec's attention core
(``scaled_dot_product_attention`` with RoPE from per-token positions, masks,
packed documents and the KV cache) and swaps the GEMMs for transformer-engine's
fused modules:

    attn_norm + attn.qkv  -> attn.qkv = te.LayerNormLinear   (norm fused into the QKV GEMM)
    attn.out              -> attn.out = te.Linear
    mlp_norm + mlp        -> mlp      = te.LayerNormMLP       (norm, fc1, activation, fc2)

Checkpoints never see transformer-engine's names: a te block's ``state_dict``
uses the local backend's keys (:data:`LOCAL_TO_TE` read backwards) and its
``load_state_dict`` accepts them, so a checkpoint moves between backends in
both directions, single-process and DCP alike. transformer-engine's
``_extra_state`` (FP8 scaling history) is not written: a resumed FP8 run
re-derives its scales within its amax history window. Parameter *order* is the
same in both backends, so optimizer state keyed by parameter index moves too.

Activations map onto transformer-engine's kernels (:data:`TE_ACTIVATIONS`);
exact-erf ``gelu`` has none (TE's ``gelu`` is the tanh approximation), so a
component with it resolves ``auto`` to local and refuses ``te``.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from mimo_spec.errors import ParamError

# mimo-spec activation -> transformer-engine LayerNormMLP activation, plain and gated (the
# gated ones apply the activation to the first half of fc1's output, as mimo-spec's swiglu does).
TE_ACTIVATIONS = {"gelu_tanh": "gelu", "quick_gelu": "qgelu", "silu": "silu", "relu": "relu"}
TE_GATED_ACTIVATIONS = {"gelu_tanh": "geglu", "quick_gelu": "qgeglu", "silu": "swiglu", "relu": "reglu"}

# The declared key mapping, relative to one block: local backend key -> transformer-engine key.
LOCAL_TO_TE = {
    "attn_norm.weight": "attn.qkv.layer_norm_weight",
    "attn_norm.bias": "attn.qkv.layer_norm_bias",
    "attn.qkv.weight": "attn.qkv.weight",
    "attn.qkv.bias": "attn.qkv.bias",
    "attn.out.weight": "attn.out.weight",
    "attn.out.bias": "attn.out.bias",
    "mlp_norm.weight": "mlp.layer_norm_weight",
    "mlp_norm.bias": "mlp.layer_norm_bias",
    "mlp.fc1.weight": "mlp.fc1_weight",
    "mlp.fc1.bias": "mlp.fc1_bias",
    "mlp.fc2.weight": "mlp.fc2_weight",
    "mlp.fc2.bias": "mlp.fc2_bias",
}
TE_TO_LOCAL = {te: local for local, te in LOCAL_TO_TE.items()}
TE_EXTRA_STATE = ("attn.qkv._extra_state", "attn.out._extra_state", "mlp._extra_state")


def te_unavailable_reason() -> str | None:
    """None when transformer-engine imports and CUDA is available, else what is missing."""
    if importlib.util.find_spec("transformer_engine") is None:
        return "transformer-engine is not installed (pip install 'mimo-spec[te]' on a CUDA machine)"
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as e:  # a broken install (e.g. no CUDA runtime) counts as absent
        return f"transformer-engine does not import here ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if not cuda_available():
        return "CUDA is not available"
    return None


def cuda_available() -> bool:
    return torch.cuda.is_available()


def te_activation(activation: str, gated: bool) -> str | None:
    """transformer-engine's name for ``activation`` (gated or not), or None when it has no kernel."""
    return (TE_GATED_ACTIVATIONS if gated else TE_ACTIVATIONS).get(activation)


def resolve_backend(backend: str, *, activation: str | None = None, gated: bool = False) -> str:
    """``local`` | ``te`` | ``auto`` -> the backend a component runs (``"local"`` or ``"te"``).

    ``auto`` picks te only where it can run: transformer-engine imports, CUDA is
    there, and the component's activation has a TE kernel. ``te`` where it cannot
    run is a ValueError saying why (the builder turns it into a config error naming
    the node).
    """
    if backend == "local":
        return "local"
    if backend not in ("te", "auto"):
        raise ParamError("backend", f"backend ({backend!r}) must be one of 'local', 'te', 'auto'")
    reason = te_unavailable_reason()
    if reason is None and activation is not None and te_activation(activation, gated) is None:
        kind = "gated " if gated else ""
        supported = ", ".join(TE_GATED_ACTIVATIONS if gated else TE_ACTIVATIONS)
        reason = (f"transformer-engine has no {kind}{activation!r} kernel (its 'gelu' is the tanh "
                  f"approximation); te supports {supported}")
    if reason is None:
        return "te"
    if backend == "auto":
        return "local"
    raise ParamError("backend", f"backend 'te' cannot run here: {reason}; use backend: local or auto")


def _te():
    return importlib.import_module("transformer_engine.pytorch")


def _device() -> torch.device | str:
    """Where transformer-engine creates parameters: the default device, CUDA instead of the CPU default
    (TE modules live on the GPU), and the string ``"meta"`` under meta builds: TE defers its
    initialisation only for ``device == "meta"``, which a ``torch.device("meta")`` does not equal."""
    device = torch.get_default_device()
    if device.type == "meta":
        return "meta"
    return "cuda" if device.type == "cpu" else device


def _normal(std: float):
    return partial(nn.init.normal_, mean=0.0, std=std)


def te_normalization(norm: str) -> str:
    return {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}[norm]


def layernorm_linear(in_features: int, out_features: int, *, norm: str, eps: float, bias: bool,
                     std: float = 0.02) -> nn.Module:
    """The block's pre-attention norm fused with the QKV projection."""
    return _te().LayerNormLinear(in_features, out_features, eps=eps, bias=bias, normalization=te_normalization(norm),
                                 init_method=_normal(std), device=_device())


def linear(in_features: int, out_features: int, *, bias: bool, std: float = 0.02) -> nn.Module:
    return _te().Linear(in_features, out_features, bias=bias, init_method=_normal(std), device=_device())


def layernorm_mlp(hidden_size: int, ffn_hidden_size: int, *, norm: str, eps: float, activation: str, gated: bool,
                  bias: bool, std: float = 0.02, out_std: float = 0.02) -> nn.Module:
    """The block's pre-MLP norm, fc1, activation and fc2 in one module (fc1 holds [gate; up] when gated)."""
    act = te_activation(activation, gated)
    if act is None:  # resolve_backend refuses this first; kept for direct callers
        raise ParamError("activation",
                         f"transformer-engine has no {'gated ' if gated else ''}{activation!r} activation")
    return _te().LayerNormMLP(hidden_size, ffn_hidden_size, eps=eps, bias=bias, normalization=te_normalization(norm),
                              activation=act, init_method=_normal(std), output_layer_init_method=_normal(out_std),
                              device=_device())


def is_te_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformer_engine")


def init_te_module(name: str, module: nn.Module, std: float, out_std: float) -> None:
    """mimo-spec's init for a transformer-engine module: GEMM weights N(0, std) (residual outputs
    ``attn.out`` and ``fc2`` N(0, out_std)), biases zero, norm scales one."""
    with torch.no_grad():
        for pname, p in module.named_parameters(recurse=False):
            if pname == "layer_norm_weight":
                nn.init.ones_(p)
            elif pname.endswith("bias"):
                nn.init.zeros_(p)
            else:
                residual = pname == "fc2_weight" or name.endswith("attn.out")
                # drawn from the CPU generator (a seeded build is the same on every machine and leaves
                # the CUDA generator alone), then copied to the GPU
                p.copy_(torch.empty(p.shape, dtype=p.dtype).normal_(0.0, out_std if residual else std))


def to_local_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook of a te block: transformer-engine keys -> local keys, extra state dropped."""
    for te_key, local_key in TE_TO_LOCAL.items():
        if prefix + te_key in state_dict:
            state_dict[prefix + local_key] = state_dict.pop(prefix + te_key)
    for extra in TE_EXTRA_STATE:
        state_dict.pop(prefix + extra, None)


def to_te_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
               missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """load_state_dict pre-hook of a te block: accept local keys (and transformer-engine's own)."""
    for local_key, te_key in LOCAL_TO_TE.items():
        if prefix + local_key in state_dict:
            state_dict[prefix + te_key] = state_dict.pop(prefix + local_key)
    for extra in TE_EXTRA_STATE:
        # TE's set_extra_state(None) keeps its fresh FP8 state: a local checkpoint loads strictly.
        state_dict.setdefault(prefix + extra, None)


def te_parameter_renames(model: nn.Module) -> dict[str, str]:
    """Parameter FQN -> its checkpoint (local-backend) name, for every te block in ``model``."""
    renames = {}
    for name, module in model.named_modules():
        if getattr(module, "backend", None) == "te" and hasattr(module, "mlp_norm"):
            prefix = f"{name}." if name else ""
            for te_key, local_key in TE_TO_LOCAL.items():
                renames[prefix + te_key] = prefix + local_key
    return renames
