"""Fine-tuning entry point: `python -m megatron_m6.finetune --task TASK --train-data F [flags]`.

The pretraining run with other data: the same flags, layouts, trainer, checkpoints and logs
(megatron_m6/pretrain.py), on the samples of a downstream task (megatron_m6/data/downstream.py:
jsonl, or for large sets an indexed dataset of `tools/preprocess_data.py --task`), which keep the
prefix-LM layout: the task's input is the bidirectional source, its output the generated target.
It starts from --pretrained-checkpoint's weights (or --load's with --finetune) with a fresh
optimizer, schedule and iteration count; a --load folder that already holds a checkpoint of this
run resumes it exactly, as pretraining does.

Every --eval-interval the validation loss is measured, and on --valid-data the task's metric
(megatron_m6/evaluate.py). Generation and scoring need the whole model on each rank: under tensor,
pipeline or expert parallelism, or FSDP, every rank gathers a copy for the evaluation; where that
would not fit, the validation loss stands in for the metric (said once in the log). --save-best
keeps the checkpoint of the best metric in SAVE/best.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader

from megatron_m6.config import ConfigError, RunConfig, parse_args
from megatron_m6.data.downstream import (
    IMAGE_FINETUNE_TASKS,
    TEXT_TO_IMAGE,
    DownstreamDataError,
    DownstreamDataset,
    open_examples,
    require_distractors,
)
from megatron_m6.data.image_codes import check_code_dataset
from megatron_m6.data.task_spec import LAYOUT_SPECIAL_TOKENS
from megatron_m6.evaluate import PRIMARY_METRIC, evaluate_task
from megatron_m6.inference.generate import SamplingConfig
from megatron_m6.model import M6
from megatron_m6.parallel import destroy_process_mesh
from megatron_m6.parallel.initialisation import materialize
from megatron_m6.pretrain import load_tokenizer, setup
from megatron_m6.training import checkpoint as ckpt
from megatron_m6.training.checkpoint import CheckpointError
from megatron_m6.training.trainer import Trainer, TrainingError
from megatron_m6.vision import ImageTokenizerError, load_image_tokenizer, tokenizer_info

EVAL_MAX_NEW_TOKENS = 32  # greedy, for the validation metric


class FinetuneTrainer(Trainer):
    """The trainer with the task's validation metric after each validation loss, and the best
    checkpoint kept by it; the best so far is part of every checkpoint, so a resumed run keeps
    the same one."""

    examples = None  # validation Examples; set by `run`
    tokenizer = None
    best: dict | None = None  # {"metric", "value", "iteration"}
    last_metrics: dict | None = None  # the task's metrics at the last validation
    _said_too_large = False

    def _metric(self) -> tuple[str, float]:
        """(name, value) of the task's metric on the validation examples, higher is better.
        Generation and scoring run on a whole model: under TP, PP, EP or FSDP every rank gathers a
        copy for the evaluation and takes a share of the examples. Where that copy would not fit
        in the free memory of some rank, the validation loss stands in for the metric."""
        dims, cfg = self.parallel.dims, self.cfg
        sharded = not (dims.tp == dims.pp == dims.ep == 1 and cfg.data_parallel_sharding == "replicate")
        if sharded and not self._whole_model_fits():
            return "-validation loss", -self._last_loss
        model = self._whole_model() if sharded else self.model
        rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (self.parallel.dp_rank, dims.dp)
        sampling = SamplingConfig(max_new_tokens=EVAL_MAX_NEW_TOKENS)
        result, _ = evaluate_task(model, self.tokenizer, cfg.task, self.examples, sampling,
                                  cfg.micro_batch_size, rank, world, seq_length=cfg.seq_length)
        del model
        self.last_metrics = result
        metric = PRIMARY_METRIC[cfg.task]
        self.log(f"validation at iteration {self.iteration} | {cfg.task} "
                 + " | ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return metric, result[metric]

    def _whole_model_fits(self) -> bool:
        """Whether every rank has room for a gathered copy of the model (twice its bytes: the
        full tensors, then the model they load into); said once in the log when not."""
        with torch.device("meta"):
            need = 2 * sum(p.numel() for p in M6(self.cfg.model).parameters()) * self._params_dtype.itemsize
        fits = torch.tensor([float(need <= free_memory(self.device))], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(fits, op=dist.ReduceOp.MIN)  # every rank takes the same branch
        if not fits.item() and not self._said_too_large:
            self._said_too_large = True
            self.log(f"the {self.cfg.task} metric needs a whole copy of the model on each rank ({need / 2**30:.1f} "
                     "GiB with its loading) and some rank has less free memory: the validation loss stands in for it")
        return bool(fits.item())

    @property
    def _params_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _whole_model(self) -> M6:
        """A whole copy of the model on this rank: the TP, EP and FSDP shards of its stages
        gathered into full tensors, and under PP the other stages' weights from their ranks."""
        parts = list(self.model) if isinstance(self.model, nn.ModuleList) else [self.model]
        state = {}
        for part in parts:
            state.update(get_model_state_dict(part, options=StateDictOptions(full_state_dict=True)))
        if self.parallel.dims.pp > 1:
            stages = [None] * self.parallel.dims.pp
            dist.all_gather_object(stages, {k: v.cpu() for k, v in state.items()},
                                   group=self.parallel.mesh["pp"].get_group())
            state = {k: v for stage in stages for k, v in stage.items()}
        cfg = dataclasses.replace(self.cfg.model, moe_capacity_factor=None)  # as generation: no token dropped
        with torch.device("meta"):
            model = M6(cfg).to(self._params_dtype)
        materialize(model, cfg, self.device, seed=0, init=False)
        model.load_state_dict(state)
        return model.eval()

    def evaluate(self) -> float:
        self._last_loss = super().evaluate()
        if self.examples:
            name, value = self._metric()
            if self.cfg.save_best and (self.best is None or value > self.best["value"]):
                self.best = {"metric": name, "value": value, "iteration": self.iteration}
                best_dir = os.path.join(self.cfg.save, "best")
                ckpt.Checkpointer(best_dir, keep_last=1).save(self.iteration, self.model, self.optimizer,
                                                             self.checkpoint_meta())
                self.log(f"best {name} {value:.4f} at iteration {self.iteration}: saved to {best_dir}")
        return self._last_loss

    def checkpoint_meta(self) -> dict:
        return {**super().checkpoint_meta(), "best": self.best}


