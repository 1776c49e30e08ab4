"""The CSI Controller service: volume and snapshot lifecycle on this node.

Each RPC validates its request, picks the device class's backend, and
translates the answer. Lookups go through the inventory, changes through the
backend (``csi_lvm.backends``), lifecycle states through
``csi_lvm.lifecycle``. Errors are raised as domain errors; the server's
interceptor turns them into gRPC statuses.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from csi_lvm import lifecycle
from csi_lvm.backends import Backends
from csi_lvm.backends.base import Backend, ClassSpace, Condition, NewLv, NoRoom
from csi_lvm.config import DeviceClass
from csi_lvm.csi import csi_pb2, csi_pb2_grpc
from csi_lvm.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from csi_lvm.ids import (
    Kind,
    ObjectId,
    Tag,
    check_csi_name,
    csi_name_in,
    encode_tags,
    lv_name_for,
)
from csi_lvm.lifecycle import Stage
from csi_lvm.locks import KeyedLocks
from csi_lvm.lvm.errors import (
    LvmAlreadyExists,
    LvmInUse,
    LvmMetadataFull,
    LvmNoSpace,
    LvmNotFound,
    LvmPoolNeedsRepair,
)
from csi_lvm.rpc import budget, node_topology
from csi_lvm.validation import (
    SIDECAR_PARAMETER_PREFIX,
    SizeRange,
    capability_problem,
    check_capabilities,
    choose_size,
    device_class_for,
    minimum_bytes,
    size_range,
)
from csi_lvm.volumes import Inventory, Owned, Scan

log = structlog.get_logger("csi_lvm.controller")


class _NameTaken(Aborted):
    """LVM refused a new LV's name: one of that name exists already."""


