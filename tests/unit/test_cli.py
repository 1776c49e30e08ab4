"""``csi-lvm serve`` refuses to start on a bad config, naming the line.

These run the real command against this machine's LVM, which can read
metadata without device-mapper: a volume group that does not exist is
reported the same here as on a node."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def serve(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "csi_lvm.cli", "serve", "--endpoint", f"unix://{config.parent}/csi.sock",
         "--config", str(config), "--node-id", "n1", *extra],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_missing_volume_group_stops_start_up_naming_the_line(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "deviceClasses:\n  - name: thin\n    volumeGroup: csi-lvm-no-such-vg\n    thinPool: pool0\n"
    )
    done = serve(config)
    assert done.returncode == 2
    assert f"{config} line 3" in done.stderr and "'csi-lvm-no-such-vg'" in done.stderr


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("deviceClasses:\n  - name: a\n   volumeGroup: vg0\n", "line 3"),
        ("deviceClasses: 7\n", "line 1"),
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
    assert "'csi-lvm-no-such-vg' is missing: create it or fix line 3" in done.stdout
    assert f"ok   socket directory {tmp_path}" in done.stdout
    assert "ok   LVM tools" in done.stdout
