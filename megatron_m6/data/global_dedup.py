"""Deduplication across the shards of a sharded corpus run, in memory bounded by a flag.

A shard (`tools/preprocess_data.py --num-shards N`) drops only the exact duplicates inside it and
writes, beside each output NAME.shard-…, `NAME.shard-….keys`: one KEY_RECORD per document it
wrote (digest, MinHash band keys, signature; data/dedup.py). The merge job then applies
Deduplicator's rule to all shards as one input, in input order (shard by shard, document by
document), so the survivors do not depend on the number of shards and equal a one-process run's:

1. exact: every document after the first with its digest is an exact duplicate. Records
   (digest, id) are scattered by digest into partition files, and each partition is sorted.
2. near: among the documents left, every one whose signature agrees on at least NEAR_THRESHOLD
   of its bins with the first document of one of its band keys is a near duplicate. Records
   (band key, id) are scattered by key, each partition is sorted, and each later id is compared
   with its key's first id on the signatures, read from the key files.

The number of partitions is chosen so one partition's arrays fit in `memory_bytes` (the bytes
per record below are what the sorting needs, counted by tests/test_global_dedup.py's tracemalloc
bound); the key files are read through memory maps, never loaded whole. A single digest or band
key with more records than fit would not: the shard's own exact dedup keeps such groups to one
record per shard and key.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from megatron_m6.data.dedup import BANDS, EXACT_DUPLICATE, NEAR_DUPLICATE, NUM_BINS, signatures_match
from megatron_m6.data.indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter

KEY_RECORD = np.dtype([("digest", "V16"), ("bands", "<u8", (BANDS,)), ("sig", "<u2", (NUM_BINS,))])
KEEP, EXACT, NEAR = 0, 1, 2  # the reason codes of `drop_reasons`
_EXACT_RECORD = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("id", "<i8")])
_BAND_RECORD = np.dtype([("key", "<u8"), ("id", "<i8")])
# Bytes of memory per partition record while it is sorted and resolved (the record, the sort's
# indices, the sorted copy, the per-record flags and ids: about 96), doubled so that a partition
# larger than the average (hashing is not even) and the signature pairs fit beside it; per pair
# of signatures compared (two rows, their comparison, ids); per record of a streamed block.
_EXACT_BYTES, _BAND_BYTES, _PAIR_BYTES, _BLOCK_BYTES = 192, 192, 4 * (4 * NUM_BINS + NUM_BINS + 32), 1024
MAX_PARTITIONS = 4096  # open files while scattering


class DedupMemoryError(ValueError):
    """--dedup-memory-gb leaves too little memory per partition."""


def keys_path(prefix: str) -> str:
    return prefix + ".keys"


def key_records(digests: list[bytes], minhash: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """The KEY_RECORDs of documents; without MinHash (near dedup off) their band keys are 0."""
    records = np.zeros(len(digests), KEY_RECORD)
    if digests:
        records["digest"] = np.frombuffer(b"".join(digests), "V16")
    if minhash is not None and len(digests):
        records["bands"], records["sig"] = minhash
    return records


class KeysWriter:
    """Builds PREFIX.keys under a temporary name, like IndexedDatasetWriter its dataset: one
    KEY_RECORD per document written, renamed into place by `finalize`. With resume (a size that
    `sync` returned before a kill), the temporary file is cut back to it and continued."""

    def __init__(self, prefix: str, resume: int | None = None):
        self.path, self.tmp = keys_path(prefix), keys_path(prefix) + ".tmp"
        if resume is None:
            self._file = open(self.tmp, "wb")
        else:
            self._file = open(self.tmp, "r+b")
            self._file.truncate(resume)
            self._file.seek(resume)

    def __enter__(self) -> KeysWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)

    def add(self, digests: list[bytes], minhash: tuple[np.ndarray, np.ndarray] | None, keep: np.ndarray) -> None:
        records = key_records(digests, minhash)
        self._file.write(records[np.asarray(keep, bool)].tobytes())

    def add_file(self, path: str) -> None:
        with open(path, "rb") as f:
            shutil.copyfileobj(f, self._file, 16 << 20)

    def sync(self, durable: bool = True) -> int:
        """As IndexedDatasetWriter.sync: the size written so far, handed to the OS (and disk)."""
        self._file.flush()
        if durable:
            os.fsync(self._file.fileno())
        return self._file.tell()


def concatenate_keys(prefixes: list[str], out_prefix: str) -> None:
    """The key files of `prefixes` end to end, as out_prefix's (a run's --partitions, merged)."""
    with KeysWriter(out_prefix) as writer:
        for prefix in prefixes:
            writer.add_file(keys_path(prefix))


def _partitions(records: int, bytes_per_record: int, memory_bytes: int) -> int:
    parts = -(-records * bytes_per_record // memory_bytes)
    if parts > MAX_PARTITIONS:
        raise DedupMemoryError(f"--dedup-memory-gb {memory_bytes / 2**30:g} is too small for {records:,} key records: "
                         f"it needs at least {records * bytes_per_record / MAX_PARTITIONS / 2**30:.3g}")
    return max(1, parts)


def _scatter(blocks, num_parts: int, part_of, folder: str) -> list[str]:
    """Append each block's records to the partition file part_of(records) names."""
    paths = [os.path.join(folder, f"part{p:05d}") for p in range(num_parts)]
    files = [open(p, "wb", buffering=0) for p in paths]  # no buffer per file: the blocks are the buffers
    try:
        for records in blocks:
            parts = part_of(records)
            order = np.argsort(parts, kind="stable")
            bounds = np.searchsorted(parts[order], np.arange(num_parts + 1))
            for p in np.flatnonzero(np.diff(bounds)):
                files[p].write(records[order[bounds[p]:bounds[p + 1]]].tobytes())
    finally:
        for f in files:
            f.close()
    return paths


