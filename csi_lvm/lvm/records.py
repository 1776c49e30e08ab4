"""Typed records of LVM's JSON reports: logical volumes, volume groups and
the ``lv_attr`` string decoded into named states (see lvs(8)); and of the
kernel's status line of a thin pool (``dmsetup status``): its live fill.

Pure decoding, no I/O; what the records mean for volumes and filesystems is
decided above this package.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime

from csi_lvm.lvm.errors import LvmError

# The columns every LV record is read with, and the VG columns an ``lvs``
# report can carry beside them (one report answers both).
LV_FIELDS = (
    "lv_name,vg_name,lv_uuid,lv_size,lv_attr,pool_lv,origin,lv_tags,"
    "data_percent,metadata_percent,lv_path,lv_dm_path,lv_time"
)
VG_COLUMNS = (
    "vg_size,vg_free,vg_extent_size,vg_attr,vg_missing_pv_count,vg_mda_size,vg_mda_free,vg_seqno"
)
VG_FIELDS = f"vg_name,{VG_COLUMNS}"
# Asked for only where the thin pool's own metadata is read: a thin LV's
# device id in its pool, and a pool's chunk size.
THIN_FIELDS = f"{LV_FIELDS},thin_id,chunk_size"
# A RAID LV's state beyond lv_attr (whose health character tells of images
# that differ): its sync, and the blocks that failed their integrity checksums.
RAID_FIELDS = "lv_name,vg_name,lv_attr,sync_percent,raid_sync_action,integritymismatches"
# A VG's PVs, for classes whose LVs need room on several of them at once.
PV_FIELDS = "pv_name,vg_name,pv_size,pv_free,pv_attr"


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
    def is_cow_origin(self) -> bool:
        """An LV with classic (copy-on-write) snapshots of it."""
        return self._char(0) in "oO"

    @property
    def is_cow_snapshot(self) -> bool:
        """A classic (copy-on-write) snapshot, valid or not."""
        return self._char(0) in "sS"

    @property
    def snapshot_invalid(self) -> bool:
        """A classic snapshot whose COW space overflowed: its view is lost."""
        return self._char(0) == "S" or self._char(4) in "IS"

    @property
    def is_raid(self) -> bool:
        return self._char(0) in "rR"

    @property
    def health(self) -> str:
        """LVM's health character ('-' when nothing is wrong)."""
        return self._char(8)

    @property
    def active(self) -> bool:
        return self._char(4) == "a"

    @property
    def zeroes_new_blocks(self) -> bool:
        """A thin pool, or a thin LV of one, that fills each block it maps
        with zeros before the first write lands in it."""
        return self._char(7) == "z"

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
            "D": "the thin pool is out of data space",
            "M": "the thin pool metadata is read-only (out of metadata space or damaged)",
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
    thin_id: int | None = None  # a thin LV's device id in its pool (THIN_FIELDS)
    chunk_bytes: int = 0  # a thin pool's chunk size (THIN_FIELDS)

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
    # LVM's metadata area (the smallest of the VG's copies) and the room left
    # in it: each LV's record takes some, and a full area takes no new LV.
    metadata_area_bytes: int = 0
    metadata_free_bytes: int = 0
    seqno: int = 0  # bumped by every change of the VG's metadata, by anyone

    @property
    def partial(self) -> bool:
        return self.missing_pvs > 0 or (len(self.attr) > 3 and self.attr[3] == "p")


@dataclass(frozen=True)
class RaidState:
    attr: LvAttr  # as of this report, fresher than a kept view's
    sync_percent: float | None
    sync_action: str  # idle, resync, recover, check, repair, frozen
    integrity_mismatches: int  # blocks whose checksum failed (read from another image)

    @property
    def syncing(self) -> bool:
        """Copying to an image that is not yet in sync (after a create, a
        repair or a returned device): until done, one failure loses data."""
        in_sync = self.sync_percent is None or self.sync_percent >= 100.0
        return not in_sync and self.sync_action in ("resync", "recover", "frozen", "")


@dataclass(frozen=True)
class PhysicalVolume:
    name: str
    vg_name: str
    size_bytes: int
    free_bytes: int
    attr: str

    @property
    def missing(self) -> bool:
        """LVM's metadata names the PV, but its device is not there."""
        return len(self.attr) > 2 and self.attr[2] == "m"


@dataclass(frozen=True)
class PoolFill:
    """How full a thin pool is now, as the kernel counts it: tenants' writes
    fill a pool without telling anyone, and LVM's reports say the same only
    rounded, and as of when they ran."""

    data_percent: float
    metadata_percent: float
    mode: str  # rw, ro (metadata trouble), out_of_data_space
    needs_check: bool  # the kernel wants the metadata checked (thin_check)


@dataclass(frozen=True)
class PoolStatus:
    """A thin pool's status line, the parts that matter here."""

    device: str  # the device-mapper name messages go to
    transaction_id: int
    held_root: int | None  # the metadata snapshot's block, None when none is held
    mode: str  # rw, ro, out_of_data_space
    metadata_blocks: tuple[int, int]  # used, total
    data_blocks: tuple[int, int]  # used, total
    needs_check: bool

    @property
    def data_percent(self) -> float:
        return _share(self.data_blocks)

    @property
    def metadata_percent(self) -> float:
        return _share(self.metadata_blocks)

    @property
    def fill(self) -> PoolFill:
        return PoolFill(self.data_percent, self.metadata_percent, self.mode, self.needs_check)


def _share(used_of: tuple[int, int]) -> float:
    used, total = used_of
    return 100.0 * used / total if total else 0.0


