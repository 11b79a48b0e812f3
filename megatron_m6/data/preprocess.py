"""Corpus building: raw jsonl -> Megatron indexed datasets (the engine of tools/preprocess_data.py).

The input files are cut into byte ranges at line boundaries; a pool of workers parses, cleans,
tokenises (and, for image-text pairs, re-encodes images) whole ranges at a time, and the parent
process deduplicates and writes the results in input order, so the output does not depend on the
number of workers. Bad input (undecodable bytes, malformed JSON, missing keys, unusable images)
is counted by reason, with the first examples logged by file and line, and never stops a run.

Outputs, per JSON key (Megatron's names): `PREFIX_KEY_document` (one item per document),
`PREFIX_KEY_sentence` (one item per sentence, with --split-sentences), or for image-text pairs
`PREFIX_KEY_image`, a multimodal dataset whose documents are [caption tokens, JPEG].
"""

from __future__ import annotations

import glob
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from multiprocessing import Pool

import numpy as np

from megatron_m6.data.cleaning import Cleaner, CleaningConfig, split_sentences
from megatron_m6.data.corpus_formats import (
    INPUT_SUFFIXES,
    JSON_MEMBER,
    UTF8_BOM,
    CorruptFile,
    is_streamed,
    stream_chunks,
)
from megatron_m6.data.dedup import BANDS, Deduplicator, digest, image_keys, minhash
from megatron_m6.data.downstream import IMAGE_FINETUNE_TASKS, REQUIRED_FIELDS, DownstreamDataError, row_example
from megatron_m6.data.global_dedup import KeysWriter, concatenate_keys, keys_path
from megatron_m6.data.images import (
    BAD_BASE64,
    IMAGE_NOT_FOUND,
    JPEG_QUALITY,
    MAX_ASPECT_RATIO,
    MIN_IMAGE_SIZE,
    TRUNCATED,
    UNREADABLE,
    load_image_bytes,
    prepare_image,
)
from megatron_m6.data.indexed import MULTIMODAL_DTYPE, IndexedDatasetWriter, merge_datasets, tmp_bin_path, token_dtype
from megatron_m6.data.journal import SYNC_SECONDS, Journal
from megatron_m6.data.shards import (
    completed,
    describe_inputs,
    remove_manifest,
    settings_digest,
    shard_of,
    shard_suffix,
    write_manifest,
)
from megatron_m6.tokenizer import DEFAULT_VOCAB_FILE, M6Tokenizer

INVALID_UTF8, BAD_JSON, MISSING_KEY, EMPTY_FILE, EMPTY_TEXT, ITM_DISTRACTOR, CORRUPT_FILE = (
    "invalid_utf8", "bad_json", "missing_key", "empty_file", "empty_text", "itm_distractor", "corrupt_file")
TEXT_CHUNK_BYTES, IMAGE_CHUNK_BYTES = 1 << 20, 1 << 15
STREAMED_CHUNK_BYTES = 1 << 22  # rows of a streamed file per chunk, embedded images included
PLAIN_PROGRESS_SECONDS = 30.0
# Rows whose image cannot be read at all (not those a size rule drops): above --max-bad-fraction of
# the rows, usually a wrong image root, so the run stops once it has read this many rows.
UNUSABLE_IMAGE = (IMAGE_NOT_FOUND, BAD_BASE64, UNREADABLE, TRUNCATED)
ROWS_BEFORE_BAD_FRACTION_STOP = 200
EXAMPLES_PER_REASON = 3
_NOTHING_KEPT = {"digests": [], "minhash": None, "keep": []}  # an output a chunk added nothing to


@dataclass
class PreprocessConfig:
    """What tools/preprocess_data.py's flags set."""

    inputs: list[str]
    output_prefix: str
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    vocab_file: str = DEFAULT_VOCAB_FILE
    append_eod: bool = False
    split_sentences: bool = False
    workers: int = 1
    partitions: int = 1
    log_interval: int = 1000
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    exact_dedup: bool = True
    near_dedup: bool = True
    image_dedup_distance: int | None = None  # image-text pairs: near duplicates by dHash within it
    dedup_images_any_caption: bool = False  # image-text pairs: a duplicate image drops the pair whatever its caption
    image_key: str | None = None  # set: the input holds image-text pairs
    image_size: int = 224
    jpeg_quality: int = JPEG_QUALITY
    min_image_size: int = MIN_IMAGE_SIZE
    max_aspect_ratio: float = MAX_ASPECT_RATIO
    max_bad_fraction: float = 0.1  # of the rows, with an image that cannot be read
    chunk_bytes: int | None = None  # default: 1 MiB for text, 32 KiB for image-text pairs
    progress: bool = True
    task: str | None = None  # set: rows of a fine-tuning task (data/downstream.py), one output
    resume: bool = False  # continue an interrupted run from its journal (data/journal.py)
    num_shards: int = 1  # > 1: build shard `shard_index` of the input only (data/shards.py)
    shard_index: int = 0

    @property
    def with_images(self) -> bool:
        return bool(self.image_key) or self.task in IMAGE_FINETUNE_TASKS

    def output_names(self) -> dict[str, str]:
        """JSON key (or the task) -> output prefix (a shard's, when sharded)."""
        suffix = shard_suffix(self.shard_index, self.num_shards)
        if self.task:
            return {self.task: f"{self.output_prefix}_{self.task}{suffix}"}
        if self.image_key:
            return {self.json_keys[0]: f"{self.output_prefix}_{self.json_keys[0]}_image{suffix}"}
        level = "sentence" if self.split_sentences else "document"
        return {k: f"{self.output_prefix}_{k}_{level}{suffix}" for k in self.json_keys}

    @property
    def manifest_path(self) -> str:
        return f"{self.output_prefix}{shard_suffix(self.shard_index, self.num_shards)}.manifest.json"

    @property
    def dedup(self) -> tuple[bool, bool, int | None]:
        """(exact, near, Hamming distance for image hashes or None for text MinHash) of this run's
        deduplication: text and image-text pairs; fine-tuning rows are never deduplicated."""
        if self.task:
            return False, False, None
        if self.image_key:
            near = self.near_dedup and self.image_dedup_distance is not None
            return self.exact_dedup, near, self.image_dedup_distance
        return self.exact_dedup, self.near_dedup, None

    @property
    def global_dedup(self) -> bool:
        """A shard defers deduplication across shards to the merge (data/global_dedup.py)."""
        return self.num_shards > 1 and any(self.dedup[:2])

    @property
    def journal_path(self) -> str:
        return f"{self.output_prefix}{shard_suffix(self.shard_index, self.num_shards)}.journal"


