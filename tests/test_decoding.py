"""Beam search against exhaustive search, and the logit penalties against references written out
directly (plain float64 full-sequence forwards, Python loops over tokens).

Models are float64, so that cached and uncached logits (which differ by ~1e-15) cannot swap an
argmax or a ranking: every comparison of winners below also checks that the winner wins by far
more than that.
"""

import dataclasses
import importlib
import itertools

import pytest
import torch

from megatron_m6.config import ModelConfig
from megatron_m6.inference import SamplingConfig, beam_search, generate, sample_next
from megatron_m6.model import M6
from tests.test_generate import NEVER, TINY, prompt, tiny_model

decoding = importlib.import_module("megatron_m6.inference.generate")  # the package's `generate` is the function

# A 4-token vocabulary and 4 new tokens: 1 + 3 + 9 + 27 sequences that end with EOS, 81 cut at the
# length limit. Weights of std 1 make the distributions far from uniform, so that rows prefer
# different lengths; this prompt (seed 2) and EOS id make the rows' best hypotheses end at
# different steps.
SMALL_VOCAB, EOS, STEPS = 4, 2, 4
OTHERS = [t for t in range(SMALL_VOCAB) if t != EOS]
CANDIDATES = ([list(body) + [EOS] for n in range(STEPS) for body in itertools.product(OTHERS, repeat=n)]
              + [list(body) for body in itertools.product(OTHERS, repeat=STEPS)])
# A score gap well above float64 roundoff of sums of a few log-probs of order 1 (~1e-15).
CLEAR_WIN = 1e-9


def small_vocab_model() -> tuple[M6, torch.Tensor]:
    model = M6(ModelConfig(**{**TINY, "vocab_size": SMALL_VOCAB, "init_method_std": 1.0})).double().eval()
    return model, torch.randint(0, SMALL_VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))


def reference_process(logits: torch.Tensor, generated: list[int], eos_id: int, cfg: SamplingConfig) -> torch.Tensor:
    """SamplingConfig's penalties and bans on one row's logits [V], token by token."""
    logits = logits.clone()
    p = cfg.repetition_penalty
    for tok in set(generated):
        logits[tok] = logits[tok] / p if logits[tok] > 0 else logits[tok] * p
    n = cfg.no_repeat_ngram_size
    if n:
        tail = generated[len(generated) - n + 1:]
        for i in range(len(generated) - n + 1):
            if generated[i:i + n - 1] == tail:
                logits[generated[i + n - 1]] = float("-inf")
    if len(generated) < cfg.min_new_tokens and 0 <= eos_id < len(logits):
        logits[eos_id] = float("-inf")
    return logits


@torch.no_grad()
def reference_scores(model: M6, prefix: torch.Tensor, cfg: SamplingConfig) -> list[tuple[float, list[int]]]:
    """(score, candidate) for every candidate continuation of one prompt row [plen], each scored
    from a full forward of the prompt and the candidate: sum of log-probs / length ** penalty."""
    plen, scored = len(prefix), []
    for length in range(1, STEPS + 1):
        cands = [c for c in CANDIDATES if len(c) == length]
        seq = torch.cat([prefix.expand(len(cands), -1), torch.tensor(cands)], dim=1)
        logits, _ = model(seq, torch.full((len(cands),), plen), torch.full((len(cands),), seq.shape[1]))
        for cand, row in zip(cands, logits):
            logp = [reference_process(row[plen - 1 + t], cand[:t], EOS, cfg).log_softmax(-1)[tok]
                    for t, tok in enumerate(cand)]
            scored.append((float(sum(logp)) / length ** cfg.length_penalty, cand))
    return sorted(scored, key=lambda s: s[0], reverse=True)


def count_steps(monkeypatch) -> list[int]:
    """A counter of the model calls decoding makes after the prompt."""
    calls = [0]
    append = decoding.Sequences.append

    def counted(self, token):
        calls[0] += 1
        return append(self, token)

    monkeypatch.setattr(decoding.Sequences, "append", counted)
    return calls


EXHAUSTIVE = {f"length_penalty={lp}": SamplingConfig(length_penalty=lp) for lp in (0.0, 1.0, 2.0)}
EXHAUSTIVE["penalties"] = SamplingConfig(length_penalty=1.0, repetition_penalty=1.5, no_repeat_ngram_size=2,
                                         min_new_tokens=1)


@pytest.mark.parametrize("case", EXHAUSTIVE)
def test_beam_search_is_exhaustive_search(case, monkeypatch):
    """With a beam per candidate nothing is pruned, so beam search must return the best of all
    candidates; it must also stop every row early (before the length limit) and still be exact."""
    model, prefix = small_vocab_model()
    cfg = dataclasses.replace(EXHAUSTIVE[case], max_new_tokens=STEPS, num_beams=len(CANDIDATES))
    steps = count_steps(monkeypatch)
    got = generate(model, prefix, None, None, EOS, cfg)
    assert steps[0] < STEPS - 1  # every row was done before the last step
    assert generate(model, prefix, None, None, EOS, cfg, use_cache=False) == got
    for row, tokens in zip(prefix, got):
        (best, winner), (runner_up, _) = reference_scores(model, row, cfg)[:2]
        assert best - runner_up > CLEAR_WIN
        assert tokens == [t for t in winner if t != EOS]
    assert len({len(tokens) for tokens in got}) > 1  # rows that finish at different lengths


