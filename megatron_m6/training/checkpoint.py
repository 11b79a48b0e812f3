"""Single-process checkpoints: everything needed to resume exactly.

Layout (Megatron's): SAVE/iter_0000100/checkpoint.pt and SAVE/latest_checkpointed_iteration.txt.
A checkpoint is written under a temporary name and renamed when complete; the tracker file is
replaced only after that, so an interrupted save leaves the previous checkpoint the one `--load`
picks.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil

import numpy as np
import torch

from megatron_m6.config import ModelConfig

TRACKER = "latest_checkpointed_iteration.txt"


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


def _fsync_write(path: str, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(save_dir: str, iteration: int, state: dict) -> str:
    """Write `state` as iteration `iteration`, atomically; returns the checkpoint folder."""
    os.makedirs(save_dir, exist_ok=True)
    final = os.path.join(save_dir, f"iter_{iteration:07d}")
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _fsync_write(os.path.join(tmp, "checkpoint.pt"), lambda f: torch.save(state, f))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    tracker_tmp = os.path.join(save_dir, TRACKER + ".tmp")
    _fsync_write(tracker_tmp, lambda f: f.write(str(iteration).encode()))
    os.replace(tracker_tmp, os.path.join(save_dir, TRACKER))
    return final


def load_checkpoint(load_dir: str) -> dict:
    """The state of the latest complete checkpoint under `load_dir`."""
    tracker = os.path.join(load_dir, TRACKER)
    if not os.path.isfile(tracker):
        raise CheckpointError(f"no checkpoint in {load_dir}: {TRACKER} is missing")
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} is corrupt: {text[:40]!r} is not an iteration number")
    path = os.path.join(load_dir, f"iter_{int(text):07d}", "checkpoint.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"{tracker} names iteration {text}, but {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which, not a deep traceback
        raise CheckpointError(f"{path} is corrupt or not a megatron_m6 checkpoint: {e}") from None


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
