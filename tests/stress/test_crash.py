"""Crash consistency: SIGKILL the driver (its whole process group) at random
moments of each call that changes LVM, often while an LVM command it started
is running; start it again; retry the call as a sidecar would. LVM runs in a
session of its own, so a command under way finishes by itself. Every retry must succeed, every CSI name must have
exactly one LV with all its tags, and nothing the driver does not own may
change. ``CSI_LVM_KILLS`` sets the kills per kind of call (20 by default);
``CSI_LVM_SEED`` replays a run (each run prints its seed)."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_lvm.csi import csi_pb2
from csi_lvm.ids import Tag, csi_name_in
from csi_lvm.lifecycle import COPYING_TAG, MAKING_TAG
from tests.lvm.helpers import MiB, create_request
from tests.stress.conftest import RESULTS, lv_report, owned_by_driver, untouched_part
from tests.testbed import CsiClient, ForkedDriver, LoopVolumeGroup, write_config

KILLS = int(os.environ.get("CSI_LVM_KILLS", "20"))
SEED = int(os.environ.get("CSI_LVM_SEED", str(random.SystemRandom().randrange(1 << 31))))
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
LVM_COMMANDS = {"lvm", "lvcreate", "lvremove", "lvchange", "lvextend", "lvs", "vgs", "dmsetup"}


class CrashBed:
    def __init__(self, workdir: Path, vg: LoopVolumeGroup) -> None:
        self.vg = vg
        config = write_config(workdir / "crash-config.yaml", vg.name, vg.pool)
        # The driver's log goes where it outlives the VM, for a failure's post-mortem.
        self.driver = ForkedDriver(workdir, config, log_path=RESULTS / "crash-driver.log")
        self.client = CsiClient(self.driver.socket)
        self.driver.start(self.client)
        self.rng = random.Random(SEED)
        self.stats: dict[str, collections.Counter[str]] = {}
        self.seconds: collections.Counter[str] = collections.Counter()

    def retry(self, call: Callable[..., Any], request: Any) -> Any:
        """What a sidecar does: try again until the call answers for real."""
        for _ in range(30):
            try:
                return call(request, timeout=300, wait_for_ready=True)
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE:
                    raise
                time.sleep(0.2)
        raise AssertionError(f"{request} never succeeded")

    def timed(self, call: Callable[..., Any], request: Any) -> float:
        started = time.monotonic()
        self.retry(call, request)
        return time.monotonic() - started

    def crash_during(
        self, kind: str, call: Callable[..., Any], request: Any, window: float, aim: bool
    ) -> Any:
        """Send the call, kill the driver a random moment later, restart, retry.
        With ``aim`` the moment is a random one while LVM runs a command for
        it (a scan or a change; under the lvm shell a command is over in a
        fraction of a second, so blind moments would seldom land there)."""
        counts = self.stats.setdefault(kind, collections.Counter())
        pending = call.future(request, timeout=300)
        if aim:
            deadline = time.monotonic() + window
            while time.monotonic() < deadline and not pending.done():
                if LVM_COMMANDS & set(self.driver.busy_children()):
                    time.sleep(self.rng.uniform(0.0, 0.05))
                    break
        else:
            time.sleep(self.rng.uniform(0.0, window))
        running = self.driver.crash()
        counts["kills"] += 1
        if LVM_COMMANDS & set(running):
            counts["inside an LVM command"] += 1
        elif running:
            counts["inside another command"] += 1
        elif pending.done():
            counts["after the call had answered"] += 1
        else:
            counts["in the driver's own code"] += 1
        with contextlib.suppress(grpc.RpcError):
            pending.result()
        started = time.monotonic()
        self.driver.start(self.client)
        restarted = time.monotonic()
        answer = self.retry(call, request)
        self.seconds["restart"] += restarted - started
        self.seconds["retried call"] += time.monotonic() - restarted
        return answer

    def close(self) -> None:
        self.client.close()
        self.driver.stop()


@pytest.fixture(scope="module")
def bed(workdir: Path, vg: LoopVolumeGroup) -> Iterator[CrashBed]:
    crash_bed = CrashBed(workdir, vg)
    yield crash_bed
    crash_bed.close()
    summary = {
        "seed": SEED,
        "kills_per_kind": KILLS,
        "by_call": {kind: dict(counts) for kind, counts in crash_bed.stats.items()},
        "seconds": {what: round(total, 1) for what, total in crash_bed.seconds.items()},
    }
    (RESULTS / "crash-kills.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ncrash test seed {SEED}: {json.dumps(summary['by_call'])}")


def check_volume_group(
    vg: LoopVolumeGroup, untouched: list[tuple[str, str, str, str]], expected: dict[str, str]
) -> None:
    """``expected`` maps each CSI name that must exist to its kind."""
    rows = lv_report(vg.name)
    assert untouched_part(rows) == untouched, "an LV the driver does not own changed"
    names: collections.Counter[tuple[str, str]] = collections.Counter()
    for row in rows:
        tags = owned_by_driver(row)
        if tags is None:
            continue
        assert MAKING_TAG not in row["lv_tags"], f"{row['lv_name']} was never finished"
        assert COPYING_TAG not in row["lv_tags"], f"{row['lv_name']}: its copy never finished"
        csi_name = tags.get(Tag.NAME) or csi_name_in(row["lv_name"])
        assert csi_name and tags.get(Tag.CLASS), f"{row['lv_name']} lacks tags"
        kind = "snapshot" if row["lv_name"].startswith("snap") else "volume"
        names[(csi_name, kind)] += 1
    assert dict(names) == {(n, k): 1 for n, k in expected.items()}


def test_sigkill_at_random_moments_loses_and_leaks_nothing(
    bed: CrashBed, vg: LoopVolumeGroup
) -> None:
    controller = bed.client.controller
    untouched = untouched_part(lv_report(vg.name))
    expected: dict[str, str] = {}

    def kill_each(kind: str, call: Callable[..., Any], requests: list[Any]) -> list[Any]:
        window = 1.2 * bed.timed(call, requests[0])  # one undisturbed call sets the pace
        # Every other kill is aimed at a moment when LVM is running a command.
        answers = [
            bed.crash_during(kind, call, r, window, aim=i % 2 == 0)
            for i, r in enumerate(requests[1:])
        ]
        inside = bed.stats[kind]["inside an LVM command"]
        assert inside >= len(requests[1:]) // 4, f"{kind}: only {inside} kills hit LVM"
        return answers

    # CreateVolume, thin and thick in turn (thick LVs have a zeroing step to interrupt).
    creates = [
        create_request(f"crash-{i}", 8 * MiB, "thin" if i % 2 == 0 else "thick")
        for i in range(KILLS + 1)
    ]
    volumes = [a.volume for a in kill_each("CreateVolume", controller.CreateVolume, creates)]
    volumes.insert(0, controller.CreateVolume(creates[0]).volume)  # idempotent repeat
    expected.update({r.name: "volume" for r in creates})
    check_volume_group(vg, untouched, expected)

    # Snapshots of thin (instant) and thick (a copy) volumes in turn.
    snapshot_requests = [
        csi_pb2.CreateSnapshotRequest(
            name=f"crash-snap-{i}", source_volume_id=volumes[i % len(volumes)].volume_id
        )
        for i in range(KILLS + 1)
    ]
    kill_each("CreateSnapshot", controller.CreateSnapshot, snapshot_requests)
    snapshots = [controller.CreateSnapshot(r).snapshot for r in snapshot_requests]
    expected.update({r.name: "snapshot" for r in snapshot_requests})
    check_volume_group(vg, untouched, expected)

    restores = [
        create_request(
            f"crash-restore-{i}",
            16 * MiB,
            "thin" if ":thin:" in s.snapshot_id else "thick",
            volume_content_source=csi_pb2.VolumeContentSource(
                snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=s.snapshot_id)
            ),
        )
        for i, s in enumerate(snapshots)
    ]
    restored = [a.volume for a in kill_each("restore", controller.CreateVolume, restores)]
    assert all(v.capacity_bytes == 16 * MiB for v in restored), "an interrupted extend was kept"
    expected.update({r.name: "volume" for r in restores})
    check_volume_group(vg, untouched, expected)

    deletes = [csi_pb2.DeleteSnapshotRequest(snapshot_id=s.snapshot_id) for s in snapshots]
    kill_each("DeleteSnapshot", controller.DeleteSnapshot, deletes)
    for request in snapshot_requests:
        del expected[request.name]
    check_volume_group(vg, untouched, expected)

    all_volumes = [controller.CreateVolume(r).volume.volume_id for r in creates + restores]
    volume_deletes = [csi_pb2.DeleteVolumeRequest(volume_id=v) for v in all_volumes]
    kill_each("DeleteVolume", controller.DeleteVolume, volume_deletes[: KILLS + 1])
    for request in volume_deletes[KILLS + 1 :]:
        controller.DeleteVolume(request)
    check_volume_group(vg, untouched, {})
