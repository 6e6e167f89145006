"""Expert parallelism: each MoE layer's experts split over the ``ep`` ranks of a group, tokens exchanged by
all-to-all (torchtitan's design).

``ep`` is carved out of a module's data-parallel ranks: the module's ``dp = dp_replicate * dp_shard`` ranks
(row-major, ``dp_shard`` innermost) form ``dp / ep`` groups of ``ep`` neighbouring data-parallel ranks; the
ranks of a group hold different experts (rank ``i`` of the group: experts ``[i*E/ep, (i+1)*E/ep)``) and
ranks at the same place in every group hold the same experts. Everything else in the module stays data
parallel over all ``dp`` ranks; the expert weights are data parallel over the ``dp / ep`` ranks holding the
same experts (FSDP-sharded when the module has ``dp_shard > 1``, else their gradients summed), so an
expert's gradient is the sum over every token routed to it in the global batch, as in one process.

In every MoE layer (:class:`ExpertDispatch`, set as ``MoE.expert_dispatch``): the rank routes its own
tokens, sorts the (token, slot) rows by expert, sends every expert's rows to the rank holding it (one
all-to-all of the row counts, one of the rows, uneven splits), runs its local experts on the rows it
received (one grouped GEMM over its experts), returns the outputs by a second all-to-all, and combines
them with the routing weights. Both all-to-alls are differentiable (torch's functional collectives), so
backward runs the reverse exchanges.

Beside tensor parallelism (``tp``), the ranks of a TP group hold the same tokens: each dispatches them in its
own EP group (the data-parallel ranks with its TP index), so the experts are replicated over the TP ranks
(the attention and the shared expert are TP-sharded as usual).

The expert weights are DTensors sharded on the expert dimension over the EP group (``Shard(0)``), so
distributed checkpoints hold the full (E, ...) tensors and reshard between EP degrees or load in one process.
"""

from __future__ import annotations

import torch
import torch.nn as nn

EP_DIMS = ("pp", "edp", "ep", "tp")  # the mesh of an EP module: pp, the dp/ep replicas of each expert, ep, tp


class ExpertDispatch:
    """``MoE.expert_dispatch`` under expert parallelism: ``group`` the EP process group of this rank,
    ``ep`` its size, ``index`` this rank's place in it, ``num_experts`` E (all ranks')."""

    def __init__(self, group, ep: int, index: int, num_experts: int):
        self.group, self.ep, self.index, self.num_experts = group, ep, index, num_experts
        self.local = num_experts // ep

    def _exchange(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        """Rows to every rank of the group (``in_splits`` rows each, in rank order), ``out_splits`` rows back from
        each; differentiable (backward sends the gradients the reverse way)."""
        from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

        return wait_tensor(all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, self.group))

    def dispatch(self, experts: nn.Module, x: torch.Tensor, top_k: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, H) this rank's tokens, ``top_k`` / ``weights`` (N, k) their experts and routing weights ->
        (N, H): the routing-weighted sum of each token's experts, wherever they live."""
        import torch.distributed as dist

        n, k = top_k.shape
        flat = top_k.reshape(-1)
        order = flat.argsort(stable=True)  # (token, slot) rows grouped by expert, so by the rank holding it
        rows = x.index_select(0, order // k)
        counts = torch.bincount(flat, minlength=self.num_experts)  # (E,) rows for each expert
        # every rank learns how many rows it gets for each of its experts from each rank: (ep, E/ep)
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts, group=self.group)
        got = got.view(self.ep, self.local)
        send = counts.view(self.ep, self.local).sum(1).tolist()  # rows to each rank
        recv = got.sum(1).tolist()  # rows from each rank
        received = self._exchange(rows, recv, send)  # by source rank, then by expert
        # regroup by local expert (the grouped GEMM takes each expert's rows contiguous)
        expert_of = torch.arange(self.local, device=x.device).repeat(self.ep).repeat_interleave(got.reshape(-1))
        perm = expert_of.argsort(stable=True)
        y = experts(received.index_select(0, perm), got.sum(0))
        y = torch.empty_like(y).index_copy(0, perm, y)  # back to (source rank, expert) order
        back = self._exchange(y, send, recv)  # this rank's rows, sorted by expert
        out = torch.empty_like(back).index_copy(0, order, back).view(n, k, -1)  # (token, slot)
        return (out * weights.to(out.dtype).unsqueeze(-1)).sum(1).to(x.dtype)


