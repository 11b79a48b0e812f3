"""Fine-tuning data: jsonl files of a downstream task, laid out as pretraining samples.

Every task keeps the prefix-LM layout of pretraining, `[IMG]*n [CLS] source [SEP] target [EOS]`:
the source is read bidirectionally, the target is generated, and the loss covers the target.

    task             row fields                      source                      target
    caption          image, caption (or text)        (nothing)                   the caption
    vqa              image, question, answer         the question                the answer
    itm              image, text, label (1 or 0)     (nothing)                   the text
    text_generation  source, target                  the source                  the target
    text_to_image    (indexed: caption, image codes) the caption                 [BOI] the codes [EOI]

Image-text matching is generative: a pair's score is the mean log-likelihood of the text as the
image's caption, log P(text | image) per token, and fine-tuning trains captioning on the matched
pairs (label 1; the others are the evaluation's distractors). Neither a binary head on a pooled
vector nor a generated "是"/"否" (yes/no): both must learn to compare the text with the image from
the match labels alone, a problem gradient descent barely starts on (the generative yes/no on the
sample ITM set stayed at chance, loss ln 2, for 500 steps at lr 1e-3 and 3e-4; PERFORMANCE.md),
while the caption likelihood is what pretraining taught, so it works zero-shot, needs no new
weights and trains under every layout with the one loss. Its scores rank texts for one image and
images for one text (accuracy: the matched text outscores every distractor of its image;
retrieval recall@k), but are no calibrated probability of a match.

Text-to-image reads images as the codes of an image tokenizer (tools/encode_image_codes.py writes
them as documents [caption, codes], so training never runs the encoder): its target is `[BOI]`,
the grid's codes in raster order as the tokens after the text vocabulary (ImageCodeTokens), and
`[EOI]`, and its loss covers the codes alone, since [BOI] and [EOI] are known in advance.

Data comes as jsonl, or for large sets as an indexed dataset that `tools/preprocess_data.py --task
TASK` built from the same jsonl (IndexedExamples: token ids and JPEGs on disk, read when a sample
needs them). In jsonl, images are what preprocessing accepts (a path relative to the jsonl file, a
data: URI or bare base64); each is read and normalised once, when the file is loaded
(data/images.py), so a missing or corrupt image is counted there, and more than
--max-bad-fraction of them stops the run with one error before any work.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from megatron_m6.data.dataset import image_to_tensor
from megatron_m6.data.images import JPEG_QUALITY, MAX_ASPECT_RATIO, MIN_IMAGE_SIZE, load_image_bytes, prepare_image
from megatron_m6.data.indexed import IMAGE_MODE, IndexedDataset, IndexedDatasetError, dataset_exists
from megatron_m6.data.task_spec import FINETUNE_TASKS, LAYOUT_SPECIAL_TOKENS, TASK_NAMES

IMAGE_FINETUNE_TASKS = ("caption", "vqa", "itm")
REQUIRED_FIELDS = {"caption": ("image", "caption"), "vqa": ("image", "question", "answer"),
                   "itm": ("image", "text", "label"), "text_generation": ("source", "target")}
# The pretraining task whose layout each fine-tuning task shares: its slot in the per-task loss
# of the log line.
LOSS_SLOT = {"caption": "captioning", "vqa": "mm_prefix_lm", "itm": "captioning",
             "text_generation": "prefix_lm", "text_to_image": "prefix_lm"}
TEXT_TO_IMAGE = "text_to_image"


class DownstreamDataError(ValueError):
    """A downstream file that cannot be used; the message names the file and the first bad row."""


@dataclass
class Example:
    """One row of a task: the source and target texts, the image (normalised JPEG bytes) or None,
    and for itm the label and the image's jsonl value (`group`: the texts one image is matched
    against); `references` holds every acceptable answer (captions, VQA answers). Rows of an
    indexed dataset also carry the token ids they were stored as."""

    source: str
    target: str
    image: bytes | None
    references: list[str] = field(default_factory=list)
    label: int | None = None
    group: str = ""
    line: int = 0  # in its jsonl file (or the document's number, from 1), to trace a prediction to its row
    source_ids: list[int] | None = None
    target_ids: list[int] | None = None


@dataclass
class LoadReport:
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> rows

    def summary(self, path: str) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"{path}: {self.rows} rows" + (f", skipped {reasons}" if reasons else "")


def row_example(task: str, row: dict, where: str) -> Example:
    """The Example of one parsed row (its image not read yet); a missing field is an error."""
    if task == "caption" and "caption" not in row and "text" in row:
        row = {**row, "caption": row["text"]}
    missing = [k for k in REQUIRED_FIELDS[task] if k not in row]
    if missing:
        raise DownstreamDataError(f"{where}: task {task} needs the fields {', '.join(REQUIRED_FIELDS[task])}; "
                                  f"this row lacks {', '.join(missing)}")
    if task == "caption":
        refs = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
        return Example("", str(refs[0]), None, [str(r) for r in refs])
    if task == "vqa":
        answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        return Example(str(row["question"]), str(answers[0]), None, [str(a) for a in answers])
    if task == "itm":
        if row["label"] not in (0, 1, True, False):
            raise DownstreamDataError(f"{where}: label must be 0 or 1, got {row['label']!r}")
        return Example("", str(row["text"]), None, [str(row["text"])], int(row["label"]), str(row["image"]))
    return Example(str(row["source"]), str(row["target"]), None, [str(row["target"])])


def load_examples(path: str, task: str, image_size: int, max_bad_fraction: float = 0.0,
                  text_only: bool = False) -> tuple[list[Example], LoadReport]:
    """Every usable row of jsonl `path` for `task`, its image read and normalised. Malformed json or
    a row lacking the task's fields is an error; rows whose image cannot be used are skipped and
    counted, up to `max_bad_fraction` of the rows. `text_only` (the baseline that never sees the
    image) keeps the rows and drops their images."""
    if task not in FINETUNE_TASKS:
        raise DownstreamDataError(f"unknown task {task!r}; tasks are {', '.join(FINETUNE_TASKS)}")
    if not os.path.isfile(path):
        raise DownstreamDataError(f"{path} does not exist")
    base_dir = os.path.dirname(os.path.abspath(path))
    examples, report = [], LoadReport()
    with open(path, encoding="utf-8-sig") as f:  # a BOM at the start of the file is not part of row 1
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DownstreamDataError(f"{where}: not valid json ({e.msg})") from None
            if not isinstance(row, dict):
                raise DownstreamDataError(f"{where}: a row must be a json object")
            report.rows += 1
            example = row_example(task, row, where)
            example.line = line_no
            if task in IMAGE_FINETUNE_TASKS and not text_only:
                data, reason = load_image_bytes(str(row["image"]), base_dir)
                if data is not None:
                    data, reason = prepare_image(data, image_size, JPEG_QUALITY, MIN_IMAGE_SIZE, MAX_ASPECT_RATIO)
                if data is None:
                    report.skipped[reason] += 1
                    continue
                example.image = data
            examples.append(example)
    if not report.rows:
        raise DownstreamDataError(f"{path} has no rows")
    bad = sum(report.skipped.values())
    if bad > max_bad_fraction * report.rows:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(report.skipped.items()))
        raise DownstreamDataError(f"{path}: {bad} of {report.rows} rows have no usable image ({reasons}), "
                                  f"more than --max-bad-fraction {max_bad_fraction}")
    return examples, report


class IndexedExamples(Sequence):
    """The rows of an indexed dataset of a task, each read from disk when asked for, so a large set
    costs no memory. `tools/preprocess_data.py --task TASK` writes them as documents of a source
    and a target item, then the image for the image tasks; a caption set may also be the
    pretraining pairs (`--image-key`), documents of [caption, image]. An itm set holds its matched
    pairs only (what fine-tuning trains on). Texts are kept as the token ids training reads, and
    decoded for the metrics and the predictions' file."""

    def __init__(self, prefix: str, task: str, tok, text_only: bool = False):
        try:
            ds = self.ds = IndexedDataset(prefix)
        except IndexedDatasetError as e:
            raise DownstreamDataError(str(e)) from None
        self.task, self.tok, self.text_only = task, tok, text_only
        self.with_image = task in IMAGE_FINETUNE_TASKS
        kinds = ("text", "image-text")
        if ds.multimodal != self.with_image:
            raise DownstreamDataError(f"{prefix} is a {kinds[ds.multimodal]} dataset; task {task} needs "
                                      f"{kinds[self.with_image]} documents (tools/preprocess_data.py --task {task})")
        if ds.num_documents == 0:
            raise DownstreamDataError(f"{prefix} has no documents")
        self.text_items = np.diff(ds.document_indices) - int(self.with_image)
        allowed = (1, 2) if task == "caption" else (2,)
        modes = ds.sequence_modes
        images_last = not self.with_image or ((modes == IMAGE_MODE).sum() == ds.num_documents
                                              and (modes[ds.document_indices[1:] - 1] == IMAGE_MODE).all())
        if not images_last or not np.isin(self.text_items, allowed).all():
            shape = "[source, target, image]" if self.with_image else "[source, target]"
            raise DownstreamDataError(f"{prefix}: a {task} dataset's documents are {shape}; this one is another "
                                      "kind (build it with tools/preprocess_data.py --task)")

    def __len__(self) -> int:
        return self.ds.num_documents

    def __getitem__(self, i: int) -> Example:
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range [0, {len(self)})")
        first, n_text = int(self.ds.document_indices[i]), int(self.text_items[i])
        source = self.ds[first].tolist() if n_text == 2 else []
        target = self.ds[first + n_text - 1].tolist()
        image = self.ds.image_bytes(first + n_text) if self.with_image and not self.text_only else None
        if self.task == TEXT_TO_IMAGE:  # the target is an image's codes, as their tokens
            target = self.tok.image_codes.to_ids(target).tolist()
        text = self.tok.decode(target)
        return Example(self.tok.decode(source), text, image, [text], 1 if self.task == "itm" else None,
                       group=str(i), line=i + 1, source_ids=source, target_ids=target)


