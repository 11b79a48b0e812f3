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

import copy
import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

NUM_SENTINELS = 100
# The general vocabulary shipped with the package (how it was built: docs/DATA.md).
DEFAULT_VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocab.txt")
SPECIAL_TOKENS = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]", "[IMG]"]
                  + [f"[S{i}]" for i in range(NUM_SENTINELS)])

# CJK ideographs (BERT's ranges) and punctuation that never takes a space on either side.
_IDEOGRAPHS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_CJK_PUNCT = "\u3000-\u303f\uff00-\uffef\u2014\u2018-\u201f\u2026"
_IDEOGRAPH_RE = re.compile(f"[{_IDEOGRAPHS}]")
# encode_batch's fast path: the basic CJK block, whose characters never change under the normaliser.
_BASIC_CJK_FIRST, _BASIC_CJK_LAST = 0x4E00, 0x9FFF
_BASIC_CJK_RUN_RE = re.compile(f"([{chr(_BASIC_CJK_FIRST)}-{chr(_BASIC_CJK_LAST)}]+)")
_RUN_CACHE_SIZE = 1 << 16
# Spaces the decoder puts between tokens that were not there in (normalised) text.
_EXTRA_SPACE_RE = re.compile(
    rf" (?=[{_CJK_PUNCT}.,!?;:%)\]}}])"  # before closing or CJK punctuation
    rf"|(?<=[{_CJK_PUNCT}(\[{{]) "  # after opening or CJK punctuation
    rf"|(?<=[{_IDEOGRAPHS}]) (?![a-z])"  # after a CJK character, unless a Latin word follows
    rf"|(?<![a-z]) (?=[{_IDEOGRAPHS}])"  # before a CJK character, unless after a Latin word
)


