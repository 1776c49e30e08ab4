"""Device-class layouts on real LVM, in a VG of four PVs (loop devices):
striped, RAID1, RAID1 with dm-integrity and RAID10 thick classes, a thin
class on a pool whose data is RAID1, and a spare. Each shape is made,
written, grown, snapshotted and restored; capacity is what LVM can make,
exactly; a class whose PVs cannot hold its layout is reported like a
missing VG; and a RAID1 leg failed on purpose shows in the volume's
condition while I/O goes on."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi_lvm.admin import node_status
from csi_lvm.config import load_config
from csi_lvm.csi import csi_pb2
from csi_lvm.wiring import Options, build
from tests.lvm.conftest import metrics_port
from tests.lvm.helpers import (
    MiB,
    create,
    create_request,
    delete,
    eventually,
    expect_error,
    mount_capability,
    stage,
    unstage,
)
from tests.testbed import (
    DRIVER_NAME,
    NODE_ID,
    CsiClient,
    Driver,
    LoopVolumeGroup,
    sh,
    write_config,
)

Code = grpc.StatusCode
PV_SIZE = "256M"
CLASSES = """\
  - name: striped
    volumeGroup: {vg}
    layout: striped
    stripes: 2
    stripeSize: 64Ki
  - name: mirror
    volumeGroup: {vg}
    layout: raid1
  - name: checked
    volumeGroup: {vg}
    layout: raid1
    integrity: true
  - name: raid10
    volumeGroup: {vg}
    layout: raid10
  - name: five-copies
    volumeGroup: {vg}
    layout: raid1
    mirrors: 4
  - name: thin-mirror
    volumeGroup: {vg}
    thinPool: mirrored
    layout: raid1
    overprovisionRatio: 10
  - name: thin-claims-mirror
    volumeGroup: {vg}
    thinPool: {pool}
    layout: raid1
  - name: spared
    volumeGroup: {vg}
    spare: 64Mi
