"""The contract of the LVM verbs the driver uses: every case runs against
the in-memory model (tests/memory_lvm.py) and, in the VM, against real LVM,
so the model the host's servicer tests stand on cannot drift from LVM."""

from __future__ import annotations

import itertools
import os

import pytest

from csi_lvm.lvm.errors import LvmAlreadyExists, LvmBadName, LvmInUse, LvmNoSpace, LvmNotFound
from csi_lvm.lvm.records import LogicalVolume, VolumeGroup
from tests.contract.conftest import POOL, POOL_BYTES, Subject

MiB = 1 << 20
EXTENT = 4 * MiB
CHUNK = 64 << 10
_names = itertools.count()


def fresh(prefix: str) -> str:
    """A name no other test, nor the other worker's VG, uses."""
    return f"{prefix}{os.getpid()}x{next(_names)}"


def lv(subject: Subject, name: str) -> LogicalVolume:
    found = subject.lvm.find_lv(subject.vg, name)
    assert found is not None, f"{subject.vg}/{name} is not there"
    return found


def group(subject: Subject) -> VolumeGroup:
    (found,) = subject.lvm.list_vgs([subject.vg])
    return found


def pool_data_percent(subject: Subject) -> float:
    fill = subject.lvm.pool_fill(subject.vg, POOL)
    assert fill is not None
    return fill.data_percent


def test_a_thin_volume_is_whole_extents_active_tagged_and_takes_no_vg_space(
    subject: Subject,
) -> None:
    name, free = fresh("thin"), group(subject).free_bytes
    subject.lvm.create_thin_volume(subject.vg, POOL, name, 10 * MiB, ["a=1", "b/c"])
    made = lv(subject, name)
    assert made.size_bytes == 12 * MiB
    assert made.attr.is_thin_volume and made.attr.active and not made.attr.skip_activation
    assert made.pool == POOL and made.origin == ""
    assert set(made.tags) == {"a=1", "b/c"}
    assert made.data_percent == 0.0
    assert made.dm_path.startswith("/dev/mapper/") and made.created_at is not None
    assert group(subject).free_bytes == free
    assert group(subject).extent_bytes == EXTENT


def test_a_linear_volume_takes_its_whole_extents_from_the_vg(subject: Subject) -> None:
    name, free = fresh("linear"), group(subject).free_bytes
    subject.lvm.create_linear_volume(subject.vg, name, 5 * MiB, ["x=y"])
    made = lv(subject, name)
    assert made.size_bytes == 8 * MiB
    assert not made.attr.is_thin_volume and made.attr.active and made.pool == ""
    assert group(subject).free_bytes == free - 8 * MiB
    subject.lvm.remove(subject.vg, name)
    assert group(subject).free_bytes == free


def test_a_name_taken_is_already_exists_and_changes_nothing(subject: Subject) -> None:
    name = fresh("taken")
    subject.lvm.create_thin_volume(subject.vg, POOL, name, 4 * MiB, ["first"])
    with pytest.raises(LvmAlreadyExists):
        subject.lvm.create_thin_volume(subject.vg, POOL, name, 8 * MiB, ["second"])
    with pytest.raises(LvmAlreadyExists):
        subject.lvm.create_linear_volume(subject.vg, name, 4 * MiB, ["second"])
    assert lv(subject, name).tags == ("first",) and lv(subject, name).size_bytes == 4 * MiB


def test_no_room_is_no_space_and_makes_nothing(subject: Subject) -> None:
    name, free = fresh("big"), group(subject).free_bytes
    with pytest.raises(LvmNoSpace):
        subject.lvm.create_linear_volume(subject.vg, name, free + EXTENT, [])
    assert subject.lvm.find_lv(subject.vg, name) is None
    assert group(subject).free_bytes == free


def test_missing_things_are_not_found(subject: Subject) -> None:
    name = fresh("missing")
    with pytest.raises(LvmNotFound):
        subject.lvm.remove(subject.vg, name)
    with pytest.raises(LvmNotFound):
        subject.lvm.delete_tag(subject.vg, name, "a=1")
    with pytest.raises(LvmNotFound):
        subject.lvm.create_thin_snapshot(subject.vg, name, fresh("snap"), [], active=False)
    with pytest.raises(LvmNotFound):
        subject.lvm.list_lvs([f"{subject.vg}gone"])
    assert subject.lvm.find_lv(subject.vg, name) is None
    assert subject.lvm.list_vgs([f"{subject.vg}gone"]) == []
    assert subject.lvm.find_lvs_named(name) == []
    with pytest.raises(LvmBadName):
        subject.lvm.find_lv(subject.vg, "no spaces")