@dataclass
class Stats:
    """Counts for the progress bar and the final report."""

    files: int = 0
    bytes: int = 0
    lines: int = 0
    images: int = 0
    seconds: float = 0.0
    documents: Counter = field(default_factory=Counter)  # output -> documents kept
    items: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: list = field(default_factory=list)  # (reason, file, line, detail)
    already_built: bool = False  # a shard its manifest showed complete: nothing was done

    COUNTS = ("files", "bytes", "lines", "images", "seconds")
    COUNTERS = ("documents", "items", "tokens", "skipped")

    def to_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self.COUNTS}, **{k: dict(getattr(self, k)) for k in self.COUNTERS}}

    @classmethod
    def from_dict(cls, d: dict) -> Stats:
        return cls(**{k: d[k] for k in cls.COUNTS}, **{k: Counter(d[k]) for k in cls.COUNTERS})

    def add(self, other: Stats) -> None:
        for name in ("files", "bytes", "lines", "images"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.seconds = max(self.seconds, other.seconds)
        for name in self.COUNTERS:
            getattr(self, name).update(getattr(other, name))
        self.examples += other.examples


@dataclass
class Chunk:
    """A byte range of a jsonl file, which the worker reads; or, for the streamed formats
    (data/corpus_formats.py), the rows the parent read (`rows`), or a whole streamed file before
    it is read (`streamed`), or the note that it could not be read on (`corrupt`)."""

    path: str
    start: int
    end: int
    streamed: bool = False
    rows: list | None = None
    corrupt: str = ""


@dataclass
class Output:
    """What a worker made of one chunk for one output: kept documents, not yet deduplicated."""

    tokens: np.ndarray  # every item's tokens, concatenated
    item_lengths: np.ndarray  # per item
    doc_items: np.ndarray  # items per document
    lines: list[int]  # line within the chunk, per document
    digests: list[bytes] = field(default_factory=list)
    minhash: tuple[np.ndarray, np.ndarray] | None = None  # LSH keys and signatures
    images: list[bytes] = field(default_factory=list)


@dataclass
class ChunkResult:
    path: str
    num_lines: int
    num_bytes: int
    outputs: dict[str, Output]
    skipped: Counter
    examples: list  # (reason, line within the chunk, detail)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files named by --input: files, globs, or folders (their files of the formats in
    data/corpus_formats.py, recursively)."""
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(root, f) for root, _, names in os.walk(item)
                           for f in names if f.endswith(INPUT_SUFFIXES))
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"--input {item} matches no file")
        files += found
    return files


def make_chunks(files: list[str], chunk_bytes: int) -> list[Chunk]:
    """Byte ranges of about chunk_bytes (a line belongs to the range its first byte is in), and
    one chunk per streamed file, cut into rows as it is read (`read_chunks`)."""
    return [Chunk(path, start, min(start + chunk_bytes, size)) if not is_streamed(path)
            else Chunk(path, 0, size, streamed=True)
            for path in files for size in [os.path.getsize(path)]
            for start in (range(0, size, chunk_bytes) if not is_streamed(path) else [0])]


class ReadAhead:
    """Bounds the chunks read ahead of the writer: the reader takes a slot per chunk, the writer
    gives one back per result; `close` lets a reader blocked on a full window go (a run that
    stops early), which must happen before the pool joins the thread that reads."""

    def __init__(self, limit: int):
        self._slots, self._closed = threading.Semaphore(limit), threading.Event()

    def take(self) -> bool:
        while not self._slots.acquire(timeout=0.1):
            if self._closed.is_set():
                return False
        return True

    def give(self) -> None:
        self._slots.release()

    def close(self) -> None:
        self._closed.set()


def read_chunks(chunks: list[Chunk], cfg: PreprocessConfig, window: ReadAhead, skip: int = 0) -> Iterator[Chunk]:
    """The work of `chunks` in order, streamed files read here into chunks of rows, at most the
    window's size ahead of the writer; the first `skip` (done before a resume) are left out."""
    limit = cfg.chunk_bytes or STREAMED_CHUNK_BYTES
    for chunk in chunks:
        if skip and not chunk.streamed:
            skip -= 1
            continue
        for part in [chunk] if not chunk.streamed else _stream(chunk.path, limit, cfg):
            if skip:
                skip -= 1
                continue
            if not window.take():
                return
            yield part


