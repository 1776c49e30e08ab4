"""Controller and Identity RPCs end to end, through a running driver."""

from __future__ import annotations

import threading

import grpc

from csi_lvm import __version__
from csi_lvm.csi import csi_pb2
from tests.lvm.conftest import HANDMADE_LV
from tests.lvm.helpers import (
    GiB,
    MiB,
    create,
    create_request,
    delete,
    expect_error,
    lv_tags,
    mount_capability,
)
from tests.testbed import DRIVER_NAME, NODE_ID, TOPOLOGY_KEY, CsiClient, LoopVolumeGroup

Code = grpc.StatusCode


def capacity(csi: CsiClient, device_class: str, **extra: object) -> int:
    request = csi_pb2.GetCapacityRequest(parameters={"deviceClass": device_class}, **extra)
    return int(csi.controller.GetCapacity(request).available_capacity)


def test_identity(csi: CsiClient) -> None:
    info = csi.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert (info.name, info.vendor_version) == (DRIVER_NAME, __version__)
    caps = csi.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in caps.capabilities}
    Service = csi_pb2.PluginCapability.Service
    assert {Service.CONTROLLER_SERVICE, Service.VOLUME_ACCESSIBILITY_CONSTRAINTS} <= services
    expansion = [
        c.volume_expansion.type for c in caps.capabilities if c.HasField("volume_expansion")
    ]
    assert expansion == [csi_pb2.PluginCapability.VolumeExpansion.ONLINE]
    assert csi.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True


def test_thin_volume_is_tagged_rounded_and_local(
    csi: CsiClient, vg: LoopVolumeGroup, name: str
) -> None:
    volume = create(
        csi, name, 10 * MiB,
        parameters={"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "shop",
                    "csi.storage.k8s.io/pv/name": "pv-1"},
    )  # fmt: skip
    assert volume.capacity_bytes == 12 * MiB  # whole 4 MiB extents
    assert volume.volume_id == f"{NODE_ID}:thin:csi-{name}"
    assert [dict(t.segments) for t in volume.accessible_topology] == [{TOPOLOGY_KEY: NODE_ID}]
    # Only what the driver needs (each tag takes room in the VG's metadata
    # area): the LV name spells the CSI name, the Kubernetes names are not kept.
    assert set(lv_tags(vg.name, f"csi-{name}")) == {
        f"csi-lvm/driver={DRIVER_NAME}",
        "csi-lvm/class=thin",
    }
    delete(csi, volume.volume_id)
    assert f"csi-{name}" not in vg.lv_names()


def test_a_name_its_lv_name_cannot_spell_is_kept_in_a_tag(
    csi: CsiClient, vg: LoopVolumeGroup, name: str
) -> None:
    long_name = f"{name}.Upper_Case"
    volume = create(csi, long_name, 4 * MiB)
    lv_name = volume.volume_id.split(":")[2]
    assert lv_name.startswith("csi_")  # a hash
    assert f"csi-lvm/name={long_name}" in lv_tags(vg.name, lv_name)
    listed = csi.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
    assert volume.volume_id in {e.volume.volume_id for e in listed}
    assert create(csi, long_name, 4 * MiB).volume_id == volume.volume_id  # idempotent
    delete(csi, volume.volume_id)


def test_thick_volume(csi: CsiClient, vg: LoopVolumeGroup, name: str) -> None:
    volume = create(csi, name, 8 * MiB, "thick")
    assert volume.volume_id.split(":")[1] == "thick"
    assert volume.capacity_bytes == 8 * MiB
    delete(csi, volume.volume_id)
    assert f"csi-{name}" not in vg.lv_names()


def test_idempotent_create_and_conflicts(csi: CsiClient, name: str) -> None:
    first = create(csi, name, 8 * MiB)
    again = create(csi, name, 8 * MiB)
    assert again.volume_id == first.volume_id and again.capacity_bytes == first.capacity_bytes
    expect_error(
        Code.ALREADY_EXISTS, csi.controller.CreateVolume, create_request(name, 64 * MiB), "outside"
    )
    expect_error(
        Code.ALREADY_EXISTS,
        csi.controller.CreateVolume,
        create_request(name, 8 * MiB, "thick"),
        "device class thin",
    )
    delete(csi, first.volume_id)
    delete(csi, first.volume_id)  # idempotent


def test_concurrent_duplicates_make_one_lv(csi: CsiClient, vg: LoopVolumeGroup, name: str) -> None:
    results: list[str] = []
    errors: list[grpc.StatusCode] = []

    def call() -> None:
        try:
            results.append(create(csi, name, 8 * MiB).volume_id)
        except grpc.RpcError as error:
            errors.append(error.code())

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results and len(set(results)) == 1
    assert set(errors) <= {Code.ABORTED}
    assert [lv for lv in vg.lv_names() if lv == f"csi-{name}"] == [f"csi-{name}"]
    delete(csi, results[0])


