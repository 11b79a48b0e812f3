"""Pretraining data: the mixed-task dataset over a prepared folder, a synthetic dataset of the same
shapes, the collate that derives labels and loss masks from the sample layout, and a loader that
resumes exactly where a run stopped.

Sample i is a pure function of (seed, i), so resuming only needs the number of consumed samples.
"""

from __future__ import annotations

import json
import os
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from megatron_m6.config import TASK_NAMES
from megatron_m6.data.tasks import (IMAGE_TASKS, MIN_TEXT_TOKENS, TEXT_TASKS, build_sample,
                                    min_seq_length)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEXT_FILE = "text.jsonl"
CAPTION_FILES = {"train": "captions_train.jsonl", "test": "captions_test.jsonl"}


def image_to_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    """RGB image -> float32 [3, image_size, image_size]: shorter side resized to image_size,
    centre crop, normalised with the ImageNet statistics the ResNet expects."""
    img = img.convert("RGB")
    w, h = img.size
    scale = image_size / min(w, h)
    w, h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - image_size) // 2, (h - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    x = (np.asarray(img, np.float32) / 255.0 - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def task_probabilities(task_weights: dict[str, float] | None) -> np.ndarray:
    """Sampling probability of each task in TASK_NAMES order; None or {} means all equal."""
    if not task_weights:
        return np.full(len(TASK_NAMES), 1.0 / len(TASK_NAMES))
    unknown = set(task_weights) - set(TASK_NAMES)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; tasks are {', '.join(TASK_NAMES)}")
    w = np.array([float(task_weights.get(t, 0.0)) for t in TASK_NAMES])
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"task weights must be non-negative with a positive total, "
                         f"got {task_weights}")
    return w / w.sum()


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    return rows


class M6PretrainDataset(Dataset):
    """Sample i is a pure function of (seed, i): task chosen by weights, document/pair chosen, task
    built. Length = num_samples.

    Texts are tokenised once here (kept as int32 arrays: small, and cheap to share with forked
    workers); images are decoded in __getitem__ so DataLoader workers do it. Only the files needed
    by tasks with weight > 0 are read; texts shorter than 2 tokens are skipped.
    """

    def __init__(self, data_dir: str, tok, seq_length: int, num_image_tokens: int, image_size: int,
                 task_weights: dict[str, float] | None, seed: int, num_samples: int,
                 split: str = "train"):
        if split not in CAPTION_FILES:
            raise ValueError(f"split must be one of {sorted(CAPTION_FILES)}, got {split!r}")
        self.tok, self.seq_length, self.seed, self.num_samples = tok, seq_length, seed, num_samples
        self.num_image_tokens, self.image_size = num_image_tokens, image_size
        self.probs = task_probabilities(task_weights)
        used = [t for t, p in zip(TASK_NAMES, self.probs) if p > 0]
        for t in used:
            if seq_length < min_seq_length(t, num_image_tokens):
                raise ValueError(f"seq_length {seq_length} is too short for task {t} (needs "
                                 f"{min_seq_length(t, num_image_tokens)})")
        self.docs: list[np.ndarray] = []
        self.captions: list[tuple[str, np.ndarray]] = []
        if any(t in TEXT_TASKS for t in used):
            path = os.path.join(data_dir, TEXT_FILE)
            self.docs = [d for d in (self._encode(r["text"]) for r in _read_jsonl(path))
                         if len(d) >= MIN_TEXT_TOKENS]
            if not self.docs:
                raise ValueError(f"{path} has no text of at least {MIN_TEXT_TOKENS} tokens, but "
                                 f"tasks {[t for t in used if t in TEXT_TASKS]} have weight > 0")
        if any(t in IMAGE_TASKS for t in used):
            path = os.path.join(data_dir, CAPTION_FILES[split])
            pairs = ((os.path.join(data_dir, r["image"]), self._encode(r["text"]))
                     for r in _read_jsonl(path))
            self.captions = [(p, c) for p, c in pairs if len(c) >= MIN_TEXT_TOKENS]
            if not self.captions:
                raise ValueError(f"{path} has no caption of at least {MIN_TEXT_TOKENS} tokens, but "
                                 f"tasks {[t for t in used if t in IMAGE_TASKS]} have weight > 0")

    def _encode(self, text: str) -> np.ndarray:
        return np.array(self.tok.encode(text), dtype=np.int32)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        rng = np.random.default_rng([self.seed, i])
        task_id = int(rng.choice(len(TASK_NAMES), p=self.probs))
        task = TASK_NAMES[task_id]
        if task in IMAGE_TASKS:
            path, text = self.captions[rng.integers(len(self.captions))]
        else:
            path, text = None, self.docs[rng.integers(len(self.docs))]
        # No text longer than seq_length can fit, so never convert more than that.
        sample = build_sample(task, text[:self.seq_length].tolist(), self.tok, rng,
                              self.seq_length, self.num_image_tokens, path)
        image = None
        if path is not None:
            with Image.open(path) as img:
                image = image_to_tensor(img, self.image_size)
        return {"tokens": torch.tensor(sample.tokens, dtype=torch.long),
                "prefix_len": sample.prefix_len, "task_id": task_id, "image": image}


