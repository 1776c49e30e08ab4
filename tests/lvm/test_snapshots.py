"""Snapshots, restores and clones on a real thin pool."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import grpc
import pytest

from csi_lvm.config import load_config
from csi_lvm.csi import csi_pb2
from csi_lvm.errors import status_for
from csi_lvm.ids import Kind, lv_name_for
from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.errors import LvmMetadataFull
from csi_lvm.wiring import Options, build
from tests.lvm.helpers import (
    GiB,
    MiB,
    block_capability,
    create,
    create_request,
    delete,
    expect_error,
    mount_capability,
    publish,
    stage,
    unpublish,
    unstage,
)
from tests.testbed import DRIVER_NAME, NODE_ID, TOPOLOGY_KEY, CsiClient, Driver, LoopVolumeGroup

Code = grpc.StatusCode
RESULTS = Path(__file__).resolve().parents[2] / "build" / "vm"


def snapshot(csi: CsiClient, name: str, source: str) -> csi_pb2.Snapshot:
    return csi.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=source)
    ).snapshot


def from_snapshot(snapshot_id: str) -> csi_pb2.VolumeContentSource:
    return csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id)
    )


def from_volume(volume_id: str) -> csi_pb2.VolumeContentSource:
    return csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=volume_id)
    )


class Mounted:
    """A volume staged and published under the test's work directory."""

    def __init__(
        self, csi: CsiClient, workdir: Path, volume_id: str, fs_type: str, label: str
    ) -> None:
        self.csi, self.volume_id = csi, volume_id
        self.capability = mount_capability(fs_type)
        self.staging, self.target = str(workdir / f"{label}-s"), str(workdir / f"{label}-t")
        stage(csi, volume_id, self.staging, self.capability)
        publish(csi, volume_id, self.staging, self.target, self.capability)

    def path(self, name: str) -> Path:
        return Path(self.target, name)

    def size(self) -> int:
        info = os.statvfs(self.target)
        return info.f_blocks * info.f_frsize

    def release(self) -> None:
        unpublish(self.csi, self.volume_id, self.target)
        unstage(self.csi, self.volume_id, self.staging)


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_restore_holds_the_data_at_snapshot_time(
    csi: CsiClient, workdir: Path, name: str, fs_type: str
) -> None:
    volume = create(csi, name, 320 * MiB, capability=mount_capability(fs_type))
    origin = Mounted(csi, workdir, volume.volume_id, fs_type, f"{name}-origin")
    origin.path("before.txt").write_text("written before the snapshot")
    os.sync()
    snap = snapshot(csi, f"{name}-snap", volume.volume_id)
    assert snap.ready_to_use and snap.source_volume_id == volume.volume_id
    assert snap.size_bytes == volume.capacity_bytes and snap.creation_time.seconds > 0
    origin.path("after.txt").write_text("written after the snapshot")

    request = create_request(f"{name}-restore", 640 * MiB, capability=mount_capability(fs_type),
                             volume_content_source=from_snapshot(snap.snapshot_id))  # fmt: skip
    restored = csi.controller.CreateVolume(request).volume
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    assert restored.capacity_bytes == 640 * MiB
    # Both mounted side by side on one node: XFS needs the restore's new UUID.
    copy = Mounted(csi, workdir, restored.volume_id, fs_type, f"{name}-restore")
    assert copy.path("before.txt").read_text() == "written before the snapshot"
    assert not copy.path("after.txt").exists()
    assert origin.path("after.txt").exists()
    assert copy.size() > origin.size() * 1.5  # the filesystem grew with the volume

    copy.release()
    origin.release()
    for volume_id in (restored.volume_id, volume.volume_id):
        delete(csi, volume_id)
    csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))


