"""Plain PyTorch references for every kernel in this package: the definitions the kernels are
tested against. They run in any dtype, float64 included, on any device, and favour obviousness
over speed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def prefix_lm_allowed(prefix_len: torch.Tensor, valid_len: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, 1, S, S] booleans: query i may attend key j iff j < valid and (j < prefix or j <= i)."""
    i = torch.arange(seq_len, device=prefix_len.device)[:, None]
    j = torch.arange(seq_len, device=prefix_len.device)[None, :]
    return ((j < valid_len[:, None, None]) & ((j < prefix_len[:, None, None]) | (j <= i)))[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: torch.Tensor,
              valid_len: torch.Tensor) -> torch.Tensor:
    """Softmax attention under the prefix-LM mask; rows that see nothing give zeros."""
    allowed = prefix_lm_allowed(prefix_len, valid_len, q.shape[2])
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))
    probs = torch.where(allowed.any(-1, keepdim=True), scores.softmax(-1), torch.zeros_like(scores))
    return probs @ v


def topk_gating(logits: torch.Tensor, topk: int, groups: int = 1, capacity: int | None = None) -> dict:
    """Router outputs from logits [T, E]: probabilities, top-k (or top-1 per group) picks and
    gates, and each pick's row in the expert-contiguous layout.

    Priority for capacity is every token's first pick, then every token's second, ...; an expert
    keeps its first `capacity` picks (all of them when capacity is None). Rows are ordered by
    expert, then by priority. Returns a dict of tensors: probs [T, E], lse [T], gate [T, k],
    expert [T, k], dest [T, k] (-1 when dropped), picks_per_expert [E], tokens_per_expert [E].
    """
    T, E = logits.shape
    lse = torch.logsumexp(logits, -1)
    if groups > 1:
        group_probs = logits.view(T, groups, E // groups).softmax(-1)
        gate, local = group_probs.max(-1)
        expert = local + torch.arange(groups, device=logits.device) * (E // groups)
        probs = group_probs.reshape(T, E) / groups
    else:
        probs = logits.softmax(-1)
        gate, expert = probs.topk(topk, -1)
        if topk > 1:
            gate = gate / gate.sum(-1, keepdim=True)
    k = expert.shape[1]
    flat = expert.t().reshape(-1)  # priority order
    one_hot = F.one_hot(flat, E)
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1
    picks = one_hot.sum(0)
    kept_counts = picks if capacity is None else picks.clamp(max=capacity)
    keep = torch.ones_like(flat, dtype=torch.bool) if capacity is None else position < capacity
    offsets = kept_counts.cumsum(0) - kept_counts
    dest = torch.where(keep, offsets[flat] + position, -1).view(k, T).t()
    return dict(probs=probs, lse=lse, gate=gate, expert=expert, dest=dest,
                picks_per_expert=picks, tokens_per_expert=kept_counts)


def permute(x: torch.Tensor, dest: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Row dest[t, r] of the result is x[t]; picks with dest -1 are dropped."""
    out = x.new_zeros(num_rows, x.shape[1])
    t, r = (dest >= 0).nonzero(as_tuple=True)
    out[dest[t, r]] = x[t]
    return out


def unpermute(y: torch.Tensor, dest: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_r gate[t, r] * y[dest[t, r]] over the kept picks."""
    kept = dest >= 0
    rows = y[dest.clamp(min=0)] * (gate * kept)[..., None]
    return rows.sum(1)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-row loss logsumexp(logits) - logits[label]; 0 where label == ignore_index."""
    keep = labels != ignore_index
    picked = logits.gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    return torch.where(keep, torch.logsumexp(logits, -1) - picked, torch.zeros_like(picked))
