"""Pretraining data: the mixed-task dataset over indexed datasets (text and image-text pairs made
by tools/preprocess_data.py), a synthetic dataset of the same shapes, the collate that derives
labels and loss masks from the sample layout, and a loader that resumes exactly where a run stopped.

Sample i is a pure function of (seed, i), so resuming only needs the number of consumed samples.
"""

from __future__ import annotations

import io
import signal
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from megatron_m6.data.blending import (
    SPLIT_NAMES,
    epoch_permutation,
    parse_blend,
    parse_split,
    sample_index,
    split_ranges,
)
from megatron_m6.data.indexed import TEXT_MODE, IndexedDataset, IndexedDatasetError
from megatron_m6.data.task_spec import IMAGE_TASKS, LAYOUT_SPECIAL_TOKENS, MIN_TEXT_TOKENS, TASK_NAMES, TEXT_TASKS
from megatron_m6.data.tasks import build_sample
from megatron_m6.tokenizer.tokenizer import SPECIAL_TOKENS, M6Tokenizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def task_probabilities(task_weights: dict[str, float]) -> np.ndarray:
    """Sampling probability of each task in TASK_NAMES order, from weights that config.validate
    has checked (known tasks, none negative, a positive total)."""
    w = np.array([float(task_weights.get(t, 0.0)) for t in TASK_NAMES])
    return w / w.sum()


class IndexedSource:
    """One indexed dataset as the tasks see it: text documents, or (multimodal) image-text pairs
    laid out as [caption, image]. Documents with fewer than MIN_TEXT_TOKENS text tokens (a trailing
    [EOS] from --append-eod not counted) are left out, found with numpy, not a loop."""

    def __init__(self, prefix: str, eos_id: int):
        ds = self.ds = IndexedDataset(prefix)
        self.prefix, self.multimodal, self.eos_id = prefix, ds.multimodal, eos_id
        n_docs, n_items = ds.num_documents, len(ds)
        doc_of = np.repeat(np.arange(n_docs), np.diff(ds.document_indices))
        modes = ds.sequence_modes if ds.multimodal else np.zeros(n_items, np.int8)
        is_text = modes == TEXT_MODE
        self.image_item = None
        if ds.multimodal:
            images = np.bincount(doc_of[~is_text], minlength=n_docs)
            if (images != 1).any():
                doc = int(np.flatnonzero(images != 1)[0])
                raise IndexedDatasetError(f"{prefix}: document {doc} has {images[doc]} images; "
                                          "multimodal documents are [caption, image] pairs")
            self.image_item = np.flatnonzero(~is_text)
        lengths = ds.sequence_lengths.astype(np.int64)
        text_len = np.bincount(doc_of[is_text], weights=lengths[is_text], minlength=n_docs)
        last = np.full(n_docs, -1, np.int64)
        nonempty = np.flatnonzero(is_text & (lengths > 0))
        np.maximum.at(last, doc_of[nonempty], nonempty)
        has = last >= 0
        ends_eos = np.zeros(n_docs, dtype=bool)
        pos = ds.sequence_pointers[last[has]] // ds.dtype.itemsize + lengths[last[has]] - 1
        ends_eos[has] = ds.data[pos] == eos_id
        self.usable = text_len - ends_eos >= MIN_TEXT_TOKENS

    def text(self, doc: int) -> np.ndarray:
        """Token ids of document `doc` (of its caption, for a pair), without a trailing [EOS]."""
        if self.multimodal:
            first, last = self.ds.document_indices[doc], self.ds.document_indices[doc + 1]
            modes = self.ds.sequence_modes
            tokens = np.concatenate([self.ds[i] for i in range(first, last) if modes[i] == TEXT_MODE])
        else:
            tokens = self.ds.document(doc)
        return tokens[:-1] if len(tokens) and tokens[-1] == self.eos_id else tokens

    def image(self, doc: int) -> bytes:
        """The JPEG of image-text pair `doc`."""
        return self.ds.image_bytes(int(self.image_item[doc]))


