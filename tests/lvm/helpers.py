"""Request builders and assertions shared by the real-LVM tests."""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from csi_lvm.csi import csi_pb2
from tests.testbed import CsiClient, Driver, LoopVolumeGroup, write_config

T = TypeVar("T")
MiB = 1 << 20
GiB = 1 << 30
Mode = csi_pb2.VolumeCapability.AccessMode


def mount_capability(
    fs_type: str = "", mode: int = Mode.SINGLE_NODE_WRITER, flags: tuple[str, ...] = ()
) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=Mode(mode=mode),
    )


def block_capability(mode: int = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=Mode(mode=mode)
    )


def create_request(
    name: str, size: int = 16 * MiB, device_class: str = "thin", **extra: Any
) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[extra.pop("capability", mount_capability())],
        parameters={"deviceClass": device_class, **extra.pop("parameters", {})},
        **extra,
    )


def create(
    csi: CsiClient, name: str, size: int = 16 * MiB, device_class: str = "thin", **extra: Any
) -> csi_pb2.Volume:
    return csi.controller.CreateVolume(create_request(name, size, device_class, **extra)).volume


def expect_error(
    code: grpc.StatusCode, call: Callable[..., Any], request: Any, *fragments: str
) -> str:
    """Call and require a gRPC error with ``code`` whose message has ``fragments``."""
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    error = caught.value
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    for fragment in fragments:
        assert fragment in error.details(), f"{fragment!r} not in {error.details()!r}"
    return str(error.details())


# The session driver's --refresh-interval: what others change (an admin's
# lvcreate, a tenant's writes filling a pool) shows within it.
REFRESH_SECONDS = 2.0


def eventually(
    check: Callable[[], T],
    seconds: float = 3 * REFRESH_SECONDS,
    explain: Callable[[], object] = lambda: "",
) -> T:
    """``check()`` once it is true, within ``seconds``: for what the driver
    reads from its kept view of the VGs, which shows others' changes within
    the refresh interval. A failure shows ``explain()``."""
    deadline = time.monotonic() + seconds
    while not (result := check()):
        assert time.monotonic() < deadline, f"not true within {seconds:.0f} s {explain()}"
        time.sleep(0.2)
    return result


def stage(
    csi: CsiClient, volume_id: str, staging: str, capability: csi_pb2.VolumeCapability
) -> None:
    os.makedirs(staging, exist_ok=True)
    csi.node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=staging, volume_capability=capability
        )
    )


def publish(
    csi: CsiClient,
    volume_id: str,
    staging: str,
    target: str,
    capability: csi_pb2.VolumeCapability,
    readonly: bool = False,
) -> None:
    csi.node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id,
            staging_target_path=staging,
            target_path=target,
            volume_capability=capability,
            readonly=readonly,
        )
    )


def unpublish(csi: CsiClient, volume_id: str, target: str) -> None:
    csi.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target)
    )


def unstage(csi: CsiClient, volume_id: str, staging: str) -> None:
    """Unstage; an xfs filesystem is then checked with ``xfs_repair -n``: the
    guard on formatting xfs without zeroing its log (csi_lvm/zero_range.py),
    in every test that makes one."""
    fs_type, device = fs_type_of(staging), mounted_source(staging)
    csi.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging)
    )
    if fs_type == "xfs" and device and not is_mounted_anywhere(device):
        check = subprocess.run(["xfs_repair", "-n", device], capture_output=True, text=True)
        assert check.returncode == 0, f"xfs_repair -n {device}: {check.stdout}{check.stderr}"


def mounted_source(path: str) -> str:
    return subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE", path], capture_output=True, text=True, check=False
    ).stdout.strip()


def is_mounted_anywhere(device: str) -> bool:
    return bool(
        subprocess.run(
            ["findmnt", "-n", "-S", device], capture_output=True, text=True, check=False
        ).stdout.strip()
    )


def delete(csi: CsiClient, volume_id: str) -> None:
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))


def is_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == path for line in mountinfo)


def lv_tags(vg: str, lv: str) -> list[str]:
    out = subprocess.run(
        ["lvs", "--noheadings", "-o", "lv_tags", f"{vg}/{lv}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [t for t in out.strip().split(",") if t]


def fs_type_of(device_or_path: str) -> str:
    return subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", device_or_path],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()


def lock_file(vg: str) -> Path:
    """The VG's lock file under LVM's locking directory."""
    shown = subprocess.run(
        ["lvmconfig", "--type", "current", "--valuesonly", "global/locking_dir"],
        capture_output=True, text=True, check=False,
    ).stdout.strip().strip('"')  # fmt: skip
    return Path(shown or "/run/lock/lvm") / f"V_{vg}"


def waiting_for(path: Path) -> list[int]:
    """The processes blocked on a flock of ``path`` (the kernel's /proc/locks:
    a waiter's line has "->" before its lock, which it names by device
    "MAJ:MIN" in hex and inode; inode numbers repeat across filesystems)."""
    stat = os.stat(path)
    file = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    found = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 6 and fields[1] == "->" and fields[6] == file:
            found.append(int(fields[5]))
    return found


def what_blocks(pid: int) -> str:
    """For a test that failed to see a process wait: what it is doing, and
    every flock waiter on the machine."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        wchan = Path(f"/proc/{pid}/wchan").read_text()
        stack = Path(f"/proc/{pid}/stack").read_text()
    except OSError as error:
        return f"process {pid}: {error}"
    waiters = [line for line in Path("/proc/locks").read_text().splitlines() if "->" in line]
    return f"process {pid}: state {stat}, in {wchan}\n{stack}flock waiters: {waiters}"


@contextmanager
def lvm_lock_held(volume_group: str) -> Iterator[Path]:
    """The VG's LVM lock, held here as another LVM command on the node would
    hold it, until the block ends: every LVM command on the VG waits meanwhile.
    Yields the lock file."""
    lock = lock_file(volume_group)
    while True:
        held = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(held, fcntl.LOCK_EX)
        # LVM unlinks a lock file it releases when nobody waits for it: one
        # opened just before that is a lock nobody else will ever ask for.
        # Held only while the path still names the file locked, as LVM does.
        try:
            if os.stat(lock).st_ino == os.fstat(held).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(held)
    try:
        yield lock
    finally:
        os.close(held)  # the lock is free: the commands that waited go on


def first_waiting(lock: Path, parent: int, what: str, seconds: float = 120) -> list[int]:
    """The children of ``parent`` (a driver: its lvm shell) waiting for
    ``lock``, once one is; ``what`` says which wait failed to come within
    ``seconds``. Other drivers' commands on the VG may wait for it too."""
    deadline = time.monotonic() + seconds
    while not (waiters := [pid for pid in waiting_for(lock) if parent_of(pid) == parent]):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return waiters


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # "<pid> (<comm>) <state> <ppid> ..."


def driver_of_its_own(
    workdir: Path, name: str, vg: LoopVolumeGroup, *extra: str, launcher: Sequence[str] = ()
) -> Driver:
    """A driver (not started) with the session's classes on ``vg``, in a
    directory of its own under ``workdir``."""
    home = workdir / name
    home.mkdir()
    config = write_config(home / "config.yaml", vg.name, vg.pool)
    return Driver(home, config, *extra, launcher=launcher)
