"""Numerical precision of a run, written down once.

Master weights, gradient reduction, optimizer state, the loss and the router are never below
fp32. `--params-dtype float64` raises all of them to float64: a reference-precision run in which
every layout must reproduce one process to within float64 rounding (tests/test_parallel.py).
"""

from __future__ import annotations

import torch

PARAMS_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def fp32_or_wider(t: torch.Tensor) -> torch.Tensor:
    """`t` in fp32, or unchanged when it is float64: for the loss, the router and statistics,
    which never compute below fp32 and never lose the precision of a float64 run."""
    return t if t.dtype == torch.float64 else t.float()


def reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gradients of `dtype` parameters are reduced (and their norms summed) in."""
    return torch.float64 if dtype == torch.float64 else torch.float32