"""
# lv_layout of each class's volumes (thin: of the pool's data LV).
LAYOUT_OF = {
    "striped": "striped",
    "mirror": "raid,raid1",
    "checked": "raid,raid1",
    "raid10": "raid,raid10",
}
MARKER = b"csi-lvm layout marker\n" * 100


@dataclass
class Shaped:
    csi: CsiClient
    vg: LoopVolumeGroup
    config: Path
    metrics_port: int


@pytest.fixture(scope="module")
def shaped(workdir: Path) -> Iterator[Shaped]:
    """Four PVs, a 32 MiB linear thin pool and a 32 MiB one on RAID1, and a
    driver of its own with a class of every layout."""
    home = workdir / "layouts"
    home.mkdir()
    group = LoopVolumeGroup(
        home, name=f"shapes{os.getpid()}", size=PV_SIZE, pool_size="32M", disks=4
    ).create()
    try:
        group.lvcreate("--type", "thin-pool", "-L", "32M", "-n", "mirrored", group.name)
        sh("lvconvert", "-q", "-y", "--type", "raid1", "-m", "1", f"{group.name}/mirrored_tdata")
        config = write_config(home / "config.yaml", group.name, group.pool)
        with config.open("a") as text:
            text.write(CLASSES.format(vg=group.name, pool=group.pool))
        port = metrics_port() + 200
        driver = Driver(home, config, "--metrics-address", f"127.0.0.1:{port}")
        client = driver.start()
        try:
            yield Shaped(client, group, config, port)
        finally:
            client.close()
            assert driver.stop() == 0
    finally:
        group.destroy()


@pytest.fixture
def csi(shaped: Shaped) -> CsiClient:
    return shaped.csi


@pytest.fixture
def vg(shaped: Shaped) -> LoopVolumeGroup:
    return shaped.vg


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as response:
        return str(response.read().decode())


def lv_field(group: str, lv: str, field: str) -> str:
    out = sh("lvs", "-a", "--noheadings", "-o", field, "-S", f"lv_name={lv}", group)
    return out.strip()


def lv_of(volume_id: str) -> str:
    return volume_id.rsplit(":", 1)[-1]


def capacity(csi: CsiClient, device_class: str) -> csi_pb2.GetCapacityResponse:
    return csi.controller.GetCapacity(
        csi_pb2.GetCapacityRequest(parameters={"deviceClass": device_class})
    )


def volume_health(csi: CsiClient, volume_id: str) -> list[csi_pb2.VolumeHealth.VolumeHealthEntry]:
    answer = csi.node.NodeGetVolumeHealth(csi_pb2.NodeGetVolumeHealthRequest(volume_id=volume_id))
    assert answer.volume_health.volume_id == volume_id
    return list(answer.volume_health.health_statuses)


def write_marker(path: Path) -> None:
    with open(path / "marker", "wb") as out:
        out.write(MARKER)
        out.flush()
        os.fsync(out.fileno())


# Striped volumes are made (and their layout checked) by the capacity test;
# RAID10 is striped too, so its life here covers stripes' growth and copies.
@pytest.mark.parametrize("device_class", ["mirror", "checked", "raid10", "thin-mirror"])
def test_each_layout_is_made_written_grown_snapshotted_and_restored(
    csi: CsiClient, vg: LoopVolumeGroup, workdir: Path, device_class: str
) -> None:
    volume = create(csi, f"shape-{device_class}", 16 * MiB, device_class)
    lv = lv_of(volume.volume_id)
    if device_class in LAYOUT_OF:
        assert lv_field(vg.name, lv, "lv_layout") == LAYOUT_OF[device_class]
    if device_class == "checked":  # dm-integrity under each image
        assert lv_field(vg.name, f"{lv}_rimage_0", "lv_layout") == "integrity"
    staging = workdir / f"shape-{device_class}"
    stage(csi, volume.volume_id, str(staging), mount_capability("ext4"))
    write_marker(staging)
    grown = csi.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(
            volume_id=volume.volume_id, volume_path=str(staging),
            capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MiB),
        )
    )  # fmt: skip
    assert grown.capacity_bytes >= 32 * MiB
    assert os.statvfs(staging).f_blocks * os.statvfs(staging).f_frsize > 24 * MiB
    if device_class in LAYOUT_OF:  # still laid out so after the growth
        assert lv_field(vg.name, lv, "lv_layout") == LAYOUT_OF[device_class]
    snap = csi_pb2.CreateSnapshotRequest(
        name=f"shape-snap-{device_class}", source_volume_id=volume.volume_id
    )
    if device_class == "checked":  # no COW view of RAID with integrity: copied unused only
        expect_error(Code.FAILED_PRECONDITION, csi.controller.CreateSnapshot, snap, "stop the pods")
        unstage(csi, volume.volume_id, str(staging))
    snapshot = csi.controller.CreateSnapshot(snap).snapshot
    source = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot.snapshot_id)
    )
    restored = create(
        csi, f"shape-restored-{device_class}", 32 * MiB, device_class, volume_content_source=source
    )
    if device_class in LAYOUT_OF:
        assert lv_field(vg.name, lv_of(restored.volume_id), "lv_layout") == LAYOUT_OF[device_class]
    restored_staging = workdir / f"shape-restored-{device_class}"
    stage(csi, restored.volume_id, str(restored_staging), mount_capability("ext4"))
    assert (restored_staging / "marker").read_bytes() == MARKER
    for volume_id, path in ((restored.volume_id, restored_staging), (volume.volume_id, staging)):
        if device_class != "checked" or volume_id == restored.volume_id:
            unstage(csi, volume_id, str(path))
        delete(csi, volume_id)
    csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id))


@pytest.mark.parametrize("device_class", ["striped", "mirror", "checked", "raid10"])
def test_capacity_is_exactly_what_the_layout_can_make(
    csi: CsiClient, vg: LoopVolumeGroup, device_class: str
) -> None:
    """The largest volume GetCapacity promises is made; one unit more is
    refused before lvcreate runs (the guard on ``Layout.largest``, and on
    the integrity metadata LVM allocates)."""
    answer = capacity(csi, device_class)
    largest = answer.maximum_volume_size.value
    unit = answer.minimum_volume_size.value
    assert largest == answer.available_capacity > 0
    assert unit == 4 * MiB * (2 if device_class in ("striped", "raid10") else 1)
    expect_error(
        Code.RESOURCE_EXHAUSTED,
        csi.controller.CreateVolume,
        create_request(f"cap-over-{device_class}", largest + unit, device_class),
        f"device class {device_class}",
    )
    volume = create(csi, f"cap-{device_class}", largest, device_class)
    assert volume.capacity_bytes == largest
    assert lv_field(vg.name, lv_of(volume.volume_id), "lv_layout") == LAYOUT_OF[device_class]
    delete(csi, volume.volume_id)


def test_a_layout_the_pvs_cannot_hold_is_reported_like_a_missing_volume_group(
    csi: CsiClient, vg: LoopVolumeGroup, shaped: Shaped
) -> None:
    assert capacity(csi, "five-copies").available_capacity == 0
    expect_error(
        Code.RESOURCE_EXHAUSTED,
        csi.controller.CreateVolume,
        create_request("five", 8 * MiB, "five-copies"),
        "has 4 physical volumes present",
        "needs 5",
        "vgextend",
    )
    assert capacity(csi, "thin-claims-mirror").available_capacity == 0
    expect_error(
        Code.RESOURCE_EXHAUSTED,
        csi.controller.CreateVolume,
        create_request("claims", 8 * MiB, "thin-claims-mirror"),
        "laid out 'linear'",
        f"lvconvert --type raid1 {vg.name}/{vg.pool}_tdata",
    )
    # The node's storage health names both, in one entry per status and reason.
    storage = csi.node.NodeGetStorageHealth(csi_pb2.NodeGetStorageHealthRequest())
    unreachable = [e for e in storage.backend_health if e.status == csi_pb2.STORAGE_UNREACHABLE]
    assert [e.reason for e in unreachable] == ["StorageMissing"]
    assert "device class five-copies" in unreachable[0].message
    assert "device class thin-claims-mirror" in unreachable[0].message
    text = scrape(shaped.metrics_port)
    for device_class in ("five-copies", "thin-claims-mirror"):
        assert (
            f'csi_lvm_device_class_trouble{{device_class="{device_class}",'
            'reason="StorageMissing",status="STORAGE_UNREACHABLE"} 1.0'
        ) in text
    expect_error(
        Code.NOT_FOUND,
        csi.node.NodeGetVolumeHealth,
        csi_pb2.NodeGetVolumeHealthRequest(volume_id=f"{NODE_ID}:mirror:csi-none"),
    )
    expect_error(
        Code.INVALID_ARGUMENT,
        csi.node.NodeGetVolumeHealth,
        csi_pb2.NodeGetVolumeHealthRequest(),
        "volume_id is required",
    )


def test_the_spare_is_kept_from_new_volumes_but_not_from_growth(
    csi: CsiClient, vg: LoopVolumeGroup, workdir: Path
) -> None:
    free = int(sh("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_free", vg.name))
    assert capacity(csi, "spared").available_capacity == free - 64 * MiB
    # Every byte but the spare's, then growth into the spare.
    volume = create(csi, "spared-all", free - 64 * MiB, "spared")
    assert capacity(csi, "spared").available_capacity == 0
    expect_error(
        Code.RESOURCE_EXHAUSTED,
        csi.controller.CreateVolume,
        create_request("spared-more", 4 * MiB, "spared"),
        "0 bytes available",
    )
    staging = workdir / "spared"
    stage(csi, volume.volume_id, str(staging), mount_capability("ext4"))
    grown = csi.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(
            volume_id=volume.volume_id, volume_path=str(staging),
            capacity_range=csi_pb2.CapacityRange(required_bytes=free - 32 * MiB),
        )
    )  # fmt: skip
    assert grown.capacity_bytes == free - 32 * MiB
    unstage(csi, volume.volume_id, str(staging))
    delete(csi, volume.volume_id)


def test_a_failed_raid_leg_shows_in_health_condition_status_and_metrics_and_io_goes_on(
    csi: CsiClient, vg: LoopVolumeGroup, workdir: Path, shaped: Shaped
) -> None:
    volume = create(csi, "leg", 16 * MiB, "mirror")
    lv = lv_of(volume.volume_id)
    staging = workdir / "leg"
    stage(csi, volume.volume_id, str(staging), mount_capability("ext4"))
    write_marker(staging)
    # Healthy once its images are in sync (a new RAID1 LV syncs them first).
    eventually(
        lambda: not volume_health(csi, volume.volume_id),
        seconds=120,
        explain=lambda: (volume_health(csi, volume.volume_id), sh("dmsetup", "status")),
    )
    # The second image's device now fails every I/O, as a dead disk would.
    leg = f"{vg.name}-{lv.replace('-', '--')}_rimage_1"
    sectors = sh("blockdev", "--getsz", f"/dev/mapper/{leg}").strip()
    sh("dmsetup", "suspend", leg)
    sh("dmsetup", "load", leg, "--table", f"0 {sectors} error")
    sh("dmsetup", "resume", leg)
    try:
        write_marker(staging)  # I/O goes on, on the other image
        assert (staging / "marker").read_bytes() == MARKER
        subprocess.run(["sync"], check=True)

        def condition() -> csi_pb2.VolumeCondition:
            stats = csi.node.NodeGetVolumeStats(
                csi_pb2.NodeGetVolumeStatsRequest(
                    volume_id=volume.volume_id, volume_path=str(staging)
                )
            )
            return stats.volume_condition

        eventually(
            lambda: condition().abnormal,
            seconds=60,
            explain=lambda: (condition(), sh("dmsetup", "status"), sh("lvs", "-a", vg.name)),
        )
        found = condition()
        assert f"LV {vg.name}/{lv}:" in found.message
        assert "lvconvert --repair" in found.message
        entries = volume_health(csi, volume.volume_id)  # CSI 1.13: the same, by reason
        assert [(e.status, e.reason) for e in entries] in (
            [(csi_pb2.DEGRADED, "RaidImageFailed")],
            [(csi_pb2.DEGRADED, "PhysicalVolumeMissing")],
        )
        assert f"lvconvert --repair {vg.name}/{lv}" in entries[0].message
        reason = entries[0].reason
        labels = f'device_class="mirror",reason="{reason}",status="DEGRADED"'
        metric = f"csi_lvm_volumes_unhealthy{{{labels}}} 1.0"
        eventually(
            lambda: metric in scrape(shaped.metrics_port),
            seconds=60,
            explain=lambda: [m for m in scrape(shaped.metrics_port).splitlines() if "mirror" in m],
        )
        graph = build(load_config(shaped.config), Options(NODE_ID, DRIVER_NAME))
        (mirror,) = [c for c in node_status(graph.backends) if c.name == "mirror"]
        (shown,) = [o for o in mirror.objects if o.name == "leg"]
        assert shown.abnormal and "lvconvert --repair" in shown.condition
    finally:
        unstage(csi, volume.volume_id, str(staging))
        subprocess.run(["lvchange", "-an", f"{vg.name}/{lv}"], capture_output=True, check=False)
        subprocess.run(["lvremove", "-f", f"{vg.name}/{lv}"], capture_output=True, check=False)
    assert NODE_ID in volume.volume_id


def test_a_volume_changes_between_linear_and_raid1_in_use_and_keeps_its_data(
    csi: CsiClient, vg: LoopVolumeGroup, workdir: Path
) -> None:
    volume = create(csi, "convert", 16 * MiB, "thick")
    lv = lv_of(volume.volume_id)
    staging = workdir / "convert"
    stage(csi, volume.volume_id, str(staging), mount_capability("ext4"))

    def modify(layout: str) -> None:
        csi.controller.ControllerModifyVolume(
            csi_pb2.ControllerModifyVolumeRequest(
                volume_id=volume.volume_id, mutable_parameters={"layout": layout}
            )
        )

    try:
        write_marker(staging)
        modify("raid1")
        assert lv_field(vg.name, lv, "lv_layout") == "raid,raid1"
        modify("raid1")  # a repeat finds it done
        eventually(lambda: not volume_health(csi, volume.volume_id), seconds=120)
        assert (staging / "marker").read_bytes() == MARKER
        modify("linear")
        assert lv_field(vg.name, lv, "lv_layout") == "linear"
        assert (staging / "marker").read_bytes() == MARKER
    finally:
        unstage(csi, volume.volume_id, str(staging))
    striped = create(csi, "no-convert", 16 * MiB, "striped")
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, csi.controller.ControllerModifyVolume,
        csi_pb2.ControllerModifyVolumeRequest(
            volume_id=striped.volume_id, mutable_parameters={"layout": "raid1"}),
        "layout cannot be set on a volume of device class striped",
    )  # fmt: skip
    for made in (volume, striped):
        delete(csi, made.volume_id)
