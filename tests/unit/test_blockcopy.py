from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi_lvm.blockcopy import CopyError, copy_device, zero_device

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
