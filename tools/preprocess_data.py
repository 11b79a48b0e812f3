"""Turn raw Chinese text or image-text pairs (jsonl) into Megatron indexed datasets for M6.

    python tools/preprocess_data.py --input corpus/ --output-prefix data/zh --workers 2 \\
        --split-sentences --append-eod                       # -> data/zh_text_sentence.{bin,idx}
    python tools/preprocess_data.py --input pairs.jsonl --output-prefix data/pairs \\
        --image-key image --image-size 224                   # -> data/pairs_text_image.{bin,idx}
    python tools/preprocess_data.py --input vqa_train.jsonl --output-prefix data/vqa_train \\
        --task vqa --image-size 224                          # -> data/vqa_train_vqa.{bin,idx}

Megatron's flags where they exist (--input, --output-prefix, --json-keys, --tokenizer-type,
--vocab-file, --append-eod, --split-sentences, --workers, --partitions, --log-interval), plus the
M6 corpus cleaning and image options. Bad lines and images are skipped, counted and reported;
outputs appear only complete. Formats and rules: docs/DATA.md.
Image-text pairs as image-tokenizer codes for text-to-image fine-tuning: tools/encode_image_codes.py.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # uninstalled repo

from megatron_m6.data.cleaning import CleaningConfig  # noqa: E402
from megatron_m6.data.preprocess import PreprocessConfig, format_report, preprocess  # noqa: E402
from megatron_m6.data.task_spec import FINETUNE_TASKS  # noqa: E402

# M6 has one tokenizer, BERT's lower-cased WordPiece with every CJK character split out; Megatron
# command lines name it BertWordPieceLowerCase, so both names are accepted and any other refused.
TOKENIZER_TYPES = ("M6Tokenizer", "BertWordPieceLowerCase")
# The flags' defaults are the dataclasses'.
DEFAULTS = PreprocessConfig(inputs=[], output_prefix="")
CLEANING = DEFAULTS.cleaning


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    g = p.add_argument_group("input and output")
    g.add_argument("--input", nargs="+", required=True,
                   help="jsonl files, globs or folders (their *.jsonl/*.json)")
    g.add_argument("--output-prefix", required=True,
                   help="outputs are PREFIX_KEY_{document,sentence,image}.{bin,idx}")
    g.add_argument("--json-keys", nargs="+", default=DEFAULTS.json_keys,
                   help="text fields, one output each (the caption field with --image-key)")
    g.add_argument("--split-sentences", action="store_true",
                   help="one item per sentence (Chinese by punctuation, Latin by nltk Punkt)")
    g.add_argument("--append-eod", action="store_true", help="end every document with [EOS]")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=TOKENIZER_TYPES[0],
                   help="accepted for Megatron command lines; both names mean M6's tokenizer, the "
                        "only one")
    g.add_argument("--vocab-file", default=DEFAULTS.vocab_file,
                   help="vocab.txt (default: the vocabulary shipped with megatron_m6)")
    g = p.add_argument_group("cleaning (text)")
    g.add_argument("--min-chars", type=int, default=CLEANING.min_chars,
                   help="drop shorter documents (characters after normalisation)")
    g.add_argument("--max-chars", type=int, default=CLEANING.max_chars, help="drop longer documents")
    g.add_argument("--min-chinese-ratio", type=float, default=CLEANING.min_chinese_ratio,
                   help="drop documents where CJK characters are fewer than this share of letters")
    g.add_argument("--max-garbled-ratio", type=float, default=CLEANING.max_garbled_ratio,
                   help="drop documents with more replacement, control or private-use characters")
    g.add_argument("--traditional-to-simplified", action="store_true",
                   help="convert with OpenCC (t2s) before every other rule")
    g.add_argument("--no-dedup", action="store_true", help="keep exact duplicates (texts, and image-text pairs)")
    g.add_argument("--no-near-dedup", action="store_true", help="keep near duplicates")
    g = p.add_argument_group("image-text pairs")
    g.add_argument("--image-key", help="field with the image: a path relative to the jsonl, or "
                                       "base64; makes one multimodal output of [caption, image]")
    g.add_argument("--image-size", type=int, default=DEFAULTS.image_size,
                   help="resize and centre-crop to this")
    g.add_argument("--jpeg-quality", type=int, default=DEFAULTS.jpeg_quality,
                   help="quality of the re-encoded JPEG (1-100)")
    g.add_argument("--min-image-size", type=int, default=DEFAULTS.min_image_size,
                   help="skip smaller images (px)")
    g.add_argument("--max-aspect-ratio", type=float, default=DEFAULTS.max_aspect_ratio,
                   help="skip more elongated images")
    g.add_argument("--dedup-image-distance", type=int, default=DEFAULTS.image_dedup_distance, metavar="BITS",
                   help="also drop pairs whose image's 64-bit difference hash is within BITS (0-7) of an earlier "
                        "pair's with the same caption (default: off; exact image bytes are always compared)")
    g.add_argument("--dedup-images-any-caption", action="store_true",
                   help="an image (exact or near) that came before drops the pair whatever its caption")
    g.add_argument("--max-bad-fraction", type=float, default=DEFAULTS.max_bad_fraction,
                   help="stop, writing nothing, once more of the rows read have an image that cannot be "
                        "read (missing, corrupt, truncated): usually a wrong image root")
    g = p.add_argument_group("fine-tuning data")
    g.add_argument("--task", choices=[t for t in FINETUNE_TASKS if t != "text_to_image"],
                   help="rows of this downstream task (its own fields, as megatron_m6.finetune reads "
                        "them) -> documents of [source, target] (and the image): PREFIX_TASK; "
                        "no cleaning or deduplication, itm keeps its matched pairs (text_to_image's "
                        "data: tools/encode_image_codes.py)")
    g = p.add_argument_group("sharded runs (a SLURM array: examples/preprocess_slurm.sh)")
    g.add_argument("--num-shards", type=int, default=DEFAULTS.num_shards,
                   help="build one of N deterministic parts of the input (by file and byte range) into "
                        "NAME.shard-0000I-of-0000N, with a manifest; a shard already built is skipped")
    g.add_argument("--shard-index", type=int, default=DEFAULTS.shard_index, help="which part, from 0")
    g = p.add_argument_group("runtime")
    g.add_argument("--chunk-bytes", type=int, default=None,
                   help="input per unit of work, which is also the unit of sharding and of --resume (default: "
                        "1 MiB of text, 32 KiB of image-text rows; streamed formats: 4 MiB of rows)")
    g.add_argument("--resume", action="store_true",
                   help="continue a run that was killed from its last completed chunk (its PREFIX.journal and "
                        "temporary outputs); the result equals an uninterrupted run's")
    g.add_argument("--workers", type=int, default=DEFAULTS.workers,
                   help="processes that clean and tokenise")
    g.add_argument("--partitions", type=int, default=DEFAULTS.partitions,
                   help="independent writers, each with workers/partitions workers, merged at "
                        "the end (deduplication is then within a partition)")
    g.add_argument("--log-interval", type=int, default=DEFAULTS.log_interval,
                   help="documents between progress rate updates")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    a = p.parse_args(argv)
    if a.task and (a.image_key or a.json_keys != DEFAULTS.json_keys or a.split_sentences or a.append_eod):
        p.error("--task reads the task's own fields into [source, target] documents: --image-key, --json-keys, "
                "--split-sentences and --append-eod do not apply")
    cfg = PreprocessConfig(
        inputs=a.input, output_prefix=a.output_prefix, json_keys=a.json_keys,
        vocab_file=a.vocab_file, append_eod=a.append_eod, split_sentences=a.split_sentences,
        workers=a.workers, partitions=a.partitions, log_interval=a.log_interval,
        cleaning=CleaningConfig(min_chars=a.min_chars, max_chars=a.max_chars,
                                min_chinese_ratio=a.min_chinese_ratio,
                                max_garbled_ratio=a.max_garbled_ratio,
                                traditional_to_simplified=a.traditional_to_simplified),
        exact_dedup=not a.no_dedup, near_dedup=not a.no_near_dedup, image_key=a.image_key,
        image_dedup_distance=a.dedup_image_distance, dedup_images_any_caption=a.dedup_images_any_caption,
        image_size=a.image_size, jpeg_quality=a.jpeg_quality, min_image_size=a.min_image_size,
        max_aspect_ratio=a.max_aspect_ratio, max_bad_fraction=a.max_bad_fraction,
        progress=not a.no_progress, task=a.task,
        num_shards=a.num_shards, shard_index=a.shard_index, resume=a.resume, chunk_bytes=a.chunk_bytes)
    try:
        stats = preprocess(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        sys.exit(130)
    if stats.already_built:
        print(f"shard {cfg.shard_index} of {cfg.num_shards} is already built ({cfg.manifest_path} matches its "
              "settings, inputs and outputs): nothing to do", file=sys.stderr)
    print(format_report(stats))


if __name__ == "__main__":
    main()
