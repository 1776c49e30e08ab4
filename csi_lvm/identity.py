"""The CSI Identity service: name, version, capabilities and readiness."""

from __future__ import annotations

import grpc

from csi_lvm import __version__
from csi_lvm.csi import csi_pb2, csi_pb2_grpc
from csi_lvm.rpc import budget
from csi_lvm.volumes import Inventory

Service = csi_pb2.PluginCapability.Service.Type


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, driver_name: str, inventory: Inventory) -> None:
        self.driver_name = driver_name
        self.inventory = inventory

    def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self.driver_name, vendor_version=__version__)

    def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        services = (Service.CONTROLLER_SERVICE, Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)
        capabilities = [
            csi_pb2.PluginCapability(service=csi_pb2.PluginCapability.Service(type=s))
            for s in services
        ]
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
        response.ready.value = not self.inventory.missing_storage(budget(context))
        return response
