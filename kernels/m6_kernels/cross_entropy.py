"""Fused cross entropy in Triton that never materialises the softmax: the forward pass streams
each row of logits once, keeping a running max and sum of exponentials (fp32) and saving only the
per-row logsumexp; the backward pass streams the row again and writes
(softmax - one_hot(label)) * dloss directly as the gradient. With a vocabulary of tens of
thousands this saves the [tokens, vocab] fp32 probabilities PyTorch keeps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from m6_kernels.runtime import triton_mode


def _block_vocab(vocab: int) -> int:
    return min(triton.next_power_of_2(vocab), 64 if triton_mode() == "interpreter" else 4096)


@triton.jit
def _ce_fwd_kernel(LOGITS, LABELS, LOSS, LSE, V, stride, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    # Running max and sum of exponentials, one per lane; merged at the end.
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - safe) + tl.exp(x - safe)
        m = m_new
    top = tl.max(m, 0)
    log_sum = tl.log(tl.sum(s * tl.exp(m - top), 0))
    label = tl.load(LABELS + row)
    picked = tl.load(base + tl.maximum(label, 0)).to(tl.float32)
    # (top - picked) + log_sum, not lse - picked: no cancellation when the logits are large.
    tl.store(LOSS + row, tl.where(label == ignore_index, 0.0, (top - picked) + log_sum))
    tl.store(LSE + row, top + log_sum)


@triton.jit
def _ce_bwd_kernel(LOGITS, LABELS, LSE, DLOSS, DLOGITS, V, stride, stride_d, ignore_index,
                   BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS + row)
    scale = tl.where(label == ignore_index, 0.0, tl.load(DLOSS + row))
    lse = tl.load(LSE + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < V
        x = tl.load(LOGITS + row * stride + cols, mask=ok, other=0.0).to(tl.float32)
        grad = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * scale
        tl.store(DLOGITS + row * stride_d + cols, grad.to(DLOGITS.dtype.element_ty), mask=ok)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        N, V = logits.shape
        loss = torch.empty(N, device=logits.device, dtype=torch.float32)
        lse = torch.empty_like(loss)
        _ce_fwd_kernel[(N,)](logits, labels, loss, lse, V, logits.stride(0), ignore_index,
                             BLOCK_V=_block_vocab(V), num_warps=8 if V >= 4096 else 4)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, dloss):
        logits, labels, lse = ctx.saved_tensors
        N, V = logits.shape
        dlogits = torch.empty_like(logits)
        _ce_bwd_kernel[(N,)](logits, labels, lse, dloss.contiguous(), dlogits, V, logits.stride(0),
                             dlogits.stride(0), ctx.ignore_index, BLOCK_V=_block_vocab(V),
                             num_warps=8 if V >= 4096 else 4)
        return dlogits, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-row cross entropy [N] in fp32 of logits [N, V] (any float dtype) against labels [N];
    0 for rows labelled `ignore_index`. Differentiable in the logits."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy takes logits [N, V] and labels [N], got {tuple(logits.shape)}, "
                         f"{tuple(labels.shape)}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return _CrossEntropy.apply(logits, labels.contiguous(), ignore_index)
