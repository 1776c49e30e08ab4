"""The only code that runs LVM.

Every command goes through ``Lvm.run``: an argument list (never a shell),
``LC_ALL=C`` so messages can be classified, and a timeout taken from the
caller's deadline. Reads always ask for JSON reports in bytes and decode them
into typed records; the ``lv_attr`` string is decoded once, here, into named
states. Failures become the domain errors of ``csi_lvm.errors``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import structlog

from csi_lvm.errors import (
    AlreadyExists,
    DeadlineExceeded,
    DriverError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)

log = structlog.get_logger("csi_lvm.lvm")

LV_FIELDS = (
    "lv_name,vg_name,lv_uuid,lv_size,lv_attr,pool_lv,origin,lv_tags,"
    "data_percent,metadata_percent,lv_path,lv_dm_path,lv_time"
)
VG_COLUMNS = "vg_size,vg_free,vg_extent_size,vg_attr,vg_missing_pv_count"
VG_FIELDS = f"vg_name,{VG_COLUMNS}"
_NAME_RE = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")
_TAG_RE = re.compile(r"[A-Za-z0-9_+.:/=!&#][A-Za-z0-9_+.:/=!&#-]{0,1023}")


class LvmError(Internal):
    """An LVM command failed for a reason we could not classify."""


class LvmNotFound(NotFound):
    pass


class LvmAlreadyExists(AlreadyExists):
    pass


class LvmNoSpace(ResourceExhausted):
    pass


class LvmInUse(FailedPrecondition):
    """The LV is open (mounted, or read by a copy), so LVM will not remove it."""


# --------------------------------------------------------------------- records


@dataclass(frozen=True)
class LvAttr:
    """The ten characters of ``lv_attr``, named (see lvs(8))."""

    raw: str

    def _char(self, index: int) -> str:
        return self.raw[index] if len(self.raw) > index else "-"

    @property
    def is_thin_pool(self) -> bool:
        return self._char(0) == "t"

    @property
    def is_thin_volume(self) -> bool:
        return self._char(0) == "V"

    @property
    def is_cow_snapshot(self) -> bool:
        """A classic (copy-on-write) snapshot, valid or not."""
        return self._char(0) in "sS"

    @property
    def snapshot_invalid(self) -> bool:
        """A classic snapshot whose COW space overflowed: its view is lost."""
        return self._char(0) == "S" or self._char(4) in "IS"

    @property
    def active(self) -> bool:
        return self._char(4) == "a"

    @property
    def device_open(self) -> bool:
        return self._char(5) == "o"

    @property
    def skip_activation(self) -> bool:
        return self._char(9) == "k"

    @property
    def problem(self) -> str | None:
        """A sentence for the first health problem LVM reports, else None."""
        state, health = self._char(4), self._char(8)
        health_text = {
            "p": "a physical volume under it is missing (partial)",
            "r": "a RAID image needs refresh",
            "m": "RAID images have mismatches",
            "F": "the thin pool or volume has failed",
            "D": "its thin pool is out of data space",
            "M": "its thin pool metadata is read-only (out of metadata space or damaged)",
            "X": "LVM cannot tell its health",
        }
        state_text = {
            "s": "the device is suspended",
            "I": "the snapshot is invalid",
            "S": "the snapshot is invalid and suspended",
            "d": "the device is mapped without a table",
            "i": "the device has only an inactive table",
            "c": "the thin pool needs a check",
            "C": "the thin pool is suspended and needs a check",
            "X": "LVM cannot tell its state",
        }
        if health in health_text:
            return health_text[health]
        return state_text.get(state)


@dataclass(frozen=True)
class LogicalVolume:
    name: str
    vg_name: str
    uuid: str
    size_bytes: int
    attr: LvAttr
    pool: str
    origin: str
    tags: tuple[str, ...]
    data_percent: float | None
    metadata_percent: float | None
    path: str
    dm_path: str
    created: str

    @property
    def full_name(self) -> str:
        return f"{self.vg_name}/{self.name}"

    @property
    def created_at(self) -> datetime | None:
        try:
            return datetime.strptime(self.created, "%Y-%m-%d %H:%M:%S %z")
        except ValueError:
            return None

    @property
    def device(self) -> str:
        """The device node; the dm path exists whether or not udev made links."""
        return self.dm_path or self.path


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    size_bytes: int
    free_bytes: int
    extent_bytes: int
    attr: str
    missing_pvs: int

    @property
    def partial(self) -> bool:
        return self.missing_pvs > 0 or (len(self.attr) > 3 and self.attr[3] == "p")


def _int(value: str) -> int:
    return int(value) if value else 0


def _percent(value: str) -> float | None:
    return float(value) if value else None


def parse_lv_report(report: dict[str, object]) -> list[LogicalVolume]:
    rows = _report_rows(report, "lv")
    return [
        LogicalVolume(
            name=row["lv_name"],
            vg_name=row["vg_name"],
            uuid=row.get("lv_uuid", ""),
            size_bytes=_int(row.get("lv_size", "")),
            attr=LvAttr(row.get("lv_attr", "")),
            pool=row.get("pool_lv", ""),
            origin=row.get("origin", ""),
            tags=tuple(t for t in row.get("lv_tags", "").split(",") if t),
            data_percent=_percent(row.get("data_percent", "")),
            metadata_percent=_percent(row.get("metadata_percent", "")),
            path=row.get("lv_path", ""),
            dm_path=row.get("lv_dm_path", ""),
            created=row.get("lv_time", ""),
        )
        for row in rows
    ]


def parse_vg_report(report: dict[str, object], section: str = "vg") -> list[VolumeGroup]:
    """VG records from a ``vgs`` report, or from the VG columns of an ``lvs``
    report (``section="lv"``; one record per VG)."""
    rows = list({row["vg_name"]: row for row in _report_rows(report, section)}.values())
    return [
        VolumeGroup(
            name=row["vg_name"],
            size_bytes=_int(row.get("vg_size", "")),
            free_bytes=_int(row.get("vg_free", "")),
            extent_bytes=_int(row.get("vg_extent_size", "")),
            attr=row.get("vg_attr", ""),
            missing_pvs=_int(row.get("vg_missing_pv_count", "")),
        )
        for row in rows
    ]


def _report_rows(report: dict[str, object], kind: str) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    sections = report.get("report", [])
    if not isinstance(sections, list):
        raise LvmError(f"unexpected LVM report shape: {str(report)[:200]}")
    for section in sections:
        for row in section.get(kind, []):
            rows.append({str(k): str(v) for k, v in row.items()})
    return rows


# --------------------------------------------------------------------- errors

_CLASSIFIERS: tuple[tuple[re.Pattern[str], type[DriverError]], ...] = (
    (re.compile(r"already exists", re.I), LvmAlreadyExists),
    (
        re.compile(
            r"insufficient (free|suitable)|not enough free|free space in thin pool|"
            r"over (the )?threshold|exceeds the size of thin pool|no free extents",
            re.I,
        ),
        LvmNoSpace,
    ),
    (
        re.compile(
            r"failed to find logical volume|volume group \S+ not found|"
            r"logical volume \S+ not found|not found in volume group",
            re.I,
        ),
        LvmNotFound,
    ),
    (re.compile(r"\bin use\b|open logical volume", re.I), LvmInUse),
)


def classify_failure(command: Sequence[str], returncode: int, stderr: str) -> DriverError:
    """The domain error for a failed LVM command, from its message."""
    message = " ".join(line.strip() for line in stderr.splitlines() if line.strip())
    message = message or f"exit code {returncode}"
    for pattern, error in _CLASSIFIERS:
        if pattern.search(message):
            return error(message)
    verb = command[1] if len(command) > 1 else "lvm"
    return LvmError(f"lvm {verb} failed: {message}")


# --------------------------------------------------------------------- runner


def check_name(name: str, what: str) -> None:
    """Names reach LVM only once they match LVM's own grammar."""
    if not _NAME_RE.fullmatch(name) or name in {".", ".."}:
        raise InvalidArgument(f"{what} {name!r} is not a valid LVM name")


