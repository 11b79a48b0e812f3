"""The five M6 pretraining tasks.

Each builder turns one document (or one caption) into a `Sample` laid out as
`[IMG]*num_image_tokens [CLS] source [SEP] target [EOS]` (image tokens only for the multimodal
tasks). The model's prefix-LM mask and the loss positions are derived from this layout alone, so
every task keeps it exactly and always fits `seq_length`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_m6.data.task_spec import (
    DENOISING_TASKS,
    IMAGE_TASKS,
    LAYOUT_SPECIAL_TOKENS,
    TASK_NAMES,
    min_seq_length,
    min_text_tokens,
)

NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0


@dataclass
class Sample:
    """One laid-out sequence; `image` is whatever the caller passed (a path or a PIL image)."""

    tokens: list[int]
    prefix_len: int
    task: str
    image: object | None = None


def _noise_counts(n: int, noise_density: float, mean_span: float,
                  max_spans: int) -> tuple[int, int]:
    """How many of n >= 2 tokens to corrupt, in how many spans: at least one of each, at least one
    clean token, and few enough spans that clean tokens can separate them."""
    num_noise = min(max(1, round(noise_density * n)), n - 1)
    num_spans = max(1, round(num_noise / mean_span))
    return num_noise, min(num_spans, num_noise, n - num_noise + 1, max_spans)


def _random_partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random split of `total` into `parts` non-negative integers (stars and bars)."""
    bars = np.sort(rng.choice(total + parts - 1, parts - 1, replace=False))
    return np.diff(np.concatenate([[-1], bars, [total + parts - 1]])) - 1


def span_corrupt(tokens: list[int], rng: np.random.Generator, sentinel_ids: list[int],
                 noise_density: float = NOISE_DENSITY,
                 mean_span: float = MEAN_SPAN) -> tuple[list[int], list[int]]:
    """T5-style span corruption: returns (source, target) where each noise span in the source is
    replaced by the next sentinel and the target lists each sentinel followed by its span.

    Spans have random lengths (each >= 1) and are separated by at least one clean token; clean
    runs before the first and after the last span may be empty.
    """
    n = len(tokens)
    if n < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {n}")
    num_noise, k = _noise_counts(n, noise_density, mean_span, len(sentinel_ids))
    noise_lens = _random_partition(num_noise - k, k, rng) + 1
    clean_lens = _random_partition(n - num_noise - (k - 1), k + 1, rng)
    clean_lens[1:-1] += 1
    source, target, pos = [], [], 0
    for j in range(k):
        source += tokens[pos:pos + clean_lens[j]]
        pos += int(clean_lens[j])
        source.append(sentinel_ids[j])
        target.append(sentinel_ids[j])
        target += tokens[pos:pos + noise_lens[j]]
        pos += int(noise_lens[j])
    source += tokens[pos:]
    return source, target


def _max_text_len(task: str, n: int, budget: int, num_sentinels: int) -> int:
    """Longest prefix (<= n tokens) of a text whose source + target fit in `budget` tokens;
    span corruption adds one sentinel per span to both source and target."""
    n = min(n, budget)
    if task in DENOISING_TASKS:
        while n >= 2:
            num_spans = _noise_counts(n, NOISE_DENSITY, MEAN_SPAN, num_sentinels)[1]
            if n + 2 * num_spans <= budget:
                break
            n -= 1
    return n


def build_sample(task: str, text_tokens: list[int], tok, rng: np.random.Generator, seq_length: int,
                 num_image_tokens: int, image=None) -> Sample:
    """Build one sample of `task` from a document (text tasks) or caption (image tasks).

    The text is truncated before it is corrupted or cut, so the laid-out sample always fits.
    """
    if task not in TASK_NAMES:
        raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASK_NAMES)}")
    n_img = num_image_tokens if task in IMAGE_TASKS else 0
    budget = seq_length - n_img - LAYOUT_SPECIAL_TOKENS  # room for source + target
    text = text_tokens[:_max_text_len(task, len(text_tokens), budget, len(tok.sentinel_ids))]
    min_text = min_text_tokens(task)
    if len(text) < min_text:
        raise ValueError(f"{task} needs at least {min_text} text tokens within seq_length "
                         f"{seq_length} (min {min_seq_length(task, num_image_tokens)}); "
                         f"got {len(text_tokens)} tokens")
    if task in DENOISING_TASKS:
        source, target = span_corrupt(text, rng, tok.sentinel_ids)
    elif task == "captioning":
        source, target = [], list(text)
    else:
        cut = int(rng.integers(1, len(text)))
        source, target = text[:cut], text[cut:]
    prefix = [tok.img_id] * n_img + [tok.cls_id] + source + [tok.sep_id]
    return Sample(prefix + target + [tok.eos_id], len(prefix), task, image)
