"""M6's Chinese tokenizer: every CJK character is its own token, Latin text is WordPiece.

Built on Hugging Face `tokenizers` (Rust) so encoding a corpus is fast. The pipeline is BERT's:
NFKC, then BertNormalizer (lowercase, keep accents, spaces around CJK characters), BertPreTokenizer
(split on whitespace and punctuation), WordPiece with "[UNK]".

Normalisation, which decode cannot undo: text is NFKC-folded (so full-width "，！？：" become
ASCII ",!?:") and lowercased, and whitespace is not kept. Decode rebuilds spacing by rule: no space
between CJK characters, between CJK and digits, or around punctuation that attaches to its
neighbour; one space between Latin words and between a CJK character and a Latin letter.
So "M6模型 is big" decodes to "m6模型 is big" and "今天很好，走吧！" to "今天很好,走吧!".
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

NUM_SENTINELS = 100
SPECIAL_TOKENS = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]", "[IMG]"]
                  + [f"[S{i}]" for i in range(NUM_SENTINELS)])

# CJK ideographs (BERT's ranges) and punctuation that never takes a space on either side.
_IDEOGRAPHS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_CJK_PUNCT = "\u3000-\u303f\uff00-\uffef\u2014\u2018-\u201f\u2026"
_IDEOGRAPH_RE = re.compile(f"[{_IDEOGRAPHS}]")
# Spaces the decoder puts between tokens that were not there in (normalised) text.
_EXTRA_SPACE_RE = re.compile(
    rf" (?=[{_CJK_PUNCT}.,!?;:%)\]}}])"  # before closing or CJK punctuation
    rf"|(?<=[{_CJK_PUNCT}(\[{{]) "  # after opening or CJK punctuation
    rf"|(?<=[{_IDEOGRAPHS}]) (?![a-z])"  # after a CJK character, unless a Latin word follows
    rf"|(?<![a-z]) (?=[{_IDEOGRAPHS}])"  # before a CJK character, unless after a Latin word
)


def _pipeline(vocab: dict[str, int]) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                   strip_accents=False, lowercase=True),
    ])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return tok


class M6Tokenizer:
    """Token ids for M6: 8 special tokens and 100 span sentinels first, then the vocabulary."""

    def __init__(self, vocab: list[str]):
        index = {t: i for i, t in enumerate(vocab)}
        if len(index) != len(vocab):
            raise ValueError("vocabulary has duplicate tokens")
        missing = [t for t in SPECIAL_TOKENS if t not in index]
        if missing:
            raise ValueError(f"vocabulary lacks special tokens {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        self._vocab = vocab
        self._index = index
        self._tok = _pipeline(index)
        self._tok.add_special_tokens(SPECIAL_TOKENS)  # so decode can skip them

    @classmethod
    def from_vocab_file(cls, path: str) -> M6Tokenizer:
        """Load a BERT-style vocab.txt (one token per line, id = line number)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"vocab file {path} not found; make one with "
                                    "tools/prepare_sample_data.py")
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\r") for line in f.read().split("\n")]
        if lines and lines[-1] == "":
            lines.pop()
        if not lines:
            raise ValueError(f"vocab file {path} is empty")
        if "" in lines:
            raise ValueError(f"vocab file {path} has an empty line at {lines.index('') + 1}")
        try:
            return cls(lines)
        except ValueError as e:
            raise ValueError(f"vocab file {path}: {e}") from None

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def pad_id(self) -> int:
        return self._index["[PAD]"]

    @property
    def unk_id(self) -> int:
        return self._index["[UNK]"]

    @property
    def cls_id(self) -> int:
        return self._index["[CLS]"]

    @property
    def sep_id(self) -> int:
        return self._index["[SEP]"]

    @property
    def mask_id(self) -> int:
        return self._index["[MASK]"]

    @property
    def bos_id(self) -> int:
        return self._index["[BOS]"]

    @property
    def eos_id(self) -> int:
        return self._index["[EOS]"]

    @property
    def img_id(self) -> int:
        return self._index["[IMG]"]

    @property
    def sentinel_ids(self) -> list[int]:
        """Ids of "[S0]".."[S99]", which stand for the masked spans in denoising targets."""
        return [self._index[f"[S{i}]"] for i in range(NUM_SENTINELS)]

    def encode(self, text: str) -> list[int]:
        """Token ids of text, no special tokens added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text of ids, spaced as the module docstring says; skip_special also drops "[UNK]"."""
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special)
        return _EXTRA_SPACE_RE.sub("", text)

    def token_to_id(self, token: str) -> int:
        if token not in self._index:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return self._index[token]

    def save_vocab(self, path: str) -> None:
        """Write vocab.txt atomically, so an interrupted run never leaves half a vocabulary."""
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(t + "\n" for t in self._vocab))
        os.replace(tmp, path)


def build_vocab(texts: Iterable[str], out_path: str, vocab_size: int = 8000,
                min_frequency: int = 1) -> M6Tokenizer:
    """Train a WordPiece vocabulary on texts (special tokens first, every CJK character seen kept
    even past vocab_size so Chinese never becomes [UNK]), save it to out_path and return it."""
    texts = list(texts)
    tok = _pipeline({"[UNK]": 0})
    text = tok.normalizer.normalize_str("\n".join(texts))
    # The trainer numbers "##x" pieces in hash order and breaks count ties by number, so its vocab
    # changes from run to run; listing every "##x" up front (sorted) makes it reproducible.
    pieces = {"##" + c for word, _ in tok.pre_tokenizer.pre_tokenize_str(text) for c in word[1:]}
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=SPECIAL_TOKENS + sorted(pieces),
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer)
    rest = (set(tok.get_vocab()) | set(_IDEOGRAPH_RE.findall(text))) - set(SPECIAL_TOKENS)
    vocab = SPECIAL_TOKENS + sorted(rest)
    m6 = M6Tokenizer(vocab)
    m6.save_vocab(out_path)
    return m6
