"""Mixture-of-experts feed-forward: a router picks ``top_k`` of ``num_experts`` SwiGLU experts per token.

:class:`MoE` takes the place of a :class:`~mimo_spec.components.layers.MLP` in a transformer block
(``TransformerBlock(mlp_module=MoE(...))``). It computes what transformers' ``MixtralSparseMoeBlock``,
``Qwen2MoeSparseMoeBlock`` (shared expert with its sigmoid gate) and ``Qwen3MoeSparseMoeBlock`` compute,
and adds sigmoid scores and DeepSeek-V3's bias-based (aux-loss-free) balancing.

State-dict keys (under the block's ``mlp.``)::

    router.weight        (E, H)
    experts.gate_up      (E, 2F, H)   rows [gate (F); up (F)] (transformers 5's ``gate_up_proj``)
    experts.down         (E, H, F)
    shared.fc1.weight    (2Fs, H)     shared expert (an MLP "swiglu"), when shared_ffn_hidden_size is set
    shared.fc2.weight    (H, Fs)
    shared_gate.weight   (1, H)       Qwen2-MoE's sigmoid gate on the shared expert
    router_bias          (E,)         a buffer, with bias balancing only

Dispatch is dropless: the (token, slot) pairs are sorted by expert and every expert multiplies its
contiguous slice: both GEMMs are torch's grouped GEMMs (``grouped_mm``, no host sync) where torch's kernel
takes them (the CPU; CUDA with compute capability 8.0+ in bf16 with widths that are multiples of 8; under
torch.compile bf16 only: see :func:`_grouped_mm_runs`); elsewhere a loop over the experts' slices (one
``.tolist()`` of the counts per layer). Measured on 2 CPU cores (training step, 8-128 experts, even and skewed loads), the
grouped GEMM was as fast as that loop and faster than a batched GEMM over a padded (E, max load, H) layout,
which loses as soon as the load is uneven.

The local dispatch has hand-written backwards (same GEMMs, fewer memory passes): gathering the rows is
undone by a gather with the inverse order and a sum over each token's ``k`` rows (not index_select's
scatter-add); the weighted combine's backward gathers each row's token gradient once for both the rows'
and the routing weights' gradients; the SiLU experts write the activation's gradient straight into the
(T, 2F) buffer of the first GEMM's backward (no chunk copies, no cat); under torch.compile the plain ops
run instead. The MoE block's forward and backward cost about two thirds of transformers' eager expert loop
on the CPU at benchmarks/train_step_vs_hf_moe.py's Mixtral shape; its GEMMs are most of what is left.

Each forward records its routing (:attr:`MoE.routing`); :func:`router_losses` turns the records of all
MoE layers into the load-balancing loss (transformers' ``load_balancing_loss_func``), the router z-loss
and the tokens each expert received.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mimo_spec.components.layers import MLP, get_activation
from mimo_spec.errors import ParamError

Dispatch = Literal["auto", "grouped_mm", "loop"]

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm_runs(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...]) -> bool:
    """torch's grouped GEMM takes these products: on the CPU (torch 2.9+) any dtype eagerly, but bf16 only
    under torch.compile (its shape rules refuse fp32 there); on CUDA (compute capability 8.0+) bf16 only,
    with every row 16-byte aligned (``sizes``, the hidden and expert widths, multiples of 8): toy widths
    that run on the CPU would be refused there, and fp32 would take a fallback that syncs per GEMM."""
    if _grouped_mm is None:
        return False
    if device.type == "cuda":
        return (torch.cuda.get_device_capability(device) >= (8, 0) and dtype == torch.bfloat16
                and all(n % 8 == 0 for n in sizes))
    if device.type == "cpu":
        return dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    return False


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: grouped_mm's backward refuses the
    stride-0 gradient an ``expand`` (e.g. ``y.sum()``) produces."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _SiluExperts(torch.autograd.Function):
    """Both grouped GEMMs around ``silu(gate) * up`` with a hand-written backward: the four GEMMs autograd would
    run, and the activation's gradient written straight into the (T, 2F) buffer the next GEMM reads (no chunk
    views to copy, no ``cat``, no stride-0 gradient to make contiguous)."""

    @staticmethod
    def forward(ctx, x, w1, w2, offs):
        h = _grouped_mm(x, w1.transpose(1, 2), offs=offs)  # (T, 2F): [gate | up]
        f = h.shape[1] // 2
        s = F.silu(h[:, :f])
        a = s * h[:, f:]
        ctx.save_for_backward(x, w1, w2, offs, h, s, a)
        return _grouped_mm(a, w2.transpose(1, 2), offs=offs)  # (T, H)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w1, w2, offs, h, s, a = ctx.saved_tensors
        dy = dy.contiguous()
        f = s.shape[1]
        da = _grouped_mm(dy, w2, offs=offs)  # (T, F)
        dw2 = _grouped_mm(dy.t(), a, offs=offs)  # (E, H, F)
        dh = torch.empty_like(h)
        torch.mul(da, s, out=dh[:, f:])  # d up
        torch.ops.aten.silu_backward.grad_input(da.mul_(h[:, f:]), h[:, :f], grad_input=dh[:, :f])  # d gate
        dx = _grouped_mm(dh, w1, offs=offs)  # (T, H)
        dw1 = _grouped_mm(dh.t(), x, offs=offs)  # (E, 2F, H)
        return dx, dw1, dw2, None


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, token)`` for (token, slot) rows in expert order, where every token appears ``k`` times;
    the backward gathers each token's ``k`` row gradients (``inv`` inverts the order) and sums them, instead
    of index_select's scatter-add."""

    @staticmethod
    def forward(ctx, x, token, inv, k):
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, token)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (inv,) = ctx.saved_tensors
        return _sum_slots(g.index_select(0, inv).view(-1, ctx.k, g.shape[-1])), None, None, None


