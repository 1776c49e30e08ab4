"""The forwarder's pure parts: which node a snapshot id sends a call to, and
the plugins' addresses from a peers file or a Kubernetes pod list. (The
forwarding itself, over mutual TLS to a real plugin, is in tests/lvm.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi_lvm.csi import csi_pb2
from csi_lvm.errors import ConfigError, InvalidArgument, NotFound
from csi_lvm.forwarding import _node_of
from csi_lvm.ids import node_component
from csi_lvm.peers import StaticPeers, parse_peers_file, peers_from_pod_list
from csi_lvm.tls import TlsFiles
from tests.testbed import Driver

LONG_NODE = "a-node-name-longer-than-forty-characters.example.internal"


def test_the_snapshot_id_names_the_node() -> None:
    assert _node_of("worker-1:thin:snap-pvc-1", "snapshot_id") == "worker-1"
    hashed = node_component(LONG_NODE)
    assert _node_of(f"{hashed}:thin:snap-x", "snapshot_id") == hashed
    with pytest.raises(InvalidArgument, match="snapshot_id is required"):
        _node_of("", "snapshot_id")
    for text in ("garbage", "worker-1:thin:csi-a-volume-not-a-snapshot"):
        with pytest.raises(NotFound):
            _node_of(text, "snapshot_id")


def test_a_peers_file_names_nodes_as_ids_do(tmp_path: Path) -> None:
    text = f"# node address\nworker-1 10.0.0.1:9811\n{LONG_NODE} [fd00::2]:9811  # long\nbad line x y\n"
    assert parse_peers_file(text) == {
        "worker-1": "10.0.0.1:9811",
        node_component(LONG_NODE): "[fd00::2]:9811",
    }
    path = tmp_path / "peers"
    path.write_text("worker-1 10.0.0.1:9811\n")
    peers = StaticPeers(str(path))
    assert peers.address("worker-1") == "10.0.0.1:9811"
    path.write_text("worker-1 10.0.0.9:9811\n")
    os.utime(path, (1, 1))  # a changed file is read again
    assert peers.address("worker-1") == "10.0.0.9:9811"
    assert peers.address("worker-2") is None


def test_running_plugin_pods_give_each_node_s_address() -> None:
    pods = {
        "items": [
            {"spec": {"nodeName": "worker-1"}, "status": {"phase": "Running", "podIP": "10.1.0.5"}},
            {"spec": {"nodeName": LONG_NODE}, "status": {"phase": "Running", "podIP": "fd00::7"}},
            {"spec": {"nodeName": "worker-3"}, "status": {"phase": "Pending"}},
            {"spec": {}, "status": {"phase": "Running", "podIP": "10.1.0.9"}},
        ]
    }
    assert peers_from_pod_list(pods, 9811) == {
        "worker-1": "10.1.0.5:9811",
        node_component(LONG_NODE): "[fd00::7]:9811",
    }


def test_missing_tls_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    with pytest.raises(ConfigError, match=r"tls\.crt"):
        TlsFiles(tmp_path).read()


def test_a_plugin_without_its_tls_files_starts_without_the_port(tmp_path: Path) -> None:
    """The DaemonSet's Secret is optional: the plugin serves its socket and
    says why the forwarder's port is missing. (On the host: a volume group
    it does not have, so no LVM is touched.)"""
    config = tmp_path / "config.yaml"
    config.write_text(
        f"deviceClasses:\n  - name: thin\n    volumeGroup: absentvg{os.getpid()}\n"
        "    thinPool: pool0\n    default: true\n"
    )
    driver = Driver(
        tmp_path, config, "--snapshot-metadata-listen", "127.0.0.1:0",
        "--tls-dir", str(tmp_path / "no-tls-here"), "--no-lvm-shell",
    )  # fmt: skip
    client = driver.start()
    try:
        client.identity.Probe(csi_pb2.ProbeRequest())
    finally:
        client.close()
        assert driver.stop() == 0
    log = driver.log_path.read_text()
    assert "no TLS port for the forwarder and the other plugins" in log and "no-tls-here" in log
    assert '"copies_across_nodes": false' in log
