"""Health findings from LVM's records: what each state of an LV or a
device class's storage is reported as (status, reason, what to do), one
finding per status and reason, and the one condition kubelets before the
health RPCs read. The states themselves are made on real LVM in
tests/lvm/test_layouts.py (a failed RAID image, a class whose PVs cannot
hold its layout)."""

from __future__ import annotations

import pytest

from csi_lvm.backends.admission import ClassSpace
from csi_lvm.backends.health import (
    DEGRADED,
    INACCESSIBLE,
    STORAGE_DEGRADED,
    STORAGE_UNREACHABLE,
    Finding,
    class_findings,
    condition_of,
    merged,
    volume_findings,
)
from csi_lvm.lvm.records import LogicalVolume, LvAttr, RaidState, VolumeGroup


def lv(attr: str) -> LogicalVolume:
    return LogicalVolume(
        name="csi-v", vg_name="vg0", uuid="u", size_bytes=1 << 30, attr=LvAttr(attr), pool="",
        origin="", tags=(), data_percent=None, metadata_percent=None, path="", dm_path="",
        created="",
    )  # fmt: skip


def group(missing: int = 0) -> VolumeGroup:
    return VolumeGroup("vg0", 10 << 30, 5 << 30, 4 << 20, "wz--n-", missing)


def raid(attr: str = "rwi-aor---", percent: float | None = 100.0, action: str = "idle",
         integrity: int = 0) -> RaidState:  # fmt: skip
    return RaidState(LvAttr(attr), percent, action, integrity)


def findings(
    the_lv: LogicalVolume, state: RaidState | None = None, **extra: object
) -> list[Finding]:
    return volume_findings(
        the_lv, state, extra.get("unready"), extra.get("problem"), "fast",  # type: ignore[arg-type]
        extra.get("group", group()),  # type: ignore[arg-type]
    )  # fmt: skip


def test_a_healthy_volume_has_no_findings_and_a_healthy_condition() -> None:
    assert findings(lv("-wi-ao----")) == []
    assert findings(lv("rwi-aor---"), raid()) == []
    assert condition_of([]).abnormal is False


@pytest.mark.parametrize(
    ("attr", "status", "reason", "fragment"),
    [
        ("rwi-aor-r-", DEGRADED, "RaidImageFailed", "lvconvert --repair vg0/csi-v"),
        ("rwi-aor-p-", DEGRADED, "PhysicalVolumeMissing", "lvconvert --repair vg0/csi-v"),
        ("rwi-aor-m-", DEGRADED, "RaidMismatches", "lvchange --syncaction repair vg0/csi-v"),
        ("-wi-ao--p-", INACCESSIBLE, "PhysicalVolumeMissing", "physical volume under it"),
        ("Vwi-aotzD-", INACCESSIBLE, "ThinPoolOutOfData", "out of data space"),
        ("Vwi-aotzF-", INACCESSIBLE, "ThinPoolFailed", "failed"),
        ("-wi-so----", INACCESSIBLE, "DeviceUnusable", "suspended"),
    ],
)
def test_each_lv_state_is_a_finding_that_says_what_to_do(
    attr: str, status: str, reason: str, fragment: str
) -> None:
    found = findings(lv(attr))
    assert [(f.status, f.reason) for f in found] == [(status, reason)]
    assert fragment in found[0].message and "LV vg0/csi-v" in found[0].message
    condition = condition_of(found)
    assert condition.abnormal and condition.message == found[0].message


def test_a_raid_states_fresh_record_wins_and_its_sync_and_checksums_show() -> None:
    stale = lv("rwi-aor---")
    failed = findings(stale, raid(attr="rwi-aor-r-"))
    assert [f.reason for f in failed] == ["RaidImageFailed"]
    syncing = findings(stale, raid(percent=42.5, action="recover"))
    assert [(f.status, f.reason) for f in syncing] == [(DEGRADED, "RaidResyncing")]
    assert "42.5% done" in syncing[0].message
    checked = findings(stale, raid(integrity=3))
    assert [f.reason for f in checked] == ["IntegrityMismatches"]
    assert "3 blocks failed their integrity checksum" in checked[0].message


def test_lifecycle_storage_and_missing_pvs_add_findings() -> None:
    found = findings(
        lv("-wi-a-----"), unready="its copy is not complete", problem="pool needs repair",
        group=group(missing=1),
    )  # fmt: skip
    assert [(f.status, f.reason) for f in found] == [
        (INACCESSIBLE, "VolumeNotReady"),
        (DEGRADED, "DeviceClassTrouble"),
        (DEGRADED, "PhysicalVolumeMissing"),
    ]
    assert "device class fast: pool needs repair" in found[1].message


def test_findings_are_one_per_status_and_reason() -> None:
    same = [Finding(DEGRADED, "X", "a"), Finding(DEGRADED, "X", "b"), Finding(DEGRADED, "Y", "c")]
    assert merged(same) == [Finding(DEGRADED, "X", "a; b"), Finding(DEGRADED, "Y", "c")]
    assert merged([Finding(DEGRADED, "X", "a"), Finding(DEGRADED, "X", "a")]) == [
        Finding(DEGRADED, "X", "a")
    ]


def test_storage_findings_of_a_class() -> None:
    healthy = ClassSpace(1 << 30, 4 << 20, 2 << 30, 1 << 30)
    assert class_findings("fast", healthy, group(), None) == []
    missing = ClassSpace(0, 0, 0, 0, missing="volume group 'vg9' does not exist")
    assert class_findings("fast", missing, None, None) == [
        Finding(
            STORAGE_UNREACHABLE,
            "StorageMissing",
            "device class fast: volume group 'vg9' does not exist",
        )
    ]
    troubled = ClassSpace(0, 4 << 20, 1, 1, full="pool 96% full", needs_repair="repair it")
    found = class_findings("fast", troubled, group(missing=2), "metadata low")
    assert [(f.status, f.reason) for f in found] == [
        (STORAGE_DEGRADED, "PhysicalVolumeMissing"),
        (STORAGE_DEGRADED, "ThinPoolNeedsRepair"),
        (STORAGE_DEGRADED, "ThinPoolNearlyFull"),
        (STORAGE_DEGRADED, "MetadataAreaLow"),
    ]
    assert "missing 2 physical volume(s)" in found[0].message
