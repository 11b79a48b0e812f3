"""Encode image-text pairs into image codes once, so text-to-image fine-tuning never runs the encoder.

    python tools/encode_image_codes.py --input data/pairs_text_image --output-prefix data/pairs_codes \\
        --image-tokenizer checkpoints/vq                  # -> data/pairs_codes.{bin,idx,image_codes.json}
    python tools/encode_image_codes.py --input caption_train.jsonl --output-prefix data/caption_codes \\
        --image-tokenizer checkpoints/vq --device cuda --batch-size 256
    python tools/encode_image_codes.py --check data/pairs_codes --image-tokenizer checkpoints/vq

--input: jsonl files of {"image", "caption"} rows, or image-text indexed datasets
(tools/preprocess_data.py --image-key), whose caption ids are kept (give the --vocab-file they were
tokenised with). Each output document is [caption ids, the image's grid x grid codes]; layout and
metadata: megatron_m6/data/image_codes.py and docs/DATA.md. --check verifies that a code dataset
was made by --image-tokenizer. Errors are one line; exit code 1 for bad input, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # uninstalled repo

from megatron_m6.data.image_codes import check_code_dataset, encode_image_codes  # noqa: E402
from megatron_m6.vision import load_image_tokenizer, tokenizer_info  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--input", nargs="+", help="jsonl files and/or image-text indexed dataset prefixes")
    p.add_argument("--output-prefix", help="writes PREFIX.bin, PREFIX.idx and PREFIX.image_codes.json")
    p.add_argument("--check", metavar="PREFIX", help="instead of encoding: check that the image-code dataset "
                   "PREFIX was made by --image-tokenizer")
    p.add_argument("--image-tokenizer", required=True,
                   help="tools/train_image_tokenizer.py's --save folder or its tokenizer.pt")
    p.add_argument("--vocab-file", help="default: the shipped megatron_m6/tokenizer/vocab.txt")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--max-bad-fraction", type=float, default=0.0,
                   help="stop when more of the rows than this have an image that cannot be read")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    a = p.parse_args(argv)
    if a.check and (a.input or a.output_prefix):
        p.error("--check takes no --input or --output-prefix")
    if not a.check and not (a.input and a.output_prefix):
        p.error("give --input and --output-prefix (or --check PREFIX)")
    if a.batch_size < 1 or not 0 <= a.max_bad_fraction <= 1:
        p.error("--batch-size must be at least 1 and --max-bad-fraction in [0, 1]")
    try:
        if a.check:
            check_code_dataset(a.check, tokenizer_info(load_image_tokenizer(a.image_tokenizer)))
            print(f"{a.check}: encoded with {a.image_tokenizer}")
            return
        report = encode_image_codes(a.input, a.output_prefix, a.image_tokenizer, a.vocab_file, a.batch_size,
                                    a.device, a.max_bad_fraction, log=lambda line: print(line, flush=True))
    except (OSError, ValueError) as e:  # ImageTokenizerError and IndexedDatasetError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(report.summary())


if __name__ == "__main__":
    main()
