"""Convert checkpoints, streaming tensor by tensor (a 100B model never has to fit in memory).

    # a training checkpoint (any parallel layout) -> a consolidated safetensors release
    python tools/checkpoint/convert.py to-release --load checkpoints/m6_base --output releases/m6_base
    # a release -> a model-only training checkpoint (--load trains from it under any layout)
    python tools/checkpoint/convert.py from-release --input releases/m6_base --output checkpoints/from_release
    # a fresh M6 whose image encoder is a torchvision ResNet-50 (model flags as for pretrain)
    python tools/checkpoint/convert.py resnet --input resnet50.pth --output checkpoints/start -- --preset m6-base
    # a checkpoint with text-to-image's [BOI], [EOI] and image-code tokens after its text vocabulary
    python tools/checkpoint/convert.py grow --load checkpoints/m6_tiny --output checkpoints/m6_tiny_t2i \
        --image-tokenizer checkpoints/vq --max-position-embeddings 160
"""

from __future__ import annotations

import argparse
import os
import re
import sys

# The code of this checkout (and its kernels/), even where another checkout is installed.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [REPO, os.path.join(REPO, "kernels")]

from megatron_m6.config import ConfigError, parse_args
from megatron_m6.conversion import (
    DTYPES,
    ConversionError,
    checkpoint_to_release,
    grow_checkpoint,
    release_to_checkpoint,
    resnet_to_checkpoint,
)
from megatron_m6.pretrain import padded_vocab_size
from megatron_m6.tokenizer import DEFAULT_VOCAB_FILE, M6Tokenizer
from megatron_m6.training.checkpoint import CheckpointError, latest_checkpoint
from megatron_m6.vision import ImageTokenizerError, load_image_tokenizer, tokenizer_info


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1024' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB or 500MB")
    unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index(unit or "_"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    to_release = sub.add_parser("to-release", help="training checkpoint -> consolidated safetensors release")
    to_release.add_argument("--load", required=True, help="a --save folder (the latest checkpoint is taken)")
    to_release.add_argument("--output", required=True, help="release folder to create")
    to_release.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"),
                            help="larger releases are sharded with an index file (default 5GB)")
    to_release.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point weights (default: as saved)")
    to_release.add_argument("--vocab-file", help="tokenizer vocabulary to ship (default: the one training used)")
    from_release = sub.add_parser("from-release", help="release -> model-only training checkpoint")
    from_release.add_argument("--input", required=True, help="release folder")
    from_release.add_argument("--output", required=True, help="--save-style folder to create")
    resnet = sub.add_parser("resnet", help="torchvision ResNet-50 state dict -> image encoder of a fresh M6")
    resnet.add_argument("--input", required=True, help="torchvision state dict (.pth, .pt or .safetensors)")
    resnet.add_argument("--output", required=True, help="--save-style folder to create")
    resnet.add_argument("model_flags", nargs=argparse.REMAINDER,
                        help="after --: pretrain's model flags (--preset, --seed, --vocab-file, ...)")
    grow = sub.add_parser("grow", help="checkpoint -> one with text-to-image's code tokens (and more positions)")
    grow.add_argument("--load", required=True, help="a --save folder (the latest checkpoint is taken)")
    grow.add_argument("--output", required=True, help="--save-style folder to create")
    grow.add_argument("--image-tokenizer", required=True,
                      help="the image tokenizer whose [BOI], [EOI] and codes follow the text vocabulary")
    grow.add_argument("--max-position-embeddings", type=int,
                      help="learned positions to grow to (an image's codes and its caption must fit)")
    grow.add_argument("--vocab-file", help="the text vocabulary (default: the one training used)")
    return p


def grow_for_image_codes(args: argparse.Namespace) -> str:
    """--load's checkpoint with the code tokens of --image-tokenizer after its text vocabulary,
    which must be the one it was trained with."""
    _, meta = latest_checkpoint(args.load)
    vocab = args.vocab_file or training_vocab(args.load)
    if vocab is None:
        raise ConversionError(f"{args.load} is a --mock-data run: it has no text vocabulary to keep")
    text = M6Tokenizer.from_vocab_file(vocab)
    if meta.get("vocab_sha256") not in (None, text.digest):
        raise ConversionError(f"{args.load} was not trained with the vocabulary {vocab}")
    tok = text.with_image_codes(tokenizer_info(load_image_tokenizer(args.image_tokenizer)).codebook_size)
    run_args = {**meta.get("args", {}), "vocab_file": vocab, "image_tokenizer": args.image_tokenizer}
    return grow_checkpoint(args.load, args.output, padded_vocab_size(tok.vocab_size), text.text_vocab_size,
                           args.max_position_embeddings, seed=run_args.get("seed", 0),
                           meta={"vocab_sha256": tok.digest, "args": run_args})


def training_vocab(load_dir: str) -> str | None:
    """The vocabulary the checkpoint was trained with: its --vocab-file, the shipped one, or
    none for a --mock-data run."""
    _, meta = latest_checkpoint(load_dir)
    args = meta.get("args", {})
    if args.get("mock_data"):
        return None
    return args.get("vocab_file") or DEFAULT_VOCAB_FILE


def resnet_model_config(flags: list[str]):
    """(ModelConfig, seed) exactly as `pretrain` would build them from the same flags."""
    flags = [x for x in flags if x != "--"]
    cfg = parse_args(flags + ([] if "--mock-data" in flags else ["--mock-data"]))
    if "--mock-data" not in flags:  # the vocabulary training will read sets the vocab size
        tok = M6Tokenizer.from_vocab_file(cfg.vocab_file or DEFAULT_VOCAB_FILE)
        cfg.model.vocab_size = padded_vocab_size(tok.vocab_size)
    return cfg.model, cfg.seed


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "to-release":
            vocab = args.vocab_file or training_vocab(args.load)
            summary = checkpoint_to_release(args.load, args.output, args.max_shard_size, args.dtype, vocab)
            print(f"wrote {args.output}: {summary['tensors']} tensors, {summary['bytes'] / 2**30:.2f} GiB "
                  f"in {summary['shards']} file(s)" + ("" if vocab else "; no vocabulary (mock-data run)"))
        elif args.command == "from-release":
            path = release_to_checkpoint(args.input, args.output)
            print(f"wrote {path}: train from it with --load {args.output}")
        elif args.command == "grow":
            path = grow_for_image_codes(args)
            print(f"wrote {path}: fine-tune text_to_image from it with --pretrained-checkpoint {args.output}")
        else:
            cfg, seed = resnet_model_config(args.model_flags)
            path = resnet_to_checkpoint(args.input, cfg, seed, args.output)
            print(f"wrote {path}: train from it with --load {args.output} and the same model flags")
    except (CheckpointError, ConversionError, ConfigError, ImageTokenizerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
