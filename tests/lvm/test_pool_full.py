"""A thin pool that really fills up: the driver stops taking new volumes at the
class's threshold, says why everywhere an admin looks, and reports the volume
that hit the full pool as abnormal; deleting data makes room again."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from csi_lvm.config import load_config
from csi_lvm.csi import csi_pb2
from csi_lvm.errors import DriverError, status_for
from csi_lvm.ids import Kind, lv_name_for
from csi_lvm.wiring import Options, build
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
from tests.testbed import (
    DRIVER_NAME,
    NODE_ID,
    TOPOLOGY_KEY,
    CsiClient,
    Driver,
    LoopVolumeGroup,
)


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


@contextmanager
def over_provisioned(csi: CsiClient, workdir: Path, name: str) -> Iterator[tuple[str, str]]:
    """A raw block volume of 96 MiB on the 32 MiB pool (4x over-provisioned),
    published: its id and the device to write; deleted afterwards."""
    capability = block_capability()
    volume = create(csi, name, 3 * SMALL_POOL_MIB * MiB, SMALL_CLASS, capability=capability)
    staging, target = str(workdir / f"{name}-staging"), str(workdir / f"{name}-block")
    stage(csi, volume.volume_id, staging, capability)
    publish(csi, volume.volume_id, staging, target, capability)
    try:
        yield volume.volume_id, target
    finally:
        unpublish(csi, volume.volume_id, target)
        unstage(csi, volume.volume_id, staging)
        delete(csi, volume.volume_id)


def test_a_filling_pool_refuses_new_volumes_and_flags_its_volumes(
    csi: CsiClient, vg: LoopVolumeGroup, workdir: Path, name: str
) -> None:
    with over_provisioned(csi, workdir, name) as (volume_id, target):
        assert capacity(csi) > 0
        assert condition(csi, volume_id, target)[::2] == (False, False)

        # 30 of 32 MiB: past the class's 90 % threshold, not yet full.
        assert write(target, 0, 30).returncode == 0
        assert capacity(csi) == 0  # a tenant's writes: the kernel's fill, read at once
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
            csi_pb2.CreateSnapshotRequest(name=f"{name}-snap", source_volume_id=volume_id),
            "full of data",
        )
        abnormal, message, node_abnormal, node_message = eventually(
            lambda: (c := condition(csi, volume_id, target))[0] and c[2] and c
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
            lambda: "out of data space" in (c := condition(csi, volume_id, target))[3] and c
        )
        assert abnormal and node_abnormal
        assert "the thin pool is out of data space" in message
        assert "the thin pool is out of data space" in node_message
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


def test_a_create_right_after_tenants_fill_the_pool_sees_the_fill(
    csi: CsiClient, driver: Driver, vg: LoopVolumeGroup, workdir: Path, name: str
) -> None:
    # Pods write without telling the driver, and its kept view learns of it
    # only at a refresh: admission reads the pool's fill from the kernel. This
    # controller's view is never refreshed, so only that read can refuse.
    options = Options(NODE_ID, DRIVER_NAME, TOPOLOGY_KEY, refresh_seconds=3600.0)
    graph = build(load_config(driver.config), options)
    inventory, controller = graph.inventory, graph.controller
    capacity_request = csi_pb2.GetCapacityRequest(parameters={"deviceClass": SMALL_CLASS})
    try:
        with over_provisioned(csi, workdir, name) as (_, target):
            inventory.view()  # the kept report, from before the writes
            assert write(target, 0, 30).returncode == 0  # of 32 MiB; the class stops at 90 %
            with pytest.raises(DriverError) as refused:
                controller.CreateVolume(create_request(f"{name}-more", 4 * MiB, SMALL_CLASS), None)  # type: ignore[arg-type]
            code, message = status_for(refused.value)
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, message
            assert "full of data" in message and "stops at 90%" in message
            kept = inventory.view().lv(vg.name, SMALL_POOL)
            assert kept is not None and (kept.data_percent or 0) < 90  # the view is behind
            assert lv_name_for(Kind.VOLUME, f"{name}-more") not in vg.lv_names()
            answer = controller.GetCapacity(capacity_request, None)  # type: ignore[arg-type]
            assert answer.available_capacity == 0
    finally:
        graph.close()
