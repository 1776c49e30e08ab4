"""Changed block tracking (issue 19) on a real thin pool: the SnapshotMetadata
service's allocated and changed ranges are exactly the chunks written, and
the delta's bytes applied to a copy of the base rebuild the target byte for
byte; the spec's errors; the pool's metadata snapshot reserved and released
around each call, a stale one of the driver's released, someone else's left
alone."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from csi_lvm.block_maps import PoolReservations
from csi_lvm.config import load_config
from csi_lvm.csi import csi_pb2, csi_pb2_grpc
from csi_lvm.errors import NotFound
from csi_lvm.lvm.names import dm_name
from csi_lvm.lvm.thin_metadata import ThinMetadata
from csi_lvm.wiring import Options, build
from tests.lvm.helpers import MiB, block_capability, create, delete
from tests.testbed import DRIVER_NAME, NODE_ID, TOPOLOGY_KEY, CsiClient, Driver, LoopVolumeGroup

Code = grpc.StatusCode
Ranges = list[tuple[int, int]]


@pytest.fixture(scope="module")
def cbt(csi: CsiClient) -> csi_pb2_grpc.SnapshotMetadataStub:
    return csi_pb2_grpc.SnapshotMetadataStub(csi.channel)


@pytest.fixture(scope="module")
def chunk(vg: LoopVolumeGroup) -> int:
    out = subprocess.run(
        ["lvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "chunk_size",
         f"{vg.name}/{vg.pool}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return int(out.strip())


def device(vg: LoopVolumeGroup, object_id: str) -> str:
    return f"/dev/mapper/{dm_name(vg.name, object_id.rsplit(':', 1)[-1])}"


def write(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def snapshot(csi: CsiClient, name: str, volume_id: str) -> str:
    request = csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=volume_id)
    return csi.controller.CreateSnapshot(request).snapshot.snapshot_id


def delete_snapshot(csi: CsiClient, snapshot_id: str) -> None:
    csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id))


def read_snapshot(vg: LoopVolumeGroup, snapshot_id: str) -> bytes:
    """A snapshot's bytes: it is activated for the read (the driver keeps
    snapshots inactive) and deactivated after."""
    lv = f"{vg.name}/{snapshot_id.rsplit(':', 1)[-1]}"
    subprocess.run(["lvchange", "-q", "-ay", "-K", lv], check=True)
    try:
        return Path(device(vg, snapshot_id)).read_bytes()
    finally:
        subprocess.run(["lvchange", "-q", "-an", lv], check=True)


def collect(stream: Iterator[csi_pb2.GetMetadataDeltaResponse]) -> tuple[int, Ranges, list[int]]:
    """Capacity, ranges and the ranges per message of a stream, checked
    for the spec's invariants on the way."""
    capacities, ranges, counts = set(), [], []
    for message in stream:
        assert message.block_metadata_type == csi_pb2.BlockMetadataType.VARIABLE_LENGTH
        capacities.add(message.volume_capacity_bytes)
        counts.append(len(message.block_metadata))
        ranges += [(b.byte_offset, b.size_bytes) for b in message.block_metadata]
    assert len(capacities) == 1, capacities
    assert all(length > 0 for _, length in ranges)
    assert all(a[0] + a[1] <= b[0] for a, b in itertools.pairwise(ranges))
    return capacities.pop(), ranges, counts


def allocated(
    cbt: csi_pb2_grpc.SnapshotMetadataStub, snapshot_id: str, **fields: int
) -> tuple[int, Ranges, list[int]]:
    request = csi_pb2.GetMetadataAllocatedRequest(snapshot_id=snapshot_id, **fields)
    return collect(cbt.GetMetadataAllocated(request))  # type: ignore[arg-type]


def delta(
    cbt: csi_pb2_grpc.SnapshotMetadataStub, base: str, target: str, **fields: int
) -> tuple[int, Ranges, list[int]]:
    request = csi_pb2.GetMetadataDeltaRequest(
        base_snapshot_id=base, target_snapshot_id=target, **fields
    )
    return collect(cbt.GetMetadataDelta(request))


