"""Merge indexed dataset shards (e.g. outputs of several preprocess_data.py runs) into one.

    python tools/merge_datasets.py --input shards/ --output-prefix data/zh_text_document
    python tools/merge_datasets.py --input data/a_text_document data/b_text_document --output-prefix data/ab

--input takes folders (every PREFIX.idx/.bin pair inside, in name order) or prefixes, in order.
All shards must hold the same dtype and kind (text or multimodal). The output appears only
complete.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # uninstalled repo

from megatron_m6.data.indexed import IndexedDatasetError, dataset_exists, merge_datasets  # noqa: E402


def shard_prefixes(inputs: list[str]) -> list[str]:
    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f[:-4]) for f in os.listdir(item) if f.endswith(".idx"))
            prefixes += [p for p in found if dataset_exists(p)]
        else:
            prefixes.append(item)
    return prefixes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--input", nargs="+", required=True, help="folders of shards, or prefixes")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    start = time.perf_counter()
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