def _used_of(field: str) -> tuple[int, int] | None:
    used, _, total = field.partition("/")
    return (int(used), int(total)) if used.isdigit() and total.isdigit() else None


def parse_pool_status(device: str, line: str) -> PoolStatus | None:
    """``dmsetup status`` of a thin-pool target: ``<start> <length> thin-pool
    <transaction> <used>/<total meta> <used>/<total data> <held root>|-
    rw|ro|out_of_data_space ... needs_check|- ...`` (dm-thin's documentation);
    None when the line is not a thin pool's (a linear device, or a pool the
    kernel reports as ``Fail``)."""
    fields = line.split()
    if len(fields) < 8 or fields[2] != "thin-pool" or not fields[3].isdigit():
        return None
    metadata, data = _used_of(fields[4]), _used_of(fields[5])
    if metadata is None or data is None:
        return None
    held = fields[6]
    return PoolStatus(
        device=device,
        transaction_id=int(fields[3]),
        held_root=int(held) if held.isdigit() else None,
        mode=fields[7],
        metadata_blocks=metadata,
        data_blocks=data,
        needs_check="needs_check" in fields[8:],
    )


def _int(value: object) -> int:
    return int(str(value)) if value else 0


def _percent(value: object) -> float | None:
    return float(str(value)) if value else None


@functools.lru_cache(maxsize=8192)
def _created(value: str) -> str:
    """``lv_time`` as LVM prints it by default; a profile may ask for seconds
    since the epoch (the lvm shell's does), which is turned into that form.
    Kept for the LVs of recent reports: every report repeats them all."""
    if value.isdigit():
        when = datetime.fromtimestamp(int(value), UTC)
        return when.strftime("%Y-%m-%d %H:%M:%S %z")
    return value


def parse_lv_report(report: dict[str, object]) -> list[LogicalVolume]:
    # A report of every LV is read each refresh of the kept view: its rows
    # are read where they are, each value through str() (LVM's JSON holds
    # strings; a row with anything else is still read safely).
    records = []
    for row in _report_rows(report, "lv"):
        get = row.get
        thin_id = str(get("thin_id", ""))
        records.append(
            LogicalVolume(
                name=str(row["lv_name"]),
                vg_name=str(row["vg_name"]),
                uuid=str(get("lv_uuid", "")),
                size_bytes=_int(get("lv_size", "")),
                attr=LvAttr(str(get("lv_attr", ""))),
                pool=str(get("pool_lv", "")),
                origin=str(get("origin", "")),
                tags=tuple(t for t in str(get("lv_tags", "")).split(",") if t),
                data_percent=_percent(get("data_percent", "")),
                metadata_percent=_percent(get("metadata_percent", "")),
                path=str(get("lv_path", "")),
                dm_path=str(get("lv_dm_path", "")),
                created=_created(str(get("lv_time", ""))),
                thin_id=int(thin_id) if thin_id.isdigit() else None,
                chunk_bytes=_int(get("chunk_size", "")),
            )
        )
    return records


def parse_vg_report(report: dict[str, object], section: str = "vg") -> list[VolumeGroup]:
    """VG records from a ``vgs`` report, or from the VG columns of an ``lvs``
    report (``section="lv"``; one record per VG)."""
    rows: dict[str, dict[str, object]] = {}
    for row in _report_rows(report, section):
        rows.setdefault(str(row["vg_name"]), row)
    return [
        VolumeGroup(
            name=name,
            size_bytes=_int(row.get("vg_size", "")),
            free_bytes=_int(row.get("vg_free", "")),
            extent_bytes=_int(row.get("vg_extent_size", "")),
            attr=str(row.get("vg_attr", "")),
            missing_pvs=_int(row.get("vg_missing_pv_count", "")),
            metadata_area_bytes=_int(row.get("vg_mda_size", "")),
            metadata_free_bytes=_int(row.get("vg_mda_free", "")),
            seqno=_int(row.get("vg_seqno", "")),
        )
        for name, row in rows.items()
    ]


def parse_raid_state(report: dict[str, object]) -> RaidState | None:
    rows = _report_rows(report, "lv")
    if not rows:
        return None
    row = rows[0]
    return RaidState(
        attr=LvAttr(str(row.get("lv_attr", ""))),
        sync_percent=_percent(row.get("sync_percent", "")),
        sync_action=str(row.get("raid_sync_action", "")),
        integrity_mismatches=_int(row.get("integritymismatches", "")),
    )


def parse_lv_layouts(report: dict[str, object]) -> dict[str, str]:
    """Each LV's ``lv_layout`` (``linear``, ``striped``, ``raid,raid1``, ...), by name."""
    rows = _report_rows(report, "lv")  # a hidden LV's name is in brackets: [pool_tdata]
    return {str(row["lv_name"]).strip("[]"): str(row.get("lv_layout", "")) for row in rows}


def parse_pv_report(report: dict[str, object]) -> list[PhysicalVolume]:
    return [
        PhysicalVolume(
            name=str(row.get("pv_name", "")),
            vg_name=str(row.get("vg_name", "")),
            size_bytes=_int(row.get("pv_size", "")),
            free_bytes=_int(row.get("pv_free", "")),
            attr=str(row.get("pv_attr", "")),
        )
        for row in _report_rows(report, "pv")
    ]


def _report_rows(report: dict[str, object], kind: str) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    sections = report.get("report", [])
    if not isinstance(sections, list):
        raise LvmError(f"unexpected LVM report shape: {str(report)[:200]}")
    for section in sections:
        found = section.get(kind, []) if isinstance(section, dict) else []
        rows.extend(row for row in found if isinstance(row, dict))
    return rows
