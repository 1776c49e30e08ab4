"""The CSI Controller service: volume and snapshot lifecycle on this node.

Each RPC validates its request, picks the device class's backend, and
translates the answer. Lookups go through the inventory, changes through the
backend (``csi_lvm.backends``), lifecycle states through
``csi_lvm.lifecycle``. Errors are raised as domain errors; the server's
interceptor turns them into gRPC statuses.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from csi_lvm import lifecycle
from csi_lvm.backends import Backends
from csi_lvm.backends.asks import Ask, Condition
from csi_lvm.csi import csi_pb2, csi_pb2_grpc
from csi_lvm.errors import AlreadyExists, DeadlineExceeded, InvalidArgument, NotFound
from csi_lvm.ids import Kind, ObjectId, check_csi_name, lv_name_for
from csi_lvm.locks import KeyedLocks
from csi_lvm.modifications import Modifier, parse_change
from csi_lvm.peer_copy import PeerCopies
from csi_lvm.peer_source import Leases
from csi_lvm.rpc import budget, paged
from csi_lvm.topology import NodeTopology
from csi_lvm.validation import (
    SizeRange,
    capability_problem,
    check_capabilities,
    check_sidecar_parameters,
    device_class_for,
    size_range,
)
from csi_lvm.volume_creation import VolumeCreation
from csi_lvm.volumes import Inventory, Owned, Scan

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
    Cap.MODIFY_VOLUME,
)
Context = grpc.ServicerContext
T = TypeVar("T")
# Sends a ControllerModifyVolume to the plugin of the node its volume is on.
ModifyElsewhere = Callable[[str, csi_pb2.ControllerModifyVolumeRequest, float | None], None]


def controller_capabilities(
    capabilities: Iterable[Cap],
) -> csi_pb2.ControllerGetCapabilitiesResponse:
    """A ControllerGetCapabilities answer offering ``capabilities``."""
    return csi_pb2.ControllerGetCapabilitiesResponse(
        capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=csi_pb2.ControllerServiceCapability.RPC(type=c))
            for c in capabilities
        ]
    )


# How long a delete waits for the copy into its volume to stop.
CANCEL_WAIT_SECONDS = 10.0
# Threads for copies (thick snapshots, restores and clones); more would only
# share the same disks.
COPY_WORKERS = 2


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(
        self,
        inventory: Inventory,
        backends: Backends,
        locks: KeyedLocks,
        topology: NodeTopology,
        modifier: Modifier,
        peer_copies: PeerCopies | None = None,
        leases: Leases | None = None,
        modify_elsewhere: ModifyElsewhere | None = None,
    ) -> None:
        self.inventory = inventory
        self.backends = backends
        self.locks = locks
        self.topology = topology
        # Copies from other nodes (None: volumes are made from this node's
        # objects only), and this node's objects other nodes copy.
        self.peer_copies = peer_copies
        self.leases = leases
        self.modifier = modifier
        self.modify_elsewhere = modify_elsewhere
        self.creation = VolumeCreation(inventory, backends, locks, topology, peer_copies)
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
        parse_change(request.mutable_parameters, device_class)  # refused before anything is made
        lv_name = lv_name_for(Kind.VOLUME, request.name)
        remote = (
            None
            if self.peer_copies is None
            else self.peer_copies.remote_source(request.volume_content_source)
        )
        volume = self._off_the_rpc_threads(
            backend.slow_to_make or remote is not None,
            lambda: self.creation.create(request, lv_name, backend, wanted, remote, timeout),
            timeout,
        )
        if request.mutable_parameters:  # its VolumeAttributesClass's
            self._modify(volume.volume_id, request.mutable_parameters, timeout)
        return csi_pb2.CreateVolumeResponse(volume=volume)

    def ControllerModifyVolume(
        self, request: csi_pb2.ControllerModifyVolumeRequest, context: Context
    ) -> csi_pb2.ControllerModifyVolumeResponse:
        """The cluster's one resizer asks this node's plugin about any
        volume: one of another node goes to that node's plugin."""
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        timeout = budget(context)
        parsed = ObjectId.parse(request.volume_id)
        elsewhere = parsed is not None and parsed.node != self.inventory.node_part
        if elsewhere and self.modify_elsewhere is not None:
            assert parsed is not None
            self.modify_elsewhere(parsed.node, request, timeout)
        else:
            self.modify_here(request, timeout)
        return csi_pb2.ControllerModifyVolumeResponse()

    def modify_here(
        self, request: csi_pb2.ControllerModifyVolumeRequest, timeout: float | None
    ) -> None:
        """A ControllerModifyVolume of a volume of this node."""
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        self._modify(request.volume_id, request.mutable_parameters, timeout)

    def _modify(self, volume_id: str, parameters: Mapping[str, str], timeout: float | None) -> None:
        """The volume found (NOT_FOUND else), its class's parameters checked,
        then the change made, under the volume's lock."""
        object_id = self.inventory.local_id(volume_id, Kind.VOLUME, "volume")
        if object_id is None:  # not an id csi-lvm makes
            raise NotFound(f"volume {volume_id} does not exist on node {self.node_id}")
        with self.locks.hold(object_id.lv_name):
            owned = self._require_volume(volume_id, self.inventory.scan(timeout))
            change = parse_change(parameters, owned.device_class)
            lifecycle.check_ready(owned, "volume")
            self.modifier.modify(owned, change, timeout)

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
        with self._held_for_delete(object_id.lv_name):
            if device_class is not None:
                owned = self.inventory.get(object_id, device_class, timeout)
            else:
                # A class retired from the config: its PVs must still go.
                owned = self.inventory.find_anywhere(object_id, timeout)
            if owned is None:
                return
            if self.leases is not None:
                self.leases.check_deletable(owned)
            self.backends.of(owned.device_class).delete(owned, timeout)
            if self.peer_copies is not None and not lifecycle.is_ready(owned):
                self.peer_copies.release_source_of(owned)
        log.info(f"{kind.value} deleted", id=text, lv=owned.lv.full_name)

    def _held_for_delete(self, lv_name: str) -> contextlib.AbstractContextManager[None]:
        """The name's lock. A copy from another node into it holds it until
        it stops: a delete stops it, and waits a little for it to let go."""
        if self.peer_copies is not None and self.peer_copies.cancel(lv_name):
            return self.locks.hold_within(CANCEL_WAIT_SECONDS, lv_name)
        return self.locks.hold(lv_name)

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
        page, next_token = paged(volumes, _id, request.max_entries, request.starting_token)
        entries = [
            csi_pb2.ListVolumesResponse.Entry(
                volume=self.creation.csi_volume(owned),
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
            volume=self.creation.csi_volume(owned),
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
        if request.HasField("accessible_topology") and not self.topology.accepts(
            request.accessible_topology.segments
        ):
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        scan = self.inventory.current(budget(context))
        space = self.backends.of(device_class).space(scan, live=True)
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
        return controller_capabilities(CAPABILITIES)

    # ------------------------------------------------------------ snapshots

    def CreateSnapshot(
        self, request: csi_pb2.CreateSnapshotRequest, context: Context
    ) -> csi_pb2.CreateSnapshotResponse:
        check_csi_name(request.name)
        if not request.source_volume_id:
            raise InvalidArgument("source_volume_id is required")
        check_sidecar_parameters(request.parameters, "snapshot")
        timeout = budget(context)
        source_id = ObjectId.parse(request.source_volume_id)
        source_class = self.inventory.config.find(source_id.device_class) if source_id else None
        snapshot = self._off_the_rpc_threads(
            source_class is not None and self.backends.of(source_class).slow_to_make,
            lambda: self._create_snapshot(request, timeout),
            timeout,
        )
        return csi_pb2.CreateSnapshotResponse(snapshot=csi_snapshot(snapshot))

    def _create_snapshot(
        self,
        request: csi_pb2.CreateSnapshotRequest,
        timeout: float | None,
    ) -> Owned:
        lv_name = lv_name_for(Kind.SNAPSHOT, request.name)
        with self.locks.hold(lv_name):
            return self.inventory.kept.decided(
                lambda scan, fresh: self._create_snapshot_in(
                    request, lv_name, scan, fresh, timeout
                ),
                timeout,
            )

    def _create_snapshot_in(
        self,
        request: csi_pb2.CreateSnapshotRequest,
        lv_name: str,
        scan: Scan,
        fresh: bool,
        timeout: float | None,
    ) -> Owned:
        """CreateSnapshot's work under the name's lock, from ``scan``."""
        existing = self.inventory.existing(Kind.SNAPSHOT, lv_name, scan, fresh, timeout)
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
                existing = backend.finish(existing, source, SizeRange(0, 0), scan, timeout)
            return existing
        source = self._require_volume(request.source_volume_id, scan)
        lifecycle.check_ready(source, "source volume")
        device_class = source.device_class
        tags = self.inventory.tags_for(Kind.SNAPSHOT, request.name, device_class, source)
        ask = Ask(f"snapshot {request.name}", lv_name, tags, timeout)
        snapshot = self.backends.of(device_class).make_snapshot(ask, source, scan)
        log.info("snapshot created", snapshot_id=str(snapshot.id), source=request.source_volume_id)
        return snapshot

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
        return csi_pb2.GetSnapshotResponse(snapshot=csi_snapshot(found))

    def ListSnapshots(
        self, request: csi_pb2.ListSnapshotsRequest, context: Context
    ) -> csi_pb2.ListSnapshotsResponse:
        snapshots = self.inventory.owned(Kind.SNAPSHOT, self.inventory.scan(budget(context)))
        if request.snapshot_id:
            snapshots = [s for s in snapshots if str(s.id) == request.snapshot_id]
        if request.source_volume_id:
            snapshots = [s for s in snapshots if s.source_id == request.source_volume_id]
        page, next_token = paged(snapshots, _id, request.max_entries, request.starting_token)
        return csi_pb2.ListSnapshotsResponse(
            entries=[csi_pb2.ListSnapshotsResponse.Entry(snapshot=csi_snapshot(s)) for s in page],
            next_token=next_token,
        )


def csi_snapshot(owned: Owned, group_snapshot_id: str = "") -> csi_pb2.Snapshot:
    """The CSI view of an owned snapshot (one of a group names the group)."""
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
        group_snapshot_id=group_snapshot_id,
    )


def _id(owned: Owned) -> str:
    return str(owned.id)