def _stream(path: str, limit: int, cfg: PreprocessConfig) -> Iterator[Chunk]:
    start = 0
    try:
        for rows, position in stream_chunks(path, limit, cfg.json_keys[0], cfg.image_key or "image", _columns(cfg)):
            yield Chunk(path, start, position, rows=rows)
            start = position
    except CorruptFile as e:
        yield Chunk(path, start, os.path.getsize(path), rows=[], corrupt=str(e))


def _columns(cfg: PreprocessConfig) -> list[str]:
    """The fields a row needs, for the parquet reader."""
    if cfg.task:
        return list(REQUIRED_FIELDS[cfg.task]) + (["caption", "text"] if cfg.task == "caption" else [])
    return cfg.json_keys + ([cfg.image_key] if cfg.image_key else [])


def check_streamed_inputs(files: list[str], cfg: PreprocessConfig) -> None:
    """Fail before any work: a reader library that is missing, a parquet file without the columns."""
    if any(f.endswith(".zst") for f in files):
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise ValueError("reading .zst files needs the zstandard package (pip install zstandard)") from None
    parquet = [f for f in files if f.endswith(".parquet")]
    if parquet:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("reading parquet files needs pyarrow (pip install pyarrow)") from None
        for path in parquet:
            have = set(pq.ParquetFile(path).schema_arrow.names)
            if not have & set(_columns(cfg)):
                raise ValueError(f"{path} has none of the columns {', '.join(_columns(cfg))} "
                                 f"(it has {', '.join(sorted(have))}); name them with --json-keys/--image-key")


def read_lines(chunk: Chunk) -> list:
    """The lines that start inside the chunk (the last one may end after it), or its rows."""
    if chunk.rows is not None:
        return chunk.rows
    with open(chunk.path, "rb") as f:
        skip_partial = False
        if chunk.start:
            f.seek(chunk.start - 1)
            skip_partial = f.read(1) != b"\n"
        data = f.read(chunk.end - chunk.start)
        if data and not data.endswith(b"\n"):
            data += f.readline()
    if skip_partial:  # that line began in the previous chunk
        data = data[data.find(b"\n") + 1:] if b"\n" in data else b""
    if chunk.start == 0 and data.startswith(UTF8_BOM):  # what some editors write first; elsewhere bad_json
        data = data[len(UTF8_BOM):]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


# -- workers ------------------------------------------------------------------------------------
@dataclass
class WorkerState:
    """What each pool process builds once (`_init_worker`) and reads for every chunk."""

    cfg: PreprocessConfig
    tok: M6Tokenizer
    text_cleaner: Cleaner
    caption_cleaner: Cleaner  # the text rules, but a caption may be short and not Chinese


_worker: WorkerState | None = None  # this pool process's state


def _init_worker(cfg: PreprocessConfig) -> None:
    """Per worker: one tokenizer thread (workers are the parallelism) and the cleaners."""
    global _worker
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    caption_rules = replace(cfg.cleaning, min_chars=1, min_chinese_ratio=0.0)
    _worker = WorkerState(cfg, M6Tokenizer.from_vocab_file(cfg.vocab_file), Cleaner(cfg.cleaning),
                          Cleaner(caption_rules))


class SkipRecorder:
    """What a chunk processor skipped: a count per reason and the first few (reason, line within
    the chunk, detail) of each, for the log."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: list[tuple[str, int, str]] = []

    def __call__(self, reason: str, line: int, detail: str) -> None:
        self.counts[reason] += 1
        if self.counts[reason] <= EXAMPLES_PER_REASON:
            self.examples.append((reason, line, detail))


def _blank(raw) -> bool:
    return isinstance(raw, bytes) and not raw.strip()


def _parse(raw: bytes | dict) -> tuple[dict | None, str | None, str]:
    """(object, None, "") or (None, reason, detail) for one line, or one row of a parquet file or
    a tar (whose KEY.json is parsed here and its fields win)."""
    if isinstance(raw, dict):
        if JSON_MEMBER not in raw:
            return raw, None, ""
        row = {k: v for k, v in raw.items() if k != JSON_MEMBER}
        fields, reason, detail = _parse(raw[JSON_MEMBER])
        return (None, reason, detail) if fields is None else ({**row, **fields}, None, "")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, INVALID_UTF8, f"byte {e.start}"
    try:
        obj = json.loads(line)
    except ValueError as e:
        return None, BAD_JSON, str(e)[:80]
    if not isinstance(obj, dict):
        return None, BAD_JSON, f"a JSON {type(obj).__name__}, not an object"
    return obj, None, ""


def _tokenize(sentences: list[str], doc_sizes: list[int],
              append_eod: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tokens of every sentence; returns (tokens, item lengths, items per doc, docs kept mask).
    Empty sentences are dropped, and documents left without tokens are not kept."""
    tok = _worker.tok
    ids = tok.encode_batch(sentences)
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    doc_of = np.repeat(np.arange(len(doc_sizes)), doc_sizes)
    nonempty = lengths > 0
    doc_items = np.bincount(doc_of[nonempty], minlength=len(doc_sizes))
    keep_doc = doc_items > 0
    if append_eod and keep_doc.any():
        last = np.cumsum(doc_items)[keep_doc] - 1  # index among the non-empty items
        kept_ids = [x for x, ok in zip(ids, nonempty) if ok]
        for i in last.tolist():
            kept_ids[i] = np.append(kept_ids[i], np.int32(tok.eos_id))
        ids = kept_ids
    else:
        ids = [x for x, ok in zip(ids, nonempty) if ok]
    tokens = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    return tokens, np.array([len(x) for x in ids], np.int32), doc_items[keep_doc], keep_doc


