"""The node's health RPCs of CSI 1.13: NodeGetVolumeHealth and
NodeGetStorageHealth. They validate and translate; what is wrong is the
backends' to find (``csi_lvm.backends.health``), and the same findings make
the volume condition NodeGetVolumeStats still sends.
"""

from __future__ import annotations

import grpc

from csi_lvm.backends import Backends
from csi_lvm.backends.health import Finding, merged
from csi_lvm.csi import csi_pb2
from csi_lvm.errors import InvalidArgument
from csi_lvm.ids import Kind
from csi_lvm.rpc import budget
from csi_lvm.validation import check_path
from csi_lvm.volumes import Inventory

DEFAULT_TIMEOUT = 60.0
Entry = csi_pb2.VolumeHealth.VolumeHealthEntry
Backend = csi_pb2.NodeGetStorageHealthResponse.StorageBackendHealth


class NodeHealth:
    """Mixed into the node servicer, which has the inventory and backends."""

    inventory: Inventory
    backends: Backends

    def NodeGetVolumeHealth(
        self, request: csi_pb2.NodeGetVolumeHealthRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeHealthResponse:
        """The volume's findings; none when nothing is known to be wrong. The
        CO may ask after a failed stage or publish, so the volume need not be
        staged or published: the paths, when given, are only checked."""
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        for path, what in (
            (request.volume_publish_path, "volume_publish_path"),
            (request.staging_target_path, "staging_target_path"),
        ):
            if path:
                check_path(path, what)
        timeout = budget(context) or DEFAULT_TIMEOUT
        scan = self.inventory.view(timeout)
        owned = self.inventory.require(request.volume_id, Kind.VOLUME, "volume", scan)
        findings = self.backends.of(owned.device_class).volume_health(owned, scan, timeout)
        entries = [Entry(status=f.status, reason=f.reason, message=f.message) for f in findings]
        health = csi_pb2.VolumeHealth(volume_id=request.volume_id, health_statuses=entries)
        return csi_pb2.NodeGetVolumeHealthResponse(volume_health=health)

    def NodeGetStorageHealth(
        self, request: csi_pb2.NodeGetStorageHealthRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetStorageHealthResponse:
        """Every device class's storage on this node: one entry per status
        and reason, naming each class it is about."""
        scan = self.inventory.view(budget(context) or DEFAULT_TIMEOUT)
        findings: list[Finding] = []
        for backend in self.backends:
            findings += backend.storage_health(scan)
        entries = [
            Backend(status=f.status, reason=f.reason, message=f.message) for f in merged(findings)
        ]
        return csi_pb2.NodeGetStorageHealthResponse(backend_health=entries)