def _sum_slots(r: torch.Tensor) -> torch.Tensor:
    """(N, k, H) -> (N, H), the sum over the k slots as k - 1 adds: a reduction would first fill its output."""
    if r.shape[1] == 1:
        return r[:, 0].clone()
    out = torch.add(r[:, 0], r[:, 1])
    for j in range(2, r.shape[1]):
        out.add_(r[:, j])
    return out


class _CombineRows(torch.autograd.Function):
    """(T, H) expert outputs in expert order -> (N, H): each token's ``k`` outputs times its routing ``weights``
    (N, k), summed. ``order`` (T,) the (token, slot) pair of each row, ``inv`` its inverse."""

    @staticmethod
    def forward(ctx, y, weights, order, inv):
        n, k = weights.shape
        ctx.save_for_backward(y, weights, order, inv)
        rows = y.index_select(0, inv).view(n, k, y.shape[-1])  # (N=0 has no -1)
        out = rows[:, 0] * weights[:, :1]  # slot by slot: no (N, k, H) product to keep, no reduction's fill
        for j in range(1, k):
            out.addcmul_(rows[:, j], weights[:, j:j + 1])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        y, weights, order, inv = ctx.saved_tensors
        n, k = weights.shape
        g_rows = g.index_select(0, order // k)  # (T, H): each row's token's gradient
        dw = (g_rows * y).sum(-1).index_select(0, inv).view(n, k)
        return g_rows.mul_(weights.reshape(-1).index_select(0, order).unsqueeze(-1)), dw, None, None


class Experts(nn.Module):
    """``num_experts`` SwiGLU feed-forwards held as two 3-D weights: ``gate_up`` (E, 2F, H), ``down`` (E, H, F)."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str = "silu"):
        super().__init__()
        self.num_experts, self.hidden_size, self.ffn_hidden_size = num_experts, hidden_size, ffn_hidden_size
        self.act = get_activation(activation)
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * ffn_hidden_size, hidden_size))
        self.down = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.dispatch: Dispatch = "auto"  # tests pin one path; "auto" picks per device (see forward)
        self.reset_expert_weights()

    def reset_expert_weights(self, std: float = 0.02, out_std: float | None = None) -> None:
        """N(0, std) ``gate_up`` and N(0, out_std) ``down`` (the residual output, like ``mlp.fc2``)."""
        nn.init.normal_(self.gate_up, std=std)
        nn.init.normal_(self.down, std=std if out_std is None else out_std)

    def _swiglu(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return self.act(gate) * up

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (T, H): rows sorted by expert; ``counts`` (E,) rows per expert -> (T, H), each row through its
        expert."""
        if x.shape[0] == 0:  # no row (an expert-parallel rank may receive none): zeros still in x's and the
            w1, w2 = self._weights()  # weights' graph, so every rank's backward runs the same collectives
            return (x.sum(-1, keepdim=True) * 0).expand(0, self.hidden_size) + (w1.sum() + w2.sum()).to(x.dtype) * 0
        how = self.dispatch
        if how == "auto":  # the products' dtype: autocast's where it is on (as _grouped casts them)
            dtype = (torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type)
                     else self.gate_up.dtype)
            sizes = (self.hidden_size, self.ffn_hidden_size)
            how = "grouped_mm" if _grouped_mm_runs(x.device, dtype, sizes) else "loop"
        if how == "grouped_mm":
            return self._grouped(x, counts)
        if how == "loop":
            return self._loop(x, counts.tolist())  # one read of the counts per layer (a sync on an accelerator)
        raise ParamError("dispatch", f"dispatch ({how!r}) must be 'auto', 'grouped_mm' or 'loop'")

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``gate_up`` and ``down`` as plain tensors: under expert parallelism they are DTensors whose local
        shard holds this rank's experts (the rows it is handed belong to them)."""
        w1, w2 = self.gate_up, self.down
        if hasattr(w1, "to_local"):
            w1, w2 = w1.to_local(), w2.to_local()
        return w1, w2

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # grouped_mm is not autocast-aware: under autocast it gets the autocast dtype by hand
        w1, w2 = self._weights()
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else w1.dtype
        x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
        offs = counts.cumsum(0).to(torch.int32)
        if self.act is F.silu and not torch.compiler.is_compiling():  # (its out= writes are eager-only)
            return _SiluExperts.apply(x, w1, w2, offs)
        h = _ContiguousGrad.apply(_grouped_mm(x, w1.transpose(1, 2), offs=offs))  # (T, 2F)
        return _ContiguousGrad.apply(_grouped_mm(self._swiglu(h), w2.transpose(1, 2), offs=offs))  # (T, H)

    def _loop(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        gate_up, down = self._weights()
        outs = [F.linear(self._swiglu(F.linear(rows, w1)), w2)
                for rows, w1, w2, n in zip(x.split(counts), gate_up.unbind(0), down.unbind(0), counts) if n]
        return torch.cat(outs) if outs else x.new_zeros(0, self.hidden_size)


@dataclass
class Routing:
    """One MoE forward's routing: router ``logits`` (N, E), ``scores`` (N, E) fp32 (softmax or sigmoid of the
    logits), the chosen experts ``top_k`` (N, k), and ``counts`` (E,) the tokens each expert received."""

    logits: torch.Tensor
    scores: torch.Tensor
    top_k: torch.Tensor
    counts: torch.Tensor


class MoE(nn.Module):
    """Top-k routed SwiGLU experts, optionally beside a shared expert.

    Args:
        hidden_size, ffn_hidden_size: model width H and each expert's inner width F.
        num_experts, top_k: E experts, k chosen per token.
        scoring: "softmax" (Mixtral, Qwen) or "sigmoid" (DeepSeek-V3) scores of the router logits.
        norm_topk_prob: the chosen experts' weights are their scores divided by the scores' sum.
        activation: the experts' (and shared expert's) gate activation.
        shared_ffn_hidden_size: a shared SwiGLU expert of this width that every token goes through.
        shared_gate: Qwen2-MoE's per-token sigmoid gate on the shared expert's output.
        bias_balancing: DeepSeek-V3's aux-loss-free balancing: a per-expert ``router_bias`` (a persistent
            buffer) added to the scores only to choose the experts; :meth:`update_bias` moves it.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, top_k: int = 2, *,
                 scoring: Literal["softmax", "sigmoid"] = "softmax", norm_topk_prob: bool = True,
                 activation: str = "silu", shared_ffn_hidden_size: int | None = None, shared_gate: bool = False,
                 bias_balancing: bool = False):
        super().__init__()
        if num_experts < 1:
            raise ParamError("num_experts", f"num_experts ({num_experts}) must be >= 1")
        if not 1 <= top_k <= num_experts:
            raise ParamError("num_experts_per_tok", f"num_experts_per_tok ({top_k}) must be between 1 and "
                             f"num_experts ({num_experts})")
        if scoring not in ("softmax", "sigmoid"):
            raise ParamError("router_scoring", f"router_scoring ({scoring!r}) must be 'softmax' or 'sigmoid'")
        if shared_gate and not shared_ffn_hidden_size:
            raise ParamError("shared_expert_gate", "shared_expert_gate needs a shared expert "
                             "(shared_expert_ffn_hidden_size)")
        self.num_experts, self.top_k, self.scoring, self.norm_topk_prob = num_experts, top_k, scoring, norm_topk_prob
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = Experts(num_experts, hidden_size, ffn_hidden_size, activation)
        self.shared = MLP(hidden_size, shared_ffn_hidden_size, "swiglu", activation, bias=False) \
            if shared_ffn_hidden_size else None
        self.shared_gate = nn.Linear(hidden_size, 1, bias=False) if shared_gate else None
        if bias_balancing:
            self.register_buffer("router_bias", torch.zeros(num_experts), persistent=True)
        else:
            self.router_bias = None
        self.routing: Routing | None = None  # the last forward's (see router_losses)
        # how the routed rows reach the experts: None = here, every expert local (:meth:`dispatch_local`);
        # expert parallelism sets an object with ``dispatch(experts, x, top_k, weights) -> (N, H)`` that sends
        # each row to the rank holding its expert (mimo_spec.parallel.expert)
        self.expert_dispatch = None
        # data parallelism sets an object whose ``reduce(assigned, rows) -> (assigned, rows, scale)`` turns this
        # rank's routing totals into the data-parallel batch's (see router_losses); None: this batch is all
        self.router_stats = None

    def __getstate__(self):  # copies and pickles leave the last forward's routing (graph tensors) behind
        state = dict(super().__getstate__())
        state["routing"] = None
        return state

    def route(self, x: torch.Tensor) -> Routing:
        """x (N, H) -> the routing of every token (no expert runs)."""
        logits = self.router(x)  # (N, E)
        scores = logits.float().softmax(-1) if self.scoring == "softmax" else logits.float().sigmoid()
        chooser = scores if self.router_bias is None else scores + self.router_bias.float()
        top_k = chooser.topk(self.top_k, dim=-1).indices  # (N, k)
        ones = torch.ones_like(top_k).reshape(-1)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device).index_add_(0, top_k.reshape(-1), ones)
        return Routing(logits, scores, top_k, counts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., H) -> (..., H); records :attr:`routing`."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        r = self.route(x)
        self.routing = r
        weights = r.scores.gather(-1, r.top_k)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if self.scoring == "sigmoid" else 0.0))
        if self.expert_dispatch is None:
            out = self.dispatch_local(x, r.top_k, weights, r.counts)
        else:
            out = self.expert_dispatch.dispatch(self.experts, x, r.top_k, weights)
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x)) * s
            out = out + s
        return out.view(shape)

    def dispatch_local(self, x: torch.Tensor, top_k: torch.Tensor, weights: torch.Tensor,
                       counts: torch.Tensor) -> torch.Tensor:
        """Every (token, slot) row through its expert, all experts here: x (N, H), ``top_k`` / ``weights`` (N, k),
        ``counts`` (E,) -> (N, H), the routing-weighted sum of each token's experts."""
        n, k = top_k.shape
        order = top_k.reshape(-1).argsort(stable=True)  # (token, slot) pairs grouped by expert
        if torch.compiler.is_compiling():  # plain ops (the compiler fuses them)
            y = self.experts(x.index_select(0, order // k), counts)
            y = torch.empty_like(y).index_copy(0, order, y).view(n, k, y.shape[-1])  # back to (token, slot)
            return (y * weights.to(y.dtype).unsqueeze(-1)).sum(1).to(x.dtype)
        inv = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))
        rows = _GatherRows.apply(x, order // k, inv, k)
        y = self.experts(rows, counts)  # (N*k, H), sorted by expert
        return _CombineRows.apply(y, weights.to(y.dtype), order, inv).to(x.dtype)

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3's balancing step: ``router_bias += rate * sign(mean load - load)`` from ``counts`` (E,)
        (the tokens each expert received over the optimizer step)."""
        if self.router_bias is None:
            return
        load = counts.to(self.router_bias.device, torch.float32)
        self.router_bias.add_(torch.sign(load.mean() - load) * rate)

    def routed_parameters(self) -> int:
        """Parameters of the routed experts (all E); a token uses top_k / E of them."""
        return self.experts.gate_up.numel() + self.experts.down.numel()


@dataclass
class RouterLosses:
    """The routers' auxiliary losses over every MoE layer of one forward.

    aux_loss: the load-balancing loss as transformers' ``load_balancing_loss_func`` (E * sum over experts of
        the fraction of (token, slot) assignments times the mean router probability, both over all layers'
        tokens; k when perfectly balanced). z_loss: mean over all layers' tokens of logsumexp(logits)^2.
    loss: ``aux_weight * aux_loss + z_weight * z_loss`` (None when both weights are 0): what the training
        loss adds. counts: (MoE layers, E) tokens each expert received (float, no gradient).
    """

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    loss: torch.Tensor | None
    counts: torch.Tensor


def router_losses(moes: list[MoE], aux_weight: float = 0.0, z_weight: float = 0.0,
                  token_mask: torch.Tensor | None = None) -> RouterLosses | None:
    """:class:`RouterLosses` from the last forward of ``moes`` (None when one has not run). ``token_mask``
    (any shape with N elements, 1 = real token) leaves padding out, as transformers' attention_mask does."""
    if not moes or any(m.routing is None for m in moes):
        return None
    num_experts = moes[0].num_experts
    assigned = prob_sum = z_sum = rows = 0.0
    counts = []
    for m in moes:
        r = m.routing
        probs = r.scores if m.scoring == "softmax" else r.scores / r.scores.sum(-1, keepdim=True).clamp(min=1e-20)
        lse2 = torch.logsumexp(r.logits.float(), dim=-1).square()  # (N,)
        if token_mask is None:
            assigned = assigned + r.counts.float()
            prob_sum = prob_sum + probs.sum(0)
            z_sum = z_sum + lse2.sum()
            rows = rows + probs.shape[0]
        else:
            mask = token_mask.reshape(-1).to(probs.device, torch.float32)
            assigned = assigned + torch.zeros(num_experts, device=probs.device).index_add_(
                0, r.top_k.reshape(-1), mask.repeat_interleave(m.top_k))
            prob_sum = prob_sum + (probs * mask[:, None]).sum(0)
            z_sum = z_sum + (lse2 * mask).sum()
            rows = rows + mask.sum()
        counts.append(r.counts.float())
    scale = 1.0
    stats = getattr(moes[0], "router_stats", None)
    if stats is not None and moes[0].training:
        # data parallel: the loads and token count of every rank's share of the batch (no gradient), and the
        # factor that makes this rank's weighted terms sum, over the ranks, to the loss over the whole batch
        assigned, rows, scale = stats.reduce(torch.as_tensor(assigned).detach(),
                                             torch.as_tensor(rows, dtype=torch.float32))
    if isinstance(rows, torch.Tensor):
        rows = rows.clamp(min=1.0)
    else:
        rows = max(rows, 1)
    aux = num_experts * (assigned / rows * prob_sum / rows).sum() * scale
    z = z_sum / rows * scale
    total = None
    if aux_weight:
        total = aux_weight * aux
    if z_weight:
        total = z_weight * z if total is None else total + z_weight * z
    return RouterLosses(aux, z, total, torch.stack(counts).detach())


def load_ratio(counts: torch.Tensor) -> tuple[float, float]:
    """(max, min) over layers and experts of an expert's tokens / the layer's mean: 1.0 and 1.0 when
    perfectly balanced. ``counts`` (layers, E)."""
    ratio = counts / counts.mean(-1, keepdim=True).clamp(min=1e-9)
    return float(ratio.max()), float(ratio.min())


def active_parameters(model: nn.Module) -> tuple[int, int] | None:
    """(total, active per token) parameter counts of a model with MoE layers (None without any): active
    counts top_k of the E routed experts of each MoE layer, everything else whole."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        return None
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    idle = sum(m.routed_parameters() * (m.num_experts - m.top_k) // m.num_experts for m in moes)
    return total, total - idle


__all__ = ["MoE", "Experts", "Routing", "RouterLosses", "router_losses", "load_ratio", "active_parameters"]