def process_text_chunk(chunk: Chunk) -> ChunkResult:
    cfg, cleaner = _worker.cfg, _worker.text_cleaner
    lines = read_lines(chunk)
    skip = SkipRecorder()
    docs: dict[str, list] = {k: [] for k in cfg.json_keys}  # (line, text)
    for n, raw in enumerate(lines):
        if _blank(raw):
            continue
        obj, reason, detail = _parse(raw)
        if obj is None:
            skip(reason, n, detail)
            continue
        for key in cfg.json_keys:
            value = obj.get(key)
            if not isinstance(value, str):
                skip(MISSING_KEY, n, f"no string {key!r}")
                continue
            text, reason = cleaner.clean(value)
            if text is None:
                skip(reason, n, f"{key!r}: {value[:40]!r}")
            else:
                docs[key].append((n, text))
    outputs = {}
    for key, kept in docs.items():
        texts = [t for _, t in kept]
        parts = [split_sentences(t) for t in texts] if cfg.split_sentences else [[t] for t in texts]
        tokens, item_lengths, doc_items, keep = _tokenize(
            [s for p in parts for s in p], [len(p) for p in parts], cfg.append_eod)
        for (n, t), ok in zip(kept, keep):
            if not ok:
                skip(EMPTY_TEXT, n, repr(t[:40]))
        texts = [t for t, ok in zip(texts, keep) if ok]
        outputs[key] = Output(tokens, item_lengths, doc_items,
                              [n for (n, _), ok in zip(kept, keep) if ok],
                              [digest(t) for t in texts],
                              minhash(texts) if cfg.near_dedup else None)
    return ChunkResult(chunk.path, len(lines), chunk.end - chunk.start, outputs, skip.counts,
                       skip.examples)


def _image_value(value) -> bool:
    """Whether a row's image field holds an image: a path, data: URI or base64 (str), the bytes
    (a tar, a parquet binary column) or a Hugging Face Image struct {bytes, path}."""
    return isinstance(value, (str, bytes)) or (isinstance(value, dict) and ("bytes" in value or "path" in value))


def _jpeg(value, base_dir: str) -> tuple[bytes | None, str | None, str]:
    """(the normalised JPEG, None, "") of a row's image field, or (None, reason, detail)."""
    cfg = _worker.cfg
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path") or ""
    where = value[:60] if isinstance(value, str) else f"{len(value)} bytes"
    data, reason = (value, None) if isinstance(value, bytes) else load_image_bytes(value, base_dir)
    if data is not None:
        data, reason = prepare_image(data, cfg.image_size, cfg.jpeg_quality, cfg.min_image_size, cfg.max_aspect_ratio)
    return (data, None, "") if data is not None else (None, reason, where)


def _image_pair(obj: dict, base_dir: str) -> tuple[tuple[str, bytes] | None, str | None, str]:
    """((cleaned caption, JPEG), None, "") for one parsed line, or (None, reason, detail)."""
    cfg = _worker.cfg
    key = cfg.json_keys[0]
    caption, image = obj.get(key), obj.get(cfg.image_key)
    if not isinstance(caption, str) or not _image_value(image):
        return None, MISSING_KEY, f"needs string {key!r} and an image {cfg.image_key!r}"
    cleaned, reason = _worker.caption_cleaner.clean(caption)
    if cleaned is None:
        return None, reason, repr(caption[:40])
    jpeg, reason, detail = _jpeg(image, base_dir)
    if jpeg is None:
        return None, reason, detail
    return (cleaned, jpeg), None, ""


def process_image_chunk(chunk: Chunk) -> ChunkResult:
    cfg = _worker.cfg
    base_dir = os.path.dirname(os.path.abspath(chunk.path))
    lines = read_lines(chunk)
    skip = SkipRecorder()
    captions, images, line_of = [], [], []
    for n, raw in enumerate(lines):
        if _blank(raw):
            continue
        obj, reason, detail = _parse(raw)
        pair = None
        if obj is not None:
            pair, reason, detail = _image_pair(obj, base_dir)
        if pair is None:
            skip(reason, n, detail)
            continue
        captions.append(pair[0])
        images.append(pair[1])
        line_of.append(n)
    tokens, lengths, doc_items, keep = _tokenize(captions, [1] * len(captions), cfg.append_eod)
    for n, caption, ok in zip(line_of, captions, keep):
        if not ok:
            skip(EMPTY_TEXT, n, repr(caption[:40]))
    images = [im for im, ok in zip(images, keep) if ok]
    exact, near, _ = cfg.dedup
    digests, hashes = image_keys(images, [c for c, ok in zip(captions, keep) if ok],
                                 cfg.image_dedup_distance if near else None, cfg.dedup_images_any_caption) \
        if exact or near else ([], None)
    out = Output(tokens, lengths, doc_items, [n for n, ok in zip(line_of, keep) if ok], digests, hashes, images)
    return ChunkResult(chunk.path, len(lines), chunk.end - chunk.start, {cfg.json_keys[0]: out},
                       skip.counts, skip.examples)


