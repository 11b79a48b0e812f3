"""Mixture-of-Experts MLP: a router picks experts per token, experts are small GELU MLPs.

Routing, as in the paper family:
- top-k gating (GShard; gates renormalised over the k picks when k > 1),
- or expert prototyping (M6-T): experts split into k groups, top-1 inside each group,
- a capacity factor (tokens beyond an expert's capacity are dropped, top-1 picks first),
  or dropless (capacity_factor None),
- the load-balancing auxiliary loss (Switch) and optionally the router z-loss (ST-MoE).

Dispatch is the sort-based "permute -> grouped GEMM -> unpermute and combine" pipeline, the same
whether or not tokens are dropped; dropping only removes assignments before the sort.

Two implementations, chosen by `ModelConfig.moe_dispatch_backend` (`--moe-dispatch-backend`):
"torch" (route() + argsort + index_add: the reference) and "fused" (m6_kernels.moe: Triton
gating with capacity positions, permute, unpermute-and-combine; no sort). "auto" is fused on CUDA
when Triton is there, torch otherwise. The expert GEMMs are grouped (torch._grouped_mm) for bf16
on CUDA, one matmul per expert elsewhere.

Under `--compile` (blocks compiled in megatron_m6/parallel/parallelize.py) the router is compiled
with the rest of the block and the dispatch, from routing to combine, runs eagerly: see
`MoEMLP._forward_torch`. The profiler range "moe_dispatch" is entered twice per MoE layer: routing
and permute, then unpermute and combine; between them, "moe_experts" holds the expert GEMMs (and
expert parallelism's all-to-all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from megatron_m6.config import ModelConfig, MoeDispatchBackend
from megatron_m6.precision import fp32_or_wider

try:
    from m6_kernels import runtime as kernel_runtime
except ImportError:  # kernels/ neither installed nor on the path: PyTorch only
    kernel_runtime = None

MOE_DISPATCH_BACKENDS = get_args(MoeDispatchBackend)  # the values --moe-dispatch-backend takes

# torch._grouped_mm wants every row of its operands 16-byte aligned: 8 bf16 elements.
GROUPED_MM_ALIGNMENT = 8


@dataclass
class Routing:
    """Which expert each (token, pick) goes to, with what weight; dropped picks removed."""

    token_idx: torch.Tensor  # [N] token of each kept assignment
    expert_idx: torch.Tensor  # [N] expert of each kept assignment
    gate: torch.Tensor  # [N] combine weight of each kept assignment
    aux_loss: torch.Tensor  # scalar: load balancing (+ z-loss), already weighted by coefficients


def router_topk(cfg: ModelConfig) -> int:
    """Picks per token: one per group under expert prototyping, else the top-k."""
    return cfg.moe_expert_prototypes if cfg.moe_expert_prototypes > 1 else cfg.moe_router_topk


def expert_capacity(cfg: ModelConfig, num_tokens: int) -> int | None:
    """Most picks an expert keeps out of `num_tokens` tokens; None when dropless."""
    if cfg.moe_capacity_factor is None:
        return None
    return math.ceil(cfg.moe_capacity_factor * num_tokens * router_topk(cfg) / cfg.num_experts)


def aux_loss(probs: torch.Tensor, picks_per_expert: torch.Tensor, lse: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Switch load balancing, E * sum_e (fraction of picks to e) * (mean router prob of e), plus
    the router z-loss (mean squared logsumexp of the logits), each times its coefficient."""
    E = probs.shape[1]
    picks = picks_per_expert.float()
    aux = E * torch.sum(picks / picks.sum() * probs.mean(0)) * cfg.moe_aux_loss_coeff
    if cfg.moe_z_loss_coeff:
        aux = aux + cfg.moe_z_loss_coeff * lse.square().mean()
    return aux


