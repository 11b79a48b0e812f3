"""Model FLOPs and MFU: the count behind the log line against torch's FLOP counter over a real
training step, the device-peak table's matching, and what the log says of its denominator."""

import re

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megatron_m6.config import parse_args
from megatron_m6.pretrain import setup
from megatron_m6.training.throughput import PEAK_TFLOPS, device_peak, table_peak
from megatron_m6.training.trainer import StepStats
from tests.parallel_harness import TINY


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.0),  # SXM
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),  # not the SXM's number, though it says H100
    ("NVIDIA H100 NVL", torch.float32, 60.0),
    ("NVIDIA H200", torch.bfloat16, 989.0),
    ("NVIDIA H200 NVL", torch.bfloat16, 835.0),
    ("NVIDIA A100-SXM4-80GB", torch.float32, 19.5),
    ("NVIDIA B200", torch.float32, None),  # listed, but not in this dtype: measured instead
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, None),  # unknown: measured, never a neighbour's
])
def test_the_peak_table_matches_the_most_specific_name(name, dtype, peak):
    assert table_peak(name, dtype) == peak


def test_every_pattern_of_the_table_is_reachable():
    """A pattern shadowed by an earlier, shorter one would never match its own device."""
    patterns = [p for p, _ in PEAK_TFLOPS]
    for i, later in enumerate(patterns):
        assert not any(earlier in later for earlier in patterns[:i]), later


def test_peak_tflops_overrides_and_a_cpu_gets_a_measured_peak():
    cfg = parse_args(TINY + ["--peak-tflops", "123.5"])
    assert device_peak(cfg, torch.device("cpu")).tflops == 123.5
    measured = device_peak(parse_args(TINY), torch.device("cpu"))
    assert measured.tflops > 0 and "timed at start-up" in measured.source


@pytest.mark.parametrize("model_flags", [[], ["--num-experts", "4", "--moe-router-topk", "2"]],
                         ids=["dense", "moe"])
def test_step_flops_equal_the_flop_counter_over_a_real_step(model_flags):
    """Every matmul, convolution and attention of a real forward and backward, counted by torch
    on this CPU, equals what the log line counts from the step's sample and image counts."""
    # Dropless routing with top-2 of 4 experts: every token reaches 2 experts, as the count assumes.
    cfg = parse_args(TINY + model_flags + ["--no-resnet-bottleneck"])
    trainer, loader = setup(cfg, log=lambda line: None)
    batches = iter(loader)
    micro = [next(batches) for _ in range(trainer.num_micro_batches)]
    samples = sum(b["tokens"].shape[0] for b in micro)
    images = sum(int(b["has_image"].sum()) for b in micro)
    assert 0 < images < samples  # both kinds of sample, so both terms are checked
    counter = FlopCounterMode(display=False)
    # torch's counter has no formula for the CPU's fused attention op: the math backend's matmuls
    # make the reference count attention too.
    with counter, sdpa_kernel(SDPBackend.MATH):
        trainer.forward_backward(micro, StepStats())
    assert trainer._model_flops(samples, images) == counter.get_total_flops()


def test_the_log_line_shows_tflops_and_mfu_against_a_named_peak():
    lines = []
    cfg = parse_args(TINY + ["--log-interval", "1", "--train-iters", "2", "--peak-tflops", "0.5",
                             "--no-resnet-bottleneck"])
    trainer, loader = setup(cfg, log=lines.append)
    trainer.train(loader)
    assert [line for line in lines if line.startswith("MFU against")] == [
        "MFU against 0.5 TFLOP/s per device: --peak-tflops"]
    logged = [line for line in lines if line.startswith("iteration")]
    assert len(logged) == 2
    for line in logged:
        tflops = float(re.search(r"TFLOP/s/GPU ([\d.e+-]+)", line).group(1))
        mfu = float(re.search(r"MFU ([\d.e+-]+)%", line).group(1))
        assert tflops > 0
        # Printed to 4 and 3 significant digits: rounding moves them by up to 5e-4 and 5e-3.
        assert mfu == pytest.approx(100 * tflops / 0.5, rel=5.5e-3)
