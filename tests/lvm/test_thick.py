"""Thick snapshots, restores and clones: copies through a temporary COW view."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest

from csi_lvm.csi import csi_pb2
from csi_lvm.ids import Kind, Tag, encode_tags, lv_name_for, view_name_for
from csi_lvm.lifecycle import COPYING_TAG
from csi_lvm.lvm.commands import Lvm
from tests.lvm.helpers import (
    MiB,
    block_capability,
    create,
    delete,
    expect_error,
    lv_tags,
    mount_capability,
    publish,
    unpublish,
)
from tests.lvm.test_snapshots import Mounted, from_snapshot, from_volume, snapshot
from tests.testbed import DRIVER_NAME, CsiClient, LoopVolumeGroup

Code = grpc.StatusCode
SIZE = 64 * MiB
# Data at the start, in the middle and in the last block; zeros elsewhere.
OFFSETS = (0, 40 * MiB, SIZE - 4096)


def block_io(
    csi: CsiClient, workdir: Path, volume_id: str, writes: dict[int, bytes] | None = None
) -> dict[int, bytes]:
    """Publish a volume as a raw block device, write ``writes`` (offset: data)
    or read 64 bytes at each of OFFSETS, unpublish."""
    target = str(workdir / f"thick-block-{volume_id.rsplit(':', 1)[-1]}")
    publish(csi, volume_id, "", target, block_capability())
    try:
        fd = os.open(target, os.O_RDWR)
        try:
            if writes:
                for offset, data in writes.items():
                    os.pwrite(fd, data, offset)
                os.fsync(fd)
                return writes
            return {offset: os.pread(fd, 64, offset) for offset in OFFSETS}
        finally:
            os.close(fd)
    finally:
        unpublish(csi, volume_id, target)


def pattern(label: str) -> dict[int, bytes]:
    return {offset: f"{label}@{offset}".encode().ljust(64, b".") for offset in OFFSETS}


def delete_snapshot(csi: CsiClient, snapshot_id: str) -> None:
    csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id))


def test_thick_snapshot_is_a_point_in_time_copy_that_outlives_its_source(
    csi: CsiClient, vg: LoopVolumeGroup, workdir: Path, name: str
) -> None:
    volume = create(csi, name, SIZE, "thick", capability=block_capability())
    block_io(csi, workdir, volume.volume_id, pattern("before"))
    snap = snapshot(csi, f"{name}-s", volume.volume_id)
    assert snap.ready_to_use and snap.size_bytes == SIZE
    assert snap.source_volume_id == volume.volume_id and snap.creation_time.seconds > 0
    snap_lv = snap.snapshot_id.rsplit(":", 1)[-1]
    assert COPYING_TAG not in lv_tags(vg.name, snap_lv)
    assert not {lv for lv in vg.lv_names() if lv.endswith(".view")}  # the view is gone
    assert snapshot(csi, f"{name}-s", volume.volume_id).snapshot_id == snap.snapshot_id
    got = csi.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert got.snapshot.snapshot_id == snap.snapshot_id and got.snapshot.ready_to_use

    block_io(csi, workdir, volume.volume_id, pattern("after"))
    # The source goes; the snapshot is a copy, so it stays whole.
    delete(csi, volume.volume_id)
    restored = create(csi, f"{name}-r", 2 * SIZE, "thick", capability=block_capability(),
                      volume_content_source=from_snapshot(snap.snapshot_id))  # fmt: skip
    assert restored.capacity_bytes == 2 * SIZE
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    assert block_io(csi, workdir, restored.volume_id) == pattern("before")

    # A thick snapshot restores into its own class only.
    into_thin = create_request_from(f"{name}-thin", "thin", from_snapshot(snap.snapshot_id))
    expect_error(Code.INVALID_ARGUMENT, csi.controller.CreateVolume, into_thin, "class thick")
    delete(csi, restored.volume_id)
    delete_snapshot(csi, snap.snapshot_id)
    assert snap_lv not in vg.lv_names()


def create_request_from(
    name: str, device_class: str, source: csi_pb2.VolumeContentSource
) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
        volume_capabilities=[block_capability()],
        parameters={"deviceClass": device_class},
        volume_content_source=source,
    )


def test_thick_clone_of_a_mounted_filesystem(csi: CsiClient, workdir: Path, name: str) -> None:
    volume = create(csi, name, SIZE, "thick", capability=mount_capability("ext4"))
    origin = Mounted(csi, workdir, volume.volume_id, "ext4", f"{name}-o")
    origin.path("data").write_text("cloned")
    os.sync()
    clone = create(csi, f"{name}-c", SIZE, "thick", capability=mount_capability("ext4"),
                   volume_content_source=from_volume(volume.volume_id))  # fmt: skip
    assert clone.content_source.volume.volume_id == volume.volume_id
    origin.path("later").write_text("written after the clone")
    copy = Mounted(csi, workdir, clone.volume_id, "ext4", f"{name}-c")
    assert copy.path("data").read_text() == "cloned"
    assert not copy.path("later").exists()
    copy.path("data").write_text("changed in the clone")
    assert origin.path("data").read_text() == "cloned"
    copy.release()
    origin.release()
    delete(csi, clone.volume_id)
    delete(csi, volume.volume_id)


def test_an_interrupted_copy_is_redone_on_retry(
    csi: CsiClient, vg: LoopVolumeGroup, workdir: Path, name: str
) -> None:
    """A crash mid-copy leaves the target with COPYING_TAG (and perhaps the
    temporary view): made here by hand through the driver's own LVM layer."""
    lvm = Lvm()
    volume = create(csi, name, SIZE, "thick", capability=block_capability())
    block_io(csi, workdir, volume.volume_id, pattern("source"))
    source_lv = volume.volume_id.rsplit(":", 1)[-1]
    snap_name = f"{name}-s"
    snap_lv = lv_name_for(Kind.SNAPSHOT, snap_name)
    base = {Tag.DRIVER: DRIVER_NAME, Tag.CLASS: "thick", Tag.SOURCE: volume.volume_id}
    lvm.create_linear_volume(
        vg.name, snap_lv, SIZE, [*encode_tags({**base, Tag.NAME: snap_name}), COPYING_TAG]
    )
    made = lvm.find_lv(vg.name, snap_lv)
    assert made is not None
    with open(made.device, "r+b") as device:  # a half-done copy
        device.write(b"garbage" * 1000)
        device.seek(40 * MiB)
        device.write(b"garbage" * 1000)
    view_tags = encode_tags({Tag.DRIVER: DRIVER_NAME, Tag.VIEW_FOR: snap_lv})
    lvm.create_cow_snapshot(
        vg.name, source_lv, view_name_for(snap_lv), 8 * MiB, 64 << 10, view_tags
    )

    listed = csi.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(source_volume_id=volume.volume_id)
    ).entries
    assert [e.snapshot.ready_to_use for e in listed] == [False]
    snapshot_id = listed[0].snapshot.snapshot_id
    restore = create_request_from(f"{name}-early", "thick", from_snapshot(snapshot_id))
    expect_error(Code.FAILED_PRECONDITION, csi.controller.CreateVolume, restore, "incomplete")

    snap = snapshot(csi, snap_name, volume.volume_id)  # the retry
    assert snap.snapshot_id == snapshot_id and snap.ready_to_use
    assert COPYING_TAG not in lv_tags(vg.name, snap_lv)
    assert view_name_for(snap_lv) not in vg.lv_names()

    # An interrupted restore: its volume is unusable until the retry redoes it.
    restored_name = f"{name}-r"
    restored_lv = lv_name_for(Kind.VOLUME, restored_name)
    lvm.create_linear_volume(
        vg.name,
        restored_lv,
        SIZE,
        [*encode_tags({**base, Tag.NAME: restored_name, Tag.SOURCE: snap.snapshot_id}),
         COPYING_TAG],
    )  # fmt: skip
    restored_id = snap.snapshot_id.rsplit(":", 1)[0] + f":{restored_lv}"
    expect_error(
        Code.FAILED_PRECONDITION,
        csi.node.NodePublishVolume,
        csi_pb2.NodePublishVolumeRequest(
            volume_id=restored_id,
            target_path=str(workdir / f"{name}-early"),
            volume_capability=block_capability(),
        ),
        "incomplete",
    )
    request = create_request_from(restored_name, "thick", from_snapshot(snap.snapshot_id))
    restored = csi.controller.CreateVolume(request).volume
    assert restored.volume_id == restored_id
    assert COPYING_TAG not in lv_tags(vg.name, restored_lv)
    assert block_io(csi, workdir, restored.volume_id) == pattern("source")

    delete(csi, restored.volume_id)
    delete_snapshot(csi, snap.snapshot_id)
    delete(csi, volume.volume_id)
    assert not {restored_lv, snap_lv, source_lv} & vg.lv_names()


