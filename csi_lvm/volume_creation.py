"""CreateVolume's decisions, under the name's lock and from one report: a
repeat of a finished create, a crash's left-over to finish (see
``csi_lvm.lifecycle``), a conflict, or a new volume, blank or made from a
snapshot or volume of this node (its backend) or of another
(``csi_lvm.peer_copy``); and the CSI view of a volume made.
"""

from __future__ import annotations

import structlog

from csi_lvm import lifecycle
from csi_lvm.backends import Backends
from csi_lvm.backends.asks import Ask
from csi_lvm.backends.base import Backend
from csi_lvm.csi import csi_pb2
from csi_lvm.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from csi_lvm.ids import Kind, ObjectId
from csi_lvm.locks import KeyedLocks
from csi_lvm.peer_copy import PeerCopies
from csi_lvm.topology import NodeTopology
from csi_lvm.validation import SizeRange, minimum_bytes, requested_source_id
from csi_lvm.volumes import Inventory, Owned, Scan

log = structlog.get_logger("csi_lvm.controller")


class VolumeCreation:
    def __init__(
        self,
        inventory: Inventory,
        backends: Backends,
        locks: KeyedLocks,
        topology: NodeTopology,
        peer_copies: PeerCopies | None,
    ) -> None:
        self.inventory = inventory
        self.backends = backends
        self.locks = locks
        self.topology = topology
        self.peer_copies = peer_copies

    def create(
        self,
        request: csi_pb2.CreateVolumeRequest,
        lv_name: str,
        backend: Backend,
        wanted: SizeRange,
        remote: ObjectId | None,
        timeout: float | None,
    ) -> csi_pb2.Volume:
        with self.locks.hold(lv_name):
            volume = self.inventory.kept.decided(
                lambda scan, fresh: self._create_volume_in(
                    request, lv_name, backend, wanted, remote, scan, fresh, timeout
                ),
                timeout,
            )
        log.info(
            "volume created",
            volume_id=volume.volume_id,
            lv=f"{backend.device_class.volume_group}/{lv_name}",
            bytes=volume.capacity_bytes,
        )
        return volume

    def _create_volume_in(
        self,
        request: csi_pb2.CreateVolumeRequest,
        lv_name: str,
        backend: Backend,
        wanted: SizeRange,
        remote: ObjectId | None,
        scan: Scan,
        fresh: bool,
        timeout: float | None,
    ) -> csi_pb2.Volume:
        """CreateVolume's work under the name's lock, from ``scan``."""
        existing = self.inventory.existing(Kind.VOLUME, lv_name, scan, fresh, timeout)
        if existing is not None:
            existing = self.backends.states.retried(existing, timeout)
            if existing is None:  # removed to be made again
                scan = self.inventory.view(timeout)
        source = None
        if remote is not None:
            self.topology.check(request.accessibility_requirements)
            return self._copied_volume(request, lv_name, existing, backend, wanted, remote,
                                       scan, timeout)  # fmt: skip
        if request.HasField("volume_content_source"):
            # A repeat of a finished restore or clone needs no source any
            # more: its snapshot may have been deleted since (a sidecar
            # that lost the first answer asks again).
            settled = existing is not None and lifecycle.is_ready(existing)
            source = self.inventory.content_source(
                request.volume_content_source, scan, not settled, self.topology.node_key
            )
            if source is not None:
                what = "snapshot" if source.kind is Kind.SNAPSHOT else "source volume"
                lifecycle.check_ready(source, what)
        self.topology.check(
            request.accessibility_requirements, "" if source is None else str(source.id)
        )
        if existing is not None:
            return self._existing_volume(request, existing, backend, wanted, source, scan, timeout)
        return self._create_new(request, lv_name, backend, wanted, source, scan, timeout)

    def _create_new(
        self,
        request: csi_pb2.CreateVolumeRequest,
        lv_name: str,
        backend: Backend,
        wanted: SizeRange,
        source: Owned | None,
        scan: Scan,
        timeout: float | None,
    ) -> csi_pb2.Volume:
        """A new volume, blank or holding ``source``'s data. A blank one's
        size is whole extents already, exactly what lvcreate makes, so no
        report is read back (a repeated call reads it, in _existing_volume)."""
        device_class = backend.device_class
        if source is not None and source.device_class.name != device_class.name:
            raise InvalidArgument(
                f"{source.kind.value} {source.id} is in device class {source.device_class.name}; "
                f"a volume made from it must use that class, not {device_class.name}"
            )
        if source is not None and device_class.encrypted and not source.encrypted:
            raise FailedPrecondition(
                f"{source.kind.value} {source.id} holds plain data (made before device class "
                f"{device_class.name} was encrypted); a volume made from it would keep that "
                "data unencrypted in a class that promises encryption: copy the data into a "
                "new volume of the class from a pod instead"
            )
        tags = self.inventory.tags_for(Kind.VOLUME, request.name, device_class, source)
        # A copy is at least its source's size; a blank volume at least what
        # its filesystem needs.
        minimum = 0 if source is not None else minimum_bytes(request.volume_capabilities)
        ask = Ask(f"volume {request.name}", lv_name, tags, timeout, wanted, minimum)
        if source is not None:
            owned = backend.make_from(ask, source, scan)
            return self.csi_volume(owned, request.volume_content_source)
        return csi_pb2.Volume(
            volume_id=str(self.inventory.make_id(device_class, lv_name)),
            capacity_bytes=backend.make_blank(ask, scan),
            accessible_topology=[self.topology.volume()],
        )

    def _copied_volume(
        self,
        request: csi_pb2.CreateVolumeRequest,
        lv_name: str,
        existing: Owned | None,
        backend: Backend,
        wanted: SizeRange,
        remote: ObjectId,
        scan: Scan,
        timeout: float | None,
    ) -> csi_pb2.Volume:
        """A volume filled from the node that holds its source, or a repeat."""
        assert self.peer_copies is not None  # else there is no remote source
        if existing is None:
            ask = Ask(f"volume {request.name}", lv_name, (), timeout, wanted)
            owned = self.peer_copies.create(request.name, ask, remote, backend, scan)
            return self.csi_volume(owned, request.volume_content_source)
        existing = self.peer_copies.finish(existing, remote, backend, timeout)
        return self._existing_volume(request, existing, backend, wanted, None, scan, timeout)

    def _existing_volume(
        self,
        request: csi_pb2.CreateVolumeRequest,
        existing: Owned,
        backend: Backend,
        wanted: SizeRange,
        source: Owned | None,
        scan: Scan,
        timeout: float | None,
    ) -> csi_pb2.Volume:
        """Idempotent repeat, a crash left-over to finish, or a conflict."""
        device_class = backend.device_class
        if existing.name != request.name or existing.device_class.name != device_class.name:
            raise AlreadyExists(
                f"volume {request.name} already exists in device class "
                f"{existing.device_class.name}, not {device_class.name}"
            )
        source_id = requested_source_id(request.volume_content_source)
        if existing.source_id != source_id:
            raise AlreadyExists(
                f"volume {request.name} already exists with a different content source "
                f"({existing.source_id or 'none'})"
            )
        existing = backend.finish(existing, source, wanted, scan, timeout)
        if not wanted.allows(existing.size_bytes):
            raise AlreadyExists(
                f"volume {request.name} already exists with {existing.size_bytes} bytes, "
                f"outside the requested range ({wanted.describe()})"
            )
        return self.csi_volume(existing, request.volume_content_source)

    def csi_volume(
        self, owned: Owned, content_source: csi_pb2.VolumeContentSource | None = None
    ) -> csi_pb2.Volume:
        """The CSI view of an owned volume."""
        volume = csi_pb2.Volume(
            volume_id=str(owned.id),
            capacity_bytes=owned.size_bytes,
            accessible_topology=[self.topology.volume()],
        )
        if content_source is not None and content_source.WhichOneof("type"):
            volume.content_source.CopyFrom(content_source)
        elif owned.source_id:
            source = ObjectId.parse(owned.source_id)
            if source is not None and source.kind is Kind.SNAPSHOT:
                volume.content_source.snapshot.snapshot_id = owned.source_id
            elif source is not None:
                volume.content_source.volume.volume_id = owned.source_id
        return volume
