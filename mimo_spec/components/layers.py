"""Shared transformer building blocks: norms, activations, RoPE, attention, MLP, block.

Everything here (the local backend) is plain PyTorch and ``torch.compile(fullgraph=True)``-friendly:
branches depend only on constructor arguments and tensor *shapes*, never on
tensor values (a ``te`` block is not: transformer-engine keeps its modules out of
dynamo, so a compiled te block runs in pieces). Parallelism (FSDP, TP, activation
checkpointing) is applied from the outside, per :class:`TransformerBlock`.

Tensor layout inside attention: ``(B, S, heads, head_dim)`` straight out of the
fused QKV projection, transposed to ``(B, heads, S, head_dim)`` (a view) for SDPA.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mimo_spec.errors import ParamError

Backend = Literal["local", "te", "auto"]
NormKind = Literal["layernorm", "rmsnorm"]
ActivationName = Literal["gelu", "gelu_tanh", "quick_gelu", "silu", "relu"]


def check_backend(backend: str, *, activation: str | None = None, gated: bool = False) -> str:
    """Resolve a ``backend`` argument to the layer implementation to use (``"local"`` or ``"te"``).

    ``"local"``: these plain PyTorch layers. ``"auto"``: transformer-engine where it
    imports, CUDA is available and it has the component's ``activation``, else local.
    ``"te"``: transformer-engine or a ValueError saying why not. See
    :mod:`mimo_spec.components.te_backend`.
    """
    from mimo_spec.components.te_backend import resolve_backend

    return resolve_backend(backend, activation=activation, gated=gated)


# --------------------------------------------------------------------------- norms


class _RMSNormRows(torch.autograd.Function):
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim with a hand-written backward: torch's CPU
    RMSNorm is composite, and autograd takes about 14 passes over (N, H) through its pieces; here backward
    takes 6 and a GEMV. The forward runs transformers' Llama RMSNorm ops in their order (the same values)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rows = x.reshape(-1, x.shape[-1])
        rstd = torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(rows, weight, rstd)
        return torch.mul(rows, rstd).mul_(weight).view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        rows, weight, rstd = ctx.saved_tensors
        shape = g.shape
        g = g.reshape(rows.shape)
        gxr = (g * rows).mul_(rstd)  # g * x_hat
        dw = gxr.sum(0) if ctx.needs_input_grad[1] else None  # (a reduction's pairwise sum over the rows)
        dx = None
        if ctx.needs_input_grad[0]:
            # d rows = rstd * (g * w - x_hat * mean_h(g * w * x_hat))
            c = (gxr @ weight).unsqueeze(-1).mul_(rstd.square()).div_(-rows.shape[-1])
            dx = torch.mul(g, weight).mul_(rstd).addcmul_(rows, c).view(shape)
        return dx, dw, None


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters and state-dict key), computed by :class:`_RMSNormRows` where that is
    faster and exact: fp32 CPU tensors outside autocast and the compiler, an affine weight that is a plain
    tensor (not a DTensor shard). Elsewhere torch's (fused on CUDA)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (w is not None and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
                and type(x) is torch.Tensor and type(w) in (nn.Parameter, torch.Tensor)
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
            return _RMSNormRows.apply(x, w, self.eps if self.eps is not None else torch.finfo(x.dtype).eps)
        return super().forward(x)


def build_norm(kind: str, dim: int, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """``"layernorm"`` (optionally without bias) or ``"rmsnorm"`` over the last dim."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)  # accumulates in fp32 (torch's on bf16 inputs too)
    raise ParamError("norm", f"norm ({kind!r}) must be 'layernorm' or 'rmsnorm'")


