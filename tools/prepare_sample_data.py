"""Write the procedural sample data set (images, captions, Chinese text, vocab.txt), or its downstream sets.

    python tools/prepare_sample_data.py --output-dir data/sample
    python tools/prepare_sample_data.py --output-dir data/sample --downstream      # OUTPUT_DIR/downstream/
    python tools/prepare_sample_data.py --output-dir data/sample --text-to-image   # OUTPUT_DIR/downstream/ too

--downstream writes only the fine-tuning sets (captioning, VQA, image-text matching, retrieval,
reading comprehension) and leaves the pretraining set alone; where OUTPUT_DIR has no vocab.txt yet,
it writes the pretraining set first, since that vocab.txt is the one that covers the downstream text.
--text-to-image does the same for the text-to-image set (text_to_image_*.jsonl, text_to_image.json),
whose test captions name scenes held out of its training captions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # uninstalled repo

from megatron_m6.data.sample_data import make_downstream_data, make_sample_data, make_text_to_image_data  # noqa: E402

DOWNSTREAM_SIZES = {  # flag -> (default, what it counts); three values are train, valid, test
    "caption_images": ((1000, 100, 300), "images, one caption each"),
    "vqa_images": ((1000, 100, 300), "images, three questions each"),
    "itm_images": ((1000, 100, 200), "images, a positive and a hard negative text each"),
    "retrieval_images": (100, "test images with distinct captions"),
    "text_generation_rows": ((2000, 100, 300), "reading-comprehension rows"),
}
TEXT_TO_IMAGE_IMAGES = (2000, 100)  # train, valid; the test set is HELD_OUT_SCENES, one image each


def _add_downstream_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("downstream sets (with --downstream)")
    group.add_argument("--downstream", action="store_true",
                       help="write OUTPUT_DIR/downstream/ only (and the pretraining set if vocab.txt is absent)")
    for name, (default, counts) in DOWNSTREAM_SIZES.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, tuple):
            group.add_argument(flag, type=int, nargs=3, default=list(default), metavar=("TRAIN", "VALID", "TEST"),
                               help=f"{counts} (default {' '.join(map(str, default))})")
        else:
            group.add_argument(flag, type=int, default=default, metavar="N", help=f"{counts} (default {default})")


def _add_text_to_image_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("text-to-image set (with --text-to-image)")
    group.add_argument("--text-to-image", action="store_true",
                       help="write the text-to-image set to OUTPUT_DIR/downstream/ (and the pretraining set if "
                            "vocab.txt is absent); its test set is every held-out scene once")
    group.add_argument("--text-to-image-images", type=int, nargs=2, default=list(TEXT_TO_IMAGE_IMAGES),
                       metavar=("TRAIN", "VALID"), help="images of training scenes, one caption each "
                       f"(default {' '.join(map(str, TEXT_TO_IMAGE_IMAGES))})")


def _summary(summary: dict, start: float) -> str:
    return " ".join(f"{k}={v}" for k, v in summary.items()) + f" seconds={time.perf_counter() - start:.1f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--output-dir", default="data/sample", help="folder to write (default data/sample)")
    p.add_argument("--num-train-images", type=int, default=2000)
    p.add_argument("--num-test-images", type=int, default=100)
    p.add_argument("--num-text-docs", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4000)
    _add_downstream_flags(p)
    _add_text_to_image_flags(p)
    args = p.parse_args(argv)
    given = [name for name in DOWNSTREAM_SIZES if getattr(args, name) != p.get_default(name)]
    if given and not args.downstream:
        p.error(f"--{given[0].replace('_', '-')} needs --downstream")
    if args.text_to_image_images != p.get_default("text_to_image_images") and not args.text_to_image:
        p.error("--text-to-image-images needs --text-to-image")
    start = time.perf_counter()
    vocab_file = os.path.join(args.output_dir, "vocab.txt")
    out_dir = os.path.join(args.output_dir, "downstream")
    if not (args.downstream or args.text_to_image) or not os.path.isfile(vocab_file):
        summary = make_sample_data(args.output_dir, args.num_train_images, args.num_test_images,
                                   args.num_text_docs, args.image_size, args.seed, args.vocab_size)
        print(_summary(summary, start))
    if args.downstream:
        start = time.perf_counter()
        try:
            summary = make_downstream_data(out_dir, args.seed, args.image_size, vocab_file=vocab_file,
                                           **{name: getattr(args, name) for name in DOWNSTREAM_SIZES})
        except ValueError as e:
            p.error(str(e))
        print(_summary({"out_dir": out_dir, "images": summary["images"], **summary["rows"]}, start))
    if args.text_to_image:
        start = time.perf_counter()
        try:
            summary = make_text_to_image_data(out_dir, args.seed, args.image_size, *args.text_to_image_images)
        except ValueError as e:
            p.error(str(e))
        print(_summary({"out_dir": out_dir, "images": summary["images"], **summary["rows"]}, start))


if __name__ == "__main__":
    main()
