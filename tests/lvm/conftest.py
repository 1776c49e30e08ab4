"""Session fixtures for the real-LVM suite: one loop-backed VG with a thin
pool, a hand-made LV the driver must never touch, and one running driver."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lvm.helpers import REFRESH_SECONDS
from tests.testbed import CsiClient, Driver, LoopVolumeGroup, write_config

HANDMADE_LV = "root"  # made by hand: no csi-lvm tags, so untouchable
# A thin pool small enough to fill in a test. It errors when full instead of
# queueing writes for 60 s, so a write that finds it full fails at once.
SMALL_POOL, SMALL_POOL_MIB, SMALL_CLASS = "smallpool", 32, "small"


def metrics_port() -> int:
    """One port per pytest-xdist worker (gw0, gw1, ...), on the VM's loopback."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return 9810 + int(worker.removeprefix("gw") or 0)


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="csi-lvm-test-", dir="/tmp"))
    yield path
    # A failed test may leave mounts behind; never let them fail the others.
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        mount_point = line.split()[4]
        if mount_point.startswith(f"{path}/"):
            subprocess.run(["umount", "-l", mount_point], check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def vg(workdir: Path) -> Iterator[LoopVolumeGroup]:
    group = LoopVolumeGroup(workdir, name=f"csitest{os.getpid()}").create()
    group.lvcreate("-L", "64M", "-n", HANDMADE_LV, group.name)
    group.lvcreate("--type", "thin-pool", "-L", f"{SMALL_POOL_MIB}M", "-n", SMALL_POOL, group.name)
    subprocess.run(
        ["lvchange", "-q", "--errorwhenfull", "y", f"{group.name}/{SMALL_POOL}"], check=True
    )
    try:
        yield group
    finally:
        group.destroy()


@pytest.fixture(scope="session")
def driver(workdir: Path, vg: LoopVolumeGroup) -> Iterator[Driver]:
    config = write_config(workdir / "config.yaml", vg.name, vg.pool)
    with config.open("a") as text:
        text.write(
            f"  - name: {SMALL_CLASS}\n    volumeGroup: {vg.name}\n    thinPool: {SMALL_POOL}\n"
            "    overprovisionRatio: 4\n    fullThresholdPercent: 90\n"
        )
    process = Driver(
        workdir, config, "--metrics-address", f"127.0.0.1:{metrics_port()}",
        "--refresh-interval", str(REFRESH_SECONDS),
    )  # fmt: skip
    process.start()
    try:
        yield process
    finally:
        code = process.stop()
        assert code == 0, f"driver exited with {code}"


@pytest.fixture(scope="session")
def csi(driver: Driver) -> Iterator[CsiClient]:
    client = CsiClient(driver.socket)
    yield client
    client.close()


_names = itertools.count()


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A unique CSI name per test."""
    base = request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")
    return f"{base[:30].strip('-')}-{next(_names)}"
