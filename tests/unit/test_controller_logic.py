"""The Controller service's logic on the in-memory LVM (tests/memory_lvm.py,
held to real LVM by tests/contract): idempotency, conflicts, paging,
reservations under concurrent creates, the repair of what a crash left, and
LVM's refusals as statuses. What needs a device (thick zeroing and copies,
staging) is tested on real LVM in the VM."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_lvm.csi import csi_pb2
from csi_lvm.ids import Kind, lv_name_for
from csi_lvm.lifecycle import MAKING_TAG, NEW_FS_UUID_TAG
from csi_lvm.lvm.errors import (
    LvmAlreadyExists,
    LvmError,
    LvmInUse,
    LvmMetadataFull,
    LvmNoSpace,
    LvmPoolNeedsRepair,
    LvmTimeout,
)
from csi_lvm.lvm.records import LogicalVolume
from tests.lvm.helpers import create_request, expect_error
from tests.testbed import NODE_ID, TOPOLOGY_KEY
from tests.unit.host_server import HAND_MADE, MEMORY_VG, SMALL_POOL, MemoryNode, MiB, serve_memory

Code = grpc.StatusCode
GiB = 1024 * MiB


@pytest.fixture
def node(tmp_path: Path) -> Iterator[MemoryNode]:
    served = serve_memory(tmp_path)
    yield served
    served.close()


def create(node: MemoryNode, name: str, size: int = 16 * MiB, **extra: Any) -> csi_pb2.Volume:
    return node.csi.controller.CreateVolume(create_request(name, size, **extra)).volume


def snapshot(node: MemoryNode, name: str, source: str) -> csi_pb2.Snapshot:
    request = csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=source)
    return node.csi.controller.CreateSnapshot(request).snapshot


def lv_of(node: MemoryNode, kind: Kind, name: str) -> LogicalVolume | None:
    return node.lvm.find_lv(MEMORY_VG, lv_name_for(kind, name))


def driver_tags(node: MemoryNode, name: str, source: LogicalVolume | None = None) -> list[str]:
    """The tags the driver gives a thin volume of this CSI name (from ``source``)."""
    thin = node.graph.config.find("thin")
    assert thin is not None
    owned = None if source is None else node.graph.inventory.adopt(source)
    return node.graph.inventory.tags_for(Kind.VOLUME, name, thin, owned)


def capacity(node: MemoryNode, device_class: str = "thin", **extra: Any) -> int:
    request = csi_pb2.GetCapacityRequest(parameters={"deviceClass": device_class}, **extra)
    return int(node.csi.controller.GetCapacity(request).available_capacity)


def test_a_repeated_create_answers_the_same_volume_and_a_different_one_conflicts(
    node: MemoryNode,
) -> None:
    first = create(node, "data", 10 * MiB)
    assert first.capacity_bytes == 12 * MiB  # whole 4 MiB extents
    assert first.volume_id == f"{NODE_ID}:thin:csi-data"
    assert [dict(t.segments) for t in first.accessible_topology] == [{TOPOLOGY_KEY: NODE_ID}]
    assert create(node, "data", 10 * MiB) == first
    uuid = node.lvm.find_lv(MEMORY_VG, "csi-data")
    too_small = create_request("data", 10 * MiB)
    too_small.capacity_range.limit_bytes = 11 * MiB
    expect_error(Code.ALREADY_EXISTS, node.csi.controller.CreateVolume, too_small,
                 "already exists with 12582912 bytes")  # fmt: skip
    expect_error(Code.ALREADY_EXISTS, node.csi.controller.CreateVolume,
                 create_request("data", 10 * MiB, "small"), "device class thin, not small")  # fmt: skip
    assert node.lvm.find_lv(MEMORY_VG, "csi-data") == uuid  # nothing was changed


def test_sizes_outside_what_a_class_can_make_are_refused_before_lvm(node: MemoryNode) -> None:
    changes = node.lvm.changes
    huge = create_request("huge", 11 * GiB)  # the pool's 1 GiB, overcommitted 10x
    expect_error(Code.RESOURCE_EXHAUSTED, node.csi.controller.CreateVolume, huge,
                 "device class thin", "available")  # fmt: skip
    narrow = create_request("narrow", 5 * MiB)
    narrow.capacity_range.limit_bytes = 6 * MiB  # no whole extent fits
    expect_error(Code.OUT_OF_RANGE, node.csi.controller.CreateVolume, narrow)
    assert node.lvm.changes == changes


def test_capacity_follows_creates_deletes_and_topology(node: MemoryNode) -> None:
    before = capacity(node)
    assert before == 10 * GiB
    volume = create(node, "counted", 100 * MiB)
    assert capacity(node) == before - volume.capacity_bytes
    node.csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert capacity(node) == before
    elsewhere = csi_pb2.Topology(segments={TOPOLOGY_KEY: "another-node"})
    assert capacity(node, accessible_topology=elsewhere) == 0
    thick_free = node.lvm.list_vgs([MEMORY_VG])[0].free_bytes
    assert capacity(node, "thick") == thick_free


def test_list_volumes_pages_through_every_volume_once(node: MemoryNode) -> None:
    made = {create(node, f"page-{i}", 4 * MiB).volume_id for i in range(7)}
    seen: list[str] = []
    token = ""
    while True:
        request = csi_pb2.ListVolumesRequest(max_entries=3, starting_token=token)
        page = node.csi.controller.ListVolumes(request)
        assert len(page.entries) <= 3
        seen += [entry.volume.volume_id for entry in page.entries]
        assert all(not e.status.volume_condition.abnormal for e in page.entries)
        token = page.next_token
        if not token:
            break
    assert sorted(seen) == sorted(made)  # the hand-made LV is not listed
    expect_error(Code.ABORTED, node.csi.controller.ListVolumes,
                 csi_pb2.ListVolumesRequest(starting_token="not-a-token"), "not a token")  # fmt: skip


def test_snapshots_list_by_source_and_restore_larger(node: MemoryNode) -> None:
    source = create(node, "origin", 8 * MiB)
    other = create(node, "other", 8 * MiB)
    taken = snapshot(node, "snap", source.volume_id)
    assert taken.ready_to_use and taken.size_bytes == 8 * MiB
    assert taken.source_volume_id == source.volume_id
    assert snapshot(node, "snap", source.volume_id) == taken
    expect_error(Code.ALREADY_EXISTS, node.csi.controller.CreateSnapshot,
                 csi_pb2.CreateSnapshotRequest(name="snap", source_volume_id=other.volume_id),
                 "already exists for source volume")  # fmt: skip
    snapshot(node, "snap-other", other.volume_id)
    listed = node.csi.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(source_volume_id=source.volume_id)
    )
    assert [e.snapshot.snapshot_id for e in listed.entries] == [taken.snapshot_id]
    restore = create_request("restored", 20 * MiB)
    restore.volume_content_source.snapshot.snapshot_id = taken.snapshot_id
    restored = node.csi.controller.CreateVolume(restore).volume
    assert restored.capacity_bytes == 20 * MiB
    assert restored.content_source.snapshot.snapshot_id == taken.snapshot_id
    made = lv_of(node, Kind.VOLUME, "restored")
    assert made is not None and made.size_bytes == 20 * MiB and made.attr.active
    assert NEW_FS_UUID_TAG in made.tags  # its first stage gives the filesystem a UUID
    # A sidecar that lost the answer asks again after the snapshot is gone.
    node.csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=taken.snapshot_id))
    assert node.csi.controller.CreateVolume(restore).volume == restored
    expect_error(Code.NOT_FOUND, node.csi.controller.CreateVolume,
                 create_request("too-late", 20 * MiB,
                                volume_content_source=restore.volume_content_source),
                 taken.snapshot_id)  # fmt: skip


def test_deletes_are_idempotent_and_never_touch_what_is_not_ours(node: MemoryNode) -> None:
    volume = create(node, "gone", 4 * MiB)
    delete = node.csi.controller.DeleteVolume
    delete(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    delete(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert lv_of(node, Kind.VOLUME, "gone") is None
    for foreign in (f"{NODE_ID}:thin:{HAND_MADE}", f"{NODE_ID}:thick:{HAND_MADE}", "not-an-id"):
        delete(csi_pb2.DeleteVolumeRequest(volume_id=foreign))
    expect_error(Code.FAILED_PRECONDITION, delete,
                 csi_pb2.DeleteVolumeRequest(volume_id="other-node:thin:csi-gone"),
                 "belongs to node other-node")  # fmt: skip
    assert node.lvm.find_lv(MEMORY_VG, HAND_MADE) is not None
    expect_error(Code.INVALID_ARGUMENT, delete, csi_pb2.DeleteVolumeRequest(), "volume_id")


def test_concurrent_creates_never_overcommit_a_class(node: MemoryNode) -> None:
    # The small class may hold 64 MiB of volumes: two of 24 MiB, not three.
    answers: list[grpc.StatusCode] = []
    start = threading.Barrier(8)

    def one(i: int) -> None:
        start.wait()
        try:
            create(node, f"racer-{i}", 24 * MiB, parameters={"deviceClass": "small"})
            answers.append(Code.OK)
        except grpc.RpcError as error:
            answers.append(error.code())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers, key=str) == sorted([Code.OK] * 2 + [Code.RESOURCE_EXHAUSTED] * 6,
                                              key=str)  # fmt: skip
    made = [lv for lv in node.lvm.list_lvs([MEMORY_VG]) if lv.pool == SMALL_POOL]
    assert sum(lv.size_bytes for lv in made) == 48 * MiB


def test_a_pool_tenants_filled_takes_no_volume_at_once(node: MemoryNode) -> None:
    volume = create(node, "tenant", 60 * MiB, parameters={"deviceClass": "small"})
    assert capacity(node, "small") > 0
    node.lvm.write(MEMORY_VG, lv_name_for(Kind.VOLUME, "tenant"), 59 * MiB)  # 92 % of 64
    expect_error(Code.RESOURCE_EXHAUSTED, node.csi.controller.CreateVolume,
                 create_request("late", 4 * MiB, "small"), "full of data")  # fmt: skip
    assert capacity(node, "small") == 0
    assert volume.volume_id


def test_a_create_interrupted_while_making_is_made_again(node: MemoryNode) -> None:
    # A crash between lvcreate and the end of a blank thick volume's zeroing
    # leaves it MAKING: its content cannot be trusted, its id was never given.
    tags = driver_tags(node, "crashed")
    lv_name = lv_name_for(Kind.VOLUME, "crashed")
    node.lvm.create_thin_volume(MEMORY_VG, "pool0", lv_name, 8 * MiB, [*tags, MAKING_TAG])
    left = node.lvm.find_lv(MEMORY_VG, lv_name)
    volume = create(node, "crashed", 8 * MiB)
    again = node.lvm.find_lv(MEMORY_VG, lv_name)
    assert left is not None and again is not None
    assert again.uuid != left.uuid and MAKING_TAG not in again.tags
    assert volume.capacity_bytes == 8 * MiB


def test_start_up_removes_what_was_left_making_and_nothing_else(node: MemoryNode) -> None:
    kept = create(node, "kept", 4 * MiB)
    tags = driver_tags(node, "half")
    half = lv_name_for(Kind.VOLUME, "half")
    node.lvm.create_thin_volume(MEMORY_VG, "pool0", half, 4 * MiB, [*tags, MAKING_TAG])
    graph = node.graph
    assert graph.backends.states.remove_unfinished(graph.inventory, graph.locks) == 1
    assert node.lvm.find_lv(MEMORY_VG, half) is None
    assert lv_of(node, Kind.VOLUME, "kept") is not None and kept.volume_id
    assert node.lvm.find_lv(MEMORY_VG, HAND_MADE) is not None


def test_a_restore_interrupted_before_its_extend_is_extended_by_its_retry(
    node: MemoryNode,
) -> None:
    source = create(node, "small-origin", 8 * MiB)
    taken = snapshot(node, "small-snap", source.volume_id)
    restore = create_request("grown", 32 * MiB)
    restore.volume_content_source.snapshot.snapshot_id = taken.snapshot_id
    node.lvm.refuse_next("extend", LvmError("killed before lvextend ran"))
    with pytest.raises(grpc.RpcError):
        node.csi.controller.CreateVolume(restore)
    # A failure (not a crash) removes what it made; a crash leaves the
    # snapshot at its source's size, which the next create of it extends.
    assert lv_of(node, Kind.VOLUME, "grown") is None
    lv_name = lv_name_for(Kind.VOLUME, "grown")
    snapshot_lv = lv_of(node, Kind.SNAPSHOT, "small-snap")
    assert snapshot_lv is not None
    tags = driver_tags(node, "grown", snapshot_lv)
    node.lvm.create_thin_snapshot(MEMORY_VG, snapshot_lv.name, lv_name,
                                  [*tags, NEW_FS_UUID_TAG], active=True)  # fmt: skip
    assert node.csi.controller.CreateVolume(restore).volume.capacity_bytes == 32 * MiB
    made = lv_of(node, Kind.VOLUME, "grown")
    assert made is not None and made.size_bytes == 32 * MiB


@pytest.mark.parametrize(
    ("refusal", "code", "fragment"),
    [
        (LvmNoSpace("Insufficient free space"), Code.RESOURCE_EXHAUSTED, "has no room"),
        (LvmMetadataFull("metadata area is full"), Code.RESOURCE_EXHAUSTED, "cannot record"),
        (LvmPoolNeedsRepair("unexpected transaction id"), Code.RESOURCE_EXHAUSTED,
         "takes no new volumes until an admin repairs it"),
        (LvmTimeout("lvcreate did not finish"), Code.DEADLINE_EXCEEDED, "did not finish"),
        (LvmError("lvcreate failed: something new"), Code.INTERNAL, "could not make"),
    ],
)  # fmt: skip
def test_lvm_refusing_a_create_is_answered_with_the_tables_status(
    node: MemoryNode, refusal: LvmError, code: grpc.StatusCode, fragment: str
) -> None:
    node.lvm.refuse_next("create_thin_volume", refusal)
    message = expect_error(
        code, node.csi.controller.CreateVolume, create_request("refused"), fragment
    )
    assert str(refusal).split(" --")[0] in message  # LVM's own words follow
    assert lv_of(node, Kind.VOLUME, "refused") is None


def test_a_pool_that_needs_repair_takes_nothing_more_and_says_so(node: MemoryNode) -> None:
    node.lvm.refuse_next("create_thin_volume", LvmPoolNeedsRepair("unexpected transaction id"))
    with pytest.raises(grpc.RpcError):
        create(node, "first")
    changes = node.lvm.changes
    expect_error(Code.RESOURCE_EXHAUSTED, node.csi.controller.CreateVolume,
                 create_request("second"), "repair")  # fmt: skip
    assert capacity(node) == 0 and node.lvm.changes == changes


def test_a_name_lvm_says_is_taken_is_decided_again_from_a_report_of_now(
    node: MemoryNode,
) -> None:
    # The kept view lacked an LV of this name; LVM's refusal makes the
    # create decide again from a fresh report, which here finds none.
    node.lvm.refuse_next("create_thin_volume", LvmAlreadyExists("already exists"))
    assert create(node, "raced", 4 * MiB).capacity_bytes == 4 * MiB


def test_a_volume_in_use_is_not_deleted(node: MemoryNode) -> None:
    volume = create(node, "busy", 4 * MiB)
    node.lvm.refuse_next("remove", LvmInUse("Logical volume vg0/csi-busy in use."))
    expect_error(Code.FAILED_PRECONDITION, node.csi.controller.DeleteVolume,
                 csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id), "in use")  # fmt: skip
    assert lv_of(node, Kind.VOLUME, "busy") is not None
