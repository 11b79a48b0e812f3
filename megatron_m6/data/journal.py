"""Resumable corpus runs: what the writer has done, chunk by chunk, so a killed run continues.

After each chunk, the writer process of tools/preprocess_data.py hands its temporary outputs to
the OS and appends one record to `PREFIX.journal` (every SYNC_SECONDS, all of them also go to the
disk with fsync, which at every chunk cost 15% of a text run's rate): what the chunk added to each output (item lengths,
document boundaries, the .bin's size), to the deduplicator (the kept documents' keys) and to the
counts. `--resume` replays the records into a fresh writer, deduplicator and Stats, cuts the
temporary .bin files back to the last record's sizes and skips the chunks already done, so the
output equals an uninterrupted run's, byte for byte. A record is a length, a CRC32 and a pickle:
one cut short by a kill fails its check and is dropped with everything after it.

The journal's first record (its header) holds the settings digest and the input files (sizes and
modification times) of data/shards.py's manifest, so a journal is only resumed by the same run.
"""

from __future__ import annotations

import os
import pickle
import struct
import zlib

JOURNAL_VERSION = 1
SYNC_SECONDS = 10.0  # a process kill loses no chunk; a machine crash at most this much work
_HEAD = struct.Struct("<QI")  # payload length, CRC32 of the payload


class JournalMismatch(ValueError):
    """The journal on disk was written by another run (settings or inputs differ)."""


def _records(path: str) -> tuple[list, int]:
    """The complete records of a journal file and the byte offset where they end."""
    records, end = [], 0
    with open(path, "rb") as f:
        data = f.read()
    while end + _HEAD.size <= len(data):
        length, crc = _HEAD.unpack_from(data, end)
        payload = data[end + _HEAD.size:end + _HEAD.size + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            break
        records.append(pickle.loads(payload))
        end += _HEAD.size + length
    return records, end


class Journal:
    """An append-only file of records."""

    def __init__(self, path: str, header: dict, resume: bool):
        """Open the journal at path. Without resume, any journal there is replaced by a new one
        with this header. With resume, a journal with an equal header is continued (its records
        are `self.done`), a different one is refused, and a missing one starts from zero."""
        self.path, self.done = path, []
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume and os.path.exists(path):
            records, end = _records(path)
            if not records or records[0] != {"version": JOURNAL_VERSION, **header}:
                raise JournalMismatch(f"{path} was written by a run with other settings or inputs; "
                                      "run without --resume to start over")
            self.done = records[1:]
            self._file = open(path, "r+b")
            self._file.truncate(end)
            self._file.seek(end)
        else:
            self._file = open(path, "wb")
            self.append({"version": JOURNAL_VERSION, **header})

    def append(self, record: dict, durable: bool = True) -> None:
        """Write a record where a kill cannot lose it, and with durable, where a crash cannot."""
        payload = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
        self._file.write(_HEAD.pack(len(payload), zlib.crc32(payload)) + payload)
        self._file.flush()
        if durable:
            os.fsync(self._file.fileno())

    def remove(self) -> None:
        """The run finished or failed for good: nothing is left to resume."""
        self._file.close()
        if os.path.exists(self.path):
            os.remove(self.path)
