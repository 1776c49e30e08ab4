"""Issue 19: what changed block tracking saves a backup.

A 4 GiB thin volume with its first GiB written, a base snapshot, then 1 % of
the volume (41 MiB, in 64 KiB writes spread over all of it) rewritten, and a
target snapshot. GetMetadataDelta between the two, against the naive way: read
both snapshots whole and compare them. Both answers must name the same
bytes; the ratio is the delta's time over the naive time, in one run.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import TYPE_CHECKING

from bench.measure import BLOCK, GiB, MiB, Row, run
from csi_lvm.csi import csi_pb2, csi_pb2_grpc

if TYPE_CHECKING:
    from bench.figures import Bench

VOLUME = 4 * GiB
WRITTEN = 1 * GiB
CHANGE = 64 * 1024
COMPARE = 4 * MiB  # read and compared at a time


def changed_blocks(bench: Bench, samples: int) -> None:
    stub = csi_pb2_grpc.SnapshotMetadataStub(bench.csi.channel)
    volume = bench.create(bench.name("cbt"), VOLUME, BLOCK)
    lv = volume.volume_id.rsplit(":", 1)[-1]
    device = bench.dm_path(lv)
    run("dd", "if=/dev/urandom", f"of={device}", "bs=4M", f"count={WRITTEN // (4 * MiB)}",
        "oflag=direct", "status=none")  # fmt: skip
    base = snapshot(bench, volume.volume_id)
    changes = VOLUME // 100 // CHANGE
    stride = VOLUME // changes // CHANGE * CHANGE
    fd = os.open(device, os.O_WRONLY)
    try:
        for number in range(changes):
            os.pwrite(fd, os.urandom(CHANGE), number * stride + (number % 7) * CHANGE)
        os.fsync(fd)
    finally:
        os.close(fd)
    target = snapshot(bench, volume.volume_id)

    request = csi_pb2.GetMetadataDeltaRequest(base_snapshot_id=base, target_snapshot_id=target)
    times, answer = [], []
    for _ in range(samples):
        started = time.monotonic()
        answer = [
            (b.byte_offset, b.size_bytes)
            for message in stub.GetMetadataDelta(request, timeout=600)
            for b in message.block_metadata
        ]
        times.append(time.monotonic() - started)

    paths = [activated(bench, snapshot_id) for snapshot_id in (base, target)]
    started = time.monotonic()
    naive = compare_whole(*paths)
    naive_seconds = time.monotonic() - started
    for snapshot_id in (base, target):
        run("lvm", "lvchange", "-an", f"{bench.vg.name}/{snapshot_id.rsplit(':', 1)[-1]}")
    changed = sum(length for _, length in answer)
    if not covered(naive) <= covered(answer):
        raise AssertionError("the delta misses bytes that differ")
    bench.remove_all_but_pool()
    delta_seconds = statistics.median(times)
    bench.add(Row(
        "GetMetadataDelta 4 GiB thin, 1 % changed, vs reading both snapshots whole and comparing",
        delta_seconds, naive_seconds, delta_seconds / naive_seconds, "<= 0.1",
        delta_seconds / naive_seconds <= 0.1, "s",
        f"median of {samples}; {len(answer)} ranges, {changed / MiB:.1f} MiB (naive: "
        f"{len(naive) * CHANGE / MiB:.1f} MiB differ); naive once",
    ))  # fmt: skip


def snapshot(bench: Bench, volume_id: str) -> str:
    request = csi_pb2.CreateSnapshotRequest(name=bench.name("cbt-snap"), source_volume_id=volume_id)
    snapshot_id: str = bench.csi.controller.CreateSnapshot(
        request, timeout=300
    ).snapshot.snapshot_id
    return snapshot_id


def activated(bench: Bench, snapshot_id: str) -> str:
    lv = f"{bench.vg.name}/{snapshot_id.rsplit(':', 1)[-1]}"
    run("lvm", "lvchange", "-ay", "-K", lv)
    return bench.dm_path(lv.split("/", 1)[1])


def compare_whole(first: str, second: str) -> list[tuple[int, int]]:
    """The 64 KiB pieces where two devices differ, read whole."""
    found: list[tuple[int, int]] = []
    with open(first, "rb", buffering=0) as a, open(second, "rb", buffering=0) as b:
        offset = 0
        while True:
            left, right = a.read(COMPARE), b.read(COMPARE)
            if not left and not right:
                return found
            if left != right:
                for at in range(0, max(len(left), len(right)), CHANGE):
                    if left[at : at + CHANGE] != right[at : at + CHANGE]:
                        found.append((offset + at, CHANGE))
            offset += COMPARE


def covered(ranges: list[tuple[int, int]]) -> set[int]:
    """The 64 KiB pieces the ranges cover."""
    return {piece for offset, length in ranges for piece in range(offset // CHANGE,
            (offset + length + CHANGE - 1) // CHANGE)}  # fmt: skip