class _Shards:
    """The key files of all shards as one array of documents, read a block at a time."""

    def __init__(self, prefixes: list[str], memory_bytes: int):
        self.maps = [np.memmap(keys_path(p), KEY_RECORD, mode="r") if os.path.getsize(keys_path(p))
                     else np.zeros(0, KEY_RECORD) for p in prefixes]
        self.offsets = np.concatenate([[0], np.cumsum([len(m) for m in self.maps])])
        self.block = max(1, memory_bytes // _BLOCK_BYTES)

    def blocks(self, field: str):
        """(first id, the field's values) for consecutive blocks of documents."""
        for shard, m in enumerate(self.maps):
            for start in range(0, len(m), self.block):
                yield self.offsets[shard] + start, np.ascontiguousarray(m[field][start:start + self.block])

    def sigs(self, ids: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        out = np.empty((len(ids), NUM_BINS), np.uint16)
        for s in np.unique(shard):
            rows = shard == s
            out[rows] = self.maps[s]["sig"][ids[rows] - self.offsets[s]]
        return out


def _exact(shards: _Shards, reasons: np.ndarray, memory_bytes: int, folder: str) -> None:
    num_parts = _partitions(len(reasons), _EXACT_BYTES, memory_bytes)

    def blocks():
        for first, digests in shards.blocks("digest"):
            halves = digests.view("<u8").reshape(-1, 2)
            records = np.empty(len(digests), _EXACT_RECORD)
            records["hi"], records["lo"] = halves[:, 0], halves[:, 1]
            records["id"] = first + np.arange(len(digests))
            yield records

    for path in _scatter(blocks(), num_parts, lambda r: (r["hi"] % np.uint64(num_parts)).astype(np.int64), folder):
        records = np.fromfile(path, _EXACT_RECORD)
        os.remove(path)
        records = records[np.lexsort((records["id"], records["lo"], records["hi"]))]
        later = (records["hi"][1:] == records["hi"][:-1]) & (records["lo"][1:] == records["lo"][:-1])
        reasons[records["id"][1:][later]] = EXACT


def _near(shards: _Shards, reasons: np.ndarray, memory_bytes: int, folder: str, hamming: int | None) -> None:
    def blocks():
        for first, bands in shards.blocks("bands"):
            ids = first + np.arange(len(bands))
            take = (bands[:, 0] != 0) & (reasons[ids] == KEEP)
            records = np.empty((int(take.sum()), BANDS), _BAND_RECORD)
            records["key"], records["id"] = bands[take], ids[take, None]
            records = records.reshape(-1)
            yield records[records["key"] != 0]  # an image has fewer band keys than BANDS

    with_bands = sum(int((b[:, 0] != 0).sum()) for _, b in shards.blocks("bands"))
    num_parts = _partitions(with_bands * BANDS, _BAND_BYTES, memory_bytes)
    pairs_per_step = max(1, memory_bytes // _PAIR_BYTES)
    for path in _scatter(blocks(), num_parts, lambda r: (r["key"] % np.uint64(num_parts)).astype(np.int64), folder):
        records = np.fromfile(path, _BAND_RECORD)
        os.remove(path)
        if not len(records):
            continue
        records = records[np.lexsort((records["id"], records["key"]))]
        starts = np.concatenate([[True], records["key"][1:] != records["key"][:-1]])
        first = records["id"][np.flatnonzero(starts)[np.cumsum(starts) - 1]]  # each record's key's first id
        later, first = records["id"][~starts], first[~starts]
        for i in range(0, len(later), pairs_per_step):
            a, b = later[i:i + pairs_per_step], first[i:i + pairs_per_step]
            reasons[a[signatures_match(shards.sigs(a), shards.sigs(b), hamming)]] = NEAR


def drop_reasons(prefixes: list[str], exact: bool, near: bool, memory_bytes: int, folder: str,
                 hamming: int | None = None) -> np.ndarray:
    """Apply Deduplicator's rule across the key files of `prefixes` (in input order) in about
    memory_bytes of arrays: a KEEP/EXACT/NEAR code per document, all shards end to end, in a
    memory map in `folder`, which also holds the scratch partitions while they are resolved."""
    shards = _Shards(prefixes, memory_bytes)
    total = int(shards.offsets[-1])
    reasons = np.memmap(os.path.join(folder, "reasons"), np.uint8, mode="w+", shape=max(1, total))[:total]
    if exact:
        _exact(shards, reasons, memory_bytes, folder)
    if near:
        _near(shards, reasons, memory_bytes, folder, hamming)
    return reasons


def count_reasons(reasons: np.ndarray, block: int = 1 << 20) -> dict[str, int]:
    counts = np.zeros(3, np.int64)
    for start in range(0, len(reasons), block):
        counts += np.bincount(reasons[start:start + block], minlength=3)
    return {EXACT_DUPLICATE: int(counts[EXACT]), NEAR_DUPLICATE: int(counts[NEAR])}


def merge_deduplicated(prefixes: list[str], out_prefix: str, exact: bool, near: bool,
                       memory_bytes: int, hamming: int | None = None) -> dict[str, int]:
    """Merge the shards `prefixes` into out_prefix without the documents `drop_reasons` finds;
    returns the duplicates dropped, by reason."""
    folder = tempfile.mkdtemp(prefix=".dedup-", dir=os.path.dirname(os.path.abspath(out_prefix)))
    try:
        reasons = drop_reasons(prefixes, exact, near, memory_bytes, folder, hamming)
        offsets = np.concatenate([[0], np.cumsum([IndexedDataset(p).num_documents for p in prefixes])])
        if offsets[-1] != len(reasons):
            raise IndexedDatasetError(f"the shards of {out_prefix} hold {offsets[-1]} documents but their key "
                                      f"files {len(reasons)}: rebuild the shards")
        first = IndexedDataset(prefixes[0])
        with IndexedDatasetWriter(out_prefix, first.dtype, first.multimodal) as writer:
            for prefix, a, b in zip(prefixes, offsets[:-1], offsets[1:]):
                writer.add_dataset(prefix, keep=np.asarray(reasons[a:b]) == KEEP)
        return count_reasons(reasons)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
