"""Downstream evaluation metrics: captioning, VQA, text generation, classification, retrieval.

Captions are scored the way coco-caption (pycocoevalcap) scores them and text generation the way
sacreBLEU scores it, so our numbers compare with published ones; both are implemented here from the
metrics' definitions (plain Python and float64 numpy) and checked against the libraries in
tests/test_metrics.py. Chinese text has no spaces, so every metric tokenises with `text_tokens`
(one token per character), except text BLEU, which follows sacreBLEU's "zh" tokeniser.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

import numpy as np

# CJK ideographs (Extension A, the main block, compatibility ideographs, Extensions B-H) and "〇".
_CJK = "\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
# One CJK character, or a run of other letters and digits (\w without "_" and without CJK).
_TOKEN_RE = re.compile(f"[{_CJK}]|(?:(?![{_CJK}])[^\\W_])+")
_MAX_ORDER = 4
# coco-caption's BLEU adds these to the matches and to the counts of every order, so that an order
# without matches gives a tiny score rather than log(0); kept so our numbers equal theirs.
_COCO_TINY, _COCO_SMALL = 1e-15, 1e-9
_ROUGE_BETA = 1.2
_CIDER_SIGMA = 6.0
# Characters that sacreBLEU's "zh" tokeniser splits off as tokens of their own. Its table compares
# one-character strings with ranges whose ends are written as "\u20000"-style two-character strings,
# so what it really covers is U+2001..U+2A6D and U+2F81..U+2FA1 (not Extension B); we use that.
_SACREBLEU_ZH_RANGES = ((0x3400, 0x4DB5), (0x4E00, 0x9FBB), (0xF900, 0xFA2D), (0xFA30, 0xFA6A),
                        (0xFA70, 0xFAD9), (0x2001, 0x2A6D), (0x2F81, 0x2FA1), (0xFF00, 0xFFEF),
                        (0x2E80, 0x2EFF), (0x3000, 0x303F), (0x31C0, 0x31EF), (0x2F00, 0x2FDF),
                        (0x2FF0, 0x2FFF), (0x3100, 0x312F), (0x31A0, 0x31BF), (0xFE10, 0xFE1F),
                        (0xFE30, 0xFE4F), (0x2600, 0x26FF), (0x2700, 0x27BF), (0x3200, 0x32FF),
                        (0x3300, 0x33FF))
# mteval-v13a's tokenisation of the non-Chinese rest, as four substitutions applied in order.
_V13A_SYMBOLS = "{|}~[\\]^_` !\"#$%&()*+:;<=>?@/"
_V13A_RULES = ((re.compile(f"([{re.escape(_V13A_SYMBOLS)}])"), r" \1 "),
               (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period, comma after a non-digit
               (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period, comma before a non-digit
               (re.compile(r"([0-9])(-)"), r"\1 \2 "))  # dash after a digit
_ASCII_PUNCTUATION = frozenset(string.punctuation)
_DECIMAL_POINT_RE = re.compile(r"(?<=\d)\.(?=\d)")


def _check_lengths(what: str, predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{what}: {len(predictions)} predictions but {len(references)} reference lists; "
                         "there must be one per prediction")


def _check_references(what: str, references: Sequence[Sequence[str]]) -> None:
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"{what}: references[{i}] must be a non-empty list of strings, got {refs!r}")


# ---------------------------------------------------------------- tokenisation and n-grams


def text_tokens(text: str) -> list[str]:
    """Chinese evaluation tokens: after NFKC (full-width letters and digits read as ASCII), every
    CJK ideograph is one token, a run of other letters and digits (Latin words, numbers) is one
    token, and whitespace, punctuation (ASCII and full-width/CJK) and symbols are dropped.

    Characters are the unit because Chinese has no spaces and a word segmenter would make scores
    depend on its dictionary; e.g. "两只猫，sitting on 3个箱子。" -> 两 只 猫 sitting on 3 个 箱 子.
    """
    return _TOKEN_RE.findall(unicodedata.normalize("NFKC", text))


def _ngrams(tokens: Sequence[str], max_order: int = _MAX_ORDER) -> Counter:
    """Counts of every n-gram of the tokens, 1 <= n <= max_order, as tuples."""
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def _closest_length(hyp_len: int, ref_lens: Sequence[int]) -> int:
    """The reference length closest to the hypothesis' (the shorter one on a tie): BLEU's 'closest'."""
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))


def _bleu_statistics(hyps: Sequence[list[str]], refs: Sequence[Sequence[list[str]]]
                     ) -> tuple[int, int, list[int], list[int]]:
    """Corpus sums of hypothesis length, closest reference length, clipped n-gram matches (a
    hypothesis n-gram counts at most as often as in the reference that has it most) and n-grams."""
    hyp_len = ref_len = 0
    correct, total = [0] * _MAX_ORDER, [0] * _MAX_ORDER
    for hyp, hyp_refs in zip(hyps, refs):
        max_ref_counts: Counter = Counter()
        for ref in hyp_refs:
            max_ref_counts |= _ngrams(ref)  # | keeps the larger count of each n-gram
        for ngram, count in _ngrams(hyp).items():
            correct[len(ngram) - 1] += min(count, max_ref_counts[ngram])
        for n in range(1, _MAX_ORDER + 1):
            total[n - 1] += max(0, len(hyp) - n + 1)
        hyp_len += len(hyp)
        ref_len += _closest_length(len(hyp), [len(r) for r in hyp_refs])
    return hyp_len, ref_len, correct, total


# ---------------------------------------------------------------- captions (coco-caption)


def _coco_bleu(hyps: Sequence[list[str]], refs: Sequence[Sequence[list[str]]]) -> list[float]:
    """Corpus BLEU-1..4 as coco-caption computes it: geometric mean of the clipped precisions with
    its tiny additive terms, times the brevity penalty exp(1 - r/c) when the corpus is short."""
    hyp_len, ref_len, correct, total = _bleu_statistics(hyps, refs)
    ratio = (hyp_len + _COCO_TINY) / (ref_len + _COCO_SMALL)
    penalty = math.exp(1.0 - 1.0 / ratio) if ratio < 1.0 else 1.0
    scores, product = [], 1.0
    for n in range(_MAX_ORDER):
        product *= (correct[n] + _COCO_TINY) / (total[n] + _COCO_SMALL)
        scores.append(product ** (1.0 / (n + 1)) * penalty)
    return scores


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, by dynamic programming over one row at a time."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def _rouge_l(hyp: list[str], refs: Sequence[list[str]]) -> float:
    """ROUGE-L F-measure (beta 1.2) of one hypothesis, as coco-caption defines it with several
    references: the best precision and the best recall over the references, then F of the two.
    An empty hypothesis scores 0 (coco-caption gives 1 when a reference is empty too)."""
    if not hyp:
        return 0.0
    lcs = [_lcs_length(hyp, ref) for ref in refs]
    precision = max(m / len(hyp) for m in lcs)
    recall = max(m / len(ref) if ref else 0.0 for m, ref in zip(lcs, refs))
    if precision == 0.0 or recall == 0.0:
        return 0.0
    return (1 + _ROUGE_BETA ** 2) * precision * recall / (recall + _ROUGE_BETA ** 2 * precision)


def _mean_rouge_l(hyps: Sequence[list[str]], refs: Sequence[Sequence[list[str]]]) -> float:
    return sum(_rouge_l(h, r) for h, r in zip(hyps, refs)) / len(hyps) if hyps else 0.0


def _tfidf(counts: Counter, log_docs: float, doc_freq: Counter) -> tuple[list[dict], np.ndarray]:
    """TF-IDF vector of each n-gram order and its norm; an n-gram no reference has gets df 1."""
    vectors: list[dict] = [{} for _ in range(_MAX_ORDER)]
    for ngram, tf in counts.items():
        vectors[len(ngram) - 1][ngram] = tf * (log_docs - math.log(max(1.0, doc_freq[ngram])))
    norms = np.array([math.sqrt(sum(w * w for w in v.values())) for v in vectors], dtype=np.float64)
    return vectors, norms


def _cider_d(hyps: Sequence[list[str]], refs: Sequence[Sequence[list[str]]]) -> float:
    """CIDEr-D as coco-caption computes it, averaged over images.

    Per n-gram order, the cosine of TF-IDF vectors (IDF from the references of the evaluated set,
    counting images) with the hypothesis weights clipped at the reference's, times a Gaussian
    penalty on the length difference (sigma 6); the mean over orders 1..4 and over references,
    times 10. Like coco-caption, a caption's length is its number of bigrams (words minus one)."""
    if not hyps:
        return 0.0
    doc_freq: Counter = Counter()
    for image_refs in refs:
        doc_freq.update(set().union(*(_ngrams(r) for r in image_refs)))
    log_docs = math.log(len(refs))
    total = 0.0
    for hyp, image_refs in zip(hyps, refs):
        hyp_vec, hyp_norm = _tfidf(_ngrams(hyp), log_docs, doc_freq)
        image_score = np.zeros(_MAX_ORDER, dtype=np.float64)
        for ref in image_refs:
            ref_vec, ref_norm = _tfidf(_ngrams(ref), log_docs, doc_freq)
            delta = max(0, len(hyp) - 1) - max(0, len(ref) - 1)
            penalty = math.exp(-delta * delta / (2 * _CIDER_SIGMA ** 2))
            for n in range(_MAX_ORDER):
                dot = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, w in hyp_vec[n].items())
                if hyp_norm[n] != 0.0 and ref_norm[n] != 0.0:
                    dot /= hyp_norm[n] * ref_norm[n]
                image_score[n] += dot * penalty
        total += float(image_score.mean()) / len(image_refs) * 10.0
    return total / len(hyps)


