"""Generate with a trained M6 checkpoint or release: caption images, continue text, score
captions, or draw images from text. A release (tools/checkpoint/convert.py to-release) brings its
own vocab.txt.

    python tools/generate.py --load CKPT --vocab-file DATA/vocab.txt --image cat.jpg
    python tools/generate.py --load CKPT --vocab-file DATA/vocab.txt --text "今天天气"
    python tools/generate.py --load CKPT --vocab-file DATA/vocab.txt --eval-captions DATA/captions_test.jsonl
    python tools/generate.py --load T2I_CKPT --text-to-image "左上角有两个红色的圆形" --num-samples 8 \
        --top-k 64 --rerank caption --output samples/

--text-to-image samples (top-k/top-p/temperature; plain sampling when none is given, never beam
search) --num-samples images per prompt from a text_to_image fine-tuned checkpoint, decodes them
with the image tokenizer it was trained with (--image-tokenizer overrides), and writes
OUTPUT/NNN_K.png; with --rerank caption M6 (or --rerank-load's checkpoint, e.g. the captioner
the text-to-image model started from) scores each by the prompt's likelihood as its caption and
OUTPUT/NNN_best.png is the best. OUTPUT/results.jsonl lists prompts, files and scores.

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
from megatron_m6.conversion import is_release
from megatron_m6.inference import SamplingConfig, caption_images, continue_text, load_model
from megatron_m6.inference.generate import add_decoding_flags, sampling_config_from_args
from megatron_m6.inference.text_to_image import generate_images
from megatron_m6.pretrain import padded_vocab_size, pick_device
from megatron_m6.tokenizer import M6Tokenizer
from megatron_m6.training.checkpoint import CheckpointError, latest_checkpoint
from megatron_m6.vision import ImageTokenizerError, load_image_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate with a trained M6 checkpoint.",
                                allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint folder (the pretraining --save) or release")
    p.add_argument("--vocab-file", help="the vocab.txt the model was trained with "
                                        "(default: the one its training recorded, or the release's own)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", nargs="+", metavar="PATH", help="print a caption per image")
    what.add_argument("--text", help="print the model's continuation of this text")
    what.add_argument("--eval-captions", metavar="JSONL",
                      help="caption every image of a captions_test.jsonl and report exact-match accuracy")
    what.add_argument("--text-to-image", nargs="+", metavar="PROMPT", help="draw images of these captions")
    g = p.add_argument_group("text-to-image")
    g.add_argument("--num-samples", type=int, default=8, help="candidates per prompt")
    g.add_argument("--output", help="folder for the PNGs and results.jsonl")
    g.add_argument("--rerank", choices=["none", "caption"], default="none",
                   help="caption: keep the candidate whose caption likelihood of the prompt is highest")
    g.add_argument("--rerank-load", help="checkpoint of the captioner that reranks (default: --load)")
    g.add_argument("--image-tokenizer", help="the image tokenizer (default: the one --load was trained with)")
    p.add_argument("--show", type=int, default=10, help="--eval-captions: lines to print")
    p.add_argument("--batch-size", type=int, default=16, help="images per generation batch")
    add_decoding_flags(p)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="weights' dtype for generation (bf16: half the memory; norms stay fp32)")
    return p


def sampling_config(p: argparse.ArgumentParser, args: argparse.Namespace) -> SamplingConfig:
    """The decoding flags' SamplingConfig; impossible values (batch size and --show too) are usage errors."""
    if args.text_to_image and args.num_beams > 1:
        p.error("--text-to-image samples: beam search (--num-beams) is not offered")
    cfg = sampling_config_from_args(p, args)
    if args.batch_size < 1 or args.show < 0:
        p.error("need --batch-size >= 1 and --show >= 0")
    if args.text_to_image:
        if args.num_samples < 1:
            p.error(f"--num-samples must be >= 1, got {args.num_samples}")
        if not args.output:
            p.error("--text-to-image needs --output DIR")
        sampled = any(v is not None for v in (args.top_k, args.top_p, args.temperature))
        cfg.greedy = args.greedy and not sampled  # sampling unless --greedy asks for the argmax
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


def checkpoint_args(load: str) -> dict:
    """The run flags a training checkpoint recorded ({} for a release)."""
    return {} if is_release(load) else latest_checkpoint(load)[1].get("args", {})


def text_to_image(args: argparse.Namespace, model, tok: M6Tokenizer, cfg: SamplingConfig, device) -> None:
    """Sample, decode, optionally rerank, and write every prompt's images and results.jsonl."""
    path = args.image_tokenizer or checkpoint_args(args.load).get("image_tokenizer")
    if not path:
        raise ValueError(f"{args.load} records no image tokenizer: give --image-tokenizer")
    image_tokenizer = load_image_tokenizer(path, device)
    tok = tok.with_image_codes(image_tokenizer.cfg.codebook_size)
    if padded_vocab_size(tok.vocab_size) != model.cfg.vocab_size:
        raise ValueError(f"the model has {model.cfg.vocab_size} vocabulary rows, not those of text plus "
                         f"{image_tokenizer.cfg.codebook_size} image codes: not a text_to_image model of {path}")
    reranker = None
    if args.rerank == "caption":
        reranker = load_model(args.rerank_load, device, DTYPES[args.dtype]) if args.rerank_load else model
    results = generate_images(model, tok, image_tokenizer, args.text_to_image, args.num_samples, cfg,
                              args.batch_size, reranker)
    os.makedirs(args.output, exist_ok=True)
    rows = []
    for n, r in enumerate(results):
        files = [f"{n:03d}_{k}.png" for k in range(len(r.images))]
        for name, image in zip(files, r.images):
            image.save(os.path.join(args.output, name))
        if r.scores is not None:
            r.images[r.best].save(os.path.join(args.output, f"{n:03d}_best.png"))
        rows.append({"prompt": r.prompt, "files": files, "best": files[r.best],
                     "scores": None if r.scores is None else [round(float(x), 4) for x in r.scores]})
        print(f"{r.prompt}: {len(files)} images" + ("" if r.scores is None else f", best {files[r.best]}"))
    with open(os.path.join(args.output, "results.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    cfg = sampling_config(p, args)
    try:
        if not os.path.isdir(args.load):
            raise CheckpointError(f"--load {args.load} does not exist")
        vocab = args.vocab_file or checkpoint_args(args.load).get("vocab_file") or os.path.join(args.load, "vocab.txt")
        if not os.path.isfile(vocab):
            raise ValueError(f"--vocab-file is needed: {args.load} holds no vocab.txt")
        tok = M6Tokenizer.from_vocab_file(vocab)
        model = load_model(args.load, pick_device(args.device), DTYPES[args.dtype])
        if tok.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"--vocab-file has {tok.vocab_size} tokens but the model only "
                             f"{model.cfg.vocab_size}: not the vocabulary it was trained with")
        if args.text_to_image:
            text_to_image(args, model, tok, cfg, pick_device(args.device))
        elif args.text is not None:
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
    except (CheckpointError, ConfigError, ImageTokenizerError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
