"""The one attention function of the model, and the M6 prefix-LM mask it applies.

Query i may attend key j iff j < valid_len and (j < prefix_len or j <= i): the prefix (image and
source text) is bidirectional, the target is causal, padding is invisible. Every attention call in
the model goes through `attention()`, and this is where the backend is chosen
(`ModelConfig.attention_backend`, flag `--attention-backend`):

- "fused": the Triton kernel of m6_kernels (tiles nobody sees are skipped);
- "sdpa": PyTorch's scaled_dot_product_attention with an explicit boolean mask;
- "flex": FlexAttention with the same mask as a block mask (compiled on CUDA);
- "auto": fused for bf16/fp16 on CUDA when Triton is there, sdpa otherwise.

The fused kernel does not do dropout or KV-cache decoding (queries offset from keys); those calls,
and any the kernel cannot take (head dim, dtype, no Triton), run on sdpa.

Under `--compile` (blocks compiled in megatron_m6/parallel/parallelize.py) the fused kernel is an
explicit graph break (`torch.compiler.disable`): it is an autograd.Function that launches its
Triton kernels itself (through the interpreter on CPU), already one fused kernel per pass, so
Inductor has nothing to fuse into it; tracing it would need it registered as a custom op
(torch.library.triton_op) in m6_kernels. What is around it (projections, rotary, norms, MLP) is
compiled; sdpa compiles without a break. The "attention" profiler range is dropped from
compiled code: Dynamo treats record_function as a no-op there unless
`torch._dynamo.config.capture_profiler_record_function` is set, and that setting allows no graph
break inside a range. FlexAttention under --compile (CUDA only) is not tested on CPU.
"""

from __future__ import annotations

import functools
from typing import get_args

import torch
import torch.nn.functional as F

from megatron_m6.config import AttentionBackend, ModelConfig

try:
    from m6_kernels import runtime as kernel_runtime
except ImportError:  # kernels/ neither installed nor on the path: PyTorch only
    kernel_runtime = None

ATTENTION_BACKENDS = get_args(AttentionBackend)  # the values --attention-backend takes
_HALF = (torch.float16, torch.bfloat16)


def prefix_lm_mask(prefix_len: torch.Tensor, valid_len: torch.Tensor, q_len: int, k_len: int,
                   q_start: int = 0) -> torch.Tensor:
    """Boolean mask [B, 1, q_len, k_len], True where attention is allowed.

    `q_start` is the global position of the first query (non-zero when decoding with a KV cache).
    """
    device = prefix_len.device
    i = torch.arange(q_start, q_start + q_len, device=device)[None, :, None]
    j = torch.arange(k_len, device=device)[None, None, :]
    prefix = prefix_len[:, None, None]
    valid = valid_len[:, None, None]
    return ((j < valid) & ((j < prefix) | (j <= i)))[:, None]


# A constant to torch.compile, which would otherwise trace into Triton's environment lookups
# and break the graph there: the answer depends only on its arguments and this process's Triton.
@torch.compiler.assume_constant_result
def fused_unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when the fused kernel can run here; otherwise why not, in a few words."""
    if kernel_runtime is None:
        return "m6_kernels is not importable; run `make install`"
    reason = kernel_runtime.unavailable_reason(device)
    if reason is None:
        from m6_kernels.attention import unsupported_reason

        reason = unsupported_reason(head_dim, dtype)
    return reason


def _pick(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
          dropout_p: float) -> str:
    """The backend one call runs on."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    if backend == "sdpa":
        return "sdpa"
    if backend == "flex":
        # Flex has no dropout, and on CPU no backward.
        needs_grad = any(t.requires_grad for t in (q, k, v))
        return "flex" if not dropout_p and (q.is_cuda or not needs_grad) else "sdpa"
    if dropout_p or q_start or q.shape != k.shape or not q.dtype == k.dtype == v.dtype:
        return "sdpa"
    if backend == "auto" and not (q.is_cuda and q.dtype in _HALF):
        return "sdpa"
    return "fused" if fused_unavailable_reason(q.device, q.dtype, q.shape[-1]) is None else "sdpa"


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, prefix_len, valid_len, q_start):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, i, j):
        return (j < valid_len[b]) & ((j < prefix_len[b]) | (j <= i + q_start))

    block_mask = create_block_mask(mask_mod, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)
    return (_compiled_flex() if q.is_cuda else flex_attention)(q, k, v, block_mask=block_mask)


@torch.compiler.disable
def _fused(q, k, v, prefix_len, valid_len):
    """The Triton kernel, run eagerly under torch.compile (see the module docstring)."""
    from m6_kernels.attention import prefix_lm_attention

    return prefix_lm_attention(q, k, v, prefix_len, valid_len)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: torch.Tensor,
              valid_len: torch.Tensor, q_start: int = 0, dropout_p: float = 0.0,
              backend: str = "auto") -> torch.Tensor:
    """Masked scaled dot-product attention. q: [B, H, Sq, D]; k, v: [B, H, Sk, D]."""
    chosen = _pick(backend, q, k, v, q_start, dropout_p)
    with torch.profiler.record_function("attention"):
        if chosen == "fused":
            return _fused(q, k, v, prefix_len, valid_len)
        if chosen == "flex":
            return _flex(q, k, v, prefix_len, valid_len, q_start)
        mask = prefix_lm_mask(prefix_len, valid_len, q.shape[2], k.shape[2], q_start)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def resolve_attention_backend(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> str:
    """The backend training attention runs on for `device` and compute `dtype`, as the log line
    says it: the name, and why when the one asked for cannot run. (Decoding with a KV cache
    always runs on sdpa.)"""
    asked = cfg.attention_backend
    if asked == "sdpa":
        return "sdpa"
    if asked == "flex":
        if cfg.attention_dropout:
            return "sdpa (flex has no attention dropout)"
        return "flex" if device.type == "cuda" else "sdpa (flex has no backward on CPU; flex in evaluation)"
    if asked == "auto" and not (device.type == "cuda" and dtype in _HALF):
        return "sdpa"
    reason = fused_unavailable_reason(device, dtype, cfg.head_dim)
    if reason is None and cfg.attention_dropout:
        reason = "it has no attention dropout"
    if reason:
        return f"sdpa (no fused kernel: {reason})"
    return f"fused ({kernel_runtime.describe()})"
