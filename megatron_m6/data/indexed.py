"""Megatron's indexed dataset format (`PREFIX.bin` + `PREFIX.idx`), read and written with numpy.

Byte layout of `PREFIX.idx`, all little-endian, exactly as megatron-core's `IndexedDataset` reads
and `IndexedDatasetBuilder` writes it:

    b"MMIDIDX\\x00\\x00"   9-byte magic
    uint64  version (1)
    uint8   dtype code of the items in .bin (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
            6 float64, 7 float32, 8 uint16)
    uint64  sequence (item) count N
    uint64  document-index count D (number of documents + 1)
    int32[N]  item lengths, in elements
    int64[N]  item byte offsets into .bin
    int64[D]  document boundaries: item indices, starting at 0 and ending at N
    int8[N]   item modes, multimodal datasets only (0 text, 1 image)

The file does not say whether modes are present; megatron-core is told (`multimodal=True`), and
we read it from the file size. An image item follows Megatron's tools/preprocess_mmdata.py: the
JPEG bytes padded with zeros to a whole number of elements, preceded by one element holding the
number of padding bytes. A multimodal document is one image-text pair: [caption, image].

Outputs are written under temporary names and renamed by `finalize()`, the .idx last, so a
`PREFIX.idx` beside a `PREFIX.bin` always means a complete dataset.
"""

from __future__ import annotations

import os
import shutil
import struct
from array import array

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
          7: np.float32, 8: np.uint16}
DTYPE_CODES = {np.dtype(t): c for c, t in DTYPES.items()}
TEXT_MODE, IMAGE_MODE = 0, 1
MULTIMODAL_DTYPE = np.int32  # what Megatron's multimodal preprocessing writes


class IndexedDatasetError(ValueError):
    """A missing, truncated or inconsistent indexed dataset; the message is one line."""


