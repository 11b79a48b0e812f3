import pytest

from megatron_m6.tokenizer import M6Tokenizer, build_vocab

CORPUS = [
    "左上角有两个红色的圆形。",
    "今天天气很好，我们去公园散步吧！",
    "2023年，北京的气温是25度。",
    "M6模型 is big",
    "Hello, world. Playing games is fun.",
    "“你好”，他说。",
]
# (text, normalised text that decode(encode(text)) gives back): NFKC folds "，！" to ",!",
# everything is lowercased, and spaces between CJK characters are not kept.
ROUND_TRIPS = [
    ("左上角有两个红色的圆形。", "左上角有两个红色的圆形。"),
    ("今天天气很好，我们去公园散步吧！", "今天天气很好,我们去公园散步吧!"),
    ("2023年，北京的气温是25度。", "2023年,北京的气温是25度。"),
    ("M6模型 is big", "m6模型 is big"),
    ("Hello, world. Playing games is fun.", "hello, world. playing games is fun."),
    ("“你好”，他说。", "“你好”,他说。"),
    ("今天 天气 很好", "今天天气很好"),
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_vocab(CORPUS, str(tmp_path_factory.mktemp("vocab") / "vocab.txt"), vocab_size=300)


@pytest.mark.parametrize("text,expected", ROUND_TRIPS)
def test_round_trip(tok, text, expected):
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == expected


def test_every_cjk_character_is_one_token(tok):
    text = "左上角有两个红色的圆形"
    assert tok.encode(text) == [tok.token_to_id(c) for c in text]


def test_special_ids(tok):
    names = ["pad_id", "unk_id", "cls_id", "sep_id", "mask_id", "bos_id", "eos_id", "img_id"]
    assert [getattr(tok, n) for n in names] == list(range(8))
    assert tok.sentinel_ids == list(range(8, 108))
    assert tok.token_to_id("[S0]") == 8 and tok.token_to_id("[S99]") == 107
    assert tok.encode("[UNK]我") == [tok.unk_id, tok.token_to_id("我")]
    assert tok.decode([tok.bos_id, tok.token_to_id("我"), tok.eos_id]) == "我"
    assert tok.decode([tok.token_to_id("我"), tok.sentinel_ids[0]], skip_special=False) == "我[S0]"


def test_unknown_character_is_unk(tok):
    assert tok.encode("龘") == [tok.unk_id]
    with pytest.raises(KeyError):
        tok.token_to_id("龘")


def test_cjk_kept_beyond_vocab_size(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(300))
    small = build_vocab([text], str(tmp_path / "vocab.txt"), vocab_size=150)
    assert small.vocab_size > 150
    assert small.unk_id not in small.encode(text)


def test_save_and_load(tok, tmp_path):
    path = str(tmp_path / "copy.txt")
    tok.save_vocab(path)
    loaded = M6Tokenizer.from_vocab_file(path)
    assert loaded.vocab_size == tok.vocab_size
    for text, _ in ROUND_TRIPS:
        assert loaded.encode(text) == tok.encode(text)


def test_missing_or_bad_vocab_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found") as e:
        M6Tokenizer.from_vocab_file(str(tmp_path / "nope.txt"))
    assert "\n" not in str(e.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        M6Tokenizer.from_vocab_file(str(empty))
    partial = tmp_path / "partial.txt"
    partial.write_text("[PAD]\n[UNK]\na\n")
    with pytest.raises(ValueError, match="lacks special tokens"):
        M6Tokenizer.from_vocab_file(str(partial))


def test_encode_batch_equals_encode(tok):
    """The CJK fast path gives exactly the ids of the full pipeline, whatever surrounds the
    ideographs: specials, compatibility forms, radicals, combining marks, newlines."""
    import random

    rng = random.Random(0)
    alphabet = (list("红色的圆形今天天气很好我们去公园") + list("abcXYZ Σς 12，。！？“”（）[]. ,\t\n")
                + [chr(rng.randrange(0x4E00, 0xA000)) for _ in range(30)]
                + ["[S0]", "[UNK]", "\u0301", "\u2f00", "\uf900", "\u3220", "\ufffd", "\x00", "İ", "ﬁ", "Ａ"])
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40))) for _ in range(2000)]
    assert [ids.tolist() for ids in tok.encode_batch(texts)] == [tok.encode(t) for t in texts]
    assert tok.encode_batch([]) == [] and tok.encode_batch([""])[0].tolist() == []
