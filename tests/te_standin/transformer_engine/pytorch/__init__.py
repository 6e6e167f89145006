"""Stand-in modules: LayerNormLinear, Linear, LayerNormMLP (see the package docstring)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_ACT = {
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "qgelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "relu": F.relu,
}
_GATED = {"geglu": "gelu", "qgeglu": "qgelu", "swiglu": "silu", "reglu": "relu"}


def _dev(device):
    # real TE defers its init only for device == "meta" (a torch.device("meta") does not compare equal)
    # and otherwise builds on CUDA; the stand-in builds on the CPU instead
    return torch.device("meta") if device == "meta" else torch.device("cpu")


class _Base(nn.Module):
    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)  # what TE writes when no FP8 state exists

    def set_extra_state(self, state) -> None:
        if state is None or (isinstance(state, torch.Tensor) and state.numel() == 0):
            return
        raise RuntimeError("stand-in holds no FP8 state")

    def _param(self, name, shape, init, device):
        p = nn.Parameter(torch.empty(shape, device=_dev(device)))
        self.register_parameter(name, p)
        if p.device.type != "meta":
            with torch.no_grad():
                init(p)

    def _linear_params(self, prefix, in_features, out_features, bias, init_method, device):
        """``<prefix>weight`` (and ``<prefix>bias``; without bias TE keeps an empty plain tensor there)."""
        self._param(f"{prefix}weight", (out_features, in_features), init_method or _default_init, device)
        if bias:
            self._param(f"{prefix}bias", (out_features,), nn.init.zeros_, device)
        else:
            setattr(self, f"{prefix}bias", torch.Tensor())

    def _norm_params(self, hidden, normalization, device):
        if normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(normalization)
        self.normalization = normalization
        self._param("layer_norm_weight", (hidden,), nn.init.ones_, device)
        if normalization == "LayerNorm":
            self._param("layer_norm_bias", (hidden,), nn.init.zeros_, device)
        else:
            self.layer_norm_bias = None

    def _norm(self, x):
        if self.normalization == "LayerNorm":
            return F.layer_norm(x, x.shape[-1:], self.layer_norm_weight, self.layer_norm_bias, self.eps)
        return F.rms_norm(x, x.shape[-1:], self.layer_norm_weight, self.eps)


def _default_init(p):
    nn.init.normal_(p, std=0.023)


class Linear(_Base):
    def __init__(self, in_features, out_features, sequence_parallel=False, fuse_wgrad_accumulation=False,
                 tp_group=None, tp_size=1, get_rng_state_tracker=None, rng_tracker_name=None, init_method=None,
                 bias=True, return_bias=False, params_dtype=None, parallel_mode=None, device="cuda"):
        super().__init__()
        self._linear_params("", in_features, out_features, bias, init_method, device)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias if self.bias.numel() else None)


class LayerNormLinear(_Base):
    def __init__(self, in_features, out_features, eps=1e-5, sequence_parallel=False, fuse_wgrad_accumulation=False,
                 tp_group=None, tp_size=1, get_rng_state_tracker=None, init_method=None, bias=True,
                 normalization="LayerNorm", return_bias=False, params_dtype=None, parallel_mode=None,
                 return_layernorm_output=False, return_layernorm_output_gathered=False, parameters_split=None,
                 zero_centered_gamma=False, device="cuda"):
        super().__init__()
        self.eps = eps
        self._norm_params(in_features, normalization, device)
        self._linear_params("", in_features, out_features, bias, init_method, device)

    def forward(self, x):
        return F.linear(self._norm(x), self.weight, self.bias if self.bias.numel() else None)


class LayerNormMLP(_Base):
    def __init__(self, hidden_size, ffn_hidden_size, eps=1e-5, sequence_parallel=False, return_bias=False,
                 get_rng_state_tracker=None, tp_group=None, tp_size=1, init_method=None, bias=True,
                 normalization="LayerNorm", activation="gelu", activation_params=None,
                 output_layer_init_method=None, fuse_wgrad_accumulation=False, params_dtype=None,
                 return_layernorm_output=False, return_layernorm_output_gathered=False, seq_length=None,
                 micro_batch_size=None, set_parallel_mode=False, zero_centered_gamma=False, device="cuda"):
        super().__init__()
        if activation not in _ACT and activation not in _GATED:
            raise NotImplementedError("Activation type " + activation + " is not supported!")
        self.eps, self.activation, self.gated = eps, activation, activation in _GATED
        self._norm_params(hidden_size, normalization, device)
        fc1_out = 2 * ffn_hidden_size if self.gated else ffn_hidden_size
        self._linear_params("fc1_", hidden_size, fc1_out, bias, init_method, device)
        self._linear_params("fc2_", ffn_hidden_size, hidden_size, bias, output_layer_init_method, device)

    def forward(self, x):
        h = F.linear(self._norm(x), self.fc1_weight, self.fc1_bias if self.fc1_bias.numel() else None)
        if self.gated:
            a, b = h.chunk(2, dim=-1)
            h = _ACT[_GATED[self.activation]](a) * b
        else:
            h = _ACT[self.activation](h)
        return F.linear(h, self.fc2_weight, self.fc2_bias if self.fc2_bias.numel() else None)
