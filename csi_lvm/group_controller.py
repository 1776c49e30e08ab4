"""The CSI GroupController service: validates, delegates to
``csi_lvm.group_snapshots`` and answers in CSI's terms. The same service
answers on the plugin's mutual-TLS port to the cluster's group snapshot
forwarder alone (``csi_lvm.forwarding``), where the cluster's one sidecar
for groups reaches every node."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from csi_lvm.controller import csi_snapshot
from csi_lvm.csi import csi_pb2, csi_pb2_grpc
from csi_lvm.errors import PermissionDenied
from csi_lvm.group_snapshots import Group, GroupSnapshots
from csi_lvm.ids import check_csi_name
from csi_lvm.rpc import budget
from csi_lvm.tls import GROUP_FORWARDER_NAME, caller_named
from csi_lvm.validation import check_sidecar_parameters

Context = grpc.ServicerContext
_GROUP_RPC = csi_pb2.GroupControllerServiceCapability.RPC


def group_capabilities() -> csi_pb2.GroupControllerGetCapabilitiesResponse:
    """What the driver's GroupController offers, wherever it is served."""
    return csi_pb2.GroupControllerGetCapabilitiesResponse(
        capabilities=[
            csi_pb2.GroupControllerServiceCapability(
                rpc=_GROUP_RPC(type=_GROUP_RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT)
            )
        ]
    )


class GroupControllerService(csi_pb2_grpc.GroupControllerServicer):
    def __init__(self, groups: GroupSnapshots) -> None:
        self.groups = groups

    def GroupControllerGetCapabilities(
        self, request: csi_pb2.GroupControllerGetCapabilitiesRequest, context: Context
    ) -> csi_pb2.GroupControllerGetCapabilitiesResponse:
        return group_capabilities()

    def CreateVolumeGroupSnapshot(
        self, request: csi_pb2.CreateVolumeGroupSnapshotRequest, context: Context
    ) -> csi_pb2.CreateVolumeGroupSnapshotResponse:
        check_csi_name(request.name)
        check_sidecar_parameters(request.parameters, "group snapshot")
        group = self.groups.create(request.name, list(request.source_volume_ids), budget(context))
        return csi_pb2.CreateVolumeGroupSnapshotResponse(group_snapshot=_csi_group(group))

    def GetVolumeGroupSnapshot(
        self, request: csi_pb2.GetVolumeGroupSnapshotRequest, context: Context
    ) -> csi_pb2.GetVolumeGroupSnapshotResponse:
        group = self.groups.get(
            request.group_snapshot_id, list(request.snapshot_ids), budget(context)
        )
        return csi_pb2.GetVolumeGroupSnapshotResponse(group_snapshot=_csi_group(group))

    def DeleteVolumeGroupSnapshot(
        self, request: csi_pb2.DeleteVolumeGroupSnapshotRequest, context: Context
    ) -> csi_pb2.DeleteVolumeGroupSnapshotResponse:
        self.groups.delete(request.group_snapshot_id, list(request.snapshot_ids), budget(context))
        return csi_pb2.DeleteVolumeGroupSnapshotResponse()


class ForwardedGroupController(GroupControllerService):
    """The service on the plugin's mutual-TLS port. Every plugin's
    certificate comes from the same authority, so the port tells callers
    apart by name: only the group forwarder's may cut or delete this node's
    group snapshots (another node's plugin may read volumes, not snapshot them)."""

    def CreateVolumeGroupSnapshot(
        self, request: csi_pb2.CreateVolumeGroupSnapshotRequest, context: Context
    ) -> csi_pb2.CreateVolumeGroupSnapshotResponse:
        _check_forwarder(context)
        return super().CreateVolumeGroupSnapshot(request, context)

    def GetVolumeGroupSnapshot(
        self, request: csi_pb2.GetVolumeGroupSnapshotRequest, context: Context
    ) -> csi_pb2.GetVolumeGroupSnapshotResponse:
        _check_forwarder(context)
        return super().GetVolumeGroupSnapshot(request, context)

    def DeleteVolumeGroupSnapshot(
        self, request: csi_pb2.DeleteVolumeGroupSnapshotRequest, context: Context
    ) -> csi_pb2.DeleteVolumeGroupSnapshotResponse:
        _check_forwarder(context)
        return super().DeleteVolumeGroupSnapshot(request, context)


def _check_forwarder(context: Context) -> None:
    if not caller_named(context, GROUP_FORWARDER_NAME):
        raise PermissionDenied(
            "only the cluster's group snapshot forwarder may take group snapshots over this "
            f"port: the caller's certificate does not name {GROUP_FORWARDER_NAME}"
        )


def _csi_group(group: Group) -> csi_pb2.VolumeGroupSnapshot:
    group_id = str(group.id)
    snapshots = [csi_snapshot(member, group_id) for member in group.members]
    created = Timestamp()
    if snapshots:  # the instant: every member's snapshot was cut within it
        created.CopyFrom(min((s.creation_time for s in snapshots), key=lambda t: t.ToNanoseconds()))
    return csi_pb2.VolumeGroupSnapshot(
        group_snapshot_id=group_id,
        snapshots=snapshots,
        creation_time=created,
        ready_to_use=group.ready,
    )
