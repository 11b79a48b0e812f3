"""Training entry point: `python -m megatron_m6.pretrain [Megatron-style flags]`."""

from __future__ import annotations

import random
import sys

import numpy as np
import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.data import DataLoader

from megatron_m6.config import ConfigError, RunConfig, parse_args
from megatron_m6.data.blending import parse_split
from megatron_m6.data.dataset import M6PretrainDataset, MockDataset, build_data_loader
from megatron_m6.model import M6
from megatron_m6.model.attention import resolve_attention_backend
from megatron_m6.model.moe import resolve_moe_dispatch_backend
from megatron_m6.parallel import (
    ParallelDims,
    ParallelState,
    destroy_process_mesh,
    init_process_mesh,
    parallel_dims,
    parallelize,
)
from megatron_m6.parallel.mesh import local_device, world_size_from_env
from megatron_m6.parallel.pipeline_parallel import PipelineRunner, build_pipeline_stages
from megatron_m6.precision import PARAMS_DTYPES, compute_dtype
from megatron_m6.tokenizer import DEFAULT_VOCAB_FILE, M6Tokenizer
from megatron_m6.training.checkpoint import CheckpointError
from megatron_m6.training.trainer import Trainer, TrainingError
from megatron_m6.vision import ImageTokenizerError, load_image_tokenizer, tokenizer_info

VOCAB_DIVISIBLE_BY = 128  # Megatron's --make-vocab-size-divisible-by: aligned, TP-splittable