def open_examples(path: str, task: str, tok, image_size: int, max_bad_fraction: float = 0.0,
                  text_only: bool = False) -> tuple[Sequence[Example], str]:
    """The examples of `path`, a jsonl file (load_examples) or an indexed dataset's prefix
    (IndexedExamples), and a line saying what was read."""
    if task not in FINETUNE_TASKS:
        raise DownstreamDataError(f"unknown task {task!r}; tasks are {', '.join(FINETUNE_TASKS)}")
    if task == TEXT_TO_IMAGE and not dataset_exists(path):
        raise DownstreamDataError(f"{path}: text_to_image reads the image-code dataset tools/encode_image_codes.py "
                                  "makes (PREFIX.idx, PREFIX.bin and PREFIX.image_codes.json)")
    if os.path.isfile(path):
        examples, report = load_examples(path, task, image_size, max_bad_fraction, text_only)
        return examples, report.summary(path)
    if dataset_exists(path):
        examples = IndexedExamples(path, task, tok, text_only)
        return examples, f"{path}: {len(examples)} documents of an indexed dataset"
    raise DownstreamDataError(f"{path} is neither a jsonl file nor an indexed dataset (PREFIX.idx and PREFIX.bin)")


def require_distractors(task: str, examples: Sequence[Example], path: str) -> None:
    """itm is measured on each image's texts, matched and not: an indexed set has only the matches."""
    if task == "itm" and isinstance(examples, IndexedExamples):
        raise DownstreamDataError(f"{path}: itm accuracy needs each image's distractors, which an indexed "
                                  "dataset does not keep; give the jsonl")


