"""Volumes made from a snapshot or volume that another node holds: the
target's plugin reads it from the holder's over mutual TLS, thin stays thin,
a cut copy goes on from where it stopped, damaged data is never handed out,
only plugins may read, and neither side deletes what a copy still needs.

Two nodes on one machine: node-a, the holder, is a plugin built in this
process (``wiring.build`` and ``Server``, as ``csi-lvm serve`` does), so that
a test can damage what it sends; node-b, the target, is ``csi-lvm serve`` as
a child process. Each has a volume group of its own with the classes
``thin`` and ``thick``. Node-b reaches node-a through a TCP relay in this
process that can cut or slow the connection (the TLS session passes through
it untouched)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from csi_lvm import peer_source
from csi_lvm.config import load_config
from csi_lvm.csi import csi_pb2
from csi_lvm.ids import Kind, Tag, decode_tags, lv_name_for
from csi_lvm.metrics import REGISTRY
from csi_lvm.peer import peer_pb2, peer_pb2_grpc
from csi_lvm.peers import StaticPeers
from csi_lvm.server import Server
from csi_lvm.tls import PLUGIN_SERVER_NAME, TlsFiles, server_credentials
from csi_lvm.wiring import Options, build
from tests.lvm.helpers import MiB, block_capability, create, expect_error, lv_tags
from tests.lvm.test_snapshot_metadata import delete_snapshot, device, snapshot, write
from tests.testbed import (
    DRIVER_NAME,
    CsiClient,
    Driver,
    LoopVolumeGroup,
    authority,
    free_port,
    issue,
    write_config,
)

Code = grpc.StatusCode
ROOT = Path(__file__).resolve().parents[2]
CHUNK = 64 * 1024


class Relay:
    """A TCP relay to ``upstream``: passes bytes through, or cuts the
    connections once ``cut_after`` more bytes came from upstream (set it, and
    the count starts), or holds the upstream side to ``rate`` bytes a second."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.cut_after: int | None = None
        self.rate: float | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, from_upstream: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_upstream and self.cut_after is not None:
                    # What upstream may still send, on any connection, from
                    # the moment the cut was set.
                    self.cut_after -= len(data)
                    if self.cut_after < 0:
                        break
                if from_upstream and self.rate:
                    time.sleep(len(data) / self.rate)
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self.listener.close()


class Nodes:
    def __init__(self, root: Path, a: CsiClient, vg_a: LoopVolumeGroup, b: CsiClient,
                 vg_b: LoopVolumeGroup, driver_b: Driver, relay: Relay, port_a: int) -> None:  # fmt: skip
        self.root, self.a, self.vg_a, self.b, self.vg_b = root, a, vg_a, b, vg_b
        self.driver_b, self.relay, self.port_a = driver_b, relay, port_a

    def direct(self, tls: str) -> peer_pb2_grpc.VolumeSourceStub:
        """node-a's VolumeSource, reached with the certificate in ``tls``."""
        files = self.root / tls
        credentials = grpc.ssl_channel_credentials(
            (files / "ca.crt").read_bytes(),
            (files / "tls.key").read_bytes(),
            (files / "tls.crt").read_bytes(),
        )
        channel = grpc.secure_channel(
            f"127.0.0.1:{self.port_a}",
            credentials,
            options=[("grpc.ssl_target_name_override", PLUGIN_SERVER_NAME)],
        )
        return peer_pb2_grpc.VolumeSourceStub(channel)


