"""Text-to-image: M6 writes an image's codes after `[CLS] caption [SEP] [PAD]... [BOI]`, the image
tokenizer's decoder turns them into pixels, and M6 itself, as a captioner, reranks the candidates.

Sampling follows the recipe of CogView and OFA: top-k/top-p draws (never beam search, which
favours flat, repetitive images), N candidates per prompt, each exactly grid x grid codes. At
every step the logits are cut to the code tokens, so nothing but a code can be written. The
reranker scores a decoded candidate by log P(prompt | image) per token, the prompt's mean
log-likelihood as that image's caption (evaluate.match_scores, ITM's score), and keeps the best.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from megatron_m6.data.downstream import Example, text_to_image_prefix
from megatron_m6.inference.generate import SamplingConfig, Sequences, model_device, sample_next
from megatron_m6.model import M6
from megatron_m6.tokenizer import M6Tokenizer
from megatron_m6.vision import VQVAE
from megatron_m6.vision.pixels import tensor_to_image


def prompt_tokens(tok: M6Tokenizer, caption: str, grid: int, max_positions: int) -> list[int]:
    """`[CLS] caption [SEP] [PAD]... [BOI]`, the training layout's start (text_to_image_prefix, the
    image ending at the last position); a ValueError when the caption and grid x grid codes do not
    fit the model's positions (a caption is never cut: a cut one would ask for another image)."""
    if tok.image_codes is None:
        raise ValueError("this tokenizer has no image codes (M6Tokenizer.with_image_codes)")
    source = tok.encode(caption)
    prefix = text_to_image_prefix(tok, source, grid * grid, max_positions)
    if prefix is None:
        raise ValueError(f"the prompt {caption[:30]!r} has {len(source)} tokens; with {grid * grid} image codes "
                         f"and 4 special tokens that exceeds the model's {max_positions} positions "
                         f"(room for {max_positions - grid * grid - 4} caption tokens)")
    return prefix + [tok.image_codes.boi_id]


@torch.no_grad()
def sample_codes(model: M6, tok: M6Tokenizer, prompts: torch.Tensor, grid: int, cfg: SamplingConfig,
                 generator: torch.Generator) -> torch.Tensor:
    """grid x grid codes [B, grid*grid] per row of `prompts` [B, L] (rows of one length, each
    ending with [BOI]), drawn with the KV cache from the logits of the code tokens alone."""
    codes = tok.image_codes
    B, plen = prompts.shape
    n = grid * grid
    was_training = model.training
    model.eval()
    try:
        seqs = Sequences(model, prompts, None, None, plen + n, use_cache=True, prefix_len=plen - 1)
        logits, out = seqs.logits, []
        for step in range(n):
            code = sample_next(logits[:, codes.first_code_id:codes.end_id], cfg, generator)
            out.append(code)
            if step + 1 < n:
                logits = seqs.append(code + codes.first_code_id)
    finally:
        model.train(was_training)
    return torch.stack(out, dim=1)


@dataclass
class GeneratedImages:
    """Per prompt: the candidates' codes [N, grid, grid] and images, their rerank scores (None
    without reranking) and the index of the one kept (the first without reranking)."""

    prompt: str
    codes: np.ndarray
    images: list[Image.Image]
    scores: np.ndarray | None
    best: int


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def caption_scores(model: M6, tok: M6Tokenizer, caption: str, images: Sequence[Image.Image],
                   batch_size: int = 64) -> np.ndarray:
    """log P(caption | image) per token for each image: how well M6 thinks `caption` describes it."""
    from megatron_m6.evaluate import match_scores  # evaluate's text_to_image task imports this module

    examples = [Example("", caption, png_bytes(img)) for img in images]
    return match_scores(model, tok, examples, batch_size)


@torch.no_grad()
def generate_images(model: M6, tok: M6Tokenizer, image_tokenizer: VQVAE, captions: Sequence[str],
                    num_samples: int, cfg: SamplingConfig, batch_size: int = 32,
                    reranker: M6 | None = None) -> list[GeneratedImages]:
    """`num_samples` images per caption, sampled in batches of up to `batch_size` sequences
    (prompts of one length together, as the KV cache needs), decoded by `image_tokenizer`, and
    with a `reranker` (M6 as captioner: the same model, or another checkpoint) scored and picked."""
    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    if cfg.num_beams > 1:
        raise ValueError("text-to-image samples; beam search is not offered")
    grid, device = image_tokenizer.cfg.grid, model_device(model)
    if tok.image_codes is None or tok.image_codes.codebook_size != image_tokenizer.cfg.codebook_size:
        raise ValueError(f"the model's vocabulary has no codes of this {image_tokenizer.cfg.codebook_size}-code "
                         "image tokenizer")
    prompts = [prompt_tokens(tok, c, grid, model.cfg.max_position_embeddings) for c in captions]
    rows = [(i, s) for i in range(len(captions)) for s in range(num_samples)]
    rows.sort(key=lambda r: len(prompts[r[0]]))  # stable: by prompt length, then prompt, then sample
    codes = np.zeros((len(captions), num_samples, grid * grid), dtype=np.int64)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    start = 0
    while start < len(rows):
        length = len(prompts[rows[start][0]])
        batch = [r for r in rows[start:start + batch_size] if len(prompts[r[0]]) == length]
        tokens = torch.tensor([prompts[i] for i, _ in batch], dtype=torch.long, device=device)
        drawn = sample_codes(model, tok, tokens, grid, cfg, generator).cpu().numpy()
        for (i, s), c in zip(batch, drawn):
            codes[i, s] = c
        start += len(batch)
    results = []
    decoder_device = next(image_tokenizer.parameters()).device
    for i, caption in enumerate(captions):
        grids = torch.from_numpy(codes[i]).view(num_samples, grid, grid).to(decoder_device)
        images = [tensor_to_image(t) for t in image_tokenizer.decode(grids).float().cpu()]
        scores = caption_scores(reranker, tok, caption, images) if reranker is not None else None
        best = int(np.argmax(scores)) if scores is not None else 0
        results.append(GeneratedImages(caption, codes[i].reshape(num_samples, grid, grid), images, scores, best))
    return results
