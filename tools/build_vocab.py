"""Build an M6 vocabulary (BERT-style vocab.txt) from a corpus.

    python tools/build_vocab.py --input corpus/ --output vocab.txt --vocab-size 8000 --cjk-block

Inputs are jsonl files (the --json-keys fields are read; bad lines are skipped and counted) or
plain text files (one text per line); folders and globs are expanded. --cjk-block adds every
character of the CJK Unified Ideographs block (U+4E00-U+9FFF), CJK symbols and punctuation and
printable ASCII, so any Chinese text tokenises without [UNK] even if the corpus lacks it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import string
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # uninstalled repo

from megatron_m6.tokenizer import build_vocab  # noqa: E402

CJK_BLOCK = ("".join(chr(c) for c in range(0x4E00, 0xA000)) + "".join(chr(c) for c in range(0x3000, 0x3040))
             + string.ascii_lowercase + string.digits + string.punctuation)


def input_files(items: list[str]) -> list[str]:
    files = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(root, f) for root, _, names in os.walk(item)
                           for f in names if f.endswith((".jsonl", ".json", ".txt")))
        else:
            found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
        if not found:
            raise SystemExit(f"error: --input {item} matches no file")
        files += found
    return files


def read_texts(files: list[str], keys: list[str]) -> tuple[list[str], int]:
    """Texts of the files and the number of lines skipped (undecodable, bad JSON, no key)."""
    texts, skipped = [], 0
    for path in files:
        is_json = path.endswith((".jsonl", ".json"))
        with open(path, "rb") as f:
            for raw in f:
                try:
                    line = raw.decode("utf-8").strip()
                    if not line:
                        continue
                    if not is_json:
                        texts.append(line)
                        continue
                    obj = json.loads(line)
                    found = [obj[k] for k in keys if isinstance(obj.get(k), str)]
                except (UnicodeDecodeError, ValueError, AttributeError):
                    found = []
                texts += found
                skipped += not found
    return texts, skipped


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--input", nargs="+", required=True, help="jsonl/txt files, folders or globs")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="jsonl fields to read")
    p.add_argument("--output", required=True, help="vocab.txt to write")
    p.add_argument("--vocab-size", type=int, default=8000,
                   help="WordPiece budget (CJK characters are kept beyond it)")
    p.add_argument("--min-frequency", type=int, default=2,
                   help="leave out WordPiece pieces seen fewer times (CJK characters are always kept)")
    p.add_argument("--cjk-block", action="store_true",
                   help="add every basic CJK ideograph, CJK punctuation and printable ASCII")
    args = p.parse_args(argv)
    start = time.perf_counter()
    texts, skipped = read_texts(input_files(args.input), args.json_keys)
    if not texts:
        raise SystemExit("error: no text found in --input")
    tok = build_vocab(texts, args.output, args.vocab_size, args.min_frequency,
                      alphabet=CJK_BLOCK if args.cjk_block else "")
    print(f"vocab_size={tok.vocab_size} texts={len(texts)} skipped_lines={skipped} "
          f"output={args.output} seconds={time.perf_counter() - start:.1f}")


if __name__ == "__main__":
    main()