@pytest.mark.parametrize("penalties", [{}, dict(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=3)])
def test_one_beam_is_greedy(penalties):
    """One beam keeps the best non-EOS token and finishes when EOS is the best token: greedy
    decoding, when the score is the plain sum of log-probs (length_penalty 0)."""
    model = tiny_model()
    tokens, images, has_image = prompt(model, with_images=True)
    greedy = SamplingConfig(max_new_tokens=12, **penalties)
    eos = generate(model, tokens, images, has_image, NEVER, greedy)[0][4]  # row 0 makes it mid-way
    expected = generate(model, tokens, images, has_image, eos, greedy)
    assert len({len(row) for row in expected}) > 1  # rows stop at different steps
    one_beam = dataclasses.replace(greedy, length_penalty=0.0)
    for use_cache in (True, False):
        assert beam_search(model, tokens, images, has_image, eos, one_beam, use_cache) == expected


def test_beams_with_images_cached_equals_uncached():
    model = tiny_model()
    tokens, images, has_image = prompt(model, with_images=True)
    cfg = SamplingConfig(max_new_tokens=10, num_beams=3, repetition_penalty=1.2, no_repeat_ngram_size=2)
    eos = generate(model, tokens, images, has_image, NEVER, SamplingConfig(max_new_tokens=10))[1][3]
    cached = generate(model, tokens, images, has_image, eos, cfg)
    assert cached == generate(model, tokens, images, has_image, eos, cfg, use_cache=False)
    assert cached != generate(model, tokens, images[[2, 1, 0]], has_image, eos, cfg)  # the images matter


@torch.no_grad()
def reference_decode(model: M6, tokens: torch.Tensor, eos_id: int, cfg: SamplingConfig) -> list[list[int]]:
    """Greedy or sampled decoding written out: the full sequence through the model every step,
    the penalties applied row by row (reference_process), each row cut at its EOS."""
    generator = torch.Generator().manual_seed(cfg.seed)
    prefix_len = torch.full((tokens.shape[0],), tokens.shape[1])
    generated: list[list[int]] = [[] for _ in tokens]
    for _ in range(cfg.max_new_tokens):
        logits, _ = model(tokens, prefix_len, torch.full_like(prefix_len, tokens.shape[1]))
        processed = torch.stack([reference_process(row, gen, eos_id, cfg)
                                 for row, gen in zip(logits[:, -1], generated)])
        token = sample_next(processed, cfg, generator)
        for gen, t in zip(generated, token.tolist()):
            gen.append(t)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
    return [gen[:gen.index(eos_id)] if eos_id in gen else gen for gen in generated]


def has_repeated_ngram(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) < len(grams)


def check_against_reference(model: M6, tokens: torch.Tensor, eos_id: int, cfg: SamplingConfig) -> list[list[int]]:
    expected = reference_decode(model, tokens, eos_id, cfg)
    for use_cache in (True, False):
        assert generate(model, tokens, None, None, eos_id, cfg, use_cache) == expected
    return expected


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_matches_reference(n):
    model = tiny_model(vocab_size=12)
    tokens, _, _ = prompt(model, with_images=False)
    cfg = SamplingConfig(max_new_tokens=10, no_repeat_ngram_size=n)
    plain = generate(model, tokens, None, None, NEVER, dataclasses.replace(cfg, no_repeat_ngram_size=0))
    assert any(has_repeated_ngram(row, n) for row in plain)  # the ban has something to do
    out = check_against_reference(model, tokens, NEVER, cfg)
    assert not any(has_repeated_ngram(row, n) for row in out)


def test_repetition_penalty_matches_reference():
    model = tiny_model(vocab_size=12)
    tokens, _, _ = prompt(model, with_images=False)
    cfg = SamplingConfig(max_new_tokens=10, repetition_penalty=1.5)
    out = check_against_reference(model, tokens, NEVER, cfg)
    assert out != generate(model, tokens, None, None, NEVER, SamplingConfig(max_new_tokens=10))


def test_min_new_tokens_matches_reference():
    model = tiny_model()
    tokens, _, _ = prompt(model, with_images=False)
    plain = SamplingConfig(max_new_tokens=12)
    eos = generate(model, tokens, None, None, NEVER, plain)[0][1]  # row 0 would stop within 2 tokens
    cfg = dataclasses.replace(plain, min_new_tokens=5)
    out = check_against_reference(model, tokens, eos, cfg)
    assert len(generate(model, tokens, None, None, eos, plain)[0]) < 2
    assert all(len(row) >= 5 for row in out)


def test_sampling_with_penalties_matches_reference():
    model = tiny_model(vocab_size=12)
    tokens, _, _ = prompt(model, with_images=False)
    cfg = SamplingConfig(max_new_tokens=10, greedy=False, temperature=1.5, top_k=8, seed=3,
                         repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=4)
    eos = generate(model, tokens, None, None, NEVER, dataclasses.replace(cfg, min_new_tokens=0))[0][2]
    out = check_against_reference(model, tokens, eos, cfg)
    assert all(len(row) >= 4 and not has_repeated_ngram(row, 2) for row in out)


@pytest.mark.parametrize("bad, match", [
    (dict(num_beams=2, greedy=False), "cannot be combined with sampling"),
    (dict(num_beams=0), "num_beams"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(length_penalty=float("nan")), "length_penalty"),
])
def test_impossible_settings_are_one_error(bad, match):
    model = tiny_model()
    tokens, _, _ = prompt(model, with_images=False)
    with pytest.raises(ValueError, match=match):
        generate(model, tokens, None, None, NEVER, SamplingConfig(**bad))
