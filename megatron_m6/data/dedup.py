"""Exact and near-duplicate detection for the corpus.

Workers compute, for a whole chunk of documents at once, a 128-bit digest of each cleaned text
(exact duplicates) and MinHash band keys over its character 5-grams (near duplicates); the
writer process checks them in input order with `Deduplicator`, so what is kept does not depend on
the number of workers.

MinHash is one-permutation hashing (one 64-bit hash per shingle, split into 64 bins, minimum per
bin, empty bins filled from the next non-empty one) rather than 64 separate hash functions: the
same estimator at 1/64 of the hashing work, all numpy. Locality-sensitive hashing with 8 bands of
8 rows finds candidate pairs of Jaccard similarity above ~0.77 (0.9: 99%, 0.8: 77%, 0.5: 3%);
a candidate counts only if the signatures agree on at least NEAR_THRESHOLD of their bins, which
removes the chance collisions of the many moderately similar pairs a large corpus has.
"""

from __future__ import annotations

import hashlib

import numpy as np

EXACT_DUPLICATE, NEAR_DUPLICATE = "exact_duplicate", "near_duplicate"
SHINGLE = 5
NUM_BINS, BANDS = 64, 8
NEAR_THRESHOLD = 0.7  # estimated Jaccard similarity of a near duplicate
ROWS = NUM_BINS // BANDS
_BIN_BITS = 6  # log2(NUM_BINS)
_EMPTY = np.uint64(2**64 - 1)
_MULTIPLIERS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                         0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53,
                         0x94D049BB133111EB, 0xBF58476D1CE4E5B9], dtype=np.uint64)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 that spreads every input bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def digest(text: str) -> bytes:
    """Key of a text for exact deduplication."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def minhash(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """([len(texts), BANDS] uint64 LSH keys, [len(texts), NUM_BINS] uint16 signatures); a text
    shorter than SHINGLE characters gets keys of 0, which `Deduplicator` ignores."""
    n = len(texts)
    out = np.zeros((n, BANDS), dtype=np.uint64)
    sigs = np.zeros((n, NUM_BINS), dtype=np.uint16)
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    if n == 0 or lengths.max(initial=0) < SHINGLE:
        return out, sigs
    cp = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    cp = cp.astype(np.uint64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    m = len(cp) - SHINGLE + 1
    h = np.zeros(m, dtype=np.uint64)
    for j in range(SHINGLE):
        h += cp[j:j + m] * _MULTIPLIERS[j]
    h = _mix(h)
    doc = np.repeat(np.arange(n), lengths)[:m]
    pos = np.arange(m) - starts[doc]
    valid = pos + SHINGLE <= lengths[doc]  # shingles that do not cross into the next document
    doc, h = doc[valid], h[valid]
    sig = np.full(n * NUM_BINS, _EMPTY, dtype=np.uint64)
    np.minimum.at(sig, doc * NUM_BINS + (h >> np.uint64(64 - _BIN_BITS)).astype(np.int64),
                  h & np.uint64((1 << (64 - _BIN_BITS)) - 1))
    sig = sig.reshape(n, NUM_BINS)
    has = lengths >= SHINGLE
    # Densify: an empty bin takes the value of the next non-empty bin (cyclically), salted by the
    # distance, so two documents agree on it exactly when they agree on that bin.
    cols = np.arange(NUM_BINS)
    idx = np.where(sig != _EMPTY, cols, 4 * NUM_BINS)
    idx = np.concatenate([idx, idx + NUM_BINS], axis=1)
    nxt = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1][:, :NUM_BINS]
    nxt = np.minimum(nxt, 2 * NUM_BINS - 1)
    filled = sig[np.arange(n)[:, None], nxt % NUM_BINS] + (nxt - cols).astype(np.uint64)
    bands = filled.reshape(n, BANDS, ROWS)
    keys = np.zeros((n, BANDS), dtype=np.uint64)
    for row in range(ROWS):
        keys = _mix(keys ^ bands[:, :, row])
    keys = _mix(keys + np.arange(1, BANDS + 1, dtype=np.uint64))  # distinct key space per band
    out[has] = keys[has] | np.uint64(1)  # never 0, which marks "no signature"
    sigs[has] = (_mix(filled[has]) & np.uint64(0xFFFF)).astype(np.uint16)
    return out, sigs


class Deduplicator:
    """`check` returns the reason a document is a duplicate, or None. The rule, in input order:
    an exact duplicate has an earlier document with its digest; a near duplicate agrees on at
    least NEAR_THRESHOLD of its signature with the first earlier document of one of its LSH band
    keys, kept or not (so a near duplicate can be the first of a band key, and drop a later
    document). The rule needs nothing but the input order, which lets data/global_dedup.py apply
    the same one across shards. Memory: 16 bytes per digest, 128 per signature, plus dict entries."""

    def __init__(self, exact: bool = True, near: bool = True):
        self.exact, self.near = exact, near
        self._digests: set[bytes] = set()
        self._bands: dict[int, int] = {}  # band key -> the first document with it
        self._sigs = np.zeros((1024, NUM_BINS), dtype=np.uint16)
        self._count = 0

    def check(self, key: bytes, bands: np.ndarray, sig: np.ndarray | None = None) -> str | None:
        if self.exact:
            if key in self._digests:
                return EXACT_DUPLICATE
            self._digests.add(key)
        if self.near and bands[0]:
            keys = bands.tolist()
            candidates = {self._bands[k] for k in keys if k in self._bands}
            near = any((self._sigs[c] == sig).mean() >= NEAR_THRESHOLD for c in candidates)
            if self._count == len(self._sigs):
                self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
            self._sigs[self._count] = sig
            for k in keys:
                self._bands.setdefault(k, self._count)
            self._count += 1
            if near:
                return NEAR_DUPLICATE
        return None
