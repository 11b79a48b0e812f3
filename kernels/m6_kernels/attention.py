"""Fused prefix-LM attention (forward and backward) in Triton, FlashAttention-style.

The M6 mask, per sample b: query i may attend key j iff j < valid_len[b] and
(j < prefix_len[b] or j <= i). Each program walks the key tiles (forward, dQ) or query tiles
(dK/dV) a block can see, in two phases: tiles every row of the block sees in full (no mask work)
and tiles on the causal diagonal or the prefix/padding edges (masked). Tiles nobody sees are never
loaded. Softmax statistics are kept in fp32 and in base 2 (exp2 is the native instruction); the
per-row log-sum-exp is saved for the backward pass, which recomputes probabilities tile by tile
(no S x S matrix is ever stored). dK/dV and dQ are separate kernels so no atomics are needed and
the gradients are deterministic.

Outputs are written in [B, S, H, D] memory (returned as [B, H, S, D] views), so the model's
`transpose(1, 2).reshape(B, S, H * D)` after attention is free.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from m6_kernels.runtime import triton_mode

HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


def _configs(gpu: list[tuple[int, int, int, int]], interpreter: tuple[int, int]) -> list[triton.Config]:
    """Autotuning candidates (BLOCK_M, BLOCK_N, warps, stages) on a GPU; one small odd-shaped tile
    for the interpreter (BLOCK_M != BLOCK_N, so a mix-up of the two shows in the tests)."""
    if triton_mode() == "interpreter":
        return [triton.Config({"BLOCK_M": interpreter[0], "BLOCK_N": interpreter[1]})]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in gpu]


# --------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, n0, rows, offs_n, offs_d,
              prefix, valid, qk_scale, MASKED: tl.constexpr, DOT: tl.constexpr):
    cols = n0 + offs_n
    if MASKED:
        load_ok = cols[:, None] < valid
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=load_ok, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=load_ok, other=0.0)
    else:
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :])
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :])
    s = tl.dot(q, tl.trans(k), input_precision=DOT) * qk_scale
    if MASKED:
        allowed = (cols[None, :] < valid) & ((cols[None, :] < prefix) | (cols[None, :] <= rows[:, None]))
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, PREFIX, VALID,
                stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                num_heads, seq_len, qk_scale,
                HEAD_DIM: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)  # 64-bit offsets: batch * stride can pass 2**31
    h = (bh % num_heads).to(tl.int64)
    prefix = tl.load(PREFIX + b)
    valid = tl.load(VALID + b)
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :],
                mask=rows[:, None] < seq_len, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Keys below min(valid, max(prefix, m0 + 1)) are visible to every row of the block; keys from
    # min(valid, max(prefix, m0 + BLOCK_M)) on are visible to none.
    full_end = (tl.minimum(valid, tl.maximum(prefix, m0 + 1)) // BLOCK_N) * BLOCK_N
    end = tl.minimum(valid, tl.maximum(prefix, m0 + BLOCK_M))
    for n0 in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, n0, rows,
                                  offs_n, offs_d, prefix, valid, qk_scale, False, DOT)
    for n0 in range(full_end, end, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, n0, rows,
                                  offs_n, offs_d, prefix, valid, qk_scale, True, DOT)
    empty = l_i == 0.0  # only when valid_len is 0: output 0, not 0/0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    row_ok = rows < seq_len
    tl.store(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh * seq_len + rows, lse, mask=row_ok)


_fwd = triton.autotune(
    configs=_configs([(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4)], (16, 32)),
    key=["seq_len", "HEAD_DIM", "DOT"])(_fwd_kernel)


# -------------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_os, stride_dob, stride_doh, stride_dos,
                      num_heads, seq_len, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d O_id * dO_id: the row term of the softmax backward."""
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = rows[:, None] < seq_len
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dos + offs_d[None, :],
                 mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * seq_len + rows, delta, mask=rows < seq_len)


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos, m0, cols,
               offs_m, offs_d, prefix, valid, seq_len, qk_scale, MASKED: tl.constexpr, DOT: tl.constexpr):
    rows = m0 + offs_m
    row_ok = rows < seq_len
    q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))  # rows past the end: p = 0
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    # Transposed tile: keys along dim 0, queries along dim 1.
    p = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT) * qk_scale - lse[None, :])
    if MASKED:
        allowed = (cols[:, None] < valid) & ((cols[:, None] < prefix) | (cols[:, None] <= rows[None, :]))
        p = tl.where(allowed, p, 0.0)
    dv += tl.dot(p.to(do.dtype), do, input_precision=DOT)
    dp = tl.dot(v, tl.trans(do), input_precision=DOT)
    ds = p * (dp - delta[None, :])
    if MASKED:  # padding keys may hold anything, even NaN: their gradients are exactly 0
        ds = tl.where(allowed, ds, 0.0)
    dk += tl.dot(ds.to(q.dtype), q, input_precision=DOT)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, PREFIX, VALID,
                     stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                     stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
                     stride_gb, stride_gh, stride_gs,
                     num_heads, seq_len, sm_scale, qk_scale,
                     HEAD_DIM: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK and dV of one key block, looping over the query blocks that see it."""
    n0 = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    prefix = tl.load(PREFIX + b)
    valid = tl.load(VALID + b)
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols[:, None] < seq_len
    k = tl.load(K + b * stride_kb + h * stride_kh + cols[:, None] * stride_ks + offs_d[None, :], mask=col_ok, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vs + offs_d[None, :], mask=col_ok, other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + bh * seq_len
    delta_base = DELTA + bh * seq_len
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # Queries that see part of this key block: all of them when it starts inside the prefix, else
    # those at or after its first key; none when it starts in the padding. The block is seen in
    # full by query blocks starting at or after its last key (or by all, inside prefix and valid).
    m_end = tl.cdiv(seq_len, BLOCK_M) * BLOCK_M
    lo = tl.where(n0 < prefix, 0, (n0 // BLOCK_M) * BLOCK_M)
    lo = tl.where(n0 < valid, lo, m_end)
    last = n0 + BLOCK_N - 1
    full_lo = tl.where(last < prefix, lo, tl.cdiv(last, BLOCK_M) * BLOCK_M)
    full_lo = tl.where(last < valid, full_lo, m_end)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), m_end)
    for m0 in range(lo, full_lo, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos, m0,
                            cols, offs_m, offs_d, prefix, valid, seq_len, qk_scale, True, DOT)
    for m0 in range(full_lo, seq_len, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos, m0,
                            cols, offs_m, offs_d, prefix, valid, seq_len, qk_scale, False, DOT)
    out = b * stride_gb + h * stride_gh + cols[:, None] * stride_gs + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, n0, rows, offs_n, offs_d,
             prefix, valid, qk_scale, MASKED: tl.constexpr, DOT: tl.constexpr):
    cols = n0 + offs_n
    if MASKED:
        load_ok = cols[:, None] < valid
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=load_ok, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=load_ok, other=0.0)
    else:
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :])
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :])
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT) * qk_scale - lse[:, None])
    if MASKED:
        allowed = (cols[None, :] < valid) & ((cols[None, :] < prefix) | (cols[None, :] <= rows[:, None]))
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, PREFIX, VALID,
                   stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                   stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
                   stride_gb, stride_gh, stride_gs,
                   num_heads, seq_len, sm_scale, qk_scale,
                   HEAD_DIM: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query block, over the same key tiles as the forward pass."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    prefix = tl.load(PREFIX + b)
    valid = tl.load(VALID + b)
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_len
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dos + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * seq_len + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * seq_len + rows, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end = (tl.minimum(valid, tl.maximum(prefix, m0 + 1)) // BLOCK_N) * BLOCK_N
    end = tl.minimum(valid, tl.maximum(prefix, m0 + BLOCK_M))
    for n0 in range(0, full_end, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, n0, rows, offs_n, offs_d,
                      prefix, valid, qk_scale, False, DOT)
    for n0 in range(full_end, end, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, n0, rows, offs_n, offs_d,
                      prefix, valid, qk_scale, True, DOT)
    tl.store(DQ + b * stride_gb + h * stride_gh + rows[:, None] * stride_gs + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


_dkdv = triton.autotune(
    configs=_configs([(32, 128, 8, 3), (64, 64, 4, 3), (64, 128, 8, 2), (32, 64, 4, 3)], (32, 16)),
    key=["seq_len", "HEAD_DIM", "DOT"])(_bwd_dkdv_kernel)
_dq = triton.autotune(
    configs=_configs([(128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3)], (32, 16)),
    key=["seq_len", "HEAD_DIM", "DOT"])(_bwd_dq_kernel)


# --------------------------------------------------------------------------------------- wrapper
def _bshd_like(x: torch.Tensor) -> torch.Tensor:
    """An empty [B, H, S, D] tensor stored as [B, S, H, D]."""
    B, H, S, D = x.shape
    return torch.empty(B, S, H, D, dtype=x.dtype, device=x.device).transpose(1, 2)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


class _PrefixLMAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prefix_len, valid_len, sm_scale):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        B, H, S, D = q.shape
        prefix = prefix_len.to(device=q.device, dtype=torch.int32).contiguous()
        valid = valid_len.to(device=q.device, dtype=torch.int32).contiguous()
        o = _bshd_like(q)
        lse = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
        dot = "ieee" if q.dtype == torch.float32 else None  # fp32 stays fp32: tf32 would cost 3e-4
        _fwd[lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)](
            q, k, v, o, lse, prefix, valid, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            H, S, sm_scale * LOG2E, HEAD_DIM=D, DOT=dot)
        ctx.save_for_backward(q, k, v, o, lse, prefix, valid)
        ctx.sm_scale, ctx.dot = sm_scale, dot
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, prefix, valid = ctx.saved_tensors
        do = _last_dim_contiguous(do)
        B, H, S, D = q.shape
        delta = torch.empty_like(lse)
        _bwd_delta_kernel[(triton.cdiv(S, 64), B * H)](
            o, do, delta, *_strides(o), *_strides(do), H, S, HEAD_DIM=D, BLOCK_M=64)
        dq, dk, dv = _bshd_like(q), _bshd_like(k), _bshd_like(v)
        common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
                  H, S, ctx.sm_scale, ctx.sm_scale * LOG2E)
        _dkdv[lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * H)](
            q, k, v, do, lse, delta, dk, dv, prefix, valid, *common, HEAD_DIM=D, DOT=ctx.dot)
        _dq[lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq, prefix, valid, *common, HEAD_DIM=D, DOT=ctx.dot)
        return dq, dk, dv, None, None, None


def unsupported_reason(head_dim: int, dtype: torch.dtype) -> str | None:
    """None when the kernel handles this head dimension and dtype; otherwise why not."""
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} (the fused kernel takes {', '.join(map(str, HEAD_DIMS))})"
    if dtype not in DTYPES:
        return f"dtype {dtype}"
    if dtype == torch.bfloat16 and triton_mode() == "interpreter":
        return "bf16 under the Triton interpreter (its tl.dot reads bf16 as integers)"
    return None


def prefix_lm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: torch.Tensor,
                        valid_len: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
    """Fused attention under the M6 prefix-LM mask. q, k, v: [B, H, S, D] (any B/H/S strides);
    prefix_len, valid_len: [B]. Differentiable in q, k, v. A sample with valid_len 0 gets zeros."""
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must have one shape [B, H, S, D], got {q.shape}, {k.shape}, {v.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    reason = unsupported_reason(q.shape[-1], q.dtype)
    if reason:
        raise ValueError(f"prefix_lm_attention does not support {reason}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    return _PrefixLMAttention.apply(q, k, v, prefix_len, valid_len, scale)
