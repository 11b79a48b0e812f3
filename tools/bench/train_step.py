"""Training step time, tokens/s and model FLOP utilisation for a preset on synthetic batches.

    python tools/bench/train_step.py --preset m6-tiny               # CPU
    python tools/bench/train_step.py --preset m6-base --bf16        # one GPU

Utilisation is reported against a matmul ceiling measured in the same process on the same
device and dtype (not a datasheet number), so the ratio is meaningful on any machine. FLOPs per
token come from `megatron_m6.model_size` (meta-device count of the transformer; the ResNet's
image FLOPs are not included, so utilisation is slightly understated for image batches).
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from megatron_m6.config import build_parser, config_from_args, validate  # noqa: E402
from megatron_m6.data.dataset import MockDataset, build_data_loader  # noqa: E402
from megatron_m6.model import M6  # noqa: E402
from megatron_m6.model_size import train_flops_per_token  # noqa: E402
from megatron_m6.pretrain import pick_device, seed_everything  # noqa: E402
from megatron_m6.training.trainer import StepStats, Trainer  # noqa: E402


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Achieved FLOP/s of a square matmul: the practical peak to compare a training step with."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = build_parser()
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    ns = parser.parse_args()
    warmup, iters = ns.warmup, ns.iters
    del ns.warmup, ns.iters
    ns.mock_data = True
    ns.preset = ns.preset or "m6-tiny"
    cfg = config_from_args(ns)
    cfg.train_iters = warmup + iters
    validate(cfg)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    m = cfg.model
    model = M6(m).to(device)
    trainer = Trainer(cfg, model, device=device, log=lambda s: None)
    data = MockDataset(m.vocab_size, cfg.seq_length, m.num_image_tokens, m.image_size, cfg.seed,
                       cfg.train_iters * cfg.global_batch_size)
    batches = iter(build_data_loader(data, cfg.micro_batch_size, cfg.seq_length, 0, m.image_size, 0, 0))
    steps = [[next(batches) for _ in range(cfg.micro_batches_per_rank())] for _ in range(cfg.train_iters)]

    stats = StepStats(device)
    for micro in steps[:warmup]:
        trainer.train_step(micro, stats)
    sync(device)
    tokens = sum(int(b["valid_len"].sum()) for micro in steps[warmup:] for b in micro)
    start = time.perf_counter()
    for micro in steps[warmup:]:
        trainer.train_step(micro, stats)
    sync(device)
    step_time = (time.perf_counter() - start) / iters

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    n = 8192 if device.type == "cuda" else 1024
    ceiling = matmul_ceiling(device, dtype, n, repeats=20 if device.type == "cuda" else 5)
    flops = train_flops_per_token(m, cfg.seq_length) * tokens / iters / step_time
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; {'bf16' if cfg.bf16 else 'fp32'}")
    print(f"preset {cfg.preset}: seq {cfg.seq_length}, micro batch {cfg.micro_batch_size}, "
          f"global batch {cfg.global_batch_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    print(f"step time {step_time * 1e3:.1f} ms | tokens/s {tokens / iters / step_time:.0f} | "
          f"model TFLOP/s {flops / 1e12:.3f} | matmul ceiling TFLOP/s {ceiling / 1e12:.3f} | "
          f"utilisation {flops / ceiling:.1%} of the measured matmul ceiling")


if __name__ == "__main__":
    main()
