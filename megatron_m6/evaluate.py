"""Downstream evaluation: `python -m megatron_m6.evaluate --task TASK --load DIR --data FILE`.

Generates the target of every example (captions, answers, texts) with the decoding flags of
tools/generate.py, scores image-text matching by the text's likelihood as the image's caption, and
writes the task's metrics (megatron_m6/metrics.py) to metrics.json and every prediction next to
its references to predictions.jsonl. Under torchrun each rank evaluates its share of the examples
on a whole model of its own (data parallel) and rank 0 gathers and writes the results.

    caption          BLEU-1..4, ROUGE-L, CIDEr (characters, as coco-caption)
    vqa              accuracy (exact match after normalisation)
    itm              accuracy (the matched text outscores its image's distractors); with
                     --retrieval-data, image->text and text->image recall@1/5/10
    text_generation  BLEU (sacreBLEU, zh), ROUGE-L and perplexity of the references
    text_to_image    attribute accuracy with and without reranking, the tokenizer's ceiling, FID
                     (megatron_m6/evaluate_text_to_image.py); --output-dir also gets index.html
                     and grid.png of every prompt's candidates
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_m6 import metrics
from megatron_m6.conversion import is_release
from megatron_m6.data.dataset import collate
from megatron_m6.data.downstream import (
    FINETUNE_TASKS,
    DownstreamDataError,
    Example,
    decode_image,
    layout,
    load_examples,
    open_examples,
    require_distractors,
)
from megatron_m6.inference.generate import (
    SamplingConfig,
    add_decoding_flags,
    generate,
    model_device,
    sampling_config_from_args,
)
from megatron_m6.model import M6
from megatron_m6.precision import fp32_or_wider
from megatron_m6.tokenizer import DEFAULT_VOCAB_FILE, M6Tokenizer
from megatron_m6.training.checkpoint import CheckpointError, latest_checkpoint

# The metric fine-tuning keeps its best checkpoint by (higher is better for all of them).
PRIMARY_METRIC = {"caption": "CIDEr", "vqa": "accuracy", "itm": "accuracy", "text_generation": "BLEU"}


def _images(examples: Sequence[Example], image_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.zeros(len(examples), 3, image_size, image_size)
    for i, e in enumerate(examples):
        if e.image is not None:
            pixels[i] = decode_image(e.image, image_size)
    has_image = torch.tensor([e.image is not None for e in examples], dtype=torch.bool)
    return pixels.to(device), has_image.to(device)


def _chunks(n: int, batch_size: int) -> Iterator[range]:
    for start in range(0, n, batch_size):
        yield range(start, min(start + batch_size, n))


def _seq_length(model: M6, seq_length: int | None) -> int:
    """The length samples are laid out to: the training run's, else the model's longest."""
    return seq_length or model.cfg.max_position_embeddings


@torch.no_grad()
def predict(model: M6, tok: M6Tokenizer, examples: Sequence[Example], sampling: SamplingConfig,
            batch_size: int = 32, seq_length: int | None = None) -> list[str]:
    """The generated target of every example, from its prefix `[IMG]*n [CLS] source [SEP]` cut
    as training cuts it to `seq_length`. Rows of one batch share a prefix length (generate's
    contract), so examples are batched by it."""
    cfg = model.cfg
    room = _seq_length(model, seq_length)
    prefixes = [layout(e, tok, room, cfg.num_image_tokens, with_target=False)[0] for e in examples]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prefixes):
        by_length.setdefault(len(p), []).append(i)
    out: list[str] = [""] * len(examples)
    device = model_device(model)
    for indices in by_length.values():
        for chunk in _chunks(len(indices), batch_size):
            rows = [indices[j] for j in chunk]
            tokens = torch.tensor([prefixes[i] for i in rows], dtype=torch.long, device=device)
            pixels, has_image = _images([examples[i] for i in rows], cfg.image_size, device)
            for i, ids in zip(rows, generate(model, tokens, pixels, has_image, tok.eos_id, sampling)):
                out[i] = tok.decode(ids)
    return out


@torch.no_grad()
def _target_logits(model: M6, tok: M6Tokenizer, examples: Sequence[Example], batch_size: int,
                   seq_length: int | None):
    """Per batch: (its example indices, the collated batch, the logits in fp32 or wider) of the
    examples laid out with their targets, as training sees them."""
    cfg, device = model.cfg, model_device(model)
    seq_length = _seq_length(model, seq_length)
    for chunk in _chunks(len(examples), batch_size):
        samples = []
        for i in chunk:
            tokens, prefix_len = layout(examples[i], tok, seq_length, cfg.num_image_tokens)
            samples.append({"tokens": torch.tensor(tokens), "prefix_len": prefix_len, "task_id": 0, "image": None})
        length = max(len(s["tokens"]) for s in samples)
        batch = collate(samples, length, tok.pad_id, cfg.image_size)
        pixels, has_image = _images([examples[i] for i in chunk], cfg.image_size, device)
        logits, _ = model(batch["tokens"].to(device), batch["prefix_len"].to(device),
                          batch["valid_len"].to(device), pixels.to(model.embedding.word_emb.weight.dtype), has_image)
        yield chunk, batch, fp32_or_wider(logits).cpu()


def target_log_likelihoods(model: M6, tok: M6Tokenizer, examples: Sequence[Example], batch_size: int = 64,
                           seq_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per example: the summed log-likelihood of its target and EOS given its prefix, and the
    number of those tokens (what training's loss covers)."""
    sums, counts = np.zeros(len(examples)), np.zeros(len(examples), dtype=np.int64)
    for chunk, batch, logits in _target_logits(model, tok, examples, batch_size, seq_length):
        mask = batch["loss_mask"]
        token_ll = -F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
        sums[list(chunk)] = (token_ll * mask.to(token_ll.dtype)).sum(1).double().numpy()
        counts[list(chunk)] = mask.sum(1).long().numpy()
    return sums, counts


