import numpy as np
import pytest

from megatron_m6.data.task_spec import IMAGE_TASKS, TASK_NAMES, min_seq_length
from megatron_m6.data.tasks import build_sample, span_corrupt
from tests.conftest import FakeTokenizer

TOK = FakeTokenizer()
SENTINELS = TOK.sentinel_ids


def random_text(rng, n):
    return rng.integers(108, TOK.vocab_size, n).tolist()


def split_target(target):
    """Sentinel -> its span, checking the target is sentinels in order each followed by a span."""
    spans, current = {}, None
    for t in target:
        if t in SENTINELS:
            assert t == SENTINELS[len(spans)], "sentinels out of order in target"
            current = spans[t] = []
        else:
            current.append(t)
    assert all(spans.values()), "empty span"
    return spans


def reconstruct(source, target):
    spans = split_target(target)
    assert [t for t in source if t in SENTINELS] == list(spans), "source/target sentinels differ"
    out = []
    for t in source:
        out += spans[t] if t in SENTINELS else [t]
    return out


def test_span_corrupt_reconstructs_for_all_lengths():
    rng = np.random.default_rng(0)
    for n in range(2, 201):
        for seed in range(3):
            text = random_text(rng, n)
            source, target = span_corrupt(text, np.random.default_rng([seed, n]), SENTINELS)
            assert reconstruct(source, target) == text
            assert 1 <= len(target) - len(split_target(target)) < n  # some noise, some clean
            for a, b in zip(source, source[1:]):
                assert not (a in SENTINELS and b in SENTINELS), "adjacent spans"


def test_span_corrupt_statistics():
    rng = np.random.default_rng(1)
    fractions, noise, spans, lengths = [], 0, 0, set()
    starts_with_noise = ends_with_noise = 0
    for _ in range(300):
        n = int(rng.integers(100, 300))
        source, target = span_corrupt(random_text(rng, n), rng, SENTINELS)
        found = split_target(target)
        k = sum(map(len, found.values()))
        fractions.append(k / n)
        noise, spans = noise + k, spans + len(found)
        lengths |= {len(s) for s in found.values()}
        starts_with_noise += source[0] in SENTINELS
        ends_with_noise += source[-1] in SENTINELS
    # A fixed draw (default_rng(1), the same on every CPU) of ~60,000 tokens in ~3,000 spans:
    # the noise fraction and the mean span length land well inside these bounds.
    assert abs(np.mean(fractions) - 0.15) < 0.01
    assert abs(noise / spans - 3.0) < 0.2
    assert len(lengths) > 3  # span lengths are random, not all 3
    assert starts_with_noise > 0 and ends_with_noise > 0  # placement covers both ends


def check_layout(s, task, seq_length, n_img):
    """The invariants the model relies on; returns (source, target)."""
    n_img = n_img if task in IMAGE_TASKS else 0
    assert s.task == task
    assert len(s.tokens) <= seq_length
    assert s.tokens[:n_img] == [TOK.img_id] * n_img
    assert s.tokens[n_img] == TOK.cls_id
    assert s.tokens[s.prefix_len - 1] == TOK.sep_id
    assert s.tokens[-1] == TOK.eos_id
    body = s.tokens[n_img + 1:s.prefix_len - 1] + s.tokens[s.prefix_len:-1]
    assert not {TOK.img_id, TOK.cls_id, TOK.sep_id, TOK.eos_id, TOK.pad_id} & set(body)
    return s.tokens[n_img + 1:s.prefix_len - 1], s.tokens[s.prefix_len:-1]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_layout_and_truncation(task):
    seq_length, n_img = 40, 9
    rng = np.random.default_rng(2)
    image = object()
    for n in [2, 3, 5, 10, 20, 28, 29, 30, 60, 500]:
        for _ in range(5):
            text = random_text(rng, n)
            s = build_sample(task, text, TOK, rng, seq_length, n_img, image)
            source, target = check_layout(s, task, seq_length, n_img)
            assert s.image is image
            if task in ("text_denoising", "mm_denoising"):
                original = reconstruct(source, target)
            else:
                original = source + target
            assert original == text[:len(original)]  # truncated from the end, never reordered
            room = seq_length - 3 - (n_img if task in IMAGE_TASKS else 0)
            if n >= room:  # long texts fill the sequence (span corruption: up to its sentinels)
                assert len(s.tokens) >= seq_length - (6 if "denoising" in task else 0)
            else:
                assert len(original) == n
            if task in ("prefix_lm", "mm_prefix_lm"):
                assert source and target
            if task == "captioning":
                assert source == [] and s.prefix_len == n_img + 2


def test_captioning_target_is_caption():
    caption = TOK.encode("我们的猫")
    s = build_sample("captioning", caption, TOK, np.random.default_rng(0), 32, 4, "a.jpg")
    assert s.tokens == [TOK.img_id] * 4 + [TOK.cls_id, TOK.sep_id] + caption + [TOK.eos_id]
    assert s.prefix_len == 6 and s.image == "a.jpg"


def test_prefix_lm_cut_points_vary():
    text = random_text(np.random.default_rng(3), 10)
    cuts = {build_sample("prefix_lm", text, TOK, np.random.default_rng(i), 64, 4).prefix_len
            for i in range(100)}
    assert cuts == set(range(1 + 1 + 1, 1 + 10 + 1))  # [CLS] + 1..9 source tokens + [SEP]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_min_seq_length_is_tight(task):
    rng = np.random.default_rng(4)
    need = min_seq_length(task, 9)
    check_layout(build_sample(task, random_text(rng, 50), TOK, rng, need, 9), task, need, 9)
    with pytest.raises(ValueError, match=task):
        build_sample(task, random_text(rng, 50), TOK, rng, need - 1, 9)


def test_errors():
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="unknown task"):
        build_sample("translation", [110, 111], TOK, rng, 32, 4)
    with pytest.raises(ValueError, match="at least 2"):
        build_sample("prefix_lm", [110], TOK, rng, 32, 4)
    with pytest.raises(ValueError, match="at least 2"):
        span_corrupt([110], rng, SENTINELS)
