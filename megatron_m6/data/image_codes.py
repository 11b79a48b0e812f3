"""Image-text pairs as token documents for text-to-image fine-tuning: [caption ids, image codes].

M6 generates an image as the image tokenizer's grid of codes, conditioned on the caption. Encoding
every image once, here, means fine-tuning reads codes from a memory map and never runs the
tokenizer's encoder. The output is a plain text indexed dataset `PREFIX.{bin,idx}`; each document
has two items, the caption's token ids and the grid x grid codes in raster order (raw values
0..codebook_size-1; a model maps them to its own ids). `PREFIX.image_codes.json` says which
tokenizer (its ImageTokenizerInfo) and vocabulary made it, and what was skipped.

Publishing: the old `.idx` goes first, then the metadata is replaced, then the new `.bin` and
`.idx` are renamed into place, so a `PREFIX.idx` (the dataset) never exists without the metadata
of its own run, whenever the process is killed.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from megatron_m6.data.images import (
    JPEG_QUALITY,
    MAX_ASPECT_RATIO,
    MIN_IMAGE_SIZE,
    UNREADABLE,
    load_image_bytes,
    prepare_image,
)
from megatron_m6.data.indexed import (
    IMAGE_MODE,
    TEXT_MODE,
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    dataset_exists,
    idx_path,
    token_dtype,
)
from megatron_m6.data.preprocess import BAD_JSON, MISSING_KEY, ROWS_BEFORE_BAD_FRACTION_STOP, UNUSABLE_IMAGE
from megatron_m6.tokenizer import DEFAULT_VOCAB_FILE, M6Tokenizer
from megatron_m6.vision.pixels import image_tensor
from megatron_m6.vision.vq import ImageTokenizerError, ImageTokenizerInfo, load_image_tokenizer, tokenizer_info

METADATA_SUFFIX = ".image_codes.json"
FORMAT, VERSION = "m6-image-codes", 1
EMPTY_CAPTION = "empty_caption"
LOG_SECONDS = 30.0


def metadata_path(prefix: str) -> str:
    return prefix + METADATA_SUFFIX


@dataclass
class CodeReport:
    """What encode_image_codes wrote and skipped."""

    output_prefix: str
    info: ImageTokenizerInfo
    documents: int
    rows: int
    skipped: dict[str, int]
    seconds: float

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return (f"{self.output_prefix}: {self.documents} documents of {self.info.grid}x{self.info.grid} codes "
                f"(codebook {self.info.codebook_size}) from {self.rows} rows in {self.seconds:.1f} s "
                f"({self.documents / max(self.seconds, 1e-9):.1f} images/s); skipped: {skipped}")


@dataclass
class _Row:
    where: str  # file:line or prefix:document, for messages
    caption: np.ndarray | None
    image: bytes | None
    reason: str | None = None  # why the row cannot be used


def _jsonl_rows(path: str, tok: M6Tokenizer) -> Iterator[_Row]:
    """Rows {"image", "caption"}; the image a path relative to the jsonl, a data URI or base64."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            where = f"{path}:{n}"
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8-sig" if n == 1 else "utf-8"))
            except ValueError:  # bad JSON or bad UTF-8
                yield _Row(where, None, None, BAD_JSON)
                continue
            if not isinstance(row, dict) or not isinstance(row.get("caption"), str) \
                    or not isinstance(row.get("image"), str):
                yield _Row(where, None, None, MISSING_KEY)
                continue
            ids = np.array(tok.encode(row["caption"]), dtype=np.int64)
            data, reason = load_image_bytes(row["image"], base)
            yield _Row(where, ids, data, reason or (None if len(ids) else EMPTY_CAPTION))


def _indexed_rows(prefix: str, vocab_size: int) -> Iterator[_Row]:
    """The documents [caption, image] of an image-text dataset (tools/preprocess_data.py --image-key)."""
    ds = IndexedDataset(prefix)
    bounds = np.asarray(ds.document_indices)
    modes = ds.sequence_modes
    if modes is None or ((np.diff(bounds) != 2).any()
                         or (modes[bounds[:-1]] != TEXT_MODE).any() or (modes[bounds[:-1] + 1] != IMAGE_MODE).any()):
        raise ValueError(f"{prefix} is not an image-text dataset (documents [caption, image]: "
                         "tools/preprocess_data.py --image-key)")
    for doc in range(ds.num_documents):
        first = int(bounds[doc])
        where, ids = f"{prefix}:document {doc}", np.asarray(ds[first], dtype=np.int64)
        if len(ids) and int(ids.max()) >= vocab_size:
            raise ValueError(f"{where} has token id {int(ids.max())}, outside the vocabulary of {vocab_size} "
                             "tokens: give the --vocab-file the pairs were tokenised with")
        try:
            data = ds.image_bytes(first + 1)
        except IndexedDatasetError:  # an impossible padding count
            yield _Row(where, None, None, UNREADABLE)
            continue
        yield _Row(where, ids, data, None if len(ids) else EMPTY_CAPTION)