def test_topology_outside_this_node_is_refused(csi: CsiClient, name: str) -> None:
    other = csi_pb2.Topology(segments={TOPOLOGY_KEY: "node-b"})
    ours = csi_pb2.Topology(segments={TOPOLOGY_KEY: NODE_ID})
    for requirement in (
        csi_pb2.TopologyRequirement(requisite=[other]),
        csi_pb2.TopologyRequirement(preferred=[other]),
    ):
        expect_error(
            Code.RESOURCE_EXHAUSTED, csi.controller.CreateVolume,
            create_request(name, accessibility_requirements=requirement), NODE_ID, "node-b",
        )  # fmt: skip
    volume = create(
        csi, name,
        accessibility_requirements=csi_pb2.TopologyRequirement(requisite=[other, ours], preferred=[ours]),
    )  # fmt: skip
    assert [dict(t.segments) for t in volume.accessible_topology] == [{TOPOLOGY_KEY: NODE_ID}]
    delete(csi, volume.volume_id)


def test_capacity_follows_creates_and_deletes(csi: CsiClient, name: str) -> None:
    for device_class in ("thin", "thick"):
        before = capacity(csi, device_class)
        volume = create(csi, f"{name}-{device_class}", 32 * MiB, device_class)
        assert capacity(csi, device_class) == before - 32 * MiB
        delete(csi, volume.volume_id)
        assert capacity(csi, device_class) == before
    # Thin: 2 GiB pool x overprovisionRatio 10, minus what is provisioned.
    assert 19 * GiB < capacity(csi, "thin") <= 20 * GiB
    elsewhere = csi_pb2.Topology(segments={TOPOLOGY_KEY: "node-b"})
    assert capacity(csi, "thin", accessible_topology=elsewhere) == 0
    here = csi_pb2.Topology(segments={TOPOLOGY_KEY: NODE_ID})
    response = csi.controller.GetCapacity(
        csi_pb2.GetCapacityRequest(parameters={"deviceClass": "thick"}, accessible_topology=here)
    )
    assert response.minimum_volume_size.value == 4 * MiB
    assert response.maximum_volume_size.value == response.available_capacity > 0


def test_size_limits(csi: CsiClient, name: str) -> None:
    too_big = create_request(name, 64 * GiB)
    expect_error(Code.RESOURCE_EXHAUSTED, csi.controller.CreateVolume, too_big, "thin", "available")
    expect_error(
        Code.RESOURCE_EXHAUSTED,
        csi.controller.CreateVolume,
        create_request(name, 64 * GiB, "thick"),
        "thick",
    )
    unmeetable = create_request(name)
    unmeetable.capacity_range.CopyFrom(
        csi_pb2.CapacityRange(required_bytes=5 * MiB, limit_bytes=7 * MiB)
    )
    expect_error(Code.OUT_OF_RANGE, csi.controller.CreateVolume, unmeetable, "extents")
    limited = create_request(name)
    limited.capacity_range.CopyFrom(csi_pb2.CapacityRange(limit_bytes=10 * MiB))
    volume = csi.controller.CreateVolume(limited).volume
    assert volume.capacity_bytes == 8 * MiB
    delete(csi, volume.volume_id)


def test_bad_requests_say_what_to_fix(csi: CsiClient, name: str) -> None:
    expect_error(
        Code.INVALID_ARGUMENT, csi.controller.CreateVolume, create_request(""), "name is required"
    )
    expect_error(
        Code.INVALID_ARGUMENT,
        csi.controller.CreateVolume,
        create_request(name, device_class="gold"),
        "'gold'",
        "thin, thick",
    )
    expect_error(
        Code.INVALID_ARGUMENT,
        csi.controller.CreateVolume,
        create_request(name, parameters={"fsType": "xfs"}),
        "'fsType'",
    )
    multi = create_request(
        name,
        capability=mount_capability(
            mode=csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER
        ),
    )
    expect_error(
        Code.INVALID_ARGUMENT, csi.controller.CreateVolume, multi, "MULTI_NODE_MULTI_WRITER"
    )
    no_caps = create_request(name)
    del no_caps.volume_capabilities[:]
    expect_error(Code.INVALID_ARGUMENT, csi.controller.CreateVolume, no_caps, "volume_capabilities")
    expect_error(
        Code.INVALID_ARGUMENT,
        csi.controller.DeleteVolume,
        csi_pb2.DeleteVolumeRequest(),
        "volume_id",
    )