def _downstream_row(obj: dict, where: str, base_dir: str) -> tuple[tuple | None, str | None, str]:
    """((source, target, JPEG or None), None, "") for one parsed row of cfg.task, or (None, reason,
    detail). The texts are kept as written, as fine-tuning from jsonl reads them: no cleaning, no
    deduplication (a VQA set asks the same question of many images)."""
    cfg = _worker.cfg
    try:
        example = row_example(cfg.task, obj, where)
    except DownstreamDataError as e:
        return None, MISSING_KEY, str(e).partition(": ")[2][:80]
    if example.label == 0:
        return None, ITM_DISTRACTOR, repr(example.target[:40])
    if not example.target.strip():
        return None, EMPTY_TEXT, "empty target"
    if cfg.task not in IMAGE_FINETUNE_TASKS:
        return (example.source, example.target, None), None, ""
    if not _image_value(obj["image"]):
        return None, MISSING_KEY, "no image in 'image'"
    data, reason, detail = _jpeg(obj["image"], base_dir)
    if data is None:
        return None, reason, detail
    return (example.source, example.target, data), None, ""


def process_downstream_chunk(chunk: Chunk) -> ChunkResult:
    """Rows of a fine-tuning task -> documents of [source, target] items (then the image)."""
    cfg = _worker.cfg
    base_dir = os.path.dirname(os.path.abspath(chunk.path))
    lines = read_lines(chunk)
    skip = SkipRecorder()
    rows, line_of = [], []
    for n, raw in enumerate(lines):
        if _blank(raw):
            continue
        obj, reason, detail = _parse(raw)
        row = None
        if obj is not None:
            row, reason, detail = _downstream_row(obj, f"line {n}", base_dir)
        if row is None:
            skip(reason, n, detail)
            continue
        rows.append(row)
        line_of.append(n)
    ids = _worker.tok.encode_batch([r[0] for r in rows] + [r[1] for r in rows])
    items = [x for pair in zip(ids[:len(rows)], ids[len(rows):]) for x in pair]  # source, target, ...
    tokens = np.concatenate(items).astype(np.int32) if items else np.zeros(0, np.int32)
    out = Output(tokens, np.array([len(x) for x in items], np.int32), np.full(len(rows), 2, np.int64), line_of,
                 images=[r[2] for r in rows if r[2] is not None])
    return ChunkResult(chunk.path, len(lines), chunk.end - chunk.start, {cfg.task: out}, skip.counts,
                       skip.examples)


def process_chunk(chunk: Chunk) -> ChunkResult:
    """A worker's job: one chunk, by the kind of output (a streamed file that could not be read
    on is one counted skip)."""
    if chunk.corrupt:
        return ChunkResult(chunk.path, 0, chunk.end - chunk.start, {}, Counter({CORRUPT_FILE: 1}),
                           [(CORRUPT_FILE, 0, chunk.corrupt)])
    cfg = _worker.cfg
    work = process_downstream_chunk if cfg.task else process_image_chunk if cfg.image_key else process_text_chunk
    return work(chunk)


# -- the writer process -------------------------------------------------------------------------
def _write(writer: IndexedDatasetWriter, out: Output, keep: np.ndarray) -> None:
    """Append the kept documents of a chunk: one bulk write for text, item by item with images,
    each document's text items then its image (by the writer's kind: a chunk of image-text pairs
    may have kept no image at all)."""
    if writer.multimodal:
        offsets = np.concatenate([[0], np.cumsum(out.item_lengths)])
        first_item = np.concatenate([[0], np.cumsum(out.doc_items)])
        for i in np.flatnonzero(keep).tolist():
            for j in range(first_item[i], first_item[i + 1]):
                writer.add_item(out.tokens[offsets[j]:offsets[j + 1]])
            writer.add_image(out.images[i])
            writer.end_document()
        return
    item_keep = np.repeat(keep, out.doc_items)
    token_keep = np.repeat(item_keep, out.item_lengths)
    writer.add_documents(out.tokens[token_keep], out.item_lengths[item_keep],
                         out.doc_items[keep])


def _not_duplicates(dedup: Deduplicator, out: Output, stats: Stats) -> np.ndarray:
    """Which documents of a chunk's output are new (the deduplicator then remembers them); the
    duplicates are counted as skipped, by reason."""
    keep = np.ones(len(out.doc_items), dtype=bool)
    for j, reason in enumerate(_check_all(dedup, out.digests, out.minhash)):
        if reason:
            keep[j] = False
            stats.skipped[reason] += 1
    return keep


def _check_all(dedup: Deduplicator, digests: list[bytes], minhash) -> list[str | None]:
    """The deduplicator's verdict on each document, in order."""
    no_bands = np.zeros(1, np.uint64)  # without MinHash keys only exact duplicates are found
    return [dedup.check(d, no_bands) if minhash is None else dedup.check(d, minhash[0][j], minhash[1][j])
            for j, d in enumerate(digests)]


def _count_kept(stats: Stats, name: str, out: Output, keep: np.ndarray) -> None:
    stats.documents[name] += int(keep.sum())
    stats.items[name] += int(out.doc_items[keep].sum())
    stats.tokens[name] += int(np.repeat(keep, out.doc_items) @ out.item_lengths)
    if out.images:
        stats.images += int(keep.sum())