def match_scores(model: M6, tok: M6Tokenizer, examples: Sequence[Example], batch_size: int = 64,
                 seq_length: int | None = None) -> np.ndarray:
    """Per itm example, log P(text | image) per token (EOS included): the text's mean log-likelihood
    as the image's caption (data/downstream.py says why)."""
    sums, counts = target_log_likelihoods(model, tok, examples, batch_size, seq_length)
    return sums / counts


def _shard(items: Sequence, rank: int, world: int) -> list:
    return list(items[rank::world])


def _gather(mine: list, world: int) -> list:
    """The per-rank lists of _shard put back in their original order."""
    if world == 1:
        return mine
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    out = [None] * sum(len(x) for x in everyone)
    for rank, part in enumerate(everyone):
        out[rank::world] = part
    return out


def evaluate_task(model: M6, tok: M6Tokenizer, task: str, examples: Sequence[Example],
                  sampling: SamplingConfig, batch_size: int = 32, rank: int = 0, world: int = 1,
                  retrieval: Sequence[Example] | None = None,
                  seq_length: int | None = None) -> tuple[dict[str, float], list[dict]]:
    """(metrics, one record per example) of `task` on `examples` laid out to `seq_length` (default:
    the model's longest); each of `world` ranks (torch.distributed, when world > 1) computes its
    share and all get the whole result."""
    mine = _shard(examples, rank, world)
    if task == "itm":
        scores = _gather(match_scores(model, tok, mine, batch_size, seq_length).tolist(), world)
        result = {"accuracy": metrics.matching_accuracy(scores, [e.label for e in examples],
                                                        [e.group for e in examples])}
        records = [{"line": e.line, "image": e.group, "text": e.target, "score": s, "label": e.label}
                   for e, s in zip(examples, scores)]
        if retrieval:
            result.update(retrieval_metrics(model, tok, retrieval, batch_size, rank, world, seq_length))
        return result, records
    predictions = _gather(predict(model, tok, mine, sampling, batch_size, seq_length), world)
    references = [e.references for e in examples]
    if task == "caption":
        result = metrics.caption_metrics(predictions, references)
    elif task == "vqa":
        result = {"accuracy": metrics.vqa_accuracy(predictions, references)}
    else:
        result = metrics.text_metrics(predictions, references)
        ll, count = target_log_likelihoods(model, tok, mine, batch_size, seq_length)
        sums = torch.tensor([ll.sum(), count.sum()], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums)
        result["perplexity"] = math.exp(min(-sums[0].item() / max(sums[1].item(), 1.0), 50.0))
    records = [{"line": e.line, "source": e.source, "prediction": p, "references": e.references}
               for e, p in zip(examples, predictions)]
    return result, records