def refused(call: object, request: object, code: Code, *fragments: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(call(request))  # type: ignore[operator]
    error = caught.value
    assert error.code() == code, f"{error.code()}: {error.details()}"
    for fragment in fragments:
        assert fragment in (error.details() or ""), error.details()


def chunks(*numbers: int, size: int) -> Ranges:
    return [(n * size, size) for n in numbers]


def pool_is_free(vg: LoopVolumeGroup, workdir: Path) -> bool:
    """No metadata snapshot held, and no record of one left."""
    status = subprocess.run(
        ["dmsetup", "status", dm_name(vg.name, vg.pool, "tpool")],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    record = workdir / f"metadata-snapshot.{dm_name(vg.name, vg.pool)}.json"
    return status[6] == "-" and not record.exists()


def test_the_delta_is_exactly_the_chunks_written_and_rebuilds_the_target(
    csi: CsiClient,
    cbt: csi_pb2_grpc.SnapshotMetadataStub,
    vg: LoopVolumeGroup,
    workdir: Path,
    chunk: int,
    name: str,
) -> None:
    volume = create(csi, name, 16 * MiB, capability=block_capability()).volume_id
    path = device(vg, volume)
    write(path, 0, os.urandom(4 * chunk))
    write(path, 10 * chunk, os.urandom(chunk))
    base = snapshot(csi, f"{name}-base", volume)

    write(path, chunk + 8192, b"\x5a" * 4096)  # inside a chunk written before
    write(path, 20 * chunk, os.urandom(chunk))  # a whole new chunk
    write(path, 30 * chunk + 4096, b"\xa5" * 4096)  # part of a new chunk
    subprocess.run(
        ["blkdiscard", "-o", str(10 * chunk), "-l", str(chunk), path], check=True
    )  # a chunk the base has, gone from the target
    csi.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(
            volume_id=volume, volume_path=str(workdir),
            capacity_range=csi_pb2.CapacityRange(required_bytes=24 * MiB),
        )
    )  # fmt: skip
    write(path, 20 * MiB, b"\x77" * 4096)  # in the part the extension added
    target = snapshot(csi, f"{name}-target", volume)

    capacity, ranges, counts = delta(cbt, base, target)
    assert capacity == 24 * MiB
    assert ranges == chunks(1, 10, 20, 30, 20 * MiB // chunk, size=chunk)
    assert counts == [5]

    # Applying the delta's bytes of the target to a copy of the base makes the target.
    target_bytes = read_snapshot(vg, target)
    rebuilt = bytearray(read_snapshot(vg, base))
    rebuilt.extend(bytes(capacity - len(rebuilt)))
    for offset, length in ranges:
        rebuilt[offset : offset + length] = target_bytes[offset : offset + length]
    assert len(target_bytes) == capacity
    assert rebuilt == target_bytes

    # Per message at most max_results; from a starting offset, the first range clipped.
    _, same, counts = delta(cbt, base, target, max_results=2)
    assert same == ranges and counts == [2, 2, 1]
    _, resumed, _ = delta(cbt, base, target, starting_offset=20 * chunk + 100)
    assert resumed == [(20 * chunk + 100, chunk - 100), *ranges[3:]]
    # Calls at once on one pool take turns with its one metadata snapshot.
    with ThreadPoolExecutor(4) as calls:
        answers = list(calls.map(lambda _: delta(cbt, base, target)[1], range(4)))
    assert answers == [ranges] * 4
    # Where the base holds data: what was written before it, merged.
    base_capacity, base_ranges, _ = allocated(cbt, base)
    assert base_capacity == 16 * MiB
    assert base_ranges == [(0, 4 * chunk), (10 * chunk, chunk)]
    assert pool_is_free(vg, workdir)

    for snapshot_id in (base, target):
        delete_snapshot(csi, snapshot_id)
    delete(csi, volume)


def test_allocated_ranges_of_a_fresh_volume_one_write_and_a_restore(
    csi: CsiClient, cbt: csi_pb2_grpc.SnapshotMetadataStub, vg: LoopVolumeGroup, chunk: int,
    name: str,
) -> None:  # fmt: skip
    volume = create(csi, name, 8 * MiB, capability=block_capability()).volume_id
    fresh = snapshot(csi, f"{name}-fresh", volume)
    capacity, ranges, counts = allocated(cbt, fresh)
    assert (capacity, ranges, counts) == (8 * MiB, [], [0])  # one message, for the capacity

    write(device(vg, volume), 3 * chunk + 4096, b"\x01" * 4096)
    written = snapshot(csi, f"{name}-written", volume)
    assert allocated(cbt, written)[1] == chunks(3, size=chunk)
    assert delta(cbt, fresh, written)[1] == chunks(3, size=chunk)

    source = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=written)
    )
    restore = create(csi, f"{name}-r", 8 * MiB, capability=block_capability(),
                     volume_content_source=source).volume_id  # fmt: skip
    of_restore = snapshot(csi, f"{name}-of-restore", restore)
    assert allocated(cbt, of_restore)[1] == chunks(3, size=chunk)

    # The spec's offsets: up to the volume's end (nothing after it), never past it.
    assert allocated(cbt, written, starting_offset=8 * MiB)[1:] == ([], [0])
    for offset in (8 * MiB + 1, -1):
        refused(cbt.GetMetadataAllocated,
                csi_pb2.GetMetadataAllocatedRequest(snapshot_id=written, starting_offset=offset),
                Code.OUT_OF_RANGE, "starting_offset")  # fmt: skip
    # The target must be the later snapshot of the same volume.
    refused(cbt.GetMetadataDelta,
            csi_pb2.GetMetadataDeltaRequest(base_snapshot_id=written, target_snapshot_id=fresh),
            Code.INVALID_ARGUMENT, "taken after")  # fmt: skip
    refused(cbt.GetMetadataDelta,
            csi_pb2.GetMetadataDeltaRequest(base_snapshot_id=fresh, target_snapshot_id=of_restore),
            Code.INVALID_ARGUMENT, "same volume")  # fmt: skip
    gone = f"{NODE_ID}:thin:snap-never-made"
    refused(cbt.GetMetadataAllocated, csi_pb2.GetMetadataAllocatedRequest(snapshot_id=gone),
            Code.NOT_FOUND, gone)  # fmt: skip
    refused(cbt.GetMetadataDelta,
            csi_pb2.GetMetadataDeltaRequest(base_snapshot_id=fresh, target_snapshot_id=gone),
            Code.NOT_FOUND, gone)  # fmt: skip

    for snapshot_id in (fresh, written, of_restore):
        delete_snapshot(csi, snapshot_id)
    delete(csi, restore)
    delete(csi, volume)