def test_clone_copies_a_live_volume(csi: CsiClient, workdir: Path, name: str) -> None:
    volume = create(csi, name, 64 * MiB, capability=mount_capability("xfs"))
    origin = Mounted(csi, workdir, volume.volume_id, "xfs", f"{name}-o")
    origin.path("data").write_text("cloned")
    os.sync()
    clone = create(csi, f"{name}-clone", 64 * MiB, capability=mount_capability("xfs"),
                   volume_content_source=from_volume(volume.volume_id))  # fmt: skip
    assert clone.content_source.volume.volume_id == volume.volume_id
    copy = Mounted(csi, workdir, clone.volume_id, "xfs", f"{name}-c")
    assert copy.path("data").read_text() == "cloned"
    copy.path("data").write_text("changed in the clone")
    assert origin.path("data").read_text() == "cloned"
    copy.release()
    origin.release()
    delete(csi, clone.volume_id)
    delete(csi, volume.volume_id)


def write_block(csi: CsiClient, workdir: Path, volume_id: str, data: bytes | None) -> bytes:
    """Publish a volume as a raw block device, write ``data`` (or read), unpublish."""
    capability = block_capability()
    target = str(workdir / f"block-{volume_id.rsplit(':', 1)[-1]}")
    publish(csi, volume_id, "", target, capability)
    try:
        with open(target, "r+b") as device:
            if data is not None:
                device.write(data)
                os.fsync(device.fileno())
                return data
            return device.read(64)
    finally:
        unpublish(csi, volume_id, target)


@pytest.mark.parametrize("order", ["source-first", "snapshot-first", "restore-first"])
def test_deleting_in_any_order_loses_nothing_else(
    csi: CsiClient, vg: LoopVolumeGroup, workdir: Path, name: str, order: str
) -> None:
    volume = create(csi, name, 8 * MiB, capability=block_capability())
    marker = f"kept by {name}".encode().ljust(64, b".")
    write_block(csi, workdir, volume.volume_id, marker)
    snap = snapshot(csi, f"{name}-s", volume.volume_id)
    restored = create(
        csi,
        f"{name}-r",
        8 * MiB,
        capability=block_capability(),
        volume_content_source=from_snapshot(snap.snapshot_id),
    )
    objects = {
        "source": lambda: delete(csi, volume.volume_id),
        "snapshot": lambda: csi.controller.DeleteSnapshot(
            csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id)
        ),
        "restore": lambda: delete(csi, restored.volume_id),
    }
    lv_of = {"source": f"csi-{name}", "snapshot": f"snap-{name}-s", "restore": f"csi-{name}-r"}
    first = order.split("-")[0]
    objects[first]()
    objects[first]()  # idempotent
    remaining = vg.lv_names()
    assert lv_of[first] not in remaining
    assert {lv for key, lv in lv_of.items() if key != first} <= remaining
    survivor = restored.volume_id if first != "restore" else volume.volume_id
    assert write_block(csi, workdir, survivor, None) == marker
    for key, remove in objects.items():
        if key != first:
            remove()
    assert not set(lv_of.values()) & vg.lv_names()


