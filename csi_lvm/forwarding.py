"""Cluster-wide endpoints for calls about volumes that live on their nodes:
SnapshotMetadata, and the GroupController. Each call goes to the csi-lvm
plugin of the node its ids name, over mutual TLS; the plugin decides.

Kubernetes' SnapshotMetadataService names one address for the whole driver,
where the upstream ``external-snapshot-metadata`` sidecar serves backup
tools and calls the driver's CSI socket. In csi-lvm that socket is this
forwarder's (``csi-lvm forward-snapshot-metadata``, in the sidecar's pod): it
reads the node from the snapshot id (``<node>:<class>:<lv>``), finds that
node's plugin (``Peers``), and relays the request and the answer's stream,
statuses included. The plugins listen for it on a TLS port that serves the
SnapshotMetadata service alone and takes only clients whose certificate
comes from the driver's own authority (``csi_lvm.tls``), which the forwarder
and the plugins alone hold.

Group snapshots take the same road for another reason: the snapshotter
sidecar beside each plugin (``--node-deployment``) sees only objects labelled
for its node, and Kubernetes labels no VolumeGroupSnapshotContent or class.
One sidecar for groups runs beside this forwarder (``csi-lvm
forward-group-snapshots``), under a name of its own that ``csi_lvm.group_labels``
puts on the driver's group objects; the forwarder sends each call to the node
of its volumes or group id, where only the forwarder's certificate may call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from csi_lvm.controller import Cap, ControllerService, controller_capabilities
from csi_lvm.csi import csi_pb2, csi_pb2_grpc
from csi_lvm.errors import InvalidArgument, NotFound, Relayed, Unimplemented
from csi_lvm.group_controller import group_capabilities
from csi_lvm.ids import GroupId, Kind, ObjectId
from csi_lvm.peers import PeerChannels, Peers
from csi_lvm.rpc import budget
from csi_lvm.tls import TlsFiles

Context = grpc.ServicerContext
Answer = TypeVar("Answer")


class ForwardingService(csi_pb2_grpc.SnapshotMetadataServicer):
    def __init__(self, peers: Peers, tls: TlsFiles) -> None:
        self.channels = PeerChannels(peers, tls)

    def GetMetadataAllocated(
        self, request: csi_pb2.GetMetadataAllocatedRequest, context: Context
    ) -> Iterator[csi_pb2.GetMetadataAllocatedResponse]:
        node = _node_of(request.snapshot_id, "snapshot_id")
        stub = self._stub(node)
        return _relayed(node, stub.GetMetadataAllocated(request, timeout=budget(context)))

    def GetMetadataDelta(
        self, request: csi_pb2.GetMetadataDeltaRequest, context: Context
    ) -> Iterator[csi_pb2.GetMetadataDeltaResponse]:
        base = _node_of(request.base_snapshot_id, "base_snapshot_id")
        target = _node_of(request.target_snapshot_id, "target_snapshot_id")
        if base != target:
            raise InvalidArgument(
                f"base snapshot {request.base_snapshot_id} is on node {base} and target "
                f"snapshot {request.target_snapshot_id} on node {target}: they are not "
                "snapshots of the same volume"
            )
        stub = self._stub(base)
        return _relayed(base, stub.GetMetadataDelta(request, timeout=budget(context)))

    def _stub(self, node: str) -> csi_pb2_grpc.SnapshotMetadataStub:
        return csi_pb2_grpc.SnapshotMetadataStub(self.channels.channel(node, "snapshot"))

    def close(self) -> None:
        self.channels.close()


class GroupForwardingService(csi_pb2_grpc.GroupControllerServicer):
    """The GroupController of the whole driver: each call is answered by the
    plugin of the node that holds its volumes (or its group)."""

    def __init__(self, peers: Peers, tls: TlsFiles) -> None:
        self.channels = PeerChannels(peers, tls)

    def GroupControllerGetCapabilities(
        self, request: csi_pb2.GroupControllerGetCapabilitiesRequest, context: Context
    ) -> csi_pb2.GroupControllerGetCapabilitiesResponse:
        return group_capabilities()

    def CreateVolumeGroupSnapshot(
        self, request: csi_pb2.CreateVolumeGroupSnapshotRequest, context: Context
    ) -> csi_pb2.CreateVolumeGroupSnapshotResponse:
        node = volumes_node(list(request.source_volume_ids))
        stub = self._stub(node)
        return _relayed_one(
            node, lambda: stub.CreateVolumeGroupSnapshot(request, timeout=budget(context))
        )

    def GetVolumeGroupSnapshot(
        self, request: csi_pb2.GetVolumeGroupSnapshotRequest, context: Context
    ) -> csi_pb2.GetVolumeGroupSnapshotResponse:
        group = _group_of(request.group_snapshot_id)
        if group is None:
            raise NotFound(
                f"group snapshot {request.group_snapshot_id} does not exist: csi-lvm made no "
                "such id"
            )
        stub = self._stub(group.node)
        return _relayed_one(
            group.node, lambda: stub.GetVolumeGroupSnapshot(request, timeout=budget(context))
        )

    def DeleteVolumeGroupSnapshot(
        self, request: csi_pb2.DeleteVolumeGroupSnapshotRequest, context: Context
    ) -> csi_pb2.DeleteVolumeGroupSnapshotResponse:
        group = _group_of(request.group_snapshot_id)
        if group is None:  # never one of ours: nothing to delete
            return csi_pb2.DeleteVolumeGroupSnapshotResponse()
        stub = self._stub(group.node)
        return _relayed_one(
            group.node, lambda: stub.DeleteVolumeGroupSnapshot(request, timeout=budget(context))
        )

    def _stub(self, node: str) -> csi_pb2_grpc.GroupControllerStub:
        return csi_pb2_grpc.GroupControllerStub(self.channels.channel(node, "group's volumes"))

    def close(self) -> None:
        self.channels.close()


class GroupSidecarController(csi_pb2_grpc.ControllerServicer):
    """The Controller the group sidecar asks about before it starts: it
    starts only beside a driver that reports CREATE_DELETE_SNAPSHOT. It is
    never asked for a single snapshot (those are labelled for their node's
    sidecar); if it were, the answer says where they are taken."""

    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: Context
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return controller_capabilities([Cap.CREATE_DELETE_SNAPSHOT])

    def CreateSnapshot(
        self, request: csi_pb2.CreateSnapshotRequest, context: Context
    ) -> csi_pb2.CreateSnapshotResponse:
        raise Unimplemented(_SINGLE_SNAPSHOTS)

    def DeleteSnapshot(
        self, request: csi_pb2.DeleteSnapshotRequest, context: Context
    ) -> csi_pb2.DeleteSnapshotResponse:
        raise Unimplemented(_SINGLE_SNAPSHOTS)


_SINGLE_SNAPSHOTS = (
    "this endpoint takes group snapshots only: a single snapshot is taken by the "
    "snapshotter sidecar beside the plugin of its volume's node"
)


def volumes_node(source_ids: list[str]) -> str:
    """The node a group's create goes to: that of its first volume (in
    order of id). The plugin there refuses volumes of other nodes, saying so."""
    nodes = []
    for text in sorted(source_ids):
        parsed = ObjectId.parse(text)
        if parsed is None or parsed.kind is not Kind.VOLUME:
            raise NotFound(f"volume {text} does not exist (not a csi-lvm volume id)")
        nodes.append(parsed.node)
    if not nodes:
        raise InvalidArgument("source_volume_ids is required: name the volumes to snapshot")
    return nodes[0]


def _group_of(text: str) -> GroupId | None:
    if not text:
        raise InvalidArgument("group_snapshot_id is required")
    return GroupId.parse(text)


class ModifyForwarder:
    """ControllerModifyVolume of a volume of another node. The resizer runs
    as one leader for the cluster (deploy/kubernetes), beside any node's
    plugin, and sends every volume's modification there: that plugin passes
    it to the plugin of the volume's node, whose answer is relayed."""

    def __init__(self, channels: PeerChannels) -> None:
        self.channels = channels

    def __call__(
        self, node: str, request: csi_pb2.ControllerModifyVolumeRequest, timeout: float | None
    ) -> None:
        stub = csi_pb2_grpc.ControllerStub(self.channels.channel(node, "volume"))
        _relayed_one(node, lambda: stub.ControllerModifyVolume(request, timeout=timeout or 60.0))


