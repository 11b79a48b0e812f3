"""Mixture-of-Experts MLP: a router picks experts per token, experts are small GELU MLPs.

Routing, as in the paper family:
- top-k gating (GShard; gates renormalised over the k picks when k > 1),
- or expert prototyping (M6-T): experts split into k groups, top-1 inside each group,
- a capacity factor (tokens beyond an expert's capacity are dropped, top-1 picks first),
  or dropless (capacity_factor None),
- the load-balancing auxiliary loss (Switch) and optionally the router z-loss (ST-MoE).

Dispatch is the sort-based "permute -> grouped GEMM -> unpermute and combine" pipeline, the same
whether or not tokens are dropped; dropping only removes assignments before the sort.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_m6.config import ModelConfig


@dataclass
class Routing:
    """Which expert each (token, pick) goes to, with what weight; dropped picks removed."""

    token_idx: torch.Tensor  # [N] token of each kept assignment
    expert_idx: torch.Tensor  # [N] expert of each kept assignment
    gate: torch.Tensor  # [N] combine weight of each kept assignment
    aux_loss: torch.Tensor  # scalar: load balancing (+ z-loss), already weighted by coefficients


def route(logits: torch.Tensor, cfg: ModelConfig) -> Routing:
    """Top-k (or prototype) routing with optional capacity, from router logits [T, E]."""
    T, E = logits.shape
    logits = logits.float()
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

    # Switch load-balancing loss: E * sum_e (fraction of picks to e) * (mean router prob of e).
    picks_per_expert = torch.zeros(E, device=logits.device).index_add_(
        0, expert.reshape(-1), torch.ones(T * k, device=logits.device))
    aux = E * torch.sum(picks_per_expert / (T * k) * probs.mean(0)) * cfg.moe_aux_loss_coeff
    if cfg.moe_z_loss_coeff:
        aux = aux + cfg.moe_z_loss_coeff * torch.logsumexp(logits, -1).square().mean()

    # Assignments in priority order: every token's first pick, then every token's second, ...
    expert_flat = expert.t().reshape(-1)
    gate_flat = gate.t().reshape(-1)
    token_flat = torch.arange(T, device=logits.device).repeat(k)
    if cfg.moe_capacity_factor is not None:
        capacity = math.ceil(cfg.moe_capacity_factor * T * k / E)
        one_hot = F.one_hot(expert_flat, E)
        position_in_expert = (one_hot.cumsum(0) * one_hot).sum(-1) - 1
        keep = position_in_expert < capacity
        expert_flat, gate_flat, token_flat = expert_flat[keep], gate_flat[keep], token_flat[keep]
    return Routing(token_flat, expert_flat, gate_flat, aux)


class GroupedExperts(nn.Module):
    """E GELU MLPs stored as stacked weights [E, ...] so they can be sharded over experts."""

    def __init__(self, num_experts: int, hidden: int, ffn: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.b1 = nn.Parameter(torch.zeros(num_experts, ffn))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        self.b2 = nn.Parameter(torch.zeros(num_experts, hidden))

    def forward(self, x: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        """x: [N, hidden], rows grouped by expert in order, `tokens_per_expert[e]` rows each."""
        outputs = []
        for e, chunk in enumerate(torch.split(x, tokens_per_expert)):
            if chunk.shape[0]:
                h = F.gelu(chunk @ self.w1[e] + self.b1[e])
                outputs.append(h @ self.w2[e] + self.b2[e])
        return torch.cat(outputs) if outputs else x.new_zeros(0, self.w2.shape[-1])


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
        r = route(self.router(x), self.cfg)
        # Permute: sort assignments by expert so each expert's tokens are contiguous.
        order = torch.argsort(r.expert_idx, stable=True)
        token_idx, gate = r.token_idx[order], r.gate[order]
        counts = torch.bincount(r.expert_idx, minlength=self.cfg.num_experts)
        y = self.experts(x[token_idx], counts.tolist())
        # Unpermute and combine: each token sums its experts' outputs weighted by the gates.
        out = torch.zeros_like(x).index_add_(0, token_idx, (y * gate[:, None]).to(x.dtype))
        return out.reshape(shape), r.aux_loss
