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


# Image-text pairs: the key of an exact duplicate is the re-encoded JPEG's digest (with the
# caption's, unless any caption will do); a near duplicate is an image whose 64-bit difference
# hash (dHash: a 9x8 greyscale thumbnail, one bit per horizontal neighbour pair) is within a
# Hamming distance d. Its d + 1 band keys are d + 1 slices of the hash (with the caption's
# digest): two hashes within d of each other agree on at least one slice (pigeonhole). The hash
# is the signature's first 4 bins, the rest stay 0.
HASH_BINS = 4


def dhash(jpeg: bytes) -> int:
    """The 64-bit difference hash of an image: robust to re-encoding and resizing, not to crops."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as img:
        img.draft("L", (18, 16))
        thumb = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (thumb[:, 1:] > thumb[:, :-1]).reshape(-1)
    return int(np.packbits(bits).view(">u8")[0])


def image_keys(jpegs: list[bytes], captions: list[str], distance: int | None,
               any_caption: bool) -> tuple[list[bytes], tuple[np.ndarray, np.ndarray] | None]:
    """(digests, (band keys, signatures) or None without a distance) of image-text pairs."""
    salts = [b"" if any_caption else b"\0" + c.encode("utf-8") for c in captions]
    digests = [hashlib.blake2b(j + s, digest_size=16).digest() for j, s in zip(jpegs, salts)]
    if distance is None:
        return digests, None
    n, slices = len(jpegs), np.array_split(np.arange(64), distance + 1)
    hashes = np.array([dhash(j) for j in jpegs], dtype=np.uint64)
    caption = np.array([int.from_bytes(hashlib.blake2b(s, digest_size=8).digest(), "little") for s in salts],
                       dtype=np.uint64)
    keys = np.zeros((n, BANDS), np.uint64)
    for band, bits in enumerate(slices):
        mask = np.uint64(sum(1 << int(b) for b in bits))
        keys[:, band] = _mix((hashes & mask) ^ caption ^ _MULTIPLIERS[band]) | np.uint64(1)
    sigs = np.zeros((n, NUM_BINS), np.uint16)
    if n:
        sigs[:, :HASH_BINS] = hashes.view(np.uint16).reshape(n, HASH_BINS)
    return digests, (keys, sigs)


def signatures_match(a: np.ndarray, b: np.ndarray, hamming: int | None) -> np.ndarray:
    """Per row, whether signatures a and b make a near duplicate: text MinHash agreeing on at
    least NEAR_THRESHOLD of the bins, or (hamming set) image hashes within that distance."""
    if hamming is None:
        return (a == b).mean(axis=-1) >= NEAR_THRESHOLD
    xor = (a[..., :HASH_BINS] ^ b[..., :HASH_BINS]).astype(np.uint16)
    return np.unpackbits(xor.view(np.uint8), axis=-1).sum(axis=-1) <= hamming


class Deduplicator:
    """`check` returns the reason a document is a duplicate, or None. The rule, in input order:
    an exact duplicate has an earlier document with its digest; a near duplicate agrees on at
    least NEAR_THRESHOLD of its signature with the first earlier document of one of its LSH band
    keys, kept or not (so a near duplicate can be the first of a band key, and drop a later
    document). The rule needs nothing but the input order, which lets data/global_dedup.py apply
    the same one across shards. Memory: 16 bytes per digest, 128 per signature, plus dict entries."""

    def __init__(self, exact: bool = True, near: bool = True, hamming: int | None = None):
        """hamming: the signatures are image hashes (image_keys), near within that distance."""
        self.exact, self.near, self.hamming = exact, near, hamming
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
            keys = [k for k in bands.tolist() if k]  # an image has fewer band keys than BANDS
            candidates = sorted({self._bands[k] for k in keys if k in self._bands})
            near = bool(candidates) and bool(signatures_match(self._sigs[candidates], sig, self.hamming).any())
            if self._count == len(self._sigs):
                self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
            self._sigs[self._count] = sig
            for k in keys:
                self._bands.setdefault(k, self._count)
            self._count += 1
            if near:
                return NEAR_DUPLICATE
        return None
