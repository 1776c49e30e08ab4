"""The holder's side of a copy across nodes: another node's plugin, making a
volume from a snapshot or volume this node holds, reads it here.

The service (``VolumeSource``, ``proto/peer.proto``) is served on the
plugins' mutual-TLS port and answers plugins only: a caller's certificate
must come from the driver's authority (the port's own check) and name
``csi-lvm-plugin`` (every plugin's does; the forwarder's does not).

A copy reads one point in time, however often it resumes: a snapshot is
read as it is (it is never written); a volume through a view this side
makes for the target (``<target LV>.view``, the class's ``make_view``: a
thin snapshot, or a classic COW snapshot in a thick class), kept until the
target says the copy has ended (``Release``). While a copy may still read an
object, a delete of the object is refused (``Leases``): in memory, renewed by
every call of the target, and let go after ``LEASE_SECONDS`` without one,
so a target that disappears for good holds nothing for ever.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import zlib
from collections.abc import Iterable, Iterator

import grpc
import structlog

from csi_lvm import blockcopy, lifecycle
from csi_lvm.backends import Backends
from csi_lvm.backends.views import PeerViews
from csi_lvm.block_maps import BlockMaps
from csi_lvm.block_ranges import starting_at
from csi_lvm.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
)
from csi_lvm.ids import Kind, ObjectId
from csi_lvm.metrics import PEER_COPY_BYTES
from csi_lvm.peer import peer_pb2, peer_pb2_grpc
from csi_lvm.rpc import budget
from csi_lvm.tls import PLUGIN_SERVER_NAME, caller_named
from csi_lvm.volumes import Inventory, Owned

log = structlog.get_logger("csi_lvm.peer_source")

Context = grpc.ServicerContext
# How long a copy's hold on its source outlives the target's last call.
LEASE_SECONDS = 600.0


@dataclasses.dataclass
class _Lease:
    target: str
    until: float
    streams: int = 0
    stopped: threading.Event = dataclasses.field(default_factory=threading.Event)


class Leases:
    """Which of this node's snapshots and volumes other nodes are copying."""

    def __init__(self, seconds: float = LEASE_SECONDS) -> None:
        self.seconds = seconds
        self._held: dict[str, dict[str, _Lease]] = {}
        self._lock = threading.Lock()

    def renew(self, source: str, target: str, streaming: int = 0) -> None:
        """``target`` reads ``source`` (``streaming``: a stream starts, +1, or
        ends, -1)."""
        with self._lock:
            held = self._held.setdefault(source, {})
            lease = held.get(target)
            if lease is None:
                if streaming < 0:  # released while it streamed
                    return
                lease = held[target] = _Lease(target, 0.0)
            lease.until = time.monotonic() + self.seconds
            lease.streams += streaming

    def release(self, source: str, target: str, wait_seconds: float = 10.0) -> None:
        """Let go, once the target's streams have stopped (asked to, and
        waited for up to ``wait_seconds``)."""
        with self._lock:
            lease = self._held.get(source, {}).get(target)
        if lease is not None:
            lease.stopped.set()
            give_up = time.monotonic() + wait_seconds
            while lease.streams > 0 and time.monotonic() < give_up:
                time.sleep(0.05)
        with self._lock:
            self._held.get(source, {}).pop(target, None)

    def stopped(self, source: str, target: str) -> bool:
        """Whether the copy's streams are to stop (the target let go)."""
        with self._lock:
            lease = self._held.get(source, {}).get(target)
        return lease is None or lease.stopped.is_set()

    def readers(self, source: str) -> list[str]:
        """The targets that may still read ``source``."""
        now = time.monotonic()
        with self._lock:
            held = self._held.get(source, {})
            for target, lease in list(held.items()):
                if lease.streams <= 0 and lease.until < now:
                    del held[target]
            return sorted(held)

    def check_deletable(self, owned: Owned) -> None:
        """FAILED_PRECONDITION while another node's copy may read ``owned``."""
        readers = self.readers(str(owned.id))
        if readers:
            raise FailedPrecondition(
                f"{owned.kind.value} {owned.id} is being copied to another node (into "
                f"{', '.join(readers)}); retry when that copy has ended (it lets go when the "
                f"copy completes, is deleted, or {LEASE_SECONDS:.0f} s after its last read)"
            )


def _checksummed(
    device: str, ranges: Iterable[tuple[int, int]]
) -> Iterator[tuple[int, bytes, int]]:
    """Each piece of ``ranges`` on ``device`` with its CRC-32."""
    for offset, data in blockcopy.read_ranges(device, ranges):
        yield offset, data, zlib.crc32(data)


def caller_is_plugin(context: Context) -> bool:
    """Whether the caller's certificate names a csi-lvm plugin."""
    return caller_named(context, PLUGIN_SERVER_NAME)


