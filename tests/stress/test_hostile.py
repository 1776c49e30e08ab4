"""Hostile requests against a real volume group: generated requests for every
RPC (tests/hostile.py) aimed at a hand-made LV and a hand-made mount of it.
Every answer is a proper status, and at the end the hand-made LV, its mount
and its data are exactly as they were."""

from __future__ import annotations

import collections
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from csi_lvm.csi import csi_pb2
from tests.hostile import Call, answer, hostile_calls
from tests.lvm.conftest import HANDMADE_LV
from tests.stress.conftest import RESULTS, lv_report, untouched_part
from tests.testbed import CsiClient, Driver, LoopVolumeGroup, write_config

EXAMPLES = int(os.environ.get("CSI_LVM_HOSTILE_EXAMPLES", "150"))


def mounted_at(path: Path) -> bool:
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == str(path) for line in mountinfo)


@pytest.fixture(scope="module")
def handmade_mount(workdir: Path, vg: LoopVolumeGroup) -> Iterator[Path]:
    device = f"/dev/{vg.name}/{HANDMADE_LV}"
    mount_point = workdir / "handmade-mount"
    mount_point.mkdir()
    subprocess.run(["mkfs.ext4", "-q", device], check=True)
    subprocess.run(["mount", device, str(mount_point)], check=True)
    (mount_point / "data").write_text("made by hand")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


@pytest.fixture(scope="module")
def csi(workdir: Path, vg: LoopVolumeGroup) -> Iterator[CsiClient]:
    home = workdir / "hostile"
    home.mkdir()
    driver = Driver(home, write_config(home / "config.yaml", vg.name, vg.pool))
    client = driver.start()
    yield client
    client.close()
    assert driver.stop() == 0


def test_hostile_requests_leave_what_is_not_ours_untouched(
    csi: CsiClient, vg: LoopVolumeGroup, handmade_mount: Path, workdir: Path
) -> None:
    untouched = untouched_part(lv_report(vg.name))
    link = workdir / "link-to-handmade-mount"
    link.symlink_to(handmade_mount)
    paths = [str(handmade_mount), str(link), str(handmade_mount / "data"), f"{link}/data"]
    codes: collections.Counter[str] = collections.Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(call=hostile_calls(paths, handmade_lv=HANDMADE_LV))
    def check(call: Call) -> None:
        code, _ = answer(csi, call)
        codes[f"{call.method} {code.name}"] += 1
        assert mounted_at(handmade_mount), f"{call} unmounted the hand-made mount"

    try:
        check()
    finally:
        # Some generated creates are valid (CSI names are free-form): remove them.
        for entry in csi.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries:
            snapshot_id = entry.snapshot.snapshot_id
            csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id))
        for entry in csi.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries:
            csi.controller.DeleteVolume(
                csi_pb2.DeleteVolumeRequest(volume_id=entry.volume.volume_id)
            )
    (RESULTS / "hostile-codes.json").write_text(json.dumps(dict(sorted(codes.items())), indent=1))
    print(f"\nhostile input: {sum(codes.values())} generated calls; answers: {dict(codes)}")
    assert mounted_at(handmade_mount) and (handmade_mount / "data").read_text() == "made by hand"
    assert link.is_symlink() and os.readlink(link) == str(handmade_mount)
    assert untouched_part(lv_report(vg.name)) == untouched