def _rows(inputs: Sequence[str], tok: M6Tokenizer) -> Iterator[_Row]:
    for path in inputs:
        if os.path.isfile(path):
            yield from _jsonl_rows(path, tok)
        else:
            yield from _indexed_rows(path, tok.vocab_size)


def _check_inputs(inputs: Sequence[str], output_prefix: str) -> None:
    """Fail before any work on an input that is neither a jsonl file nor an indexed dataset."""
    if not inputs:
        raise ValueError("no input given")
    for path in inputs:
        if path.endswith((".bin", ".idx")) and dataset_exists(path[:-4]):
            raise ValueError(f"input {path}: give the indexed dataset's prefix {path[:-4]}")
        if not os.path.isfile(path) and not dataset_exists(path):
            raise FileNotFoundError(f"input {path} is neither a jsonl file nor an indexed dataset prefix "
                                    "(PREFIX.bin and PREFIX.idx)")
        if os.path.abspath(path) == os.path.abspath(output_prefix):
            raise ValueError(f"the output prefix {output_prefix} is also an input")


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but this machine has no CUDA GPU")
    return dev


def _check_bad_images(skipped: Counter, rows: int, first_bad: _Row | None, max_bad_fraction: float) -> None:
    """Stop when more than max_bad_fraction of the rows read have an image that cannot be read at
    all (a wrong image root, usually), as preprocessing does."""
    bad = {reason: skipped[reason] for reason in UNUSABLE_IMAGE if skipped[reason]}
    if sum(bad.values()) <= max_bad_fraction * rows:
        return
    raise ValueError(f"{sum(bad.values())} of the first {rows} rows have no usable image "
                     f"({', '.join(f'{n} {r}' for r, n in bad.items())}), more than --max-bad-fraction "
                     f"{max_bad_fraction} (first: {first_bad.where}, {first_bad.reason}); image paths are "
                     "relative to the jsonl's folder")


def _publish(writer: IndexedDatasetWriter, prefix: str, metadata: dict) -> None:
    """Old .idx out, new metadata in, then the new .bin and .idx (module docstring)."""
    if os.path.exists(idx_path(prefix)):
        os.remove(idx_path(prefix))
    tmp = metadata_path(prefix) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, metadata_path(prefix))
    writer.finalize()


