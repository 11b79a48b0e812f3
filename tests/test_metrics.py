"""megatron_m6.metrics against the reference implementations (pycocoevalcap 1.2, sacrebleu 2.6.0)
on random Chinese corpora, and against hand-worked float64 examples."""

import math

import numpy as np
import pytest
import sacrebleu
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from megatron_m6.metrics import (
    binary_accuracy,
    caption_metrics,
    matching_accuracy,
    normalize_answer,
    retrieval_recall,
    text_metrics,
    text_tokens,
    vqa_accuracy,
)

VOCAB = list("一只猫狗在草地上跑睡觉两个人骑车红色的白天空下桌子吃饭小孩玩球") + ["dog", "3", "12"]
PUNCTUATION = ["，", "。", "、", "！", " ", ",", "."]
# We add coco-caption's 1e-15/1e-9 terms to BLEU as it does, and sum the same float64 numbers in
# another order, so what is left is roundoff: a few units of 1e-16 relative. 1e-9 leaves room for
# the longest corpora while still catching a missing epsilon, which moves BLEU-4 by ~1e-4.
TOL = 1e-9


def random_text(rng, lo, hi, punctuation=False):
    words = [VOCAB[i] for i in rng.integers(0, len(VOCAB), size=rng.integers(lo, hi + 1))]
    if punctuation:
        words = [w + (PUNCTUATION[rng.integers(len(PUNCTUATION))] if rng.random() < 0.3 else "") for w in words]
    return "".join(words)


