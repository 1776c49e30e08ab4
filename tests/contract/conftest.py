"""The LVMs the contract runs against: the in-memory model everywhere, and
real LVM on a loop-backed volume group where the kernel has device-mapper
(the VM). ``make lvm-tests`` sets CSI_LVM_REQUIRE_REAL_LVM, so a VM that
lost device-mapper fails instead of quietly testing the model alone."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from csi_lvm.lvm.commands import Lvm
from tests.memory_lvm import MemoryLvm
from tests.testbed import LoopVolumeGroup, load_kernel_modules

MiB = 1 << 20
VG_BYTES, POOL_BYTES = 1024 * MiB, 256 * MiB
POOL = "pool0"


def real_lvm_here() -> bool:
    load_kernel_modules()
    with contextlib.suppress(OSError):
        return "device-mapper" in Path("/proc/misc").read_text()
    return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "subject" in metafunc.fixturenames:
        kinds = ["memory"]
        if real_lvm_here():
            kinds.append("lvm")
        elif os.environ.get("CSI_LVM_REQUIRE_REAL_LVM"):
            raise RuntimeError("the contract must run against real LVM here: no device-mapper")
        metafunc.parametrize("subject", kinds, indirect=True)


@dataclass
class Subject:
    """One LVM under contract: its verbs, a VG with a thin pool, and what a
    tenant does beside the driver (writes, an open device)."""

    lvm: Lvm
    vg: str
    _written: dict[str, int] = field(default_factory=dict)

    def write(self, name: str, nbytes: int) -> None:
        if isinstance(self.lvm, MemoryLvm):
            self.lvm.write(self.vg, name, nbytes)
            return
        lv = self.lvm.find_lv(self.vg, name)
        assert lv is not None
        offset = self._written.get(name, 0)
        fd = os.open(lv.device, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xa5" * nbytes, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._written[name] = offset + nbytes

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[None]:
        if isinstance(self.lvm, MemoryLvm):
            with self.lvm.open(self.vg, name):
                yield
            return
        lv = self.lvm.find_lv(self.vg, name)
        assert lv is not None
        fd = os.open(lv.device, os.O_RDONLY)
        try:
            yield
        finally:
            os.close(fd)


@pytest.fixture(scope="session")
def real_vg() -> Iterator[LoopVolumeGroup]:
    workdir = Path(tempfile.mkdtemp(prefix="csi-lvm-contract-", dir="/tmp"))
    group = LoopVolumeGroup(
        workdir, name=f"contract{os.getpid()}", size="1G", pool=POOL, pool_size="256M"
    ).create()
    try:
        yield group
    finally:
        group.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def memory_lvm() -> MemoryLvm:
    lvm = MemoryLvm()
    lvm.add_volume_group("contractvg", VG_BYTES)
    lvm.add_thin_pool("contractvg", POOL, POOL_BYTES)
    return lvm


@pytest.fixture
def subject(request: pytest.FixtureRequest) -> Iterator[Subject]:
    if request.param == "memory":
        yield Subject(request.getfixturevalue("memory_lvm"), "contractvg")
        return
    group: LoopVolumeGroup = request.getfixturevalue("real_vg")
    lvm = Lvm()
    try:
        yield Subject(lvm, group.name)
    finally:
        lvm.close()
