"""Fused Mixture-of-Experts dispatch in Triton: gating, permute, unpermute-and-combine.

`topk_gating` turns router logits [T, E] into everything dispatch needs in one pass over the
logits: probabilities (softmax, or softmax inside each of the expert-prototype groups), the top-k
picks and their gates, the logsumexp (router z-loss), and each pick's rank among the picks of its
expert inside its token block. A cumulative sum over the tiny [k * blocks, E] table of per-block
counts then gives every pick its row `dest` in the expert-contiguous layout (-1 when capacity
drops it) without a sort: rows are ordered by expert, then by priority (all first picks, then
all second picks, ...), exactly the layout of a stable argsort of the priority-ordered picks.

`permute` copies token rows into that layout, `unpermute` gathers them back and sums each token's
picks weighted by the gates; both are pure row gathers/scatters driven by `dest`, one program per
token, fp32 accumulation, no atomics (deterministic gradients). The expert-contiguous layout is
also what the expert-parallel all-to-all sends: each rank's slice is a run of whole experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from m6_kernels.runtime import triton_mode


def _block_tokens(num_experts: int) -> int:
    """Tokens per gating program: keep the [tokens, experts] tile near 16K values on a GPU."""
    if triton_mode() == "interpreter":
        return 16
    return max(16, min(128, 16384 // triton.next_power_of_2(num_experts)))


def _block_hidden(hidden: int) -> int:
    return min(triton.next_power_of_2(hidden), 32 if triton_mode() == "interpreter" else 2048)


# ---------------------------------------------------------------------------------------- gating
@triton.jit
def _group_softmax(x, cols, col_ok, group_size, GROUPS: tl.constexpr):
    """Softmax of each row of x inside each group of `group_size` consecutive columns."""
    probs = tl.zeros(x.shape, tl.float32)
    for g in tl.static_range(GROUPS):
        in_g = col_ok[None, :] & ((cols // group_size) == g)[None, :]
        xg = tl.where(in_g, x, float("-inf"))
        mg = tl.max(xg, 1)
        mg = tl.where(mg == float("-inf"), 0.0, mg)
        eg = tl.where(in_g, tl.exp(xg - mg[:, None]), 0.0)
        sg = tl.sum(eg, 1)
        probs += eg / tl.where(sg > 0.0, sg, 1.0)[:, None]
    return probs


@triton.jit
def _gating_fwd_kernel(LOGITS, PROBS, LSE, GATE, EXPERT, LOCAL, COUNTS, T, E, group_size, stride_l,
                       K: tl.constexpr, K_PAD: tl.constexpr, GROUPS: tl.constexpr, RENORM: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    blk = tl.program_id(0)
    rows = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    picks = tl.arange(0, K_PAD)
    row_ok = rows < T
    col_ok = cols < E
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(LOGITS + rows[:, None] * stride_l + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
    mx = tl.max(x, 1)
    mx = tl.where(row_ok, mx, 0.0)
    lse = mx + tl.log(tl.where(row_ok, tl.sum(tl.where(ok, tl.exp(x - mx[:, None]), 0.0), 1), 1.0))
    q = _group_softmax(x, cols, col_ok, group_size, GROUPS)
    tl.store(PROBS + rows[:, None] * E + cols[None, :], q / GROUPS, mask=ok)
    tl.store(LSE + rows, lse, mask=row_ok)

    gates = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    experts = tl.zeros([BLOCK_T, K_PAD], tl.int32)
    local = tl.zeros([BLOCK_T, K_PAD], tl.int32)
    remaining = tl.where(ok, q, -1.0)
    for r in tl.static_range(K):
        if GROUPS == 1:  # r-th largest probability overall
            candidates = remaining
        else:  # the largest inside group r
            candidates = tl.where(((cols // group_size) == r)[None, :], remaining, -1.0)
        e = tl.argmax(candidates, 1).to(tl.int32)
        g = tl.max(candidates, 1)
        hit = cols[None, :] == e[:, None]
        remaining = tl.where(hit, -1.0, remaining)
        # Rank of this pick among the block's rank-r picks of the same expert, and the counts.
        one_hot = (hit & row_ok[:, None]).to(tl.int32)
        before = tl.cumsum(one_hot, 0) - one_hot
        tl.store(COUNTS + (r * tl.num_programs(0) + blk) * E + cols, tl.sum(one_hot, 0), mask=col_ok)
        is_r = picks[None, :] == r
        gates = tl.where(is_r, g[:, None], gates)
        experts = tl.where(is_r, e[:, None], experts)
        local = tl.where(is_r, tl.sum(before * one_hot, 1)[:, None], local)
    if RENORM:
        gates = gates / tl.sum(gates, 1)[:, None]
    out = rows[:, None] * K + picks[None, :]
    out_ok = row_ok[:, None] & (picks[None, :] < K)
    tl.store(GATE + out, gates, mask=out_ok)
    tl.store(EXPERT + out, experts, mask=out_ok)
    tl.store(LOCAL + out, local, mask=out_ok)


@triton.jit
def _dest_kernel(EXPERT, LOCAL, BASE, OFFSETS, DEST, T, E, capacity,
                 K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr):
    """Row of each pick in the expert-contiguous layout: its expert's first row plus the number
    of earlier-priority picks of that expert; -1 past the capacity."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < T * K
    t = idx // K
    r = idx % K
    e = tl.load(EXPERT + idx, mask=ok, other=0)
    blocks = tl.cdiv(T, BLOCK_T)
    pos = tl.load(BASE + (r * blocks + t // BLOCK_T) * E + e, mask=ok, other=0) + tl.load(LOCAL + idx, mask=ok, other=0)
    dest = tl.where(pos < capacity, tl.load(OFFSETS + e, mask=ok, other=0) + pos, -1)
    tl.store(DEST + idx, dest, mask=ok)


@triton.jit
def _gating_bwd_kernel(LOGITS, PROBS, LSE, GATE, EXPERT, DGATE, DPROBS, DLSE, DLOGITS, T, E, group_size,
                       stride_l, K: tl.constexpr, K_PAD: tl.constexpr, GROUPS: tl.constexpr,
                       RENORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    picks = tl.arange(0, K_PAD)
    row_ok = rows < T
    col_ok = cols < E
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(LOGITS + rows[:, None] * stride_l + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    q = tl.load(PROBS + rows[:, None] * E + cols[None, :], mask=ok, other=0.0) * GROUPS  # group softmax
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    pick_ok = row_ok[:, None] & (picks[None, :] < K)
    gate = tl.load(GATE + rows[:, None] * K + picks[None, :], mask=pick_ok, other=0.0)
    dgate = tl.load(DGATE + rows[:, None] * K + picks[None, :], mask=pick_ok, other=0.0)
    expert = tl.load(EXPERT + rows[:, None] * K + picks[None, :], mask=pick_ok, other=-1)
    # d loss / d q, q being the group softmax: through probs = q / GROUPS and through the gates.
    dq = tl.load(DPROBS + rows[:, None] * E + cols[None, :], mask=ok, other=0.0) / GROUPS
    if RENORM:  # gate_r = q[e_r] / sum_s q[e_s]
        total = tl.zeros([BLOCK_T], tl.float32)
        for r in tl.static_range(K):
            e_r = tl.sum(tl.where(picks[None, :] == r, expert, 0), 1)
            total += tl.sum(tl.where(cols[None, :] == e_r[:, None], q, 0.0), 1)
        dgate = (dgate - tl.sum(dgate * gate, 1)[:, None]) / tl.where(total > 0.0, total, 1.0)[:, None]
    for r in tl.static_range(K):
        e_r = tl.sum(tl.where(picks[None, :] == r, expert, 0), 1)
        dg_r = tl.sum(tl.where(picks[None, :] == r, dgate, 0.0), 1)
        dq += tl.where(cols[None, :] == e_r[:, None], dg_r[:, None], 0.0)
    # Softmax backward inside each group, then the logsumexp term.
    qdq = q * dq
    row_term = tl.zeros(x.shape, tl.float32)
    for g in tl.static_range(GROUPS):
        in_g = ((cols // group_size) == g)[None, :]
        row_term = tl.where(in_g, tl.sum(tl.where(in_g, qdq, 0.0), 1)[:, None], row_term)
    dlse = tl.load(DLSE + rows, mask=row_ok, other=0.0)
    dx = q * (dq - row_term) + dlse[:, None] * tl.exp(x - lse[:, None])
    tl.store(DLOGITS + rows[:, None] * stride_l + cols[None, :], dx, mask=ok)


class _Gating(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, topk, groups, capacity):
        T, E = logits.shape
        block_t = _block_tokens(E)
        blocks = triton.cdiv(T, block_t)
        dev = logits.device
        probs = torch.empty(T, E, device=dev, dtype=torch.float32)
        lse = torch.empty(T, device=dev, dtype=torch.float32)
        gate = torch.empty(T, topk, device=dev, dtype=torch.float32)
        expert = torch.empty(T, topk, device=dev, dtype=torch.int32)
        local = torch.empty(T, topk, device=dev, dtype=torch.int32)
        counts = torch.empty(topk * blocks, E, device=dev, dtype=torch.int32)
        meta = dict(K=topk, K_PAD=triton.next_power_of_2(topk), GROUPS=groups,
                    RENORM=groups == 1 and topk > 1, BLOCK_T=block_t, BLOCK_E=triton.next_power_of_2(E))
        _gating_fwd_kernel[(blocks,)](logits, probs, lse, gate, expert, local, counts, T, E, E // groups,
                                      logits.stride(0), **meta)
        # Picks of an expert ahead of a block's: the exclusive scan over (rank, block) order.
        base = (counts.cumsum(0, dtype=torch.int32) - counts).contiguous()
        picks = counts.sum(0)
        kept = picks if capacity is None else picks.clamp(max=capacity)
        offsets = (kept.cumsum(0) - kept).to(torch.int32)
        dest = torch.empty(T, topk, device=dev, dtype=torch.int32)
        block = 256 if triton_mode() == "compiled" else 64
        _dest_kernel[(triton.cdiv(T * topk, block),)](
            expert, local, base, offsets, dest, T, E, T * topk if capacity is None else capacity,
            K=topk, BLOCK_T=block_t, BLOCK=block)
        ctx.save_for_backward(logits, probs, lse, gate, expert)
        ctx.meta = meta
        ctx.mark_non_differentiable(expert, dest, picks, kept)
        return probs, lse, gate, expert, dest, picks, kept

    @staticmethod
    def backward(ctx, dprobs, dlse, dgate, *_):
        logits, probs, lse, gate, expert = ctx.saved_tensors
        T, E = logits.shape
        dlogits = torch.empty(T, E, device=logits.device, dtype=torch.float32)
        meta = ctx.meta
        _gating_bwd_kernel[(triton.cdiv(T, meta["BLOCK_T"]),)](
            logits, probs, lse, gate, expert, dgate.contiguous(), dprobs.contiguous(), dlse.contiguous(),
            dlogits, T, E, E // meta["GROUPS"], E, **meta)
        return dlogits.to(logits.dtype), None, None, None


@dataclass
class Dispatch:
    """The router's decisions for T tokens and k picks each, in the layout the kernels use."""

    probs: torch.Tensor  # [T, E] router probabilities (within-group softmax / groups)
    lse: torch.Tensor  # [T] logsumexp of the logits (router z-loss)
    gate: torch.Tensor  # [T, k] combine weight of each pick
    expert: torch.Tensor  # [T, k] expert of each pick
    dest: torch.Tensor  # [T, k] row of each pick in the expert-contiguous layout, -1 if dropped
    picks_per_expert: torch.Tensor  # [E] picks before capacity (load-balancing loss)
    tokens_per_expert: torch.Tensor  # [E] rows per expert after capacity
    num_rows: int  # rows allocated for the expert-contiguous layout: the kept picks, then zeros


def topk_gating(logits: torch.Tensor, topk: int, groups: int = 1, capacity: int | None = None) -> Dispatch:
    """Route logits [T, E]: top-k over a softmax (gates renormalised when k > 1), or with
    groups > 1 top-1 inside each of `groups` expert groups (k == groups). Differentiable in the
    logits through probs, lse and gate. capacity=None is dropless."""
    T, E = logits.shape
    if groups > 1 and (E % groups or topk != groups):
        raise ValueError(f"{groups} expert groups need E divisible by groups and topk == groups")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    probs, lse, gate, expert, dest, picks, kept = _Gating.apply(logits.float(), topk, groups, capacity)
    # Known without reading the device: every pick (dropless), or as many as the experts' slots
    # can hold; the kept rows come first, expert by expert, and tokens_per_expert counts them.
    num_rows = T * topk if capacity is None else min(T * topk, E * capacity)
    return Dispatch(probs, lse, gate, expert, dest, picks, kept, num_rows)


# ------------------------------------------------------------------------------- permute/combine
@triton.jit
def _permute_kernel(X, DEST, OUT, H, stride_x, stride_o, K: tl.constexpr, BLOCK_H: tl.constexpr):
    """OUT[dest[t, r]] = X[t] for each kept pick r of token t."""
    t = tl.program_id(0).to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        col_ok = cols < H
        row = tl.load(X + t * stride_x + cols, mask=col_ok)
        for r in tl.static_range(K):
            d = tl.load(DEST + t * K + r + tl.zeros([BLOCK_H], tl.int64)).to(tl.int64)  # one value, as a vector
            tl.store(OUT + tl.maximum(d, 0) * stride_o + cols, row, mask=col_ok & (d >= 0))


@triton.jit
def _gather_sum_kernel(SRC, DEST, GATE, OUT, H, stride_s, stride_o, K: tl.constexpr,
                       WEIGHTED: tl.constexpr, BLOCK_H: tl.constexpr):
    """OUT[t] = sum_r w[t, r] * SRC[dest[t, r]] over kept picks, w = gate (WEIGHTED) or 1: the
    combine of unpermute, and the backward of permute."""
    t = tl.program_id(0).to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        col_ok = cols < H
        acc = tl.zeros([BLOCK_H], tl.float32)
        for r in tl.static_range(K):
            d = tl.load(DEST + t * K + r + tl.zeros([BLOCK_H], tl.int64)).to(tl.int64)
            src = tl.load(SRC + tl.maximum(d, 0) * stride_s + cols, mask=col_ok & (d >= 0), other=0.0)
            if WEIGHTED:
                acc += tl.load(GATE + t * K + r) * src.to(tl.float32)
            else:
                acc += src.to(tl.float32)
        tl.store(OUT + t * stride_o + cols, acc.to(OUT.dtype.element_ty), mask=col_ok)


@triton.jit
def _unpermute_bwd_kernel(DOUT, Y, DEST, GATE, DY, DGATE, H, stride_do, stride_y, stride_dy,
                          K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    """dY[dest[t, r]] = gate[t, r] * dOut[t]; dGate[t, r] = <dOut[t], Y[dest[t, r]]>."""
    t = tl.program_id(0).to(tl.int64)
    picks = tl.arange(0, K_PAD)
    dgate = tl.zeros([K_PAD], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        col_ok = cols < H
        dout = tl.load(DOUT + t * stride_do + cols, mask=col_ok, other=0.0).to(tl.float32)
        for r in tl.static_range(K):
            d = tl.load(DEST + t * K + r + tl.zeros([BLOCK_H], tl.int64)).to(tl.int64)
            kept = col_ok & (d >= 0)
            g = tl.load(GATE + t * K + r)
            tl.store(DY + tl.maximum(d, 0) * stride_dy + cols, (g * dout).to(DY.dtype.element_ty), mask=kept)
            y = tl.load(Y + tl.maximum(d, 0) * stride_y + cols, mask=kept, other=0.0).to(tl.float32)
            dgate += tl.where(picks == r, tl.sum(dout * y, 0), 0.0)
    tl.store(DGATE + t * K + picks, dgate, mask=picks < K)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


def _gather_sum(src: torch.Tensor, dest: torch.Tensor, gate: torch.Tensor | None,
                out_dtype: torch.dtype) -> torch.Tensor:
    T, K = dest.shape
    H = src.shape[1]
    out = torch.empty(T, H, device=src.device, dtype=out_dtype)
    _gather_sum_kernel[(T,)](src, dest, gate, out, H, src.stride(0), out.stride(0),
                             K=K, WEIGHTED=gate is not None, BLOCK_H=_block_hidden(H))
    return out


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dest, num_rows):
        x = _rows_contiguous(x)
        T, H = x.shape
        out = torch.zeros(num_rows, H, device=x.device, dtype=x.dtype)  # rows past the kept ones stay 0
        _permute_kernel[(T,)](x, dest, out, H, x.stride(0), out.stride(0), K=dest.shape[1], BLOCK_H=_block_hidden(H))
        ctx.save_for_backward(dest)
        return out

    @staticmethod
    def backward(ctx, dout):
        (dest,) = ctx.saved_tensors
        dout = _rows_contiguous(dout)
        return _gather_sum(dout, dest, None, dout.dtype), None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, dest, gate, out_dtype):
        y = _rows_contiguous(y)
        ctx.save_for_backward(y, dest, gate)
        return _gather_sum(y, dest, gate, out_dtype)

    @staticmethod
    def backward(ctx, dout):
        y, dest, gate = ctx.saved_tensors
        dout = _rows_contiguous(dout)
        T, K = dest.shape
        H = y.shape[1]
        dy = torch.zeros_like(y)  # rows past the kept picks get no gradient
        dgate = torch.empty(T, K, device=y.device, dtype=torch.float32)
        _unpermute_bwd_kernel[(T,)](dout, y, dest, gate, dy, dgate, H, dout.stride(0), y.stride(0), dy.stride(0),
                                    K=K, K_PAD=triton.next_power_of_2(K), BLOCK_H=_block_hidden(H))
        return dy, None, dgate.to(gate.dtype), None


def _check_dest(dest: torch.Tensor) -> torch.Tensor:
    if dest.dim() != 2:
        raise ValueError(f"dest must be [T, k], got shape {tuple(dest.shape)}")
    return dest.to(torch.int32).contiguous()


def permute(x: torch.Tensor, dest: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Token rows x [T, H] into the expert-contiguous layout [num_rows, H]: row dest[t, r] = x[t].
    `dest` must map the kept picks one-to-one onto the first rows (as topk_gating's does); the
    rest are zeros."""
    return _Permute.apply(x, _check_dest(dest), num_rows)


def unpermute(y: torch.Tensor, dest: torch.Tensor, gate: torch.Tensor,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Expert outputs y [num_rows, H] back to tokens, combined: out[t] = sum_r gate[t, r] * y[dest[t, r]]
    (fp32 sums, `out_dtype`, default y's). Differentiable in y and gate."""
    return _Unpermute.apply(y, _check_dest(dest), gate.float().contiguous(), out_dtype or y.dtype)
