"""Distributed checkpoints: everything needed to resume exactly, readable under any layout.

Layout (Megatron's): SAVE/iter_0000100/ and SAVE/latest_checkpointed_iteration.txt. Model and
optimizer go through torch.distributed.checkpoint under layout-independent names (global layer
numbers, experts by global index through their DTensor shapes), so a checkpoint saved under one
parallel layout loads under another. Iteration, data position, arguments and model config go in
meta.pt; each rank's RNG states in rng_RANK.pt. A checkpoint is written under a temporary name
and renamed by rank 0 only after every rank has finished writing; the tracker file is replaced
only after that, so an interrupted save (even `kill -9`) leaves the previous checkpoint the one
`--load` picks, and `--keep-last` removes older ones only then.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import warnings
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from megatron_m6.config import ModelConfig
from megatron_m6.parallel.recompute import plain_parameter_name

TRACKER = "latest_checkpointed_iteration.txt"
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


class CheckpointError(RuntimeError):
    """A missing, corrupt or mismatched checkpoint; the message says which."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_DIR_PATTERN = r"iter_\d{7}"  # the folder names checkpoint_dir gives


def checkpoint_dir(save_dir: str, iteration: int) -> str:
    """The folder of iteration's checkpoint: SAVE/iter_0000100, as Megatron names it."""
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def one_line_cause(e: BaseException) -> str:
    """The cause, in one line, of an error from torch.distributed.checkpoint (whose exceptions
    carry every rank's traceback; the last line names what went wrong)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


# torch.distributed.checkpoint warns whenever it runs without a process group; one process is a
# layout like any other here. A filter, not catch_warnings: async saves warn from their thread.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_write(path: str, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def model_state(parts: list[nn.Module]) -> dict:
    """Model state under M6's own names, whatever stages and wrappers this rank holds."""
    state = {}
    for part in parts:
        state.update(get_model_state_dict(part))
    return state


def _optimizer_state(model: nn.Module, optimizer) -> dict:
    """Flattened optimizer state; with several stages per rank (a ModuleList) the stage index is
    dropped from the names, so they do not depend on the layout."""
    state = get_optimizer_state_dict(model, optimizer, options=_FLAT)
    if isinstance(model, nn.ModuleList):
        state = {re.sub(r"^(state|param_groups)\.\d+\.", r"\1.", k): v for k, v in state.items()}
    return state


def _with_stage_index(model: nn.Module, state: dict) -> dict:
    """Undo _optimizer_state's renaming for a ModuleList of stages."""
    if not isinstance(model, nn.ModuleList):
        return state
    index = {}
    for i, part in enumerate(model):
        for name, _ in part.named_parameters():
            index[plain_parameter_name(name)] = i
    out = {}
    for k, v in state.items():
        kind, rest = k.split(".", 1)
        name = next(n for n in sorted(index, key=len, reverse=True) if rest.startswith(n + "."))
        out[f"{kind}.{index[name]}.{rest}"] = v
    return out


def publish(save_dir: str, iteration: int, keep_last: int | None) -> str:
    """Rank 0, once every rank's files of iteration_N.tmp are complete and on disk: rename it to
    its final name, point the tracker at it, then drop what is no longer needed (leftovers of
    interrupted saves, and checkpoints beyond the newest `keep_last`)."""
    final = checkpoint_dir(save_dir, iteration)
    if os.path.isdir(final):  # this iteration saved before: set aside, deleted after the tracker
        shutil.rmtree(f"{final}.deleting", ignore_errors=True)
        os.replace(final, f"{final}.deleting")
    os.replace(f"{final}.tmp", final)
    tracker_tmp = os.path.join(save_dir, TRACKER + ".tmp")
    _fsync_write(tracker_tmp, lambda f: f.write(str(iteration).encode()))
    os.replace(tracker_tmp, os.path.join(save_dir, TRACKER))
    names = os.listdir(save_dir)
    others = sorted(n for n in names
                    if re.fullmatch(CHECKPOINT_DIR_PATTERN, n) and n != os.path.basename(final))
    stale = [n for n in names if re.fullmatch(CHECKPOINT_DIR_PATTERN + r"\.(tmp|deleting)", n)]
    old = others[:len(others) - (keep_last - 1)] if keep_last else []  # never the one just published
    for name in old:  # renamed first: a half-deleted folder never looks like a checkpoint
        os.replace(os.path.join(save_dir, name), os.path.join(save_dir, name + ".deleting"))
    for name in stale + [n + ".deleting" for n in old]:
        shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
    return final


