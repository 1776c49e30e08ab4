"""The CSI Identity service: name, version, capabilities and readiness.

Probe reads nothing: the liveness probe calls it every few seconds, and an
answer that waits for LVM (busy with a queue of creates, or a slow remove)
would get the container restarted, killing LVM commands with it. A driver
that answers at all is ready; a class whose storage is missing is reported
by GetCapacity, ``status``, ``doctor`` and the metrics, not by Probe.
"""

from __future__ import annotations

import grpc

from csi_lvm import __version__
from csi_lvm.csi import csi_pb2, csi_pb2_grpc

Service = csi_pb2.PluginCapability.Service.Type


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, driver_name: str, forwarded: tuple[Service, ...] = ()) -> None:
        self.driver_name = driver_name
        # A forwarder of the cluster's calls (SnapshotMetadata, or groups)
        # offers the services it forwards and nothing else.
        self.forwarded = forwarded

    def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self.driver_name, vendor_version=__version__)

    def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        # SNAPSHOT_METADATA_SERVICE for the driver as a whole: thin classes
        # answer it, thick classes say they cannot (their snapshots are copies).
        # GROUP_CONTROLLER_SERVICE likewise: thin classes cut group snapshots.
        services: tuple[Service, ...] = (
            Service.CONTROLLER_SERVICE,
            Service.GROUP_CONTROLLER_SERVICE,
            Service.VOLUME_ACCESSIBILITY_CONSTRAINTS,
            Service.SNAPSHOT_METADATA_SERVICE,
        )
        if self.forwarded:
            services = self.forwarded
        capabilities = [
            csi_pb2.PluginCapability(service=csi_pb2.PluginCapability.Service(type=s))
            for s in services
        ]
        if self.forwarded:
            return csi_pb2.GetPluginCapabilitiesResponse(capabilities=capabilities)
        # Volumes grow while mounted (NodeExpandVolume on the volume's node).
        capabilities.append(
            csi_pb2.PluginCapability(
                volume_expansion=csi_pb2.PluginCapability.VolumeExpansion(
                    type=csi_pb2.PluginCapability.VolumeExpansion.ONLINE
                )
            )
        )
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=capabilities)

    def Probe(
        self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ProbeResponse:
        response = csi_pb2.ProbeResponse()
        response.ready.value = True
        return response