class MockDataset(Dataset):
    """Synthetic samples of the configured shapes for benchmarks and smoke runs: random tokens,
    random task, half with (random) images, lengths within 10% of seq_length; deterministic from
    (seed, i)."""

    def __init__(self, vocab_size: int, seq_length: int, num_image_tokens: int, image_size: int,
                 seed: int, num_samples: int, img_id: int = 7, cls_id: int = 2, sep_id: int = 3,
                 eos_id: int = 6):
        if seq_length < num_image_tokens + 3 + MIN_TEXT_TOKENS:
            raise ValueError(f"seq_length {seq_length} is too short for {num_image_tokens} image "
                             f"tokens, 3 specials and {MIN_TEXT_TOKENS} text tokens")
        self.vocab_size, self.seq_length = vocab_size, seq_length
        self.seed, self.num_samples = seed, num_samples
        self.num_image_tokens, self.image_size = num_image_tokens, image_size
        self.img_id, self.cls_id, self.sep_id, self.eos_id = img_id, cls_id, sep_id, eos_id
        self.first_token = max(img_id, cls_id, sep_id, eos_id) + 1  # first non-special id

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        rng = np.random.default_rng([self.seed, i])
        has_image = bool(rng.random() < 0.5)
        tasks = IMAGE_TASKS if has_image else TEXT_TASKS
        task = tasks[rng.integers(len(tasks))]
        n_img = self.num_image_tokens if has_image else 0
        room = self.seq_length - n_img - 3
        n = int(rng.integers(max(MIN_TEXT_TOKENS, room - room // 10), room + 1))
        text = rng.integers(self.first_token, self.vocab_size, n).tolist()
        cut = 0 if task == "captioning" else int(rng.integers(1, n))
        prefix = [self.img_id] * n_img + [self.cls_id] + text[:cut] + [self.sep_id]
        image = None
        if has_image:
            shape = (3, self.image_size, self.image_size)
            image = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
        return {"tokens": torch.tensor(prefix + text[cut:] + [self.eos_id], dtype=torch.long),
                "prefix_len": len(prefix), "task_id": TASK_NAMES.index(task), "image": image}


def collate(samples: list[dict], seq_length: int, pad_id: int,
            image_size: int) -> dict[str, torch.Tensor]:
    """Pad samples to seq_length and derive the training targets from the layout: position i
    predicts token i+1, and the loss covers prefix_len-1 <= i < valid_len-1 (every target token
    and the EOS)."""
    B, S = len(samples), seq_length
    tokens = torch.full((B, S), pad_id, dtype=torch.long)
    images = torch.zeros(B, 3, image_size, image_size)
    has_image = torch.zeros(B, dtype=torch.bool)
    for b, s in enumerate(samples):
        if len(s["tokens"]) > S:
            raise ValueError(f"sample of {len(s['tokens'])} tokens exceeds seq_length {S}")
        tokens[b, :len(s["tokens"])] = s["tokens"]
        if s["image"] is not None:
            images[b] = s["image"]
            has_image[b] = True
    prefix_len = torch.tensor([s["prefix_len"] for s in samples], dtype=torch.long)
    valid_len = torch.tensor([len(s["tokens"]) for s in samples], dtype=torch.long)
    pos = torch.arange(S)
    loss_mask = (pos >= prefix_len[:, None] - 1) & (pos < valid_len[:, None] - 1)
    labels = torch.full_like(tokens, pad_id)
    labels[:, :-1] = tokens[:, 1:]
    labels.masked_fill_(~loss_mask, pad_id)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask.float(),
            "prefix_len": prefix_len, "valid_len": valid_len, "images": images,
            "has_image": has_image,
            "task_id": torch.tensor([s["task_id"] for s in samples], dtype=torch.long)}


def _worker_init(worker_id: int) -> None:
    """One torch thread per worker: workers decode images in parallel already."""
    torch.set_num_threads(1)


def build_data_loader(dataset: Dataset, micro_batch_size: int, seq_length: int, pad_id: int,
                      image_size: int, consumed_samples: int, num_workers: int) -> DataLoader:
    """Fixed-size batches of consecutive samples starting at `consumed_samples`, so a resumed run
    continues with exactly the next sample."""
    return DataLoader(
        dataset, batch_size=micro_batch_size, sampler=range(consumed_samples, len(dataset)),
        drop_last=True, num_workers=num_workers,
        collate_fn=partial(collate, seq_length=seq_length, pad_id=pad_id, image_size=image_size),
        persistent_workers=num_workers > 0,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        # Its own generator: starting an iterator must not draw from the global RNG, or dropout
        # after a resume would differ from a run that never stopped.
        generator=torch.Generator())