class M6PretrainDataset(Dataset):
    """Sample i is a pure function of (seed, i): its task by the task weights, its dataset by the
    blend weights among those that can serve the task (text datasets for text tasks, image-text
    ones for image tasks), its document by that dataset's shuffle for the current epoch within
    this split's share of documents, then the task built from it.

    data_path is Megatron's --data-path list: a prefix, or W1 PREFIX1 W2 PREFIX2 ... With
    task_weights None, tasks are weighted equally among those the data can serve. Token ids come
    from the memory-mapped files; images are decoded in __getitem__, so DataLoader workers do it.
    The flags are checked once, by config.validate; what is checked here is what only reading
    the data shows: every task drawn has documents to draw from.
    """

    def __init__(self, data_path: list[str] | str, tok, seq_length: int, num_image_tokens: int,
                 image_size: int, task_weights: dict[str, float] | None, seed: int,
                 num_samples: int, split: str = "train", splits: str = "98,2,0"):
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {', '.join(SPLIT_NAMES)}, got {split!r}")
        self.tok, self.seq_length, self.seed, self.num_samples = tok, seq_length, seed, num_samples
        self.num_image_tokens, self.image_size = num_image_tokens, image_size
        self.split = SPLIT_NAMES.index(split)
        blend = parse_blend([data_path] if isinstance(data_path, str) else list(data_path))
        self.sources = [IndexedSource(prefix, tok.eos_id) for _, prefix in blend]
        self.docs = []  # per source: usable documents of this split
        for source in self.sources:
            start, end = split_ranges(source.ds.num_documents, parse_split(splits))[self.split]
            self.docs.append(np.flatnonzero(source.usable[start:end]) + start)
        serves = {kind: np.array([w if (s.multimodal == (kind == "image") and len(docs)) else 0.0
                                  for (w, _), s, docs in zip(blend, self.sources, self.docs)])
                  for kind in ("text", "image")}
        kind_of = {t: "image" if t in IMAGE_TASKS else "text" for t in TASK_NAMES}
        if task_weights:
            self.probs = task_probabilities(task_weights)
        else:
            self.probs = task_probabilities({t: 1.0 for t in TASK_NAMES if serves[kind_of[t]].sum()}
                                            or {t: 1.0 for t in TASK_NAMES})
        used = [t for t, p in zip(TASK_NAMES, self.probs) if p > 0]
        for t in used:
            if not serves[kind_of[t]].sum():
                what = "image-text pairs" if kind_of[t] == "image" else "text documents"
                raise ValueError(f"task {t} has weight > 0 but --data-path "
                                 f"{' '.join(p for _, p in blend)} has no {what} of at least "
                                 f"{MIN_TEXT_TOKENS} tokens in the {split} split (--split {splits})")
        self.task_ids, self.source_ids, self.draws = sample_index(
            self.probs, [serves[kind_of[t]] for t in TASK_NAMES], seed, self.split, num_samples)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _document(self, source: int, draw: int) -> int:
        """The draw-th document read from a source: a fresh permutation every epoch."""
        docs = self.docs[source]
        epoch, pos = divmod(draw, len(docs))
        perm = self._perms.get((source, epoch))
        if perm is None:
            if len(self._perms) >= 2 * len(self.sources):
                self._perms.clear()
            perm = self._perms[source, epoch] = epoch_permutation(self.seed, self.split, source,
                                                                 epoch, len(docs))
        return int(docs[perm[pos]])

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        task_id, s = int(self.task_ids[i]), int(self.source_ids[i])
        task, source = TASK_NAMES[task_id], self.sources[s]
        doc = self._document(s, int(self.draws[i]))
        # No text longer than seq_length can fit, so never convert more than that.
        text = source.text(doc)[:self.seq_length].tolist()
        rng = np.random.default_rng([self.seed, self.split, 3, i])
        sample = build_sample(task, text, self.tok, rng, self.seq_length, self.num_image_tokens)
        image = None
        if task in IMAGE_TASKS:
            with Image.open(io.BytesIO(source.image(doc))) as img:
                image = image_to_tensor(img, self.image_size)
        return {"tokens": torch.tensor(sample.tokens, dtype=torch.long),
                "prefix_len": sample.prefix_len, "task_id": task_id, "image": image}