def token_dtype(vocab_size: int) -> type[np.number]:
    """Megatron's choice for token ids: uint16 while the vocabulary fits, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


def encode_image_item(data: bytes, dtype: type[np.number] = MULTIMODAL_DTYPE) -> np.ndarray:
    """Image bytes as one item: [number of padding bytes, bytes padded to whole elements]."""
    size = np.dtype(dtype).itemsize
    pad = -len(data) % size
    body = np.frombuffer(data + b"\x00" * pad, dtype=dtype)
    return np.concatenate([np.array([pad], dtype=dtype), body])


def decode_image_item(item: np.ndarray) -> bytes:
    """The image bytes of an item written by `encode_image_item` (or Megatron's tool)."""
    if len(item) == 0:
        raise IndexedDatasetError("empty image item")
    pad = int(item[0])
    raw = item[1:].tobytes()
    if not 0 <= pad < item.itemsize or pad > len(raw):
        raise IndexedDatasetError(f"image item has an impossible padding count {pad}")
    return raw[:len(raw) - pad]


class IndexedDataset:
    """Memory-mapped reader: item i is a zero-copy view into PREFIX.bin.

    Pickles as its prefix, so DataLoader workers (fork or spawn) reopen the files instead of
    copying them.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._open()

    def _open(self) -> None:
        prefix = self.prefix
        if not dataset_exists(prefix):
            missing = [p for p in (bin_path(prefix), idx_path(prefix)) if not os.path.isfile(p)]
            raise IndexedDatasetError(f"indexed dataset {prefix}: {' and '.join(missing)} not "
                                      "found (build it with tools/preprocess_data.py)")
        path = idx_path(prefix)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE or header[:len(MAGIC)] != MAGIC:
            raise IndexedDatasetError(f"{path} is not a Megatron indexed dataset index (bad header)")
        # n items; num_bounds document boundaries (documents + 1, the first at item 0)
        version, code, n, num_bounds = struct.unpack("<QBQQ", header[len(MAGIC):])
        if version != VERSION:
            raise IndexedDatasetError(f"{path}: unsupported index version {version}")
        if code not in DTYPES:
            raise IndexedDatasetError(f"{path}: unknown dtype code {code}")
        body = HEADER_SIZE + 4 * n + 8 * n + 8 * num_bounds
        if size not in (body, body + n):
            raise IndexedDatasetError(f"{path} has {size} bytes, expected {body} or {body + n} for "
                                      f"{n} items and {num_bounds - 1} documents (truncated or corrupt)")
        self.dtype = np.dtype(DTYPES[code])
        self.multimodal = size == body + n and n > 0
        idx = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        off = HEADER_SIZE
        self.sequence_lengths = idx[off:off + 4 * n].view(np.int32)
        off += 4 * n
        self.sequence_pointers = idx[off:off + 8 * n].view(np.int64)
        off += 8 * n
        self.document_indices = idx[off:off + 8 * num_bounds].view(np.int64)
        off += 8 * num_bounds
        self.sequence_modes = idx[off:off + n].view(np.int8) if self.multimodal else None
        if num_bounds < 1 or self.document_indices[0] != 0 or self.document_indices[-1] != n \
                or (np.diff(self.document_indices) < 0).any():
            raise IndexedDatasetError(f"{path}: document boundaries are not a sorted list from 0 "
                                      f"to {n} items")
        bin_size = os.path.getsize(bin_path(prefix))
        ends = self.sequence_pointers + self.sequence_lengths.astype(np.int64) * self.dtype.itemsize
        if n and ((self.sequence_lengths < 0).any() or (self.sequence_pointers < 0).any()
                  or int(ends.max()) > bin_size):
            raise IndexedDatasetError(f"{bin_path(prefix)} ({bin_size} bytes) is shorter than its "
                                      "index says (truncated or from another run)")
        self._bin = (np.memmap(bin_path(prefix), dtype=np.uint8, mode="r") if bin_size
                     else np.zeros(0, np.uint8))

    def __getstate__(self) -> str:
        return self.prefix

    def __setstate__(self, prefix: str) -> None:
        self.prefix = prefix
        self._open()

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def data(self) -> np.ndarray:
        """All of PREFIX.bin as one memory-mapped array of the item dtype."""
        return self._bin[:len(self._bin) - len(self._bin) % self.dtype.itemsize].view(self.dtype)

    def _read(self, start: int, count: int) -> np.ndarray:
        return self._bin[start:start + count * self.dtype.itemsize].view(self.dtype)

    def __getitem__(self, i: int) -> np.ndarray:
        """Item i (a sentence, a document, a caption or an image), as stored."""
        return self._read(int(self.sequence_pointers[i]), int(self.sequence_lengths[i]))

    def document(self, doc: int) -> np.ndarray:
        """All items of document `doc`, concatenated (they are contiguous in .bin)."""
        first, last = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        if first == last:
            return np.zeros(0, self.dtype)
        total = int(self.sequence_lengths[first:last].sum())
        return self._read(int(self.sequence_pointers[first]), total)

    def image_bytes(self, i: int) -> bytes:
        """The encoded image of item i, which must have the image mode."""
        if self.sequence_modes is None or self.sequence_modes[i] != IMAGE_MODE:
            raise IndexedDatasetError(f"{self.prefix}: item {i} is not an image")
        return decode_image_item(self[i])


def tmp_bin_path(prefix: str) -> str:
    """Where IndexedDatasetWriter builds the .bin until it is finalized."""
    return bin_path(prefix) + ".tmp"


class IndexedDatasetWriter:
    """Builds PREFIX.bin/.idx under temporary names; `finalize()` renames them into place.

    Used as a context manager, an exception removes the temporary files instead, so an
    interrupted run leaves nothing that loads.
    """

    def __init__(self, prefix: str, dtype: type[np.number], multimodal: bool = False,
                 resume: list[dict] | None = None):
        """With resume, the `sync` records of an interrupted writer of the same prefix: its
        temporary .bin is cut back to the last one and continued."""
        if np.dtype(dtype) not in DTYPE_CODES:
            raise ValueError(f"dtype {dtype} has no code in the indexed dataset format")
        self.prefix, self.dtype, self.multimodal = prefix, np.dtype(dtype), multimodal
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._tmp_bin, self._tmp_idx = tmp_bin_path(prefix), idx_path(prefix) + ".tmp"
        self._lengths = array("i")
        self._doc_index = array("q", [0])
        self._modes = array("b")
        self._done = False
        if resume:
            self._file = open(self._tmp_bin, "r+b")
            self._file.truncate(resume[-1]["bin_bytes"])
            self._file.seek(resume[-1]["bin_bytes"])
            for record in resume:
                self._lengths.frombytes(record["lengths"])
                self._doc_index.frombytes(record["doc_index"])
                self._modes.frombytes(record["modes"])
        else:
            self._file = open(self._tmp_bin, "wb")
        self._synced = (len(self._lengths), len(self._doc_index), len(self._modes))

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()

    def _bytes(self, values: np.ndarray) -> bytes:
        values = np.asarray(values)
        if values.size and values.dtype != self.dtype and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            if values.min() < info.min or values.max() > info.max:
                raise ValueError(f"item values outside the range of {self.dtype}")
        return values.astype(self.dtype, copy=False).tobytes()

    def add_item(self, item: np.ndarray, mode: int = TEXT_MODE) -> None:
        if not self.multimodal and mode != TEXT_MODE:
            raise ValueError("only multimodal datasets take items of other modes than text")
        self._file.write(self._bytes(item))
        self._lengths.append(len(item))
        if self.multimodal:
            self._modes.append(mode)

    def add_documents(self, tokens: np.ndarray, item_lengths: np.ndarray,
                      doc_items: np.ndarray) -> None:
        """Append many text documents at once: their items' tokens concatenated, each item's
        length, and each document's number of items."""
        if self.multimodal:
            raise ValueError("add_documents writes text datasets; add items one by one instead")
        if self._doc_index[-1] != len(self._lengths):
            self.end_document()
        base = len(self._lengths)
        self._file.write(self._bytes(tokens))
        self._lengths.frombytes(np.asarray(item_lengths, dtype=np.int32).tobytes())
        self._doc_index.frombytes((base + np.cumsum(doc_items, dtype=np.int64)).tobytes())

    def add_image(self, data: bytes) -> None:
        self.add_item(encode_image_item(data, self.dtype), IMAGE_MODE)

    def end_document(self) -> None:
        self._doc_index.append(len(self._lengths))

    def add_dataset(self, prefix: str, keep: np.ndarray | None = None) -> None:
        """Append every document of another dataset of the same dtype and kind (a merge), or
        with keep, a boolean per document, those it marks."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(f"{prefix} holds {other.dtype}, this dataset {self.dtype}")
        if other.num_documents and other.multimodal != self.multimodal:
            kinds = {True: "multimodal", False: "text"}
            raise IndexedDatasetError(f"{prefix} is {kinds[other.multimodal]}, this dataset "
                                      f"{kinds[self.multimodal]}")
        if keep is not None and not keep.all():
            self._add_documents_of(other, np.flatnonzero(keep))
            return
        base = len(self._lengths)
        self._lengths.frombytes(np.ascontiguousarray(other.sequence_lengths).tobytes())
        self._doc_index.frombytes((np.asarray(other.document_indices[1:]) + base).tobytes())
        if self.multimodal and other.sequence_modes is not None:
            self._modes.frombytes(np.ascontiguousarray(other.sequence_modes).tobytes())
        with open(bin_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._file, 16 << 20)

    def _add_documents_of(self, other: IndexedDataset, docs: np.ndarray) -> None:
        """Append documents `docs` (ascending) of other, copying each run of consecutive ones
        from its .bin at once."""
        if self._doc_index[-1] != len(self._lengths):
            self.end_document()
        bounds = np.asarray(other.document_indices)
        first, end = bounds[docs], bounds[docs + 1]  # item ranges
        counts = end - first
        items = np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        base = len(self._lengths)
        self._lengths.frombytes(np.ascontiguousarray(other.sequence_lengths[items]).tobytes())
        self._doc_index.frombytes((base + np.cumsum(counts)).astype(np.int64).tobytes())
        if self.multimodal and other.sequence_modes is not None:
            self._modes.frombytes(np.ascontiguousarray(other.sequence_modes[items]).tobytes())
        run_starts = np.flatnonzero(np.concatenate([[True], docs[1:] != docs[:-1] + 1]))
        run_ends = np.concatenate([run_starts[1:], [len(docs)]]) - 1
        pointers, lengths = np.asarray(other.sequence_pointers), np.asarray(other.sequence_lengths)
        with open(bin_path(other.prefix), "rb") as f:
            for a, b in zip(first[run_starts].tolist(), (end[run_ends] - 1).tolist()):
                if b < a:
                    continue  # a run of empty documents
                start, stop = int(pointers[a]), int(pointers[b]) + int(lengths[b]) * self.dtype.itemsize
                f.seek(start)
                while start < stop:
                    piece = f.read(min(16 << 20, stop - start))
                    self._file.write(piece)
                    start += len(piece)

    def sync(self, durable: bool = True) -> dict:
        """Hand the .bin to the OS (a killed process loses nothing then), and with durable, to
        the disk; return what was added since the last sync: a record that lets `resume`
        continue from here (data/journal.py)."""
        self._file.flush()
        if durable:
            os.fsync(self._file.fileno())
        items, docs, modes = self._synced
        self._synced = (len(self._lengths), len(self._doc_index), len(self._modes))
        return {"bin_bytes": self._file.tell(), "lengths": self._lengths[items:].tobytes(),
                "doc_index": self._doc_index[docs:].tobytes(), "modes": self._modes[modes:].tobytes()}

    def finalize(self) -> None:
        """Write the index, then move both files into place (the old .idx goes first)."""
        self._file.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int32) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        if self._doc_index[-1] != len(lengths):
            self.end_document()  # items after the last end_document() form one more document
        with open(self._tmp_idx, "wb") as f:
            f.write(MAGIC + struct.pack("<QBQQ", VERSION, DTYPE_CODES[self.dtype], len(lengths),
                                        len(self._doc_index)))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.frombuffer(self._doc_index, dtype=np.int64).tobytes())
            if self.multimodal:
                f.write(np.frombuffer(self._modes, dtype=np.int8).tobytes() if self._modes else b"")
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(idx_path(self.prefix)):
            os.remove(idx_path(self.prefix))
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))
        self._done = True

    def abort(self) -> None:
        """Drop everything written so far."""
        self._file.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)
        self._done = True


def merge_datasets(prefixes: list[str], out_prefix: str) -> IndexedDataset:
    """Concatenate datasets of one dtype and kind, in the order given, into out_prefix."""
    if not prefixes:
        raise IndexedDatasetError("nothing to merge")
    first = IndexedDataset(prefixes[0])
    multimodal = any(IndexedDataset(p).multimodal for p in prefixes)
    with IndexedDatasetWriter(out_prefix, first.dtype, multimodal) as writer:
        for prefix in prefixes:
            writer.add_dataset(prefix)
    return IndexedDataset(out_prefix)