Cap = csi_pb2.ControllerServiceCapability.RPC.Type
CAPABILITIES = (
    Cap.CREATE_DELETE_VOLUME,
    Cap.LIST_VOLUMES,
    Cap.GET_CAPACITY,
    Cap.GET_VOLUME,
    Cap.VOLUME_CONDITION,
    Cap.SINGLE_NODE_MULTI_WRITER,
    Cap.CREATE_DELETE_SNAPSHOT,
    Cap.LIST_SNAPSHOTS,
    Cap.GET_SNAPSHOT,
    Cap.CLONE_VOLUME,
)
Context = grpc.ServicerContext
T = TypeVar("T")
# Threads for copies (thick snapshots, restores and clones); more would only
# share the same disks.
COPY_WORKERS = 2


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(
        self, inventory: Inventory, backends: Backends, locks: KeyedLocks, topology_key: str
    ) -> None:
        self.inventory = inventory
        self.backends = backends
        self.locks = locks
        self.topology_key = topology_key
        self._copies = ThreadPoolExecutor(COPY_WORKERS, thread_name_prefix="copy")

    @property
    def node_id(self) -> str:
        return self.inventory.node_id

    # ------------------------------------------------------------- volumes

    def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: Context
    ) -> csi_pb2.CreateVolumeResponse:
        check_csi_name(request.name)
        check_capabilities(request.volume_capabilities)
        device_class = device_class_for(self.inventory.config, dict(request.parameters))
        backend = self.backends.of(device_class)
        wanted = size_range(
            request.capacity_range.required_bytes, request.capacity_range.limit_bytes
        )
        timeout = budget(context)
        lv_name = lv_name_for(Kind.VOLUME, request.name)
        volume = self._off_the_rpc_threads(
            backend.slow_to_make,
            lambda: self._create_volume(request, lv_name, backend, wanted, timeout),
            timeout,
        )
        return csi_pb2.CreateVolumeResponse(volume=volume)

    def _off_the_rpc_threads(self, slow: bool, work: Callable[[], T], timeout: float | None) -> T:
        """Run ``work`` here, or, when ``slow`` (a zeroing or a copy, in
        proportion to the size), on the copy threads so that the RPC threads
        stay free for Probe, NodeGetInfo and the node calls. Work that outlives
        the call's deadline goes on, holding its object's lock: the sidecar's
        retries get ABORTED while it runs and its result once it is done."""
        if not slow:
            return work()
        future = self._copies.submit(work)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise DeadlineExceeded(
                "the volume's zeroing or copy did not finish within the call's deadline; it "
                "goes on, and a retry of the same call answers once it is done"
            ) from None

    def _create_volume(
        self,
        request: csi_pb2.CreateVolumeRequest,
        lv_name: str,
        backend: Backend,
        wanted: SizeRange,
        timeout: float | None,
    ) -> csi_pb2.Volume:
        with self.locks.hold(lv_name):
            volume = self._decided(
                lambda scan, fresh: self._create_volume_in(
                    request, lv_name, backend, wanted, scan, fresh, timeout
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
        scan: Scan,
        fresh: bool,
        timeout: float | None,
    ) -> csi_pb2.Volume:
        """CreateVolume's work under the name's lock, from ``scan``."""
        existing = self._existing(Kind.VOLUME, lv_name, scan, fresh, timeout)
        if existing is not None and lifecycle.stage_of(existing.lv) is Stage.MAKING:
            self.backends.states.discard_unfinished(existing, timeout)
            scan, existing = self.inventory.view(timeout), None
        source = None
        if request.HasField("volume_content_source"):
            # A repeat of a finished restore or clone needs no source any
            # more: its snapshot may have been deleted since (a sidecar
            # that lost the first answer asks again).
            settled = existing is not None and lifecycle.is_ready(existing)
            source = self._content_source(
                request.volume_content_source, scan, must_exist=not settled
            )
        self._check_topology(request.accessibility_requirements, source)
        if existing is not None:
            return self._existing_volume(request, existing, backend, wanted, source, scan, timeout)
        if source is None:
            return self._create_blank(request, lv_name, backend, wanted, scan, timeout)
        return self._create_from_source(request, lv_name, backend, wanted, source, scan, timeout)

    def _create_blank(
        self,
        request: csi_pb2.CreateVolumeRequest,
        lv_name: str,
        backend: Backend,
        wanted: SizeRange,
        scan: Scan,
        timeout: float | None,
    ) -> csi_pb2.Volume:
        """Make a blank volume. Its size is whole extents already, exactly what
        lvcreate makes, so no report is read back (a repeated call reads the
        volume from LVM, in _existing_volume)."""
        device_class = backend.device_class
        space = backend.space(scan)
        self._check_open(device_class, space)
        size = choose_size(wanted, space.extent_bytes, minimum_bytes(request.volume_capabilities))
        needed = backend.room_for_volume(size, None, 0)
        tags = self._tags(Kind.VOLUME, request.name, device_class, None)
        with self._making(backend, size, needed, space, scan, f"volume {request.name}"):
            backend.create_blank(NewLv(lv_name, size, tags, timeout))
        return csi_pb2.Volume(
            volume_id=str(self.inventory.make_id(device_class, lv_name)),
            capacity_bytes=size,
            accessible_topology=[node_topology(self.topology_key, self.node_id)],
        )

    def _create_from_source(
        self,
        request: csi_pb2.CreateVolumeRequest,
        lv_name: str,
        backend: Backend,
        wanted: SizeRange,
        source: Owned,
        scan: Scan,
        timeout: float | None,
    ) -> csi_pb2.Volume:
        device_class = backend.device_class
        if device_class.name != source.device_class.name:
            raise InvalidArgument(
                f"{source.kind.value} {source.id} is in device class {source.device_class.name}; "
                f"a volume made from it must use that class, not {device_class.name}"
            )
        space = backend.space(scan)
        self._check_open(device_class, space)
        extent = space.extent_bytes
        size = choose_size(wanted, extent, minimum=source.size_bytes)
        needed = backend.room_for_volume(size, source, extent)
        tags = self._tags(Kind.VOLUME, request.name, device_class, source)
        with self._making(backend, size, needed, space, scan, f"volume {request.name}"):
            owned = backend.create_from(NewLv(lv_name, size, tags, timeout), source, extent)
        return self._csi_volume(owned, request.volume_content_source)

    @contextmanager
    def _making(
        self, backend: Backend, size: int, needed: int, space: ClassSpace, scan: Scan, name: str
    ) -> Iterator[None]:
        """Around the making of a new object of ``size`` bytes that takes
        ``needed`` bytes of its class's room (more than its size while a copy
        runs, nothing for a thin snapshot): the room, held against concurrent
        creates, and LVM's refusals as the statuses a create answers. Each is
        RESOURCE_EXHAUSTED where another node could serve the call, so the
        provisioner reschedules the PVC."""
        device_class = backend.device_class
        try:
            with backend.reserved(needed, space, scan):
                yield
        except NoRoom as exc:
            during = (
                f" ({size} for the copy, the rest for the temporary snapshot it reads)"
                if needed > size
                else ""
            )
            raise ResourceExhausted(
                f"device class {device_class.name} on node {self.node_id} has "
                f"{exc.available} bytes available, {needed} requested{during}"
            ) from None
        except LvmPoolNeedsRepair as exc:
            backend.note_needs_repair(str(exc))
            log.warning("device class needs repair", device_class=device_class.name, error=str(exc))
            raise ResourceExhausted(
                f"device class {device_class.name} on node {self.node_id} takes no new "
                f"volumes until an admin repairs it: {exc}"
            ) from exc
        except LvmNoSpace as exc:
            raise ResourceExhausted(
                f"device class {device_class.name} on node {self.node_id} has no room for "
                f"{size} bytes: {exc}"
            ) from exc
        except LvmMetadataFull as exc:
            raise ResourceExhausted(
                f"device class {device_class.name} on node {self.node_id} cannot record "
                f"another LV: {exc}"
            ) from exc
        except LvmAlreadyExists as exc:
            raise _NameTaken(f"{name} appeared while being created; retry") from exc

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
        extent = backend.space(scan).extent_bytes
        size = existing.size_bytes
        if size < wanted.required:
            size = choose_size(wanted, extent, minimum=size)
        new = NewLv(existing.lv.name, size, (), timeout)
        existing = backend.resume(existing, source, new, extent)
        if not wanted.allows(existing.size_bytes):
            raise AlreadyExists(
                f"volume {request.name} already exists with {existing.size_bytes} bytes, "
                f"outside the requested range ({wanted.describe()})"
            )
        return self._csi_volume(existing, request.volume_content_source)

    def _content_source(
        self, content: csi_pb2.VolumeContentSource, scan: Scan, must_exist: bool
    ) -> Owned | None:
        """The snapshot or volume a new volume is made from; NOT_FOUND when it
        does not exist, unless ``must_exist`` is false (then None)."""
        reference = source_reference(content)
        if reference is None:
            raise InvalidArgument("volume_content_source must name a snapshot or a volume")
        text, kind, what = reference
        if not text:
            raise InvalidArgument(f"volume_content_source: the {what} id is required")
        object_id = ObjectId.parse(text)
        if object_id is not None and object_id.node != self.inventory.node_part:
            raise ResourceExhausted(
                f"{what} {text} is held by node {object_id.node}; a volume made from it can "
                f"only live on that node, not on {self.node_id}: schedule the pod that uses "
                f"the new PVC to node {object_id.node} (a nodeAffinity on "
                f"{self.topology_key}, or a podAffinity to the source's pod)"
            )
        found = self.inventory.lookup(text, kind, what, scan)
        if found is None:
            if must_exist:
                raise NotFound(f"{what} {text} does not exist on node {self.node_id}")
            return None
        lifecycle.check_ready(found, what)
        return found

    def _check_topology(
        self, requirements: csi_pb2.TopologyRequirement, source: Owned | None
    ) -> None:
        wanted = list(requirements.requisite) or list(requirements.preferred)
        if not wanted:
            return
        if any(t.segments.get(self.topology_key) == self.node_id for t in wanted):
            return
        asked = "; ".join(
            ", ".join(f"{k}={v}" for k, v in sorted(t.segments.items())) or "{}" for t in wanted
        )
        holder = f" (the source {source.id} is held here)" if source is not None else ""
        raise ResourceExhausted(
            f"this driver serves node {self.node_id} ({self.topology_key}={self.node_id}) but "
            f"the request only accepts: {asked}{holder}"
        )

    def _check_open(self, device_class: DeviceClass, space: ClassSpace) -> None:
        """Refuse any new object in a class that takes none here now (its
        storage is missing or needs repair, its pool is past the threshold)."""
        refusal = space.refusal
        if refusal is None:
            return
        if space.full is not None:
            log.warning("device class full", device_class=device_class.name, reason=refusal)
        raise ResourceExhausted(
            f"device class {device_class.name} on node {self.node_id} takes no new "
            f"volumes: {refusal}"
        )

    def _tags(
        self, kind: Kind, name: str, device_class: DeviceClass, source: Owned | None
    ) -> list[str]:
        """The tags of a new volume or snapshot: only what the driver needs
        (see ``Tag``); the CSI name only when its LV name is a hash."""
        lv_name = lv_name_for(kind, name)
        return encode_tags(
            {
                Tag.DRIVER: self.inventory.driver_name,
                Tag.NAME: "" if csi_name_in(lv_name) == name else name,
                Tag.CLASS: device_class.name,
                Tag.SOURCE: "" if source is None else source.lv.name,
            }
        )

    def _csi_volume(
        self, owned: Owned, content_source: csi_pb2.VolumeContentSource | None = None
    ) -> csi_pb2.Volume:
        """The CSI view of an owned volume."""
        volume = csi_pb2.Volume(
            volume_id=str(owned.id),
            capacity_bytes=owned.size_bytes,
            accessible_topology=[node_topology(self.topology_key, self.node_id)],
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

    def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: Context
    ) -> csi_pb2.DeleteVolumeResponse:
        self._delete(request.volume_id, Kind.VOLUME, budget(context))
        return csi_pb2.DeleteVolumeResponse()

    def _delete(self, text: str, kind: Kind, timeout: float | None) -> None:
        """Remove the owned LV the id ``text`` names, if there is one (a
        delete of what is gone succeeds)."""
        if not text:
            raise InvalidArgument(f"{kind.value}_id is required")
        object_id = self.inventory.local_id(text, kind, kind.value)
        if object_id is None:  # not an id csi-lvm makes, so nothing of ours
            return
        device_class = self.inventory.config.find(object_id.device_class)
        with self.locks.hold(object_id.lv_name):
            if device_class is not None:
                owned = self.inventory.get(object_id, device_class, timeout)
            else:
                # A class retired from the config: its PVs must still go.
                owned = self.inventory.find_anywhere(object_id, timeout)
            if owned is None:
                return
            self._remove(owned, timeout)
        log.info(f"{kind.value} deleted", id=text, lv=owned.lv.full_name)

    def _remove(self, owned: Owned, timeout: float | None) -> None:
        backend = self.backends.of(owned.device_class)
        if backend.held_open(owned, timeout):
            if owned.kind is Kind.VOLUME:
                raise FailedPrecondition(
                    f"volume {owned.id} is still in use on node {self.node_id} (its device "
                    "is open); unpublish and unstage it first"
                )
            raise FailedPrecondition(
                f"snapshot {owned.id} is being read (a restore from it is copying); retry "
                "when the restore has finished"
            )
        try:
            backend.remove(owned, timeout)
        except LvmInUse as exc:
            raise FailedPrecondition(
                f"{owned.kind.value} {owned.id} is in use on node {self.node_id}: it is open, "
                f"or a copy (a thick snapshot, restore or clone) is reading it; retry when "
                f"that has finished ({exc})"
            ) from exc

    def _require_volume(self, volume_id: str, scan: Scan) -> Owned:
        if not volume_id:
            raise InvalidArgument("volume_id is required")
        return self.inventory.require(volume_id, Kind.VOLUME, "volume", scan)

    def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: Context
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities is required")
        device_class_for(self.inventory.config, dict(request.parameters))
        self._require_volume(request.volume_id, self.inventory.scan(budget(context)))
        problems = [p for c in request.volume_capabilities if (p := capability_problem(c))]
        if problems:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message="; ".join(problems))
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters,
            mutable_parameters=request.mutable_parameters,
        )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    def _condition(self, owned: Owned, scan: Scan) -> csi_pb2.VolumeCondition:
        condition: Condition = self.backends.of(owned.device_class).condition(owned, scan)
        return csi_pb2.VolumeCondition(abnormal=condition.abnormal, message=condition.message)

    def ListVolumes(
        self, request: csi_pb2.ListVolumesRequest, context: Context
    ) -> csi_pb2.ListVolumesResponse:
        scan = self.inventory.scan(budget(context))
        volumes = self.inventory.owned(Kind.VOLUME, scan)
        page, next_token = _page(volumes, request.max_entries, request.starting_token)
        entries = [
            csi_pb2.ListVolumesResponse.Entry(
                volume=self._csi_volume(owned),
                status=csi_pb2.ListVolumesResponse.VolumeStatus(
                    volume_condition=self._condition(owned, scan)
                ),
            )
            for owned in page
        ]
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=next_token)

    def ControllerGetVolume(
        self, request: csi_pb2.ControllerGetVolumeRequest, context: Context
    ) -> csi_pb2.ControllerGetVolumeResponse:
        scan = self.inventory.scan(budget(context))
        owned = self._require_volume(request.volume_id, scan)
        return csi_pb2.ControllerGetVolumeResponse(
            volume=self._csi_volume(owned),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
                volume_condition=self._condition(owned, scan)
            ),
        )

    def GetCapacity(
        self, request: csi_pb2.GetCapacityRequest, context: Context
    ) -> csi_pb2.GetCapacityResponse:
        device_class = device_class_for(self.inventory.config, dict(request.parameters))
        if any(capability_problem(c, any_mode=True) for c in request.volume_capabilities):
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        if (
            request.HasField("accessible_topology")
            and request.accessible_topology.segments.get(self.topology_key) != self.node_id
        ):
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        space = self.backends.of(device_class).space(self.inventory.current(budget(context)))
        if space.refusal is not None:
            # The scheduler then looks elsewhere: no CSIStorageCapacity here.
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        available = space.available_bytes - space.available_bytes % space.extent_bytes
        response = csi_pb2.GetCapacityResponse(available_capacity=available)
        response.maximum_volume_size.value = available
        response.minimum_volume_size.value = space.extent_bytes
        return response

    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: Context
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return csi_pb2.ControllerGetCapabilitiesResponse(
            capabilities=[
                csi_pb2.ControllerServiceCapability(
                    rpc=csi_pb2.ControllerServiceCapability.RPC(type=cap)
                )
                for cap in CAPABILITIES
            ]
        )

    # ------------------------------------------------------------ snapshots

    def CreateSnapshot(
        self, request: csi_pb2.CreateSnapshotRequest, context: Context
    ) -> csi_pb2.CreateSnapshotResponse:
        check_csi_name(request.name)
        if not request.source_volume_id:
            raise InvalidArgument("source_volume_id is required")
        parameters = dict(request.parameters)
        unknown = sorted(k for k in parameters if not k.startswith(SIDECAR_PARAMETER_PREFIX))
        if unknown:
            raise InvalidArgument(
                f"unknown snapshot parameter(s) {', '.join(map(repr, unknown))}; csi-lvm "
                f"accepts only the sidecars' '{SIDECAR_PARAMETER_PREFIX}*' keys"
            )
        timeout = budget(context)
        source_id = ObjectId.parse(request.source_volume_id)
        source_class = self.inventory.config.find(source_id.device_class) if source_id else None
        snapshot = self._off_the_rpc_threads(
            source_class is not None and self.backends.of(source_class).slow_to_make,
            lambda: self._create_snapshot(request, timeout),
            timeout,
        )
        return csi_pb2.CreateSnapshotResponse(snapshot=self._csi_snapshot(snapshot))

    def _create_snapshot(
        self,
        request: csi_pb2.CreateSnapshotRequest,
        timeout: float | None,
    ) -> Owned:
        lv_name = lv_name_for(Kind.SNAPSHOT, request.name)
        with self.locks.hold(lv_name):
            return self._decided(
                lambda scan, fresh: self._create_snapshot_in(
                    request, lv_name, scan, fresh, timeout
                ),
                timeout,
            )

    def _decided(self, decide: Callable[[Scan, bool], T], timeout: float | None) -> T:
        """A create decided from the kept view: the name, the source and the
        room need no report of the whole VG (reservations count recent
        creates). Where LVM shows the view was behind others' changes within
        the refresh interval (an LV of the name it lacks, made by hand or by
        another process; an LV it shows, removed since), a report of now
        decides again. Neither refusal made anything. ``decide`` learns
        whether its scan is a report of now."""
        try:
            return decide(self.inventory.view(timeout), False)
        except (_NameTaken, LvmNotFound):
            return decide(self.inventory.scan(timeout), True)

    def _existing(
        self, kind: Kind, lv_name: str, scan: Scan, fresh: bool, timeout: float | None
    ) -> Owned | None:
        """The object of the name in ``scan``; one the kept view shows is read
        again alone before a create trusts it: removed by hand within the
        refresh interval, it must be made anew, not answered as made."""
        existing = self.inventory.find_by_name(kind, lv_name, scan)
        if existing is None or fresh:
            return existing
        return self.inventory.get(existing.id, existing.device_class, timeout)

    def _create_snapshot_in(
        self,
        request: csi_pb2.CreateSnapshotRequest,
        lv_name: str,
        scan: Scan,
        fresh: bool,
        timeout: float | None,
    ) -> Owned:
        """CreateSnapshot's work under the name's lock, from ``scan``."""
        existing = self._existing(Kind.SNAPSHOT, lv_name, scan, fresh, timeout)
        if existing is not None:
            if existing.name != request.name or existing.source_id != request.source_volume_id:
                raise AlreadyExists(
                    f"snapshot {request.name} already exists for source volume "
                    f"{existing.source_id}, not {request.source_volume_id}"
                )
            if not lifecycle.is_ready(existing):
                # A thick snapshot whose copy was interrupted: redo it.
                source = self._require_volume(request.source_volume_id, scan)
                lifecycle.check_ready(source, "source volume")
                backend = self.backends.of(existing.device_class)
                extent = backend.space(scan).extent_bytes
                new = NewLv(existing.lv.name, existing.size_bytes, (), timeout)
                existing = backend.resume(existing, source, new, extent)
            return existing
        source = self._require_volume(request.source_volume_id, scan)
        lifecycle.check_ready(source, "source volume")
        device_class = source.device_class
        backend = self.backends.of(device_class)
        space = backend.space(scan)
        self._check_open(device_class, space)
        extent = space.extent_bytes
        needed = backend.room_for_snapshot(source, extent)
        tags = self._tags(Kind.SNAPSHOT, request.name, device_class, source)
        new = NewLv(lv_name, source.size_bytes, tags, timeout)
        with self._making(backend, new.size, needed, space, scan, f"snapshot {request.name}"):
            snapshot = backend.snapshot(new, source, extent)
        log.info("snapshot created", snapshot_id=str(snapshot.id), source=request.source_volume_id)
        return snapshot

    def _csi_snapshot(self, owned: Owned) -> csi_pb2.Snapshot:
        """The CSI view of an owned snapshot."""
        created = Timestamp()
        when = owned.lv.created_at
        if when is not None:
            created.FromDatetime(when)
        return csi_pb2.Snapshot(
            snapshot_id=str(owned.id),
            source_volume_id=owned.source_id,
            size_bytes=owned.size_bytes,
            creation_time=created,
            ready_to_use=lifecycle.is_ready(owned),
        )

    def DeleteSnapshot(
        self, request: csi_pb2.DeleteSnapshotRequest, context: Context
    ) -> csi_pb2.DeleteSnapshotResponse:
        self._delete(request.snapshot_id, Kind.SNAPSHOT, budget(context))
        return csi_pb2.DeleteSnapshotResponse()

    def GetSnapshot(
        self, request: csi_pb2.GetSnapshotRequest, context: Context
    ) -> csi_pb2.GetSnapshotResponse:
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        scan = self.inventory.scan(budget(context))
        found = self.inventory.require(request.snapshot_id, Kind.SNAPSHOT, "snapshot", scan)
        return csi_pb2.GetSnapshotResponse(snapshot=self._csi_snapshot(found))

    def ListSnapshots(
        self, request: csi_pb2.ListSnapshotsRequest, context: Context
    ) -> csi_pb2.ListSnapshotsResponse:
        snapshots = self.inventory.owned(Kind.SNAPSHOT, self.inventory.scan(budget(context)))
        if request.snapshot_id:
            snapshots = [s for s in snapshots if str(s.id) == request.snapshot_id]
        if request.source_volume_id:
            snapshots = [s for s in snapshots if s.source_id == request.source_volume_id]
        page, next_token = _page(snapshots, request.max_entries, request.starting_token)
        return csi_pb2.ListSnapshotsResponse(
            entries=[
                csi_pb2.ListSnapshotsResponse.Entry(snapshot=self._csi_snapshot(s)) for s in page
            ],
            next_token=next_token,
        )


