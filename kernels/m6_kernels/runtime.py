"""Where the Triton kernels can run in this process, and why not when they cannot.

Triton fixes at import of a kernel module (at `@triton.jit`) whether the kernels are compiled for
the GPU or run by its interpreter on CPU (`TRITON_INTERPRET=1`, what CI uses). The mode is read
once here so that every caller agrees with the kernels this process built.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_mode() -> str | None:
    """"compiled" (GPU), "interpreter" (CPU, TRITON_INTERPRET=1) or None (Triton not installed)."""
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    knobs = getattr(triton, "knobs", None)  # Triton < 3.4 has no knobs: read the variable itself
    interpret = knobs.runtime.interpret if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"
    return "interpreter" if interpret else "compiled"


def unavailable_reason(device: torch.device) -> str | None:
    """None when the kernels run on tensors of `device`; otherwise why not, in a few words."""
    mode = triton_mode()
    if mode is None:
        return "Triton is not installed"
    if mode == "compiled" and device.type != "cuda":
        return f"Triton compiles for CUDA, not {device.type}; TRITON_INTERPRET=1 runs it on CPU"
    if mode == "interpreter" and device.type != "cpu":
        return f"TRITON_INTERPRET=1 runs the kernels on CPU, not {device.type}"
    return None


def describe() -> str:
    """'Triton' or 'Triton interpreter', for the backend log line."""
    return "Triton interpreter" if triton_mode() == "interpreter" else "Triton"
