"""Training entry point: `python -m megatron_m6.pretrain [Megatron-style flags]`."""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch

from megatron_m6.config import ConfigError, RunConfig, parse_args
from megatron_m6.data.dataset import M6PretrainDataset, MockDataset, build_data_loader
from megatron_m6.model import M6
from megatron_m6.tokenizer import M6Tokenizer
from megatron_m6.training.checkpoint import CheckpointError, load_checkpoint
from megatron_m6.training.trainer import Trainer, TrainingError

VOCAB_DIVISIBLE_BY = 128  # Megatron's --make-vocab-size-divisible-by: aligned, TP-splittable


def padded_vocab_size(n: int) -> int:
    return -(-n // VOCAB_DIVISIBLE_BY) * VOCAB_DIVISIBLE_BY


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def build_datasets(cfg: RunConfig, tok: M6Tokenizer | None):
    """(train, validation) datasets: the sample-data folder, or synthetic batches."""
    m = cfg.model
    n_train = cfg.train_iters * cfg.global_batch_size
    n_eval = max(cfg.eval_iters, 1) * cfg.micro_batch_size
    if cfg.mock_data:
        return (MockDataset(m.vocab_size, cfg.seq_length, m.num_image_tokens, m.image_size, cfg.seed, n_train),
                MockDataset(m.vocab_size, cfg.seq_length, m.num_image_tokens, m.image_size, cfg.seed + 1, n_eval))
    common = dict(tok=tok, seq_length=cfg.seq_length, num_image_tokens=m.num_image_tokens,
                  image_size=m.image_size, task_weights=cfg.task_weights or None)
    return (M6PretrainDataset(cfg.data_path, seed=cfg.seed, num_samples=n_train, split="train", **common),
            M6PretrainDataset(cfg.data_path, seed=cfg.seed + 1, num_samples=n_eval, split="test", **common))


def run(cfg: RunConfig, log=print) -> Trainer:
    """Build everything from `cfg` and train; returns the trainer (losses in `.history`)."""
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    tok = None
    if not cfg.mock_data:
        tok = M6Tokenizer.from_vocab_file(os.path.join(cfg.data_path, "vocab.txt"))
        cfg.model.vocab_size = padded_vocab_size(tok.vocab_size)
    pad_id = tok.pad_id if tok else 0
    model = M6(cfg.model).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"M6 with {n_params / 1e6:.2f}M parameters on {device} "
        f"({'bf16 autocast' if cfg.bf16 else 'fp32'}); attention backend: sdpa")
    train_set, eval_set = build_datasets(cfg, tok)
    m = cfg.model
    loader = lambda ds, consumed: build_data_loader(ds, cfg.micro_batch_size, cfg.seq_length, pad_id,
                                                    m.image_size, consumed, cfg.num_workers)
    trainer = Trainer(cfg, model, eval_loader_fn=lambda: loader(eval_set, 0), device=device, log=log)
    if cfg.load:
        trainer.load(load_checkpoint(cfg.load))
        log(f"resumed from {cfg.load} at iteration {trainer.iteration} "
            f"({trainer.consumed_samples} samples consumed)")
    trainer.train(loader(train_set, trainer.consumed_samples))
    return trainer


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv))
    except (ConfigError, CheckpointError, TrainingError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1 if not isinstance(e, ConfigError) else 2)


if __name__ == "__main__":
    main()
