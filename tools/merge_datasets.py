"""Merge indexed dataset shards (e.g. outputs of several preprocess_data.py runs) into one.

    python tools/merge_datasets.py --input shards/ --output-prefix data/zh_text_document
    python tools/merge_datasets.py --input data/a_text_document data/b_text_document --output-prefix data/ab
    python tools/merge_datasets.py --shards data/zh --num-shards 64   # preprocess_data.py --num-shards

--shards PREFIX merges the outputs of a sharded preprocess_data.py run (PREFIX its --output-prefix):
every shard's manifest must be there, then each output NAME is merged from its shards in shard
order into NAME. Text is deduplicated across the shards first (exact and near duplicates, the
rule of a one-process run, in --dedup-memory-gb of memory: megatron_m6/data/global_dedup.py), so
the result equals what one process writes.

--input takes folders (every PREFIX.idx/.bin pair inside, in name order) or prefixes, in order.
All shards must hold the same dtype and kind (text or multimodal). The output appears only
complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # uninstalled repo

from megatron_m6.data.global_dedup import DedupMemoryError, merge_deduplicated  # noqa: E402
from megatron_m6.data.indexed import IndexedDataset, IndexedDatasetError, dataset_exists, merge_datasets  # noqa: E402
from megatron_m6.data.shards import shard_suffix  # noqa: E402


def shard_prefixes(inputs: list[str]) -> list[str]:
    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f[:-4]) for f in os.listdir(item) if f.endswith(".idx"))
            prefixes += [p for p in found if dataset_exists(p)]
        else:
            prefixes.append(item)
    return prefixes


def merge_shards(prefix: str, num_shards: int, memory_gb: float = 4.0) -> list[tuple[str, int, dict]]:
    """Merge every output of a sharded run; returns (name, documents, duplicates dropped by reason)
    per output. Text shards are deduplicated across each other first, in about memory_gb of
    arrays (data/global_dedup.py). Refuses, naming them, when shards have no manifest (not built,
    or killed before the end)."""
    manifests = [f"{prefix}{shard_suffix(i, num_shards)}.manifest.json" for i in range(num_shards)]
    missing = [i for i, m in enumerate(manifests) if not os.path.isfile(m)]
    if missing:
        raise IndexedDatasetError(f"{len(missing)} of {num_shards} shards are not built (no manifest): "
                                  f"{', '.join(map(str, missing[:10]))}{'...' if len(missing) > 10 else ''}")
    with open(manifests[0], encoding="utf-8") as f:
        manifest = json.load(f)
    suffix = shard_suffix(0, num_shards)
    names = [name[:-len(suffix)] for name in manifest["outputs"]]
    merged = []
    for name in names:
        shards = [name + shard_suffix(i, num_shards) for i in range(num_shards)]
        if manifest.get("dedup"):
            dedup = manifest["dedup"]
            dropped = merge_deduplicated(shards, name, dedup["exact"], dedup["near"], int(memory_gb * 2**30),
                                         dedup.get("hamming"))
        else:
            merge_datasets(shards, name)
            dropped = {}
        merged.append((name, IndexedDataset(name).num_documents, dropped))
    return merged


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--input", nargs="+", help="folders of shards, or prefixes")
    p.add_argument("--output-prefix")
    p.add_argument("--shards", metavar="PREFIX", help="the --output-prefix of a sharded preprocess_data.py run")
    p.add_argument("--num-shards", type=int, help="its --num-shards")
    p.add_argument("--dedup-memory-gb", type=float, default=4.0,
                   help="with --shards: memory for deduplicating text across the shards (arrays; the key files "
                        "are read from disk); more means fewer passes over the scratch files")
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.shards:
        if not args.num_shards or args.num_shards < 2 or args.input or args.output_prefix:
            p.error("--shards PREFIX takes --num-shards N (at least 2), and no --input or --output-prefix")
        if args.dedup_memory_gb <= 0:
            p.error("--dedup-memory-gb must be positive")
        try:
            merged = merge_shards(args.shards, args.num_shards, args.dedup_memory_gb)
        except (IndexedDatasetError, DedupMemoryError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        for name, documents, dropped in merged:
            across = f"; dropped across shards: {', '.join(f'{n} {r}' for r, n in dropped.items())}" if dropped else ""
            print(f"merged {args.num_shards} shards into {name}: {documents} documents{across}")
        print(f"({time.perf_counter() - start:.1f} s)")
        return
    if not args.input or not args.output_prefix:
        p.error("give --input and --output-prefix (or --shards and --num-shards)")
    prefixes = shard_prefixes(args.input)
    try:
        merged = merge_datasets(prefixes, args.output_prefix)
    except IndexedDatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"merged {len(prefixes)} shards into {args.output_prefix}: {merged.num_documents} "
          f"documents, {len(merged)} items ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
