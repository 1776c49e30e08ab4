"""The kept view (issue 18): stats, capacity, metrics and creates answer
without a report of the whole volume group per call; the driver's own changes
show at once, an admin's within the refresh interval; a full metadata area is
RESOURCE_EXHAUSTED that names it, and status, metrics and doctor say so first.

A driver of its own runs here with debug logs (each LVM command is a line) on
the session's VG and on a small VG of its own, whose metadata area an admin's
LV with long tags fills."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from csi_lvm.admin import doctor as run_doctor
from csi_lvm.config import load_config
from csi_lvm.csi import csi_pb2
from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.errors import LvmMetadataFull
from tests.lvm.conftest import metrics_port
from tests.lvm.helpers import (
    MiB,
    create,
    create_request,
    delete,
    driver_of_its_own,
    expect_error,
    first_waiting,
    lvm_lock_held,
    mount_capability,
    publish,
    stage,
    unpublish,
    unstage,
    waiting_for,
)
from tests.testbed import NODE_ID, CsiClient, Driver, LoopVolumeGroup

REFRESH = 3.0
CRAMPED = "cramped"  # the class on the small VG
TAG = "x" * 1000  # LVM's longest tag is 1024 characters


def watched_port() -> int:
    return metrics_port() + 100


@pytest.fixture(scope="module")
def small_vg(workdir: Path) -> Iterator[LoopVolumeGroup]:
    group = LoopVolumeGroup(workdir, name=f"cramped{os.getpid()}", size="256M", pool_size="64M")
    group.create()
    try:
        yield group
    finally:
        group.destroy()


@pytest.fixture(scope="module")
def watched(workdir: Path, vg: LoopVolumeGroup, small_vg: LoopVolumeGroup) -> Iterator[Driver]:
    home = workdir / "watched-driver"
    home.mkdir()
    config = home / "config.yaml"
    config.write_text(
        "deviceClasses:\n"
        f"  - name: kept\n    volumeGroup: {vg.name}\n    thinPool: {vg.pool}\n"
        f"  - name: {CRAMPED}\n    volumeGroup: {small_vg.name}\n    thinPool: {small_vg.pool}\n"
    )
    driver = Driver(
        home, config, "--log-level", "debug", "--refresh-interval", str(REFRESH),
        "--metrics-address", f"127.0.0.1:{watched_port()}",
    )  # fmt: skip
    driver.start()
    try:
        yield driver
    finally:
        assert driver.stop() == 0


@pytest.fixture(scope="module")
def client(watched: Driver) -> Iterator[CsiClient]:
    csi = CsiClient(watched.socket)
    yield csi
    csi.close()


def reports_during(driver: Driver, call: Callable[[], object]) -> tuple[int, int, list[str]]:
    """What ``call`` asked of LVM: the number of whole-VG reports (``lvs``
    with no selection; the background refreshes' are not counted), of
    reports of selected LVs, and the other commands it ran. A refresh that
    began before the call and ends during it is not counted either: the log
    is read from its start, and the refreshes still under way when the call
    began carry over."""
    before = driver.log_path.stat().st_size
    call()
    time.sleep(0.2)  # the log lines of the last command
    commands: list[str] = []
    skip: list[str] = []  # the commands of refreshes whose markers were seen
    with driver.log_path.open() as log:
        while True:
            position = log.tell()
            text = log.readline()
            if not text:
                break
            if not text.startswith("{"):
                continue
            line = json.loads(text)
            if line.get("event") == "refreshing the kept view":
                skip.append("lvs")  # the background refresh's whole report
            elif line.get("event") == "refreshing the thin pools":
                skip += ["lvs -S", "vgs"]  # its report of the pools alone
            elif line.get("event") == "lvm":
                args = line["args"]
                kind = "lvs -S" if args[0] == "lvs" and "-S" in args else args[0]
                if kind in skip:
                    skip.remove(kind)
                elif position >= before:
                    commands.append(kind)
    whole, selected = commands.count("lvs"), commands.count("lvs -S")
    return whole, selected, [kind for kind in commands if not kind.startswith("lvs")]


def capacity(csi: CsiClient, device_class: str) -> int:
    request = csi_pb2.GetCapacityRequest(parameters={"deviceClass": device_class})
    return csi.controller.GetCapacity(request).available_capacity


def test_stats_creates_and_capacity_read_no_whole_vg_report(
    client: CsiClient, watched: Driver, workdir: Path, name: str
) -> None:
    capacity(client, "kept")
    made = reports_during(watched, lambda: create(client, name, 8 * MiB, "kept"))
    assert made == (0, 0, ["lvcreate"])
    volume_id = f"{NODE_ID}:kept:csi-{name}"
    staging, target = str(workdir / f"{name}.staging"), str(workdir / f"{name}.target")
    stage(client, volume_id, staging, mount_capability())
    publish(client, volume_id, staging, target, mount_capability())
    request = csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=target)

    def poll_stats() -> None:
        for _ in range(20):
            client.node.NodeGetVolumeStats(request)

    # Staging activated the LV: the first call reads that one LV again, once.
    assert reports_during(watched, poll_stats)[:2] in ((0, 0), (0, 1))
    assert reports_during(watched, poll_stats) == (0, 0, [])
    assert client.node.NodeGetVolumeStats(request).usage[0].total > 0
    # Nothing changed: capacity comes from the kept view; a change of the
    # driver's own is read once, by the first call after it.
    assert reports_during(watched, lambda: capacity(client, "kept"))[0] <= 1  # staging's change
    assert reports_during(watched, lambda: [capacity(client, "kept") for _ in range(5)])[0] == 0
    unpublish(client, volume_id, target)
    unstage(client, volume_id, staging)
    delete(client, volume_id)


def test_the_drivers_changes_show_at_once_and_an_admins_within_the_interval(
    client: CsiClient, vg: LoopVolumeGroup, name: str
) -> None:
    before = capacity(client, "kept")
    volume = create(client, name, 64 * MiB, "kept")
    assert capacity(client, "kept") == before - 64 * MiB
    delete(client, volume.volume_id)
    assert capacity(client, "kept") == before
    # The same name again at once: the view saw the delete.
    volume = create(client, name, 64 * MiB, "kept")
    delete(client, volume.volume_id)
    admin_lv = f"admin-{name}"
    vg.lvcreate("-V", "128M", "-T", f"{vg.name}/{vg.pool}", "-n", admin_lv)
    try:
        started = time.monotonic()
        while capacity(client, "kept") != before - 128 * MiB:
            assert time.monotonic() - started < 3 * REFRESH, "the admin's LV never showed"
            time.sleep(0.2)
    finally:
        subprocess.run(["lvremove", "-q", "-y", f"{vg.name}/{admin_lv}"], check=True)


def metric(port: int, name: str, device_class: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    prefix = f'{name}{{device_class="{device_class}"}} '
    return float(next(line for line in text.splitlines() if line.startswith(prefix))[len(prefix) :])


def test_a_full_metadata_area_is_resource_exhausted_that_names_it(
    client: CsiClient, watched: Driver, small_vg: LoopVolumeGroup, name: str
) -> None:
    port = watched_port()
    area = metric(port, "csi_lvm_volume_group_metadata_area_bytes", CRAMPED)
    free = metric(port, "csi_lvm_volume_group_metadata_free_bytes", CRAMPED)
    assert 0 < free < area
    volume = create(client, name, 8 * MiB, CRAMPED)
    # An admin's LV whose tags leave about 2 KiB of the area: a few records more.
    tags = int((free - 2048) // (len(TAG) + 8))
    filler = f"filler-{name}"
    small_vg.lvcreate(
        "-L", "4M", "-n", filler,
        *[arg for i in range(tags) for arg in ("--addtag", f"{i:03d}{TAG}")], small_vg.name,
    )  # fmt: skip
    try:
        started = time.monotonic()
        while capacity(client, CRAMPED) != 0:  # the admin's change, within the interval
            assert time.monotonic() - started < 3 * REFRESH
            time.sleep(0.2)
        assert metric(port, "csi_lvm_volume_group_metadata_free_bytes", CRAMPED) < 4096
        details = expect_error(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            client.controller.CreateVolume,
            csi_pb2.CreateVolumeRequest(
                name=f"{name}-2",
                volume_capabilities=[mount_capability()],
                parameters={"deviceClass": CRAMPED},
            ),
            f"metadata area of volume group {small_vg.name} is full",
            "pvcreate --metadatasize",
        )
        assert "vgextend" in details
        checks = run_doctor(load_config(watched.config), Lvm(), "/tmp", NODE_ID)
        failed = [c for c in checks if not c.ok and CRAMPED in c.what]
        assert failed and "metadata area" in failed[0].fix
        # LVM's own refusal, when a change does not fit, is told apart too.
        with pytest.raises(LvmMetadataFull, match="pvcreate --metadatasize"):
            more = [arg for i in range(4) for arg in ("--addtag", f"zz{i}{TAG}")]
            Lvm().change(["lvchange", *more, f"{small_vg.name}/{filler}"])
        # What exists is still served: deleting frees records.
        delete(client, volume.volume_id)
    finally:
        subprocess.run(["lvremove", "-q", "-y", f"{small_vg.name}/{filler}"], check=True)
    started = time.monotonic()
    while capacity(client, CRAMPED) == 0:
        assert time.monotonic() - started < 3 * REFRESH
        time.sleep(0.2)


def test_a_create_never_answers_an_lv_removed_by_hand_since_the_view_showed_it(
    workdir: Path, vg: LoopVolumeGroup, name: str
) -> None:
    # A refresh interval longer than the test: the kept view shows the
    # volume (made by this driver, read again once) after an admin removed it.
    driver = driver_of_its_own(workdir, name, vg, "--refresh-interval", "3600")
    csi = driver.start()
    try:
        volume = create(csi, name, 8 * MiB)
        assert create(csi, name, 8 * MiB) == volume  # a repeat: the view has it now
        lv = volume.volume_id.rsplit(":", 1)[1]
        subprocess.run(["lvremove", "-q", "-y", f"{vg.name}/{lv}"], check=True)
        again = create(csi, name, 8 * MiB)
        assert again.volume_id == volume.volume_id
        assert lv in vg.lv_names()  # made anew, not answered as made
        snapshot_name = f"{name}-s"
        made = csi.controller.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(name=snapshot_name, source_volume_id=volume.volume_id)
        ).snapshot
        snapshot_lv = made.snapshot_id.rsplit(":", 1)[1]
        subprocess.run(["lvremove", "-q", "-y", f"{vg.name}/{snapshot_lv}"], check=True)
        remade = csi.controller.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(name=snapshot_name, source_volume_id=volume.volume_id)
        ).snapshot
        assert remade.snapshot_id == made.snapshot_id and snapshot_lv in vg.lv_names()
        csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=made.snapshot_id))
        delete(csi, volume.volume_id)
    finally:
        csi.close()
        assert driver.stop() == 0


def test_probe_and_info_answer_while_every_lvm_command_waits(
    workdir: Path, vg: LoopVolumeGroup, name: str
) -> None:
    # A queue of creates behind a VG that another LVM command holds: the
    # liveness probe must never wait for LVM, or the kubelet restarts the
    # container, and LVM with it (issue 15, item 5).
    driver = driver_of_its_own(workdir, name, vg, "--refresh-interval", "3600")
    csi = driver.start()
    capacity(csi, "thin")  # the kept view, read before the VG is held (start-up's report)
    names = [f"{name}-{i}" for i in range(16)]
    with ThreadPoolExecutor(len(names)) as pool:
        with lvm_lock_held(vg.name) as lock:
            creates = [pool.submit(create, csi, n, 8 * MiB) for n in names]
            assert driver.process is not None
            first_waiting(lock, driver.process.pid, "no create reached LVM", 60)
            slowest = 0.0
            for _ in range(20):
                started = time.monotonic()
                assert csi.identity.Probe(csi_pb2.ProbeRequest(), timeout=5).ready.value
                csi.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=5)
                slowest = max(slowest, time.monotonic() - started)
            assert waiting_for(lock), "LVM was not held during the calls: the test proved nothing"
            assert slowest < 1.0, f"a probe and info took {slowest:.3f} s"
        volumes = [c.result(timeout=300) for c in creates]
    for volume in volumes:
        delete(csi, volume.volume_id)
    csi.close()
    assert driver.stop() == 0


def test_a_vg_that_is_not_the_drivers_never_stalls_it(
    client: CsiClient, watched: Driver, workdir: Path, name: str
) -> None:
    # The refreshes read the driver's VGs alone: a long command of an admin's
    # on another VG (here: its lock, held) must not queue the driver's LVM.
    foreign = LoopVolumeGroup(workdir / name, name=f"foreign{os.getpid()}", size="64M",
                              pool_size="16M").create()  # fmt: skip
    try:
        with lvm_lock_held(foreign.name):
            start = watched.log_path.stat().st_size
            deadline = time.monotonic() + 6 * REFRESH
            refreshed = False
            while not refreshed:
                assert time.monotonic() < deadline, "no refresh of the thin pools finished"
                time.sleep(0.5)
                with watched.log_path.open() as log:
                    log.seek(start)
                    refreshed = any(
                        '"lvm"' in line and "segtype=thin-pool" in line for line in log
                    )  # fmt: skip
            volume = client.controller.CreateVolume(
                create_request(name, 8 * MiB, "kept"), timeout=30
            ).volume
            client.controller.DeleteVolume(
                csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=30
            )
    finally:
        foreign.destroy()
