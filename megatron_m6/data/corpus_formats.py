"""The formats real corpora come in, read as a stream of rows for tools/preprocess_data.py.

    file                               a row is
    *.jsonl, *.json                    a line (read by byte range, in parallel: data/preprocess.py)
    *.jsonl.gz, *.jsonl.zst            a line, decompressed on the fly
    *.parquet                          a table row: {column: value}, image columns as bytes
    *.tar (webdataset, img2dataset)    a sample: the files KEY.* that follow each other in the tar

A webdataset sample's KEY.jpg/.jpeg/.png/.webp becomes its image (bytes, under the image key),
KEY.txt its text (under the text key) and KEY.json's fields its fields (they win over KEY.txt).
Tars are read as a stream, never unpacked to disk. Nothing here decodes an image or parses a
line: the workers do, so every format gets the same cleaning and the same counted skips.

A compressed file or a tar cannot be split by byte range: `stream_chunks` cuts its rows into
chunks as it reads, each with the raw file position it reached (for the progress bar). A file
that turns out corrupt part-way ends there: `CorruptFile` carries the rows read before it.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Iterator

STREAMED_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".parquet", ".tar")
INPUT_SUFFIXES = (".jsonl", ".json") + STREAMED_SUFFIXES
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
UTF8_BOM = b"\xef\xbb\xbf"
ROW_BATCH = 256  # parquet rows per read
JSON_MEMBER = "__json__"  # a webdataset row's KEY.json, unparsed


def is_streamed(path: str) -> bool:
    return path.endswith(STREAMED_SUFFIXES)


class CorruptFile(Exception):
    """A compressed file or tar that cannot be read further; the rows before it are kept."""

    def __init__(self, path: str, rows: int, cause: Exception):
        super().__init__(f"{path}: unreadable after {rows} rows ({type(cause).__name__}: {cause})")
        self.path, self.rows = path, rows


def _decompressed(path: str, raw) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    import zstandard

    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))


def _jsonl_rows(path: str, raw) -> Iterator[bytes]:
    """Lines of a compressed jsonl, without their newline; a BOM at the start is dropped."""
    for n, line in enumerate(_decompressed(path, raw)):
        if n == 0 and line.startswith(UTF8_BOM):
            line = line[len(UTF8_BOM):]
        yield line.rstrip(b"\n")


def _tar_rows(raw, text_key: str, image_key: str) -> Iterator[dict]:
    """Webdataset samples: consecutive members with one key (the path up to the basename's first
    dot) make one row."""
    row, key = None, None
    tar = tarfile.open(fileobj=raw, mode="r|*")
    for member in tar:
        if not member.isfile():
            continue
        folder, base = os.path.split(member.name)
        stem, _, suffix = base.partition(".")
        if (folder, stem) != key:
            if row is not None:
                yield row
            row, key = {}, (folder, stem)
        data = tar.extractfile(member).read()
        suffix = "." + suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            row[image_key] = data
        elif suffix == ".json":
            row[JSON_MEMBER] = data  # parsed by the worker, so a bad one is a counted skip
        elif suffix == ".txt":
            row[text_key] = data.decode("utf-8", errors="replace")
    if row is not None:
        yield row


def _parquet_rows(path: str, columns: list[str]) -> tuple[Iterator[dict], int]:
    """(rows of the named columns the file has, number of rows); an image column may hold bytes
    or a Hugging Face Image struct {bytes, path}. That it has at least one of them was checked
    before any work (data/preprocess.py, check_streamed_inputs)."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    have = set(table.schema_arrow.names)
    batches = table.iter_batches(batch_size=ROW_BATCH, columns=[c for c in columns if c in have])
    return (row for batch in batches for row in batch.to_pylist()), table.metadata.num_rows


def row_bytes(row) -> int:
    """What a row weighs in a chunk: its bytes, embedded images included."""
    if isinstance(row, bytes):
        return len(row) + 1
    return sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in row.values())


def stream_chunks(path: str, chunk_bytes: int, text_key: str, image_key: str,
                  columns: list[str]) -> Iterator[tuple[list, int]]:
    """(rows, bytes of the file read so far) chunks of about chunk_bytes each, in file order.
    Raises CorruptFile (after yielding the rows read before the damage) for a file that cannot
    be read on."""
    size = os.path.getsize(path)
    with open(path, "rb") as raw:
        if path.endswith(".parquet"):
            rows_iter, num_rows = _parquet_rows(path, columns)
            position = lambda: size * done // max(num_rows, 1)  # noqa: E731
        else:
            rows_iter = _tar_rows(raw, text_key, image_key) if path.endswith(".tar") else _jsonl_rows(path, raw)
            position = raw.tell
        rows, weight, done = [], 0, 0
        try:
            for row in rows_iter:
                rows.append(row)
                weight += row_bytes(row)
                if weight >= chunk_bytes:
                    done += len(rows)
                    yield rows, position()
                    rows, weight = [], 0
        except (OSError, EOFError, tarfile.TarError) as e:
            if rows:
                yield rows, position()
            raise CorruptFile(path, done + len(rows), e) from None
        if rows:
            yield rows, size