def caption_metrics(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU-1..4 (corpus), ROUGE-L and CIDEr(-D) of captions, on `text_tokens`, computed as
    coco-caption computes them (fractions; CIDEr 0..10). Every image needs at least one reference;
    an empty corpus scores 0."""
    _check_lengths("caption_metrics", predictions, references)
    _check_references("caption_metrics", references)
    hyps = [text_tokens(p) for p in predictions]
    refs = [[text_tokens(r) for r in image_refs] for image_refs in references]
    bleu = _coco_bleu(hyps, refs) if hyps else [0.0] * _MAX_ORDER
    scores = {f"BLEU-{n + 1}": bleu[n] for n in range(_MAX_ORDER)}
    scores["ROUGE-L"] = _mean_rouge_l(hyps, refs)
    scores["CIDEr"] = _cider_d(hyps, refs)
    return scores


# ---------------------------------------------------------------- text generation (sacreBLEU)


def _is_sacrebleu_zh_char(char: str) -> bool:
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _SACREBLEU_ZH_RANGES)


def _sacrebleu_zh_tokens(text: str) -> list[str]:
    """sacreBLEU's "zh" tokenisation: each Chinese character (its table, punctuation and full-width
    forms included) is a token; the rest is split the mteval-v13a way (ASCII punctuation apart,
    periods and commas apart unless they sit in a number)."""
    spaced = "".join(f" {c} " if _is_sacrebleu_zh_char(c) else c for c in text.strip())
    for pattern, replacement in _V13A_RULES:
        spaced = pattern.sub(replacement, spaced)
    return spaced.split()


def _sacrebleu(hyps: Sequence[list[str]], refs: Sequence[Sequence[list[str]]]) -> float:
    """Corpus BLEU-4 on 0..100 with sacreBLEU's defaults: closest reference length, "exp" smoothing
    (an order without matches gets precision 1 / (2^k * count), k counting such orders so far), and
    no effective order, so an order the hypotheses are too short to have makes the score 0."""
    hyp_len, ref_len, correct, total = _bleu_statistics(hyps, refs)
    if not any(correct) or hyp_len == 0:
        return 0.0
    log_sum, halvings = 0.0, 1.0
    for n in range(_MAX_ORDER):
        if total[n] == 0:
            return 0.0
        if correct[n] == 0:
            halvings *= 2.0
            log_sum += math.log(100.0 / (halvings * total[n]))
        else:
            log_sum += math.log(100.0 * correct[n] / total[n])
    penalty = math.exp(1.0 - ref_len / hyp_len) if hyp_len < ref_len else 1.0
    return penalty * math.exp(log_sum / _MAX_ORDER)


def text_metrics(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """"BLEU": corpus BLEU-4 on 0..100, the number sacrebleu.corpus_bleu(predictions, reference
    streams, tokenize="zh") gives with its defaults; "ROUGE-L": the character-level ROUGE-L of
    `caption_metrics` (a fraction). Each prediction may have its own number of references."""
    _check_lengths("text_metrics", predictions, references)
    _check_references("text_metrics", references)
    bleu_hyps = [_sacrebleu_zh_tokens(p.rstrip()) for p in predictions]
    bleu_refs = [[_sacrebleu_zh_tokens(r.rstrip()) for r in refs] for refs in references]
    hyps = [text_tokens(p) for p in predictions]
    refs = [[text_tokens(r) for r in image_refs] for image_refs in references]
    return {"BLEU": _sacrebleu(bleu_hyps, bleu_refs) if predictions else 0.0,
            "ROUGE-L": _mean_rouge_l(hyps, refs)}


# ---------------------------------------------------------------- VQA and classification


def normalize_answer(text: str) -> str:
    """VQA answer normalisation: NFKC (full-width letters, digits and punctuation become ASCII),
    lower case, and every whitespace and punctuation character removed (ASCII and Chinese: 。，？！、
    ：；“”‘’（）《》 ...) so "两 只。" equals "两只"; a period between digits ("3.5") is kept."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _DECIMAL_POINT_RE.sub("\0", text)  # protect decimal points from the punctuation filter
    kept = (c for c in text if not (c.isspace() or c in _ASCII_PUNCTUATION or unicodedata.category(c).startswith("P")))
    return "".join(kept).replace("\0", ".")