def moe_layers(module: nn.Module) -> list[nn.Module]:
    """The MoE feed-forwards inside ``module`` (what expert parallelism shards)."""
    from mimo_spec.components.moe import MoE

    return [m for m in module.modules() if isinstance(m, MoE)]


def shard_experts(module: nn.Module, ep_mesh, index: int) -> list[nn.Parameter]:
    """Keep this rank's experts of every MoE layer in ``module`` as DTensors sharded on the expert dimension
    over ``ep_mesh`` (1-D), and route the layers' rows through :class:`ExpertDispatch`; returns the expert
    parameters (their gradients are reduced over the ranks holding the same experts, not over ``ep_mesh``)."""
    from torch.distributed.tensor import DTensor, Shard

    ep = ep_mesh.size()
    params = []
    for moe in moe_layers(module):
        experts, per = moe.experts, moe.num_experts // ep
        for name in ("gate_up", "down"):
            full = getattr(experts, name)
            local = full.detach()[index * per:(index + 1) * per].clone()
            p = nn.Parameter(DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False,
                                                shape=full.shape, stride=full.stride()),
                             requires_grad=full.requires_grad)
            setattr(experts, name, p)
            params.append(p)
        moe.expert_dispatch = ExpertDispatch(ep_mesh.get_group(), ep, index, moe.num_experts)
    return params


def ep_groups(m) -> list[list[int]]:
    """The EP groups of a module layout ``m`` (ranks holding different experts of one copy), each ascending."""
    groups = []
    for stage in range(m.pp):
        for replica in range(m.dp // m.ep):
            for t in range(m.tp):
                groups.append([m.offset + ((stage * m.dp + replica * m.ep + i) * m.tp) + t for i in range(m.ep)])
    return groups


class GlobalRouterStats:
    """``MoE.router_stats`` under data parallelism: the load-balancing and z losses over the whole batch, as in
    one process, instead of each rank's over its share.

    One process computes ``aux = E * sum_e (A_e / N) * (P_e / N)`` (A: assignments per expert, P: summed router
    probabilities, N: tokens, over every MoE layer) and ``z = Z / N``. Rank r holds A^r, P^r, N^r, Z^r, and its
    loss is weighted by ``w_r = T_r / T`` (its share of the step's counted tokens). With A and N summed over
    the data-parallel ranks and ``scale = w / w_r`` (w: the micro-batch's weight, the sum of its ranks'
    ``w_r``), rank r's ``aux_r = scale * E * sum_e (A_e / N) * (P^r_e / N)`` and ``z_r = scale * Z^r / N``
    sum, weighted, to the whole batch's losses, in value and in gradient. ``tokens`` (this rank's counted
    tokens of the micro-batch, T_r) is set by ``ParallelContext.local_batch``. A rank whose share counts no
    token (every label -100: prompts only) still routed its tokens, as one process does: its terms are unscaled
    and the step weights its loss by the micro-batch's share of the step (``micro_tokens`` / T) instead of 0."""

    def __init__(self, group):
        self.group = group
        self.tokens = 0
        self.micro_tokens = 0  # the micro-batch's counted tokens over the group (set by reduce)

    def reduce(self, assigned: torch.Tensor, rows: torch.Tensor):
        import torch.distributed as dist

        buf = torch.cat([assigned.double().reshape(-1), rows.double().reshape(1),
                         torch.tensor([float(self.tokens)], dtype=torch.float64)])
        local_tokens = float(self.tokens)
        dist.all_reduce(buf, group=self.group)
        total_tokens = float(buf[-1])
        self.micro_tokens = total_tokens
        scale = total_tokens / local_tokens if local_tokens > 0 else 1.0
        return buf[:-2].to(torch.float32), buf[-2].to(torch.float32), scale


def install_router_stats(module: nn.Module, group) -> GlobalRouterStats | None:
    """Every MoE layer of ``module`` takes its router losses over the data-parallel ``group``'s batch."""
    moes = moe_layers(module)
    if not moes:
        return None
    stats = GlobalRouterStats(group)
    for moe in moes:
        moe.router_stats = stats
    return stats
