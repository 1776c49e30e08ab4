"""btrfs volumes keep the promises ext4 and xfs keep: made only on a blank
volume and never reformatted, idempotent stages and publications, usage,
growth while in use, and copies (restores, clones) mounted beside their
source. btrfs reports an anonymous device number for its mounts; every
check of what a path shows must still find the volume's device."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_lvm import fs
from csi_lvm.csi import csi_pb2
from csi_lvm.errors import FailedPrecondition
from tests.lvm.helpers import (
    MiB,
    create,
    create_request,
    delete,
    expect_error,
    fs_type_of,
    is_mounted,
    mount_capability,
    publish,
    stage,
    unpublish,
    unstage,
)
from tests.lvm.test_snapshots import Mounted, from_snapshot, from_volume, snapshot
from tests.testbed import CsiClient, sh

Code = grpc.StatusCode
BTRFS = mount_capability("btrfs")


def written_with_fsync(path: Path, text: str) -> None:
    """Written and fsync'd only: btrfs keeps such a write in its log tree
    until the next commit (every 30 s), which a copy must replay."""
    with open(path, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())


def test_a_btrfs_volume_is_made_once_staged_published_and_measured(
    csi: CsiClient, workdir: Path, name: str
) -> None:
    volume = create(csi, name, 256 * MiB, "thin", capability=BTRFS)
    staging, target = str(workdir / f"{name}-s"), str(workdir / f"{name}-t")
    stage(csi, volume.volume_id, staging, BTRFS)
    stage(csi, volume.volume_id, staging, BTRFS)  # the same mount: OK again
    assert fs_type_of(staging) == "btrfs"
    assert os.major(os.stat(staging).st_dev) == 0  # anonymous: what the driver must see through
    publish(csi, volume.volume_id, staging, target, BTRFS)
    publish(csi, volume.volume_id, staging, target, BTRFS)
    Path(target, "kept").write_text("kept across stages")
    stats = csi.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=target)
    )
    space = {u.unit: u for u in stats.usage}[csi_pb2.VolumeUsage.BYTES]
    assert 200 * MiB < space.total <= 256 * MiB and 0 < space.available < space.total
    assert not stats.volume_condition.abnormal
    # Another volume's path is not this volume's.
    other = create(csi, f"{name}-other", 256 * MiB, "thin", capability=BTRFS)
    other_staging = str(workdir / f"{name}-os")
    stage(csi, other.volume_id, other_staging, BTRFS)
    expect_error(
        Code.NOT_FOUND, csi.node.NodeGetVolumeStats,
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=other_staging),
    )  # fmt: skip
    unstage(csi, other.volume_id, other_staging)
    delete(csi, other.volume_id)

    unpublish(csi, volume.volume_id, target)
    unstage(csi, volume.volume_id, staging)
    assert not is_mounted(staging)
    stage(csi, volume.volume_id, staging, BTRFS)  # mounted again, not made again
    assert Path(staging, "kept").read_text() == "kept across stages"
    unstage(csi, volume.volume_id, staging)
    expect_error(
        Code.FAILED_PRECONDITION, csi.node.NodeStageVolume,
        csi_pb2.NodeStageVolumeRequest(volume_id=volume.volume_id, staging_target_path=staging,
                                       volume_capability=mount_capability("ext4")),
        "already holds btrfs", "never reformats",
    )  # fmt: skip
    assert not is_mounted(staging)
    delete(csi, volume.volume_id)


def test_a_btrfs_volume_is_made_at_least_as_large_as_linux_grows(
    csi: CsiClient, workdir: Path, name: str
) -> None:
    small = create(csi, name, 16 * MiB, "thin", capability=BTRFS)
    assert small.capacity_bytes >= 256 * MiB
    mounted = Mounted(csi, workdir, small.volume_id, "btrfs", name)
    mounted.release()
    delete(csi, small.volume_id)
    too_small = create_request(f"{name}-cut", 16 * MiB, "thin", capability=BTRFS)
    too_small.capacity_range.limit_bytes = 128 * MiB
    expect_error(
        Code.OUT_OF_RANGE, csi.controller.CreateVolume, too_small, f"at least {256 * MiB} bytes"
    )


@pytest.mark.parametrize("device_class", ["thin", "thick"])
def test_a_mounted_btrfs_grows_while_in_use(
    csi: CsiClient, workdir: Path, name: str, device_class: str
) -> None:
    volume = create(csi, name, 256 * MiB, device_class, capability=BTRFS)
    mounted = Mounted(csi, workdir, volume.volume_id, "btrfs", name)
    before = mounted.size()
    with open(mounted.path("busy.log"), "w") as busy:  # open across the resize
        busy.write("in use\n")
        grown = csi.node.NodeExpandVolume(
            csi_pb2.NodeExpandVolumeRequest(
                volume_id=volume.volume_id, volume_path=mounted.target,
                staging_target_path=mounted.staging,
                capacity_range=csi_pb2.CapacityRange(required_bytes=400 * MiB),
            )
        )  # fmt: skip
        busy.write("still writing\n")
    assert grown.capacity_bytes == 400 * MiB
    assert mounted.size() > before + 120 * MiB
    mounted.release()
    delete(csi, volume.volume_id)


@pytest.mark.parametrize("device_class", ["thin", "thick"])
def test_a_restore_and_a_clone_mount_beside_their_mounted_source(
    csi: CsiClient, workdir: Path, name: str, device_class: str
) -> None:
    volume = create(csi, name, 256 * MiB, device_class, capability=BTRFS)
    origin = Mounted(csi, workdir, volume.volume_id, "btrfs", f"{name}-o")
    origin.path("committed").write_text("committed")
    os.sync()
    written_with_fsync(origin.path("fsynced"), "in the log tree")
    snap = snapshot(csi, f"{name}-snap", volume.volume_id)
    origin.path("after").write_text("written after the snapshot")
    restored = csi.controller.CreateVolume(
        create_request(f"{name}-r", 512 * MiB, device_class, capability=BTRFS,
                       volume_content_source=from_snapshot(snap.snapshot_id))
    ).volume  # fmt: skip
    written_with_fsync(origin.path("fsynced-again"), "in the log tree again")
    clone = create(csi, f"{name}-c", 256 * MiB, device_class, capability=BTRFS,
                   volume_content_source=from_volume(volume.volume_id))  # fmt: skip

    copy = Mounted(csi, workdir, restored.volume_id, "btrfs", f"{name}-r")
    assert copy.path("committed").read_text() == "committed"
    assert copy.path("fsynced").read_text() == "in the log tree"
    assert not copy.path("after").exists()
    assert copy.size() > origin.size() * 1.5  # grown with its volume
    cloned = Mounted(csi, workdir, clone.volume_id, "btrfs", f"{name}-c")
    assert cloned.path("fsynced-again").read_text() == "in the log tree again"
    cloned.path("after").write_text("changed in the clone")
    assert origin.path("after").read_text() == "written after the snapshot"
    fsids = {fs.filesystem_uuid(fs_source) for fs_source in (
        mounted_device_node(origin.staging), mounted_device_node(copy.staging),
        mounted_device_node(cloned.staging))}  # fmt: skip
    assert len(fsids) == 3

    for mounted in (cloned, copy, origin):
        mounted.release()
    for volume_id in (clone.volume_id, restored.volume_id, volume.volume_id):
        delete(csi, volume_id)
    csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))


def mounted_device_node(path: str) -> str:
    return sh("findmnt", "-n", "-o", "SOURCE", "--target", path).strip()


# -- a copy cut with a log tree: the one case btrfstune alone would break --


@pytest.fixture
def images(workdir: Path, name: str) -> Iterator[tuple[str, str, Path]]:
    """A btrfs on a loop device, mounted with an fsync'd file in its log tree,
    and a byte copy of it taken then, on a second loop device."""
    source_image, copy_image = workdir / f"{name}-source.img", workdir / f"{name}-copy.img"
    mount_point = workdir / f"{name}-m"
    mount_point.mkdir()
    with open(source_image, "wb") as image:
        image.truncate(160 * MiB)
    source = sh("losetup", "-f", "--show", str(source_image)).strip()
    copy = ""
    try:
        fs.make_filesystem(source, "btrfs")
        fs.mount(source, str(mount_point), "btrfs", [], None)
        written_with_fsync(mount_point / "fsynced", "replayed")
        shutil.copyfile(source_image, copy_image)
        copy = sh("losetup", "-f", "--show", str(copy_image)).strip()
        yield source, copy, mount_point
    finally:
        if is_mounted(str(mount_point)):
            fs.unmount(str(mount_point), None)
        for device in (source, copy):
            if device:
                subprocess.run(["losetup", "-d", device], check=False)


def test_a_copy_with_a_log_tree_is_replayed_before_its_new_id(
    images: tuple[str, str, Path], workdir: Path, name: str
) -> None:
    source, copy, mount_point = images
    shown = sh("btrfs", "inspect-internal", "dump-super", copy)
    assert "log_root\t\t0\n" not in shown, "no log tree in the copy: this test proves nothing"
    before = fs.filesystem_uuid(copy)
    if not Path("/sys/fs/btrfs/features/temp_fsid").exists():
        # Linux before 6.7 will not mount the copy while its source is
        # mounted, so it cannot replay: refused, untouched.
        with pytest.raises(FailedPrecondition, match="stop the pods using the source volume"):
            fs.new_filesystem_uuid(copy, "btrfs")
        assert fs.filesystem_uuid(copy) == before
        fs.unmount(str(mount_point), None)
    fs.new_filesystem_uuid(copy, "btrfs")
    if is_mounted(str(mount_point)):
        fs.unmount(str(mount_point), None)
    assert fs.filesystem_uuid(copy) not in (before, "")
    fs.mount(source, str(mount_point), "btrfs", [], None)
    beside = workdir / f"{name}-beside"
    beside.mkdir()
    fs.mount(copy, str(beside), "btrfs", [], None)
    try:
        assert (beside / "fsynced").read_text() == "replayed"
    finally:
        fs.unmount(str(beside), None)