def vqa_accuracy(predictions: list[str], answers: list[list[str]]) -> float:
    """Fraction of predictions whose normalised form equals that of one of their acceptable answers.
    A prediction that normalises to nothing is never right; an empty set of predictions scores 0."""
    _check_lengths("vqa_accuracy", predictions, answers)
    _check_references("vqa_accuracy", answers)
    if not predictions:
        return 0.0
    hits = 0
    for prediction, acceptable in zip(predictions, answers):
        normalised = normalize_answer(prediction)
        hits += bool(normalised) and normalised in {normalize_answer(a) for a in acceptable}
    return hits / len(predictions)


def _as_vector(name: str, values: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def binary_accuracy(predictions: list[int] | np.ndarray, labels: list[int] | np.ndarray) -> float:
    """Fraction of predictions equal to their labels (both 0 or 1); no predictions scores 0."""
    predictions, labels = _as_vector("predictions", predictions), _as_vector("labels", labels)
    _check_lengths("binary_accuracy", predictions, labels)
    for name, array in (("predictions", predictions), ("labels", labels)):
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"binary_accuracy: {name} must be 0 or 1, got {np.unique(array)[:5]}")
    return float((predictions == labels).mean()) if len(labels) else 0.0


def matching_accuracy(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                      groups: Sequence[str]) -> float:
    """Image-text matching by ranking: the fraction of groups (the texts scored against one image)
    holding a matched text (label 1) and a distractor (label 0) in which every matched text scores
    above every distractor. Ties count against, so a constant score is never right; groups without
    both kinds are left out. No such group scores 0."""
    scores, labels = _as_vector("scores", np.asarray(scores, dtype=np.float64)), _as_vector("labels", labels)
    _check_lengths("matching_accuracy", scores, labels)
    _check_lengths("matching_accuracy", scores, groups)
    by_group: dict[str, tuple[list[float], list[float]]] = {}
    for score, label, group in zip(scores.tolist(), labels.tolist(), groups):
        by_group.setdefault(group, ([], []))[int(label == 1)].append(score)
    judged = [min(matched) > max(distractors) for distractors, matched in by_group.values() if matched and distractors]
    return sum(judged) / len(judged) if judged else 0.0