@dataclass(frozen=True)
class ImageCodeTokens:
    """The tokens of text-to-image, appended after the text vocabulary so that every text id (and
    a text model's embedding rows) stays where it was: [BOI] and [EOI] around an image, then code
    c of the image tokenizer's codebook as token first_code_id + c."""

    text_vocab_size: int
    codebook_size: int

    @property
    def boi_id(self) -> int:
        return self.text_vocab_size

    @property
    def eoi_id(self) -> int:
        return self.text_vocab_size + 1

    @property
    def first_code_id(self) -> int:
        return self.text_vocab_size + 2

    @property
    def end_id(self) -> int:
        """One past the last code token: the vocabulary's size with the codes."""
        return self.first_code_id + self.codebook_size

    def to_ids(self, codes: np.ndarray) -> np.ndarray:
        return np.asarray(codes, dtype=np.int64) + self.first_code_id

    def to_codes(self, ids: np.ndarray) -> np.ndarray:
        """The codes of code tokens; a ValueError if any id is not one."""
        codes = np.asarray(ids, dtype=np.int64) - self.first_code_id
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"ids outside the code tokens [{self.first_code_id}, {self.end_id})")
        return codes


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
        self._cjk_ids = np.full(_BASIC_CJK_LAST - _BASIC_CJK_FIRST + 1, index["[UNK]"], np.int32)
        for token, i in index.items():
            if len(token) == 1 and _BASIC_CJK_FIRST <= ord(token) <= _BASIC_CJK_LAST:
                self._cjk_ids[ord(token) - _BASIC_CJK_FIRST] = i
        self._run_ids: dict[str, np.ndarray] = {}
        self.image_codes: ImageCodeTokens | None = None  # with_image_codes

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

    def with_image_codes(self, codebook_size: int) -> M6Tokenizer:
        """This tokenizer with text-to-image's [BOI], [EOI] and `codebook_size` code tokens after
        its text vocabulary (ImageCodeTokens); text encodes and decodes as before."""
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        tok = copy.copy(self)
        tok.image_codes = ImageCodeTokens(len(self._vocab), codebook_size)
        return tok

    @property
    def vocab_size(self) -> int:
        """Ids in use: the text vocabulary's, and the image-code tokens' if any."""
        return self.image_codes.end_id if self.image_codes else len(self._vocab)

    @property
    def text_vocab_size(self) -> int:
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

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text as int32 arrays, equal to `encode` of each, several times faster
        on Chinese.

        Why it can be: the normaliser puts spaces around every CJK ideograph, so an ideograph of
        the basic block (which NFKC and lowercasing leave alone) is always one token whatever its
        neighbours; those come from a table in bulk, and only the runs between them (punctuation,
        digits, Latin words, which repeat a lot and are cached) go through the tokenizers pipeline.
        Runs also end at newlines (whitespace, so no token changes), which keeps texts apart.
        """
        if not texts:
            return []
        joined = "\n".join(texts)
        cp = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        cjk = (cp >= _BASIC_CJK_FIRST) & (cp <= _BASIC_CJK_LAST)
        edges = np.diff(np.concatenate([[0], (~cjk & (cp != 10)).view(np.int8), [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        runs = [joined[a:b] for a, b in zip(starts.tolist(), ends.tolist())]
        missing = list({r for r in runs if r not in self._run_ids})
        if len(self._run_ids) + len(missing) > _RUN_CACHE_SIZE:
            self._run_ids.clear()
            missing = list(set(runs))
        for run, enc in zip(missing, self._tok.encode_batch(missing, add_special_tokens=False)):
            self._run_ids[run] = np.array(enc.ids, dtype=np.int32)
        run_ids = [self._run_ids[r] for r in runs]
        run_len = np.array([len(x) for x in run_ids], dtype=np.int64)
        # Tokens each code point starts: 1 per ideograph, a run's tokens at its first character.
        count = cjk.astype(np.int64)
        count[starts] = run_len
        first = np.concatenate([[0], np.cumsum(count)])  # tokens before each code point
        out = np.empty(int(first[-1]), dtype=np.int32)
        out[first[:-1][cjk]] = self._cjk_ids[cp[cjk] - _BASIC_CJK_FIRST]
        if len(runs):
            within = np.arange(int(run_len.sum())) - np.repeat(np.cumsum(run_len) - run_len, run_len)
            out[np.repeat(first[starts], run_len) + within] = np.concatenate(run_ids)
        bounds = first[np.cumsum([0] + [len(t) + 1 for t in texts[:-1]] + [len(texts[-1])])]
        return [out[a:b] for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text of ids, spaced as the module docstring says; skip_special also drops "[UNK]".
        Image-code tokens have no text and are dropped."""
        text = self._tok.decode([i for i in ids if i < len(self._vocab)], skip_special_tokens=skip_special)
        return _EXTRA_SPACE_RE.sub("", text)

    @property
    def digest(self) -> str:
        """sha256 of the vocabulary, tokens in order: checkpoints record it, so weights are never
        paired with another vocabulary whose size happens to pad to the same embedding. With image
        codes, the digest of the text vocabulary and the codebook size together."""
        text = hashlib.sha256("\n".join(self._vocab).encode("utf-8")).hexdigest()
        if self.image_codes is None:
            return text
        return hashlib.sha256(f"{text}+image codes {self.image_codes.codebook_size}".encode()).hexdigest()

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
                min_frequency: int = 1, alphabet: str = "") -> M6Tokenizer:
    """Train a WordPiece vocabulary on texts (special tokens first, every CJK character seen kept
    even past vocab_size so Chinese never becomes [UNK]), save it to out_path and return it.

    Every character of `alphabet` that survives normalisation gets a token too (and a "##" piece
    if it is a letter or digit), so text written in it never becomes [UNK] whatever the corpus.
    """
    texts = list(texts)
    tok = _pipeline({"[UNK]": 0})
    text = tok.normalizer.normalize_str("\n".join(texts))
    singles = {c for c in alphabet if tok.normalizer.normalize_str(c).strip() == c}
    # The trainer numbers "##x" pieces in hash order and breaks count ties by number, so its vocab
    # changes from run to run; listing every "##x" up front (sorted) makes it reproducible.
    pieces = {"##" + c for word, _ in tok.pre_tokenizer.pre_tokenize_str(text) for c in word[1:]}
    pieces |= {"##" + c for c in singles if c.isalnum() and c < "\u3000"}  # not CJK: own words
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=SPECIAL_TOKENS + sorted(pieces),
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer)
    rest = (set(tok.get_vocab()) | set(_IDEOGRAPH_RE.findall(text)) | singles) - set(SPECIAL_TOKENS)
    vocab = SPECIAL_TOKENS + sorted(rest)
    m6 = M6Tokenizer(vocab)
    m6.save_vocab(out_path)
    return m6