def padded_vocab_size(n: int) -> int:
    return -(-n // VOCAB_DIVISIBLE_BY) * VOCAB_DIVISIBLE_BY


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """The GPU of this rank (LOCAL_RANK under torchrun) when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available")
    return local_device(name)


def kernel_backends(cfg: RunConfig, device: torch.device) -> str:
    """The attention (and MoE dispatch) backends this run uses, for the start-up log line."""
    dtype = compute_dtype(cfg.bf16, cfg.params_dtype)
    text = f"attention backend: {resolve_attention_backend(cfg.model, device, dtype)}"
    if cfg.model.num_experts:
        text += f"; MoE dispatch: {resolve_moe_dispatch_backend(cfg.model, device)}"
    return text


def build_datasets(cfg: RunConfig, tok: M6Tokenizer | None):
    """(train, validation) datasets: the --split shares of the --data-path blend (validation None
    when its share is 0), or synthetic batches. Unusable data is a ConfigError."""
    m = cfg.model
    n_train = cfg.train_iters * cfg.global_batch_size
    n_eval = max(cfg.eval_iters, 1) * cfg.global_batch_size  # enough for every DP rank
    if cfg.mock_data:
        return (MockDataset(m.vocab_size, cfg.seq_length, m.num_image_tokens, m.image_size, cfg.seed, n_train),
                MockDataset(m.vocab_size, cfg.seq_length, m.num_image_tokens, m.image_size, cfg.seed + 1, n_eval))
    common = dict(tok=tok, seq_length=cfg.seq_length, num_image_tokens=m.num_image_tokens,
                  image_size=m.image_size, task_weights=cfg.task_weights or None, seed=cfg.seed,
                  splits=cfg.split)
    try:
        train = M6PretrainDataset(cfg.data_path, num_samples=n_train, split="train", **common)
        valid = (M6PretrainDataset(cfg.data_path, num_samples=n_eval, split="valid", **common)
                 if parse_split(cfg.split)[1] > 0 else None)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return train, valid


def load_tokenizer(cfg: RunConfig) -> M6Tokenizer | None:
    """The tokenizer of a run on real data (None with --mock-data), with the image codes of
    --image-tokenizer after its text; the model's vocabulary is its size padded to a multiple of
    VOCAB_DIVISIBLE_BY."""
    if cfg.mock_data:
        return None
    tok = M6Tokenizer.from_vocab_file(cfg.vocab_file or DEFAULT_VOCAB_FILE)
    if cfg.image_tokenizer:
        try:
            tok = tok.with_image_codes(tokenizer_info(load_image_tokenizer(cfg.image_tokenizer)).codebook_size)
        except ImageTokenizerError as e:
            raise ConfigError(str(e)) from None
    cfg.model.vocab_size = padded_vocab_size(tok.vocab_size)
    return tok


def build_layout(cfg: RunConfig, dims: ParallelDims, mesh: DeviceMesh | None,
                 device: torch.device) -> tuple[list[int], list[nn.Module], ParallelState, int]:
    """This rank's pipeline stage ids, its model parts (the whole model, or its stages) with the
    layout applied and its shards materialised on `device`, their ParallelState, and the full
    model's parameter count. On the meta device (a dry run) nothing is allocated."""
    # Built on the meta device: each rank keeps its own pipeline stages and allocates only its
    # own shards of them (parallelize), and every parameter is drawn from its name, so all
    # layouts start from the same weights.
    with torch.device("meta"):
        whole_model = M6(cfg.model).to(PARAMS_DTYPES[cfg.params_dtype])
    n_params = sum(p.numel() for p in whole_model.parameters())
    if dims.pp > 1:
        stage_ids, parts = build_pipeline_stages(whole_model, cfg, mesh["pp"].get_local_rank(), dims.pp)
    else:
        stage_ids, parts = [0], [whole_model]
    return stage_ids, parts, parallelize(parts, cfg, dims, mesh, device), n_params


def resume(trainer: Trainer, cfg: RunConfig, log) -> None:
    """Pretraining's start: where --load is given, continue from its latest checkpoint."""
    if cfg.load:
        trainer.load(cfg.load)
        log(f"resumed from {cfg.load} at iteration {trainer.iteration} "
            f"({trainer.consumed_samples} samples consumed)")


def setup(cfg: RunConfig, log=print, datasets=build_datasets, start=resume,
          trainer_class: type[Trainer] = Trainer) -> tuple[Trainer, DataLoader]:
    """Build the model, its layout, the trainer and the training data loader from `cfg`; one
    clear error for a layout the world size cannot hold. `datasets(cfg, tok)` gives the (train,
    validation) datasets and `start(trainer, cfg, log)` the starting weights and position
    (fine-tuning brings its own, megatron_m6/finetune.py)."""
    device = pick_device(cfg.device)
    tok = load_tokenizer(cfg)
    pad_id = tok.pad_id if tok else 0
    dims = parallel_dims(cfg, world_size_from_env())
    mesh = init_process_mesh(dims, device, cfg.distributed_timeout_minutes)
    seed_everything(cfg.seed)
    stage_ids, parts, parallel, n_params = build_layout(cfg, dims, mesh, device)
    model = parts[0] if len(parts) == 1 else nn.ModuleList(parts)
    if dims.pp > 1:
        micro_per_step = cfg.micro_batches_per_rank(dims.dp)
        parallel.pipeline = PipelineRunner(parts, stage_ids, dims.pp * len(stage_ids), mesh,
                                           device, cfg, micro_per_step)
    if parallel.is_logging_rank:
        log(f"M6 with {n_params / 1e6:.2f}M parameters on {device} "
            f"({'bf16 autocast' if cfg.bf16 else cfg.params_dtype}); {kernel_backends(cfg, device)}; layout: "
            f"TP{dims.tp} PP{dims.pp} EP{dims.ep} DP{dims.dp} ({cfg.data_parallel_sharding})")
    train_set, eval_set = datasets(cfg, tok)
    m = cfg.model
    loader = lambda ds, consumed: build_data_loader(ds, cfg.micro_batch_size, cfg.seq_length, pad_id,
                                                    m.image_size, consumed, cfg.num_workers,
                                                    parallel.dp_rank, dims.dp)
    trainer = trainer_class(cfg, model, device=device, log=log,
                            eval_loader_fn=(lambda: loader(eval_set, 0)) if eval_set is not None else None,
                            parallel=parallel, vocab_sha256=tok.digest if tok else None)
    start(trainer, cfg, log)
    return trainer, loader(train_set, trainer.consumed_samples)


def run(cfg: RunConfig, log=print) -> Trainer:
    """Build everything from `cfg` and train; returns the trainer (losses in `.history`)."""
    trainer, train_loader = setup(cfg, log)
    trainer.train(train_loader)
    return trainer


def main(argv: list[str] | None = None) -> None:
    from megatron_m6.dry_run import LayoutError, dry_run  # here: dry_run imports this module

    try:
        cfg = parse_args(argv)
        dry_run(cfg) if cfg.dry_run else run(cfg)
    except (ConfigError, CheckpointError, TrainingError, LayoutError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1 if not isinstance(e, ConfigError) else 2)
    finally:
        destroy_process_mesh()


if __name__ == "__main__":
    main()