def _page(items: Sequence[Owned], max_entries: int, token: str) -> tuple[list[Owned], str]:
    """One page of ``items`` (sorted by id) after ``token``, and the next token.

    A token is the id of the last item of the previous page, so items deleted
    or added between pages never make a page skip or repeat a survivor."""
    if max_entries < 0:
        raise InvalidArgument("max_entries must not be negative")
    start = 0
    if token:
        if ObjectId.parse(token) is None:
            raise Aborted(f"starting_token {token!r} is not a token this driver issued")
        start = next((i for i, item in enumerate(items) if str(item.id) > token), len(items))
    end = len(items) if max_entries == 0 else start + max_entries
    page = list(items[start:end])
    next_token = str(page[-1].id) if end < len(items) and page else ""
    return page, next_token


def source_reference(content: csi_pb2.VolumeContentSource) -> tuple[str, Kind, str] | None:
    """The id a content source names, its kind and what to call it in a
    message; None when it names neither a snapshot nor a volume."""
    which = content.WhichOneof("type")
    if which == "snapshot":
        return content.snapshot.snapshot_id, Kind.SNAPSHOT, "snapshot"
    if which == "volume":
        return content.volume.volume_id, Kind.VOLUME, "source volume"
    return None


def requested_source_id(content: csi_pb2.VolumeContentSource) -> str:
    """The id a request names as its content source, as csi-lvm writes it in
    a volume's tags ("" for none)."""
    reference = source_reference(content)
    if reference is None:
        return ""
    parsed = ObjectId.parse(reference[0])
    return str(parsed) if parsed is not None else reference[0]
