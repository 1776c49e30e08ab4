"""The kept view: the LVs the driver changed since a report are read again by
name, nothing else is; the change log says when it no longer reaches back."""

from __future__ import annotations

import dataclasses

import pytest

from csi_lvm.backends.admission import (
    METADATA_BYTES_PER_LV,
    METADATA_RESERVE_BYTES,
    metadata_full,
    metadata_room_lvs,
)
from csi_lvm.kept_view import ChangedScan, Scan
from csi_lvm.lvm import journal
from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.errors import LvmError
from csi_lvm.lvm.records import LogicalVolume, LvAttr, VolumeGroup
from csi_lvm.lvm.runner import Runner


def lv(name: str, group: str = "vg0", size: int = 4096) -> LogicalVolume:
    return LogicalVolume(
        name=name, vg_name=group, uuid="", size_bytes=size, attr=LvAttr("Vwi-a-tz--"),
        pool="pool0", origin="", tags=(), data_percent=0.0, metadata_percent=None,
        path=f"/dev/{group}/{name}", dm_path="", created="",
    )  # fmt: skip


def group(name: str) -> VolumeGroup:
    return VolumeGroup(name, 1 << 30, 1 << 29, 4 << 20, "wz--n-", 0)


def test_a_scan_finds_lvs_by_group_and_name() -> None:
    scan = Scan((lv("a"), lv("a", "vg1"), lv("b")), {"vg0": group("vg0"), "vg1": group("vg1")})
    assert scan.lv("vg0", "b") is not None and scan.lv("vg1", "b") is None
    assert {found.vg_name for found in scan.named("a")} == {"vg0", "vg1"}


def test_only_touched_lvs_are_read_again_and_each_once() -> None:
    reads: list[tuple[str, str]] = []
    made_since = lv("new", size=8192)

    def reread(volume_group: str, name: str) -> LogicalVolume | None:
        reads.append((volume_group, name))
        return made_since if name == "new" else None

    view = ChangedScan(
        (lv("kept"), lv("removed")),
        {"vg0": group("vg0")},
        touched=frozenset({("vg0", "new"), ("vg0", "removed")}),
        reread=reread,
    )
    assert view.lv("vg0", "kept") is not None  # from the report
    assert view.lv("vg0", "new") is made_since
    assert view.lv("vg0", "removed") is None  # gone since the report
    assert view.named("new") == [made_since] and view.named("removed") == []
    assert sorted(reads) == [("vg0", "new"), ("vg0", "removed")]
    # Sums over the report still see it as it was (reservations cover the rest).
    assert [found.name for found in view.lvs] == ["kept", "removed"]


def test_the_change_log_names_what_changed_since_a_count(monkeypatch: pytest.MonkeyPatch) -> None:
    lvm = Lvm(Runner(binary="true"))  # a process that accepts any change and succeeds
    before = lvm.changes
    lvm.create_thin_volume("vg0", "pool0", "csi-a", 4 << 20, [])
    middle = lvm.changes
    lvm.remove("vg0", "csi-b")
    # Each LV with whether the latest change removed it.
    after = lvm.changes
    assert lvm.touched_since(before) == {("vg0", "csi-a"): (middle, False),
                                         ("vg0", "csi-b"): (after, True)}  # fmt: skip
    assert lvm.touched_since(middle) == {("vg0", "csi-b"): (after, True)}
    assert lvm.touched_since(lvm.changes) == {}
    failing = Lvm(Runner(binary="false"))
    with pytest.raises(LvmError):
        failing.remove("vg0", "csi-c")
    assert failing.touched_since(0) == {("vg0", "csi-c"): (2, False)}  # still there
    monkeypatch.setattr(journal, "_TOUCHED_KEPT", 2)
    for name in ("csi-c", "csi-d", "csi-e"):
        lvm.extend("vg0", name, 8 << 20)
    assert lvm.touched_since(before) is None  # forgotten: read everything again
    assert lvm.touched_since(lvm.changes - 1) == {("vg0", "csi-e"): (lvm.changes, False)}


def test_a_metadata_area_near_full_takes_no_new_volumes_and_says_how_to_fix_it() -> None:
    roomy = VolumeGroup("vg0", 1 << 30, 1 << 29, 4 << 20, "wz--n-", 0, 1044480, 300_000)
    assert metadata_full(roomy) is None
    assert metadata_room_lvs(roomy) == (300_000 - METADATA_RESERVE_BYTES) // METADATA_BYTES_PER_LV
    cramped = dataclasses.replace(roomy, metadata_free_bytes=METADATA_RESERVE_BYTES - 1)
    refusal = metadata_full(cramped)
    assert refusal is not None and "metadata area of volume group vg0 is full" in refusal
    assert "pvcreate --metadatasize" in refusal and "vgextend" in refusal
    assert metadata_room_lvs(cramped) == 0
    unknown = dataclasses.replace(roomy, metadata_area_bytes=0)  # a report without the fields
    assert metadata_full(unknown) is None and metadata_room_lvs(unknown) is None


def test_a_view_looks_untouched_lvs_up_in_its_report_s_index() -> None:
    # One view per call: an index of its own would cost each call a pass
    # over every LV of the node (issue 18: stats p99 at 1000 volumes).
    report = Scan(tuple(lv(f"v{i}") for i in range(1000)), {"vg0": group("vg0")})
    touched = frozenset({("vg0", "v1")})
    views = [
        ChangedScan(report.lvs, report.vgs, touched=touched, reread=lambda g, n: None, kept=report)
        for _ in range(3)
    ]
    for view in views:
        assert view.lv("vg0", "v7") is report.lv("vg0", "v7")
        assert view.lv("vg0", "v1") is None  # touched: read again
        assert view.named("v9") == [report.lv("vg0", "v9")]
        assert "_by_name" not in view.__dict__  # no index of its own was built
