"""A thin pool that really fills up: the driver stops taking new volumes at the
class's threshold, says why everywhere an admin looks, and reports the volume
that hit the full pool as abnormal; deleting data makes room again."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from csi_lvm.csi import csi_pb2
from tests.lvm.conftest import SMALL_CLASS, SMALL_POOL, SMALL_POOL_MIB
from tests.lvm.helpers import (
    MiB,
    block_capability,
    create,
    create_request,
    delete,
    eventually,
    expect_error,
    publish,
    stage,
    unpublish,
    unstage,
)
from tests.lvm.test_admin import sample, scrape
from tests.testbed import CsiClient, LoopVolumeGroup


def write(device: str, offset_mib: int, mib: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["dd", "if=/dev/urandom", f"of={device}", "bs=1M", f"seek={offset_mib}",
         f"count={mib}", "oflag=direct", "conv=notrunc,fsync"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def capacity(csi: CsiClient) -> int:
    request = csi_pb2.GetCapacityRequest(parameters={"deviceClass": SMALL_CLASS})
    return int(csi.controller.GetCapacity(request).available_capacity)


def condition(csi: CsiClient, volume_id: str, target: str) -> tuple[bool, str, bool, str]:
    controller = csi.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume_id)
    ).status.volume_condition
    node = csi.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=target)
    ).volume_condition
    return controller.abnormal, controller.message, node.abnormal, node.message


def test_a_filling_pool_refuses_new_volumes_and_flags_its_volumes(
    csi: CsiClient, vg: LoopVolumeGroup, workdir: Path, name: str
) -> None:
    capability = block_capability()
    # 4x over-provisioned: 96 MiB of volume on a 32 MiB pool.
    volume = create(csi, name, 3 * SMALL_POOL_MIB * MiB, SMALL_CLASS, capability=capability)
    staging, target = str(workdir / f"{name}-staging"), str(workdir / f"{name}-block")
    stage(csi, volume.volume_id, staging, capability)
    publish(csi, volume.volume_id, staging, target, capability)
    try:
        assert capacity(csi) > 0
        assert condition(csi, volume.volume_id, target)[::2] == (False, False)

        # 30 of 32 MiB: past the class's 90 % threshold, not yet full.
        assert write(target, 0, 30).returncode == 0
        eventually(lambda: capacity(csi) == 0)  # a tenant's writes: within the interval
        expect_error(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            csi.controller.CreateVolume,
            create_request(f"{name}-more", 4 * MiB, SMALL_CLASS),
            f"device class {SMALL_CLASS}",
            f"{vg.name}/{SMALL_POOL} is",
            "full of data",
            "stops at 90%",
            "extend the pool (lvextend)",
        )
        expect_error(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            csi.controller.CreateSnapshot,
            csi_pb2.CreateSnapshotRequest(name=f"{name}-snap", source_volume_id=volume.volume_id),
            "full of data",
        )
        abnormal, message, node_abnormal, node_message = eventually(
            lambda: (c := condition(csi, volume.volume_id, target))[0] and c[2] and c
        )
        assert message == node_message
        assert "full of data" in message and "stops at 90%" in message
        metrics = scrape()
        assert sample(metrics, "csi_lvm_device_class_full", device_class=SMALL_CLASS) == 1
        assert sample(metrics, "csi_lvm_device_class_full", device_class="thin") == 0

        # Past the end of the pool: the write fails (the pool errors when full)
        # and the volume is reported abnormal, not silently short of data.
        assert write(target, 30, 8).returncode != 0
        abnormal, message, node_abnormal, node_message = eventually(
            lambda: "out of data space" in (c := condition(csi, volume.volume_id, target))[3] and c
        )
        assert abnormal and node_abnormal
        assert "the thin pool is out of data space" in message
        assert "the thin pool is out of data space" in node_message
    finally:
        unpublish(csi, volume.volume_id, target)
        unstage(csi, volume.volume_id, staging)
        delete(csi, volume.volume_id)
    # Deleting the volume gave the blocks back: the class takes volumes again.
    assert capacity(csi) > 0
    delete(csi, create(csi, f"{name}-after", 4 * MiB, SMALL_CLASS).volume_id)


def test_concurrent_creates_never_exceed_the_overprovision_ratio(
    csi: CsiClient, name: str, vg: LoopVolumeGroup
) -> None:
    # Each create reads the room from a report that need not show the others'
    # LVs yet, and LVM itself does not enforce overprovisionRatio.
    room = capacity(csi)
    size = 32 * MiB
    asked = room // size + 4

    def one(number: int) -> tuple[grpc.StatusCode, str]:
        try:
            return grpc.StatusCode.OK, create(csi, f"{name}-{number}", size, SMALL_CLASS).volume_id
        except grpc.RpcError as error:
            return error.code(), ""

    with ThreadPoolExecutor(asked) as pool:
        answers = list(pool.map(one, range(asked)))
    codes = [code for code, _ in answers]
    made = codes.count(grpc.StatusCode.OK)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert 0 < made <= room // size, codes
    sizes = subprocess.run(
        ["lvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "lv_size",
         "-S", f"pool_lv={SMALL_POOL}", vg.name],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert sum(int(s) for s in sizes) <= room
    for _, volume_id in answers:
        if volume_id:
            delete(csi, volume_id)
