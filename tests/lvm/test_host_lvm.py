"""LVM outside the plugin's container (deploy/kubernetes/components/host-lvm):
the container's end, as a runtime brings it about, does not reach an LVM
command in flight.

A container's processes share its cgroup, and the runtime ends them together
(runc writes cgroup.kill when the container has no PID namespace of its own,
as with hostPID; with one, the kernel kills the namespace's processes when
its first one dies). The component runs LVM through ``systemd-run --scope``,
which moves it into a cgroup of its own before it becomes lvm. The VM has no
systemd, so here a two-line script makes the same move (cgroup.procs). The
LVM command is held in flight by its VG's lock, taken here as another LVM
command on the node would take it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_lvm.csi import csi_pb2
from csi_lvm.ids import Kind, lv_name_for
from tests.lvm.helpers import (
    MiB,
    create,
    create_request,
    delete,
    driver_of_its_own,
    first_waiting,
    lvm_lock_held,
    waiting_for,
)
from tests.testbed import CsiClient, Driver, LoopVolumeGroup

CGROUPS = Path("/sys/fs/cgroup")
WAIT_SECONDS = 120


@pytest.fixture
def cgroups(name: str) -> Iterator[dict[str, Path]]:
    """The plugin's container and the cgroup LVM moves to, made for the test
    and removed after it (their processes killed first)."""
    made = {}
    for role in ("container", "lvm"):
        made[role] = CGROUPS / f"{name}-{os.getpid()}-{role}"  # xdist workers share names
        made[role].mkdir()
    yield made
    for group in made.values():
        (group / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + WAIT_SECONDS
        while (group / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.1)
        group.rmdir()


def moved_into(group: Path) -> list[str]:
    """A command prefix that moves itself into ``group`` and becomes the rest."""
    return ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "moved-into"]


def cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text().strip().split("::", 1)[-1]


def transaction_ids(vg: LoopVolumeGroup) -> tuple[int, int]:
    """The thin pool's transaction id as LVM's metadata records it and as the
    kernel's pool has it: equal unless a change was cut off between the two.
    The pool is activated first (LVM itself compares the two then, and
    refuses a pool where they differ)."""
    subprocess.run(["lvchange", "-q", "-ay", f"{vg.name}/{vg.pool}"], check=True)
    recorded = subprocess.run(
        ["lvs", "--noheadings", "-o", "transaction_id", f"{vg.name}/{vg.pool}"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # The kernel's pool is <vg>-<pool>-tpool while thin LVs are active, else
    # <vg>-<pool>. Asked by name: a listing of every device fails when another
    # test's device goes between the list and its status.
    stem = f"{vg.name.replace('-', '--')}-{vg.pool.replace('-', '--')}"
    statuses = [
        subprocess.run(["dmsetup", "status", name], capture_output=True, text=True, check=False)
        for name in (f"{stem}-tpool", stem)
    ]
    # "<start> <length> thin-pool <transaction id> ..."
    (status,) = [s.stdout.split() for s in statuses if s.stdout.split()[2:3] == ["thin-pool"]]
    return int(recorded), int(status[3])


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


@pytest.mark.parametrize("lvm_outside", [False, True], ids=["lvm-in-container", "host-lvm"])
def test_a_killed_container_cuts_off_lvm_only_when_lvm_runs_inside_it(
    csi: CsiClient,
    workdir: Path,
    vg: LoopVolumeGroup,
    name: str,
    cgroups: dict[str, Path],
    lvm_outside: bool,
) -> None:
    extra = ["--refresh-interval", "3600"]  # no report of its own while the VG is locked
    if lvm_outside:
        script = workdir / f"{name}-lvm-outside"
        script.write_text(f'#!/bin/sh\necho $$ > {cgroups["lvm"]}/cgroup.procs || exit 1\n'
                          'exec "$@"\n')  # fmt: skip
        script.chmod(0o755)
        extra += ["--lvm-prefix", str(script)]
    plugin = driver_of_its_own(workdir, name, vg, *extra, launcher=moved_into(cgroups["container"]))
    client = _started(plugin)
    lv = lv_name_for(Kind.VOLUME, name)
    try:
        with lvm_lock_held(vg.name) as lock:
            # The create's lvcreate, and any other LVM command of the plugin's
            # that came to wait for the lock with it: all in one cgroup.
            call, answers, in_flight = _create_behind(plugin, client, name, lock)
            expected = cgroups["lvm" if lvm_outside else "container"].name
            assert all(cgroup_of(pid).endswith(expected) for pid in in_flight)

            (cgroups["container"] / "cgroup.kill").write_text("1")  # the runtime ends it
            assert plugin.process is not None
            plugin.process.wait(WAIT_SECONDS)
            plugin.process = None
            call.join(WAIT_SECONDS)
            assert answers and isinstance(answers[0], grpc.RpcError)  # no answer reached anyone
            assert all(gone(pid) is not lvm_outside for pid in in_flight)
        # The lock is free: an lvcreate still alive goes on.
    finally:
        client.close()

    deadline = time.monotonic() + WAIT_SECONDS
    while not all(gone(pid) for pid in in_flight):
        assert time.monotonic() < deadline, "the lvm shell did not end after its command"
        time.sleep(0.1)
    recorded, in_kernel = transaction_ids(vg)
    assert recorded == in_kernel
    # The LV is complete (the driver's own retry answers it as made) or absent.
    assert (lv in vg.lv_names()) is lvm_outside
    volume = create(csi, name, 16 * MiB)
    assert volume.volume_id.endswith(f":{lv}") and volume.capacity_bytes == 16 * MiB
    delete(csi, volume.volume_id)


def _started(plugin: Driver) -> CsiClient:
    """The plugin started, with its kept view read before any test locks the
    VG: a create's first LVM command is then its lvcreate."""
    client = plugin.start()
    client.controller.GetCapacity(csi_pb2.GetCapacityRequest(parameters={"deviceClass": "thin"}))
    return client


