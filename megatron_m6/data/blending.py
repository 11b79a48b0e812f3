"""Which document each sample reads: Megatron's weighted blending (`--data-path 0.7 A 0.3 B`),
train/valid/test splits (`--split 98,2,0`) and a fresh shuffle of each dataset every epoch.

Everything is drawn from generators seeded with (seed, split, ...), and draws for sample i never
depend on how many samples there are, so sample i is a pure function of (seed, i): a run resumed
from `consumed_samples` (even with more --train-iters) continues with exactly the next sample.
"""

from __future__ import annotations

import numpy as np

SPLIT_NAMES = ("train", "valid", "test")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_blend(tokens: list[str]) -> list[tuple[float, str]]:
    """--data-path: prefixes (weighted equally), or weight-prefix pairs (weights need not sum
    to 1), as in Megatron."""
    if tokens and not _is_number(tokens[0]):
        return [(1.0, prefix) for prefix in tokens]
    if not tokens or len(tokens) % 2:
        raise ValueError("--data-path takes PREFIX ... or W1 PREFIX1 W2 PREFIX2 ...")
    blend = []
    for weight, prefix in zip(tokens[::2], tokens[1::2]):
        if not _is_number(weight):
            raise ValueError(f"--data-path: {weight!r} is not a weight; give PREFIX ... or "
                             "W1 PREFIX1 W2 PREFIX2 ...")
        w = float(weight)
        if not w >= 0:
            raise ValueError(f"--data-path: weight {weight} of {prefix} must not be negative")
        blend.append((w, prefix))
    if sum(w for w, _ in blend) <= 0:
        raise ValueError("--data-path weights must have a positive total")
    return blend


def parse_split(text: str) -> tuple[float, float, float]:
    """--split "98,2,0": shares of every dataset's documents for train, valid and test."""
    try:
        parts = [float(x) for x in text.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"--split {text!r} is not numbers separated by commas") from None
    if len(parts) > 3 or any(not p >= 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split {text!r} needs at most three non-negative shares with a "
                         "positive total, e.g. 98,2,0")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return tuple(p / total for p in parts)


def split_ranges(num_docs: int, shares: tuple[float, float, float]) -> list[tuple[int, int]]:
    """Contiguous document ranges [start, end) for train, valid and test."""
    bounds = [0] + [int(round(c * num_docs)) for c in np.cumsum(shares)]
    bounds[-1] = num_docs
    return [(bounds[k], bounds[k + 1]) for k in range(3)]


def _categorical(rng: np.random.Generator, probs: np.ndarray, n: int) -> np.ndarray:
    """n draws from probs, draw i depending only on the generator and i."""
    cdf = np.cumsum(probs) / np.sum(probs)
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(probs) - 1)


def sample_index(task_probs: np.ndarray, task_source_weights: list[np.ndarray], seed: int,
                 split: int, num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample: its task, its source dataset, and how many earlier samples drew that source.

    `task_source_weights[t]` weighs the sources for task t (zero for sources that cannot serve
    it); sources are drawn from one uniform stream, so a task's share of each source follows the
    blend weights.
    """
    tasks = _categorical(np.random.default_rng([seed, split, 0]), task_probs, num_samples)
    u = np.random.default_rng([seed, split, 1]).random(num_samples)
    sources = np.zeros(num_samples, dtype=np.int64)
    for t, weights in enumerate(task_source_weights):
        mask = tasks == t
        if mask.any():
            cdf = np.cumsum(weights) / np.sum(weights)
            sources[mask] = np.minimum(np.searchsorted(cdf, u[mask], side="right"), len(cdf) - 1)
    order = np.argsort(sources, kind="stable")
    counts = np.bincount(sources, minlength=max(len(w) for w in task_source_weights))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    draws = np.empty(num_samples, dtype=np.int64)
    draws[order] = np.arange(num_samples) - starts[sources[order]]
    return tasks.astype(np.int8), sources.astype(np.int16), draws


def epoch_permutation(seed: int, split: int, source: int, epoch: int, n: int) -> np.ndarray:
    """The order in which a source's n documents are read in one epoch."""
    return np.random.default_rng([seed, split, 2, source, epoch]).permutation(n)
