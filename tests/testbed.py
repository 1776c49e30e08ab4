"""A throwaway LVM test bed: a loop-backed volume group with a thin pool, a
running ``csi-lvm serve`` on it, and a CSI client for its socket.

Used by the real-LVM tests, the demo and the benchmarks. It only runs where
device-mapper works (inside the VM, or on a real node) and only ever touches
the volume group it made itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from csi_lvm.csi import csi_pb2_grpc

DRIVER_NAME = "lvm.csi-lvm.io"
NODE_ID = "node-under-test"
TOPOLOGY_KEY = "topology.lvm.csi-lvm.io/node"


def sh(*args: str, check: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def raw_holds(device: str, needle: bytes) -> bool:
    """Whether the device's raw blocks hold ``needle`` anywhere, as they are
    on the disk (writes through another device, a dm-crypt mapping over it,
    bypass this one's page cache, so it is dropped first)."""
    sh("blockdev", "--flushbufs", device)
    with open(device, "rb") as raw:
        tail = b""
        while chunk := raw.read(4 << 20):
            if needle in tail + chunk:
                return True
            tail = chunk[-len(needle) :]
    return False


def load_kernel_modules() -> None:
    modules = (
        "loop",
        "dm-mod",
        "dm-thin-pool",
        "dm-snapshot",
        "dm-crypt",
        "dm-raid",
        "dm-integrity",
        "btrfs",
    )
    for module in modules:
        subprocess.run(["modprobe", module], capture_output=True, check=False)


@dataclass
class LoopVolumeGroup:
    """A VG on sparse files, one loop device (PV) each: ``pool_size`` of thin
    pool (none when empty), the rest free for thick LVs. ``size`` is each
    PV's."""

    workdir: Path
    name: str = "csitest"
    size: str = "8G"
    pool: str = "pool0"
    pool_size: str = "2G"
    metadata_size: str = ""  # pvcreate --metadatasize (LVM's default when empty)
    pool_metadata_size: str = ""  # lvcreate --poolmetadatasize (LVM's default when empty)
    disks: int = 1
    devices: list[str] = field(init=False, default_factory=list)

    @property
    def device(self) -> str:
        return self.devices[0] if self.devices else ""

    def image(self, disk: int) -> Path:
        return self.workdir / (f"{self.name}.img" if disk == 0 else f"{self.name}-{disk}.img")

    def create(self) -> LoopVolumeGroup:
        load_kernel_modules()
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for disk in range(self.disks):
                sh("truncate", "-s", self.size, str(self.image(disk)))
                self.devices.append(
                    sh("losetup", "--find", "--show", str(self.image(disk))).strip()
                )
            sizing = ["--metadatasize", self.metadata_size] if self.metadata_size else []
            sh("pvcreate", "-q", "-y", *sizing, *self.devices)
            sh("vgcreate", "-q", "-y", self.name, *self.devices)
            pool_sizing = (
                ["--poolmetadatasize", self.pool_metadata_size] if self.pool_metadata_size else []
            )
            if self.pool_size:
                sh("lvcreate", "-q", "-y", "--type", "thin-pool", "-L", self.pool_size,
                   *pool_sizing, "-n", self.pool, self.name)  # fmt: skip
        except BaseException:  # a host without device-mapper, say: leave no loop device
            self.destroy()
            raise
        return self

    def lvcreate(self, *args: str) -> None:
        sh("lvcreate", "-q", "-y", *args)

    def lv_names(self) -> set[str]:
        out = sh("lvs", "--noheadings", "-o", "lv_name", self.name)
        return {line.strip() for line in out.splitlines() if line.strip()}

    def destroy(self) -> None:
        subprocess.run(["vgremove", "-f", "-y", self.name], capture_output=True, check=False)
        for device in self.devices:
            subprocess.run(["pvremove", "-y", device], capture_output=True, check=False)
            subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
        for disk in range(self.disks):
            self.image(disk).unlink(missing_ok=True)


def child_pids(pid: int) -> list[int]:
    """Child processes of every thread of ``pid``: a driver's gRPC worker
    thread starts its lvm shell, so the thread's children hold it, not only
    the main thread's."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def write_config(path: Path, vg: str, pool: str, ratio: float = 10.0) -> Path:
    path.write_text(
        "deviceClasses:\n"
        "  - name: thin\n"
        f"    volumeGroup: {vg}\n"
        f"    thinPool: {pool}\n"
        f"    overprovisionRatio: {ratio}\n"
        "    default: true\n"
        "  - name: thick\n"
        f"    volumeGroup: {vg}\n"
    )
    return path


class CsiClient:
    def __init__(self, socket_path: str) -> None:
        # A driver restarted by a test must be reached at once, not after
        # gRPC's exponential reconnect backoff (which grows to minutes).
        self.channel = grpc.insecure_channel(
            f"unix://{socket_path}",
            options=[
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 500),
            ],
        )
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.snapshot_metadata = csi_pb2_grpc.SnapshotMetadataStub(self.channel)
        self.group_controller = csi_pb2_grpc.GroupControllerStub(self.channel)

    def close(self) -> None:
        self.channel.close()


class Driver:
    """``csi-lvm serve`` as a child process, logging to a file."""

    def __init__(
        self, workdir: Path, config: Path, *extra: str, launcher: Sequence[str] = ()
    ) -> None:
        self.workdir = workdir
        self.socket = str(workdir / "csi.sock")
        self.log_path = workdir / "driver.log"
        self.config = config
        self.extra = list(extra)
        # A command the driver is started through (as a container runtime
        # would start it in a cgroup of its own).
        self.launcher = list(launcher)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> CsiClient:
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            [
                *self.launcher, sys.executable, "-m", "csi_lvm.cli", "serve",
                "--endpoint", f"unix://{self.socket}", "--config", str(self.config),
                "--node-id", NODE_ID, "--driver-name", DRIVER_NAME, *self.extra,
            ],
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )  # fmt: skip
        client = CsiClient(self.socket)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"csi-lvm exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                grpc.channel_ready_future(client.channel).result(timeout=1)
                return client
            except grpc.FutureTimeoutError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"csi-lvm did not open its socket within {timeout:.0f} s; its log "
                        f"ends:\n{self.log_path.read_text()[-3000:]}"
                    ) from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self.process = None
        return code


class ForkedDriver:
    """``csi-lvm serve`` children of one fork server (tests/forkserver.py), for
    tests that kill the driver with SIGKILL and start it again many times."""

    def __init__(
        self, workdir: Path, config: Path, *extra: str, log_path: Path | None = None
    ) -> None:
        self.socket = str(workdir / "csi.sock")
        self.log_path = log_path or workdir / "driver.log"
        self.argv = [
            "serve", "--endpoint", f"unix://{self.socket}", "--config", str(config),
            "--node-id", NODE_ID, "--driver-name", DRIVER_NAME, *extra,
        ]  # fmt: skip
        self.pid = 0
        self.server = subprocess.Popen(
            [sys.executable, "-m", "tests.forkserver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )

    def start(self, client: CsiClient, timeout: float = 90.0) -> None:
        """Fork a driver and wait until ``client`` reaches it."""
        assert self.server.stdin is not None and self.server.stdout is not None
        self.server.stdin.write(json.dumps({"argv": self.argv, "log": str(self.log_path)}) + "\n")
        self.server.stdin.flush()
        self.pid = int(self.server.stdout.readline())
        deadline = time.monotonic() + timeout
        while True:
            try:
                grpc.channel_ready_future(client.channel).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                if not self.alive():
                    raise RuntimeError(
                        f"csi-lvm died:\n{self.log_path.read_text()[-3000:]}"
                    ) from None
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"csi-lvm did not open its socket within {timeout:.0f} s; its log "
                        f"ends:\n{self.log_path.read_text()[-3000:]}"
                    ) from None

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def busy_children(self) -> list[str]:
        """The commands the driver is running now (its LVM shell included,
        which lives in a session of its own, unless it sits idle waiting for
        its next command on stdin). Reads only the children of the driver's
        threads, so it is quick enough to poll while an LVM command runs."""
        names = []
        for child in child_pids(self.pid):
            try:
                comm = Path(f"/proc/{child}/comm").read_text().strip()
                syscall = Path(f"/proc/{child}/syscall").read_text().split()
            except OSError:
                continue
            if syscall[:2] != ["0", "0x0"]:  # read(0, ...): waiting for a command
                names.append(comm)
        return names

    def crash(self) -> list[str]:
        """SIGKILL the driver and its process group, as a crash of the driver
        process would; returns the commands it was running then. LVM runs in
        sessions of its own, so a command under way finishes by itself."""
        os.killpg(self.pid, signal.SIGSTOP)  # freeze the driver to see what it was doing
        running = self.busy_children()
        os.killpg(self.pid, signal.SIGKILL)
        while self.alive():
            time.sleep(0.01)
        return running

    def stop(self) -> None:
        if self.pid and self.alive():
            os.killpg(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.server.stdin is not None:
            self.server.stdin.close()
        self.server.wait(30)


# ---- mutual TLS between plugins (a test's own authority) and their ports


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def issue(directory: Path, ca: Path, name: str, dns: str = "") -> Path:
    """A key and a certificate signed by the authority in ``ca`` (ca.crt,
    ca.key), with the authority's certificate beside them: a TLS Secret's
    files."""
    directory.mkdir(parents=True)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(directory / "tls.key"), "-out", str(directory / "tls.csr"),
            "-subj", f"/CN={name}")  # fmt: skip
    extensions = directory / "ext.cnf"
    extensions.write_text(f"subjectAltName=DNS:{dns}\n" if dns else "basicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", str(directory / "tls.csr"), "-CA", str(ca / "ca.crt"),
            "-CAkey", str(ca / "ca.key"), "-CAcreateserial", "-days", "2",
            "-out", str(directory / "tls.crt"), "-extfile", str(extensions))  # fmt: skip
    (directory / "ca.crt").write_bytes((ca / "ca.crt").read_bytes())
    return directory


def authority(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(directory / "ca.key"), "-out", str(directory / "ca.crt"),
            "-days", "2", "-subj", f"/CN={name}")  # fmt: skip
    return directory


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