@pytest.fixture(scope="module")
def nodes(workdir: Path) -> Iterator[Nodes]:
    root = workdir / "across"
    root.mkdir()
    ca = authority(root / "ca", "csi-lvm-test")
    plugin = issue(root / "tls-plugin", ca, PLUGIN_SERVER_NAME, dns=PLUGIN_SERVER_NAME)
    issue(root / "tls-forwarder", ca, "csi-lvm-forwarder", dns="csi-lvm-forwarder")
    pid = os.getpid()
    vg_a = LoopVolumeGroup(root, name=f"nodea{pid}", size="2G", pool_size="1G").create()
    vg_b = LoopVolumeGroup(root, name=f"nodeb{pid}", size="2G", pool_size="1G").create()
    port_a, port_b = free_port(), free_port()
    relay = Relay(port_a)
    peers_a, peers_b = root / "peers-a", root / "peers-b"
    peers_a.write_text(f"node-a 127.0.0.1:{port_a}\nnode-b 127.0.0.1:{port_b}\n")
    peers_b.write_text(f"node-a 127.0.0.1:{relay.port}\nnode-b 127.0.0.1:{port_b}\n")

    state_a = root / "a"
    state_a.mkdir()
    options = Options(node_id="node-a", driver_name=DRIVER_NAME, state_dir=str(state_a),
                      refresh_seconds=2.0)  # fmt: skip
    config_a = load_config(str(write_config(root / "config-a.yaml", vg_a.name, vg_a.pool)))
    graph = build(config_a, options, peers=(StaticPeers(str(peers_a)), TlsFiles(plugin)))
    server_a = Server(
        f"unix://{state_a}/csi.sock", graph.identity, graph.controller, graph.node,
        graph.snapshot_metadata,
        tls_listener=(f"127.0.0.1:{port_a}", server_credentials(TlsFiles(plugin))),
        volume_source=graph.volume_source,
    )  # fmt: skip
    server_a.start()
    stop = threading.Event()
    threading.Thread(target=graph.inventory.keep_fresh, args=(stop,), daemon=True).start()

    node_b = root / "b"
    node_b.mkdir()
    driver_b = Driver(
        node_b, write_config(root / "config-b.yaml", vg_b.name, vg_b.pool),
        "--node-id", "node-b", "--peer-listen", f"127.0.0.1:{port_b}", "--tls-dir", str(plugin),
        "--peers-file", str(peers_b), "--copy-checkpoint-mib", "4", "--no-lvm-shell",
        "--refresh-interval", "2", "--log-level", "debug",
    )  # fmt: skip
    b = driver_b.start()
    a = CsiClient(f"{state_a}/csi.sock")
    try:
        yield Nodes(root, a, vg_a, b, vg_b, driver_b, relay, port_a)
    finally:
        a.close()
        b.close()
        stopped = driver_b.stop()
        # The target's log, where the host sees it after the VM.
        shutil.copy(driver_b.log_path, ROOT / "build" / "vm" / "across-node-b.log")
        assert stopped == 0
        stop.set()
        server_a.stop(5)
        graph.close()
        relay.close()
        vg_a.destroy()
        vg_b.destroy()


def lv_of(object_id: str) -> str:
    return object_id.rsplit(":", 1)[-1]


def read(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def digest(path: str, length: int) -> str:
    hashed = hashlib.sha256()
    with open(path, "rb") as device:
        left = length
        while left:
            block = device.read(min(left, 4 * MiB))
            hashed.update(block)
            left -= len(block)
    return hashed.hexdigest()


def sent() -> float:
    return REGISTRY.get_sample_value("csi_lvm_peer_copy_bytes_total", {"direction": "sent"}) or 0


def restore_request(name: str, size: int, source: str, device_class: str = "thin",
                    volume: bool = False) -> csi_pb2.CreateVolumeRequest:  # fmt: skip
    content = csi_pb2.VolumeContentSource()
    if volume:
        content.volume.volume_id = source
    else:
        content.snapshot.snapshot_id = source
    return csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[block_capability()], parameters={"deviceClass": device_class},
        volume_content_source=content,
    )  # fmt: skip


