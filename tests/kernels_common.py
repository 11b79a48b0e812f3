"""Shared set-up of the kernel tests: where they run, fresh random inputs, the error measure.

Without a CUDA device the kernels run in Triton's interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports Triton. Triton is a test dependency, so a missing one
fails here rather than skipping the kernel tests.
"""

import os

import torch
import triton  # noqa: F401

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
# DESIGN.md: float32 below 1e-5, bf16/fp16 below 2e-2 (relative ||out - ref|| / ||ref||). From the
# unit roundoff: fp32 6e-8 grows to ~1e-6 over the reductions of these sizes (a few hundred
# terms), so 1e-5 leaves 10x; bf16's 3.9e-3 (fp16's 4.9e-4) on inputs and outputs is ~1e-2.
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
# The interpreter's tl.dot reads bf16 as integers (Triton 3.9): bf16 matmul kernels run on GPUs only.
MATMUL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


def fresh_generator() -> tuple[torch.Generator, int]:
    """A generator seeded afresh each run (the seed goes into failure messages)."""
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has a NaN."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if torch.isnan(out).any():
        return float("inf")
    return float((out - ref).norm() / ref.norm())
