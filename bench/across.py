"""A restore across nodes against the floor of moving the same bytes.

Two plugins on this machine, each with a volume group of its own, talking
over loopback with mutual TLS as two nodes do. On the holder, a 4 GiB thin
volume with its first GiB written and a snapshot of it; the target restores
the snapshot (CreateVolume with the snapshot as its source). The floor, in
the same run: the snapshot's allocated ranges (its SnapshotMetadata) read
from its LV and written into a new thin LV of the target's volume group by
the same block code (reading ahead as the holder does), with no network and
no plugin, then flushed. The ratio
is the restore's time over the floor's; the bytes the holder sent must be
the allocated bytes, not the volume's size.

A second row, for information, says what mutual TLS costs on this machine:
the same pieces (4 MiB, CRC-32 on both sides) streamed from memory between a
``VolumeSource`` servicer and its client over loopback, with TLS against the
same stream in plain text, in the same run.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
import zlib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from bench.measure import BLOCK, GiB, MiB, Row, run
from csi_lvm import blockcopy
from csi_lvm.csi import csi_pb2, csi_pb2_grpc
from csi_lvm.lvm.names import dm_name
from csi_lvm.peer import peer_pb2, peer_pb2_grpc
from csi_lvm.tls import PLUGIN_SERVER_NAME
from tests.testbed import (
    CsiClient,
    Driver,
    LoopVolumeGroup,
    authority,
    free_port,
    issue,
    write_config,
)

if TYPE_CHECKING:
    from bench.figures import Bench

VOLUME = 4 * GiB
WRITTEN = 1 * GiB
TARGET = 1.5


def restore_across_nodes(bench: Bench, samples: int) -> None:
    work = bench.work / "across"
    ca = authority(work / "ca", "csi-lvm-bench")
    tls = issue(work / "tls", ca, "csi-lvm-plugin", dns="csi-lvm-plugin")
    holder_port, target_port = free_port(), free_port()
    peers = work / "peers"
    peers.write_text(f"bench-a 127.0.0.1:{holder_port}\nbench-b 127.0.0.1:{target_port}\n")
    group_a = LoopVolumeGroup(work, "bencha", "6G", pool_size="5G").create()
    group_b = LoopVolumeGroup(work, "benchb", "6G", pool_size="5G").create()
    drivers = []
    for node, group, port in (("a", group_a, holder_port), ("b", group_b, target_port)):
        directory = work / node
        directory.mkdir()
        drivers.append(Driver(
            directory, write_config(work / f"config-{node}.yaml", group.name, group.pool, 20),
            "--node-id", f"bench-{node}", "--peer-listen", f"127.0.0.1:{port}",
            "--tls-dir", str(tls), "--peers-file", str(peers),
        ))  # fmt: skip
    try:
        holder, target = (driver.start(timeout=120) for driver in drivers)
        volume = holder.controller.CreateVolume(bench_request("source", VOLUME)).volume
        source_device = f"/dev/mapper/{dm_name(group_a.name, lv_of(volume.volume_id))}"
        run("dd", "if=/dev/urandom", f"of={source_device}", "bs=4M",
            f"count={WRITTEN // (4 * MiB)}", "oflag=direct", "status=none")  # fmt: skip
        request = csi_pb2.CreateSnapshotRequest(name="snap", source_volume_id=volume.volume_id)
        snapshot = holder.controller.CreateSnapshot(request).snapshot.snapshot_id
        ranges = allocated(holder, snapshot)
        allocated_bytes = sum(length for _, length in ranges)

        floors, restores, sent = [], [], []
        for sample in range(samples):
            floors.append(floor(group_a, group_b, snapshot, ranges, sample))
            started = time.monotonic()
            restored = target.controller.CreateVolume(
                bench_request(f"restored-{sample}", VOLUME, snapshot), timeout=3600
            ).volume
            restores.append(time.monotonic() - started)
            sent.append(sent_bytes(drivers[0].log_path)[-1])
            target.controller.DeleteVolume(
                csi_pb2.DeleteVolumeRequest(volume_id=restored.volume_id)
            )
        restore, base = statistics.median(restores), statistics.median(floors)
        exact = all(count == allocated_bytes for count in sent)
        tls_cost(bench, tls, samples)
        bench.add(Row(
            "Restore across nodes 4 GiB thin (1 GiB written) vs moving its bytes locally",
            restore, base, restore / base, f"<= {TARGET}", restore / base <= TARGET and exact,
            "s", f"median of {samples}; sent {sent[-1] / MiB:.0f} MiB = allocated "
            f"{allocated_bytes / MiB:.0f} MiB: {exact}; loopback, mutual TLS",
        ))  # fmt: skip
    finally:
        for driver in drivers:
            driver.stop()
            shutil.copy(driver.log_path, bench.work / f"across-{driver.workdir.name}.log")
        group_a.destroy()
        group_b.destroy()


def bench_request(name: str, size: int, snapshot: str = "") -> csi_pb2.CreateVolumeRequest:
    request = csi_pb2.CreateVolumeRequest(
        name=f"pvc-{name}", capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[BLOCK], parameters={"deviceClass": "thin"},
    )  # fmt: skip
    if snapshot:
        request.volume_content_source.snapshot.snapshot_id = snapshot
    return request


def lv_of(object_id: str) -> str:
    return object_id.rsplit(":", 1)[-1]


def allocated(holder: CsiClient, snapshot: str) -> list[tuple[int, int]]:
    stub = csi_pb2_grpc.SnapshotMetadataStub(holder.channel)
    request = csi_pb2.GetMetadataAllocatedRequest(snapshot_id=snapshot)
    return [(b.byte_offset, b.size_bytes) for m in stub.GetMetadataAllocated(request)
            for b in m.block_metadata]  # fmt: skip


def floor(
    group_a: LoopVolumeGroup,
    group_b: LoopVolumeGroup,
    snapshot: str,
    ranges: list[tuple[int, int]],
    sample: int,
) -> float:
    """The same bytes read from the snapshot's LV and written into a new
    thin LV, flushed: the seconds it took."""
    snapshot_lv = f"{group_a.name}/{lv_of(snapshot)}"
    run("lvm", "lvchange", "-ay", "-K", snapshot_lv)
    name = f"floor{sample}"
    run("lvm", "lvcreate", "-q", "-V", f"{VOLUME}b", "-T", f"{group_b.name}/{group_b.pool}",
        "-n", name)  # fmt: skip
    source = f"/dev/mapper/{dm_name(group_a.name, lv_of(snapshot))}"
    target = f"/dev/mapper/{dm_name(group_b.name, name)}"
    try:
        started = time.monotonic()
        with blockcopy.RangeWriter(target, VOLUME) as writer:
            for offset, data in blockcopy.read_ahead(blockcopy.read_ranges(source, ranges)):
                writer.write(offset, data)
            writer.flush()
        return time.monotonic() - started
    finally:
        run("lvm", "lvremove", "-q", "-y", f"{group_b.name}/{name}")
        run("lvm", "lvchange", "-an", snapshot_lv)


def sent_bytes(log: Path) -> list[int]:
    """The bytes each finished stream of the holder sent, from its log."""
    counts = []
    for line in log.read_text().splitlines():
        if "copy to another node: sent" in line:
            counts.append(int(json.loads(line)["bytes"]))
    return counts


STREAMED = 256 * MiB


class _Streamer(peer_pb2_grpc.VolumeSourceServicer):
    """``STREAMED`` bytes from memory, in the plugins' pieces."""

    def __init__(self) -> None:
        self.piece = os.urandom(blockcopy.PIECE_BYTES)

    def Read(
        self, request: peer_pb2.ReadRequest, context: grpc.ServicerContext
    ) -> Iterator[peer_pb2.ReadResponse]:
        for offset in range(0, STREAMED, len(self.piece)):
            data = bytes(self.piece)
            yield peer_pb2.ReadResponse(byte_offset=offset, data=data, crc32=zlib.crc32(data))
        yield peer_pb2.ReadResponse(done=True, total_bytes=STREAMED)