def lvs(vg: LoopVolumeGroup) -> list[str]:
    out = subprocess.run(["lvs", "--noheadings", "-o", "lv_name", vg.name],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return out.split()


def mapped_bytes(vg: LoopVolumeGroup, object_id: str) -> int:
    """What the thin pool maps for the LV (its data_percent of its size)."""
    out = subprocess.run(
        ["lvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "lv_size,data_percent",
         f"{vg.name}/{lv_of(object_id)}"], capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return int(float(out[0]) * float(out[1]) / 100)


def written_source(nodes: Nodes, name: str, size: int, spans: list[tuple[int, int]],
                   device_class: str = "thin") -> str:  # fmt: skip
    """A block volume on node-a with random data in ``spans``; its id."""
    volume = create(nodes.a, name, size, device_class, capability=block_capability()).volume_id
    for offset, length in spans:
        write(device(nodes.vg_a, volume), offset, os.urandom(length))
    return volume


def test_a_thin_snapshot_restores_on_another_node_and_stays_thin(nodes: Nodes, name: str) -> None:
    spans = [(0, 4096), (5 * MiB, CHUNK), (40 * MiB, 4096)]
    volume = written_source(nodes, name, 64 * MiB, spans)
    snap = snapshot(nodes.a, f"{name}-snap", volume)
    before = sent()
    restored = nodes.b.controller.CreateVolume(
        restore_request(f"{name}-restored", 128 * MiB, snap)
    ).volume
    assert restored.volume_id.startswith("node-b:thin:")
    assert restored.capacity_bytes == 128 * MiB
    assert restored.content_source.snapshot.snapshot_id == snap
    # Exactly the snapshot's allocated chunks crossed; the target maps them alone.
    assert sent() - before == 3 * CHUNK
    assert mapped_bytes(nodes.vg_b, restored.volume_id) <= 4 * CHUNK
    target = device(nodes.vg_b, restored.volume_id)
    source = device(nodes.vg_a, volume)
    for offset, length in spans:
        assert read(target, offset, length) == read(source, offset, length)
    assert read(target, 64 * MiB, MiB) == bytes(MiB)
    tags = lv_tags(nodes.vg_b.name, lv_of(restored.volume_id))
    assert "csi-lvm/copying" not in tags and not any("copied=" in t for t in tags)
    # A repeat answers from the volume made, and the holder let go of its source.
    again = nodes.b.controller.CreateVolume(restore_request(f"{name}-restored", 128 * MiB, snap))
    assert again.volume.volume_id == restored.volume_id
    delete_snapshot(nodes.a, snap)


def test_a_volume_clones_on_another_node_from_one_point_in_time(nodes: Nodes, name: str) -> None:
    volume = written_source(nodes, name, 32 * MiB, [(0, 8 * MiB)])
    source = device(nodes.vg_a, volume)
    expected = digest(source, 32 * MiB)
    clone = nodes.b.controller.CreateVolume(
        restore_request(f"{name}-clone", 32 * MiB, volume, volume=True)
    ).volume
    assert digest(device(nodes.vg_b, clone.volume_id), 32 * MiB) == expected
    # The view the copy read is gone with the copy.
    assert not [lv for lv in lvs(nodes.vg_a) if lv.endswith(".view")]


def test_a_thick_restore_across_nodes_reads_zeros_past_its_source(nodes: Nodes, name: str) -> None:
    # Extents an earlier tenant filled on node-b: the restore must not show them.
    old = create(nodes.b, f"{name}-old", 32 * MiB, "thick", capability=block_capability())
    write(device(nodes.vg_b, old.volume_id), 0, b"\xff" * (32 * MiB))
    nodes.b.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=old.volume_id))
    volume = written_source(nodes, name, 16 * MiB, [(MiB, MiB)], device_class="thick")
    snap = snapshot(nodes.a, f"{name}-snap", volume)
    before = sent()
    restored = nodes.b.controller.CreateVolume(
        restore_request(f"{name}-restored", 32 * MiB, snap, device_class="thick")
    ).volume
    assert sent() - before == 16 * MiB  # a thick source is sent whole
    target = device(nodes.vg_b, restored.volume_id)
    assert digest(target, 16 * MiB) == digest(device(nodes.vg_a, volume), 16 * MiB)
    assert read(target, 16 * MiB, 16 * MiB) == bytes(16 * MiB)
    # A thin class here cannot take a thick source.
    expect_error(Code.INVALID_ARGUMENT, nodes.b.controller.CreateVolume,
                 restore_request(f"{name}-wrong", 32 * MiB, snap, device_class="thin"),
                 "device class thick")  # fmt: skip


def create_until_done(nodes: Nodes, request: csi_pb2.CreateVolumeRequest) -> csi_pb2.Volume:
    """CreateVolume again while it answers UNAVAILABLE, as the provisioner does."""
    for _ in range(30):
        try:
            return nodes.b.controller.CreateVolume(request).volume
        except grpc.RpcError as error:
            if error.code() is not Code.UNAVAILABLE:
                raise
            time.sleep(1)
    raise AssertionError("CreateVolume never completed")


