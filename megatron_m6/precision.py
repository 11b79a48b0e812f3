"""Numerical precision of a run, written down once; every layout follows it.

With `--bf16` (the production setting):

- bf16: the inputs of every matmul and convolution (autocast casts them; FSDP gathers the
  transformer blocks' matmul weights already in bf16, the same rounding), and what travels
  between ranks: the LayerNorm outputs that sequence parallelism all-gathers, the tensor-parallel
  reductions of attention and MLP outputs, the expert-parallel all-to-all payloads, the hidden
  states between pipeline stages, and the gradients of all of these on the way back.
- fp32: master weights and optimizer state, gradient accumulation and reduction (FSDP's
  reduce_dtype, GradAllReduce's buckets), the residual stream (the embedding output and every
  block's `x + f(x)`; a pipeline stage casts it to bf16 to send and back to fp32 on arrival),
  LayerNorm (weights, statistics and arithmetic; see `LayerNorm`), BatchNorm (weights and running
  statistics stay fp32 and FSDP never casts them; CPU and cuDNN normalise bf16 inputs with fp32
  statistics), softmax statistics (the attention kernels keep them in fp32), the router, the
  loss and the MoE auxiliary losses.

Without `--bf16` everything is in the parameters' dtype: fp32, or float64 with
`--params-dtype float64`, a reference-precision run in which every layout must reproduce one
process to within float64 rounding (tests/test_parallel.py). Nothing that is fp32 above ever
drops below the parameters' precision (`fp32_or_wider`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PARAMS_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def fp32_or_wider(t: torch.Tensor) -> torch.Tensor:
    """`t` in fp32, or unchanged when it is float64: for the loss, the router, the residual
    stream and statistics, which never compute below fp32 nor lose a float64 run's precision."""
    return t if t.dtype == torch.float64 else t.float()


def reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gradients of `dtype` parameters are reduced (and their norms summed) in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(bf16: bool, params_dtype: str) -> torch.dtype:
    """The dtype matmuls compute in, and activations travel between ranks in."""
    return torch.bfloat16 if bf16 else PARAMS_DTYPES[params_dtype]


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on this kind of device, or None when it is off (or, as on
    the meta device, does not exist)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def to_compute_dtype(t: torch.Tensor) -> torch.Tensor:
    """`t` in autocast's dtype when autocast is on (what a matmul would cast it to anyway): the
    dtype in which an activation leaves for another rank."""
    dtype = autocast_dtype(t.device.type)
    return t if dtype is None else t.to(dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm in fp32 (or wider) whatever the input; the output in autocast's dtype under
    autocast, else in the input's.

    Its output only ever feeds a matmul, which would cast it to bf16 anyway; returning bf16
    here means that under sequence parallelism the all-gather between the norm and the matmul
    moves half the bytes (CUDA's autocast would hand it on in fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = autocast_dtype(x.device.type) or x.dtype
        out = F.layer_norm(fp32_or_wider(x), self.normalized_shape, fp32_or_wider(self.weight),
                           fp32_or_wider(self.bias), self.eps)  # autocast keeps fp32 here
        return out.to(out_dtype)
