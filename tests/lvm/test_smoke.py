from __future__ import annotations

from csi_lvm.csi import csi_pb2
from tests.lvm.conftest import mount_capability
from tests.testbed import CsiClient, LoopVolumeGroup

MiB = 1 << 20


def test_create_and_delete_thin_volume(csi: CsiClient, vg: LoopVolumeGroup, name: str) -> None:
    response = csi.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=10 * MiB),
            volume_capabilities=[mount_capability()],
        )
    )
    assert response.volume.capacity_bytes == 12 * MiB  # rounded up to 4 MiB extents
    assert f"csi-{name}" in vg.lv_names()
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=response.volume.volume_id))
    assert f"csi-{name}" not in vg.lv_names()