def layout(example: Example, tok, seq_length: int, num_image_tokens: int,
           with_target: bool = True) -> tuple[list[int], int]:
    """(tokens, prefix_len) of `[IMG]*n [CLS] source [SEP] target [EOS]` (target and EOS only with
    `with_target`), within seq_length: the target is kept whole and the source loses its first
    tokens (a question or prompt ends it); a target that cannot fit is cut too, keeping its EOS.
    A prefix is cut as the sample with its target would be, so generation reads what training read."""
    n_img = num_image_tokens if example.image is not None else 0
    source = tok.encode(example.source) if example.source_ids is None else example.source_ids
    target = tok.encode(example.target) if example.target_ids is None else example.target_ids
    budget = seq_length - n_img - LAYOUT_SPECIAL_TOKENS
    target = target[:max(budget, 0)]
    keep = max(budget - len(target), 0)
    source = source[len(source) - keep:] if len(source) > keep else source
    prefix = [tok.img_id] * n_img + [tok.cls_id] + source + [tok.sep_id]
    return (prefix + target + [tok.eos_id], len(prefix)) if with_target else (prefix, len(prefix))


def text_to_image_prefix(tok, source: Sequence[int], num_codes: int, length: int) -> list[int] | None:
    """`[CLS] source [SEP]` and [PAD]s up to length - num_codes - 2 tokens, so that `[BOI] codes
    [EOI]` fills the rest of length; None when source does not fit.

    Every caption then puts [BOI] and each code at the same position, as DALL-E's fixed-length text
    segment does: with learned absolute positions, a code's position is where it lies in the
    image, whatever the caption's length. The [PAD]s are part of the bidirectional prefix."""
    room = length - num_codes - 2 - (len(source) + 2)
    if room < 0:
        return None
    return [tok.cls_id, *source, tok.sep_id] + [tok.pad_id] * room


