"""The ``csi-lvm serve`` process: socket, start-up checks, signals, logs."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time
from pathlib import Path

from csi_lvm.csi import csi_pb2
from tests.testbed import CsiClient, Driver, LoopVolumeGroup, write_config


def test_socket_is_private_and_logs_are_json(driver: Driver, csi: CsiClient) -> None:
    mode = stat.S_IMODE(os.stat(driver.socket).st_mode)
    assert mode & 0o002 == 0, oct(mode)  # never world-writable
    csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())  # logged (not a poll)
    csi.identity.Probe(csi_pb2.ProbeRequest())  # a poll that succeeds: at debug only
    time.sleep(0.2)
    lines = [
        json.loads(line)
        for line in driver.log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    rpcs = [line for line in lines if line.get("event") == "rpc"]
    assert rpcs, "no rpc log lines"
    assert {"method", "code", "ms", "timestamp"} <= set(rpcs[-1])
    assert rpcs[-1]["method"] == "ListVolumes"


def test_a_missing_thin_pool_is_reported_and_the_driver_serves_on(
    workdir: Path, vg: LoopVolumeGroup
) -> None:
    # (A missing volume group is tested on the host, in tests/unit/test_cli.py.)
    home = workdir / "nopool"
    home.mkdir()
    config = home / "config.yaml"
    config.write_text(
        f"deviceClasses:\n  - name: ok\n    volumeGroup: {vg.name}\n    thinPool: nopool\n"
    )
    driver = Driver(home, config)
    client = driver.start()
    try:
        assert client.identity.Probe(csi_pb2.ProbeRequest()).ready.value
        capacity = client.controller.GetCapacity(csi_pb2.GetCapacityRequest())
        assert capacity.available_capacity == 0
    finally:
        client.close()
        assert driver.stop() == 0
    log = driver.log_path.read_text()
    assert "device class unavailable" in log and "'nopool'" in log and "line 4" in log


def test_stale_socket_is_replaced_and_sigterm_stops_cleanly(
    workdir: Path, vg: LoopVolumeGroup
) -> None:
    home = workdir / "second"
    home.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(home / "csi.sock"))
    stale.close()  # leaves the socket file behind, as a crashed driver would
    second = Driver(home, write_config(home / "config.yaml", vg.name, vg.pool))
    client = second.start()
    assert client.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    client.close()
    assert second.stop(signal.SIGTERM) == 0
    assert not os.path.exists(second.socket)


def test_lvm_runs_in_one_long_lived_shell(driver: Driver) -> None:
    # On a node with lvm2 installed the driver feeds its commands to one `lvm`
    # shell; a fallback to a process per command would cost every call a
    # process start and LVM's initialisation (issue 7).
    lines = [
        json.loads(line)
        for line in driver.log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    events = [line.get("event") for line in lines]
    unavailable = [line for line in lines if line.get("event", "").startswith("lvm shell unav")]
    assert not unavailable, unavailable[0]
    assert "lvm shell started" in events
