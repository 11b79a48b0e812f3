"""Autoregressive generation from a trained M6: captions for images, continuations for text.

A prompt is the prefix of a training sample (`[IMG]*n [CLS] source [SEP]`); the model then writes
the target one token at a time until `[EOS]`, exactly as the prefix-LM loss taught it. With a KV
cache each new token costs one position of compute instead of re-running the whole sequence.

Each step's logits first go through the penalties and bans of `SamplingConfig` (repetition
penalty, no-repeat n-grams, minimum length), which look at the tokens generated so far in that
row (or beam), never at the prompt; then greedy decoding takes the argmax, sampling draws, and
beam search adds the log-probabilities of the processed logits to each beam's score.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from megatron_m6.conversion import is_release, load_release_weights, model_config_from_dict, release_config
from megatron_m6.data.dataset import image_to_tensor
from megatron_m6.model import M6, KVCache
from megatron_m6.parallel.initialisation import materialize
from megatron_m6.precision import fp32_or_wider
from megatron_m6.training.checkpoint import CheckpointError, latest_checkpoint, load_model_weights

NEG_INF = float("-inf")


@dataclass
class SamplingConfig:
    """How to pick each next token: greedy argmax, sampling with temperature, top-k, top-p, or
    beam search (num_beams > 1, deterministic); and what the logits are penalised for first."""

    max_new_tokens: int = 32
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0  # 1.0: no nucleus filtering
    seed: int = 0
    num_beams: int = 1  # 1: no beam search
    length_penalty: float = 1.0  # beam score = sum of log-probs / length ** length_penalty
    no_repeat_ngram_size: int = 0  # n > 0: never repeat an n-gram of the generated tokens
    repetition_penalty: float = 1.0  # p > 1 discourages tokens already generated (CTRL's rule)
    min_new_tokens: int = 0  # EOS is banned until this many tokens are generated

    def validate(self) -> None:
        """One ValueError naming the first impossible setting."""
        checks = [
            (self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}"),
            (self.temperature > 0, f"temperature must be positive, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}"),
            (self.num_beams == 1 or self.greedy,
             "beam search (num_beams > 1) is deterministic: it cannot be combined with sampling"),
            (math.isfinite(self.length_penalty), f"length_penalty must be finite, got {self.length_penalty}"),
            (self.no_repeat_ngram_size >= 0, f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}"),
            (0 < self.repetition_penalty < math.inf,
             f"repetition_penalty must be positive and finite, got {self.repetition_penalty}"),
            (self.min_new_tokens >= 0, f"min_new_tokens must be >= 0, got {self.min_new_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


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
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p; the most likely always stays.
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), NEG_INF)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def ngram_bans(generated: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """[N, V] True where a token would complete an n-gram that row's generated tokens [N, L]
    already hold: the row's last n-1 tokens followed by that token."""
    N, L = generated.shape
    if L < n:
        return torch.zeros(N, vocab_size, dtype=torch.bool, device=generated.device)
    grams = generated.unfold(1, n, 1)  # [N, L - n + 1, n]
    match = (grams[:, :, :-1] == generated[:, None, L - n + 1:]).all(-1)
    hits = torch.zeros(N, vocab_size, dtype=torch.long, device=generated.device)
    return hits.scatter_add_(1, grams[:, :, -1], match.long()) > 0


def process_logits(logits: torch.Tensor, generated: torch.Tensor, eos_id: int,
                   cfg: SamplingConfig) -> torch.Tensor:
    """Next-token logits [N, V] (in fp32 or wider) with cfg's penalties and bans applied, given
    each row's generated tokens [N, L]: the repetition penalty divides a positive logit of a
    token already generated by p and multiplies a negative one by p; banned tokens get -inf."""
    logits = fp32_or_wider(logits)
    vocab_size = logits.shape[-1]
    if cfg.repetition_penalty != 1.0 and generated.shape[1] > 0:
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, generated, True)
        p = cfg.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if cfg.no_repeat_ngram_size > 0:
        logits = logits.masked_fill(ngram_bans(generated, cfg.no_repeat_ngram_size, vocab_size), NEG_INF)
    if generated.shape[1] < cfg.min_new_tokens:
        logits = logits.masked_fill(torch.arange(vocab_size, device=logits.device) == eos_id, NEG_INF)
    return logits