def text_to_image_layout(example: Example, tok, seq_length: int) -> tuple[list[int], int, tuple[int, int]]:
    """(tokens, prefix_len, loss span) of `[CLS] caption [SEP] [PAD]... [BOI] codes [EOI]`, exactly
    seq_length tokens (text_to_image_prefix): the caption is the bidirectional prefix, the rest
    causal, and the loss covers the tokens in [first, end) of the span, the codes. An image is never
    cut, and neither is its caption: one that does not fit is an error."""
    codes = tok.image_codes
    source = tok.encode(example.source) if example.source_ids is None else example.source_ids
    prefix = text_to_image_prefix(tok, source, len(example.target_ids), seq_length)
    if prefix is None:
        raise DownstreamDataError(f"a caption of {len(source)} tokens and {len(example.target_ids)} image codes "
                                  f"need --seq-length {len(source) + len(example.target_ids) + 4}, more than "
                                  f"{seq_length} (example {example.line}: {example.source[:40]!r})")
    tokens = prefix + [codes.boi_id] + list(example.target_ids) + [codes.eoi_id]
    return tokens, len(prefix), (len(prefix) + 1, len(tokens) - 1)


def decode_image(jpeg: bytes, image_size: int) -> torch.Tensor:
    with Image.open(io.BytesIO(jpeg)) as img:
        return image_to_tensor(img, image_size)


class DownstreamDataset(Dataset):
    """Training samples of a task, in the collate format of pretraining (data/dataset.py), for
    `num_samples` samples: epoch after epoch over the examples (for itm, its matched pairs), each
    epoch in a fresh order that is a pure function of (seed, epoch), so resuming needs only the
    consumed-sample count."""

    def __init__(self, examples: Sequence[Example], task: str, tok, seq_length: int, num_image_tokens: int,
                 image_size: int, seed: int, num_samples: int):
        if task == "itm" and not isinstance(examples, IndexedExamples):
            examples = [e for e in examples if e.label == 1]
        if not examples:
            raise DownstreamDataError(f"no {task} examples to train on")
        self.examples, self.task, self.tok, self.seq_length = examples, task, tok, seq_length
        self.num_image_tokens, self.image_size, self.seed = num_image_tokens, image_size, seed
        self.num_samples, self.task_id = num_samples, TASK_NAMES.index(LOSS_SLOT[task])
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.num_samples

    def example_index(self, i: int) -> int:
        epoch, pos = divmod(i, len(self.examples))
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, 7, epoch])
            self._order = (epoch, rng.permutation(len(self.examples)))
        return int(self._order[1][pos])

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        example = self.examples[self.example_index(i)]
        if self.task == TEXT_TO_IMAGE:
            tokens, prefix_len, span = text_to_image_layout(example, self.tok, self.seq_length)
            return {"tokens": torch.tensor(tokens, dtype=torch.long), "prefix_len": prefix_len,
                    "task_id": self.task_id, "image": None, "loss_span": span}
        tokens, prefix_len = layout(example, self.tok, self.seq_length, self.num_image_tokens)
        image = None if example.image is None else decode_image(example.image, self.image_size)
        return {"tokens": torch.tensor(tokens, dtype=torch.long), "prefix_len": prefix_len,
                "task_id": self.task_id, "image": image}