class Checkpointer:
    """Writes SAVE/iter_N for the trainer, every rank calling `save` together: synchronously, or
    with `async_save` in a background thread while training goes on (each rank's state is
    first copied to CPU memory, so later steps cannot change what is written).

    A background save is published (renamed, tracker updated) by rank 0 as soon as its writes
    are done, noticed by `poll()` between steps or by `wait()`; DCP writes the global metadata
    only after every rank's shards are written and fsynced, so rank 0 alone can tell."""

    def __init__(self, save_dir: str, async_save: bool = False, keep_last: int | None = None,
                 timeout: timedelta | None = None):
        self.save_dir, self.async_save, self.keep_last = save_dir, async_save, keep_last
        # Background saves talk over their own gloo group: their collectives run in the writer
        # thread and must never interleave with the training collectives of the main thread.
        self.group = (dist.new_group(backend="gloo", timeout=timeout)
                      if async_save and dist.is_initialized() else None)
        # One stager for the whole run: it keeps its CPU copies (pinned on GPUs) and refills them
        # at every save instead of allocating the whole state again.
        self.stager = DefaultStager(StagingOptions(
            use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
            use_async_staging=False, use_non_blocking_copy=False)) if async_save else None
        self.pending: tuple[object, int] | None = None  # (future, iteration)

    def save(self, iteration: int, model: nn.Module, optimizer, meta: dict) -> str:
        """Every rank; returns the folder the checkpoint has (or, in the background, will have)."""
        self.wait()
        final = checkpoint_dir(self.save_dir, iteration)
        tmp = f"{final}.tmp"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        _fsync_write(os.path.join(tmp, f"rng_{_rank():05d}.pt"), lambda f: torch.save(rng_state(), f))
        if _rank() == 0:
            world = dist.get_world_size() if dist.is_initialized() else 1
            _fsync_write(os.path.join(tmp, "meta.pt"), lambda f: torch.save({**meta, "world_size": world}, f))
        parts = list(model) if isinstance(model, nn.ModuleList) else [model]
        state = {"model": model_state(parts), "optimizer": _optimizer_state(model, optimizer)}
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=tmp, process_group=self.group,
                                    async_stager=self.stager, no_dist=not dist.is_initialized())
            self.pending = (future, iteration)
            return final
        dcp.save(state, checkpoint_id=tmp)
        _barrier()  # every rank's files are complete and on disk
        if _rank() == 0:
            publish(self.save_dir, iteration, self.keep_last)
        _barrier()
        return final

    def poll(self) -> int | None:
        """Publish a finished background save; returns its iteration (None if none finished)."""
        if self.pending is None or not self.pending[0].done():
            return None
        return self.wait()

    def wait(self) -> int | None:
        """Block until the background save (if any) is written, then publish it."""
        if self.pending is None:
            return None
        future, iteration = self.pending
        self.pending = None
        try:
            future.result()
        except Exception as e:
            raise CheckpointError(f"saving the checkpoint of iteration {iteration} failed: "
                                  f"{one_line_cause(e)}; the previous checkpoint stays the latest") from None
        if _rank() == 0:
            publish(self.save_dir, iteration, self.keep_last)
        return iteration

    def close(self) -> int | None:
        """Finish the background save, if any, and free the CPU copies; returns wait()'s value."""
        try:
            return self.wait()
        finally:
            if self.stager is not None:
                self.stager.close()
                self.stager = None


def save_checkpoint(save_dir: str, iteration: int, model: nn.Module, optimizer, meta: dict) -> str:
    """One synchronous save, called by every rank; returns the checkpoint folder."""
    return Checkpointer(save_dir).save(iteration, model, optimizer, meta)


