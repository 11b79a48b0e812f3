"""Autoregressive generation from a trained M6: captions for images, continuations for text.

A prompt is the prefix of a training sample (`[IMG]*n [CLS] source [SEP]`); the model then writes
the target one token at a time until `[EOS]`, exactly as the prefix-LM loss taught it. With a KV
cache each new token costs one position of compute instead of re-running the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from megatron_m6.conversion import is_release, load_release_weights, model_config_from_dict, release_config
from megatron_m6.data.dataset import image_to_tensor
from megatron_m6.model import M6, KVCache
from megatron_m6.precision import fp32_or_wider
from megatron_m6.training.checkpoint import CheckpointError, latest_checkpoint, load_model_weights


@dataclass
class SamplingConfig:
    """How to pick each next token: greedy argmax, or sampling with temperature, top-k, top-p."""

    max_new_tokens: int = 32
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0  # 1.0: no nucleus filtering
    seed: int = 0


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """Next token per row from logits [B, V]: argmax, or a draw from the temperature-scaled
    distribution restricted to the top-k tokens and to the nucleus (the smallest set of most
    likely tokens whose probability reaches top_p)."""
    if cfg.greedy:
        return logits.argmax(-1)
    if cfg.temperature <= 0:
        raise ValueError(f"temperature must be positive, got {cfg.temperature}")
    logits = fp32_or_wider(logits) / cfg.temperature
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p; the most likely always stays.
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: M6, prefix_tokens: torch.Tensor, images: torch.Tensor | None,
             has_image: torch.Tensor | None, eos_id: int, cfg: SamplingConfig,
             use_cache: bool = True) -> list[list[int]]:
    """Generated target tokens per row (EOS excluded), each row stopping at its own EOS.

    All rows share the prefix length. The whole sequence (prefix + generated tokens, image tokens
    included) never exceeds `max_position_embeddings`, the longest sequence the model was built
    for: generation stops early there rather than overflowing the position table.
    """
    B, plen = prefix_tokens.shape
    max_len = min(plen + cfg.max_new_tokens, model.cfg.max_position_embeddings)
    if plen >= model.cfg.max_position_embeddings:
        raise ValueError(f"prompt of {plen} tokens leaves no room within max_position_embeddings "
                         f"{model.cfg.max_position_embeddings}")
    device = prefix_tokens.device
    prefix_len = torch.full((B,), plen, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        if use_cache:
            dtype = next(model.parameters()).dtype
            cache = KVCache(model.cfg, B, max_len, device, dtype)
            logits, _ = model(prefix_tokens, prefix_len, prefix_len, images, has_image, cache, 0)
        else:
            seq = prefix_tokens
            logits, _ = model(seq, prefix_len, prefix_len, images, has_image)
        for length in range(plen, max_len):  # `length` tokens are in the sequence so far
            token = sample_next(logits[:, -1], cfg, generator)
            for b in (~done & (token != eos_id)).nonzero().flatten().tolist():
                out[b].append(int(token[b]))
            done |= token == eos_id
            if bool(done.all()) or length + 1 == max_len:
                break
            valid_len = torch.full_like(prefix_len, length + 1)
            if use_cache:
                logits, _ = model(token[:, None], prefix_len, valid_len, images, has_image,
                                  cache, length)
            else:
                seq = torch.cat([seq, token[:, None]], dim=1)
                logits, _ = model(seq, prefix_len, valid_len, images, has_image)
    finally:
        model.train(was_training)
    return out


def load_model(load_dir: str, device: str | torch.device = "cpu") -> M6:
    """The M6 of a release (tools/checkpoint/convert.py) or of the latest checkpoint under
    `load_dir` (saved under any parallel layout), rebuilt from its saved model config on one
    device, without torch.distributed."""
    if is_release(load_dir):
        cfg = release_config(load_dir)
    else:
        path, meta = latest_checkpoint(load_dir)
        if "model_config" not in meta:
            raise CheckpointError(f"checkpoint in {load_dir} lacks its model_config; "
                                  "it was not written by megatron_m6 training")
        cfg = model_config_from_dict(meta["model_config"], f"checkpoint in {load_dir}")
    # Inference never drops tokens: capacity depends on the batch, so a token's output would too.
    cfg.moe_capacity_factor = None
    model = M6(cfg)
    if is_release(load_dir):
        load_release_weights(load_dir, model)
    else:
        load_model_weights(path, model)
    return model.to(device).eval()


def _device(model: M6) -> torch.device:
    return next(model.parameters()).device


def caption_images(model: M6, tok, images: list[Image.Image], image_size: int,
                   cfg: SamplingConfig) -> list[str]:
    """One caption per image, generated as one batch from the captioning prefix
    `[IMG]*n [CLS] [SEP]`; images go through the training transform, exactly."""
    device = _device(model)
    prefix = [tok.img_id] * model.cfg.num_image_tokens + [tok.cls_id, tok.sep_id]
    tokens = torch.tensor([prefix] * len(images), dtype=torch.long, device=device)
    pixels = torch.stack([image_to_tensor(img, image_size) for img in images]).to(device)
    has_image = torch.ones(len(images), dtype=torch.bool, device=device)
    rows = generate(model, tokens, pixels, has_image, tok.eos_id, cfg)
    return [tok.decode(ids) for ids in rows]


def continue_text(model: M6, tok, text: str, cfg: SamplingConfig) -> str:
    """The model's target for source `text` (prefix `[CLS] text [SEP]`): a continuation."""
    prefix = [tok.cls_id] + tok.encode(text) + [tok.sep_id]
    tokens = torch.tensor([prefix], dtype=torch.long, device=_device(model))
    return tok.decode(generate(model, tokens, None, None, tok.eos_id, cfg)[0])
