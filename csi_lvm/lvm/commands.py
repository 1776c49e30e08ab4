"""The LVM verbs: every ``lvm`` command line csi-lvm sends is built here.

``Lvm`` has the runner (``runner``) run each one; reads always ask for JSON
reports in bytes and return typed records; failures are the errors of
``errors``.
"""

from __future__ import annotations

import collections
import os
import re
import threading
from collections.abc import Iterable, Sequence

import structlog

from csi_lvm.lvm.errors import LvmBadName
from csi_lvm.lvm.records import (
    LV_FIELDS,
    THIN_FIELDS,
    VG_COLUMNS,
    VG_FIELDS,
    LogicalVolume,
    VolumeGroup,
    parse_lv_report,
    parse_vg_report,
)
from csi_lvm.lvm.runner import Runner
from csi_lvm.lvm.shell import LvmShell

log = structlog.get_logger("csi_lvm.lvm")

# LVM's grammar for VG and LV names (lvm(8), "Valid names"), and for tags.
NAME_RE = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")
TAG_RE = re.compile(r"[A-Za-z0-9_+.:/=!&#][A-Za-z0-9_+.:/=!&#-]{0,1023}")
# How many touched LVs the change log keeps (a reader of an older report
# rereads everything).
_TOUCHED_KEPT = 4096


def config_overrides_from(text: str) -> str:
    """LVM configuration text (a file's, comments and all) as the one
    argument ``--config`` takes."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return " ".join(line for line in lines if line)


def check_name(name: str, what: str) -> None:
    """Names reach LVM only once they match LVM's own grammar."""
    if not NAME_RE.fullmatch(name) or name in {".", ".."}:
        raise LvmBadName(f"{what} {name!r} is not a valid LVM name")


def check_lv_names(volume_group: str, *lv_names: str) -> None:
    check_name(volume_group, "volume group")
    for name in lv_names:
        check_name(name, "logical volume")


class Lvm:
    """The LVM verbs: each builds its command line, has the runner run it,
    and reads what comes back (reports as typed records).

    ``prefix`` runs every command through another program (``nsenter`` into
    the host's namespaces, for example); ``binary`` is the ``lvm`` tool;
    ``shell`` sends reports and changes to one long-lived ``lvm`` shell
    process (see ``runner``). Every change is written in a journal first
    (``changes``, ``touched_since``): what a report taken before it may
    show wrong.
    """

    def __init__(
        self,
        binary: str = "lvm",
        prefix: Sequence[str] = (),
        timeout: float = 120.0,
        shell: bool = False,
        shell_idle_exit: float = 0.0,
        config_overrides: str = "",
    ):
        self.runner = Runner(binary, prefix, timeout, shell, shell_idle_exit, config_overrides)
        self._changes = 0
        self._changes_lock = threading.Lock()
        # The LVs each recent change named, with the count at its start and
        # at its end (and whether it ended by removing them): what a report
        # older than those counts may show wrong.
        self._touched: collections.deque[tuple[int, str, str, bool]] = collections.deque()
        self._forgotten = 0  # the highest count whose entries were dropped

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
        self._changed(touches, removed=False)
        done = False
        try:
            self.runner.change(args, timeout)
            done = True
        finally:
            self._changed(touches, removed=done and args[0] == "lvremove")

    @property
    def changes(self) -> int:
        """Counts the starts and ends of changes this object sent: a report
        taken while the count stood still shows all of them."""
        return self._changes

    def touched_since(self, count: int) -> dict[tuple[str, str], tuple[int, bool]] | None:
        """The LVs (volume group, name) that changes named since ``changes``
        stood at ``count`` (a change under way then is included), each with
        the count of the latest of them and whether it removed the LV; None
        when the log no longer reaches back that far."""
        with self._changes_lock:
            if count < self._forgotten:
                return None
            # Newest first, and only back to ``count``: every stats call asks,
            # and the log holds thousands of the driver's older changes.
            touched: dict[tuple[str, str], tuple[int, bool]] = {}
            for seen, volume_group, name, removed in reversed(self._touched):
                if seen <= count:
                    break
                touched.setdefault((volume_group, name), (seen, removed))
            return touched

    def _changed(self, touches: Sequence[tuple[str, str]], removed: bool) -> None:
        with self._changes_lock:
            self._changes += 1
            for volume_group, name in touches:
                self._touched.append((self._changes, volume_group, name, removed))
            while len(self._touched) > _TOUCHED_KEPT:
                self._forgotten = self._touched.popleft()[0]

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
                *_tag_args(tags), volume_group,
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
        check_lv_names(volume_group, name)
        # Wipe signatures and zero the start: extents freed by an earlier LV
        # must never show up as a filesystem in a new volume.
        self.change(
            [
                "lvcreate", "--yes", "--name", name, "--size", f"{size_bytes}b",
                "--wipesignatures", "y", "--zero", "y",
                *_tag_args(tags), volume_group,
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
                *_tag_args(tags), f"{volume_group}/{origin}",
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
                *_tag_args(tags), f"{volume_group}/{origin}",
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

    def delete_tag(
        self, volume_group: str, name: str, tag: str, timeout: float | None = None
    ) -> None:
        check_lv_names(volume_group, name)
        self.change(
            ["lvchange", *_tag_args([tag], "--deltag"), f"{volume_group}/{name}"],
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

    def version(self, timeout: float | None = None) -> str:
        return self.run(["version"], timeout).strip()


def _tag_args(tags: Sequence[str], flag: str = "--addtag") -> list[str]:
    args: list[str] = []
    for tag in tags:
        if not TAG_RE.fullmatch(tag):
            raise LvmBadName(f"LVM tag {tag!r} has characters LVM does not accept")
        args += [flag, tag]
    return args