def latest_checkpoint(load_dir: str) -> tuple[str, dict]:
    """(folder, meta) of the checkpoint the tracker names, or one clear CheckpointError: the
    tracker, meta.pt, the DCP metadata and every data file it names (present and long enough)
    are checked before anything is read into a model."""
    tracker = os.path.join(load_dir, TRACKER)
    if not os.path.isfile(tracker):
        raise CheckpointError(f"no checkpoint in {load_dir}: {TRACKER} is missing")
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} is corrupt: {text[:40]!r} is not an iteration number")
    path = checkpoint_dir(load_dir, int(text))
    for name in ("meta.pt", ".metadata"):
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"{tracker} names iteration {text}, but {os.path.join(path, name)} is missing")
    try:
        meta = torch.load(os.path.join(path, "meta.pt"), map_location="cpu", weights_only=False)
        storage = dcp.FileSystemReader(path).read_metadata().storage_data
    except Exception as e:  # a truncated or foreign file: say which, not a deep traceback
        raise CheckpointError(f"{path} is corrupt or not a megatron_m6 checkpoint: {e}") from None
    if not isinstance(meta, dict) or "iteration" not in meta:
        raise CheckpointError(f"{path}/meta.pt is not a megatron_m6 checkpoint's meta.pt")
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{path} is incomplete: {name} is missing")
        if os.path.getsize(file) < size:
            raise CheckpointError(f"{path} is incomplete: {name} is truncated "
                                  f"({os.path.getsize(file)} of {size} bytes)")
    return path, meta


def _read(path: str, state: dict) -> None:
    """Load `state` (in place where its values are tensors) from the checkpoint. A tied head the
    checkpoint lacks (saved by a layout whose optimizer knew the weight only as the embedding) is
    read from the embedding's entry."""
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata

    def source(group: str, key: str) -> str:
        alias = key.replace("lm_head.weight", "embedding.word_emb.weight")
        return alias if f"{group}.{key}" not in stored and f"{group}.{alias}" in stored else key

    flat = {g: {source(g, k): v for k, v in entries.items()} for g, entries in state.items()}
    try:
        dcp.load(flat, checkpoint_id=path)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"{path} does not fit this model: {one_line_cause(e)}") from None
    for group, entries in state.items():
        for key in entries:
            entries[key] = flat[group][source(group, key)]


def load_model_weights(path: str, model: nn.Module) -> None:
    """Weights of the checkpoint folder `path` (saved under any layout) into a whole model on one
    device, without torch.distributed: for generation and conversion."""
    state = {"model": model.state_dict()}
    try:
        dcp.load(state, checkpoint_id=path, no_dist=True)
    except (Exception, CheckpointException) as e:  # missing or misshapen weights: one line
        raise CheckpointError(f"{path} does not fit its model_config: {one_line_cause(e)}") from None
    model.load_state_dict(state["model"])


def load_checkpoint(load_dir: str, model: nn.Module, optimizer, model_cfg: ModelConfig,
                    load_optim: bool = True, load_rng: bool = True) -> dict:
    """Load model and optimizer (any layout into any layout) and this rank's RNG states when the
    world size matches; returns the checkpoint's meta (iteration, data position, arguments).
    A model-only checkpoint (meta["model_only"], written by tools/checkpoint/convert.py) loads
    the weights alone: training starts from them at iteration 0 with a fresh optimizer. So does
    load_optim=False (fine-tuning from a training checkpoint); load_rng=False keeps this run's
    RNG streams."""
    path, meta = latest_checkpoint(load_dir)
    check_model_config(meta["model_config"], model_cfg)
    parts = list(model) if isinstance(model, nn.ModuleList) else [model]
    load_optim = load_optim and not meta.get("model_only")
    state = {"model": model_state(parts)}
    if load_optim:
        state["optimizer"] = _optimizer_state(model, optimizer)
    _read(path, state)
    for part in parts:
        own = get_model_state_dict(part)
        set_model_state_dict(part, {k: state["model"][k] for k in own})
    if meta.get("model_only"):
        return meta
    if load_optim:
        set_optimizer_state_dict(model, optimizer, _with_stage_index(model, state["optimizer"]), options=_FLAT)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if load_rng and meta.get("world_size") == world:  # same world: every rank continues its own RNG streams
        rng_file = os.path.join(path, f"rng_{_rank():05d}.pt")
        if not os.path.isfile(rng_file):
            raise CheckpointError(f"{path} is incomplete: rng_{_rank():05d}.pt is missing")
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    return meta


# Settings that change how the model trains or computes, not the shapes of its weights.
RESUMABLE_CHANGES = {"hidden_dropout", "attention_dropout", "moe_aux_loss_coeff", "moe_z_loss_coeff",
                     "moe_capacity_factor", "attention_backend", "moe_dispatch_backend"}


def check_model_config(saved: dict, current: ModelConfig) -> None:
    """Refuse to load weights into a differently shaped model."""
    now = dataclasses.asdict(current)
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in now.items()
            if k in saved and _norm(saved[k]) != _norm(v)
            and k not in RESUMABLE_CHANGES]
    if diff:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(diff))


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v
