"""Cleaning rules for the M6 text corpus, applied to one document at a time.

Every document is NFKC-normalised (and optionally converted from traditional to simplified
characters with OpenCC), then dropped with a reason if it is too short, too long, garbled (replacement
characters, control or private-use characters, classic GBK/UTF-8 mojibake) or mostly not Chinese.
Ratios are computed on the code points with numpy, not a Python loop over characters.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from tokenizers import normalizers

TOO_SHORT, TOO_LONG, GARBLED, NOT_CHINESE = "too_short", "too_long", "garbled", "not_chinese"
# "锟斤拷"/"烫烫烫": UTF-8 or uninitialised memory read as GBK; "Ã©", "â€": UTF-8 read as Latin-1.
_MOJIBAKE_RE = re.compile("锟斤拷|烫烫烫|屯屯屯|[ÃÂ][\u0080-\u00bf]|â€")
_CJK_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F))
# Code points that are neither letters of some script nor garbage: spaces, digits, punctuation.
_NEUTRAL_RANGES = ((0x00, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7F), (0x2000, 0x206F),
                   (0x3000, 0x303F), (0xFF00, 0xFFEF))
_GARBAGE_RANGES = ((0x00, 0x08), (0x0B, 0x0C), (0x0E, 0x1F), (0x7F, 0x9F), (0xE000, 0xF8FF),
                   (0xFFFD, 0xFFFD))
_SURROGATES = ((0xD800, 0xDFFF),)  # only from JSON escapes; they cannot be encoded as UTF-8
# Sentence ends in Chinese text after NFKC ("！？" become "!?", "…" becomes "..."), with any
# closing quotes or brackets that follow them.
_ZH_SENTENCE_RE = re.compile(r"[^。!?]*?(?:[。!?]+|\.{3,}|$)[”’\"」』)\]]*", re.S)
_LATIN_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g",
                        "i.e", "no", "fig", "inc", "ltd", "co", "dept", "jan", "feb", "aug",
                        "sept", "oct", "nov", "dec", "u.s", "a.m", "p.m"}


@dataclass
class CleaningConfig:
    """Thresholds of the rules; lengths count characters after normalisation."""

    min_chars: int = 10
    max_chars: int = 100_000
    min_chinese_ratio: float = 0.3  # CJK ideographs among letters of any script
    max_garbled_ratio: float = 0.01  # replacement, control and private-use characters
    traditional_to_simplified: bool = False


# Class of every code point, so one table lookup and one bincount classify a whole document.
LETTER, NEUTRAL, CJK, GARBAGE, SURROGATE = range(5)


def _class_table() -> np.ndarray:
    table = np.full(0x110000, LETTER, dtype=np.uint8)
    for cls, ranges in ((NEUTRAL, _NEUTRAL_RANGES), (CJK, _CJK_RANGES), (GARBAGE, _GARBAGE_RANGES),
                        (SURROGATE, _SURROGATES)):
        for lo, hi in ranges:
            table[lo:hi + 1] = cls
    return table


_CLASSES = _class_table()
_NFKC = normalizers.NFKC()


def normalise(text: str) -> str:
    """NFKC (Hugging Face's, in Rust: ~3x Python's), skipped for text already normalised."""
    if unicodedata.is_normalized("NFKC", text):
        return text
    try:
        return _NFKC.normalize_str(text)
    except (UnicodeEncodeError, TypeError, ValueError):  # lone surrogates: Rust strings refuse them
        return unicodedata.normalize("NFKC", text)


@lru_cache(maxsize=1)
def _t2s():
    import opencc  # only needed with --traditional-to-simplified

    return opencc.OpenCC("t2s")


class Cleaner:
    """Applies the rules; `clean(text)` returns (cleaned text, None) or (None, reason)."""

    def __init__(self, cfg: CleaningConfig):
        self.cfg = cfg
        self._t2s = _t2s() if cfg.traditional_to_simplified else None

    def normalise(self, text: str) -> str:
        text = normalise(text)
        return self._t2s.convert(text) if self._t2s is not None else text

    def clean(self, text: str) -> tuple[str | None, str | None]:
        text = self.normalise(text).strip()
        cfg = self.cfg
        if len(text) < cfg.min_chars:
            return None, TOO_SHORT
        if len(text) > cfg.max_chars:
            return None, TOO_LONG
        cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        counts = np.bincount(_CLASSES[cp], minlength=5)
        if (counts[GARBAGE] > cfg.max_garbled_ratio * len(cp) or counts[SURROGATE]
                or _MOJIBAKE_RE.search(text)):
            return None, GARBLED
        letters = counts[LETTER] + counts[CJK] + counts[GARBAGE]
        if letters and counts[CJK] < cfg.min_chinese_ratio * letters:
            return None, NOT_CHINESE
        return text, None


@lru_cache(maxsize=1)
def _punkt():
    """nltk's Punkt with its default parameters plus common abbreviations: no trained model and
    nothing downloaded."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    params = PunktParameters()
    params.abbrev_types = set(_LATIN_ABBREVIATIONS)
    return PunktSentenceTokenizer(params)


def split_sentences(text: str) -> list[str]:
    """Sentences of normalised text: Chinese ends by regex, then Latin ones by Punkt."""
    out = []
    for piece in _ZH_SENTENCE_RE.findall(text):
        if not piece.strip():
            continue
        if ". " in piece:
            out.extend(s for s in _punkt().tokenize(piece) if s.strip())
        else:
            out.append(piece.strip())
    return out