def random_corpus(seed, punctuation=False):
    """1..50 images with 1..5 references each; predictions are often empty or very short, and
    sometimes copy a reference so high-order n-grams match."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 51))
    refs = [[random_text(rng, 2, 14, punctuation) for _ in range(rng.integers(1, 6))] for _ in range(n)]
    preds = []
    for image_refs in refs:
        kind = rng.integers(4)
        if kind == 0:
            preds.append(["", "猫", "dog"][rng.integers(3)])
        elif kind == 1:
            preds.append(image_refs[rng.integers(len(image_refs))][: rng.integers(1, 12)])
        else:
            preds.append(random_text(rng, 1, 16, punctuation))
    return preds, refs


def coco_scores(preds, refs):
    gts = {i: [" ".join(text_tokens(r)) for r in image_refs] for i, image_refs in enumerate(refs)}
    res = {i: [" ".join(text_tokens(p))] for i, p in enumerate(preds)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"BLEU-{n + 1}": bleu[n] for n in range(4)}, "ROUGE-L": rouge, "CIDEr": cider}


@pytest.mark.parametrize("seed", range(12))
def test_caption_metrics_equal_pycocoevalcap(seed):
    preds, refs = random_corpus(seed, punctuation=seed % 2 == 1)
    ours, theirs = caption_metrics(preds, refs), coco_scores(preds, refs)
    assert list(ours) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]
    for key in theirs:
        assert ours[key] == pytest.approx(theirs[key], rel=TOL, abs=TOL), key


def test_caption_metrics_one_image_and_exact_copy():
    # One image: every IDF is log(1) - log(1) = 0, so CIDEr is 0 in both.
    preds, refs = ["两只猫在草地上睡觉"], [["两只猫在草地上睡觉", "一只猫"]]
    ours, theirs = caption_metrics(preds, refs), coco_scores(preds, refs)
    for key in theirs:
        assert ours[key] == pytest.approx(theirs[key], rel=TOL, abs=TOL), key
    assert ours["BLEU-4"] == pytest.approx(1.0, abs=1e-8) and ours["ROUGE-L"] == pytest.approx(1.0, abs=1e-15)
    assert ours["CIDEr"] == 0.0


def test_caption_bleu_without_four_gram_matches():
    # No 4-gram matches: coco-caption's 1e-15 makes BLEU-4 about 1e-4, not 0, and we keep that.
    preds, refs = ["两只猫", "一只狗在跑"], [["两只猫在睡觉", "猫"], ["狗在跑"]]
    ours, theirs = caption_metrics(preds, refs), coco_scores(preds, refs)
    assert 1e-5 < theirs["BLEU-4"] < 1e-3
    for key in theirs:
        assert ours[key] == pytest.approx(theirs[key], rel=TOL, abs=TOL), key


def test_caption_metrics_empty():
    zero = dict.fromkeys(["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"], 0.0)
    assert caption_metrics([], []) == zero
    assert caption_metrics(["", "。"], [["猫在跑"], ["狗"]]) == zero
    # coco-caption gives ROUGE-L 1 to an empty caption against an empty reference; we give 0.
    assert caption_metrics([""], [["，"]])["ROUGE-L"] == 0.0


def test_bad_input_raises_one_clear_error():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        caption_metrics(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="non-empty list"):
        caption_metrics(["a"], [[]])
    with pytest.raises(ValueError, match="non-empty list"):
        text_metrics(["a"], ["a"])
    with pytest.raises(ValueError, match="1 predictions but 2"):
        vqa_accuracy(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="predictions but"):
        binary_accuracy([0, 1], [1])
    with pytest.raises(ValueError, match="0 or 1"):
        binary_accuracy([0, 2], [1, 1])
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_recall(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="index the 2 images"):
        retrieval_recall(np.zeros((2, 2)), np.array([0, 2]))


def sacrebleu_score(preds, refs):
    """sacrebleu wants one stream per reference position; None fills in for a missing reference."""
    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    return sacrebleu.corpus_bleu(preds, streams, tokenize="zh").score


@pytest.mark.parametrize("seed", range(12))
def test_text_bleu_equals_sacrebleu(seed):
    preds, refs = random_corpus(100 + seed, punctuation=seed % 3 != 0)
    if seed % 4 == 0:
        refs = [[r + "，还有12.5个dog-3人." for r in image_refs] for image_refs in refs]  # mteval's number rules
    ours = text_metrics(preds, refs)
    # Both sum the same integer counts and take logs of the same precisions: roundoff only.
    assert ours["BLEU"] == pytest.approx(sacrebleu_score(preds, refs), rel=1e-12, abs=1e-12)
    assert ours["ROUGE-L"] == pytest.approx(coco_scores(preds, refs)["ROUGE-L"], rel=TOL, abs=TOL)


def test_text_bleu_short_hypotheses_and_hand_worked():
    # One hypothesis, one reference of 6 tokens: 4/4 unigrams, 3/3 bigrams, 2/2 trigrams, 1/1 4-gram
    # match, brevity penalty exp(1 - 6/4).
    preds, refs = ["两只猫在"], [["两只猫在睡觉"]]
    expected = 100 * math.exp(1 - 6 / 4)
    assert text_metrics(preds, refs)["BLEU"] == pytest.approx(expected, rel=1e-14)
    assert sacrebleu_score(preds, refs) == pytest.approx(expected, rel=1e-14)
    # Too short for any 4-gram: 0 without effective order, as in sacrebleu; no match at all: 0.
    for preds, refs in ((["两只猫"], [["两只猫在睡觉", "两只"]]), (["狗"], [["猫"]]), ([""], [["猫"]])):
        assert text_metrics(preds, refs)["BLEU"] == 0.0 == sacrebleu_score(preds, refs)
    assert text_metrics([], []) == {"BLEU": 0.0, "ROUGE-L": 0.0}


def test_text_tokens():
    assert text_tokens("两只猫，sitting on 3个箱子。") == ["两", "只", "猫", "sitting", "on", "3", "个", "箱", "子"]
    assert text_tokens("ＡＢ１２！ ｄｏｇ5") == ["AB12", "dog5"]  # full-width letters and digits are ASCII
    assert text_tokens("“你好”（hello）《书》、\t\n...") == ["你", "好", "hello", "书"]
    assert text_tokens("") == [] and text_tokens(" 。，!?") == []


def test_normalize_answer_and_vqa_accuracy():
    assert normalize_answer(" 两 只。") == "两只"
    assert normalize_answer("３．５") == "3.5"
    assert normalize_answer("Ｙｅｓ！") == "yes"
    assert normalize_answer("“红色”，（的）《书》？") == "红色的书"
    assert normalize_answer("1,000") == "1000"
    preds = ["两只", "３", "Red!", "", "狗"]
    answers = [["两 只。"], ["三", "3"], ["red"], ["。"], ["猫"]]
    assert vqa_accuracy(preds, answers) == 3 / 5  # the empty prediction never matches
    assert vqa_accuracy([], []) == 0.0


def test_binary_accuracy():
    assert binary_accuracy([1, 0, 1, 1], np.array([1, 1, 1, 0])) == 0.5
    assert binary_accuracy([], []) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_matching_accuracy_equals_comparing_every_pair(seed):
    """Against the definition spelled out pair by pair: a group is right when no distractor
    reaches any matched text's score; scores drawn from a few values, so ties occur."""
    rng = np.random.default_rng(seed)
    n = 60
    scores, labels = rng.integers(0, 4, n).astype(float), rng.integers(0, 2, n)
    groups = [f"image{g}" for g in rng.integers(0, 12, n)]
    right = judged = 0
    for g in sorted(set(groups)):
        rows = [i for i in range(n) if groups[i] == g]
        matched = [i for i in rows if labels[i] == 1]
        distractors = [i for i in rows if labels[i] == 0]
        if matched and distractors:
            judged += 1
            right += all(scores[m] > scores[d] for m in matched for d in distractors)
    assert matching_accuracy(scores, labels, groups) == right / judged


