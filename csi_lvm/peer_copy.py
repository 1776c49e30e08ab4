"""The target's side of a copy across nodes: a volume made here from a
snapshot or volume that another node holds, filled from that node's plugin
(``csi_lvm.peer_source``) over the plugins' mutual-TLS port.

1. ``describe`` asks the holder for the source's size and kind; the class
   here must be of the same kind (thin or thick).
2. The backend admits and makes the target (``Backend.make_for_copy``): the
   room is checked before any byte moves, and the LV is tagged COPYING (see
   ``csi_lvm.lifecycle``), so it is never used before it is whole.
3. ``fill`` reads the source's allocated ranges, checks each piece's CRC-32
   and writes it at its offset (a thin target maps only what is written, so a
   thin restore stays thin). Every ``checkpoint_bytes`` (or
   ``CHECKPOINT_SECONDS``) the target is flushed, then the LV's tag records
   how far the copy is durable (``lifecycle.copied_bytes``, with the rate),
   on a thread of its own while the copy goes on.
4. At the end: the count the holder sent must be what arrived, the target is
   flushed, COPYING goes, and the holder is told to let go (``Release``).

What can go wrong, and what comes of it:

- the holder or the connection lost (either plugin restarting): UNAVAILABLE,
  the LV kept with its progress; the provisioner's retry of CreateVolume
  goes on from the recorded offset, never from zero;
- a piece whose checksum does not match, or a count that does not: the
  target is removed (DATA_LOSS); it is never handed out;
- the holder busy (ABORTED) or its answer to be retried: the same as a lost
  connection;
- the holder's view of a volume source overflowed (a thick source written
  faster than its COW room), or any other final refusal of the holder: the
  target is removed, the refusal passed on (FAILED_PRECONDITION for the
  overflow), and a new attempt starts again;
- DeleteVolume of the target while it copies: ``cancel`` stops the copy at
  its next piece, and the delete removes the LV.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import structlog

from csi_lvm import blockcopy, lifecycle
from csi_lvm.backends import Backends
from csi_lvm.backends.asks import Ask
from csi_lvm.backends.base import Backend
from csi_lvm.csi import csi_pb2
from csi_lvm.errors import (
    Aborted,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    Relayed,
    Unavailable,
)
from csi_lvm.ids import Kind, ObjectId
from csi_lvm.lvm.records import LogicalVolume
from csi_lvm.metrics import PEER_COPY_BYTES
from csi_lvm.peer import peer_pb2, peer_pb2_grpc
from csi_lvm.peers import PeerChannels
from csi_lvm.validation import source_reference
from csi_lvm.volumes import Inventory, Owned, Scan

log = structlog.get_logger("csi_lvm.peer_copy")

CHECKPOINT_BYTES = 256 << 20
CHECKPOINT_SECONDS = 10.0
# Errors of the holder's plugin or the connection that a retry gets past.
_PASSING = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
)


@dataclass(frozen=True)
class RemoteSource:
    """A snapshot or volume of another node, as its holder describes it."""

    id: str
    node: str
    kind: Kind
    size_bytes: int
    thin: bool


@dataclass
class CopyInFlight:
    """A copy into this node, for ``csi-lvm status``."""

    target: str
    source: str
    size_bytes: int
    done_bytes: int
    started: float
    cancelled: threading.Event


class PeerCopies:
    """Copies into this node's volumes from the other nodes' plugins."""

    def __init__(
        self,
        channels: PeerChannels,
        inventory: Inventory,
        backends: Backends,
        checkpoint_bytes: int = CHECKPOINT_BYTES,
    ) -> None:
        self.channels = channels
        self.checkpoint_bytes = checkpoint_bytes
        self.inventory = inventory
        self.backends = backends
        self.states = backends.states
        self._in_flight: dict[str, CopyInFlight] = {}
        self._lock = threading.Lock()

    def _stub(self, node: str, what: str) -> peer_pb2_grpc.VolumeSourceStub:
        return peer_pb2_grpc.VolumeSourceStub(self.channels.channel(node, what))

    # ---- the source

    def remote_source(self, content: csi_pb2.VolumeContentSource) -> ObjectId | None:
        """The id of a content source that another node holds (None: none,
        or this node's, or not an id of the kind its field asks for)."""
        reference = source_reference(content) if content.WhichOneof("type") else None
        if reference is None:
            return None
        text, kind, _ = reference
        parsed = ObjectId.parse(text)
        if parsed is None or parsed.node == self.inventory.node_part or parsed.kind is not kind:
            return None
        return parsed

    def describe(self, source_id: ObjectId, target_id: str, timeout: float | None) -> RemoteSource:
        what = source_id.kind.value
        try:
            answer = self._stub(source_id.node, what).Describe(
                peer_pb2.DescribeRequest(source_id=str(source_id), target_id=target_id),
                timeout=timeout or 30.0,
            )
        except grpc.RpcError as error:
            raise _relayed(error, source_id.node, f"{what} {source_id}") from None
        return RemoteSource(
            str(source_id), source_id.node, source_id.kind, answer.capacity_bytes, answer.thin
        )

    # ---- the target

    def create(self, name: str, ask: Ask, source: ObjectId, backend: Backend, scan: Scan) -> Owned:
        """The new volume ``name`` of ``backend``'s class (``ask``, its tags
        aside) holding the data of ``source``, which another node holds."""
        device_class = backend.device_class
        if source.device_class != device_class.name:
            raise InvalidArgument(
                f"{source.kind.value} {source} is in device class {source.device_class}; a "
                f"volume made from it must use that class, not {device_class.name}"
            )
        target = str(self.inventory.make_id(device_class, ask.lv_name))
        remote = self.describe(source, target, ask.timeout)
        tags = self.inventory.tags_for(Kind.VOLUME, name, device_class, None,
                                       remote_source=str(source))  # fmt: skip
        return self.make(dataclasses.replace(ask, tags=tags), remote, backend, scan)

    def finish(
        self, existing: Owned, source: ObjectId, backend: Backend, timeout: float | None
    ) -> Owned:
        """A volume an earlier create of the same name made from ``source``:
        as it is when its copy is done, else with the copy gone on with from
        where it stopped."""
        if lifecycle.is_ready(existing) or existing.source_id != str(source):
            return existing
        return self.fill(existing, self.describe(source, str(existing.id), timeout), backend)

    def make(self, ask: Ask, remote: RemoteSource, backend: Backend, scan: Scan) -> Owned:
        """A new volume of ``backend``'s class holding ``remote``'s data."""
        if remote.thin != backend.device_class.is_thin:
            kinds = ("thin", "thick") if remote.thin else ("thick", "thin")
            raise InvalidArgument(
                f"{remote.kind.value} {remote.id} is in a {kinds[0]} class on node "
                f"{remote.node}, and class {backend.name} is {kinds[1]} here: a volume made "
                "from it must use a class of the same kind"
            )
        target = backend.make_for_copy(ask, remote.size_bytes, scan)
        return self.fill(target, remote, backend)

    def fill(self, target: Owned, remote: RemoteSource, backend: Backend) -> Owned:
        """Copy ``remote`` into ``target`` (COPYING) from where it stopped;
        the target as it is when done."""
        key = target.lv.name
        flight = CopyInFlight(str(target.id), remote.id, remote.size_bytes,
                              lifecycle.copied_bytes(target.lv), time.monotonic(),
                              threading.Event())  # fmt: skip
        with self._lock:
            self._in_flight[key] = flight
        try:
            self._fill(target, remote, backend, flight)
        except (Unavailable, Aborted):
            raise  # kept, with its progress: the retry goes on from there (or a delete)
        except Exception as failure:
            if not flight.cancelled.is_set():  # else the delete that cancelled removes it
                log.warning("copy from another node failed: removing the target",
                            target=flight.target, source=remote.id, error=str(failure))  # fmt: skip
                try:
                    backend.remove(target, None)
                except Exception as error:  # the copy's failure is the answer
                    log.error(
                        "the failed copy's target could not be removed; DeleteVolume or the "
                        "retry removes it",
                        target=flight.target,
                        error=str(error),
                    )
                self._release(remote, flight.target)
            raise
        finally:
            with self._lock:
                self._in_flight.pop(key, None)
        self._release(remote, flight.target)
        done = self.inventory.get(target.id, target.device_class)
        if done is None:
            raise Aborted(f"volume {target.id} vanished as its copy ended; retry")
        return done

    def _fill(
        self, target: Owned, remote: RemoteSource, backend: Backend, flight: CopyInFlight
    ) -> None:
        start = flight.done_bytes
        lv = self.inventory.activated(target.lv)
        if start == 0:
            backend.prepare_for_copy(lv)
        log.info("copy from another node: " + ("resuming" if start else "starting"),
                 target=flight.target, source=remote.id, from_byte=start)  # fmt: skip
        recorded, received = start, 0
        checkpoint_at = time.monotonic() + CHECKPOINT_SECONDS
        recorded_point = lifecycle.copy_point(lv)
        point = ""
        with blockcopy.RangeWriter(lv.device, remote.size_bytes) as writer:
            checkpoints = _Checkpoints(writer, self.states, lv)
            try:
                for offset, data, last in self._pieces(remote, flight.target, start):
                    if flight.cancelled.is_set():
                        raise Aborted(f"volume {flight.target} was deleted during its copy")
                    if isinstance(last, str):  # the holder names the point in time first
                        point = last
                        if start and point != recorded_point:
                            raise FailedPrecondition(
                                f"the copy of {remote.id} into {flight.target} began from "
                                f"another point in time than node {remote.node} reads now (its "
                                "view was lost); the volume is discarded and a retry starts again"
                            )
                        continue
                    if last is not None:
                        if last != received:
                            raise DataLoss(
                                f"the copy of {remote.id} into {flight.target} lost data: node "
                                f"{remote.node} sent {last} bytes, {received} arrived; the "
                                "volume is discarded: retry"
                            )
                        break
                    writer.write(offset, data)
                    received += len(data)
                    flight.done_bytes = offset + len(data)
                    PEER_COPY_BYTES.labels("received").inc(len(data))
                    if (
                        flight.done_bytes - recorded >= self.checkpoint_bytes
                        or time.monotonic() >= checkpoint_at
                    ):
                        took = time.monotonic() - flight.started
                        rate = round(received / took) if took > 0 else 0
                        if checkpoints.offer(flight.done_bytes, rate, point):
                            recorded = flight.done_bytes
                            checkpoint_at = time.monotonic() + CHECKPOINT_SECONDS
                else:
                    raise Unavailable(
                        f"the copy of {remote.id} from node {remote.node} ended early; "
                        f"{flight.done_bytes} bytes are in, and a retry goes on from there"
                    )
            finally:
                # What the copy recorded is durable before it ends, however it ends.
                lv = checkpoints.finish()
            writer.flush()
        self.states.copied(lv)
        took = time.monotonic() - flight.started
        log.info("copy from another node: complete", target=flight.target, source=remote.id,
                 bytes=received, seconds=round(took, 2),
                 bytes_per_second=round(received / took) if took > 0 else 0)  # fmt: skip

    def _pieces(
        self, remote: RemoteSource, target_id: str, start: int
    ) -> Iterator[tuple[int, bytes, int | str | None]]:
        """``(0, b"", point in time)`` first; ``(offset, data, None)`` for
        each piece, checked; then ``(0, b"", bytes sent)`` when the holder
        says it is done."""
        request = peer_pb2.ReadRequest(
            source_id=remote.id, target_id=target_id, starting_offset=start
        )
        where = f"{remote.kind.value} {remote.id}"
        call = self._stub(remote.node, remote.kind.value).Read(request)
        try:
            for message in call:
                if message.point_in_time:
                    yield 0, b"", message.point_in_time
                    continue
                if message.done:
                    yield 0, b"", message.total_bytes
                    return
                if zlib.crc32(message.data) != message.crc32:
                    raise DataLoss(
                        f"the copy of {remote.id} into {target_id} arrived damaged at byte "
                        f"{message.byte_offset} (checksum mismatch); the volume is discarded: "
                        "retry"
                    )
                yield message.byte_offset, message.data, None
        except grpc.RpcError as error:
            raise _relayed(error, remote.node, where) from None
        finally:
            call.cancel()  # the holder stops reading at once, whatever ended the copy

    def _release(self, remote: RemoteSource, target_id: str) -> None:
        """Tell the holder the copy has ended; it lets go by itself later when
        it cannot be told."""
        try:
            self._stub(remote.node, remote.kind.value).Release(
                peer_pb2.ReleaseRequest(source_id=remote.id, target_id=target_id), timeout=30.0
            )
        except (grpc.RpcError, Unavailable) as error:
            log.warning("the holder could not be told that a copy ended", source=remote.id,
                        target=target_id, error=str(error))  # fmt: skip

    def release_source_of(self, owned: Owned) -> None:
        """On deleting a volume whose copy from another node never finished:
        the holder may let go of its source at once."""
        source = ObjectId.parse(owned.source_id)
        if source is None or source.node == self.inventory.node_part:
            return
        remote = RemoteSource(str(source), source.node, source.kind, 0, False)
        self._release(remote, str(owned.id))

    # ---- what is going on

    def cancel(self, lv_name: str) -> bool:
        """Stop the copy into ``lv_name`` at its next piece; whether one ran."""
        with self._lock:
            flight = self._in_flight.get(lv_name)
        if flight is not None:
            flight.cancelled.set()
        return flight is not None

    def in_flight(self) -> list[CopyInFlight]:
        with self._lock:
            return list(self._in_flight.values())


class _Checkpoints:
    """Records how far a copy is durable on a thread of its own, one record at
    a time: the target is flushed (everything written before the offer), then
    its tags say so, while the copy goes on writing (a flush and an LVM
    command stalled the stream for a second each)."""

    def __init__(
        self, writer: blockcopy.RangeWriter, states: lifecycle.Lifecycle, lv: LogicalVolume
    ) -> None:
        self.writer, self.states, self.lv = writer, states, lv
        self._recording: threading.Thread | None = None
        self._failure: Exception | None = None

    def offer(self, done: int, rate: int, point: str) -> bool:
        """Record ``done`` unless a record is still being made (the next
        offer then tries again); whether it is being recorded."""
        if self._recording is not None and self._recording.is_alive():
            return False
        self._raise_failure()
        self._recording = threading.Thread(
            target=self._record, args=(done, rate, point), name="copy-checkpoint", daemon=True
        )
        self._recording.start()
        return True

    def _record(self, done: int, rate: int, point: str) -> None:
        try:
            self.writer.flush()
            self.lv = self.states.progress(self.lv, done, rate, point)
        except Exception as error:  # raised in the copy's thread
            self._failure = error

    def finish(self) -> LogicalVolume:
        """The LV as its last record left it, once that record is made."""
        if self._recording is not None:
            self._recording.join()
        self._raise_failure()
        return self.lv

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure


def _relayed(error: grpc.RpcError, node: str, what: str) -> Exception:
    code = error.code()
    details = error.details() or ""
    if code is grpc.StatusCode.ABORTED:
        return Aborted(f"node {node}, which holds {what}: {details}")
    if code in _PASSING:
        return Unavailable(
            f"the csi-lvm plugin on node {node}, which holds {what}, cannot be read now "
            f"({code.name}: {details}); the copy goes on from where it stopped at the next retry"
        )
    return Relayed(code, f"node {node}, which holds {what}: {details}")
