"""Fused LayerNorm in Triton: one read of x and one write of y in the forward pass, one read of
x and dy in the backward, with the weight and bias gradients summed per program in fp32 and
reduced once at the end (deterministic, no atomics). Mean and 1/std are kept from the forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from m6_kernels.runtime import triton_mode

MAX_FEATURES = 65536  # one row is one block


@triton.jit
def _ln_fwd_kernel(X, W, B, Y, MEAN, RSTD, C, stride_x, stride_y, eps, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < C
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / C
    xc = tl.where(ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / C + eps)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xc * rstd * w + b).to(Y.dtype.element_ty), mask=ok)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _ln_bwd_kernel(X, W, DY, DX, MEAN, RSTD, DW_PART, DB_PART, N, C, stride_x, stride_dy, stride_dx,
                   BLOCK_C: tl.constexpr):
    """Rows pid, pid + programs, ...: dx, and this program's share of dw and db."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < C
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], tl.float32)
    db = tl.zeros([BLOCK_C], tl.float32)
    for row in range(pid, N, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)
        x = tl.load(X + row64 * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
        xhat = tl.where(ok, (x - tl.load(MEAN + row)) * tl.load(RSTD + row), 0.0)
        g = dy * w
        dx = (g - tl.sum(g, 0) / C - xhat * (tl.sum(g * xhat, 0) / C)) * tl.load(RSTD + row)
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=ok)
        dw += dy * xhat
        db += dy
    tl.store(DW_PART + pid * C + cols, dw, mask=ok)
    tl.store(DB_PART + pid * C + cols, db, mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(1) == 1 else x.contiguous()


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        shape = x.shape
        x2 = _rows(x)
        N, C = x2.shape
        y = torch.empty(N, C, device=x.device, dtype=x.dtype)
        mean = torch.empty(N, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        block = triton.next_power_of_2(C)
        _ln_fwd_kernel[(N,)](x2, weight, bias, y, mean, rstd, C, x2.stride(0), y.stride(0), eps,
                             BLOCK_C=block, num_warps=min(16, max(1, block // 256)))
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        N, C = x2.shape
        dx = torch.empty_like(x2)
        if triton_mode() == "interpreter":
            programs = min(N, 4)
        else:
            programs = min(N, 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count)
        dw = torch.empty(programs, C, device=x2.device, dtype=torch.float32)
        db = torch.empty_like(dw)
        block = triton.next_power_of_2(C)
        _ln_bwd_kernel[(programs,)](x2, weight, dy2, dx, mean, rstd, dw, db, N, C, x2.stride(0), dy2.stride(0),
                                    dx.stride(0), BLOCK_C=block, num_warps=min(16, max(1, block // 256)))
        return dx.view(ctx.shape), dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype), None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension (fp32 statistics, output in x's dtype); differentiable
    in x, weight and bias."""
    if x.shape[-1] > MAX_FEATURES or x.numel() == 0:
        raise ValueError(f"layer_norm takes 1..{MAX_FEATURES} features per row, got shape {tuple(x.shape)}")
    return _LayerNorm.apply(x, weight.contiguous(), bias.contiguous(), eps)
