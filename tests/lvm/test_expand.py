"""Online expansion on the volume's node: LV first, then the live filesystem."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from csi_lvm.csi import csi_pb2
from tests.lvm.helpers import (
    GiB,
    MiB,
    block_capability,
    create,
    delete,
    expect_error,
    mount_capability,
    publish,
    stage,
    unpublish,
    unstage,
)
from tests.testbed import NODE_ID, CsiClient

Code = grpc.StatusCode


def expand(csi: CsiClient, volume_id: str, path: str, size: int, staging: str = "") -> int:
    response = csi.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(
            volume_id=volume_id, volume_path=path, staging_target_path=staging,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        )
    )  # fmt: skip
    return int(response.capacity_bytes)


@pytest.mark.parametrize(("device_class", "fs_type"), [("thin", "ext4"), ("thick", "xfs")])
def test_mounted_filesystem_grows_while_in_use(
    csi: CsiClient, workdir: Path, name: str, device_class: str, fs_type: str
) -> None:
    capability = mount_capability(fs_type)
    volume = create(csi, name, 320 * MiB, device_class, capability=capability)
    staging, target = str(workdir / f"{name}-s"), str(workdir / f"{name}-t")
    stage(csi, volume.volume_id, staging, capability)
    publish(csi, volume.volume_id, staging, target, capability)
    before = os.statvfs(target)
    with open(Path(target, "busy.log"), "w") as busy:  # kept open across the resize
        busy.write("in use\n")
        assert expand(csi, volume.volume_id, target, 480 * MiB, staging) == 480 * MiB
        busy.write("still writing\n")
    after = os.statvfs(target)
    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + 120 * MiB
    # Repeated and smaller requests change nothing.
    assert expand(csi, volume.volume_id, target, 480 * MiB, staging) == 480 * MiB
    assert expand(csi, volume.volume_id, target, 400 * MiB, staging) == 480 * MiB
    got = csi.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id)
    )
    assert got.volume.capacity_bytes == 480 * MiB
    unpublish(csi, volume.volume_id, target)
    unstage(csi, volume.volume_id, staging)
    delete(csi, volume.volume_id)


def test_block_volume_grows(csi: CsiClient, workdir: Path, name: str) -> None:
    volume = create(csi, name, 16 * MiB, capability=block_capability())
    target = str(workdir / f"{name}-dev")
    publish(csi, volume.volume_id, "", target, block_capability())
    assert expand(csi, volume.volume_id, target, 40 * MiB) == 40 * MiB
    with open(target, "rb") as device:
        assert device.seek(0, os.SEEK_END) == 40 * MiB
    unpublish(csi, volume.volume_id, target)
    delete(csi, volume.volume_id)


def test_expansion_errors(csi: CsiClient, workdir: Path, name: str) -> None:
    volume = create(csi, name, 16 * MiB, "thick", capability=block_capability())
    path = str(workdir)
    too_big = csi_pb2.NodeExpandVolumeRequest(volume_id=volume.volume_id, volume_path=path,
                                              capacity_range=csi_pb2.CapacityRange(required_bytes=64 * GiB))  # fmt: skip
    expect_error(Code.OUT_OF_RANGE, csi.node.NodeExpandVolume, too_big, "thick")
    missing = csi_pb2.NodeExpandVolumeRequest(volume_id=f"{NODE_ID}:thin:csi-nothing", volume_path=path,
                                              capacity_range=csi_pb2.CapacityRange(required_bytes=GiB))  # fmt: skip
    expect_error(Code.NOT_FOUND, csi.node.NodeExpandVolume, missing)
    expect_error(
        Code.INVALID_ARGUMENT,
        csi.node.NodeExpandVolume,
        csi_pb2.NodeExpandVolumeRequest(volume_path=path),
        "volume_id",
    )
    delete(csi, volume.volume_id)
