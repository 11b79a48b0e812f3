import random

import numpy as np
import pytest

from megatron_m6.data.cleaning import (
    GARBLED,
    NOT_CHINESE,
    TOO_LONG,
    TOO_SHORT,
    Cleaner,
    CleaningConfig,
    split_sentences,
)
from megatron_m6.data.dedup import EXACT_DUPLICATE, NEAR_DUPLICATE, Deduplicator, digest, minhash

DOC = "今天早上下了一场小雨。空气变得很清新。路边的树叶上还挂着水珠。孩子们在院子里堆雪人，大人们忙着扫门前的雪。"


@pytest.mark.parametrize("text, reason", [
    ("短短的", TOO_SHORT),
    ("好" * 201, TOO_LONG),
    ("This document is written in English with only one 字.", NOT_CHINESE),
    ("今天天气很好我们去公园吧\ufffd\ufffd\ufffd", GARBLED),
    ("锟斤拷今天天气很好我们去公园散步", GARBLED),
    ("今天天气很好我们去公园散步\x07", GARBLED),
    ("今天天气很好我们去公园散步\ud800", GARBLED),
    ("ＡＢＣ今天天气很好，我们去公园散步！", None),
    ("我每天花30分钟学习 Python and English。", None),
])
def test_rules(text, reason):
    cleaned, got = Cleaner(CleaningConfig(min_chars=10, max_chars=200)).clean(text)
    assert got == reason
    if reason is None:
        assert cleaned.startswith(("ABC今天天气很好,我们去公园散步!", "我每天"))


def test_traditional_to_simplified():
    cleaned, reason = Cleaner(CleaningConfig(traditional_to_simplified=True)).clean("漢字轉換，這是測試。")
    assert reason is None and cleaned == "汉字转换,这是测试。"
    assert Cleaner(CleaningConfig()).clean("漢字轉換，這是測試。")[0] == "漢字轉換,這是測試。"


def test_split_sentences():
    text = "今天天气很好。我们去公园吧!他说:“你好。”然后走了...真的吗?Hello Mr. Smith. It is 3.5 km away. 没有结尾"
    assert split_sentences(text) == ["今天天气很好。", "我们去公园吧!", "他说:“你好。”", "然后走了...",
                                     "真的吗?", "Hello Mr. Smith.", "It is 3.5 km away.", "没有结尾"]
    assert split_sentences("") == [] and split_sentences("一句话") == ["一句话"]


def test_exact_and_near_duplicates():
    near = DOC.replace("小雨", "大雨")
    other = "秋天的天空又高又蓝。田里的庄稼慢慢变黄了。农民们开始准备收割。北京是一座历史悠久的城市。"
    texts = [DOC, near, other, DOC, "短"]
    bands, sigs = minhash(texts)
    assert bands.shape == (5, 8) and sigs.shape == (5, 64) and not bands[4].any() and bands[:4].all()
    dedup = Deduplicator()
    assert [dedup.check(digest(t), b, s) for t, b, s in zip(texts, bands, sigs)] == \
        [None, NEAR_DUPLICATE, None, EXACT_DUPLICATE, None]
    assert [Deduplicator(near=False).check(digest(t), b, s)
            for t, b, s in zip(texts, bands, sigs)] == [None] * 5
    # Batches give the same keys as single documents: shingles never cross documents.
    assert all(np.array_equal(minhash([t])[1][0], sigs[k]) for k, t in enumerate(texts))


def test_near_duplicate_rate_follows_similarity():
    rng = random.Random(0)
    chars = [chr(0x4E00 + i) for i in range(3000)]

    def flagged(fraction):
        hits = 0
        for _ in range(60):
            a = [rng.choice(chars) for _ in range(300)]
            b = list(a)
            for i in rng.sample(range(300), int(fraction * 300)):
                b[i] = rng.choice(chars)
            keys, sigs = minhash(["".join(a), "".join(b)])
            dedup = Deduplicator(exact=False)
            dedup.check(b"a", keys[0], sigs[0])
            hits += dedup.check(b"b", keys[1], sigs[1]) == NEAR_DUPLICATE
        return hits / 60

    # The LSH curve of dedup.py (8 bands of 8 rows): P(candidate) is ~1 at Jaccard 0.95 and 0.05%
    # at 0.3, where the signature check (>= 0.7) rejects the rest. Deterministic draws (Random(0)).
    assert flagged(0.005) > 0.9  # 5-gram Jaccard ~0.95
    assert flagged(0.15) < 0.05  # Jaccard ~0.3


def test_moderately_similar_documents_are_kept():
    """Many pairs near Jaccard 0.3 collide in some band by chance; the signature check keeps them."""
    rng = random.Random(1)
    sentences = ["".join(chr(0x4E00 + rng.randrange(3000)) for _ in range(30)) for _ in range(40)]
    docs = ["".join(rng.sample(sentences, 12)) for _ in range(400)]
    keys, sigs = minhash(docs)
    dedup = Deduplicator(exact=False)
    assert sum(dedup.check(b"", k, s) == NEAR_DUPLICATE for k, s in zip(keys, sigs)) <= 2