def _check_bad_images(stats: Stats, cfg: PreprocessConfig) -> None:
    """Stop (the outputs are dropped) when more than max_bad_fraction of the rows read so far have
    an image that cannot be read: hours later the answer would be the same."""
    bad = {reason: stats.skipped[reason] for reason in UNUSABLE_IMAGE if stats.skipped[reason]}
    if sum(bad.values()) <= cfg.max_bad_fraction * stats.lines:
        return
    first = next(e for e in stats.examples if e[0] in bad)
    raise ValueError(f"{sum(bad.values())} of the first {stats.lines} rows have no usable image "
                     f"({', '.join(f'{n} {r}' for r, n in bad.items())}), more than --max-bad-fraction "
                     f"{cfg.max_bad_fraction}; is the image root right? Paths are relative to the jsonl's folder "
                     f"(first: {first[3]!r} in {first[1]}:{first[2]}, {first[0]})")


def _count_skipped(stats: Stats, res: ChunkResult, first_line: int, logged: Counter, log) -> None:
    """Add a chunk's skips to stats, and log its examples by file and line (1-based: the chunk's
    first line is `first_line`) while a reason has fewer than EXAMPLES_PER_REASON logged."""
    for reason, n, detail in res.examples:
        if logged[reason] < EXAMPLES_PER_REASON:
            logged[reason] += 1
            stats.examples.append((reason, res.path, first_line + n, detail))
            log(f"skipped ({reason}) {res.path}:{first_line + n}: {detail}")
    stats.skipped.update(res.skipped)


class _ProgressBar:
    """Bytes read so far, with documents, megabytes and images per second refreshed every
    `log_interval` documents: a tqdm bar on a terminal. In a log file (stderr not a terminal),
    where a bar's carriage returns run into the lines around it, one plain line every
    PLAIN_PROGRESS_SECONDS instead. `write` prints a line without breaking either."""

    def __init__(self, total_bytes: int, desc: str, position: int, log_interval: int, enabled: bool,
                 start: float):
        from tqdm import tqdm

        self.plain = enabled and not sys.stderr.isatty()
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, position=position,
                        disable=not enabled or self.plain, file=sys.stderr, mininterval=1.0)
        self.desc, self.total, self.done, self.last_line = desc, total_bytes, 0, start
        self.log_interval, self.start, self.last_docs = log_interval, start, 0

    def _rates(self, stats: Stats) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return (f"{sum(stats.documents.values()) / elapsed:.0f} docs/s, {stats.bytes / elapsed / 1e6:.1f} MB/s, "
                f"{stats.images / elapsed:.0f} images/s")

    def _plain_line(self, stats: Stats) -> None:
        self.last_line = time.perf_counter()
        self.write(f"{self.desc}: {self.done / 1e6:.1f} of {self.total / 1e6:.1f} MB "
                   f"({100 * self.done / max(self.total, 1):.0f}%), {self._rates(stats)}")

    def update(self, num_bytes: int, stats: Stats) -> None:
        self.done += num_bytes
        if self.plain:
            if time.perf_counter() - self.last_line >= PLAIN_PROGRESS_SECONDS:
                self._plain_line(stats)
            return
        self.bar.update(num_bytes)
        docs = sum(stats.documents.values())
        if docs - self.last_docs >= self.log_interval:
            self.last_docs = docs
            self.bar.set_postfix_str(self._rates(stats), refresh=False)

    def write(self, line: str) -> None:
        if self.plain or self.bar.disable:
            print(line, file=sys.stderr, flush=True)
        else:
            self.bar.write(line, file=sys.stderr)

    def close(self, stats: Stats) -> None:
        if self.plain:
            self._plain_line(stats)
        self.bar.close()


def _dedup_keys(out: Output, keep: np.ndarray) -> dict:
    """The deduplication keys of a chunk's documents and whether each was kept: a resume feeds
    them to the deduplicator again, which must come to the same decisions."""
    return {"digests": out.digests, "minhash": out.minhash, "keep": keep}


def _replay(dedup: Deduplicator, keys: dict) -> None:
    reasons = _check_all(dedup, keys["digests"], keys["minhash"])
    assert [r is None for r in reasons] == [bool(k) for k in keys["keep"]], \
        "the journal disagrees with its own deduplication"


def _open_journal(cfg: PreprocessConfig, chunks: list[Chunk], names: dict[str, str], log) -> Journal:
    """The run's journal, continued with --resume when the temporary outputs still hold what
    it records (a kill between renaming the outputs and removing the journal leaves it without
    them: then the run starts over)."""
    header = {"settings_sha256": settings_digest(cfg, M6Tokenizer.from_vocab_file(cfg.vocab_file).digest),
              "inputs": describe_inputs(chunks), "outputs": sorted(names.values())}
    journal = Journal(cfg.journal_path, header, cfg.resume)
    if not cfg.resume and os.path.exists(tmp_bin_path(next(iter(names.values())))):
        log("note: the temporary outputs of an interrupted run are dropped; --resume would continue it")
    if journal.done:
        last = journal.done[-1]["outputs"]
        sizes = [(tmp_bin_path(name), last[key]["writer"]["bin_bytes"]) for key, name in names.items()]
        if cfg.global_dedup:
            sizes += [(keys_path(name) + ".tmp", last[key]["keys_bytes"]) for key, name in names.items()]
        if not all(os.path.exists(path) and os.path.getsize(path) >= size for path, size in sizes):
            log(f"note: {cfg.journal_path} has no temporary outputs to continue: starting from the first chunk")
            journal = Journal(cfg.journal_path, header, resume=False)
    return journal