def test_a_volume_with_an_admin_s_own_snapshot_is_not_deleted(
    csi: CsiClient, name: str, vg: LoopVolumeGroup
) -> None:
    # lvremove of an origin takes its classic snapshots with it.
    volume = create(csi, name, 16 * MiB, "thick")
    lv = volume.volume_id.split(":")[2]
    vg.lvcreate("-s", "-L", "8M", "-n", f"{name}-admin", f"{vg.name}/{lv}")
    try:
        expect_error(
            grpc.StatusCode.FAILED_PRECONDITION,
            csi.controller.DeleteVolume,
            csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id),
            f"{vg.name}/{name}-admin",
            "csi-lvm did not make",
        )
        assert f"{name}-admin" in vg.lv_names() and lv in vg.lv_names()
    finally:
        subprocess.run(["lvremove", "-q", "-y", f"{vg.name}/{name}-admin"], check=True)
    delete(csi, volume.volume_id)
    assert lv not in vg.lv_names()


def test_a_new_thick_volume_never_shows_a_deleted_one_s_data(
    csi: CsiClient, name: str, vg: LoopVolumeGroup
) -> None:
    # lvcreate zeroes only the first 4 KiB: the extents of a deleted volume
    # are handed to the next one as they are, unless the driver zeroes them.
    size = 32 * MiB
    first = create(csi, f"{name}-a", size, "thick", capability=block_capability())
    device = f"/dev/{vg.name}/{first.volume_id.split(':')[2]}"
    secret = b"tenant A's data " * (1 << 16)  # 1 MiB
    with open(device, "r+b") as raw:
        for _ in range(size // len(secret)):
            raw.write(secret)
    extents = pe_ranges(device)
    delete(csi, first.volume_id)
    second = create(csi, f"{name}-b", size, "thick", capability=block_capability())
    device = f"/dev/{vg.name}/{second.volume_id.split(':')[2]}"
    assert pe_ranges(device) == extents  # LVM handed out the same extents again
    with open(device, "rb") as raw:
        content = raw.read()
    assert len(content) == size
    leaked = len(content) - content.count(0)
    assert leaked == 0, f"{leaked} bytes of the new volume are not zero"
    delete(csi, second.volume_id)


def pe_ranges(device: str) -> str:
    return subprocess.run(
        ["lvs", "--noheadings", "-o", "seg_pe_ranges", device],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def test_a_thick_clone_whose_view_cannot_be_made_leaves_no_lv(
    csi: CsiClient, name: str, vg: LoopVolumeGroup
) -> None:
    # An LV that is not the driver's holds the temporary view's name: the
    # copy cannot start, and the answer must not leave the clone's LV behind
    # (the provisioner may reschedule the PVC to another node).
    source = create(csi, name, 16 * MiB, "thick", capability=block_capability())
    clone_lv = lv_name_for(Kind.VOLUME, f"{name}-c")
    vg.lvcreate("-L", "4M", "-n", view_name_for(clone_lv), vg.name)
    try:
        with pytest.raises(grpc.RpcError):
            create(
                csi, f"{name}-c", 16 * MiB, "thick", capability=block_capability(),
                volume_content_source=from_volume(source.volume_id),
            )  # fmt: skip
        assert clone_lv not in vg.lv_names()
    finally:
        subprocess.run(["lvremove", "-q", "-y", f"{vg.name}/{view_name_for(clone_lv)}"], check=True)
    delete(csi, source.volume_id)
