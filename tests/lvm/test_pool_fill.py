"""A thin pool's live fill, from the kernel: Lvm.pool_fill sees a tenant's
writes the moment they land, agrees with LVM's own report of the same pool,
finds the pool's thin-pool target whether or not thin volumes use it (LVM
puts it at ``<vg>-<pool>-tpool`` or at ``<vg>-<pool>``), and takes no LVM
lock. The VG and pool names have dashes, which device-mapper names double."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.records import PoolFill
from csi_lvm.lvm.thin_metadata import ThinMetadata
from tests.lvm.helpers import lvm_lock_held, waiting_for, what_blocks
from tests.testbed import LoopVolumeGroup, sh

POOL, POOL_MIB, VOLUME = "thin-pool", 64, "tenant-1"
# lvs prints two decimals (and never 0.00 for a pool with data, nor 100.00
# for one not quite full): the kernel's exact figure is within this of it.
ROUNDING = 0.011


@pytest.fixture(scope="module")
def group(workdir: Path) -> Iterator[LoopVolumeGroup]:
    made = LoopVolumeGroup(
        workdir, name=f"csi-fill{os.getpid()}", size="256M", pool=POOL, pool_size=f"{POOL_MIB}M"
    ).create()
    try:
        yield made
    finally:
        made.destroy()


def dm_devices(group: LoopVolumeGroup) -> list[str]:
    """The device-mapper devices of the group, as the kernel lists them."""
    prefix = group.name.replace("-", "--") + "-"
    listed = sh("dmsetup", "ls").split()
    return sorted(name for name in listed if name.startswith(prefix))


def reported(group: LoopVolumeGroup) -> tuple[float, float]:
    """LVM's own data and metadata percent of the pool (it reads the same
    kernel status, under the VG's lock)."""
    out = sh("lvs", "--noheadings", "-o", "data_percent,metadata_percent", f"{group.name}/{POOL}")
    data, metadata = out.split()
    return float(data), float(metadata)


def agrees(fill: PoolFill | None, group: LoopVolumeGroup) -> PoolFill:
    assert fill is not None, dm_devices(group)
    data, metadata = reported(group)
    assert abs(fill.data_percent - data) <= ROUNDING, (fill, data)
    assert abs(fill.metadata_percent - metadata) <= ROUNDING, (fill, metadata)
    assert fill.mode == "rw" and not fill.needs_check, fill
    return fill


def write(device: str, mib: int) -> None:
    subprocess.run(
        ["dd", "if=/dev/urandom", f"of={device}", "bs=1M", f"count={mib}", "oflag=direct",
         "conv=notrunc,fsync"],
        capture_output=True, check=True,
    )  # fmt: skip


def test_a_tenant_s_writes_show_in_the_pool_s_fill_at_once(group: LoopVolumeGroup) -> None:
    lvm = Lvm()
    try:
        # A new pool, no thin volume yet: where LVM put its thin-pool target.
        fresh = agrees(lvm.pool_fill(group.name, POOL), group)
        print("devices of a pool without thin volumes:", dm_devices(group))
        assert fresh.data_percent == 0.0
        group.lvcreate("-V", "32M", "-T", f"{group.name}/{POOL}", "-n", VOLUME)
        print("devices of a pool with an active thin volume:", dm_devices(group))
        assert f"{group.name.replace('-', '--')}-thin--pool-tpool" in dm_devices(group)
        before = agrees(lvm.pool_fill(group.name, POOL), group)
        write(f"/dev/{group.name}/{VOLUME}", 8)
        after = lvm.pool_fill(group.name, POOL)  # straight after, no refresh of anything
        assert after is not None
        assert after.data_percent >= before.data_percent + 100 * 8 / POOL_MIB - ROUNDING, after
        agrees(after, group)
        # The metadata verbs read the same status through the same runner.
        status = ThinMetadata(runner=lvm.runner).pool_status(group.name, POOL)
        assert status.fill == after and status.device.endswith("-tpool")
    finally:
        lvm.close()


def test_the_fill_is_read_without_the_volume_group_s_lock(group: LoopVolumeGroup) -> None:
    # The VG's LVM lock held as a long lvcreate or lvremove would hold it:
    # lvs waits for it, the kernel's status does not.
    with lvm_lock_held(group.name) as lock:
        waiting = subprocess.Popen(
            ["lvs", "--noheadings", "-o", "data_percent", f"{group.name}/{POOL}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        # Behind this lock, or behind the global one that a command of another
        # test's holds while it waits for this one.
        lvm_locks = [lock, *lock.parent.glob("P_*")]

        def waits() -> bool:
            return any(waiting.pid in waiting_for(held) for held in lvm_locks if held.exists())

        deadline = time.monotonic() + 60
        while not waits() and waiting.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert waits(), f"lvs (exit {waiting.poll()}) never waited: {what_blocks(waiting.pid)}"
        lvm = Lvm()
        started = time.monotonic()
        fill = lvm.pool_fill(group.name, POOL, timeout=10.0)
        took = time.monotonic() - started
        lvm.close()
        assert fill is not None and took < 5.0, took
        assert waiting.poll() is None  # still waiting
    assert waiting.wait(60) == 0


def test_a_pool_active_without_its_thin_volumes_is_found_and_an_inactive_one_is_none(
    group: LoopVolumeGroup,
) -> None:
    lvm = Lvm()
    try:
        expected = lvm.pool_fill(group.name, POOL)
        assert expected is not None
        sh("vgchange", "-q", "--activate", "n", group.name)
        assert dm_devices(group) == []
        assert lvm.pool_fill(group.name, POOL) is None
        # The pool alone: LVM may activate it with or without the tpool layer.
        sh("lvchange", "-q", "--activate", "y", f"{group.name}/{POOL}")
        print("devices of a pool activated alone:", dm_devices(group))
        alone = agrees(lvm.pool_fill(group.name, POOL), group)
        assert alone.data_percent == expected.data_percent  # nothing written meanwhile
    finally:
        sh("vgchange", "-q", "--activate", "y", group.name, check=False)
        lvm.close()