def _run_partition(cfg: PreprocessConfig, chunks: list[Chunk], suffix: str, position: int) -> Stats:
    """Process chunks with a pool of cfg.workers and write the outputs named with suffix:
    chunks come back in input order, are deduplicated against everything kept before, written,
    and counted. An unpartitioned run journals each chunk (data/journal.py), so --resume can
    continue it after a kill."""
    stats = Stats()
    names = cfg.output_names()
    # A shard drops only its own exact duplicates and writes every kept document's keys for the
    # merge's global deduplication (data/global_dedup.py), which applies the rest of the rule.
    exact, near, hamming = cfg.dedup
    global_keys = cfg.global_dedup
    dedup = {k: Deduplicator(exact, near and not global_keys, hamming) for k in names}
    lines_before: Counter = Counter()  # per input file: lines in its chunks so far
    logged: Counter = Counter()  # per reason: examples logged so far
    start = time.perf_counter()
    bar = _ProgressBar(sum(c.end - c.start for c in chunks), f"part {position}" if suffix else "preprocess",
                       position, cfg.log_interval, cfg.progress, start)
    dtype = (MULTIMODAL_DTYPE if cfg.with_images
             else token_dtype(M6Tokenizer.from_vocab_file(cfg.vocab_file).vocab_size))
    journal = _open_journal(cfg, chunks, names, bar.write) if not suffix else None
    done = journal.done if journal else []
    for record in done:
        lines_before[record["path"]] = record["lines_before"]
        for key, kept in record["outputs"].items():
            _replay(dedup[key], kept)
    if done:
        stats = Stats.from_dict(done[-1]["stats"])
        stats.examples = done[-1]["examples"]
        logged.update(e[0] for e in stats.examples)
        bar.write(f"resuming after {len(done)} chunks ({stats.bytes / 1e6:.1f} MB) from {cfg.journal_path}")
        bar.update(stats.bytes, stats)
    with ExitStack() as stack:
        if journal:
            stack.callback(journal.remove)  # after the writers: finished or failed, nothing to resume
        writers = {k: stack.enter_context(IndexedDatasetWriter(
            name + suffix, dtype, cfg.with_images, [r["outputs"][k]["writer"] for r in done]))
            for k, name in names.items()}
        resumed_keys = {k: done[-1]["outputs"][k]["keys_bytes"] if done else None for k in names}
        keys = {k: stack.enter_context(KeysWriter(name + suffix, resumed_keys[k]))
                for k, name in names.items()} if global_keys else {}
        pool = stack.enter_context(Pool(cfg.workers, _init_worker, (cfg,)))
        window = ReadAhead(4 * cfg.workers)
        stack.callback(window.close)  # runs before the pool's exit
        last_sync = time.perf_counter()
        for res in pool.imap(process_chunk, read_chunks(chunks, cfg, window, len(done))):
            window.give()
            _count_skipped(stats, res, lines_before[res.path] + 1, logged, bar.write)
            lines_before[res.path] += res.num_lines
            stats.lines += res.num_lines
            stats.bytes += res.num_bytes
            kept = {}
            for key, out in res.outputs.items():
                keep = _not_duplicates(dedup[key], out, stats)
                _write(writers[key], out, keep)
                _count_kept(stats, names[key], out, keep)
                kept[key] = _dedup_keys(out, keep)
                if global_keys:
                    keys[key].add(out.digests, out.minhash, keep)
            if journal:
                durable = time.perf_counter() - last_sync >= SYNC_SECONDS
                last_sync = time.perf_counter() if durable else last_sync
                journal.append({"path": res.path, "lines_before": lines_before[res.path], "stats": stats.to_dict(),
                                "examples": list(stats.examples),
                                "outputs": {k: {"writer": writers[k].sync(durable), **kept.get(k, _NOTHING_KEPT),
                                                "keys_bytes": keys[k].sync(durable) if global_keys else None}
                                            for k in names}}, durable)
            bar.update(res.num_bytes, stats)
            if cfg.with_images and stats.lines >= ROWS_BEFORE_BAD_FRACTION_STOP:
                _check_bad_images(stats, cfg)
        if cfg.with_images:
            _check_bad_images(stats, cfg)
        pool.close()
        pool.join()
    bar.close(stats)
    stats.seconds = time.perf_counter() - start
    return stats


def _partition_entry(args: tuple) -> Stats:
    cfg, chunks, suffix, position = args
    return _run_partition(cfg, chunks, suffix, position)