def test_the_map_is_read_without_the_metadata_device_s_dev_mapper_node(
    csi: CsiClient, cbt: csi_pb2_grpc.SnapshotMetadataStub, vg: LoopVolumeGroup, chunk: int,
    name: str,
) -> None:  # fmt: skip
    # make e2e: a pool activated by an LVM whose udev never ran had no
    # /dev/mapper/<vg>-<pool>_tmeta, and thin_dump said "Couldn't stat path".
    volume = create(csi, name, 8 * MiB, capability=block_capability()).volume_id
    write(device(vg, volume), 2 * chunk, b"\x02" * 4096)
    taken = snapshot(csi, f"{name}-snap", volume)
    node = Path("/dev/mapper") / dm_name(vg.name, f"{vg.pool}_tmeta")
    aside = node.with_name(node.name + ".aside")
    assert node.exists()
    node.rename(aside)
    try:
        assert allocated(cbt, taken)[1] == chunks(2, size=chunk)
    finally:
        aside.rename(node)
    delete_snapshot(csi, taken)
    delete(csi, volume)


def test_thick_snapshots_are_refused_as_outside_the_service(
    csi: CsiClient, cbt: csi_pb2_grpc.SnapshotMetadataStub, name: str
) -> None:
    volume = create(csi, name, 4 * MiB, "thick", capability=block_capability()).volume_id
    copy = snapshot(csi, f"{name}-1", volume)
    refused(cbt.GetMetadataAllocated, csi_pb2.GetMetadataAllocatedRequest(snapshot_id=copy),
            Code.FAILED_PRECONDITION, "thin classes only", "back it up whole")  # fmt: skip
    refused(cbt.GetMetadataDelta,
            csi_pb2.GetMetadataDeltaRequest(base_snapshot_id=copy, target_snapshot_id=copy),
            Code.FAILED_PRECONDITION, "thin classes only")  # fmt: skip
    delete_snapshot(csi, copy)
    delete(csi, volume)


def dmsetup_message(vg: LoopVolumeGroup, message: str) -> None:
    subprocess.run(
        ["dmsetup", "message", dm_name(vg.name, vg.pool, "tpool"), "0", message], check=True
    )


