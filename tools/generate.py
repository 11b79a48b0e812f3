"""Generate with a trained M6 checkpoint or release: caption images, continue text, or score
captions. A release (tools/checkpoint/convert.py to-release) brings its own vocab.txt.

    python tools/generate.py --load CKPT --vocab-file DATA/vocab.txt --image cat.jpg
    python tools/generate.py --load CKPT --vocab-file DATA/vocab.txt --text "今天天气"
    python tools/generate.py --load CKPT --vocab-file DATA/vocab.txt --eval-captions DATA/captions_test.jsonl

Greedy by default; any of --top-k/--top-p/--temperature switches to sampling, --num-beams N > 1
to beam search (deterministic, so not with sampling flags). --repetition-penalty,
--no-repeat-ngram-size and --min-new-tokens apply to all three.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# The code of this checkout (and its kernels/), even where another checkout is installed.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "kernels")]

import torch
from PIL import Image

from megatron_m6.config import ConfigError
from megatron_m6.inference import SamplingConfig, caption_images, continue_text, load_model
from megatron_m6.inference.generate import add_decoding_flags, sampling_config_from_args
from megatron_m6.pretrain import pick_device
from megatron_m6.tokenizer import M6Tokenizer
from megatron_m6.training.checkpoint import CheckpointError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate with a trained M6 checkpoint.",
                                allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint folder (the pretraining --save) or release")
    p.add_argument("--vocab-file", help="the vocab.txt the model was trained with "
                                        "(default: the release's own vocab.txt)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", nargs="+", metavar="PATH", help="print a caption per image")
    what.add_argument("--text", help="print the model's continuation of this text")
    what.add_argument("--eval-captions", metavar="JSONL",
                      help="caption every image of a captions_test.jsonl and report exact-match accuracy")
    p.add_argument("--show", type=int, default=10, help="--eval-captions: lines to print")
    p.add_argument("--batch-size", type=int, default=16, help="images per generation batch")
    add_decoding_flags(p)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="weights' dtype for generation (bf16: half the memory; norms stay fp32)")
    return p


def sampling_config(p: argparse.ArgumentParser, args: argparse.Namespace) -> SamplingConfig:
    """The decoding flags' SamplingConfig; impossible values (batch size and --show too) are usage errors."""
    cfg = sampling_config_from_args(p, args)
    if args.batch_size < 1 or args.show < 0:
        p.error("need --batch-size >= 1 and --show >= 0")
    return cfg


def read_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # decodes now, so a truncated file fails here
    except FileNotFoundError:
        raise ValueError(f"image {path} does not exist") from None
    except OSError as e:
        raise ValueError(f"image {path} is corrupt or not an image ({e})") from None


def read_captions(path: str) -> list[tuple[str, str]]:
    """(image path, caption) pairs of a captions jsonl; image paths are relative to its folder."""
    if not os.path.isfile(path):
        raise ValueError(f"--eval-captions {path} does not exist")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((os.path.join(os.path.dirname(path), row["image"]), row["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path} line {n} is not {{\"image\": ..., \"text\": ...}}") from None
    if not pairs:
        raise ValueError(f"--eval-captions {path} has no captions")
    return pairs


def eval_captions(model, tok, path: str, cfg: SamplingConfig, batch_size: int, show: int) -> None:
    """Caption every image and print exact-match accuracy (spaces ignored: decode may add them)."""
    pairs = read_captions(path)
    correct = 0
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i:i + batch_size]
        images = [read_image(image) for image, _ in batch]
        for j, (generated, (_, true)) in enumerate(
                zip(caption_images(model, tok, images, model.cfg.image_size, cfg), batch)):
            ok = "".join(generated.split()) == "".join(true.split())
            correct += ok
            if i + j < show:
                print(f"{generated} | {true} | {'✓' if ok else '✗'}")
    print(f"caption accuracy: {correct}/{len(pairs)} = {100 * correct / len(pairs):.1f}%")


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    cfg = sampling_config(p, args)
    try:
        if not os.path.isdir(args.load):
            raise CheckpointError(f"--load {args.load} does not exist")
        vocab = args.vocab_file or os.path.join(args.load, "vocab.txt")
        if not os.path.isfile(vocab):
            raise ValueError(f"--vocab-file is needed: {args.load} holds no vocab.txt")
        tok = M6Tokenizer.from_vocab_file(vocab)
        model = load_model(args.load, pick_device(args.device), DTYPES[args.dtype])
        if tok.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"--vocab-file has {tok.vocab_size} tokens but the model only "
                             f"{model.cfg.vocab_size}: not the vocabulary it was trained with")
        if args.text is not None:
            print(continue_text(model, tok, args.text, cfg))
        elif args.image:
            for i in range(0, len(args.image), args.batch_size):
                paths = args.image[i:i + args.batch_size]
                captions = caption_images(model, tok, [read_image(x) for x in paths],
                                          model.cfg.image_size, cfg)
                for path, caption in zip(paths, captions):
                    print(f"{path}: {caption}")
        else:
            eval_captions(model, tok, args.eval_captions, cfg, args.batch_size, args.show)
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
