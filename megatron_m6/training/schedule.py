"""Learning-rate schedule: linear warmup, then cosine, linear or constant decay to min_lr."""

from __future__ import annotations

import math

from megatron_m6.config import RunConfig


def learning_rate(cfg: RunConfig, iteration: int) -> float:
    """LR for `iteration` (0-based), a pure function so resuming needs only the iteration."""
    if cfg.lr_warmup_iters and iteration < cfg.lr_warmup_iters:
        return cfg.lr * (iteration + 1) / cfg.lr_warmup_iters
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    decay_iters = (cfg.lr_decay_iters or cfg.train_iters) - cfg.lr_warmup_iters
    progress = min(1.0, (iteration - cfg.lr_warmup_iters) / max(1, decay_iters))
    if cfg.lr_decay_style == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * coeff