# ---------------------------------------------------------------- retrieval


def retrieval_recall(scores: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
                     ) -> dict[str, float]:
    """Recall@k of image->text and text->image retrieval, as fractions.

    scores[i, j] is how well text j matches image i (higher is better), shape [n_images, n_texts];
    text_to_image[j] is the index of text j's own image (an image may own several texts).
    image->text: an image is a hit at k when one of its own texts ranks within the top k of its row
    (images that own no text are only candidates for text->image); text->image: a text is a hit
    when its image ranks within the top k of its column. Ties count against the hit: a wrong
    candidate whose score equals the positive's ranks above it, so a constant score matrix never
    looks good.
    """
    scores = np.asarray(scores, dtype=np.float64)
    text_to_image = np.asarray(text_to_image)
    if scores.ndim != 2:
        raise ValueError(f"retrieval_recall: scores must be [n_images, n_texts], got shape {scores.shape}")
    n_images, n_texts = scores.shape
    integer = np.issubdtype(text_to_image.dtype, np.integer) or n_texts == 0
    if text_to_image.shape != (n_texts,) or not integer:
        raise ValueError(f"retrieval_recall: text_to_image must be {n_texts} integer image indices, "
                         f"got shape {text_to_image.shape} of {text_to_image.dtype}")
    if n_texts and (text_to_image.min() < 0 or text_to_image.max() >= n_images):
        raise ValueError(f"retrieval_recall: text_to_image must index the {n_images} images")
    if np.isnan(scores).any():
        raise ValueError("retrieval_recall: scores contain NaN")
    owns = text_to_image[None, :] == np.arange(n_images)[:, None]  # owns[i, j]: text j is image i's
    # image->text: rank of an image's best own text = 1 + wrong texts scoring at least as high.
    has_texts = owns.any(axis=1)
    best_own = np.where(owns, scores, -np.inf).max(axis=1, initial=-np.inf)
    i2t_rank = 1 + ((scores >= best_own[:, None]) & ~owns).sum(axis=1)[has_texts]
    # text->image: rank of a text's image = 1 + other images scoring at least as high.
    own_score = scores[text_to_image, np.arange(n_texts)]
    t2i_rank = 1 + ((scores >= own_score[None, :]) & ~owns).sum(axis=0)
    recall = lambda ranks, k: float((ranks <= k).mean()) if len(ranks) else 0.0
    return {**{f"i2t_R@{k}": recall(i2t_rank, k) for k in ks}, **{f"t2i_R@{k}": recall(t2i_rank, k) for k in ks}}
