"""The cluster path of changed block tracking: one forwarder, as the
cluster-wide sidecar's CSI socket, relays each SnapshotMetadata call to the
plugin of the snapshot's node over mutual TLS, answers and statuses as the
node gave them; the node's TLS port takes only certificates of the driver's
authority and serves nothing but SnapshotMetadata.

The node here is a second ``csi-lvm serve`` on the session's volume group,
listening with TLS (the session driver makes the snapshots; this one only
reads them); the forwarder runs in this process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_lvm.csi import csi_pb2, csi_pb2_grpc
from csi_lvm.peers import StaticPeers
from csi_lvm.server import Server
from csi_lvm.tls import PLUGIN_SERVER_NAME, TlsFiles
from csi_lvm.wiring import build_forwarder
from tests.lvm.helpers import MiB, block_capability, create, delete
from tests.lvm.test_snapshot_metadata import (
    chunks,
    delete_snapshot,
    device,
    snapshot,
    write,
)
from tests.testbed import (
    DRIVER_NAME,
    NODE_ID,
    CsiClient,
    Driver,
    LoopVolumeGroup,
    authority,
    free_port,
    issue,
)

Code = grpc.StatusCode


class Cluster:
    def __init__(self, root: Path, node: Driver, port: int, forwarder: Server) -> None:
        self.root, self.node, self.port, self.forwarder = root, node, port, forwarder
        self.channel = grpc.insecure_channel(f"unix://{forwarder.path}")
        self.cbt = csi_pb2_grpc.SnapshotMetadataStub(self.channel)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)

    def direct(self, tls: Path | None) -> grpc.Channel:
        """A channel straight to the node's TLS port, with the files in ``tls``
        as the client's (none: no client certificate)."""
        ca = (self.root / "tls-plugin" / "ca.crt").read_bytes()
        credentials = (
            grpc.ssl_channel_credentials(ca)
            if tls is None
            else grpc.ssl_channel_credentials(
                ca, (tls / "tls.key").read_bytes(), (tls / "tls.crt").read_bytes()
            )
        )
        return grpc.secure_channel(
            f"127.0.0.1:{self.port}",
            credentials,
            options=[("grpc.ssl_target_name_override", PLUGIN_SERVER_NAME)],
        )


@pytest.fixture(scope="module")
def cluster(workdir: Path, driver: Driver) -> Iterator[Cluster]:
    root = workdir / "forwarding"
    ca = authority(root / "ca", "csi-lvm-forwarding-test")
    issue(root / "tls-plugin", ca, "plugin", dns=PLUGIN_SERVER_NAME)
    forwarder_tls = issue(root / "tls-forwarder", ca, "forwarder")
    rogue = authority(root / "rogue-ca", "someone-else")
    issue(root / "tls-rogue", rogue, "rogue")
    port = free_port()
    node_dir = root / "node"
    node_dir.mkdir()
    node = Driver(
        node_dir, driver.config, "--snapshot-metadata-listen", f"127.0.0.1:{port}",
        "--tls-dir", str(root / "tls-plugin"), "--no-lvm-shell",
    )  # fmt: skip
    node.start()
    peers = root / "peers"
    peers.write_text(f"# node address\n{NODE_ID} 127.0.0.1:{port}\n")
    parts = build_forwarder(DRIVER_NAME, StaticPeers(str(peers)), TlsFiles(forwarder_tls))
    forwarder = Server(
        f"unix://{root}/forwarder.sock", parts.identity, None, None, parts.forwarding
    )
    forwarder.start()
    try:
        yield Cluster(root, node, port, forwarder)
    finally:
        parts.close()
        forwarder.stop(5)
        assert node.stop() == 0


def allocated(stub: csi_pb2_grpc.SnapshotMetadataStub, snapshot_id: str) -> list[tuple[int, int]]:
    request = csi_pb2.GetMetadataAllocatedRequest(snapshot_id=snapshot_id)
    return [(b.byte_offset, b.size_bytes) for m in stub.GetMetadataAllocated(request)
            for b in m.block_metadata]  # fmt: skip


def test_calls_reach_the_snapshot_s_node_through_the_forwarder(
    csi: CsiClient, cluster: Cluster, vg: LoopVolumeGroup, name: str
) -> None:
    capabilities = cluster.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    assert [c.service.type for c in capabilities.capabilities] == [
        csi_pb2.PluginCapability.Service.SNAPSHOT_METADATA_SERVICE
    ]
    volume = create(csi, name, 4 * MiB, capability=block_capability()).volume_id
    chunk = 64 * 1024
    write(device(vg, volume), chunk, b"\x09" * 4096)
    base = snapshot(csi, f"{name}-a", volume)
    write(device(vg, volume), 5 * chunk, b"\x0a" * 4096)
    target = snapshot(csi, f"{name}-b", volume)

    direct = csi_pb2_grpc.SnapshotMetadataStub(csi.channel)
    assert allocated(cluster.cbt, target) == allocated(direct, target) == chunks(1, 5, size=chunk)
    request = csi_pb2.GetMetadataDeltaRequest(base_snapshot_id=base, target_snapshot_id=target)
    messages = list(cluster.cbt.GetMetadataDelta(request))
    assert [(b.byte_offset, b.size_bytes) for b in messages[0].block_metadata] == chunks(
        5, size=chunk
    )
    assert messages[0].volume_capacity_bytes == 4 * MiB

    # The node's refusals come back as the node gave them.
    swapped = csi_pb2.GetMetadataDeltaRequest(base_snapshot_id=target, target_snapshot_id=base)
    with pytest.raises(grpc.RpcError) as caught:
        list(cluster.cbt.GetMetadataDelta(swapped))
    assert caught.value.code() == Code.INVALID_ARGUMENT and "taken after" in caught.value.details()
    for snapshot_id, code, fragment in (
        (f"{NODE_ID}:thin:snap-not-made", Code.NOT_FOUND, "does not exist on node"),
        ("elsewhere:thin:snap-x", Code.UNAVAILABLE, "no csi-lvm plugin is known on node elsewhere"),
        ("garbage", Code.NOT_FOUND, "no such id"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            allocated(cluster.cbt, snapshot_id)
        assert caught.value.code() == code, caught.value.details()
        assert fragment in caught.value.details()

    for snapshot_id in (base, target):
        delete_snapshot(csi, snapshot_id)
    delete(csi, volume)


def test_the_node_s_tls_port_takes_only_the_driver_s_certificates(cluster: Cluster) -> None:
    request = csi_pb2.GetMetadataAllocatedRequest(snapshot_id=f"{NODE_ID}:thin:snap-not-made")
    for client in (cluster.root / "tls-rogue", None):
        channel = cluster.direct(client)
        with pytest.raises(grpc.RpcError) as caught:
            list(
                csi_pb2_grpc.SnapshotMetadataStub(channel).GetMetadataAllocated(request, timeout=10)
            )
        assert caught.value.code() == Code.UNAVAILABLE, caught.value.details()
        channel.close()
    # With the driver's own certificate: SnapshotMetadata only.
    channel = cluster.direct(cluster.root / "tls-forwarder")
    with pytest.raises(grpc.RpcError) as caught:
        list(csi_pb2_grpc.SnapshotMetadataStub(channel).GetMetadataAllocated(request, timeout=10))
    assert caught.value.code() == Code.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        csi_pb2_grpc.ControllerStub(channel).ListVolumes(csi_pb2.ListVolumesRequest(), timeout=10)
    assert caught.value.code() == Code.UNIMPLEMENTED
    channel.close()