def free_memory(device: torch.device) -> int:
    """Bytes this process can still allocate: the GPU's free memory, or the host's available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def has_checkpoint(folder: str | None) -> bool:
    return bool(folder) and os.path.isfile(os.path.join(folder, ckpt.TRACKER))


def start(trainer: FinetuneTrainer, cfg: RunConfig, log) -> None:
    """Resume this run from --load's latest checkpoint; or, with --finetune or when --load holds
    none yet, start from the weights of --load or --pretrained-checkpoint."""
    if has_checkpoint(cfg.load) and not cfg.finetune:
        trainer.best = trainer.load(cfg.load).get("best")
        log(f"resumed fine-tuning from {cfg.load} at iteration {trainer.iteration} "
            f"({trainer.consumed_samples} samples consumed)")
        return
    source = cfg.load if cfg.finetune else cfg.pretrained_checkpoint
    if source:
        meta = trainer.load_weights(source)
        log(f"fine-tuning from the weights of {source} (iteration {meta['iteration']}); "
            "fresh optimizer, schedule and iteration count")
    else:
        log("fine-tuning from randomly initialised weights (no --pretrained-checkpoint)")


def build(cfg: RunConfig, log=print) -> tuple[FinetuneTrainer, DataLoader]:
    """Load the task's data and build everything from `cfg` as pretraining does: the trainer
    (started by `start`) and the training data loader."""
    tok = load_tokenizer(cfg)
    m = cfg.model
    n_img = m.num_image_tokens if cfg.task in IMAGE_FINETUNE_TASKS and not cfg.text_only else 0
    if cfg.seq_length < n_img + LAYOUT_SPECIAL_TOKENS + 2:
        raise ConfigError(f"--seq-length {cfg.seq_length} cannot hold a {cfg.task} sample ({n_img} image tokens, "
                          f"{LAYOUT_SPECIAL_TOKENS} special tokens and text)")
    read = lambda path: open_examples(path, cfg.task, tok, m.image_size, cfg.max_bad_fraction, cfg.text_only)
    if cfg.task == TEXT_TO_IMAGE:
        check_text_to_image(cfg, m.max_position_embeddings)
    train, summary = read(cfg.train_data)
    log(summary)
    valid = []
    if cfg.valid_data:
        valid, summary = read(cfg.valid_data)
        require_distractors(cfg.task, valid, cfg.valid_data)
        log(summary)
    if cfg.epochs is not None:
        cfg.train_iters = max(1, math.ceil(cfg.epochs * len(train) / cfg.global_batch_size))
        log(f"{cfg.epochs:g} epochs of {len(train)} examples: {cfg.train_iters} iterations")

    def datasets(cfg: RunConfig, tok):
        common = dict(task=cfg.task, tok=tok, seq_length=cfg.seq_length, num_image_tokens=m.num_image_tokens,
                      image_size=m.image_size)
        n_eval = max(cfg.eval_iters, 1) * cfg.global_batch_size
        return (DownstreamDataset(train, seed=cfg.seed, num_samples=cfg.train_iters * cfg.global_batch_size, **common),
                DownstreamDataset(valid, seed=cfg.seed + 1, num_samples=n_eval, **common) if valid else None)

    trainer, loader = setup(cfg, log, datasets=datasets, start=start, trainer_class=FinetuneTrainer)
    # Text-to-image's metric samples and judges whole images (python -m megatron_m6.evaluate --task
    # text_to_image): too slow for every --eval-interval, so its validation is the loss.
    trainer.examples, trainer.tokenizer = ([] if cfg.task == TEXT_TO_IMAGE else valid), tok
    return trainer, loader


def check_text_to_image(cfg: RunConfig, max_positions: int) -> None:
    """The image-code datasets were made by --image-tokenizer, its grid fits the positions, and the
    sequence is all of them: an image ends at the last position in training as in generation
    (downstream.text_to_image_prefix), so each code keeps its position."""
    info = tokenizer_info(load_image_tokenizer(cfg.image_tokenizer))
    for path in filter(None, (cfg.train_data, cfg.valid_data)):
        check_code_dataset(path, info)
    if cfg.seq_length != max_positions:
        raise ConfigError(f"text_to_image needs --seq-length equal to --max-position-embeddings (the image ends at "
                          f"the last position, in training as in generation); got {cfg.seq_length} and "
                          f"{max_positions}")
    need = 5 + info.grid**2  # [CLS], a caption token, [SEP], [BOI], the codes, [EOI]
    if need > cfg.seq_length:
        raise ConfigError(f"an image of {info.grid}x{info.grid} codes and its caption need at least {need} positions; "
                          f"--seq-length is {cfg.seq_length} and --max-position-embeddings {max_positions} "
                          "(grow a pretrained checkpoint's with tools/checkpoint/convert.py grow)")


def run(cfg: RunConfig, log=print) -> FinetuneTrainer:
    """Build everything from `cfg` and fine-tune; returns the trainer (losses in `.history`)."""
    trainer, loader = build(cfg, log)
    trainer.train(loader)
    return trainer


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv, entry="finetune"))
    except (ConfigError, DownstreamDataError, ImageTokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (CheckpointError, TrainingError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        destroy_process_mesh()


if __name__ == "__main__":
    main()