def _create_behind(
    plugin: Driver, client: CsiClient, name: str, lock: Path
) -> tuple[threading.Thread, list[object], list[int]]:
    """A CreateVolume of ``name`` on a thread of its own, once its lvcreate
    waits for the held ``lock``: the thread, where its answer will be, and
    the plugin's processes waiting for the lock."""
    answers: list[object] = []
    call = threading.Thread(
        target=lambda: answers.append(_create_or_error(client, name)), daemon=True
    )
    call.start()
    assert plugin.process is not None
    waiters = first_waiting(
        lock, plugin.process.pid, "the create's lvcreate never waited for the lock", WAIT_SECONDS
    )
    return call, answers, waiters


def _create_or_error(client: CsiClient, name: str) -> object:
    try:
        return client.controller.CreateVolume(create_request(name, 16 * MiB), timeout=WAIT_SECONDS)
    except grpc.RpcError as error:
        return error


def test_sigterm_waits_for_the_lvm_command_in_flight(
    csi: CsiClient, workdir: Path, vg: LoopVolumeGroup, name: str
) -> None:
    # What a DaemonSet rollout sends first: the plugin stops taking calls,
    # and LVM, in its container, runs to the end of the command it is in.
    plugin = driver_of_its_own(workdir, name, vg, "--refresh-interval", "3600")
    client = _started(plugin)
    with lvm_lock_held(vg.name) as lock:
        call, answers, waiters = _create_behind(plugin, client, name, lock)
        assert plugin.process is not None
        plugin.process.send_signal(signal.SIGTERM)
        time.sleep(2)
        assert plugin.process.poll() is None, "the plugin left with an LVM command in flight"
        assert set(waiters) <= set(waiting_for(lock))  # the session driver's may wait too
    assert plugin.process.wait(WAIT_SECONDS) == 0
    plugin.process = None
    call.join(WAIT_SECONDS)
    client.close()
    (answer,) = answers
    assert isinstance(answer, csi_pb2.CreateVolumeResponse), answer  # it finished, and answered
    lv = lv_name_for(Kind.VOLUME, name)
    assert lv in vg.lv_names()
    recorded, in_kernel = transaction_ids(vg)
    assert recorded == in_kernel
    delete(csi, create(csi, name, 16 * MiB).volume_id)