class MockDataset(Dataset):
    """Synthetic samples of the configured shapes for benchmarks and smoke runs: random tokens,
    random task, half with (random) images, texts within 10% of what fits; deterministic from
    (seed, i). Built by the task builders like real samples, with the special-token ids every M6
    vocabulary starts with (tokenizer.SPECIAL_TOKENS), since there is no vocabulary file."""

    def __init__(self, vocab_size: int, seq_length: int, num_image_tokens: int, image_size: int,
                 seed: int, num_samples: int):
        self.vocab_size, self.seq_length = vocab_size, seq_length
        self.seed, self.num_samples = seed, num_samples
        self.num_image_tokens, self.image_size = num_image_tokens, image_size
        self.tok = M6Tokenizer(list(SPECIAL_TOKENS))
        self.first_text_id = min(self.tok.sentinel_ids)  # past [PAD] .. [IMG]; ids stand for nothing here

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        rng = np.random.default_rng([self.seed, i])
        has_image = bool(rng.random() < 0.5)
        tasks = IMAGE_TASKS if has_image else TEXT_TASKS
        task = tasks[rng.integers(len(tasks))]
        room = self.seq_length - (self.num_image_tokens if has_image else 0) - LAYOUT_SPECIAL_TOKENS
        n = int(rng.integers(max(MIN_TEXT_TOKENS, room - room // 10), room + 1))
        text = rng.integers(self.first_text_id, self.vocab_size, n).tolist()
        sample = build_sample(task, text, self.tok, rng, self.seq_length, self.num_image_tokens)
        image = None
        if has_image:
            shape = (3, self.image_size, self.image_size)
            image = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
        return {"tokens": torch.tensor(sample.tokens, dtype=torch.long),
                "prefix_len": sample.prefix_len, "task_id": TASK_NAMES.index(task), "image": image}


def collate(samples: list[dict], seq_length: int, pad_id: int,
            image_size: int) -> dict[str, torch.Tensor]:
    """Pad samples to seq_length and derive the training targets from the layout: position i
    predicts token i+1, and the loss covers prefix_len-1 <= i < valid_len-1 (every target token
    and the EOS), or where a sample has a "loss_span" (first, end), the tokens first..end-1
    (text-to-image's codes without [BOI] and [EOI])."""
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
    spans = [s.get("loss_span") or (s["prefix_len"], len(s["tokens"])) for s in samples]
    first, end = (torch.tensor(x, dtype=torch.long) for x in zip(*spans))
    pos = torch.arange(S)
    loss_mask = (pos >= first[:, None] - 1) & (pos < end[:, None] - 1)
    labels = torch.full_like(tokens, pad_id)
    labels[:, :-1] = tokens[:, 1:]
    labels.masked_fill_(~loss_mask, pad_id)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask.float(),
            "prefix_len": prefix_len, "valid_len": valid_len, "images": images,
            "has_image": has_image,
            "task_id": torch.tensor([s["task_id"] for s in samples], dtype=torch.long)}


def _worker_init(worker_id: int) -> None:
    """One torch thread per worker: workers decode images in parallel already. SIGTERM and
    SIGUSR1 are ignored: SLURM signals every process of a job step, and only the rank decides
    to stop (--exit-signal-handler) and then shuts its workers down itself; a worker whose rank
    is gone exits on its own (PyTorch's worker watchdog)."""
    torch.set_num_threads(1)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class DataParallelSampler(Sampler[int]):
    """Sample indices of one data-parallel rank, lazily: consecutive micro-batches are dealt to
    the ranks in turn, so rank r's j-th micro-batch is micro-batch j * dp_size + r of one process."""

    def __init__(self, start: int, stop: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.start, self.stop, self.micro = start, stop, micro_batch_size
        self.rank, self.size = dp_rank, dp_size

    def __iter__(self):
        for base in range(self.start + self.rank * self.micro, self.stop, self.micro * self.size):
            yield from range(base, min(base + self.micro, self.stop))

    def __len__(self) -> int:
        n = max(0, self.stop - self.start)
        rounds, rest = divmod(n, self.micro * self.size)  # whole rounds of one micro-batch per rank
        return rounds * self.micro + min(self.micro, max(0, rest - self.rank * self.micro))


def build_data_loader(dataset: Dataset, micro_batch_size: int, seq_length: int, pad_id: int,
                      image_size: int, consumed_samples: int, num_workers: int,
                      dp_rank: int = 0, dp_size: int = 1) -> DataLoader:
    """Fixed-size batches of consecutive samples starting at `consumed_samples`, so a resumed run
    continues with exactly the next sample; `consumed_samples` must be a multiple of
    micro_batch_size x dp_size (it is: steps consume whole global batches)."""
    indices = DataParallelSampler(consumed_samples, len(dataset), micro_batch_size, dp_rank, dp_size)
    return DataLoader(
        dataset, batch_size=micro_batch_size, sampler=indices,
        drop_last=True, num_workers=num_workers,
        collate_fn=partial(collate, seq_length=seq_length, pad_id=pad_id, image_size=image_size),
        persistent_workers=num_workers > 0,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        # Its own generator: starting an iterator must not draw from the global RNG, or dropout
        # after a resume would differ from a run that never stopped.
        generator=torch.Generator())