def route(logits: torch.Tensor, cfg: ModelConfig) -> Routing:
    """Top-k (or prototype) routing with optional capacity, from router logits [T, E]."""
    T, E = logits.shape
    logits = fp32_or_wider(logits)
    groups = cfg.moe_expert_prototypes
    if groups > 1:
        # Softmax and top-1 inside each of the k groups.
        group_probs = logits.view(T, groups, E // groups).softmax(-1)
        gate, local = group_probs.max(-1)  # [T, k]
        expert = local + torch.arange(groups, device=logits.device) * (E // groups)
        probs = group_probs.reshape(T, E) / groups  # a distribution over all experts per token
    else:
        probs = logits.softmax(-1)
        gate, expert = probs.topk(cfg.moe_router_topk, dim=-1)  # [T, k]
        if cfg.moe_router_topk > 1:
            gate = gate / gate.sum(-1, keepdim=True)
    k = expert.shape[1]
    picks_per_expert = torch.zeros(E, device=logits.device).index_add_(
        0, expert.reshape(-1), torch.ones(T * k, device=logits.device))
    aux = aux_loss(probs, picks_per_expert, torch.logsumexp(logits, -1), cfg)

    # Assignments in priority order: every token's first pick, then every token's second, ...
    expert_flat = expert.t().reshape(-1)
    gate_flat = gate.t().reshape(-1)
    token_flat = torch.arange(T, device=logits.device).repeat(k)
    capacity = expert_capacity(cfg, T)
    if capacity is not None:
        one_hot = F.one_hot(expert_flat, E)
        position_in_expert = (one_hot.cumsum(0) * one_hot).sum(-1) - 1
        keep = position_in_expert < capacity
        expert_flat, gate_flat, token_flat = expert_flat[keep], gate_flat[keep], token_flat[keep]
    return Routing(token_flat, expert_flat, gate_flat, aux)


class ExpertWeights(NamedTuple):
    """The stacked weights of some experts: [E, hidden, ffn], [E, ffn], [E, ffn, hidden], [E, hidden]."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor


class GroupedExperts(nn.Module):
    """E GELU MLPs stored as stacked weights [E, ...] so they can be sharded over experts."""

    def __init__(self, num_experts: int, hidden: int, ffn: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.b1 = nn.Parameter(torch.zeros(num_experts, ffn))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        self.b2 = nn.Parameter(torch.zeros(num_experts, hidden))

    def _grouped_mm_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """bf16 when torch._grouped_mm runs this call: bf16 compute on a CUDA GPU of compute
        capability 8.0 or newer, rows 16-byte aligned; None for the per-expert loop."""
        if not (x.is_cuda and hasattr(torch, "_grouped_mm")):
            return None
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda") if autocast else x.dtype
        aligned = self.w1.shape[1] % GROUPED_MM_ALIGNMENT == 0 and self.w1.shape[2] % GROUPED_MM_ALIGNMENT == 0
        if dtype != torch.bfloat16 or not aligned or torch.cuda.get_device_capability(x.device) < (8, 0):
            return None
        return dtype

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor,
                weights: ExpertWeights | None = None) -> torch.Tensor:
        """x: [N, hidden], rows grouped by expert in order, `tokens_per_expert[e]` rows each, then
        possibly unused rows (a buffer sized without reading the device); their outputs are
        never read. `weights`: the experts to compute with, by default this module's own; expert
        parallelism's dispatch hands in this rank's shards (megatron_m6/parallel/expert_parallel.py)."""
        w1, b1, w2, b2 = weights or ExpertWeights(self.w1, self.b1, self.w2, self.b2)
        dtype = self._grouped_mm_dtype(x)
        if dtype is not None:
            # One launch for all experts, and no host sync: offsets stay on the device.
            offs = tokens_per_expert.cumsum(0, dtype=torch.int32)
            rows = torch.arange(x.shape[0], device=x.device, dtype=torch.int32)
            row_expert = torch.bucketize(rows, offs, right=True).clamp(max=len(offs) - 1)
            h = torch._grouped_mm(x.to(dtype), w1.to(dtype), offs=offs) + b1[row_expert]
            h = F.gelu(h).to(dtype)
            return torch._grouped_mm(h, w2.to(dtype), offs=offs) + b2[row_expert]
        # One matmul per expert needs the split sizes on the host: a device sync, inherent to this
        # path (CPU, fp32); the grouped GEMM above has none.
        sizes = tokens_per_expert.tolist()
        outputs = []
        for e, chunk in enumerate(torch.split(x[:sum(sizes)], sizes)):
            if chunk.shape[0]:
                h = F.gelu(chunk @ w1[e] + b1[e])
                outputs.append(h @ w2[e] + b2[e])
        return torch.cat(outputs) if outputs else x.new_zeros(0, w2.shape[-1])


# A constant to torch.compile, which would otherwise trace into Triton's environment lookups
# and break the graph there: the answer depends only on the device and this process's Triton.
@torch.compiler.assume_constant_result
def fused_dispatch_unavailable_reason(device: torch.device) -> str | None:
    """None when the fused dispatch kernels run on `device`; otherwise why not."""
    if kernel_runtime is None:
        return "m6_kernels is not importable; run `make install`"
    return kernel_runtime.unavailable_reason(device)


def use_fused_dispatch(backend: str, device: torch.device) -> bool:
    if backend not in MOE_DISPATCH_BACKENDS:
        raise ValueError(f"MoE dispatch backend {backend!r} is not one of {', '.join(MOE_DISPATCH_BACKENDS)}")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return False
    return fused_dispatch_unavailable_reason(device) is None


def resolve_moe_dispatch_backend(cfg: ModelConfig, device: torch.device) -> str:
    """The MoE dispatch backend on `device`, as the log line says it (with why, on a fallback)."""
    if use_fused_dispatch(cfg.moe_dispatch_backend, device):
        return f"fused ({kernel_runtime.describe()})"
    if cfg.moe_dispatch_backend == "fused":
        return f"torch (no fused dispatch: {fused_dispatch_unavailable_reason(device)})"
    return "torch"


class MoEMLP(nn.Module):
    """Router + experts. forward(x) -> (y, aux_loss); dropped tokens get y = 0 (the residual
    connection around the block carries them unchanged)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = GroupedExperts(cfg.num_experts, cfg.hidden_size, cfg.expert_ffn_hidden_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        with torch.autocast(x.device.type, enabled=False):  # the router in fp32 (precision.py)
            logits = self.router(fp32_or_wider(x))
        if use_fused_dispatch(self.cfg.moe_dispatch_backend, x.device):
            out, aux = self._forward_fused(x, logits)
        else:
            out, aux = self._forward_torch(x, logits)
        return out.reshape(shape), aux

    # Under torch.compile both dispatch paths are explicit graph breaks, run eagerly as one piece.
    # Their shapes depend on the routing: dropping by capacity (boolean-mask indexing) and
    # bincount have data-dependent sizes, the per-expert loop and expert parallelism's all-to-all
    # read split sizes on the host, and the fused path launches Triton kernels itself. Traced,
    # each of those would break the graph anyway, and the pieces between them would be
    # recompiled whenever the number of kept assignments or an expert's share changes, which is
    # every step.
    @torch.compiler.disable
    def _forward_torch(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with record_function("moe_dispatch"):
            routing = route(logits, self.cfg)
            # Permute: sort assignments by expert so each expert's tokens are contiguous.
            order = torch.argsort(routing.expert_idx, stable=True)
            token_idx, gate = routing.token_idx[order], routing.gate[order]
            counts = torch.bincount(routing.expert_idx, minlength=self.cfg.num_experts)
            rows = x[token_idx]
        with record_function("moe_experts"):
            y = self.experts(rows, counts)
        with record_function("moe_dispatch"):
            # Unpermute and combine: each token sums its experts' outputs weighted by the gates.
            out = torch.zeros_like(x).index_add_(0, token_idx, (y * gate[:, None]).to(x.dtype))
        return out, routing.aux_loss

    @torch.compiler.disable
    def _forward_fused(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from m6_kernels.moe import permute, topk_gating, unpermute

        with record_function("moe_dispatch"):
            dispatch = topk_gating(logits, router_topk(self.cfg), self.cfg.moe_expert_prototypes,
                                   expert_capacity(self.cfg, x.shape[0]))
            rows = permute(x, dispatch.dest, dispatch.num_rows)
        with record_function("moe_experts"):
            y = self.experts(rows, dispatch.tokens_per_expert)
        with record_function("moe_dispatch"):
            out = unpermute(y, dispatch.dest, dispatch.gate, x.dtype)
        return out, aux_loss(dispatch.probs, dispatch.picks_per_expert, dispatch.lse, self.cfg)