def encode_image_codes(inputs: str | Sequence[str], output_prefix: str, tokenizer_path: str,
                       vocab_file: str | None = None, batch_size: int = 64, device: str = "cpu",
                       max_bad_fraction: float = 0.0, log: Callable[[str], None] | None = None) -> CodeReport:
    """Write PREFIX.{bin,idx} of documents [caption ids, image codes] and PREFIX.image_codes.json.

    inputs: jsonl files of {"image", "caption"} rows and/or image-text indexed dataset prefixes
    (whose caption ids are kept: give the vocabulary they were tokenised with). Images are
    normalised as preprocessing stores them (prepare_image at the tokenizer's image size, JPEG),
    then encoded batch_size at a time; unusable rows are skipped and counted by reason. `log`
    gets a progress line every LOG_SECONDS.
    """
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if not 0 <= max_bad_fraction <= 1:
        raise ValueError(f"--max-bad-fraction must be in [0, 1], got {max_bad_fraction}")
    _check_inputs(inputs, output_prefix)
    dev = _check_device(device)
    model = load_image_tokenizer(tokenizer_path, dev)
    info = tokenizer_info(model)
    tok = M6Tokenizer.from_vocab_file(vocab_file or DEFAULT_VOCAB_FILE)
    dtype = token_dtype(max(tok.vocab_size, info.codebook_size))
    skipped: Counter = Counter()
    first_bad: _Row | None = None
    rows = documents = 0
    captions: list[np.ndarray] = []
    images: list[torch.Tensor] = []
    start = last_log = time.perf_counter()

    def flush() -> None:
        nonlocal documents
        if not images:
            return
        codes = model.encode(torch.stack(images).to(dev)).reshape(len(images), -1).cpu().numpy()  # encode is no_grad
        writer.add_documents(np.concatenate([x for pair in zip(captions, codes) for x in pair]),
                             np.array([n for ids in captions for n in (len(ids), codes.shape[1])]),
                             np.full(len(images), 2))
        documents += len(images)
        captions.clear()
        images.clear()

    with IndexedDatasetWriter(output_prefix, dtype) as writer:
        for row in _rows(inputs, tok):
            rows += 1
            if log and time.perf_counter() - last_log > LOG_SECONDS:
                last_log = time.perf_counter()
                log(f"{rows} rows read, {documents} encoded ({documents / (last_log - start):.1f} images/s), "
                    f"{sum(skipped.values())} skipped")
            pixels = None
            if row.reason is None:
                jpeg, row.reason = prepare_image(row.image, info.image_size, JPEG_QUALITY, MIN_IMAGE_SIZE,
                                                 MAX_ASPECT_RATIO)
                pixels = image_tensor(jpeg, info.image_size) if jpeg is not None else None
            if pixels is None:
                skipped[row.reason] += 1
                if row.reason in UNUSABLE_IMAGE:
                    first_bad = first_bad or row
                    if rows >= ROWS_BEFORE_BAD_FRACTION_STOP:
                        _check_bad_images(skipped, rows, first_bad, max_bad_fraction)
                continue
            captions.append(row.caption)
            images.append(pixels)
            if len(images) == batch_size:
                flush()
        flush()
        _check_bad_images(skipped, rows, first_bad, max_bad_fraction)
        if not documents:
            raise ValueError(f"no row of {', '.join(inputs)} has a usable image and caption "
                             f"({rows} rows, skipped: {dict(skipped) or 'none'})")
        report = CodeReport(output_prefix, info, documents, rows, dict(skipped), time.perf_counter() - start)
        _publish(writer, output_prefix, {
            "format": FORMAT, "version": VERSION,
            "layout": "documents [caption token ids, grid*grid image codes in raster order, raw 0..codebook_size-1]",
            "image_tokenizer": asdict(info), "image_tokenizer_path": os.path.abspath(tokenizer_path),
            "vocab_sha256": tok.digest, "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
            "inputs": [os.path.abspath(p) for p in inputs], "rows": rows, "documents": documents,
            "skipped": report.skipped})
    return report


def _read_metadata(prefix: str) -> tuple[dict, ImageTokenizerInfo]:
    path = metadata_path(prefix)
    if not os.path.isfile(path):
        raise ImageTokenizerError(f"{prefix} is not an image-code dataset (no {path}): make it with "
                                  "tools/encode_image_codes.py")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}, "
                             f"expected {FORMAT!r} version {VERSION}")
        tokenizer = meta["image_tokenizer"]
        info = ImageTokenizerInfo(**{f.name: tokenizer[f.name] for f in fields(ImageTokenizerInfo)})
        if any(type(n) is not int for n in (info.codebook_size, info.grid, info.image_size, meta["documents"])) \
                or not isinstance(info.sha256, str):
            raise TypeError("codebook_size, grid, image_size, documents must be integers and sha256 a string")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ImageTokenizerError(f"{path} is malformed ({type(e).__name__}: {e}): remake it with "
                                  "tools/encode_image_codes.py") from None
    return meta, info


def read_code_metadata(prefix: str) -> ImageTokenizerInfo:
    """The ImageTokenizerInfo of the tokenizer that encoded the image-code dataset PREFIX."""
    return _read_metadata(prefix)[1]


def check_code_dataset(prefix: str, info: ImageTokenizerInfo) -> None:
    """Refuse, in one line, an image-code dataset made by another tokenizer than `info`, or whose
    metadata does not describe its files (a dataset of another run written to the same prefix)."""
    meta, stored = _read_metadata(prefix)
    difference = info.mismatch(stored)
    if difference:
        raise ImageTokenizerError(f"{prefix} was encoded with another image tokenizer: {difference}")
    documents = IndexedDataset(prefix).num_documents
    if documents != meta["documents"]:
        raise ImageTokenizerError(f"{metadata_path(prefix)} describes {meta['documents']} documents but {prefix} "
                                  f"holds {documents}: it belongs to another run; remake the dataset")