def test_ids_of_other_nodes_are_never_reported_gone(csi: CsiClient) -> None:
    foreign = "node-b:thin:csi-pvc-1"
    expect_error(
        Code.FAILED_PRECONDITION,
        csi.controller.DeleteVolume,
        csi_pb2.DeleteVolumeRequest(volume_id=foreign),
        "node-b",
    )
    expect_error(
        Code.FAILED_PRECONDITION,
        csi.controller.ControllerGetVolume,
        csi_pb2.ControllerGetVolumeRequest(volume_id=foreign),
        "node-b",
    )
    # A class this node's config lacks (retired) is looked for by the LV's
    # tags; none is there, so the volume is gone.
    unknown_class = f"{NODE_ID}:gold:csi-pvc-1"
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=unknown_class))
    expect_error(
        Code.FAILED_PRECONDITION,
        csi.controller.ControllerGetVolume,
        csi_pb2.ControllerGetVolumeRequest(volume_id=unknown_class),
        "gold",
    )


def test_hand_made_lvs_are_never_touched(csi: CsiClient, vg: LoopVolumeGroup) -> None:
    vg.lvcreate("-L", "8M", "-n", "csi-handmade", vg.name)
    vg.lvcreate("-V", "8M", "-T", f"{vg.name}/{vg.pool}", "-n", "csi-handmade-thin")
    before = vg.lv_names()
    for volume_id in (f"{NODE_ID}:thick:{HANDMADE_LV}", f"{NODE_ID}:thick:csi-handmade",
                      f"{NODE_ID}:thin:csi-handmade-thin", f"{NODE_ID}:thin:../{HANDMADE_LV}"):  # fmt: skip
        delete(csi, volume_id)  # answers "no such volume": nothing of ours is there
        expect_error(
            Code.NOT_FOUND,
            csi.controller.ControllerGetVolume,
            csi_pb2.ControllerGetVolumeRequest(volume_id=volume_id),
        )
        expect_error(
            Code.NOT_FOUND, csi.controller.ValidateVolumeCapabilities,
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=volume_id, volume_capabilities=[mount_capability()]),
        )  # fmt: skip
    expect_error(
        Code.ALREADY_EXISTS,
        csi.controller.CreateVolume,
        create_request("handmade", device_class="thick"),
        "does not own",
    )
    listed = csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert not [
        e
        for e in listed.entries
        if "handmade" in e.volume.volume_id or HANDMADE_LV in e.volume.volume_id.split(":")[2]
    ]
    assert vg.lv_names() == before


def test_list_volumes_pages_and_rejects_bad_tokens(csi: CsiClient, name: str) -> None:
    made = [create(csi, f"{name}-{i}", 4 * MiB).volume_id for i in range(3)]
    seen: list[str] = []
    token = ""
    while True:
        page = csi.controller.ListVolumes(
            csi_pb2.ListVolumesRequest(max_entries=2, starting_token=token)
        )
        assert len(page.entries) <= 2
        seen += [e.volume.volume_id for e in page.entries]
        for entry in page.entries:
            assert entry.status.volume_condition.abnormal is False
        token = page.next_token
        if not token:
            break
    assert len(seen) == len(set(seen)) and set(made) <= set(seen)
    expect_error(
        Code.ABORTED,
        csi.controller.ListVolumes,
        csi_pb2.ListVolumesRequest(starting_token="invalid-token"),
    )
    for volume_id in made:
        delete(csi, volume_id)


def test_get_volume_and_validate(csi: CsiClient, name: str) -> None:
    volume = create(csi, name)
    got = csi.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id)
    )
    assert got.volume.volume_id == volume.volume_id
    assert got.status.volume_condition.abnormal is False
    valid = csi.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=volume.volume_id, volume_capabilities=[mount_capability("xfs")]
        )
    )
    assert list(valid.confirmed.volume_capabilities) == [mount_capability("xfs")]
    multi = mount_capability(mode=csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_READER_ONLY)
    refused = csi.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=volume.volume_id, volume_capabilities=[multi]
        )
    )
    assert not refused.HasField("confirmed") and "MULTI_NODE_READER_ONLY" in refused.message
    delete(csi, volume.volume_id)


def test_controller_capabilities(csi: CsiClient) -> None:
    caps = csi.controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())
    kinds = {c.rpc.type for c in caps.capabilities}
    Cap = csi_pb2.ControllerServiceCapability.RPC
    assert {Cap.CREATE_DELETE_VOLUME, Cap.LIST_VOLUMES, Cap.GET_CAPACITY, Cap.GET_VOLUME,
            Cap.VOLUME_CONDITION} <= kinds  # fmt: skip
    assert Cap.PUBLISH_UNPUBLISH_VOLUME not in kinds
