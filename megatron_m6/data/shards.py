"""Sharded corpus building: `tools/preprocess_data.py --num-shards N --shard-index I` builds a
deterministic 1/N of the input, and a manifest says what it read and kept.

The input's chunks (byte ranges of jsonl files, whole streamed files: data/preprocess.py) are
listed in input order and shard I takes the I-th of N contiguous runs of them, so the shards'
outputs, merged in shard order, hold the documents in input order. Its datasets are
`NAME.shard-0000I-of-0000N` (zero-padded, so folder order is shard order) and its manifest
`PREFIX.shard-0000I-of-0000N.manifest.json`, written last and atomically: a shard whose manifest
matches its settings, its input files (size and modification time) and its outputs on disk is
complete, and a re-run skips it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from megatron_m6.data.global_dedup import keys_path
from megatron_m6.data.indexed import bin_path, dataset_exists, idx_path

MANIFEST_VERSION = 1
# Settings that change how a run works, not what it writes.
RUNTIME_ONLY = ("inputs", "output_prefix", "workers", "partitions", "log_interval", "progress", "resume")


def shard_suffix(shard_index: int, num_shards: int) -> str:
    return f".shard-{shard_index:05d}-of-{num_shards:05d}" if num_shards > 1 else ""


def shard_of(chunks: list, shard_index: int, num_shards: int) -> list:
    """The chunks of shard `shard_index`: the shard_index-th of num_shards contiguous runs."""
    n = len(chunks)
    return chunks[n * shard_index // num_shards:n * (shard_index + 1) // num_shards]


def settings_digest(cfg, vocab_digest: str) -> str:
    """sha256 of every setting that shapes the output, with the vocabulary's own digest."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_ONLY}
    text = json.dumps({"settings": settings, "vocab": vocab_digest}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def describe_inputs(chunks: list) -> list[dict]:
    """Each input file of the chunks with its size, modification time and byte ranges."""
    files: dict[str, dict] = {}
    for c in chunks:
        entry = files.get(c.path)
        if entry is None:
            st = os.stat(c.path)
            entry = files[c.path] = {"path": c.path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ranges": []}
        entry["ranges"].append([c.start, c.end])
    return list(files.values())


def _output_sizes(names: list[str]) -> dict[str, list[int]] | None:
    """Each output's .bin and .idx sizes, and its .keys file's (data/global_dedup.py) if any."""
    if not all(dataset_exists(n) for n in names):
        return None
    return {n: [os.path.getsize(p) for p in (bin_path(n), idx_path(n), keys_path(n)) if os.path.exists(p)]
            for n in names}


def write_manifest(path: str, digest: str, shard_index: int, num_shards: int, chunks: list,
                   names: list[str], stats: dict, dedup: dict | None = None) -> None:
    """The manifest of a finished shard, under a temporary name renamed into place; `dedup`, the
    deduplication its merge must do across shards (a shard of text), or None."""
    manifest = {"version": MANIFEST_VERSION, "shard_index": shard_index, "num_shards": num_shards,
                "settings_sha256": digest, "inputs": describe_inputs(chunks), "outputs": _output_sizes(names),
                "stats": stats, "dedup": dedup}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def completed(path: str, digest: str, chunks: list, names: list[str]) -> dict | None:
    """The stats of a manifest that says this very shard is built (same settings, the same input
    files unchanged, its outputs on disk with their sizes), else None."""
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    same = (manifest.get("version") == MANIFEST_VERSION and manifest.get("settings_sha256") == digest
            and manifest.get("inputs") == describe_inputs(chunks) and manifest.get("outputs") == _output_sizes(names))
    return manifest["stats"] if same else None


def remove_manifest(path: str) -> None:
    """Before a shard is (re)built: its old manifest must not vouch for outputs being rewritten."""
    if os.path.exists(path):
        os.remove(path)
