"""Range arithmetic of the SnapshotMetadata service: merging runs, scaling
chunks to bytes, clipping at a starting offset, batching per message and
spooling to disk."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_lvm.block_ranges import RangeSpool, batches, merged, scaled, starting_at

KiB = 1024


def test_adjacent_and_overlapping_runs_merge() -> None:
    runs = [(0, 2), (2, 3), (7, 1), (8, 1), (8, 4), (20, 1)]
    assert list(merged(runs)) == [(0, 5), (7, 5), (20, 1)]


def test_empty_runs_vanish_and_unsorted_input_is_refused() -> None:
    assert list(merged([(0, 0), (3, 0)])) == []
    assert list(merged([])) == []
    with pytest.raises(ValueError, match="not sorted"):
        list(merged([(5, 1), (2, 1)]))


def test_chunks_scale_to_bytes_and_stop_at_the_volume_end() -> None:
    chunk = 64 * KiB
    runs = [(0, 1), (3, 2), (9, 4), (20, 1)]
    # A 10.5-chunk volume: the run that crosses its end is cut, the one past it dropped.
    limit = 10 * chunk + chunk // 2
    assert list(scaled(runs, chunk, limit)) == [
        (0, chunk),
        (3 * chunk, 2 * chunk),
        (9 * chunk, chunk + chunk // 2),
    ]


def test_a_starting_offset_drops_what_ends_before_it_and_cuts_the_first() -> None:
    ranges = [(0, 100), (100, 50), (200, 10), (300, 5)]
    assert list(starting_at(ranges, 0)) == ranges
    assert list(starting_at(ranges, 120)) == [(120, 30), (200, 10), (300, 5)]
    # A range that ends exactly at the offset is over; one that starts there stays whole.
    assert list(starting_at(ranges, 150)) == [(200, 10), (300, 5)]
    assert list(starting_at(ranges, 200)) == [(200, 10), (300, 5)]
    assert list(starting_at(ranges, 305)) == []


def test_batches_hold_at_most_the_maximum() -> None:
    ranges = [(i * 10, 5) for i in range(7)]
    sizes = [len(b) for b in batches(ranges, 3)]
    assert sizes == [3, 3, 1]
    assert [r for b in batches(ranges, 3) for r in b] == ranges
    assert list(batches([], 3)) == []
    with pytest.raises(ValueError):
        list(batches(ranges, 0))


def test_the_spool_gives_back_what_it_was_given_in_order() -> None:
    ranges = [(i * 3 * 65536, 65536 * (i % 5 + 1)) for i in range(10_000)]
    with RangeSpool() as spool:
        spool.write(iter(ranges))
        assert spool.count == len(ranges)
        assert list(spool) == ranges
        assert list(spool) == ranges  # read again from the start


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 20)), max_size=60))
def test_merging_keeps_exactly_the_covered_units(runs: list[tuple[int, int]]) -> None:
    runs.sort()
    covered = {unit for begin, length in runs for unit in range(begin, begin + length)}
    out = list(merged(runs))
    assert {u for begin, length in out for u in range(begin, begin + length)} == covered
    # Disjoint, not touching, ascending, none empty.
    assert all(length > 0 for _, length in out)
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(out))


@given(
    st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 20)), max_size=40),
    st.integers(0, 1100),
    st.integers(1, 7),
)
def test_a_resumed_stream_continues_where_the_first_stopped(
    runs: list[tuple[int, int]], cut: int, per_message: int
) -> None:
    """What a caller gets from ``cut`` on is what it would have had from 0,
    less the bytes before ``cut``; no batch is over-full."""
    runs.sort()
    ranges = list(merged(runs))
    whole = {b for offset, length in ranges for b in range(offset, offset + length)}
    resumed = list(batches(starting_at(ranges, cut), per_message))
    assert all(1 <= len(batch) <= per_message for batch in resumed)
    flat = [r for batch in resumed for r in batch]
    assert {b for offset, length in flat for b in range(offset, offset + length)} == {
        b for b in whole if b >= cut
    }
    if flat:
        first_offset, first_length = flat[0]
        assert cut < first_offset + first_length