def held_root(vg: LoopVolumeGroup) -> str:
    return subprocess.run(
        ["dmsetup", "status", dm_name(vg.name, vg.pool, "tpool")],
        capture_output=True, text=True, check=True,
    ).stdout.split()[6]  # fmt: skip


def test_metadata_snapshots_of_others_are_left_alone_and_stale_ones_of_ours_released(
    csi: CsiClient,
    cbt: csi_pb2_grpc.SnapshotMetadataStub,
    driver: Driver,
    vg: LoopVolumeGroup,
    workdir: Path,
    chunk: int,
    name: str,
) -> None:
    volume = create(csi, name, 4 * MiB, capability=block_capability()).volume_id
    write(device(vg, volume), 0, b"\x02" * 4096)
    snap = snapshot(csi, f"{name}-s", volume)
    request = csi_pb2.GetMetadataAllocatedRequest(snapshot_id=snap)
    record = workdir / f"metadata-snapshot.{dm_name(vg.name, vg.pool)}.json"
    tools = ThinMetadata()
    assert record.parent == Path(driver.socket).parent  # the driver's default state directory

    # Someone else's (no record of the driver's): refused, named, and kept.
    dmsetup_message(vg, "reserve_metadata_snap")
    try:
        theirs = held_root(vg)
        refused(cbt.GetMetadataAllocated, request, Code.FAILED_PRECONDITION,
                "other than csi-lvm", "release_metadata_snap")  # fmt: skip
        assert held_root(vg) == theirs
        PoolReservations(tools, str(workdir)).release_stale([(vg.name, vg.pool)])
        assert held_root(vg) == theirs  # start-up leaves it alone too
    finally:
        dmsetup_message(vg, "release_metadata_snap")

    # The driver's own, as a crash between reserve and release leaves it: the
    # next call releases it and answers.
    dmsetup_message(vg, "reserve_metadata_snap")
    record.write_text(json.dumps({"pool": f"{vg.name}/{vg.pool}", "held_root": None}))
    assert allocated(cbt, snap)[1] == chunks(0, size=chunk)
    assert pool_is_free(vg, workdir)

    # And start-up releases it (what `serve` runs before it takes calls).
    dmsetup_message(vg, "reserve_metadata_snap")
    record.write_text(json.dumps({"pool": f"{vg.name}/{vg.pool}", "held_root": int(held_root(vg))}))
    PoolReservations(tools, str(workdir)).release_stale([(vg.name, vg.pool)])
    assert pool_is_free(vg, workdir)

    delete_snapshot(csi, snap)
    delete(csi, volume)


def test_a_snapshot_deleted_while_its_ranges_stream_ends_the_stream(
    driver: Driver, vg: LoopVolumeGroup, workdir: Path, chunk: int, name: str
) -> None:
    """The service and a controller in this process, on the session's VG: the
    stream is held between two messages while the snapshot goes."""
    options = Options(NODE_ID, DRIVER_NAME, TOPOLOGY_KEY, state_dir=str(workdir))
    graph = build(load_config(str(driver.config)), options)
    lvm, controller, service = graph.lvm, graph.controller, graph.snapshot_metadata
    assert service is not None
    made = controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=4 * MiB),
            volume_capabilities=[block_capability()], parameters={"deviceClass": "thin"},
        ),
        None,  # type: ignore[arg-type]
    ).volume  # fmt: skip
    for number in (0, 2, 4):
        write(device(vg, made.volume_id), number * chunk, b"\x03" * 4096)
    snap = controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name=f"{name}-s", source_volume_id=made.volume_id),
        None,  # type: ignore[arg-type]
    ).snapshot.snapshot_id
    stream = service.GetMetadataAllocated(
        csi_pb2.GetMetadataAllocatedRequest(snapshot_id=snap, max_results=1),
        None,  # type: ignore[arg-type]
    )
    assert [b.byte_offset for b in next(stream).block_metadata] == [0]
    assert pool_is_free(vg, workdir)  # released before the first message
    controller.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id=snap),
        None,  # type: ignore[arg-type]
    )
    with pytest.raises(NotFound, match="deleted while its block metadata was being sent"):
        next(stream)
    controller.DeleteVolume(
        csi_pb2.DeleteVolumeRequest(volume_id=made.volume_id),
        None,  # type: ignore[arg-type]
    )
    lvm.close()
