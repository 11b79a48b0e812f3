"""Model FLOPs per GPU and MFU for the log line.

A step's model FLOPs are counted the way `megatron_m6.model_size` counts them (torch's FLOP
counter over a meta-device forward and backward): every position of every padded sequence
through the transformer, plus the image encoder for each image sample. Recomputation is not
counted (it is overhead, not model work), nor are the masked tiles the fused attention skips.

MFU divides by the device's dense peak in the run's compute dtype. The peak comes from
`--peak-tflops`, else from the table of known devices below (matched on the CUDA device name,
most specific pattern first, so an H100 PCIe never gets the SXM's number), else from a matmul
timed once on this device: a new GPU gets a measured peak, not an old one's figure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megatron_m6.config import RunConfig
from megatron_m6.model_size import image_train_flops, train_flops_per_token
from megatron_m6.precision import compute_dtype

# Dense (no sparsity) tensor-core TFLOP/s from NVIDIA's data sheets, by compute dtype. fp32 is
# the CUDA-core rate: the trainer leaves TF32 off. Patterns are tried in order.
PEAK_TFLOPS: tuple[tuple[str, dict[torch.dtype, float]], ...] = (
    ("H100 PCIe", {torch.bfloat16: 756.0, torch.float32: 51.0}),
    ("H100 NVL", {torch.bfloat16: 835.0, torch.float32: 60.0}),
    ("H100", {torch.bfloat16: 989.0, torch.float32: 67.0}),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200 NVL", {torch.bfloat16: 835.0, torch.float32: 60.0}),
    ("H200", {torch.bfloat16: 989.0, torch.float32: 67.0}),
    ("A100", {torch.bfloat16: 312.0, torch.float32: 19.5}),
    ("B200", {torch.bfloat16: 2250.0}),
)
MATMUL_SIZE = {"cuda": 8192, "cpu": 1024}  # large enough to reach the peak, short to time


def table_peak(device_name: str, dtype: torch.dtype) -> float | None:
    """The data-sheet peak of a device named `device_name` in `dtype`, or None if not listed."""
    for pattern, peaks in PEAK_TFLOPS:
        if pattern in device_name:
            return peaks.get(dtype)
    return None


def measured_peak(device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """TFLOP/s of the best of `repeats` square matmuls on `device` (after one warm-up)."""
    n = MATMUL_SIZE.get(device.type, MATMUL_SIZE["cpu"])
    generator = torch.Generator().manual_seed(0)  # its own: the run's random streams stay untouched
    a, b = (torch.rand(n, n, generator=generator).to(device, dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


@dataclass(frozen=True)
class PeakFlops:
    tflops: float
    source: str  # said once in the log, so a wrong MFU can be traced to its denominator


def device_peak(cfg: RunConfig, device: torch.device) -> PeakFlops:
    """The peak MFU is measured against: --peak-tflops, the table, or a timed matmul."""
    dtype = compute_dtype(cfg.bf16, cfg.params_dtype)
    name = str(dtype).removeprefix("torch.")
    if cfg.peak_tflops:
        return PeakFlops(cfg.peak_tflops, "--peak-tflops")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    listed = table_peak(device_name, dtype) if device.type == "cuda" else None
    if listed:
        return PeakFlops(listed, f"{name} dense peak of {device_name} (data sheet)")
    n = MATMUL_SIZE.get(device.type, MATMUL_SIZE["cpu"])
    return PeakFlops(measured_peak(device, dtype),
                     f"{name} {n}x{n} matmul timed at start-up on {device_name} (not in the table)")


@dataclass(frozen=True)
class StepFlops:
    """Model FLOPs (forward + backward) of one padded sequence and of one image's encoder."""

    per_sequence: float
    per_image: float

    @classmethod
    def of(cls, cfg: RunConfig) -> StepFlops:
        return cls(train_flops_per_token(cfg.model, cfg.seq_length) * cfg.seq_length,
                   image_train_flops(cfg.model))

    def __call__(self, samples: float, images: float) -> float:
        return samples * self.per_sequence + images * self.per_image
