from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_lvm.blockcopy import CopyError, copy_device, read_ahead, zero_device

CHUNK = 64 << 10


def _file(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


def test_copy_makes_the_target_equal_and_zeroes_the_rest(tmp_path: Path) -> None:
    """Without offload: zero chunks are compared and written only where needed."""
    source_data = b"A" * CHUNK + bytes(2 * CHUNK) + b"B" * 4096 + bytes(CHUNK - 4096)
    source = _file(tmp_path / "source", source_data)
    # The target starts with an old LV's leftovers everywhere but one chunk.
    target_data = b"x" * (2 * CHUNK) + bytes(CHUNK) + b"y" * (3 * CHUNK)
    target = _file(tmp_path / "target", target_data)
    stats = copy_device(
        source, target, len(source_data), 6 * CHUNK, chunk_bytes=CHUNK, offload=False
    )
    assert Path(target).read_bytes() == source_data + bytes(2 * CHUNK)
    assert stats.copied_bytes == 2 * CHUNK  # the chunks holding data
    assert stats.zeroed_bytes == 3 * CHUNK  # chunk 1 and the two tail chunks held leftovers
    assert stats.skipped_bytes == CHUNK  # chunk 2 already read zeros

    again = copy_device(
        source, target, len(source_data), 6 * CHUNK, chunk_bytes=CHUNK, offload=False
    )
    assert Path(target).read_bytes() == source_data + bytes(2 * CHUNK)
    assert (again.copied_bytes, again.zeroed_bytes, again.punched_bytes) == (2 * CHUNK, 0, 0)


def test_zero_runs_are_punched_where_the_target_can(tmp_path: Path) -> None:
    source_data = bytes(CHUNK) + b"A" * CHUNK + bytes(3 * CHUNK)
    source = _file(tmp_path / "source", source_data)
    target = _file(tmp_path / "target", b"x" * (6 * CHUNK))
    stats = copy_device(source, target, len(source_data), 6 * CHUNK, chunk_bytes=CHUNK)
    assert Path(target).read_bytes() == source_data + bytes(CHUNK)
    assert stats.copied_bytes == CHUNK
    # Two runs (before and after the data), each one request where files can punch holes.
    assert stats.punched_bytes + stats.zeroed_bytes + stats.skipped_bytes == 5 * CHUNK
    assert stats.punched_bytes in (0, 5 * CHUNK)


def test_a_partial_last_chunk_and_odd_sizes(tmp_path: Path) -> None:
    source_data = os.urandom(CHUNK + 1000)
    source = _file(tmp_path / "source", source_data)
    target = _file(tmp_path / "target", b"z" * (2 * CHUNK + 512))
    copy_device(source, target, len(source_data), 2 * CHUNK + 512, chunk_bytes=CHUNK)
    assert Path(target).read_bytes() == source_data + bytes(2 * CHUNK + 512 - len(source_data))


def test_refuses_what_cannot_be_copied(tmp_path: Path) -> None:
    source = _file(tmp_path / "source", bytes(2 * CHUNK))
    target = _file(tmp_path / "target", bytes(CHUNK))
    with pytest.raises(CopyError, match="needed"):
        copy_device(source, target, 2 * CHUNK, 2 * CHUNK, chunk_bytes=CHUNK)
    with pytest.raises(CopyError, match="cannot copy"):
        copy_device(source, target, 2 * CHUNK, CHUNK, chunk_bytes=CHUNK)
    with pytest.raises(CopyError, match="cannot open"):
        copy_device(str(tmp_path / "missing"), target, CHUNK, CHUNK, chunk_bytes=CHUNK)


def test_zeroing_writes_zeros_only_where_the_target_holds_data(tmp_path: Path) -> None:
    old = b"x" * CHUNK + bytes(CHUNK) + b"y" * 100 + bytes(CHUNK - 100)
    target = _file(tmp_path / "target", old)
    stats = zero_device(target, len(old), chunk_bytes=CHUNK, offload=False)
    assert Path(target).read_bytes() == bytes(len(old))
    assert (stats.zeroed_bytes, stats.skipped_bytes, stats.punched_bytes) == (2 * CHUNK, CHUNK, 0)


def test_zeroing_is_one_request_where_the_target_zeroes_ranges_itself(tmp_path: Path) -> None:
    old = b"x" * (3 * CHUNK)
    target = _file(tmp_path / "target", old)
    stats = zero_device(target, len(old), chunk_bytes=CHUNK)
    assert Path(target).read_bytes() == bytes(len(old))
    assert stats.punched_bytes == len(old) and stats.zeroed_bytes == 0


def test_zeroing_refuses_a_target_smaller_than_asked(tmp_path: Path) -> None:
    target = _file(tmp_path / "target", bytes(CHUNK))
    with pytest.raises(CopyError, match="fewer than"):
        zero_device(target, 2 * CHUNK, chunk_bytes=CHUNK)


# ---- read_ahead: a thread reading pieces before the sender asks


def test_read_ahead_gives_every_item_in_order_and_reads_ahead() -> None:
    produced: list[int] = []
    gate = threading.Event()

    def items() -> Iterator[int]:
        for number in range(10):
            produced.append(number)
            yield number

    ahead = read_ahead(items(), depth=2)
    assert next(ahead) == 0
    deadline = time.monotonic() + 10
    while len(produced) < 4 and time.monotonic() < deadline:  # 0 taken, 1-2 queued, 3 waiting
        gate.wait(0.01)
    assert len(produced) == 4, produced  # no further than depth ahead
    assert list(ahead) == list(range(1, 10))


def test_read_ahead_raises_the_error_where_its_item_would_have_come() -> None:
    def items() -> Iterator[int]:
        yield 1
        raise CopyError("reading /dev/x at byte 4096 failed")

    ahead = read_ahead(items())
    assert next(ahead) == 1
    with pytest.raises(CopyError, match="byte 4096"):
        next(ahead)


def test_a_consumer_that_stops_early_closes_the_source() -> None:
    closed = threading.Event()

    def items() -> Iterator[int]:
        try:
            yield from range(1000)
        finally:
            closed.set()

    ahead = read_ahead(items(), depth=1)
    assert next(ahead) == 0
    ahead.close()  # the device is closed by the time close returns
    assert closed.is_set()
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]