def test_snapshot_rules(csi: CsiClient, name: str) -> None:
    volume = create(csi, name, 32 * MiB)
    other = create(csi, f"{name}-other", 32 * MiB)
    snap = snapshot(csi, f"{name}-s", volume.volume_id)
    assert snapshot(csi, f"{name}-s", volume.volume_id).snapshot_id == snap.snapshot_id
    request = csi_pb2.CreateSnapshotRequest
    expect_error(
        Code.ALREADY_EXISTS,
        csi.controller.CreateSnapshot,
        request(name=f"{name}-s", source_volume_id=other.volume_id),
    )
    expect_error(
        Code.NOT_FOUND,
        csi.controller.CreateSnapshot,
        request(name=f"{name}-u", source_volume_id=f"{NODE_ID}:thin:csi-nothing"),
    )
    expect_error(
        Code.INVALID_ARGUMENT,
        csi.controller.CreateSnapshot,
        request(name=f"{name}-v"),
        "source_volume_id",
    )
    expect_error(Code.INVALID_ARGUMENT, csi.controller.CreateSnapshot,
                 request(name=f"{name}-w", source_volume_id=volume.volume_id, parameters={"color": "red"}), "'color'")  # fmt: skip

    # A restore is at least its snapshot's size: a limit below that cannot be met.
    smaller = create_request(
        f"{name}-small", 8 * MiB, volume_content_source=from_snapshot(snap.snapshot_id)
    )
    smaller.capacity_range.limit_bytes = 16 * MiB
    expect_error(Code.OUT_OF_RANGE, csi.controller.CreateVolume, smaller)
    unlimited = csi.controller.CreateVolume(
        create_request(
            f"{name}-min", 8 * MiB, volume_content_source=from_snapshot(snap.snapshot_id)
        )
    ).volume
    assert unlimited.capacity_bytes == 32 * MiB
    delete(csi, unlimited.volume_id)
    elsewhere = create_request(
        f"{name}-far", 32 * MiB, volume_content_source=from_snapshot(snap.snapshot_id),
        accessibility_requirements=csi_pb2.TopologyRequirement(requisite=[csi_pb2.Topology(segments={TOPOLOGY_KEY: "node-b"})]),
    )  # fmt: skip
    expect_error(Code.RESOURCE_EXHAUSTED, csi.controller.CreateVolume, elsewhere, NODE_ID, "node-b")
    foreign = create_request(
        f"{name}-foreign", 32 * MiB, volume_content_source=from_snapshot("node-b:thin:snap-x")
    )
    expect_error(Code.RESOURCE_EXHAUSTED, csi.controller.CreateVolume, foreign, "node-b")
    missing = create_request(
        f"{name}-missing",
        32 * MiB,
        volume_content_source=from_snapshot(f"{NODE_ID}:thin:snap-nothing"),
    )
    expect_error(Code.NOT_FOUND, csi.controller.CreateVolume, missing)
    into_thick = create_request(
        f"{name}-k", 32 * MiB, "thick", volume_content_source=from_snapshot(snap.snapshot_id)
    )
    expect_error(
        Code.INVALID_ARGUMENT, csi.controller.CreateVolume, into_thick, "device class thin"
    )

    got = csi.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert got.snapshot.snapshot_id == snap.snapshot_id and got.snapshot.ready_to_use
    expect_error(Code.INVALID_ARGUMENT, csi.controller.GetSnapshot, csi_pb2.GetSnapshotRequest())
    for unknown in ("none", f"{NODE_ID}:thin:snap-nothing"):
        expect_error(Code.NOT_FOUND, csi.controller.GetSnapshot,
                     csi_pb2.GetSnapshotRequest(snapshot_id=unknown))  # fmt: skip
    listed = csi.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(snapshot_id=snap.snapshot_id)
    )
    assert [e.snapshot.snapshot_id for e in listed.entries] == [snap.snapshot_id]
    by_source = csi.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(source_volume_id=volume.volume_id)
    )
    assert [e.snapshot.snapshot_id for e in by_source.entries] == [snap.snapshot_id]
    assert not csi.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(snapshot_id="none")
    ).entries
    second = snapshot(csi, f"{name}-s2", volume.volume_id)
    page = csi.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(source_volume_id=volume.volume_id, max_entries=1)
    )
    rest = csi.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(
            source_volume_id=volume.volume_id, starting_token=page.next_token
        )
    )
    assert {e.snapshot.snapshot_id for e in [*page.entries, *rest.entries]} == {
        snap.snapshot_id,
        second.snapshot_id,
    }
    for snapshot_id in (
        snap.snapshot_id,
        second.snapshot_id,
        "malformed",
        f"{NODE_ID}:thin:snap-nothing",
    ):
        csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id))
    for v in (volume, other):
        delete(csi, v.volume_id)


def test_restore_time_does_not_depend_on_size(csi: CsiClient, name: str) -> None:
    """Prints (and records) the restore-time ratio of a 4 GiB and a 64 MiB volume."""
    timings = {}
    for size in (64 * MiB, 4 * GiB):
        label = f"{name}-{size // MiB}"
        volume = create(csi, label, size)
        snap = snapshot(csi, f"{label}-s", volume.volume_id)
        started = time.monotonic()
        restored = create(
            csi, f"{label}-r", size, volume_content_source=from_snapshot(snap.snapshot_id)
        )
        timings[size] = time.monotonic() - started
        delete(csi, restored.volume_id)
        csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
        delete(csi, volume.volume_id)
    ratio = timings[4 * GiB] / timings[64 * MiB]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "restore-ratio.json").write_text(json.dumps(
        {"restore_64MiB_s": timings[64 * MiB], "restore_4GiB_s": timings[4 * GiB], "ratio": ratio}))  # fmt: skip
    print(
        f"restore 4 GiB {timings[4 * GiB]:.2f}s / 64 MiB {timings[64 * MiB]:.2f}s = ratio {ratio:.2f}"
    )
    assert timings[4 * GiB] > 0 and timings[64 * MiB] > 0