def test_a_thin_snapshot_is_inactive_skipped_and_activates_on_request(subject: Subject) -> None:
    origin, snap = fresh("origin"), fresh("snap")
    subject.lvm.create_thin_volume(subject.vg, POOL, origin, 8 * MiB, [])
    subject.lvm.create_thin_snapshot(subject.vg, origin, snap, ["s=1"], active=False)
    made = lv(subject, snap)
    assert made.origin == origin and made.pool == POOL and made.size_bytes == 8 * MiB
    assert made.attr.is_thin_volume and not made.attr.active and made.attr.skip_activation
    assert made.data_percent is None
    assert [s.name for s in subject.lvm.snapshots_of(subject.vg, origin)] == [snap]
    subject.lvm.activate(subject.vg, snap)
    assert lv(subject, snap).attr.active and lv(subject, snap).attr.skip_activation
    restore = fresh("restore")
    subject.lvm.create_thin_snapshot(subject.vg, origin, restore, [], active=True)
    assert lv(subject, restore).attr.active and not lv(subject, restore).attr.skip_activation


def test_thin_devices_have_ids_and_the_pool_its_chunk(subject: Subject) -> None:
    first, second = fresh("id"), fresh("id")
    for name in (first, second):
        subject.lvm.create_thin_volume(subject.vg, POOL, name, 4 * MiB, [])
    found = subject.lvm.thin_lvs(subject.vg, [first, second, POOL, fresh("absent")])
    assert set(found) == {first, second, POOL}
    ids = {found[first].thin_id, found[second].thin_id}
    assert None not in ids and len(ids) == 2
    assert found[POOL].chunk_bytes == CHUNK


def test_writes_fill_the_pool_and_snapshots_share_what_is_written(subject: Subject) -> None:
    name, snap = fresh("data"), fresh("datasnap")
    subject.lvm.create_thin_volume(subject.vg, POOL, name, 16 * MiB, [])
    before = pool_data_percent(subject)
    subject.write(name, 8 * MiB)
    one_write = 100.0 * 8 * MiB / POOL_BYTES
    assert pool_data_percent(subject) == pytest.approx(before + one_write, abs=0.01)
    assert subject.lvm.thin_mapped_sectors(lv(subject, name)) == 8 * MiB // 512
    subject.lvm.create_thin_snapshot(subject.vg, name, snap, [], active=False)
    assert pool_data_percent(subject) == pytest.approx(before + one_write, abs=0.01)
    subject.lvm.remove(subject.vg, name)  # the snapshot still maps the blocks
    assert pool_data_percent(subject) == pytest.approx(before + one_write, abs=0.01)
    assert lv(subject, snap).origin == ""
    subject.lvm.remove(subject.vg, snap)
    assert pool_data_percent(subject) == pytest.approx(before, abs=0.01)


def test_growth_is_whole_extents_and_linear_growth_needs_room(subject: Subject) -> None:
    thin, linear = fresh("growthin"), fresh("growlinear")
    subject.lvm.create_thin_volume(subject.vg, POOL, thin, 4 * MiB, [])
    subject.lvm.extend(subject.vg, thin, 9 * MiB)
    assert lv(subject, thin).size_bytes == 12 * MiB
    subject.lvm.create_linear_volume(subject.vg, linear, 4 * MiB, [])
    free = group(subject).free_bytes
    with pytest.raises(LvmNoSpace):
        subject.lvm.extend(subject.vg, linear, 4 * MiB + free + EXTENT)
    subject.lvm.extend(subject.vg, linear, 8 * MiB)
    assert lv(subject, linear).size_bytes == 8 * MiB
    assert group(subject).free_bytes == free - 4 * MiB
    subject.lvm.remove(subject.vg, linear)