class Sequences:
    """The N sequences being decoded, as the model sees them: the prompt is read at construction,
    then `append` adds one token per sequence and returns the next logits [N, V]. With the KV
    cache a step computes one position; without it the whole sequence runs again (the
    reference the cache must match). `reorder` follows beam search's choice of beams."""

    def __init__(self, model: M6, prefix_tokens: torch.Tensor, images: torch.Tensor | None,
                 has_image: torch.Tensor | None, max_len: int, use_cache: bool, prefix_len: int | None = None):
        """`prefix_len`: the prompt's bidirectional part, all of it by default; text-to-image's
        prompt ends with [BOI], which training read causally, as the first token of the target."""
        B, plen = prefix_tokens.shape
        device = prefix_tokens.device
        dtype = model.embedding.word_emb.weight.dtype  # the activations' dtype (bf16 when loaded so)
        self.model, self.length = model, plen
        self.prefix_len = torch.full((B,), plen if prefix_len is None else prefix_len, dtype=torch.long, device=device)
        self.has_image = torch.zeros(B, dtype=torch.bool, device=device) if has_image is None else has_image
        self.images = None if images is None else images.to(dtype)
        self.cache = KVCache(model.cfg, B, max_len, device, dtype) if use_cache else None
        self.tokens = prefix_tokens
        logits, _ = model(prefix_tokens, self.prefix_len, torch.full_like(self.prefix_len, plen), self.images,
                          self.has_image, self.cache, 0)
        self.logits = logits[:, -1]
        if use_cache:  # the cache holds the prompt now: images and tokens are needed no more
            self.images = self.tokens = None

    def append(self, token: torch.Tensor) -> torch.Tensor:
        valid_len = torch.full_like(self.prefix_len, self.length + 1)
        if self.cache is not None:
            logits, _ = self.model(token[:, None], self.prefix_len, valid_len, None, self.has_image,
                                   self.cache, self.length)
        else:
            self.tokens = torch.cat([self.tokens, token[:, None]], dim=1)
            logits, _ = self.model(self.tokens, self.prefix_len, valid_len, self.images, self.has_image)
        self.length += 1
        return logits[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        """Sequence i becomes the old sequence index[i]: every layer's K/V rows follow."""
        self.prefix_len, self.has_image = self.prefix_len[index], self.has_image[index]
        if self.cache is not None:
            for layer in self.cache.layers:
                layer.k, layer.v = layer.k.index_select(0, index), layer.v.index_select(0, index)
        else:
            self.tokens = self.tokens.index_select(0, index)
            if self.images is not None:
                self.images = self.images.index_select(0, index)


def _sample(seqs: Sequences, eos_id: int, cfg: SamplingConfig, steps: int) -> list[list[int]]:
    """Greedy or sampled decoding, each row stopping at its own EOS."""
    B, device = len(seqs.prefix_len), seqs.prefix_len.device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    generated = torch.zeros(B, 0, dtype=torch.long, device=device)
    logits = seqs.logits
    for step in range(steps):
        token = sample_next(process_logits(logits, generated, eos_id, cfg), cfg, generator)
        for b in (~done & (token != eos_id)).nonzero().flatten().tolist():
            out[b].append(int(token[b]))
        done |= token == eos_id
        generated = torch.cat([generated, token[:, None]], dim=1)
        if bool(done.all()) or step + 1 == steps:
            break
        logits = seqs.append(token)
    return out


def _keep_best(best: torch.Tensor, out: list[list[int]], scores: torch.Tensor, seqs: torch.Tensor) -> None:
    """Per row, keep the best finished hypothesis: scores [B, K] of the token sequences [B, K, L]
    offered, best [B] the score of out's hypothesis (a tie keeps the earlier one)."""
    top, k = scores.max(1)
    for b in (top > best).nonzero().flatten().tolist():
        best[b] = top[b]
        out[b] = seqs[b, k[b]].tolist()


def _best_possible(sums: torch.Tensor, length: int, steps: int, length_penalty: float) -> torch.Tensor:
    """The best final score [B] any live beam can still reach, given beam sums [B, K] of `length`
    tokens: log-probs are <= 0, so a sum only falls, and s / l ** length_penalty (s <= 0) is
    monotone in the final length l, best at one end of [length + 1, steps]."""
    shortest = sums / (length + 1) ** length_penalty
    longest = sums / steps ** length_penalty
    return torch.maximum(shortest, longest).amax(1)


def _beam_search(seqs: Sequences, eos_id: int, cfg: SamplingConfig, steps: int) -> list[list[int]]:
    """Beam search, per row, over hypotheses scored sum(log p) / length ** length_penalty, where
    length counts the generated tokens with the EOS; a hypothesis still unfinished after `steps`
    tokens is scored at length `steps`, without EOS.

    As in HF's beam search, an EOS expansion becomes a finished hypothesis when it is among the
    row's num_beams best expansions, and the num_beams best non-EOS expansions live on (so one
    beam is greedy decoding when length_penalty is 0). A row is done once its best finished
    score is at least the best score any live beam can still reach (`_best_possible`): exact,
    the result is the one running every row to `steps` would give. Scores are float64."""
    K, lp = cfg.num_beams, cfg.length_penalty
    B, device = len(seqs.prefix_len), seqs.prefix_len.device
    rows = torch.arange(B, device=device)[:, None]
    seqs.reorder(torch.arange(B, device=device).repeat_interleave(K))
    logits = seqs.logits.repeat_interleave(K, 0)
    sums = torch.full((B, K), NEG_INF, dtype=torch.float64, device=device)
    sums[:, 0] = 0.0  # the K beams of a row start identical: only the first expands
    generated = torch.zeros(B * K, 0, dtype=torch.long, device=device)
    best = torch.full((B,), NEG_INF, dtype=torch.float64, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(steps):
        logp = process_logits(logits, generated, eos_id, cfg).log_softmax(-1)
        logp = logp.masked_fill(logp.isnan(), NEG_INF).view(B, K, -1)  # NaN: every token banned
        V = logp.shape[-1]
        expansions = (sums[..., None] + logp).view(B, K * V)
        is_eos = torch.arange(K * V, device=device) % V == eos_id
        top, idx = expansions.topk(K, dim=1)
        ended = torch.where(is_eos[idx] & ~done[:, None], top / (step + 1) ** lp, NEG_INF)
        _keep_best(best, out, ended, generated.view(B, K, step)[rows, idx // V])
        sums, idx = expansions.masked_fill(is_eos, NEG_INF).topk(K, dim=1)
        origin, token = (rows * K + idx // V).flatten(), (idx % V).flatten()
        generated = torch.cat([generated[origin], token[:, None]], dim=1)
        if step + 1 == steps:
            cut = (sums / steps ** lp).masked_fill(done[:, None], NEG_INF)
            _keep_best(best, out, cut, generated.view(B, K, steps))
            break
        done |= best >= _best_possible(sums, step + 1, steps, lp)
        if bool(done.all()):
            break
        seqs.reorder(origin)
        logits = seqs.append(token)
    return out


def _decode(model: M6, prefix_tokens: torch.Tensor, images: torch.Tensor | None,
            has_image: torch.Tensor | None, eos_id: int, cfg: SamplingConfig, use_cache: bool,
            search: Callable[[Sequences, int, SamplingConfig, int], list[list[int]]]) -> list[list[int]]:
    """Run `search` (_sample or _beam_search) in eval mode within the position limit."""
    cfg.validate()
    plen = prefix_tokens.shape[1]
    if plen >= model.cfg.max_position_embeddings:
        raise ValueError(f"prompt of {plen} tokens leaves no room within max_position_embeddings "
                         f"{model.cfg.max_position_embeddings}")
    steps = min(cfg.max_new_tokens, model.cfg.max_position_embeddings - plen)
    was_training = model.training
    model.eval()
    try:
        seqs = Sequences(model, prefix_tokens, images, has_image, plen + steps, use_cache)
        return search(seqs, eos_id, cfg, steps)
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(model: M6, prefix_tokens: torch.Tensor, images: torch.Tensor | None,
             has_image: torch.Tensor | None, eos_id: int, cfg: SamplingConfig,
             use_cache: bool = True) -> list[list[int]]:
    """Generated target tokens per row (EOS excluded), each row stopping at its own EOS; with
    cfg.num_beams > 1, the best finished hypothesis of the row's beam search.

    All rows share the prefix length. The whole sequence (prefix + generated tokens, image tokens
    included) never exceeds `max_position_embeddings`, the longest sequence the model was built
    for: generation stops early there rather than overflowing the position table.
    """
    search = _beam_search if cfg.num_beams > 1 else _sample
    return _decode(model, prefix_tokens, images, has_image, eos_id, cfg, use_cache, search)


@torch.no_grad()
def beam_search(model: M6, prefix_tokens: torch.Tensor, images: torch.Tensor | None,
                has_image: torch.Tensor | None, eos_id: int, cfg: SamplingConfig,
                use_cache: bool = True) -> list[list[int]]:
    """`generate` by beam search whatever cfg.num_beams is, one beam included."""
    return _decode(model, prefix_tokens, images, has_image, eos_id, cfg, use_cache, _beam_search)


def _checkpoint_config(load_dir: str):
    if is_release(load_dir):
        return release_config(load_dir), None
    path, meta = latest_checkpoint(load_dir)
    if "model_config" not in meta:
        raise CheckpointError(f"checkpoint in {load_dir} lacks its model_config; "
                              "it was not written by megatron_m6 training")
    return model_config_from_dict(meta["model_config"], f"checkpoint in {load_dir}"), path


def _cast(model: M6, dtype: torch.dtype) -> None:
    """Weights to `dtype`, except the norms': LayerNorm and BatchNorm (weights and running
    statistics) stay fp32, as in training (megatron_m6/precision.py)."""
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
            module.float()


def load_model(load_dir: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> M6:
    """The M6 of a release (tools/checkpoint/convert.py) or of the latest checkpoint under
    `load_dir` (saved under any parallel layout), rebuilt from its saved model config on one
    device, without torch.distributed.

    The model is built on the meta device and allocated on `device` (in `dtype`, see `_cast`)
    with the saved weights read straight into place: no random initialisation, no second copy.
    Every tensor of M6 is in its state dict (the rotary frequencies are computed per call), so
    nothing is left to recompute."""
    cfg, path = _checkpoint_config(load_dir)
    # Inference never drops tokens: capacity depends on the batch, so a token's output would too.
    cfg.moe_capacity_factor = None
    with torch.device("meta"):
        model = M6(cfg)
    if dtype is not None:
        _cast(model, dtype)
    if {name for name, _ in model.named_buffers()} - set(model.state_dict()):
        raise NotImplementedError("M6 has non-persistent buffers now: load_model must recompute them")
    materialize(model, cfg, torch.device(device), seed=0, init=False)
    if path is None:
        load_release_weights(load_dir, model)
    else:
        load_model_weights(path, model)
    return model.eval()


def model_device(model: M6) -> torch.device:
    return next(model.parameters()).device


def caption_images(model: M6, tok, images: list[Image.Image], image_size: int,
                   cfg: SamplingConfig) -> list[str]:
    """One caption per image, generated as one batch from the captioning prefix
    `[IMG]*n [CLS] [SEP]`; images go through the training transform, exactly."""
    device = model_device(model)
    prefix = [tok.img_id] * model.cfg.num_image_tokens + [tok.cls_id, tok.sep_id]
    tokens = torch.tensor([prefix] * len(images), dtype=torch.long, device=device)
    pixels = torch.stack([image_to_tensor(img, image_size) for img in images]).to(device)
    has_image = torch.ones(len(images), dtype=torch.bool, device=device)
    rows = generate(model, tokens, pixels, has_image, tok.eos_id, cfg)
    return [tok.decode(ids) for ids in rows]


def continue_text(model: M6, tok, text: str, cfg: SamplingConfig) -> str:
    """The model's target for source `text` (prefix `[CLS] text [SEP]`): a continuation."""
    prefix = [tok.cls_id] + tok.encode(text) + [tok.sep_id]
    tokens = torch.tensor([prefix], dtype=torch.long, device=model_device(model))
    return tok.decode(generate(model, tokens, None, None, tok.eos_id, cfg)[0])


def add_decoding_flags(p: argparse.ArgumentParser) -> None:
    """The decoding flags of tools/generate.py and megatron_m6.evaluate, as one group of `p`."""
    g = p.add_argument_group("decoding")
    g.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    g.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=float, help="sample from the nucleus of probability p")
    g.add_argument("--temperature", type=float, help="sampling temperature")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams per input (1: off)")
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = sum of log-probs / length ** this (0: raw sum; larger favours longer)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help="never generate an n-gram of this size twice (0: off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages tokens already generated (CTRL's rule; 1: off)")
    g.add_argument("--min-new-tokens", type=int, default=0, help="no EOS before this many tokens")


def sampling_config_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> SamplingConfig:
    """The SamplingConfig of add_decoding_flags' flags: greedy unless a sampling flag is given;
    contradictory or impossible values are usage errors of `p`."""
    sampling = any(v is not None for v in (args.top_k, args.top_p, args.temperature))
    if args.greedy and sampling:
        p.error("--greedy contradicts --top-k/--top-p/--temperature")
    if args.num_beams > 1 and sampling:
        p.error("--num-beams (beam search, deterministic) contradicts --top-k/--top-p/--temperature")
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, greedy=not sampling,
                         temperature=1.0 if args.temperature is None else args.temperature,
                         top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p,
                         seed=args.seed, num_beams=args.num_beams, length_penalty=args.length_penalty,
                         no_repeat_ngram_size=args.no_repeat_ngram_size,
                         repetition_penalty=args.repetition_penalty, min_new_tokens=args.min_new_tokens)
    if cfg.temperature <= 0 or cfg.top_k < 0 or not 0 < cfg.top_p <= 1 or cfg.max_new_tokens < 1:
        p.error("need --temperature > 0, --top-k >= 0, 0 < --top-p <= 1, --max-new-tokens >= 1")
    if cfg.num_beams < 1 or cfg.no_repeat_ngram_size < 0 or cfg.min_new_tokens < 0:
        p.error("need --num-beams >= 1, --no-repeat-ngram-size >= 0, --min-new-tokens >= 0")
    if not 0 < cfg.repetition_penalty < math.inf or not math.isfinite(cfg.length_penalty):
        p.error("need --repetition-penalty > 0 and a finite --length-penalty")
    return cfg