# --------------------------------------------------------------------- activations


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "quick_gelu": quick_gelu,
    "silu": F.silu,
    "relu": F.relu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ParamError("activation", f"activation ({name!r}) must be one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ---------------------------------------------------------------------------- RoPE


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (the "rotate half" layout Hugging Face Llama uses).

    ``forward(position_ids)`` returns ``(cos, sin)`` of shape ``(B, S, 1, head_dim)``,
    computed in fp32 from the positions on every call (once per model forward,
    shared by all layers). Computing from positions instead of slicing a cached
    table means no stale or meta-initialised buffers, no bound on positions, and
    no ``.max().item()`` to size a cache, so it compiles with ``fullgraph=True``.

    Multimodal RoPE (M-RoPE, Qwen2-VL): with ``mrope_section`` = (t, h, w) rotary frequencies (summing to
    ``head_dim // 2``), ``position_ids`` may be ``(3, B, S)`` (temporal, height, width positions) and
    each frequency takes its position from one axis: the first ``t`` frequencies from the temporal
    axis, the next ``h`` from height, the last ``w`` from width (Qwen2-VL / Qwen2.5-VL), or, with
    ``mrope_interleaved`` (Qwen3-VL), frequency ``j`` from height when ``j % 3 == 1 and j < 3h``, from
    width when ``j % 3 == 2 and j < 3w``, else from the temporal axis. ``(B, S)`` positions are the
    same position on every axis (text), which is plain RoPE.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, mrope_section: list[int] | None = None,
                 mrope_interleaved: bool = False, scaling: dict | None = None):
        super().__init__()
        if head_dim % 2:
            raise ParamError("head_dim", f"head_dim ({head_dim}) must be even for rope")
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = check_rope_scaling(scaling)
        self.mrope_section = None if mrope_section is None else tuple(mrope_section)
        self.mrope_interleaved = mrope_interleaved
        # Which axis (0 t, 1 h, 2 w) each of the head_dim // 2 frequencies reads (checked here; forward
        # rebuilds it on the positions' device from an arange: no buffer, no host-to-device copy).
        self.mrope_axes = None if mrope_section is None else mrope_axes(head_dim, mrope_section, mrope_interleaved)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Not a buffer: a buffer would be cast to bf16 by model.to(dtype) and lose precision.
        exponent = torch.arange(0, self.head_dim, 2, device=position_ids.device, dtype=torch.float32)
        inv_freq = 1.0 / (self.theta ** (exponent / self.head_dim))  # (D/2,)
        if self.scaling is not None:
            inv_freq = scale_inv_freq(inv_freq, self.scaling)
        if position_ids.dim() == 3:  # (3, B, S): each frequency reads its axis' position
            if self.mrope_axes is None:
                raise ValueError("3-D position_ids need mrope_section")
            axes = self._axes_on(position_ids.device)
            positions = position_ids.permute(1, 2, 0).index_select(-1, axes)  # (B, S, D/2)
            freqs = positions.to(torch.float32) * inv_freq
        else:
            freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # (B, S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # (B, S, 1, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _axes_on(self, device: torch.device) -> torch.Tensor:
        """``mrope_axes`` as a tensor built on ``device`` from an arange (no host-to-device copy)."""
        j = torch.arange(self.head_dim // 2, device=device)
        t, h, w = self.mrope_section
        if self.mrope_interleaved:
            return torch.where((j % 3 == 1) & (j < 3 * h), 1, torch.where((j % 3 == 2) & (j < 3 * w), 2, 0))
        return (j >= t).long() + (j >= t + h).long()


ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def check_rope_scaling(scaling: dict | None) -> dict | None:
    """A rope_scaling mapping checked: ``{rope_type: linear, factor}`` or ``{rope_type: llama3, factor,
    low_freq_factor, high_freq_factor, original_max_position_embeddings}`` (Llama 3.1 / 3.2); None: none."""
    if scaling is None:
        return None
    kind = scaling.get("rope_type") if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALING_KEYS:
        raise ParamError("rope_scaling", f"rope_scaling needs rope_type {' or '.join(ROPE_SCALING_KEYS)}, got "
                         f"{scaling!r}")
    missing = [k for k in ROPE_SCALING_KEYS[kind] if not isinstance(scaling.get(k), (int, float))
               or isinstance(scaling.get(k), bool)]
    extra = sorted(set(scaling) - {"rope_type", *ROPE_SCALING_KEYS[kind]})
    if missing or extra:
        raise ParamError("rope_scaling", f"rope_scaling {kind} takes the numbers {', '.join(ROPE_SCALING_KEYS[kind])}"
                         + (f"; missing {', '.join(missing)}" if missing else "")
                         + (f"; unknown {', '.join(extra)}" if extra else ""))
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ParamError("rope_scaling", "rope_scaling llama3 needs high_freq_factor > low_freq_factor")
    return {k: (v if k == "rope_type" else int(v) if k == "original_max_position_embeddings" else float(v))
            for k, v in scaling.items()}


def scale_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """RoPE frequencies under ``scaling`` (see :func:`check_rope_scaling`). llama3: wavelengths longer than
    original / low_freq_factor are slowed by ``factor``, those shorter than original / high_freq_factor kept,
    and those between blended smoothly, as Llama 3.1 was trained."""
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    old, low, high = scaling["original_max_position_embeddings"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * slowed / factor + smooth * slowed
    between = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(between, blended, slowed)


def mrope_axes(head_dim: int, mrope_section, interleaved: bool = False) -> tuple[int, ...]:
    """The axis (0 temporal, 1 height, 2 width) each of the ``head_dim // 2`` rotary frequencies takes
    its position from, for M-RoPE sections ``(t, h, w)``; ``ParamError("mrope_section")`` for sections
    that do not fit (see :class:`RotaryEmbedding`)."""
    half = head_dim // 2
    section = list(mrope_section)
    if len(section) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in section):
        raise ParamError("mrope_section", f"mrope_section ({section}) must be 3 non-negative integers "
                         "(temporal, height, width rotary frequencies, e.g. [16, 24, 24] for head_dim 128)")
    if sum(section) != half:
        raise ParamError("mrope_section", f"mrope_section ({section}) must sum to head_dim // 2 = {half} "
                         f"(head_dim {head_dim}), not {sum(section)}")
    if not interleaved:
        return tuple(axis for axis, n in enumerate(section) for _ in range(n))
    t, h, w = section
    axes = tuple(1 if j % 3 == 1 and j < 3 * h else 2 if j % 3 == 2 and j < 3 * w else 0 for j in range(half))
    counts = [axes.count(a) for a in range(3)]
    if counts != section:
        raise ParamError("mrope_section", f"interleaved mrope_section ({section}) does not fit head_dim // 2 = "
                         f"{half}: interleaving gives {counts} frequencies per axis "
                         "(height and width slots are j % 3 == 1, 2 below 3 x their section)")
    return axes


class _Rope(torch.autograd.Function):
    """``x * cos + rotate_half(x) * sin`` in three passes each way (no chunk, neg or cat temporaries);
    ``cos``/``sin`` take no gradient."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        half = g.shape[-1] // 2
        dx = g * cos
        dx[..., :half].addcmul_(g[..., half:], sin[..., half:])
        dx[..., half:].addcmul_(g[..., :half], sin[..., :half], value=-1)
        return dx, None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, S, heads, D) by ``cos``/``sin`` (B, S, 1, D)."""
    if (not torch.compiler.is_compiling()  # compiled: the plain ops below fuse
            and not (cos.requires_grad or sin.requires_grad) and x.dtype == torch.promote_types(x.dtype, cos.dtype)
            and x.shape == torch.broadcast_shapes(x.shape, cos.shape, sin.shape)):
        return _Rope.apply(x, cos, sin)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


# ---------------------------------------------------------------------- attention


def build_attention_mask(
    q_len: int,
    k_len: int,
    *,
    device: torch.device,
    offset: int = 0,
    causal: bool = True,
    key_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask (B or 1, 1, q_len, k_len); True = may attend.

    Query ``i`` sits at absolute position ``offset + i`` (``offset`` = KV-cache length).
    ``key_mask`` (B, k_len): False marks padding keys. ``document_ids`` (B, q_len == k_len):
    attention stays inside one document (block-diagonal). Every query may always
    attend to itself, so no row is fully masked: padded queries then produce finite
    garbage instead of NaNs that would poison the backward pass.
    """
    q_pos = torch.arange(q_len, device=device) + offset
    k_pos = torch.arange(k_len, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None]) if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    mask = mask[None, None]  # (1, 1, Sq, Sk)
    if key_mask is not None:
        mask = mask & key_mask.to(torch.bool)[:, None, None, :]
    if document_ids is not None:
        mask = mask & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    return mask | (k_pos[None, :] == q_pos[:, None])[None, None]


# the q/k norms an attention knows (see Attention.__init__)
QK_NORM_KINDS = ("rmsnorm", "layernorm_per_head", "rmsnorm_all_heads")


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection (MHA / GQA / MQA).

    ``qkv.weight`` rows are ``[q (num_heads*D); k (num_kv_heads*D); v (num_kv_heads*D)]``. The head
    counts of a call are read from the projection's output size, so a ``qkv`` that holds a share of
    the heads (tensor parallelism shards q, k and v alike) runs that share unchanged.

    ``qkv_bias``: True, one bias ``qkv.bias`` over all three parts; False, none; ``"qv"``, biases on the
    queries and values only (Whisper's attention has no key bias): ``qkv`` holds no bias and ``q_bias``
    (num_heads*D) and ``v_bias`` (num_kv_heads*D) are added to their parts, so the parameters are exactly
    those of separate q/k/v projections with ``k_proj`` bias-free.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool | Literal["qv"] = False,
        out_bias: bool = False,
        dropout: float = 0.0,
        layer_idx: int = 0,
        *,
        te_norm: tuple[str, float] | None = None,
        qk_norm: float | None = None,
        qk_norm_kind: Literal["rmsnorm", "layernorm_per_head", "rmsnorm_all_heads"] = "rmsnorm",
    ):
        """``te_norm=(norm, eps)``: transformer-engine projections, the block's pre-attention norm fused
        into ``qkv`` (a ``te.LayerNormLinear``) and ``out`` a ``te.Linear``. ``qk_norm=eps``: an RMSNorm
        over each head's queries and keys before RoPE (Qwen3's ``q_norm`` / ``k_norm``);
        ``qk_norm_kind="layernorm_per_head"``: instead a LayerNorm over each head's queries and keys whose
        affine weight and bias are the head's own (Chameleon): parameters ``q_norm_weight`` /
        ``q_norm_bias`` (num_heads, head_dim) and ``k_norm_weight`` / ``k_norm_bias`` (num_kv_heads,
        head_dim), sharded with their heads under tensor parallelism. ``"rmsnorm_all_heads"``: one RMSNorm
        over all heads' queries together (num_heads * head_dim) and one over all keys (num_kv_heads * head_dim)
        (OLMoE / OLMo 2): ``q_norm`` / ``k_norm`` of those widths; a share of the heads cannot compute it, so
        tensor parallelism refuses it."""
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if head_dim is None:
            if hidden_size % num_heads:
                raise ParamError("hidden_size",
                                 f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
            head_dim = hidden_size // num_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ParamError("num_heads", f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.dropout = dropout
        self.layer_idx = layer_idx  # which slot of a KV cache this layer owns
        qkv_size = (num_heads + 2 * num_kv_heads) * head_dim
        if qkv_bias not in (True, False, "qv"):
            raise ParamError("qkv_bias", f"qkv_bias ({qkv_bias!r}) must be true, false or 'qv' (q and v biases only)")
        qv_only = qkv_bias == "qv"
        qkv_bias = False if qv_only else bool(qkv_bias)
        if qv_only and te_norm is not None:
            raise ParamError("qkv_bias", "qkv_bias 'qv' (no key bias) has no transformer-engine projection",
                             hint="use backend: local for this attention")
        if te_norm is not None:
            from mimo_spec.components import te_backend

            self.qkv = te_backend.layernorm_linear(hidden_size, qkv_size, norm=te_norm[0], eps=te_norm[1],
                                                   bias=qkv_bias)
            self.out = te_backend.linear(num_heads * head_dim, hidden_size, bias=out_bias)
        else:
            self.qkv = nn.Linear(hidden_size, qkv_size, bias=qkv_bias)
            self.out = nn.Linear(num_heads * head_dim, hidden_size, bias=out_bias)
        # qkv_bias "qv": the q and v biases, zero-initialised (the qkv Linear holds no bias then)
        self.q_bias = nn.Parameter(torch.zeros(num_heads * head_dim)) if qv_only else None
        self.v_bias = nn.Parameter(torch.zeros(num_kv_heads * head_dim)) if qv_only else None
        if qk_norm_kind not in QK_NORM_KINDS:
            raise ParamError("qk_norm_kind", f"qk_norm_kind ({qk_norm_kind!r}) must be one of "
                             f"{', '.join(map(repr, QK_NORM_KINDS))}")
        per_head = qk_norm is not None and qk_norm_kind == "layernorm_per_head"
        # rmsnorm_all_heads: the norms span every head's queries / keys (their flat projections)
        self.qk_norm_all_heads = qk_norm is not None and qk_norm_kind == "rmsnorm_all_heads"
        q_width, k_width = (num_heads * head_dim, num_kv_heads * head_dim) if self.qk_norm_all_heads \
            else (head_dim, head_dim)
        self.qk_norm_eps = qk_norm
        self.q_norm = RMSNorm(q_width, eps=qk_norm) if qk_norm is not None and not per_head else None
        self.k_norm = RMSNorm(k_width, eps=qk_norm) if qk_norm is not None and not per_head else None
        # layernorm_per_head: each head's own affine weight and bias (rows = heads: sharded with them under TP)
        self.q_norm_weight = nn.Parameter(torch.ones(num_heads, head_dim)) if per_head else None
        self.q_norm_bias = nn.Parameter(torch.zeros(num_heads, head_dim)) if per_head else None
        self.k_norm_weight = nn.Parameter(torch.ones(num_kv_heads, head_dim)) if per_head else None
        self.k_norm_bias = nn.Parameter(torch.zeros(num_kv_heads, head_dim)) if per_head else None
        # an optional wrapper of the core attention, ``hook(core, q, k, v, **kw) -> y``, with ``core`` =
        # :meth:`core_attention`: a parallel layout installs one (sequence parallelism exchanges sequence
        # slices for head groups around it); None runs the core directly
        self.attention_hook = None

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        kv_cache: "KVCache | None" = None,
        segments: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """x (B, S, hidden) -> (B, S, hidden). ``attn_mask`` (B|1, 1, S, S_k) bool, True = attend.
        ``segments`` (host ints summing to S, instead of a mask): attention only inside each consecutive
        run of that many positions (packed items), computed run by run (equal-length runs batched) rather
        than over S x S."""
        D, group = self.head_dim, self.num_heads // self.num_kv_heads
        qkv = self.qkv(x)
        if self.q_bias is not None:  # no key bias: zeros between the q and v biases
            q_bias, v_bias = self.q_bias, self.v_bias
            if hasattr(q_bias, "to_local"):  # tensor parallelism shards them with the heads: this rank's rows
                q_bias, v_bias = q_bias.to_local(), v_bias.to_local()
            k_rows = qkv.shape[-1] - q_bias.shape[0] - v_bias.shape[0]
            qkv = qkv + torch.cat([q_bias, q_bias.new_zeros(k_rows), v_bias])
        hkv = qkv.shape[-1] // ((group + 2) * D)  # the kv heads this projection holds (all, or a TP share)
        h = hkv * group
        # split, not slices: a split's backward is one cat, a slice's a zero-filled full-size buffer per part
        qk, v = qkv.split([(h + hkv) * D, hkv * D], dim=-1)
        if self.qk_norm_all_heads:  # over the flat projections, before the heads are split
            if h != self.num_heads:
                raise RuntimeError(f"qk_norm_kind 'rmsnorm_all_heads' needs all {self.num_heads} heads here, "
                                   f"this projection holds {h} (tensor parallelism cannot shard it)")
            q, k = qk.split([h * D, hkv * D], dim=-1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=-1)
        qk, v = qk.unflatten(-1, (h + hkv, D)), v.unflatten(-1, (hkv, D))  # (B, S, h+hkv, D), (B, S, hkv, D)
        if self.q_norm is not None and not self.qk_norm_all_heads:  # each head's D
            q, k = qk.split([h, hkv], dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        elif self.q_norm_weight is not None:  # LayerNorm over each head's D, that head's own weight and bias
            w = torch.cat([_local(self.q_norm_weight), _local(self.k_norm_weight)])  # (h + hkv, D)
            b = torch.cat([_local(self.q_norm_bias), _local(self.k_norm_bias)])
            qk = F.layer_norm(qk, (D,), eps=self.qk_norm_eps) * w + b
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q and k rotated in one pass
        q, k = (t.transpose(1, 2) for t in qk.split([h, hkv], dim=2))  # (B, heads, S, D)
        v = v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        kw = {"attn_mask": attn_mask, "is_causal": is_causal, "segments": segments}
        hook = self.attention_hook
        y = self.core_attention(q, k, v, **kw) if hook is None else hook(self.core_attention, q, k, v, **kw)
        return self.out(y.transpose(1, 2).flatten(2))

    def core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                       attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                       segments: tuple[int, ...] | None = None) -> torch.Tensor:
        """q (B, h, S, D), k / v (B, hkv, S_k, D) (rotated, cached) -> (B, h, S, D): SDPA (GQA when hkv < h),
        under ``attn_mask`` (B|1, 1, S, S_k), causally, or inside ``segments``. The head counts come from
        the shapes, so a share of the heads (tensor or sequence parallelism) runs unchanged."""
        B, h, _, D = q.shape
        hkv = k.shape[1]
        gqa = hkv != h
        if gqa and attn_mask is not None:
            # Masked SDPA runs on the memory-efficient kernel, which lacks enable_gqa
            # (it would fall back to the slow math kernel): expand K/V instead.
            k = k[:, :, None].expand(B, hkv, h // hkv, k.shape[2], D).flatten(1, 2)
            v = v[:, :, None].expand(B, hkv, h // hkv, v.shape[2], D).flatten(1, 2)
            gqa = False
        if segments is not None and len(segments) > 1:
            return _segment_attention(q, k, v, segments, self.dropout if self.training else 0.0, gqa)
        return F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and attn_mask is None,
            enable_gqa=gqa,
        )


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a parameter tensor parallelism shards with the heads (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _segment_attention(q, k, v, segments, dropout: float, gqa: bool) -> torch.Tensor:
    """Bidirectional attention inside consecutive runs of positions: q, k, v (B, heads, S, D) with
    ``segments`` summing to S -> (B, heads, S, D). Each stretch of equal-length runs is one SDPA call
    over (B * runs, heads, length, D), so S x S scores are never formed."""
    B, _, S, D = q.shape
    if sum(segments) != S:
        raise ValueError(f"segments sum to {sum(segments)}, not the sequence length {S}")
    stretches, i = [], 0  # (runs, length) of each stretch of equal-length runs
    while i < len(segments):
        length, j = segments[i], i
        while j < len(segments) and segments[j] == length:
            j += 1
        stretches.append((j - i, length))
        i = j
    sizes = [n * length for n, length in stretches]
    outs = []
    # split, not slices: a split's backward is one cat, a slice's a zero-filled full-size buffer per stretch
    for (n, length), qs, ks, vs in zip(stretches, q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2)):

        def runs(t):  # (B, h, n*L, D) -> (B*n, h, L, D)
            return t.unflatten(2, (n, length)).transpose(1, 2).flatten(0, 1)

        y = F.scaled_dot_product_attention(runs(qs), runs(ks), runs(vs), dropout_p=dropout, enable_gqa=gqa)
        outs.append(y.unflatten(0, (B, n)).transpose(1, 2).flatten(2, 3))
    return torch.cat(outs, dim=2)


class KVCache:
    """Preallocated keys/values for incremental decoding (one slot per layer).

    ``GPT.forward`` writes each layer's new K/V at ``[length, length + S)`` and then
    calls :meth:`advance`. ``key_mask`` remembers padding of every cached position.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0  # a Python int: positions are never read back from the device
        self.has_padding = False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, hkv, S, D) after the cached ones; return all keys/values so far.

        An empty cache takes the head count of the first keys it stores (a tensor-parallel rank's
        attention holds a share of the kv heads)."""
        if self.length == 0 and self.k.shape[2] != k.shape[1]:
            self.k = self.k.new_zeros(*self.k.shape[:2], k.shape[1], *self.k.shape[3:])
            self.v = self.v.new_zeros(*self.v.shape[:2], v.shape[1], *self.v.shape[3:])
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0
        self.has_padding = False
        self.key_mask.fill_(True)


# ---------------------------------------------------------------------------- MLP


class _SiluMul(torch.autograd.Function):
    """``silu(gate) * up`` of ``h = [gate | up]`` (..., 2F); the backward writes both halves' gradients into
    one (..., 2F) buffer (no chunk-backward cat)."""

    @staticmethod
    def forward(ctx, h):
        f = h.shape[-1] // 2
        s = F.silu(h[..., :f])
        ctx.save_for_backward(h, s)
        return s * h[..., f:]

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        h, s = ctx.saved_tensors
        f = s.shape[-1]
        dh = torch.empty_like(h)
        torch.mul(g, s, out=dh[..., f:])
        torch.ops.aten.silu_backward.grad_input(g * h[..., f:], h[..., :f], grad_input=dh[..., :f])
        return dh


class MLP(nn.Module):
    """Feed-forward: ``"gelu"`` = fc2(act(fc1(x))); ``"swiglu"`` = fc2(act(gate) * up).

    For ``"swiglu"``, ``fc1`` is the fused ``[gate; up]`` projection (2*ffn rows), so
    one GEMM replaces two.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, kind: str = "gelu",
                 activation: str = "gelu", bias: bool = True):
        super().__init__()
        if kind not in ("gelu", "swiglu"):
            raise ParamError("mlp", f"mlp ({kind!r}) must be 'gelu' or 'swiglu'")
        self.gated = kind == "swiglu"
        self.ffn_hidden_size = ffn_hidden_size
        self.act = get_activation(activation)
        self.fc1 = nn.Linear(hidden_size, ffn_hidden_size * (2 if self.gated else 1), bias=bias)
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., hidden) -> (..., hidden)."""
        h = self.fc1(x)
        if self.gated and self.act is F.silu and not torch.compiler.is_compiling():  # compiled: the plain ops fuse
            h = _SiluMul.apply(h)
        elif self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.fc2(h)


# -------------------------------------------------------------------------- block


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(attn_norm(x)), then x + mlp(mlp_norm(x)).

    ``backend="te"`` (CUDA): the norms are fused into transformer-engine's
    ``attn.qkv`` (LayerNormLinear) and ``mlp`` (LayerNormMLP), ``attn_norm`` and
    ``mlp_norm`` become identities, and checkpoints keep the local keys (see
    :mod:`mimo_spec.components.te_backend`).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        ffn_hidden_size: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        norm: str = "layernorm",
        norm_eps: float = 1e-5,
        mlp: str = "gelu",
        activation: str = "gelu",
        qkv_bias: bool = True,
        out_bias: bool = True,
        mlp_bias: bool = True,
        dropout: float = 0.0,
        layer_idx: int = 0,
        backend: str = "local",
        qk_norm: bool = False,
        layer_scale: float | None = None,
        mlp_module: nn.Module | None = None,
        qk_norm_kind: str = "rmsnorm",
        qk_norm_eps: float | None = None,
        swin_norm: bool = False,
    ):
        """``swin_norm`` (Chameleon-30B's layout): each sublayer's output is normalised before the residual add,
        ``x + attn_norm(attn(x))`` then ``x + mlp_norm(mlp(x))``, instead of its input (local backend only).
        ``layer_scale``: LayerScale (InternViT's ``lambda_1`` / ``lambda_2``): learned per-channel gains
        ``attn_scale`` / ``mlp_scale`` on each residual branch, initialised to this value (None: none).
        ``mlp_module``: the feed-forward to use instead of an :class:`MLP` (a
        :class:`~mimo_spec.components.moe.MoE`; local backend only). ``qk_norm_kind`` / ``qk_norm_eps``: see
        :class:`Attention` (the eps defaults to ``norm_eps``)."""
        super().__init__()
        if backend not in ("local", "te"):
            raise ParamError("backend",
                             f"backend ({backend!r}) must be 'local' or 'te' (resolve 'auto' with check_backend)")
        self.backend = backend
        qk_eps = (norm_eps if qk_norm_eps is None else qk_norm_eps) if qk_norm else None
        if backend == "te" and mlp_module is not None:
            raise ParamError("backend", "a mixture-of-experts layer has no transformer-engine version",
                             hint="use backend: local")
        if backend == "te" and swin_norm:
            raise ParamError("backend", "swin_norm has no transformer-engine version (it fuses the norm into the "
                             "input projections)", hint="use backend: local")
        self.swin_norm = bool(swin_norm)
        if backend == "te":
            from mimo_spec.components import te_backend

            if mlp not in ("gelu", "swiglu"):
                raise ParamError("mlp", f"mlp ({mlp!r}) must be 'gelu' or 'swiglu'")
            build_norm(norm, hidden_size, norm_eps)  # the same error for a bad norm name as local
            self.attn_norm = nn.Identity()
            self.attn = Attention(hidden_size, num_heads, num_kv_heads, head_dim, qkv_bias, out_bias, dropout,
                                  layer_idx, te_norm=(norm, norm_eps), qk_norm=qk_eps, qk_norm_kind=qk_norm_kind)
            self.mlp_norm = nn.Identity()
            self.mlp = te_backend.layernorm_mlp(hidden_size, ffn_hidden_size, norm=norm, eps=norm_eps,
                                                activation=activation, gated=mlp == "swiglu", bias=mlp_bias)
            # Checkpoints use the local keys: a te-trained model loads into local layers and back.
            self.register_state_dict_post_hook(te_backend.to_local_keys)
            self.register_load_state_dict_pre_hook(te_backend.to_te_keys)
        else:
            self.attn_norm = build_norm(norm, hidden_size, norm_eps)
            self.attn = Attention(hidden_size, num_heads, num_kv_heads, head_dim, qkv_bias, out_bias, dropout,
                                  layer_idx, qk_norm=qk_eps, qk_norm_kind=qk_norm_kind)
            self.mlp_norm = build_norm(norm, hidden_size, norm_eps)
            self.mlp = mlp_module if mlp_module is not None else MLP(hidden_size, ffn_hidden_size, mlp, activation,
                                                                     mlp_bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        gain = None if layer_scale is None else torch.full((hidden_size,), float(layer_scale))
        self.attn_scale = None if gain is None else nn.Parameter(gain.clone())
        self.mlp_scale = None if gain is None else nn.Parameter(gain.clone())

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
        segments: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """x (B, S, hidden) -> (B, S, hidden). ``segments``: see :meth:`Attention.forward`."""
        if self.swin_norm:  # the sublayers' outputs normalised (Chameleon's swin_norm)
            a = self.attn_norm(self.attn(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal, kv_cache=kv_cache,
                                         segments=segments))
            x = x + self.dropout(a if self.attn_scale is None else a * self.attn_scale)
            m = self.mlp_norm(self.mlp(x))
            return x + self.dropout(m if self.mlp_scale is None else m * self.mlp_scale)
        a = self.attn(self.attn_norm(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal, kv_cache=kv_cache,
                      segments=segments)
        x = x + self.dropout(a if self.attn_scale is None else a * self.attn_scale)
        m = self.mlp(self.mlp_norm(x))
        return x + self.dropout(m if self.mlp_scale is None else m * self.mlp_scale)


def init_transformer_weights(module: nn.Module, std: float = 0.02, num_layers: int = 1) -> None:
    """GPT-2 style init: N(0, std) weights, zero biases, unit norms; residual output
    projections (``attn.out``, ``mlp.fc2``) scaled by 1/sqrt(2*num_layers) so the
    residual stream does not grow with depth."""
    from mimo_spec.components.te_backend import init_te_module, is_te_module

    out_std = std / math.sqrt(2 * num_layers)
    for name, m in module.named_modules():
        if is_te_module(m):
            init_te_module(name, m, std, out_std)
        elif isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            is_out = name.endswith(("attn.out", "mlp.fc2", "mlp.shared.fc2"))
            nn.init.normal_(m.weight, mean=0.0, std=out_std if is_out else std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif hasattr(m, "reset_expert_weights"):  # MoE experts: 3-D weights, ``down`` is a residual output
            m.reset_expert_weights(std, out_std)
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            m.reset_parameters()
        if isinstance(m, Attention) and m.q_norm_weight is not None:  # per-head q/k LayerNorms: identity
            for p, value in ((m.q_norm_weight, 1.0), (m.q_norm_bias, 0.0), (m.k_norm_weight, 1.0),
                             (m.k_norm_bias, 0.0)):
                nn.init.constant_(p, value)