class VolumeSourceService(peer_pb2_grpc.VolumeSourceServicer):
    def __init__(
        self, inventory: Inventory, backends: Backends, maps: BlockMaps, leases: Leases
    ) -> None:
        self.inventory = inventory
        self.backends = backends
        self.maps = maps
        self.leases = leases
        self._views = threading.Lock()  # making or removing a view

    def Describe(
        self, request: peer_pb2.DescribeRequest, context: Context
    ) -> peer_pb2.DescribeResponse:
        source = self._source(request.source_id, request.target_id, context)
        self.leases.renew(str(source.id), request.target_id)
        return peer_pb2.DescribeResponse(
            capacity_bytes=source.size_bytes, thin=source.device_class.is_thin
        )

    def Read(
        self, request: peer_pb2.ReadRequest, context: Context
    ) -> Iterator[peer_pb2.ReadResponse]:
        source = self._source(request.source_id, request.target_id, context)
        if not 0 <= request.starting_offset <= source.size_bytes:
            raise OutOfRange(
                f"starting_offset {request.starting_offset} is outside {source.id} "
                f"({source.size_bytes} bytes)"
            )
        self.leases.renew(str(source.id), request.target_id, streaming=1)
        try:
            point = self._point_in_time(source, request.target_id, budget(context))
        except BaseException:
            self.leases.renew(str(source.id), request.target_id, streaming=-1)
            raise
        return self._stream(source, point, request)

    def _stream(
        self, source: Owned, point: Owned, request: peer_pb2.ReadRequest
    ) -> Iterator[peer_pb2.ReadResponse]:
        key, target = str(source.id), request.target_id
        backend = self.backends.of(source.device_class)
        sent = 0
        started = time.monotonic()
        log.info(
            "copy to another node: reading",
            source=key,
            target=target,
            starting_offset=request.starting_offset,
        )
        try:
            yield peer_pb2.ReadResponse(point_in_time=point.lv.uuid)
            block_map = backend.data_ranges(point, self.maps, None)
            ranges = starting_at(block_map.ranges, request.starting_offset)
            # Read and checksummed on a thread of their own, while the piece
            # before is encrypted and sent.
            pieces = blockcopy.read_ahead(_checksummed(point.lv.device, ranges))
            try:
                for offset, data, crc in pieces:
                    yield peer_pb2.ReadResponse(byte_offset=offset, data=data, crc32=crc)
                    sent += len(data)
                    PEER_COPY_BYTES.labels("sent").inc(len(data))
                    self.leases.renew(key, target)
                    if self.leases.stopped(key, target):
                        raise Aborted(f"the copy into {target} has ended; nothing more is sent")
            finally:
                pieces.close()
                block_map.close()
            if point.lv.name != source.lv.name and not backend.view_intact(point.lv):
                self._remove_view(source, target)  # a new attempt takes a new one
                raise FailedPrecondition(
                    f"volume {source.id} was written faster during the copy than its "
                    "temporary snapshot could hold; the copy must start again: retry, "
                    "ideally while the volume is written less"
                )
            yield peer_pb2.ReadResponse(done=True, total_bytes=sent)
            log.info(
                "copy to another node: sent",
                source=key,
                target=target,
                bytes=sent,
                seconds=round(time.monotonic() - started, 2),
            )
        finally:
            self.leases.renew(key, target, streaming=-1)

    def Release(
        self, request: peer_pb2.ReleaseRequest, context: Context
    ) -> peer_pb2.ReleaseResponse:
        source = self._find_source(request.source_id, request.target_id, context)
        if source is not None:
            self.leases.release(str(source.id), request.target_id)
            self._remove_view(source, request.target_id)
        log.info("copy to another node: released", source=request.source_id,
                 target=request.target_id)  # fmt: skip
        return peer_pb2.ReleaseResponse()

    # ---- the source and its point in time

    def _source(self, source_id: str, target_id: str, context: Context) -> Owned:
        found = self._find_source(source_id, target_id, context)
        if found is None:
            raise NotFound(f"{source_id} does not exist on node {self.inventory.node_id}")
        lifecycle.check_ready(found, found.kind.value)
        return found

    def _find_source(self, source_id: str, target_id: str, context: Context) -> Owned | None:
        if not caller_is_plugin(context):
            raise PermissionDenied(
                f"only csi-lvm plugins may read this node's volumes: the caller's "
                f"certificate does not name {PLUGIN_SERVER_NAME}"
            )
        if not source_id:
            raise InvalidArgument("source_id is required")
        target = ObjectId.parse(target_id)
        if target is None or target.kind is not Kind.VOLUME:
            raise InvalidArgument(f"target_id {target_id!r} is not a csi-lvm volume id")
        object_id = ObjectId.parse(source_id)
        if object_id is None:
            raise NotFound(f"{source_id} is not an id csi-lvm made")
        return self.inventory.lookup_now(source_id, object_id.kind, object_id.kind.value, None)

    def _point_in_time(self, source: Owned, target_id: str, timeout: float | None) -> Owned:
        """What a copy into ``target_id`` reads: the snapshot itself, or the
        view of the volume made for that target (made at its first read)."""
        if source.kind is Kind.SNAPSHOT:
            return dataclasses.replace(source, lv=self.inventory.activated(source.lv, timeout))
        views = PeerViews(self.backends.of(source.device_class))
        with self._views:
            view = views.view_for(source, target_id, timeout)
        return dataclasses.replace(source, lv=self.inventory.activated(view, timeout))

    def _remove_view(self, source: Owned, target_id: str) -> None:
        if source.kind is Kind.VOLUME:
            with self._views:
                PeerViews(self.backends.of(source.device_class)).drop_view_for(source, target_id)
