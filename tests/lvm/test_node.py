"""Node RPCs on real devices: format, mount, publish, stats, cleanup."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import grpc
import pytest

from csi_lvm.backends.thin import ThinBackend
from csi_lvm.config import Config, DeviceClass
from csi_lvm.csi import csi_pb2
from csi_lvm.lifecycle import Lifecycle
from csi_lvm.lvm.commands import Lvm
from csi_lvm.volumes import Inventory
from tests.lvm.helpers import (
    GiB,
    MiB,
    Mode,
    block_capability,
    create,
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
from tests.testbed import DRIVER_NAME, NODE_ID, TOPOLOGY_KEY, CsiClient, LoopVolumeGroup

Code = grpc.StatusCode


@pytest.mark.parametrize(
    ("device_class", "fs_type"), [("thin", "ext4"), ("thin", "xfs"), ("thick", "")]
)
def test_filesystem_lifecycle(
    csi: CsiClient, workdir: Path, name: str, device_class: str, fs_type: str
) -> None:
    capability = mount_capability(fs_type)
    volume = create(csi, name, 320 * MiB, device_class, capability=capability)
    staging, target = str(workdir / f"{name}-staging"), str(workdir / f"{name}-target")
    stage(csi, volume.volume_id, staging, capability)
    stage(csi, volume.volume_id, staging, capability)  # idempotent
    assert fs_type_of(staging) == (fs_type or "ext4")
    publish(csi, volume.volume_id, staging, target, capability)
    publish(csi, volume.volume_id, staging, target, capability)  # idempotent
    Path(target, "hello.txt").write_text("hello from csi-lvm\n")

    stats = csi.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=target)
    )
    by_unit = {u.unit: u for u in stats.usage}
    space = by_unit[csi_pb2.VolumeUsage.BYTES]
    assert 250 * MiB < space.total <= 320 * MiB and space.used > 0 and space.available > 0
    assert by_unit[csi_pb2.VolumeUsage.INODES].total > 0
    assert stats.volume_condition.abnormal is False

    expect_error(
        Code.FAILED_PRECONDITION,
        csi.controller.DeleteVolume,
        csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id),
        "in use",
    )
    unpublish(csi, volume.volume_id, target)
    unpublish(csi, volume.volume_id, target)  # idempotent
    assert not os.path.exists(target)
    unstage(csi, volume.volume_id, staging)
    unstage(csi, volume.volume_id, staging)
    assert not is_mounted(staging)

    # Data survives a second stage; the filesystem is found, not reformatted.
    stage(csi, volume.volume_id, staging, capability)
    publish(csi, volume.volume_id, staging, target, capability)
    assert Path(target, "hello.txt").read_text() == "hello from csi-lvm\n"
    unpublish(csi, volume.volume_id, target)
    unstage(csi, volume.volume_id, staging)
    delete(csi, volume.volume_id)


def test_read_only_publish(csi: CsiClient, workdir: Path, name: str) -> None:
    capability = mount_capability("ext4")
    volume = create(csi, name, 64 * MiB, capability=capability)
    staging, target = str(workdir / f"{name}-s"), str(workdir / f"{name}-t")
    stage(csi, volume.volume_id, staging, capability)
    publish(csi, volume.volume_id, staging, target, capability, readonly=True)
    with pytest.raises(OSError) as caught:
        Path(target, "nope").write_text("x")
    assert caught.value.errno == errno.EROFS
    # The same target with other options is a conflict, not a silent success.
    with pytest.raises(grpc.RpcError) as conflict:
        publish(csi, volume.volume_id, staging, target, capability, readonly=False)
    assert conflict.value.code() == Code.ALREADY_EXISTS
    unpublish(csi, volume.volume_id, target)
    unstage(csi, volume.volume_id, staging)
    delete(csi, volume.volume_id)


def test_block_volume(csi: CsiClient, workdir: Path, name: str) -> None:
    capability = block_capability()
    volume = create(csi, name, 16 * MiB, "thick", capability=capability)
    staging, target = str(workdir / f"{name}-s"), str(workdir / f"{name}-dev")
    stage(csi, volume.volume_id, staging, capability)
    publish(csi, volume.volume_id, staging, target, capability)
    with open(target, "r+b") as device:
        device.write(b"csi-lvm block")
        device.flush()
        os.fsync(device.fileno())
        device.seek(0)
        assert device.read(13) == b"csi-lvm block"
        assert device.seek(0, os.SEEK_END) == 16 * MiB
    stats = csi.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=target)
    )
    assert [(u.unit, u.total) for u in stats.usage] == [(csi_pb2.VolumeUsage.BYTES, 16 * MiB)]
    unpublish(csi, volume.volume_id, target)
    assert not os.path.exists(target)
    unstage(csi, volume.volume_id, staging)
    delete(csi, volume.volume_id)


def test_existing_filesystem_is_never_reformatted(csi: CsiClient, workdir: Path, name: str) -> None:
    volume = create(csi, name, 64 * MiB)
    staging = str(workdir / f"{name}-s")
    stage(csi, volume.volume_id, staging, mount_capability("ext4"))
    unstage(csi, volume.volume_id, staging)
    expect_error(
        Code.FAILED_PRECONDITION, csi.node.NodeStageVolume,
        csi_pb2.NodeStageVolumeRequest(volume_id=volume.volume_id, staging_target_path=staging,
                                       volume_capability=mount_capability("xfs")),
        "already holds ext4", "never reformats",
    )  # fmt: skip
    assert not is_mounted(staging)
    delete(csi, volume.volume_id)


def test_single_writer_allows_one_publication(csi: CsiClient, workdir: Path, name: str) -> None:
    capability = mount_capability("ext4", Mode.SINGLE_NODE_SINGLE_WRITER)
    volume = create(csi, name, 64 * MiB, capability=capability)
    staging, first, second = (str(workdir / f"{name}-{s}") for s in ("s", "a", "b"))
    stage(csi, volume.volume_id, staging, capability)
    publish(csi, volume.volume_id, staging, first, capability)
    with pytest.raises(grpc.RpcError) as caught:
        publish(csi, volume.volume_id, staging, second, capability)
    assert caught.value.code() == Code.FAILED_PRECONDITION
    unpublish(csi, volume.volume_id, first)
    unstage(csi, volume.volume_id, staging)
    delete(csi, volume.volume_id)


def test_foreign_mounts_and_bad_paths_are_left_alone(
    csi: CsiClient, workdir: Path, name: str
) -> None:
    handmade = workdir / "handmade-mount"
    handmade.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "handmade", str(handmade)], check=True)
    try:
        volume = create(csi, name, 16 * MiB)
        for call, request in (
            (
                csi.node.NodeUnpublishVolume,
                csi_pb2.NodeUnpublishVolumeRequest(
                    volume_id=volume.volume_id, target_path=str(handmade)
                ),
            ),
            (
                csi.node.NodeUnstageVolume,
                csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=volume.volume_id, staging_target_path=str(handmade)
                ),
            ),
        ):
            expect_error(Code.FAILED_PRECONDITION, call, request, "another device")
        # No such LV: the mount there is still another device's.
        expect_error(Code.FAILED_PRECONDITION, csi.node.NodeUnpublishVolume,
                     csi_pb2.NodeUnpublishVolumeRequest(volume_id=f"{NODE_ID}:thin:csi-nothing", target_path=str(handmade)),
                     "another device")  # fmt: skip
        expect_error(Code.ALREADY_EXISTS, csi.node.NodeStageVolume,
                     csi_pb2.NodeStageVolumeRequest(volume_id=volume.volume_id, staging_target_path=str(handmade),
                                                    volume_capability=mount_capability()))  # fmt: skip
        for path in ("relative/path", f"{workdir}/../etc", ""):
            expect_error(Code.INVALID_ARGUMENT, csi.node.NodePublishVolume,
                         csi_pb2.NodePublishVolumeRequest(volume_id=volume.volume_id, staging_target_path=str(handmade),
                                                          target_path=path, volume_capability=mount_capability()))  # fmt: skip
        assert is_mounted(str(handmade))
        delete(csi, volume.volume_id)
    finally:
        subprocess.run(["umount", str(handmade)], check=False)


def test_node_info_and_capabilities(csi: CsiClient) -> None:
    info = csi.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == NODE_ID
    assert dict(info.accessible_topology.segments) == {TOPOLOGY_KEY: NODE_ID}
    caps = csi.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    Cap = csi_pb2.NodeServiceCapability.RPC
    assert {Cap.STAGE_UNSTAGE_VOLUME, Cap.GET_VOLUME_STATS, Cap.VOLUME_CONDITION} <= {
        c.rpc.type for c in caps.capabilities
    }


def test_a_barely_written_thin_volume_is_not_taken_for_blank(
    csi: CsiClient, workdir: Path, name: str
) -> None:
    # A first stage skips the probe of a thin LV that maps no block at all;
    # 512 bytes in 8 GiB (a share LVM shows as 0.01 %) must still be probed.
    block = block_capability()
    volume = create(csi, name, 8 * GiB, capability=block)
    staging, target = str(workdir / f"{name}-s"), str(workdir / f"{name}-dev")
    stage(csi, volume.volume_id, staging, block)
    publish(csi, volume.volume_id, staging, target, block)
    with open(target, "r+b") as device:
        device.seek(510)
        device.write(b"\x55\xaa")  # an MBR signature: an empty DOS partition table
        device.flush()
        os.fsync(device.fileno())
    unpublish(csi, volume.volume_id, target)
    unstage(csi, volume.volume_id, staging)
    expect_error(
        Code.FAILED_PRECONDITION, csi.node.NodeStageVolume,
        csi_pb2.NodeStageVolumeRequest(volume_id=volume.volume_id, staging_target_path=staging,
                                       volume_capability=mount_capability("ext4")),
        "already holds partition table dos", "never reformats",
    )  # fmt: skip
    assert not is_mounted(staging)
    delete(csi, volume.volume_id)


def _mapped_bytes(vg: str, lv: str) -> float:
    """How much of its thin pool the LV maps, from LVM's own report."""
    out = subprocess.run(
        ["lvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "lv_size,data_percent",
         f"{vg}/{lv}"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return int(out[0]) * float(out[1]) / 100


def test_a_blank_thin_volume_gets_xfs_without_its_log_being_zeroed(
    csi: CsiClient, vg: LoopVolumeGroup, workdir: Path, name: str
) -> None:
    # mkfs.xfs zeroes a 64 MiB log; on a thin LV that maps no block, in a pool
    # that zeroes what it maps, those blocks read zeros already and are skipped.
    capability = mount_capability("xfs")
    volume = create(csi, name, 1 * GiB, capability=capability)
    lv = volume.volume_id.split(":")[2]
    staging, target = str(workdir / f"{name}-s"), str(workdir / f"{name}-t")
    stage(csi, volume.volume_id, staging, capability)
    assert _mapped_bytes(vg.name, lv) < 8 * MiB
    publish(csi, volume.volume_id, staging, target, capability)
    Path(target, "kept.txt").write_text("still here\n")
    unpublish(csi, volume.volume_id, target)
    unstage(csi, volume.volume_id, staging)
    device = f"/dev/{vg.name}/{lv}"
    check = subprocess.run(["xfs_repair", "-n", device], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    stage(csi, volume.volume_id, staging, capability)  # mounts and reads the log
    assert Path(staging, "kept.txt").read_text() == "still here\n"
    unstage(csi, volume.volume_id, staging)
    delete(csi, volume.volume_id)


def test_a_thin_volume_written_once_gets_its_xfs_log_zeroed(
    csi: CsiClient, vg: LoopVolumeGroup, workdir: Path, name: str
) -> None:
    # One 4 KiB write (of zeros, so blkid still finds it blank) makes the LV
    # map a block: from then on mkfs zeroes the log itself, as always.
    block, capability = block_capability(), mount_capability("xfs")
    volume = create(csi, name, 1 * GiB, capability=block)
    lv = volume.volume_id.split(":")[2]
    staging, target = str(workdir / f"{name}-s"), str(workdir / f"{name}-dev")
    stage(csi, volume.volume_id, staging, block)
    publish(csi, volume.volume_id, staging, target, block)
    with open(target, "r+b") as device:
        device.seek(512 * MiB)
        device.write(bytes(4096))
        device.flush()
        os.fsync(device.fileno())
    unpublish(csi, volume.volume_id, target)
    unstage(csi, volume.volume_id, staging)
    assert _mapped_bytes(vg.name, lv) < 1 * MiB
    stage(csi, volume.volume_id, staging, capability)
    assert fs_type_of(staging) == "xfs"
    assert _mapped_bytes(vg.name, lv) >= 64 * MiB
    unstage(csi, volume.volume_id, staging)
    delete(csi, volume.volume_id)


def test_a_thin_volume_in_a_pool_that_does_not_zero_is_not_taken_to_read_zeros(
    vg: LoopVolumeGroup, name: str
) -> None:
    # Such a pool leaves old data beside a partial first write into a block,
    # so a skipped zeroing could leave stale bytes in an xfs log.
    pool, thin = f"{name}-nozero", f"{name}-thin"
    vg.lvcreate("--type", "thin-pool", "--zero", "n", "-L", "8M", "-n", pool, vg.name)
    vg.lvcreate("-V", "64M", "-T", f"{vg.name}/{pool}", "-n", thin)
    lvm = Lvm()
    device_class = DeviceClass("nozero", vg.name, pool)
    inventory = Inventory(Config((device_class,)), lvm, NODE_ID, DRIVER_NAME)
    backend = ThinBackend(device_class, inventory, Lifecycle(lvm))
    try:
        found = lvm.find_lv(vg.name, thin)
        assert found is not None and backend.contents(found).blank
        assert not found.attr.zeroes_new_blocks and not backend.contents(found).reads_zeros
    finally:
        lvm.close()
        subprocess.run(["lvremove", "-q", "-y", f"{vg.name}/{pool}"], check=True)


def test_ext4_on_a_thick_lv_that_holds_old_data_gets_a_zeroed_journal(
    csi: CsiClient, name: str, workdir: Path, vg: LoopVolumeGroup
) -> None:
    # lazy_journal_init leaves the journal's blocks as they were: on extents an
    # earlier tenant wrote, they would hold its bytes (and could be replayed).
    volume = create(csi, name, 64 * MiB, "thick", capability=block_capability())
    device = f"/dev/{vg.name}/{volume.volume_id.split(':')[2]}"
    old = b"\xab" * (1 << 20)
    with open(device, "r+b") as raw:
        for _ in range(64):
            raw.write(old)
    staging = str(workdir / f"{name}-staging")
    stage(csi, volume.volume_id, staging, mount_capability("ext4"))
    unstage(csi, volume.volume_id, staging)
    size = int(
        next(
            line.split(":")[1]
            for line in subprocess.run(
                ["dumpe2fs", "-h", device], capture_output=True, text=True, check=True
            ).stdout.splitlines()
            if line.startswith("Block size:")
        )
    )
    blocks = subprocess.run(
        ["debugfs", "-R", "blocks <8>", device], capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(blocks) > 100  # the journal inode's blocks
    with open(device, "rb") as raw:
        stale = sum(os.pread(raw.fileno(), size, int(b) * size) == old[:size] for b in blocks)
    assert stale == 0, f"{stale} of {len(blocks)} journal blocks still hold the old data"
    delete(csi, volume.volume_id)


def test_ext4_on_a_blank_thin_lv_is_told_the_storage_reads_zeros(
    csi: CsiClient, name: str, workdir: Path, vg: LoopVolumeGroup
) -> None:
    # mke2fs's assume_storage_prezeroed marks every inode table zeroed, so the
    # kernel's ext4lazyinit does not write them all (and map them in the pool)
    # after the first mount.
    volume = create(csi, name, 1 << 30)
    staging = str(workdir / f"{name}-staging")
    stage(csi, volume.volume_id, staging, mount_capability("ext4"))
    device = f"/dev/{vg.name}/{volume.volume_id.split(':')[2]}"
    groups = [
        line
        for line in subprocess.run(
            ["dumpe2fs", device], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        if line.startswith("Group ") and "(Blocks" in line
    ]
    assert groups and all("ITABLE_ZEROED" in line for line in groups), groups[:3]
    unstage(csi, volume.volume_id, staging)
    delete(csi, volume.volume_id)
