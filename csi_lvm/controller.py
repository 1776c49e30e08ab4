"""The CSI Controller service: volume and snapshot lifecycle on this node.

Each RPC validates its request, then does one thing through the inventory
(lookups) and the LVM layer (changes). Errors are raised as domain errors;
the server's interceptor turns them into gRPC statuses.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from csi_lvm.config import DeviceClass
from csi_lvm.csi import csi_pb2, csi_pb2_grpc
from csi_lvm.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from csi_lvm.ids import (
    COPYING_TAG,
    INCOMPLETE_TAG,
    NEW_UUID_TAG,
    Kind,
    ObjectId,
    Tag,
    check_csi_name,
    encode_tags,
    lv_name_for,
)
from csi_lvm.locks import KeyedLocks
from csi_lvm.lvm import LvmAlreadyExists, LvmInUse, LvmNoSpace
from csi_lvm.rpc import budget, node_topology
from csi_lvm.thick import ThickCopier
from csi_lvm.validation import (
    PV_NAME,
    PVC_NAME,
    PVC_NAMESPACE,
    SIDECAR_PARAMETER_PREFIX,
    SNAPSHOT_CONTENT_NAME,
    SNAPSHOT_NAME,
    SNAPSHOT_NAMESPACE,
    capability_problem,
    check_capabilities,
    choose_size,
    device_class_for,
    minimum_bytes,
    size_range,
)
from csi_lvm.volumes import ClassSpace, Inventory, Owned, Scan

log = structlog.get_logger("csi_lvm.controller")

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


class ControllerService(csi_pb2_grpc.ControllerServicer):  # type: ignore[misc]
    def __init__(self, inventory: Inventory, locks: KeyedLocks, topology_key: str) -> None:
        self.inventory = inventory
        self.lvm = inventory.lvm
        self.locks = locks
        self.topology_key = topology_key
        self.copier = ThickCopier(inventory)

    @property
    def node_id(self) -> str:
        return self.inventory.node_id

    # ------------------------------------------------------------- volumes

    def CreateVolume(self, request: Any, context: Any) -> csi_pb2.CreateVolumeResponse:
        check_csi_name(request.name)
        check_capabilities(request.volume_capabilities)
        parameters = dict(request.parameters)
        device_class = device_class_for(self.inventory.config, parameters)
        wanted = size_range(
            request.capacity_range.required_bytes, request.capacity_range.limit_bytes
        )
        timeout = budget(context)
        lv_name = lv_name_for(Kind.VOLUME, request.name)
        with self.locks.hold(lv_name):
            scan = self.inventory.scan(timeout)
            existing = self.inventory.find_by_name(Kind.VOLUME, lv_name, scan)
            if existing is not None and INCOMPLETE_TAG in existing.lv.tags:
                self._remove_incomplete(existing, timeout)
                scan, existing = self.inventory.scan(timeout), None
            source = None
            if request.HasField("volume_content_source"):
                # A repeat of a finished restore or clone needs no source any
                # more: its snapshot may have been deleted since (a sidecar
                # that lost the first answer asks again).
                settled = existing is not None and existing.complete
                source = self._content_source(request, scan, must_exist=not settled)
            self._check_topology(request, source)
            if existing is not None:
                return self._existing_volume(
                    request, existing, device_class, wanted, source, scan, timeout
                )
            space = self.inventory.space(device_class, scan)
            if source is not None:
                owned = self._create_from_source(
                    request, lv_name, device_class, wanted, source, space, timeout
                )
                volume = self._volume(owned, request.volume_content_source)
            else:
                volume = self._create_blank(request, lv_name, device_class, wanted, space, timeout)
        log.info(
            "volume created",
            volume_id=volume.volume_id,
            lv=f"{device_class.volume_group}/{lv_name}",
            bytes=volume.capacity_bytes,
        )
        return csi_pb2.CreateVolumeResponse(volume=volume)

    def _create_blank(
        self,
        request: Any,
        lv_name: str,
        device_class: DeviceClass,
        wanted: Any,
        space: ClassSpace,
        timeout: float | None,
    ) -> csi_pb2.Volume:
        """Make a blank volume. Its size is whole extents already, exactly what
        lvcreate makes, so no report is read back (a repeated call reads the
        volume from LVM, in _existing_volume)."""
        size = choose_size(wanted, space.extent_bytes, minimum_bytes(request.volume_capabilities))
        self._check_room(device_class, size, space)
        tags = self._volume_tags(request, device_class, source_id="")
        if device_class.thin_pool is not None:
            with self._lvcreate_errors(device_class, size, f"volume {request.name}"):
                self.lvm.create_thin_volume(
                    device_class.volume_group, device_class.thin_pool, lv_name, size, tags, timeout
                )
        else:
            # lvcreate commits the LV before it zeroes the start: a kill in
            # between would leave an earlier tenant's data in a "new" volume.
            self._create_linear(
                device_class,
                lv_name,
                size,
                [*tags, INCOMPLETE_TAG],
                f"volume {request.name}",
                timeout,
            )
            self.lvm.delete_tag(device_class.volume_group, lv_name, INCOMPLETE_TAG, timeout)
        return csi_pb2.Volume(
            volume_id=str(self.inventory.make_id(device_class, lv_name)),
            capacity_bytes=size,
            accessible_topology=[node_topology(self.topology_key, self.node_id)],
        )

    def _create_linear(
        self,
        device_class: DeviceClass,
        lv_name: str,
        size: int,
        tags: list[str],
        name: str,
        timeout: float | None,
    ) -> None:
        with self._lvcreate_errors(device_class, size, name):
            self.lvm.create_linear_volume(device_class.volume_group, lv_name, size, tags, timeout)

    @contextmanager
    def _lvcreate_errors(self, device_class: DeviceClass, size: int, name: str) -> Iterator[None]:
        """LVM's refusals of a new LV, as the statuses a CreateVolume answers."""
        try:
            yield
        except LvmNoSpace as exc:
            raise ResourceExhausted(
                f"device class {device_class.name} on node {self.node_id} has no room for "
                f"{size} bytes: {exc}"
            ) from exc
        except LvmAlreadyExists as exc:
            raise Aborted(f"{name} appeared while being created; retry") from exc

    def _create_from_source(
        self,
        request: Any,
        lv_name: str,
        device_class: DeviceClass,
        wanted: Any,
        source: Owned,
        space: ClassSpace,
        timeout: float | None,
    ) -> Owned:
        if device_class.name != source.device_class.name:
            raise InvalidArgument(
                f"{source.kind.value} {source.id} is in device class {source.device_class.name}; "
                f"a volume made from it must use that class, not {device_class.name}"
            )
        size = choose_size(wanted, space.extent_bytes, minimum=source.size_bytes)
        tags = [*self._volume_tags(request, device_class, source_id=str(source.id)), NEW_UUID_TAG]
        if device_class.thin_pool is None:
            # A thick restore or clone is a copy into a new LV of its own.
            needed = self.copier.room_needed(source, size, space.extent_bytes)
            self._check_room(device_class, needed, space, copy=True)
            self._create_linear(
                device_class, lv_name, size, [*tags, COPYING_TAG], f"volume {request.name}", timeout
            )
            self.copier.fill(
                self._reload(device_class, lv_name, timeout), source, space.extent_bytes
            )
            return self._reload(device_class, lv_name, None)
        # A thin snapshot copies nothing, but its virtual size still counts
        # against the class's over-provisioning limit, like any thin volume.
        self._check_room(device_class, size, space)
        try:
            self.lvm.create_thin_snapshot(
                device_class.volume_group,
                source.lv.name,
                lv_name,
                tags,
                active=True,
                timeout=timeout,
            )
        except LvmNoSpace as exc:
            raise ResourceExhausted(
                f"thin pool of device class {device_class.name} on node {self.node_id} "
                f"refused a new snapshot: {exc}"
            ) from exc
        owned = self._reload(device_class, lv_name, timeout)
        if owned.size_bytes < size:
            self.lvm.extend(device_class.volume_group, lv_name, size, timeout)
            owned = self._reload(device_class, lv_name, timeout)
        return owned

    def _remove_incomplete(self, owned: Owned, timeout: float | None) -> None:
        log.warning(
            "repairing an interrupted creation: removing the LV to make it again",
            lv=owned.lv.full_name,
            name=owned.name,
        )
        self.lvm.remove(owned.lv.vg_name, owned.lv.name, timeout)

    def repair_interrupted(self, timeout: float | None = None) -> int:
        """At start-up: remove every owned LV whose creation never finished.

        Its id was never returned, so nothing refers to it; a retry of the
        call makes it again. Returns how many were removed."""
        scan = self.inventory.scan(timeout)
        incomplete = [
            owned
            for kind in Kind
            for owned in self.inventory.owned(kind, scan)
            if INCOMPLETE_TAG in owned.lv.tags
        ]
        for owned in incomplete:
            with self.locks.hold(owned.lv.name):
                self._remove_incomplete(owned, timeout)
        return len(incomplete)

    def _existing_volume(
        self,
        request: Any,
        existing: Owned,
        device_class: DeviceClass,
        wanted: Any,
        source: Owned | None,
        scan: Scan,
        timeout: float | None,
    ) -> csi_pb2.CreateVolumeResponse:
        """Idempotent repeat, a crash left-over to finish, or a conflict."""
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
        if source is not None and not existing.complete:
            # A thick restore or clone whose copy was interrupted: redo it.
            extent = self.inventory.space(device_class, scan).extent_bytes
            self.copier.fill(existing, source, extent)
            existing = self._reload(device_class, existing.lv.name, None)
        if (
            existing.source_id
            and device_class.thin_pool is not None
            and existing.size_bytes < wanted.required
        ):
            # A thin restore interrupted between snapshot and extend: finish it
            # (the snapshot is already as large as its source was).
            extent = self.inventory.space(device_class, scan).extent_bytes
            size = choose_size(wanted, extent, minimum=existing.size_bytes)
            self.lvm.extend(existing.lv.vg_name, existing.lv.name, size, timeout)
            existing = self._reload(device_class, existing.lv.name, timeout)
        if not wanted.allows(existing.size_bytes):
            raise AlreadyExists(
                f"volume {request.name} already exists with {existing.size_bytes} bytes, "
                f"outside the requested range ({wanted.describe()})"
            )
        return csi_pb2.CreateVolumeResponse(
            volume=self._volume(existing, request.volume_content_source)
        )

    def _content_source(self, request: Any, scan: Scan, must_exist: bool) -> Owned | None:
        """The snapshot or volume a new volume is made from; NOT_FOUND when it
        does not exist, unless ``must_exist`` is false (then None)."""
        reference = source_reference(request.volume_content_source)
        if reference is None:
            raise InvalidArgument("volume_content_source must name a snapshot or a volume")
        text, kind, what = reference
        if not text:
            raise InvalidArgument(f"volume_content_source: the {what} id is required")
        object_id = ObjectId.parse(text)
        if object_id is not None and object_id.node != self.inventory.node_part:
            raise ResourceExhausted(
                f"{what} {text} is held by node {object_id.node}; a volume made from it can "
                f"only live on that node, not on {self.node_id}"
            )
        found = self.inventory.lookup(text, kind, what, scan)
        if found is None:
            if must_exist:
                raise NotFound(f"{what} {text} does not exist on node {self.node_id}")
            return None
        found.check_complete(what)
        return found

    def _check_topology(self, request: Any, source: Owned | None) -> None:
        requirements = request.accessibility_requirements
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

    def _check_room(
        self, device_class: DeviceClass, size: int, space: ClassSpace, copy: bool = False
    ) -> None:
        if space.full is not None:
            log.warning("device class full", device_class=device_class.name, reason=space.full)
            raise ResourceExhausted(
                f"device class {device_class.name} on node {self.node_id} takes no new "
                f"volumes: {space.full}"
            )
        if size > space.available_bytes:
            during = " (the copy, and a temporary snapshot of a volume source)" if copy else ""
            raise ResourceExhausted(
                f"device class {device_class.name} on node {self.node_id} has "
                f"{space.available_bytes} bytes available, {size} requested{during}"
            )

    def _volume_tags(self, request: Any, device_class: DeviceClass, source_id: str) -> list[str]:
        parameters = request.parameters
        return encode_tags(
            {
                Tag.DRIVER: self.inventory.driver_name,
                Tag.NAME: request.name,
                Tag.CLASS: device_class.name,
                Tag.SOURCE: source_id,
                Tag.PVC_NAME: parameters.get(PVC_NAME, ""),
                Tag.PVC_NAMESPACE: parameters.get(PVC_NAMESPACE, ""),
                Tag.PV_NAME: parameters.get(PV_NAME, ""),
            }
        )

    def _reload(self, device_class: DeviceClass, lv_name: str, timeout: float | None) -> Owned:
        # A shared scan, not an ``lvs`` of this LV: concurrent creates share it.
        lv = self.inventory.scan(timeout).lv(device_class.volume_group, lv_name)
        owned = None if lv is None else self.inventory.adopt(lv, device_class)
        if owned is None:
            raise Aborted(
                f"LV {device_class.volume_group}/{lv_name} vanished while being made; retry"
            )
        return owned

    def _volume(self, owned: Owned, content_source: Any = None) -> csi_pb2.Volume:
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

    def DeleteVolume(self, request: Any, context: Any) -> csi_pb2.DeleteVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        parsed = self.inventory.parse_local_id(request.volume_id, Kind.VOLUME, "volume")
        if parsed is None:  # not an id csi-lvm makes, so no volume of ours
            return csi_pb2.DeleteVolumeResponse()
        object_id, device_class = parsed
        timeout = budget(context)
        with self.locks.hold(object_id.lv_name):
            owned = self.inventory.get(object_id, device_class, timeout)
            if owned is None:
                return csi_pb2.DeleteVolumeResponse()
            if self._held_open(owned, timeout):
                raise FailedPrecondition(
                    f"volume {request.volume_id} is still in use on node {self.node_id} "
                    "(its device is open); unpublish and unstage it first"
                )
            self._remove(owned, "volume", timeout)
        log.info("volume deleted", volume_id=request.volume_id, lv=owned.lv.full_name)
        return csi_pb2.DeleteVolumeResponse()

    def _held_open(self, owned: Owned, timeout: float | None) -> bool:
        """Whether the LV's device stays open. udev opens a device for a moment
        after a writer closes it (to probe it again), so an open device is
        looked at a few more times, for about a second, before a call is
        refused; LVM's own deactivation retries for the same reason."""
        if not owned.lv.attr.device_open:
            return False
        for _ in range(4):
            time.sleep(0.25)
            lv = self.lvm.find_lv(owned.lv.vg_name, owned.lv.name, timeout)
            if lv is None or not lv.attr.device_open:
                return False
        return True

    def _remove(self, owned: Owned, what: str, timeout: float | None) -> None:
        """Remove an owned LV, and the temporary snapshot an interrupted copy
        into it left behind."""
        try:
            if not owned.complete:
                self.copier.remove_view(owned)
            self.lvm.remove(owned.lv.vg_name, owned.lv.name, timeout)
        except LvmInUse as exc:
            raise FailedPrecondition(
                f"{what} {owned.id} is in use on node {self.node_id}: it is open, or a copy "
                f"(a thick snapshot, restore or clone) is reading it; retry when that has "
                f"finished ({exc})"
            ) from exc

    def _require_volume(self, volume_id: str, scan: Scan) -> Owned:
        if not volume_id:
            raise InvalidArgument("volume_id is required")
        return self.inventory.require(volume_id, Kind.VOLUME, "volume", scan)

    def ValidateVolumeCapabilities(
        self, request: Any, context: Any
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

    def ListVolumes(self, request: Any, context: Any) -> csi_pb2.ListVolumesResponse:
        scan = self.inventory.scan(budget(context))
        volumes = self.inventory.owned(Kind.VOLUME, scan)
        page, next_token = _page(volumes, request.max_entries, request.starting_token)
        entries = []
        for owned in page:
            condition = self.inventory.condition(owned, scan)
            entries.append(
                csi_pb2.ListVolumesResponse.Entry(
                    volume=self._volume(owned),
                    status=csi_pb2.ListVolumesResponse.VolumeStatus(
                        volume_condition=_condition(condition)
                    ),
                )
            )
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=next_token)

    def ControllerGetVolume(
        self, request: Any, context: Any
    ) -> csi_pb2.ControllerGetVolumeResponse:
        scan = self.inventory.scan(budget(context))
        owned = self._require_volume(request.volume_id, scan)
        condition = self.inventory.condition(owned, scan)
        return csi_pb2.ControllerGetVolumeResponse(
            volume=self._volume(owned),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
                volume_condition=_condition(condition)
            ),
        )

    def GetCapacity(self, request: Any, context: Any) -> csi_pb2.GetCapacityResponse:
        device_class = device_class_for(self.inventory.config, dict(request.parameters))
        if any(capability_problem(c) for c in request.volume_capabilities):
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        if (
            request.HasField("accessible_topology")
            and request.accessible_topology.segments.get(self.topology_key) != self.node_id
        ):
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        space = self.inventory.space(device_class, self.inventory.scan(budget(context)))
        available = space.available_bytes - space.available_bytes % space.extent_bytes
        response = csi_pb2.GetCapacityResponse(available_capacity=available)
        response.maximum_volume_size.value = available
        response.minimum_volume_size.value = space.extent_bytes
        return response

    def ControllerGetCapabilities(
        self, request: Any, context: Any
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

    def CreateSnapshot(self, request: Any, context: Any) -> csi_pb2.CreateSnapshotResponse:
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
        lv_name = lv_name_for(Kind.SNAPSHOT, request.name)
        with self.locks.hold(lv_name):
            scan = self.inventory.scan(timeout)
            existing = self.inventory.find_by_name(Kind.SNAPSHOT, lv_name, scan)
            if existing is not None:
                if existing.name != request.name or existing.source_id != request.source_volume_id:
                    raise AlreadyExists(
                        f"snapshot {request.name} already exists for source volume "
                        f"{existing.source_id}, not {request.source_volume_id}"
                    )
                if not existing.complete:
                    # A thick snapshot whose copy was interrupted: redo it.
                    source = self._require_volume(request.source_volume_id, scan)
                    source.check_complete("source volume")
                    extent = self.inventory.space(existing.device_class, scan).extent_bytes
                    self.copier.fill(existing, source, extent)
                    existing = self._reload(existing.device_class, existing.lv.name, None)
                return csi_pb2.CreateSnapshotResponse(snapshot=self._snapshot(existing))
            source = self._require_volume(request.source_volume_id, scan)
            source.check_complete("source volume")
            device_class = source.device_class
            full = self.inventory.space(device_class, scan).full
            if full is not None:
                # A snapshot pins the origin's blocks, so every later write to
                # the origin needs new ones: not on a pool that is out of room.
                log.warning("device class full", device_class=device_class.name, reason=full)
                raise ResourceExhausted(f"no snapshot of volume {request.source_volume_id}: {full}")
            tags = encode_tags(
                {
                    Tag.DRIVER: self.inventory.driver_name,
                    Tag.NAME: request.name,
                    Tag.CLASS: device_class.name,
                    Tag.SOURCE: request.source_volume_id,
                    Tag.SNAPSHOT_NAME: parameters.get(SNAPSHOT_NAME, ""),
                    Tag.SNAPSHOT_NAMESPACE: parameters.get(SNAPSHOT_NAMESPACE, ""),
                    Tag.SNAPSHOT_CONTENT_NAME: parameters.get(SNAPSHOT_CONTENT_NAME, ""),
                }
            )
            if device_class.thin_pool is None:
                snapshot = self._copy_snapshot(request.name, lv_name, source, tags, scan, timeout)
            else:
                try:
                    self.lvm.create_thin_snapshot(
                        device_class.volume_group, source.lv.name, lv_name, tags,
                        active=False, timeout=timeout,
                    )  # fmt: skip
                except LvmNoSpace as exc:
                    raise ResourceExhausted(
                        f"thin pool of device class {device_class.name} refused a snapshot: {exc}"
                    ) from exc
                snapshot = self._reload(device_class, lv_name, timeout)
        log.info("snapshot created", snapshot_id=str(snapshot.id), source=request.source_volume_id)
        return csi_pb2.CreateSnapshotResponse(snapshot=self._snapshot(snapshot))

    def _copy_snapshot(
        self,
        name: str,
        lv_name: str,
        source: Owned,
        tags: list[str],
        scan: Scan,
        timeout: float | None,
    ) -> Owned:
        """A thick snapshot: a new LV of the source's size holding a copy of a
        point-in-time view of it."""
        device_class = source.device_class
        space = self.inventory.space(device_class, scan)
        needed = self.copier.room_needed(source, source.size_bytes, space.extent_bytes)
        self._check_room(device_class, needed, space, copy=True)
        self._create_linear(
            device_class,
            lv_name,
            source.size_bytes,
            [*tags, COPYING_TAG],
            f"snapshot {name}",
            timeout,
        )
        self.copier.fill(self._reload(device_class, lv_name, timeout), source, space.extent_bytes)
        return self._reload(device_class, lv_name, None)

    def _snapshot(self, owned: Owned) -> csi_pb2.Snapshot:
        created = Timestamp()
        when = owned.lv.created_at
        if when is not None:
            created.FromDatetime(when)
        return csi_pb2.Snapshot(
            snapshot_id=str(owned.id),
            source_volume_id=owned.source_id,
            size_bytes=owned.size_bytes,
            creation_time=created,
            ready_to_use=owned.complete,
        )

    def DeleteSnapshot(self, request: Any, context: Any) -> csi_pb2.DeleteSnapshotResponse:
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        parsed = self.inventory.parse_local_id(request.snapshot_id, Kind.SNAPSHOT, "snapshot")
        if parsed is None:
            return csi_pb2.DeleteSnapshotResponse()
        object_id, device_class = parsed
        timeout = budget(context)
        with self.locks.hold(object_id.lv_name):
            owned = self.inventory.get(object_id, device_class, timeout)
            if owned is not None:
                if self._held_open(owned, timeout):
                    raise FailedPrecondition(
                        f"snapshot {request.snapshot_id} is being read (a restore from it is "
                        "copying); retry when the restore has finished"
                    )
                self._remove(owned, "snapshot", timeout)
                log.info("snapshot deleted", snapshot_id=request.snapshot_id)
        return csi_pb2.DeleteSnapshotResponse()

    def GetSnapshot(self, request: Any, context: Any) -> csi_pb2.GetSnapshotResponse:
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        scan = self.inventory.scan(budget(context))
        found = self.inventory.require(request.snapshot_id, Kind.SNAPSHOT, "snapshot", scan)
        return csi_pb2.GetSnapshotResponse(snapshot=self._snapshot(found))

    def ListSnapshots(self, request: Any, context: Any) -> csi_pb2.ListSnapshotsResponse:
        snapshots = self.inventory.owned(Kind.SNAPSHOT, self.inventory.scan(budget(context)))
        if request.snapshot_id:
            snapshots = [s for s in snapshots if str(s.id) == request.snapshot_id]
        if request.source_volume_id:
            snapshots = [s for s in snapshots if s.source_id == request.source_volume_id]
        page, next_token = _page(snapshots, request.max_entries, request.starting_token)
        return csi_pb2.ListSnapshotsResponse(
            entries=[csi_pb2.ListSnapshotsResponse.Entry(snapshot=self._snapshot(s)) for s in page],
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


def _condition(condition: Any) -> csi_pb2.VolumeCondition:
    return csi_pb2.VolumeCondition(abnormal=condition.abnormal, message=condition.message)


def source_reference(content: Any) -> tuple[str, Kind, str] | None:
    """The id a content source names, its kind and what to call it in a
    message; None when it names neither a snapshot nor a volume."""
    which = content.WhichOneof("type")
    if which == "snapshot":
        return content.snapshot.snapshot_id, Kind.SNAPSHOT, "snapshot"
    if which == "volume":
        return content.volume.volume_id, Kind.VOLUME, "source volume"
    return None


def requested_source_id(content: Any) -> str:
    """The id a request names as its content source, as csi-lvm writes it in
    a volume's tags ("" for none)."""
    reference = source_reference(content)
    if reference is None:
        return ""
    parsed = ObjectId.parse(reference[0])
    return str(parsed) if parsed is not None else reference[0]