def retrieval_metrics(model: M6, tok: M6Tokenizer, pairs: Sequence[Example], batch_size: int = 64,
                      rank: int = 0, world: int = 1, seq_length: int | None = None) -> dict[str, float]:
    """Recall@1/5/10 both ways over a candidate set of (image, caption) pairs, pair i's caption
    belonging to image i: every image is scored with every caption by the itm match score."""
    n = len(pairs)
    grid = [Example("", pairs[j].target, pairs[i].image) for i in range(n) for j in range(n)]
    mine = match_scores(model, tok, _shard(grid, rank, world), batch_size, seq_length)
    scores = np.array(_gather(mine.tolist(), world))
    recall = metrics.retrieval_recall(scores.reshape(n, n), np.arange(n))
    return recall


def retrieval_pairs(path: str, image_size: int) -> list[Example]:
    """The (image, caption) candidates of a retrieval jsonl {"image", "text"}; every image must load."""
    examples, _ = load_examples(path, "caption", image_size)
    return examples


def trained_seq_length(load_dir: str) -> int | None:
    """The --seq-length the checkpoint under `load_dir` was trained with (None for a release)."""
    if is_release(load_dir):
        return None
    return latest_checkpoint(load_dir)[1].get("args", {}).get("seq_length")


# -- the command line -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate an M6 checkpoint on a downstream task.", allow_abbrev=False)
    p.add_argument("--task", choices=FINETUNE_TASKS, required=True)
    p.add_argument("--load", required=True, help="checkpoint folder (any layout) or release")
    p.add_argument("--data", required=True, help="jsonl of the task, or an indexed dataset's prefix "
                                                   "(as megatron_m6.finetune reads them)")
    p.add_argument("--retrieval-data", help="with --task itm: jsonl {image, text} of distinct pairs for recall@k")
    p.add_argument("--vocab-file", default=None, help="vocab.txt of the checkpoint (default: the shipped one)")
    p.add_argument("--output-dir", help="where metrics.json and predictions.jsonl go (default: print only)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-length", type=int,
                   help="cut samples to this length (default: the checkpoint's training run's)")
    p.add_argument("--max-bad-fraction", type=float, default=0.0)
    p.add_argument("--text-only", action="store_true", help="drop the images (the text-only baseline)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: weights in bf16 (GPU)")
    g = p.add_argument_group("text_to_image")
    g.add_argument("--image-tokenizer", help="the image tokenizer (default: the one --load was trained with)")
    g.add_argument("--num-samples", type=int, default=8, help="candidates per prompt")
    g.add_argument("--rerank-load", help="the captioner that reranks and gives FID's features (default: --load)")
    add_decoding_flags(p)
    return p