def tls_cost(bench: Bench, tls: Path, samples: int) -> None:
    """Seconds to stream ``STREAMED`` bytes with mutual TLS against without."""
    key, cert, root = ((tls / name).read_bytes() for name in ("tls.key", "tls.crt", "ca.crt"))
    options = [("grpc.max_receive_message_length", 16 << 20)]
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(samples):
        for secure in (True, False):
            server = grpc.server(futures.ThreadPoolExecutor(2), options=options)
            peer_pb2_grpc.add_VolumeSourceServicer_to_server(_Streamer(), server)
            port = free_port()
            address = f"127.0.0.1:{port}"
            if secure:
                server.add_secure_port(
                    address, grpc.ssl_server_credentials([(key, cert)], root, True)
                )
                channel = grpc.secure_channel(
                    address, grpc.ssl_channel_credentials(root, key, cert),
                    [*options, ("grpc.ssl_target_name_override", PLUGIN_SERVER_NAME)],
                )  # fmt: skip
            else:
                server.add_insecure_port(address)
                channel = grpc.insecure_channel(address, options)
            server.start()
            try:
                started = time.monotonic()
                received = 0
                for message in peer_pb2_grpc.VolumeSourceStub(channel).Read(peer_pb2.ReadRequest()):
                    if zlib.crc32(message.data) != message.crc32:
                        raise AssertionError("a piece arrived damaged")
                    received += len(message.data)
                seconds[secure].append(time.monotonic() - started)
                assert received == STREAMED, received
            finally:
                channel.close()
                server.stop(None)
    with_tls, plain = statistics.median(seconds[True]), statistics.median(seconds[False])
    bench.add(Row(
        f"Stream {STREAMED // MiB} MiB between plugins over mutual TLS vs in plain text",
        with_tls, plain, with_tls / plain, "", None, "s",
        f"median of {samples}; 4 MiB pieces, CRC-32 on both sides, one process, loopback",
    ))  # fmt: skip
