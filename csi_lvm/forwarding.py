"""One cluster-wide SnapshotMetadata endpoint for snapshots that live on
their nodes: each call goes to the csi-lvm plugin of the node its snapshot
id names, over mutual TLS.

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
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from csi_lvm.csi import csi_pb2, csi_pb2_grpc
from csi_lvm.errors import InvalidArgument, NotFound, Relayed
from csi_lvm.ids import Kind, ObjectId
from csi_lvm.peers import PeerChannels, Peers
from csi_lvm.rpc import budget
from csi_lvm.tls import TlsFiles

Context = grpc.ServicerContext


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
        code = error.code()
        details = error.details() or ""
        if code is grpc.StatusCode.UNAVAILABLE:
            details = f"the csi-lvm plugin on node {node} cannot be reached: {details}"
        raise Relayed(code, details) from None