def text_to_image_main(a: argparse.Namespace, sampling: SamplingConfig, device: torch.device) -> None:
    """evaluate --task text_to_image on one process: metrics printed, and with --output-dir
    metrics.json, predictions.jsonl, index.html, grid.png and every candidate's PNG."""
    from megatron_m6.evaluate_text_to_image import evaluate_text_to_image, read_prompts, write_samples
    from megatron_m6.inference.generate import load_model
    from megatron_m6.pretrain import padded_vocab_size
    from megatron_m6.vision import ImageTokenizerError, load_image_tokenizer

    dtype = torch.bfloat16 if a.dtype == "bf16" else None
    try:
        if a.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {a.num_samples}")
        args = {} if is_release(a.load) else latest_checkpoint(a.load)[1].get("args", {})
        path = a.image_tokenizer or args.get("image_tokenizer")
        if not path:
            raise ValueError(f"{a.load} records no image tokenizer: give --image-tokenizer")
        image_tokenizer = load_image_tokenizer(path, device)
        tok = M6Tokenizer.from_vocab_file(a.vocab_file or args.get("vocab_file") or DEFAULT_VOCAB_FILE)
        tok = tok.with_image_codes(image_tokenizer.cfg.codebook_size)
        model = load_model(a.load, device, dtype)
        if padded_vocab_size(tok.vocab_size) != model.cfg.vocab_size:
            raise ValueError(f"{a.load} has {model.cfg.vocab_size} vocabulary rows, not those of the text vocabulary "
                             f"and {image_tokenizer.cfg.codebook_size} image codes")
        reranker = load_model(a.rerank_load, device, dtype) if a.rerank_load else model
        sampling.greedy = a.greedy  # text-to-image samples unless --greedy asks for the argmax
        rows = read_prompts(a.data)
        result, records, results = evaluate_text_to_image(model, tok, image_tokenizer, rows, sampling,
                                                          a.num_samples, reranker, a.batch_size)
    except (DownstreamDataError, CheckpointError, ImageTokenizerError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    result = {"task": "text_to_image", **result}
    if a.output_dir:
        write_results(a.output_dir, result, records)
        write_samples(a.output_dir, result, records, results)
    print(json.dumps(result, ensure_ascii=False))


def write_results(output_dir: str, result: dict, records: list[dict]) -> None:
    """metrics.json and predictions.jsonl, each written under a temporary name and renamed."""
    os.makedirs(output_dir, exist_ok=True)
    for name, text in (("predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)),
                       ("metrics.json", json.dumps(result, ensure_ascii=False, indent=1) + "\n")):
        tmp = os.path.join(output_dir, f".{name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(output_dir, name))


def main(argv: list[str] | None = None) -> None:
    from megatron_m6.inference.generate import load_model

    p = build_parser()
    a = p.parse_args(argv)
    sampling = sampling_config_from_args(p, a)
    if a.task == "text_to_image":
        if a.num_beams > 1:
            p.error("text_to_image samples: beam search (--num-beams) is not offered")
        return text_to_image_main(a, sampling, torch.device(a.device))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if a.device == "cuda" else a.device)
    try:
        tok = M6Tokenizer.from_vocab_file(a.vocab_file or DEFAULT_VOCAB_FILE)
        model = load_model(a.load, device, torch.bfloat16 if a.dtype == "bf16" else None)
        if tok.vocab_size > model.cfg.vocab_size:
            raise CheckpointError(f"{a.vocab_file} has {tok.vocab_size} tokens, more than the checkpoint's "
                                  f"{model.cfg.vocab_size} embeddings: it is another vocabulary")
        size = model.cfg.image_size
        examples, summary = open_examples(a.data, a.task, tok, size, a.max_bad_fraction, a.text_only)
        require_distractors(a.task, examples, a.data)
        if a.retrieval_data and (a.task != "itm" or a.text_only):
            raise ValueError("--retrieval-data ranks images by the itm score: it needs --task itm and the images")
        retrieval = retrieval_pairs(a.retrieval_data, size) if a.retrieval_data else None
        if rank == 0:
            print(summary, file=sys.stderr)
        seq_length = a.seq_length or trained_seq_length(a.load)
        result, records = evaluate_task(model, tok, a.task, examples, sampling, a.batch_size, rank, world,
                                        retrieval, seq_length)
    except (DownstreamDataError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank == 0:
        result = {"task": a.task, "examples": len(examples), **result}
        if a.output_dir:
            write_results(a.output_dir, result, records)
        print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
