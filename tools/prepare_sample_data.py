"""Write the procedural sample data set (images, captions, Chinese text, vocab.txt) for pretraining.

    python tools/prepare_sample_data.py --output-dir data/sample
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # uninstalled repo

from megatron_m6.data.sample_data import make_sample_data  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--output-dir", default="data/sample", help="folder to write (default data/sample)")
    p.add_argument("--num-train-images", type=int, default=2000)
    p.add_argument("--num-test-images", type=int, default=100)
    p.add_argument("--num-text-docs", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4000)
    args = p.parse_args(argv)
    start = time.perf_counter()
    summary = make_sample_data(args.output_dir, args.num_train_images, args.num_test_images,
                               args.num_text_docs, args.image_size, args.seed, args.vocab_size)
    print(" ".join(f"{k}={v}" for k, v in summary.items()), f"seconds={time.perf_counter() - start:.1f}")


if __name__ == "__main__":
    main()
