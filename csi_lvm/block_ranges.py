"""Byte ranges of a block device: merging, clipping, batching and spooling.

Pure arithmetic on ``(offset, length)`` pairs in ascending order, the shape
the SnapshotMetadata service answers in. Everything works on iterators, so a
map of any size passes through in constant memory; ``RangeSpool`` keeps a
map on disk (16 bytes a range) between the moment it is read and the moment
the caller has taken it. No I/O but the spool's own file.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterable, Iterator

# (byte offset, length in bytes), or the same in chunks before scaling.
Range = tuple[int, int]

_RECORD = struct.Struct("<QQ")
# Ranges read from or written to a spool file at a time.
_SPOOL_BATCH = 4096


def merged(ranges: Iterable[Range]) -> Iterator[Range]:
    """Adjacent and overlapping ranges joined into one; the input must be
    sorted by offset (as thin_dump and thin_delta print them)."""
    start = end = -1
    for offset, length in ranges:
        if length <= 0:
            continue
        if offset < start:
            raise ValueError(f"range at {offset} comes after one at {start}: input not sorted")
        if start >= 0 and offset <= end:
            end = max(end, offset + length)
            continue
        if start >= 0:
            yield start, end - start
        start, end = offset, offset + length
    if start >= 0:
        yield start, end - start


def scaled(ranges: Iterable[Range], unit_bytes: int, limit_bytes: int) -> Iterator[Range]:
    """Ranges counted in units (a pool's chunks) as byte ranges, cut at
    ``limit_bytes`` (the volume's end: its last chunk may reach past it)."""
    for begin, count in ranges:
        offset = begin * unit_bytes
        if offset >= limit_bytes:
            return
        yield offset, min(count * unit_bytes, limit_bytes - offset)


def starting_at(ranges: Iterable[Range], starting_offset: int) -> Iterator[Range]:
    """The ranges that end after ``starting_offset``, the first one cut to
    begin there when it began before."""
    for offset, length in ranges:
        end = offset + length
        if end <= starting_offset:
            continue
        if offset < starting_offset:
            offset = starting_offset
        yield offset, end - offset


def batches(ranges: Iterable[Range], size: int) -> Iterator[list[Range]]:
    """The ranges in lists of at most ``size`` (at least one)."""
    if size < 1:
        raise ValueError("a batch holds at least one range")
    batch: list[Range] = []
    for item in ranges:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class RangeSpool:
    """Ranges written once to an unlinked temporary file, then read back in
    order: a map read from a source that must be let go soon (a thin pool's
    metadata snapshot), handed to a caller who reads it at its own pace."""

    def __init__(self, directory: str | None = None) -> None:
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - closed by close()
        self.count = 0

    def write(self, ranges: Iterable[Range]) -> RangeSpool:
        pending = bytearray()
        for offset, length in ranges:
            pending += _RECORD.pack(offset, length)
            self.count += 1
            if len(pending) >= _SPOOL_BATCH * _RECORD.size:
                self._file.write(pending)
                pending.clear()
        self._file.write(pending)
        self._file.flush()
        return self

    def __iter__(self) -> Iterator[Range]:
        self._file.seek(0, os.SEEK_SET)
        while block := self._file.read(_SPOOL_BATCH * _RECORD.size):
            yield from ((offset, length) for offset, length in _RECORD.iter_unpack(block))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RangeSpool:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