def preprocess(cfg: PreprocessConfig) -> Stats:
    """Build the output datasets of cfg; returns the counts for the report."""
    if cfg.workers < 1 or cfg.partitions < 1:
        raise ValueError("--workers and --partitions must be at least 1")
    if not 1 <= cfg.jpeg_quality <= 100 or cfg.image_size < 8:
        raise ValueError("need 1 <= --jpeg-quality <= 100 and --image-size >= 8")
    if cfg.image_key and len(cfg.json_keys) != 1:
        raise ValueError("with --image-key, --json-keys names one field: the caption")
    if cfg.image_dedup_distance is not None and not (cfg.image_key and 0 <= cfg.image_dedup_distance <= BANDS - 1):
        raise ValueError(f"--dedup-image-distance is for image-text pairs (--image-key), 0-{BANDS - 1} bits of "
                         f"their 64-bit image hashes, got {cfg.image_dedup_distance}")
    if not 0 <= cfg.max_bad_fraction <= 1:
        raise ValueError(f"--max-bad-fraction must be in [0, 1], got {cfg.max_bad_fraction}")
    if cfg.task and cfg.task not in REQUIRED_FIELDS:
        raise ValueError(f"unknown --task {cfg.task!r}; tasks are {', '.join(REQUIRED_FIELDS)}")
    if cfg.chunk_bytes is not None and cfg.chunk_bytes < 1:
        raise ValueError(f"--chunk-bytes must be at least 1, got {cfg.chunk_bytes}")
    if cfg.resume and cfg.partitions > 1:
        raise ValueError("--resume continues one writer's journal: it needs --partitions 1 (for a cluster, "
                         "--num-shards runs resume shard by shard)")
    if not 0 <= cfg.shard_index < cfg.num_shards:
        raise ValueError(f"--shard-index must be in [0, --num-shards {cfg.num_shards}), got {cfg.shard_index}")
    vocab = M6Tokenizer.from_vocab_file(cfg.vocab_file)  # fail now, not in every worker
    files = expand_inputs(cfg.inputs)
    check_streamed_inputs(files, cfg)
    empty = [f for f in files if os.path.getsize(f) == 0] if cfg.shard_index == 0 else []
    chunk_bytes = cfg.chunk_bytes or (IMAGE_CHUNK_BYTES if cfg.with_images else TEXT_CHUNK_BYTES)
    chunks = shard_of(make_chunks(files, chunk_bytes), cfg.shard_index, cfg.num_shards)
    names = list(cfg.output_names().values())
    sharded, digest = cfg.num_shards > 1, settings_digest(cfg, vocab.digest)
    built = completed(cfg.manifest_path, digest, chunks, names) if sharded else None
    if built is not None:
        stats = Stats.from_dict(built)
        stats.already_built = True
        return stats
    if sharded:
        remove_manifest(cfg.manifest_path)
    start = time.perf_counter()
    if cfg.partitions == 1:
        stats = _run_partition(cfg, chunks, "", 0)
    else:
        parts = [chunks[len(chunks) * k // cfg.partitions:len(chunks) * (k + 1) // cfg.partitions]
                 for k in range(cfg.partitions)]
        sub = replace(cfg, workers=max(1, cfg.workers // cfg.partitions))
        jobs = [(sub, part, f"_part{k}", k) for k, part in enumerate(parts)]
        stats = Stats()
        try:
            with ProcessPoolExecutor(cfg.partitions) as ex:
                for part_stats in ex.map(_partition_entry, jobs):
                    stats.add(part_stats)
            for name in cfg.output_names().values():
                merge_datasets([name + f"_part{k}" for k in range(cfg.partitions)], name)
                if cfg.global_dedup:
                    concatenate_keys([name + f"_part{k}" for k in range(cfg.partitions)], name)
        finally:
            for name in cfg.output_names().values():
                for k in range(cfg.partitions):
                    for ext in (".bin", ".idx", ".keys"):
                        if os.path.exists(f"{name}_part{k}{ext}"):
                            os.remove(f"{name}_part{k}{ext}")
    stats.files = len({c.path for c in chunks}) + len(empty)
    if empty:
        stats.skipped[EMPTY_FILE] += len(empty)
        for f in empty[:EXAMPLES_PER_REASON]:
            stats.examples.append((EMPTY_FILE, f, 0, "no bytes"))
            print(f"skipped ({EMPTY_FILE}) {f}", file=sys.stderr)
    stats.seconds = time.perf_counter() - start
    if sharded:
        exact, near, hamming = cfg.dedup
        dedup = {"exact": exact, "near": near, "hamming": hamming} if cfg.global_dedup else None
        write_manifest(cfg.manifest_path, digest, cfg.shard_index, cfg.num_shards, chunks, names, stats.to_dict(),
                       dedup)
    return stats


def format_report(stats: Stats) -> str:
    """The final summary: what was kept per output, what was skipped per reason, and the rates."""
    rows = [("kept", name, f"{stats.documents[name]:,} documents, {stats.items[name]:,} items, "
                           f"{stats.tokens[name]:,} tokens") for name in stats.documents]
    if stats.images:
        rows.append(("kept", "images", f"{stats.images:,}"))
    rows += [("skipped", reason, f"{count:,}") for reason, count in sorted(stats.skipped.items())]
    if not stats.skipped:
        rows.append(("skipped", "-", "0"))
    s = max(stats.seconds, 1e-9)
    docs = sum(stats.documents.values())
    rows.append(("input", f"{stats.files} files, {stats.lines:,} lines",
                 f"{stats.bytes / 1e6:.1f} MB in {stats.seconds:.1f} s: {stats.bytes / s / 1e6:.2f} "
                 f"MB/s, {docs / s:.0f} docs/s, {stats.images / s:.0f} images/s"))
    w0 = max(len(row[0]) for row in rows)
    w1 = max(len(row[1]) for row in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)
