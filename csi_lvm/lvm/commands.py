"""The LVM verbs: every ``lvm`` command line csi-lvm sends is built here,
and the kernel's own status of LVM's devices (``dmsetup status``) is read
here.

``Lvm`` has the runner (``runner``) run each one; reads always ask for JSON
reports in bytes and return typed records; failures are the errors of
``errors``. Names are checked (``names``) before any reaches a command line;
each change is written in the journal (``journal``). Nothing here starts a
program or knows how one is run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from csi_lvm.lvm.journal import ChangeJournal
from csi_lvm.lvm.layouts import PLAIN, RAID_LAYOUTS, STRIPED_LAYOUTS, Layout
from csi_lvm.lvm.names import NAME_RE, check_lv_names, check_name, pool_dm_names, tag_args
from csi_lvm.lvm.records import (
    LV_FIELDS,
    PV_FIELDS,
    RAID_FIELDS,
    THIN_FIELDS,
    VG_COLUMNS,
    VG_FIELDS,
    LogicalVolume,
    PhysicalVolume,
    PoolFill,
    PoolStatus,
    RaidState,
    VolumeGroup,
    parse_lv_layouts,
    parse_lv_report,
    parse_pool_status,
    parse_pv_report,
    parse_raid_state,
    parse_vg_report,
)
from csi_lvm.lvm.runner import Runner
from csi_lvm.lvm.shell import LvmShell


def layout_args(layout: Layout) -> list[str]:
    """lvcreate's options for ``layout``: only what the config's named
    settings say, each one checked there."""
    if layout.is_linear:
        return []
    args = ["--type", layout.kind]
    if layout.kind in STRIPED_LAYOUTS:
        args += ["--stripes", str(layout.stripes)]
        if layout.stripe_bytes:
            args += ["--stripesize", f"{layout.stripe_bytes >> 10}k"]
    if layout.kind in RAID_LAYOUTS:
        args += ["--mirrors", str(layout.mirrors)]
        if layout.integrity:
            args += ["--raidintegrity", "y"]
    return args


def read_pool_status(
    runner: Runner, volume_group: str, pool: str, timeout: float | None = None
) -> PoolStatus | None:
    """The kernel's status of the pool's thin-pool target, wherever LVM put
    it (``names.pool_dm_names``); None when the pool has no active one. It
    takes no LVM lock: the kernel answers at once, whatever LVM is doing."""
    check_lv_names(volume_group, pool)
    for device in pool_dm_names(volume_group, pool):
        done = runner.dmsetup(["status", "--", device], timeout)
        status = parse_pool_status(device, done.stdout) if done.returncode == 0 else None
        if status is not None:
            return status
    return None


class Lvm:
    """The LVM verbs: each builds its command line, has the runner run it,
    and reads what comes back (reports as typed records).

    ``runner`` runs them (``lvm`` through a prefix such as ``nsenter`` into
    the host's namespaces, one process per command or a long-lived ``lvm``
    shell: see ``runner``); by default, ``lvm`` on this host. Every change
    is written in the journal (``journal``) as it starts and as it ends:
    what a report taken before it may show wrong.
    """

    def __init__(self, runner: Runner | None = None) -> None:
        self.runner = runner or Runner()
        self.journal = ChangeJournal()

    @property
    def prefix(self) -> list[str]:
        return self.runner.prefix

    @property
    def shell(self) -> LvmShell | None:
        return self.runner.shell

    def close(self, wait_seconds: float | None = None) -> None:
        self.runner.close(wait_seconds)

    def run(self, args: Sequence[str], timeout: float | None = None) -> str:
        """One ``lvm`` process for ``args``; its standard output."""
        return self.runner.lvm(args, timeout)

    def change(
        self,
        args: Sequence[str],
        timeout: float | None = None,
        touches: Sequence[tuple[str, str]] = (),
    ) -> None:
        """A command that changes LVM state (its output is not needed);
        ``touches`` names the LVs (volume group, name) it makes, alters or
        removes."""
        self.journal.changed(touches)
        done = False
        try:
            self.runner.change(args, timeout)
            done = True
        finally:
            self.journal.changed(touches, removed=done and args[0] == "lvremove")

    @property
    def changes(self) -> int:
        """The journal's count of the starts and ends of changes this object
        sent: a report taken while it stood still shows all of them."""
        return self.journal.changes

    def touched_since(self, count: int) -> dict[tuple[str, str], tuple[int, bool]] | None:
        """The LVs changes named since ``changes`` stood at ``count`` (see
        ``ChangeJournal.touched_since``)."""
        return self.journal.touched_since(count)

    # ---- reads

    def list_lvs(
        self, volume_groups: Iterable[str], timeout: float | None = None
    ) -> list[LogicalVolume]:
        """Every LV of the given volume groups."""
        groups = sorted(set(volume_groups))
        for group in groups:
            check_name(group, "volume group")
        if not groups:
            return []
        return parse_lv_report(self.runner.report(["lvs", "-o", LV_FIELDS, *groups], timeout))

    def scan(
        self, volume_groups: Iterable[str], timeout: float | None = None
    ) -> tuple[list[LogicalVolume], list[VolumeGroup]]:
        """Every LV of the given VGs and the VGs themselves, in one report
        where possible (a VG without LVs needs a ``vgs`` of its own)."""
        groups = sorted(set(volume_groups))
        for group in groups:
            check_name(group, "volume group")
        if not groups:
            return [], []
        report = self.runner.report(["lvs", "-o", f"{LV_FIELDS},{VG_COLUMNS}", *groups], timeout)
        lvs = parse_lv_report(report)
        vgs = parse_vg_report(report, "lv")
        without_lvs = set(groups) - {vg.name for vg in vgs}
        if without_lvs:
            vgs += self.list_vgs(without_lvs, timeout)
        return lvs, vgs

    def thin_pools(
        self, volume_groups: Iterable[str], timeout: float | None = None
    ) -> tuple[list[LogicalVolume], list[VolumeGroup]]:
        """The thin pools of the given VGs, and the VGs themselves (their
        ``seqno`` says whether anything else changed), in one report where
        each VG has a pool: LVM reads a VG's whole metadata for any report
        of it, so a second command would cost as much again."""
        groups = sorted(set(volume_groups))
        for group in groups:
            check_name(group, "volume group")
        if not groups:
            return [], []
        # VG arguments, not a select on vg_name: LVM then reads (and locks)
        # these VGs alone, never a VG of someone else's that a long command
        # of theirs holds. A VG that is gone is LvmNotFound.
        select = "segtype=thin-pool"
        report = self.runner.report(
            ["lvs", "-o", f"{LV_FIELDS},{VG_COLUMNS}", "-S", select, *groups], timeout
        )
        pools, vgs = parse_lv_report(report), parse_vg_report(report, "lv")
        without_pools = set(groups) - {vg.name for vg in vgs}
        if without_pools:
            vgs += parse_vg_report(
                self.runner.report(["vgs", "-o", VG_FIELDS, *sorted(without_pools)], timeout)
            )
        return pools, vgs

    def find_lv(
        self, volume_group: str, name: str, timeout: float | None = None
    ) -> LogicalVolume | None:
        check_lv_names(volume_group, name)
        select = f"lv_name={name}"
        lvs = parse_lv_report(
            self.runner.report(["lvs", "-o", LV_FIELDS, "-S", select, volume_group], timeout)
        )
        return lvs[0] if lvs else None

    def thin_lvs(
        self, volume_group: str, names: Iterable[str], timeout: float | None = None
    ) -> dict[str, LogicalVolume]:
        """The named LVs that exist, with their thin device ids and (for a
        pool) chunk size, by name."""
        wanted = sorted(set(names))
        check_lv_names(volume_group, *wanted)
        if not wanted:
            return {}
        select = "||".join(f"lv_name={name}" for name in wanted)
        report = self.runner.report(["lvs", "-o", THIN_FIELDS, "-S", select, volume_group], timeout)
        return {lv.name: lv for lv in parse_lv_report(report)}

    def snapshots_of(
        self, volume_group: str, origin: str, timeout: float | None = None
    ) -> list[LogicalVolume]:
        """The snapshots (classic or thin) whose origin is ``origin``."""
        check_lv_names(volume_group, origin)
        select = f"origin={origin}"
        report = self.runner.report(["lvs", "-o", LV_FIELDS, "-S", select, volume_group], timeout)
        return parse_lv_report(report)

    def find_lvs_named(self, name: str, timeout: float | None = None) -> list[LogicalVolume]:
        """The LVs of this name in every volume group of the node."""
        check_name(name, "logical volume")
        return parse_lv_report(
            self.runner.report(["lvs", "-o", LV_FIELDS, "-S", f"lv_name={name}"], timeout)
        )

    def list_vgs(
        self, names: Iterable[str] = (), timeout: float | None = None
    ) -> list[VolumeGroup]:
        """The named volume groups that exist (all of them when none are named)."""
        groups = sorted(set(names))
        for group in groups:
            check_name(group, "volume group")
        select = ["-S", "vg_name=" + "||vg_name=".join(groups)] if groups else []
        # A select keeps a missing VG from failing the whole report.
        return parse_vg_report(self.runner.report(["vgs", "-o", VG_FIELDS, *select], timeout))

    def list_pvs(self, volume_group: str, timeout: float | None = None) -> list[PhysicalVolume]:
        """The PVs of ``volume_group``, missing ones included."""
        check_name(volume_group, "volume group")
        select = f"vg_name={volume_group}"
        return parse_pv_report(self.runner.report(["pvs", "-o", PV_FIELDS, "-S", select], timeout))

    def data_layout(self, volume_group: str, pool: str, timeout: float | None = None) -> str | None:
        """The layout of a thin pool's data LV as LVM names it (``linear``,
        ``striped``, ``raid,raid1``, ...), or None when there is no such pool."""
        check_lv_names(volume_group, pool)
        select = f"lv_name={pool}_tdata"
        report = self.runner.report(
            ["lvs", "-a", "-o", "lv_name,vg_name,lv_layout", "-S", select, volume_group], timeout
        )
        return parse_lv_layouts(report).get(f"{pool}_tdata")

    def raid_state(
        self, volume_group: str, name: str, timeout: float | None = None
    ) -> RaidState | None:
        """A RAID LV's sync and mismatch counts (None when it is gone)."""
        check_lv_names(volume_group, name)
        select = f"lv_name={name}"
        report = self.runner.report(["lvs", "-o", RAID_FIELDS, "-S", select, volume_group], timeout)
        return parse_raid_state(report)

    # ---- writes

    def create_thin_volume(
        self,
        volume_group: str,
        pool: str,
        name: str,
        size_bytes: int,
        tags: Sequence[str],
        timeout: float | None = None,
    ) -> None:
        check_name(pool, "thin pool")
        check_lv_names(volume_group, name)
        self.change(
            [
                "lvcreate", "--yes", "--name", name,
                "--virtualsize", f"{size_bytes}b", "--thinpool", pool,
                *tag_args(tags), volume_group,
            ],
            timeout,
            [(volume_group, name)],
        )  # fmt: skip

    def create_linear_volume(
        self,
        volume_group: str,
        name: str,
        size_bytes: int,
        tags: Sequence[str],
        timeout: float | None = None,
    ) -> None:
        self.create_shaped_volume(volume_group, name, size_bytes, tags, PLAIN, timeout)

    def create_shaped_volume(
        self,
        volume_group: str,
        name: str,
        size_bytes: int,
        tags: Sequence[str],
        layout: Layout,
        timeout: float | None = None,
    ) -> None:
        """An LV laid out as ``layout`` says (linear, striped, RAID1 or
        RAID10, with dm-integrity under RAID images when it says so). A RAID
        LV syncs its images from the first one, so every copy reads what the
        first does."""
        check_lv_names(volume_group, name)
        # Wipe signatures and zero the start: extents freed by an earlier LV
        # must never show up as a filesystem in a new volume.
        self.change(
            [
                "lvcreate", "--yes", "--name", name, "--size", f"{size_bytes}b",
                "--wipesignatures", "y", "--zero", "y", *layout_args(layout),
                *tag_args(tags), volume_group,
            ],
            timeout,
            [(volume_group, name)],
        )  # fmt: skip

    def create_thin_snapshot(
        self,
        volume_group: str,
        origin: str,
        name: str,
        tags: Sequence[str],
        *,
        active: bool,
        timeout: float | None = None,
    ) -> None:
        """A thin snapshot of ``origin``: inactive with activation skipped (a
        snapshot), or active and writable (a restore or clone)."""
        check_lv_names(volume_group, origin, name)
        activation = (
            ["--setactivationskip", "n", "--activate", "y", "--ignoreactivationskip"]
            if active
            else ["--setactivationskip", "y", "--activate", "n"]
        )
        self.change(
            [
                "lvcreate", "--yes", "--snapshot", "--name", name, *activation,
                *tag_args(tags), f"{volume_group}/{origin}",
            ],
            timeout,
            [(volume_group, name), (volume_group, origin)],
        )  # fmt: skip

    def create_cow_snapshot(
        self,
        volume_group: str,
        origin: str,
        name: str,
        size_bytes: int,
        chunk_bytes: int,
        tags: Sequence[str],
        timeout: float | None = None,
    ) -> None:
        """A classic copy-on-write snapshot of ``origin`` with ``size_bytes``
        of COW space: a frozen, active view of it while the origin stays in use."""
        check_lv_names(volume_group, origin, name)
        self.change(
            [
                "lvcreate", "--yes", "--snapshot", "--name", name,
                "--size", f"{size_bytes}b", "--chunksize", f"{chunk_bytes // 1024}k",
                "--setactivationskip", "n", "--activate", "y",
                *tag_args(tags), f"{volume_group}/{origin}",
            ],
            timeout,
            [(volume_group, name), (volume_group, origin)],
        )  # fmt: skip

    def remove(self, volume_group: str, name: str, timeout: float | None = None) -> None:
        check_lv_names(volume_group, name)
        self.change(
            ["lvremove", "--yes", f"{volume_group}/{name}"], timeout, [(volume_group, name)]
        )

    def activate(self, volume_group: str, name: str, timeout: float | None = None) -> None:
        check_lv_names(volume_group, name)
        self.change(
            ["lvchange", "--activate", "y", "--ignoreactivationskip", f"{volume_group}/{name}"],
            timeout,
            [(volume_group, name)],
        )

    def extend(
        self, volume_group: str, name: str, size_bytes: int, timeout: float | None = None
    ) -> None:
        check_lv_names(volume_group, name)
        self.change(
            ["lvextend", "--yes", "--size", f"{size_bytes}b", f"{volume_group}/{name}"],
            timeout,
            [(volume_group, name)],
        )

    def convert_layout(
        self,
        volume_group: str,
        name: str,
        layout: Layout,
        timeout: float | None = None,
        *,
        test: bool = False,
    ) -> None:
        """lvconvert an LV to ``layout`` (linear, or RAID1's images), online.
        ``test``: LVM's test mode, which allocates but writes no metadata:
        whether the conversion can be made, with LVM's reason when not."""
        check_lv_names(volume_group, name)
        shape = ["--type", "linear"] if layout.is_linear else layout_args(layout)
        self.change(
            ["lvconvert", "--yes", *(["--test"] if test else []), *shape, f"{volume_group}/{name}"],
            timeout,
            [] if test else [(volume_group, name)],
        )  # fmt: skip

    def change_tags(
        self,
        volume_group: str,
        name: str,
        add: Sequence[str],
        delete: Sequence[str],
        timeout: float | None = None,
    ) -> None:
        """Tags added and deleted in one metadata update. A tag in both stays
        (LVM itself would apply the deletion last and drop it)."""
        check_lv_names(volume_group, name)
        delete = [tag for tag in delete if tag not in add]
        self.change(
            ["lvchange", *tag_args(delete, "--deltag"), *tag_args(add), f"{volume_group}/{name}"],
            timeout,
            [(volume_group, name)],
        )

    def delete_tag(
        self, volume_group: str, name: str, tag: str, timeout: float | None = None
    ) -> None:
        check_lv_names(volume_group, name)
        self.change(
            ["lvchange", *tag_args([tag], "--deltag"), f"{volume_group}/{name}"],
            timeout,
            [(volume_group, name)],
        )

    def thin_mapped_sectors(self, lv: LogicalVolume, timeout: float | None = None) -> int | None:
        """The exact number of sectors an active thin LV maps in its pool, from
        its device's status (``data_percent`` is rounded); None when the LV
        has no thin device table."""
        name = os.path.basename(lv.dm_path)
        if not lv.dm_path.startswith("/dev/mapper/") or not NAME_RE.fullmatch(name):
            return None
        done = self.runner.dmsetup(["status", "--target", "thin", "--", name], timeout)
        # "<start> <length> thin <mapped sectors> <highest mapped sector>|-"
        fields = done.stdout.split()
        if done.returncode != 0 or len(fields) < 4 or fields[2] != "thin":
            return None
        return int(fields[3]) if fields[3].isdigit() else None

    def pool_fill(
        self, volume_group: str, pool: str, timeout: float | None = None
    ) -> PoolFill | None:
        """How full the thin pool is now, from the kernel (``dmsetup status``),
        without any LVM lock: tenants' writes fill a pool without telling the
        driver, and a report may be behind them. None when the pool has no
        active device (then nothing can have been written to it)."""
        status = read_pool_status(self.runner, volume_group, pool, timeout)
        return status.fill if status is not None else None

    def version(self, timeout: float | None = None) -> str:
        return self.run(["version"], timeout).strip()