def test_a_cut_copy_goes_on_from_where_it_stopped(nodes: Nodes, name: str) -> None:
    volume = written_source(nodes, name, 64 * MiB, [(0, 48 * MiB)])
    snap = snapshot(nodes.a, f"{name}-snap", volume)
    request = restore_request(f"{name}-restored", 64 * MiB, snap)
    nodes.relay.cut_after = 24 * MiB
    try:
        before = sent()
        expect_error(Code.UNAVAILABLE, nodes.b.controller.CreateVolume, request,
                     "goes on from where it stopped")  # fmt: skip
        first = sent() - before
    finally:
        nodes.relay.cut_after = None
    tags = lv_tags(nodes.vg_b.name, lv_name_for(Kind.VOLUME, f"{name}-restored"))
    assert "csi-lvm/copying" in tags
    recorded = next(int(t.split("=")[1]) for t in tags if t.startswith("csi-lvm/copied="))
    assert 0 < recorded < 48 * MiB
    assert any(t.startswith("csi-lvm/copy-point=") for t in tags), tags
    # The admin sees the copy, how far it is, and from where.
    listing = subprocess.run(
        [sys.executable, "-m", "csi_lvm.cli", "status", "--json",
         "--config", str(nodes.driver_b.config)],
        capture_output=True, text=True, check=True, env={**os.environ, "KUBECONFIG": "/nonexistent"},
    ).stdout  # fmt: skip
    shown = next(o for c in json.loads(listing) for o in c["objects"]
                 if o["lv"].endswith(lv_name_for(Kind.VOLUME, f"{name}-restored")))  # fmt: skip
    assert shown["copied_bytes"] == recorded and shown["source"] == snap, shown
    assert shown["abnormal"] and "not complete" in shown["condition"]
    time.sleep(1)  # the holder's cut stream has stopped counting
    before = sent()
    restored = create_until_done(nodes, request)
    second = sent() - before
    # Never from zero: what was recorded is not sent again.
    assert second <= 48 * MiB - recorded + CHUNK, (first, recorded, second)
    target = device(nodes.vg_b, restored.volume_id)
    assert digest(target, 64 * MiB) == digest(device(nodes.vg_a, volume), 64 * MiB)
    log = nodes.driver_b.log_path.read_text()
    assert "copy from another node: resuming" in log


def test_a_resumed_clone_whose_view_was_lost_starts_again(nodes: Nodes, name: str) -> None:
    volume = written_source(nodes, name, 64 * MiB, [(0, 48 * MiB)])
    request = restore_request(f"{name}-clone", 64 * MiB, volume, volume=True)
    nodes.relay.cut_after = 24 * MiB
    try:
        expect_error(Code.UNAVAILABLE, nodes.b.controller.CreateVolume, request)
    finally:
        nodes.relay.cut_after = None
    # The holder loses the view the copy began from (an admin removed it).
    (view,) = [lv for lv in lvs(nodes.vg_a) if lv.endswith(".view")]
    subprocess.run(["lvremove", "-q", "-y", f"{nodes.vg_a.name}/{view}"], check=True)
    expect_error(Code.FAILED_PRECONDITION, nodes.b.controller.CreateVolume, request,
                 "began from another point in time", "starts again")  # fmt: skip
    assert lv_name_for(Kind.VOLUME, f"{name}-clone") not in lvs(nodes.vg_b)
    clone = create_until_done(nodes, request)
    source = device(nodes.vg_a, volume)
    assert digest(device(nodes.vg_b, clone.volume_id), 64 * MiB) == digest(source, 64 * MiB)


class Damaging:
    """zlib, with the second checksum it gives wrong: a piece damaged on the way."""

    def __init__(self) -> None:
        self.calls = 0

    def crc32(self, data: bytes) -> int:
        self.calls += 1
        return zlib.crc32(data) ^ (1 if self.calls == 2 else 0)