def test_matching_accuracy_hand_worked():
    assert matching_accuracy([0.9, 0.1, 0.5, 0.5, 0.3], [1, 0, 1, 0, 1], ["a", "a", "b", "b", "c"]) == 0.5
    assert matching_accuracy([1.0, 1.0], [1, 0], ["a", "a"]) == 0.0  # a tie is wrong
    assert matching_accuracy([], [], []) == 0.0


def test_retrieval_recall_hand_worked():
    # 3 images; texts 0, 1 belong to image 0, text 2 to image 1, text 3 to image 2.
    scores = np.array([[0.9, 0.2, 0.5, 0.1],
                       [0.3, 0.3, 0.3, 0.8],
                       [0.1, 0.4, 0.6, 0.7]])
    owner = np.array([0, 0, 1, 2])
    r = retrieval_recall(scores, owner, ks=(1, 2))
    # image 0: best own text 0.9 is first -> rank 1. image 1: own 0.3 tied with texts 0, 1 and
    # below text 3 -> rank 4. image 2: own 0.7 is first -> rank 1.
    assert r["i2t_R@1"] == 2 / 3 and r["i2t_R@2"] == 2 / 3
    # text 0: image 0 first (1). text 1: 0.2 below 0.3 and 0.4 (3). text 2: 0.3 below 0.5 and 0.6 (3).
    # text 3: 0.7 below 0.8 (2).
    assert r["t2i_R@1"] == 1 / 4 and r["t2i_R@2"] == 2 / 4
    assert list(r) == ["i2t_R@1", "i2t_R@2", "t2i_R@1", "t2i_R@2"]


def test_retrieval_recall_ties_and_constant_scores():
    owner = np.array([0, 1, 2, 3])
    r = retrieval_recall(np.ones((4, 4)), owner, ks=(1, 3, 4))
    # Every wrong candidate ties with the positive and ranks above it: rank 4 everywhere.
    assert r == {"i2t_R@1": 0.0, "i2t_R@3": 0.0, "i2t_R@4": 1.0, "t2i_R@1": 0.0, "t2i_R@3": 0.0, "t2i_R@4": 1.0}
    # Two own texts tied at the top of their row are not held against each other.
    r = retrieval_recall(np.array([[0.5, 0.5, 0.1], [0.2, 0.2, 0.9]]), np.array([0, 0, 1]), ks=(1,))
    assert r == {"i2t_R@1": 1.0, "t2i_R@1": 1.0}
    # An image that owns no text is a candidate for text->image only.
    r = retrieval_recall(np.array([[0.9], [0.1]]), np.array([0]), ks=(1,))
    assert r == {"i2t_R@1": 1.0, "t2i_R@1": 1.0}
    assert retrieval_recall(np.zeros((2, 0)), np.zeros(0, dtype=int), ks=(1,)) == {"i2t_R@1": 0.0, "t2i_R@1": 0.0}