def test_a_cow_snapshot_takes_room_and_goes_with_its_origin(subject: Subject) -> None:
    origin, view = fresh("cow"), fresh("cowview")
    subject.lvm.create_linear_volume(subject.vg, origin, 8 * MiB, [])
    free = group(subject).free_bytes
    subject.lvm.create_cow_snapshot(subject.vg, origin, view, 4 * MiB, 64 << 10, ["v=1"])
    assert group(subject).free_bytes == free - 4 * MiB
    assert lv(subject, origin).attr.is_cow_origin
    made = lv(subject, view)
    assert made.attr.is_cow_snapshot and made.attr.active and made.origin == origin
    assert [s.name for s in subject.lvm.snapshots_of(subject.vg, origin)] == [view]
    subject.lvm.remove(subject.vg, origin)
    assert subject.lvm.find_lv(subject.vg, view) is None
    assert group(subject).free_bytes == free + 8 * MiB


def test_an_open_device_is_in_use_and_is_not_removed(subject: Subject) -> None:
    name = fresh("open")
    subject.lvm.create_thin_volume(subject.vg, POOL, name, 4 * MiB, [])
    assert not lv(subject, name).attr.device_open
    with subject.open(name):
        assert lv(subject, name).attr.device_open
        with pytest.raises(LvmInUse):
            subject.lvm.remove(subject.vg, name)
    assert not lv(subject, name).attr.device_open
    subject.lvm.remove(subject.vg, name)


def test_tags_are_deleted_one_by_one(subject: Subject) -> None:
    name = fresh("tags")
    subject.lvm.create_thin_volume(subject.vg, POOL, name, 4 * MiB, ["keep=1", "drop=1"])
    subject.lvm.delete_tag(subject.vg, name, "drop=1")
    assert lv(subject, name).tags == ("keep=1",)
    with pytest.raises(LvmBadName):
        subject.lvm.delete_tag(subject.vg, name, "no spaces")


def test_tags_are_added_and_deleted_in_one_change(subject: Subject) -> None:
    name = fresh("retag")
    subject.lvm.create_thin_volume(subject.vg, POOL, name, 4 * MiB, ["keep=1", "copied=5"])
    count = subject.lvm.changes
    subject.lvm.change_tags(subject.vg, name, ["copied=9"], ["copied=5"])
    assert sorted(lv(subject, name).tags) == ["copied=9", "keep=1"]
    assert subject.lvm.changes == count + 2  # one command: its start and its end
    subject.lvm.change_tags(subject.vg, name, ["keep=1", "copied=10"], ["copied=9", "keep=1"])
    assert sorted(lv(subject, name).tags) == ["copied=10", "keep=1"]  # both ways: it stays
    subject.lvm.change_tags(subject.vg, name, [], ["copied=10", "keep=1"])
    assert lv(subject, name).tags == ()
    with pytest.raises(LvmBadName):
        subject.lvm.change_tags(subject.vg, name, ["no spaces"], [])


def test_every_change_is_journalled_and_moves_the_vg_on(subject: Subject) -> None:
    name = fresh("journal")
    count, seqno = subject.lvm.changes, group(subject).seqno
    subject.lvm.create_thin_volume(subject.vg, POOL, name, 4 * MiB, [])
    assert subject.lvm.changes == count + 2
    assert group(subject).seqno > seqno
    with pytest.raises(LvmAlreadyExists):
        subject.lvm.create_thin_volume(subject.vg, POOL, name, 4 * MiB, [])
    subject.lvm.remove(subject.vg, name)
    assert subject.lvm.changes == count + 6
    touched = subject.lvm.touched_since(count)
    assert touched is not None and touched[(subject.vg, name)] == (count + 6, True)


def test_reports_list_the_vg_whole(subject: Subject) -> None:
    name = fresh("listed")
    subject.lvm.create_thin_volume(subject.vg, POOL, name, 4 * MiB, [])
    lvs, vgs = subject.lvm.scan([subject.vg])
    assert [vg.name for vg in vgs] == [subject.vg]
    assert {POOL, name} <= {each.name for each in lvs}
    assert all(each.vg_name == subject.vg for each in lvs)
    pools, _ = subject.lvm.thin_pools([subject.vg])
    assert [pool.name for pool in pools] == [POOL] and pools[0].attr.is_thin_pool
    assert [each.name for each in subject.lvm.list_lvs([subject.vg])] == [e.name for e in lvs]
    assert [each.full_name for each in subject.lvm.find_lvs_named(name)] == [f"{subject.vg}/{name}"]
