"""How long a group snapshot holds its volumes' writes, per group size, in
a thin class and in a thick class.

Each volume has ext4 mounted, and a writer appends a small synchronous
write to each in turn, timing every write. (A thick member is a copy: what
the writes wait for is the temporary COW snapshot cut for each member while
they are held; the copies run after.) The pause is
the longest a write waited while the call ran: what an application sees of
the group's freeze. The baseline, in the same run: the longest wait during
an ordinary CreateSnapshot of one such volume (LVM's own suspend of it). The
ratio says what holding a group for one instant costs over one snapshot.
Needs a kernel on which LVM may snapshot a frozen filesystem (run it in the
VM of ``python -m tools.kernels``).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from bench.measure import BLOCK, MiB, Row, run
from csi_lvm.csi import csi_pb2
from csi_lvm.lvm.names import dm_name

if TYPE_CHECKING:
    from bench.figures import Bench

SIZES = (1, 2, 4, 8)
T = TypeVar("T")


class _Writer:
    """Synchronous 4 KiB writes to each file in turn; the longest wait while armed."""

    def __init__(self, paths: list[str]) -> None:
        self.fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_DSYNC, 0o644) for p in paths]
        self.longest = 0.0
        self.armed = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._write, daemon=True)
        self.thread.start()

    def _write(self) -> None:
        block = os.urandom(4096)
        turn = 0
        while not self.stop.is_set():
            started = time.monotonic()
            os.pwrite(self.fds[turn % len(self.fds)], block, (turn // len(self.fds)) % 256 * 4096)
            waited = time.monotonic() - started
            if self.armed:
                self.longest = max(self.longest, waited)
            turn += 1

    def longest_wait(self, call: Callable[[], T]) -> tuple[float, T]:
        """The longest a write waited while ``call`` ran, and its answer."""
        time.sleep(0.5)  # a steady stream first
        self.longest, self.armed = 0.0, True
        answer = call()
        time.sleep(0.2)  # the write held until the end completes
        self.armed = False
        return self.longest, answer

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)
        for fd in self.fds:
            os.close(fd)


def group_pauses(bench: Bench, samples: int, device_class: str = "thin") -> None:
    volumes = [
        bench.create(bench.name("group"), 64 * MiB, BLOCK, device_class=device_class)
        for _ in range(max(SIZES))
    ]
    points: list[Path] = []
    try:
        for volume in volumes:
            device = f"/dev/mapper/{dm_name(bench.vg.name, volume.volume_id.rsplit(':', 1)[-1])}"
            run("mkfs.ext4", "-q", device)
            point = bench.work / f"group-{device_class}-{len(points)}"
            point.mkdir()
            run("mount", device, str(point))
            points.append(point)
        writer = _Writer([str(p / "data") for p in points])
        singles: list[float] = []
        by_size: dict[int, list[float]] = {size: [] for size in SIZES}
        groups: list[str] = []
        snapshots: list[str] = []
        try:
            for _ in range(samples):
                request = csi_pb2.CreateSnapshotRequest(
                    name=bench.name("single"), source_volume_id=volumes[0].volume_id
                )
                wait, single = writer.longest_wait(
                    partial(bench.csi.controller.CreateSnapshot, request, timeout=300)
                )
                singles.append(wait)
                snapshots.append(single.snapshot.snapshot_id)
                for size in SIZES:
                    together = csi_pb2.CreateVolumeGroupSnapshotRequest(
                        name=bench.name("group"),
                        source_volume_ids=[v.volume_id for v in volumes[:size]],
                    )
                    wait, made = writer.longest_wait(partial(
                        bench.csi.group_controller.CreateVolumeGroupSnapshot, together, timeout=300
                    ))  # fmt: skip
                    by_size[size].append(wait)
                    groups.append(made.group_snapshot.group_snapshot_id)
        finally:
            writer.close()
        baseline = statistics.median(singles)
        for size in SIZES:
            pause = statistics.median(by_size[size])
            bench.add(Row(
                f"Writes held by a {device_class} group snapshot of {size} mounted volume(s) vs "
                "by one snapshot",
                pause, baseline, pause / baseline, "", None, "s",
                f"median of {samples}; longest wait of a synchronous 4 KiB write, ext4, "
                f"one writer over all {len(volumes)} volumes in turn",
            ))  # fmt: skip
        for group_id in groups:
            bench.csi.group_controller.DeleteVolumeGroupSnapshot(
                csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group_id)
            )
        for snapshot_id in snapshots:
            bench.csi.controller.DeleteSnapshot(
                csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id)
            )
    finally:
        for point in points:
            subprocess.run(["umount", str(point)], check=False)
        for volume in volumes:
            bench.delete(volume.volume_id)