def test_a_repeated_restore_answers_after_its_snapshot_is_gone(csi: CsiClient, name: str) -> None:
    # A sidecar that lost the first answer asks again, maybe after the user
    # deleted the VolumeSnapshot: the volume exists, so the answer is OK.
    volume = create(csi, name, 8 * MiB)
    snap = snapshot(csi, f"{name}-s", volume.volume_id)
    request = create_request(
        f"{name}-r", 16 * MiB, volume_content_source=from_snapshot(snap.snapshot_id)
    )
    restored = csi.controller.CreateVolume(request).volume
    csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    again = csi.controller.CreateVolume(request).volume
    assert (again.volume_id, again.capacity_bytes) == (restored.volume_id, 16 * MiB)
    assert again.content_source.snapshot.snapshot_id == snap.snapshot_id
    # Another (absent) source for the same name is still a conflict, and a
    # new name from the deleted snapshot is still NOT_FOUND.
    other = snap.snapshot_id.replace(f"{name}-s", f"{name}-x")
    expect_error(
        Code.ALREADY_EXISTS, csi.controller.CreateVolume,
        create_request(f"{name}-r", 16 * MiB, volume_content_source=from_snapshot(other)),
        "different content source",
    )  # fmt: skip
    expect_error(
        Code.NOT_FOUND, csi.controller.CreateVolume,
        create_request(f"{name}-n", 16 * MiB,
                       volume_content_source=from_snapshot(snap.snapshot_id)),
        "does not exist",
    )  # fmt: skip
    delete(csi, restored.volume_id)
    delete(csi, volume.volume_id)


class _ExtendFails(Lvm):
    """The driver's real LVM layer, but every ``lvextend`` is refused as LVM
    refuses one when the VG's metadata area filled meanwhile. No state of a
    real VG makes a thin LV's extend fail on demand and its snapshot succeed
    just before; everything but this one refusal is real."""

    def extend(
        self, volume_group: str, name: str, size_bytes: int, timeout: float | None = None
    ) -> None:
        raise LvmMetadataFull(f"VG {volume_group} metadata on /dev/loop (1048576 bytes)")


@pytest.mark.parametrize("source_kind", ["snapshot", "volume"])
def test_a_thin_restore_or_clone_whose_extend_fails_leaves_no_lv(
    csi: CsiClient, driver: Driver, vg: LoopVolumeGroup, name: str, source_kind: str
) -> None:
    # RESOURCE_EXHAUSTED sends the PVC to another node: an LV left here would
    # never be deleted by anyone.
    volume = create(csi, name, 8 * MiB)
    source_id = volume.volume_id
    if source_kind == "snapshot":
        source_id = snapshot(csi, f"{name}-s", volume.volume_id).snapshot_id
    content = from_snapshot(source_id) if source_kind == "snapshot" else from_volume(source_id)
    lvm = _ExtendFails()
    graph = build(load_config(driver.config), Options(NODE_ID, DRIVER_NAME, TOPOLOGY_KEY), lvm)
    controller = graph.controller
    request = create_request(f"{name}-r", 16 * MiB)  # larger than the source: extended
    request.volume_content_source.CopyFrom(content)
    try:
        with pytest.raises(Exception) as failure:
            controller.CreateVolume(request, None)  # type: ignore[arg-type]
    finally:
        lvm.close()
    code, message = status_for(failure.value)
    assert code is Code.RESOURCE_EXHAUSTED and "metadata area" in message
    assert lv_name_for(Kind.VOLUME, f"{name}-r") not in vg.lv_names()
    restored = csi.controller.CreateVolume(request).volume  # the real driver still can
    assert restored.capacity_bytes == 16 * MiB
    delete(csi, restored.volume_id)
    if source_kind == "snapshot":
        csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=source_id))
    delete(csi, volume.volume_id)