def test_a_damaged_piece_discards_the_target(
    nodes: Nodes, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three pieces: the second arrives damaged, after the first was written.
    volume = written_source(nodes, name, 16 * MiB, [(0, 12 * MiB)])
    snap = snapshot(nodes.a, f"{name}-snap", volume)
    monkeypatch.setattr(peer_source, "zlib", Damaging())
    expect_error(Code.DATA_LOSS, nodes.b.controller.CreateVolume,
                 restore_request(f"{name}-restored", 16 * MiB, snap),
                 "arrived damaged", "discarded")  # fmt: skip
    assert lv_name_for(Kind.VOLUME, f"{name}-restored") not in lvs(nodes.vg_b)
    monkeypatch.undo()
    restored = nodes.b.controller.CreateVolume(restore_request(f"{name}-restored", 16 * MiB, snap))
    assert read(device(nodes.vg_b, restored.volume.volume_id), 0, 12 * MiB) == read(
        device(nodes.vg_a, volume), 0, 12 * MiB
    )


def test_only_plugins_read_and_a_source_in_a_copy_is_kept(nodes: Nodes, name: str) -> None:
    volume = written_source(nodes, name, 16 * MiB, [(0, 4096)])
    snap = snapshot(nodes.a, f"{name}-snap", volume)
    target = f"node-b:thin:{lv_name_for(Kind.VOLUME, f'{name}-target')}"
    describe = peer_pb2.DescribeRequest(source_id=snap, target_id=target)
    expect_error(Code.PERMISSION_DENIED, nodes.direct("tls-forwarder").Describe, describe,
                 "only csi-lvm plugins")  # fmt: skip
    plugin = nodes.direct("tls-plugin")
    assert plugin.Describe(describe).capacity_bytes == 16 * MiB
    # The copy has begun: its source is not deleted under it, nor its volume.
    expect_error(Code.FAILED_PRECONDITION, nodes.a.controller.DeleteSnapshot,
                 csi_pb2.DeleteSnapshotRequest(snapshot_id=snap), "being copied to another node",
                 target)  # fmt: skip
    plugin.Release(peer_pb2.ReleaseRequest(source_id=snap, target_id=target))
    delete_snapshot(nodes.a, snap)


def test_deleting_the_target_stops_its_copy(nodes: Nodes, name: str) -> None:
    volume = written_source(nodes, name, 64 * MiB, [(0, 48 * MiB)])
    request = restore_request(f"{name}-clone", 64 * MiB, volume, volume=True)
    nodes.relay.rate = 2 * MiB  # 24 s of copy: time for the delete to get in
    try:
        with ThreadPoolExecutor(1) as pool:
            copying = pool.submit(nodes.b.controller.CreateVolume, request)
            lv = lv_name_for(Kind.VOLUME, f"{name}-clone")
            deadline = time.monotonic() + 60
            while lv not in lvs(nodes.vg_b):
                assert time.monotonic() < deadline, "the target never appeared"
                time.sleep(0.2)
            volume_id = f"node-b:thin:{lv}"
            # ABORTED until the copy has begun, as the provisioner sees it; a
            # slow machine may take a while to begin (LVM commands, Describe).
            deadline = time.monotonic() + 120
            while True:
                try:
                    nodes.b.controller.DeleteVolume(
                        csi_pb2.DeleteVolumeRequest(volume_id=volume_id)
                    )
                    break
                except grpc.RpcError as error:
                    assert error.code() is Code.ABORTED, error.details()
                    assert not copying.done(), "the copy ended before the delete got in"
                    assert time.monotonic() < deadline, "DeleteVolume stayed ABORTED"
                    time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as caught:
                copying.result(timeout=60)
            assert caught.value.code() is Code.ABORTED, caught.value.details()
            assert "deleted during its copy" in caught.value.details()
    finally:
        nodes.relay.rate = None
    assert lv not in lvs(nodes.vg_b)
    # The holder was told: its view is gone and the volume may go.
    assert not [each for each in lvs(nodes.vg_a) if each.endswith(".view")]
    nodes.a.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume))


def test_without_copies_across_nodes_the_node_that_holds_the_source_is_named(
    nodes: Nodes, name: str, workdir: Path
) -> None:
    volume = written_source(nodes, name, 16 * MiB, [(0, 4096)])
    snap = snapshot(nodes.a, f"{name}-snap", volume)
    node_c = workdir / "across" / "c"
    node_c.mkdir()
    driver = Driver(node_c, nodes.driver_b.config, "--node-id", "node-b",
                    "--copies-across-nodes", "off", "--no-lvm-shell")  # fmt: skip
    client = driver.start()
    try:
        expect_error(Code.RESOURCE_EXHAUSTED, client.controller.CreateVolume,
                     restore_request(f"{name}-restored", 16 * MiB, snap),
                     "is held by node node-a")  # fmt: skip
    finally:
        client.close()
        assert driver.stop() == 0
    delete_snapshot(nodes.a, snap)


def test_a_modification_sent_to_any_node_is_made_where_the_volume_is(
    nodes: Nodes, name: str
) -> None:
    # The cluster's one resizer calls the plugin beside it, whatever node the
    # volume is on: node-a passes node-b's volume on to node-b.
    volume = create(nodes.b, name, 16 * MiB, "thin")
    nodes.a.controller.ControllerModifyVolume(
        csi_pb2.ControllerModifyVolumeRequest(
            volume_id=volume.volume_id, mutable_parameters={"writeIOPS": "300"}
        )
    )
    tags = decode_tags(lv_tags(nodes.vg_b.name, lv_of(volume.volume_id)))
    assert tags.get(Tag.IO_LIMITS) == "wiops=300"
    # node-b's refusal comes back as it was given.
    expect_error(
        Code.INVALID_ARGUMENT, nodes.a.controller.ControllerModifyVolume,
        csi_pb2.ControllerModifyVolumeRequest(
            volume_id=volume.volume_id, mutable_parameters={"bogus": "1"}),
        "bogus cannot be set on a volume of device class thin",
    )  # fmt: skip
    nodes.b.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
