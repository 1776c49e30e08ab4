"""``csi-lvm serve`` refuses to start on a bad config, naming the line, and
serves on a node that lacks a class's storage.

These run the real command against this machine's LVM, which can read
metadata without device-mapper: a volume group that does not exist is
reported the same here as on a node."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from csi_lvm.csi import csi_pb2
from tests.testbed import NODE_ID, Driver


def serve(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "csi_lvm.cli", "serve", "--endpoint", f"unix://{config.parent}/csi.sock",
         "--config", str(config), "--node-id", "n1", *extra],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_a_node_without_a_class_s_volume_group_keeps_serving(tmp_path: Path) -> None:
    # One config serves every node; this one lacks the class's VG. The plugin
    # must still run (the kubelet needs it to unmount), say what is missing,
    # offer no capacity and refuse creates in a way that reschedules.
    config = tmp_path / "config.yaml"
    config.write_text(
        "deviceClasses:\n  - name: thin\n    volumeGroup: csi-lvm-no-such-vg\n    thinPool: pool0\n"
    )
    driver = Driver(tmp_path, config)
    csi = driver.start()
    try:
        assert csi.identity.Probe(csi_pb2.ProbeRequest(), timeout=5).ready.value
        capacity = csi.controller.GetCapacity(csi_pb2.GetCapacityRequest(), timeout=30)
        assert capacity.available_capacity == 0
        mount = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1),
        )
        with pytest.raises(grpc.RpcError) as refused:
            csi.controller.CreateVolume(
                csi_pb2.CreateVolumeRequest(name="pvc-1", volume_capabilities=[mount]), timeout=30
            )
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"node {NODE_ID}" in str(refused.value.details())
        assert f"{config} line 3" in str(refused.value.details())
        # Teardown needs no LV: nothing of ours mounted at the path is done.
        target = tmp_path / "target"
        target.mkdir()
        csi.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=f"{NODE_ID}:thin:csi-pvc-1", target_path=str(target)
            ),
            timeout=30,
        )
        assert target.is_dir()  # not shown to be a publication of this volume: left alone
    finally:
        csi.close()
        assert driver.stop() == 0
    log = driver.log_path.read_text()
    assert "device class unavailable" in log and "csi-lvm-no-such-vg" in log


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("deviceClasses:\n  - name: a\n   volumeGroup: vg0\n", "line 3"),
        ("deviceClasses: 7\n", "line 1"),
        # Two entries of a class for node n1 (serve's --node-id here).
        (
            "deviceClasses:\n  - name: a\n    volumeGroup: vg0\n    nodes: [n*]\n"
            "  - name: a\n    volumeGroup: vg1\n    nodes: [n1]\n",
            "lines 2 and 5: node n1 matches two entries of device class 'a'",
        ),
    ],
)
def test_malformed_config_stops_start_up(tmp_path: Path, text: str, line: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    done = serve(config)
    assert done.returncode == 2 and line in done.stderr


def test_bad_flags_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("deviceClasses:\n  - name: a\n    volumeGroup: vg0\n")
    assert "--driver-name" in serve(config, "--driver-name", "Not A Name").stderr
    assert "--topology-key" in serve(config, "--topology-key", "bad key/x/y").stderr
    hostname = serve(config, "--topology-key", "kubernetes.io/hostname")
    assert hostname.returncode == 2 and "a label the kubelet sets itself" in hostname.stderr
    assert "unix socket" in serve(config, "--endpoint", "tcp://0:1").stderr


def test_doctor_reports_device_mapper_as_this_kernel_has_it(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("deviceClasses:\n  - name: a\n    volumeGroup: csi-lvm-no-such-vg\n")
    done = subprocess.run(
        [sys.executable, "-m", "csi_lvm.cli", "doctor", "--config", str(config),
         "--endpoint", f"unix://{tmp_path}/csi.sock"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1  # the volume group is missing on any machine
    has_device_mapper = "device-mapper" in Path("/proc/misc").read_text()
    if has_device_mapper:
        assert "ok   kernel device-mapper" in done.stdout
    else:
        assert "FAIL kernel device-mapper: this kernel has no device-mapper" in done.stdout
    assert "'csi-lvm-no-such-vg' of device class a does not exist on node" in done.stdout
    assert f"({config} line 3): create it, or fix the config" in done.stdout
    assert f"ok   socket directory {tmp_path}" in done.stdout
    assert "ok   LVM tools" in done.stdout


def test_doctor_fails_the_config_when_two_entries_of_a_class_match_the_node(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "deviceClasses:\n  - name: a\n    volumeGroup: vg0\n    nodes: [n*]\n"
        "  - name: a\n    volumeGroup: vg1\n    nodes: [n1]\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "csi_lvm.cli", "doctor", "--config", str(config),
         "--node-id", "n1", "--endpoint", f"unix://{tmp_path}/csi.sock"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"FAIL config: {config} lines 2 and 5: node n1 matches two entries" in done.stdout
    assert "device class a" not in done.stdout