class PeerModifications(csi_pb2_grpc.ControllerServicer):
    """The Controller a plugin's TLS port offers the other plugins: only
    ControllerModifyVolume, of this node's volumes (never passed on again)."""

    def __init__(self, controller: ControllerService) -> None:
        self.controller = controller

    def ControllerModifyVolume(
        self, request: csi_pb2.ControllerModifyVolumeRequest, context: Context
    ) -> csi_pb2.ControllerModifyVolumeResponse:
        self.controller.modify_here(request, budget(context))
        return csi_pb2.ControllerModifyVolumeResponse()


def _node_of(snapshot_id: str, field: str) -> str:
    if not snapshot_id:
        raise InvalidArgument(f"{field} is required")
    parsed = ObjectId.parse(snapshot_id)
    if parsed is None or parsed.kind is not Kind.SNAPSHOT:
        raise NotFound(f"snapshot {snapshot_id} does not exist: csi-lvm made no such id")
    return parsed.node


def _relayed(node: str, answers: Iterator[Any]) -> Iterator[Any]:
    """The node's messages, and its status when it fails."""
    try:
        yield from answers
    except grpc.RpcError as error:
        raise _relayed_error(node, error) from None


def _relayed_one(node: str, call: Callable[[], Answer]) -> Answer:
    """The node's answer, and its status when it fails."""
    try:
        return call()
    except grpc.RpcError as error:
        raise _relayed_error(node, error) from None


def _relayed_error(node: str, error: grpc.RpcError) -> Relayed:
    code = error.code()
    details = error.details() or ""
    if code is grpc.StatusCode.UNAVAILABLE:
        details = f"the csi-lvm plugin on node {node} cannot be reached: {details}"
    return Relayed(code, details)