class Lvm:
    """Runs LVM commands and decodes their reports.

    ``prefix`` runs every command through another program (``nsenter`` into
    the host's namespaces, for example); ``binary`` is the ``lvm`` tool.
    """

    def __init__(self, binary: str = "lvm", prefix: Sequence[str] = (), timeout: float = 120.0):
        self.binary = binary
        self.prefix = list(prefix)
        self.timeout = timeout
        self._env = {
            **os.environ,
            "LC_ALL": "C",
            "LVM_SUPPRESS_FD_WARNINGS": "1",
        }

    def run(self, args: Sequence[str], timeout: float | None = None) -> str:
        command = [*self.prefix, self.binary, *args]
        limit = self.timeout if timeout is None else max(0.1, min(timeout, self.timeout))
        started = time.monotonic()
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                env=self._env,
                timeout=limit,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise DeadlineExceeded(
                f"lvm {args[0]} did not finish within {limit:.1f}s; the call may be retried"
            ) from exc
        except FileNotFoundError as exc:
            raise FailedPrecondition(
                f"the LVM tool {self.binary!r} is not installed on this node"
            ) from exc
        elapsed = time.monotonic() - started
        log.debug("lvm", args=list(args), rc=done.returncode, seconds=round(elapsed, 3))
        if done.returncode != 0:
            raise classify_failure(command[len(self.prefix) :], done.returncode, done.stderr)
        return done.stdout

    def _report(self, args: Sequence[str], timeout: float | None) -> dict[str, object]:
        out = self.run([*args, "--reportformat", "json", "--units", "b", "--nosuffix"], timeout)
        try:
            report = json.loads(out)
        except json.JSONDecodeError as exc:
            raise LvmError(
                f"lvm {args[0]} printed a report that is not JSON: {out[:200]!r}"
            ) from exc
        if not isinstance(report, dict):
            raise LvmError(f"lvm {args[0]} printed an unexpected report: {out[:200]!r}")
        return report

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
        return parse_lv_report(self._report(["lvs", "-o", LV_FIELDS, *groups], timeout))

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
        report = self._report(["lvs", "-o", f"{LV_FIELDS},{VG_COLUMNS}", *groups], timeout)
        lvs = parse_lv_report(report)
        vgs = parse_vg_report(report, "lv")
        without_lvs = set(groups) - {vg.name for vg in vgs}
        if without_lvs:
            vgs += self.list_vgs(without_lvs, timeout)
        return lvs, vgs

    def find_lv(
        self, volume_group: str, name: str, timeout: float | None = None
    ) -> LogicalVolume | None:
        check_name(volume_group, "volume group")
        check_name(name, "logical volume")
        select = f"lv_name={name}"
        lvs = parse_lv_report(
            self._report(["lvs", "-o", LV_FIELDS, "-S", select, volume_group], timeout)
        )
        return lvs[0] if lvs else None

    def list_vgs(
        self, names: Iterable[str] = (), timeout: float | None = None
    ) -> list[VolumeGroup]:
        """The named volume groups that exist (all of them when none are named)."""
        groups = sorted(set(names))
        for group in groups:
            check_name(group, "volume group")
        select = ["-S", "vg_name=" + "||vg_name=".join(groups)] if groups else []
        # A select keeps a missing VG from failing the whole report.
        return parse_vg_report(self._report(["vgs", "-o", VG_FIELDS, *select], timeout))

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
        check_name(volume_group, "volume group")
        check_name(pool, "thin pool")
        check_name(name, "logical volume")
        self.run(
            [
                "lvcreate", "--yes", "--name", name,
                "--virtualsize", f"{size_bytes}b", "--thinpool", pool,
                *_tag_args(tags), volume_group,
            ],
            timeout,
        )  # fmt: skip

    def create_linear_volume(
        self,
        volume_group: str,
        name: str,
        size_bytes: int,
        tags: Sequence[str],
        timeout: float | None = None,
    ) -> None:
        check_name(volume_group, "volume group")
        check_name(name, "logical volume")
        # Wipe signatures and zero the start: extents freed by an earlier LV
        # must never show up as a filesystem in a new volume.
        self.run(
            [
                "lvcreate", "--yes", "--name", name, "--size", f"{size_bytes}b",
                "--wipesignatures", "y", "--zero", "y",
                *_tag_args(tags), volume_group,
            ],
            timeout,
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
        check_name(volume_group, "volume group")
        check_name(origin, "logical volume")
        check_name(name, "logical volume")
        activation = (
            ["--setactivationskip", "n", "--activate", "y", "--ignoreactivationskip"]
            if active
            else ["--setactivationskip", "y", "--activate", "n"]
        )
        self.run(
            [
                "lvcreate", "--yes", "--snapshot", "--name", name, *activation,
                *_tag_args(tags), f"{volume_group}/{origin}",
            ],
            timeout,
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
        check_name(volume_group, "volume group")
        check_name(origin, "logical volume")
        check_name(name, "logical volume")
        self.run(
            [
                "lvcreate", "--yes", "--snapshot", "--name", name,
                "--size", f"{size_bytes}b", "--chunksize", f"{chunk_bytes // 1024}k",
                "--setactivationskip", "n", "--activate", "y",
                *_tag_args(tags), f"{volume_group}/{origin}",
            ],
            timeout,
        )  # fmt: skip

    def remove(self, volume_group: str, name: str, timeout: float | None = None) -> None:
        check_name(volume_group, "volume group")
        check_name(name, "logical volume")
        self.run(["lvremove", "--yes", f"{volume_group}/{name}"], timeout)

    def activate(self, volume_group: str, name: str, timeout: float | None = None) -> None:
        check_name(volume_group, "volume group")
        check_name(name, "logical volume")
        self.run(
            ["lvchange", "--activate", "y", "--ignoreactivationskip", f"{volume_group}/{name}"],
            timeout,
        )

    def extend(
        self, volume_group: str, name: str, size_bytes: int, timeout: float | None = None
    ) -> None:
        check_name(volume_group, "volume group")
        check_name(name, "logical volume")
        self.run(
            ["lvextend", "--yes", "--size", f"{size_bytes}b", f"{volume_group}/{name}"], timeout
        )

    def delete_tag(
        self, volume_group: str, name: str, tag: str, timeout: float | None = None
    ) -> None:
        check_name(volume_group, "volume group")
        check_name(name, "logical volume")
        self.run(["lvchange", *_tag_args([tag], "--deltag"), f"{volume_group}/{name}"], timeout)

    def version(self, timeout: float | None = None) -> str:
        return self.run(["version"], timeout).strip()


def _tag_args(tags: Sequence[str], flag: str = "--addtag") -> list[str]:
    args: list[str] = []
    for tag in tags:
        if not _TAG_RE.fullmatch(tag):
            raise InvalidArgument(f"LVM tag {tag!r} has characters LVM does not accept")
        args += [flag, tag]
    return args
