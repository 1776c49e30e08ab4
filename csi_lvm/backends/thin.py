"""Thin classes: thin LVs in one thin pool, and thin snapshots.

A snapshot is an LVM thin snapshot (no copy; inactive, activation skipped).
A restore or clone is a writable thin snapshot of the snapshot or volume, so
it costs the same for any size; one larger than its source is extended
after. Virtual sizes count against ``pool size x overprovisionRatio``;
snapshots do not (they share their origin's blocks and are never written).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence

from csi_lvm import freezing, lifecycle
from csi_lvm.backends.admission import ClassSpace
from csi_lvm.backends.asks import Ask, Contents, NewLv
from csi_lvm.backends.base import Backend, Hold
from csi_lvm.block_maps import BlockMap, BlockMaps
from csi_lvm.config import DeviceClass
from csi_lvm.errors import refused_create
from csi_lvm.ids import Kind
from csi_lvm.lvm.errors import LvmError
from csi_lvm.lvm.layouts import LINEAR
from csi_lvm.lvm.records import LogicalVolume, VolumeGroup
from csi_lvm.volumes import Owned, Scan


class ThinBackend(Backend):
    # The last report's sum (the tuple of LVs it came from, the sum).
    _provisioned_memo: tuple[tuple[LogicalVolume, ...], int] | None = None
    # The pool's data layout, read again when the pool's record changes.
    _layout_memo: tuple[tuple[str, int], str] | None = None

    @property
    def pool(self) -> str:
        assert self.device_class.thin_pool is not None  # a thin class has one
        return self.device_class.thin_pool

    def missing(self, scan: Scan) -> str | None:
        missing = super().missing(scan)
        if missing is not None:
            return missing
        pool = scan.lv(self.device_class.volume_group, self.pool)
        if pool is None or not pool.attr.is_thin_pool:
            return (
                f"thin pool {self.pool!r} in volume group {self.device_class.volume_group!r} "
                f"of device class {self.device_class.name} does not exist on node "
                f"{self.inventory.node_id} ({self.inventory.config.source} line "
                f"{self.device_class.thin_pool_line})"
            )
        return self._wrong_layout(pool, scan.vgs[pool.vg_name].seqno)

    def _wrong_layout(self, pool: LogicalVolume, seqno: int) -> str | None:
        """Why the pool's data is not laid out as the class says (a class
        that says RAID1 must never put volumes on a pool without copies)."""
        wanted = self.device_class.layout.kind
        if wanted == LINEAR:
            return None
        key = (pool.uuid, seqno)  # an lvconvert of the pool's data bumps the seqno
        if self._layout_memo is None or self._layout_memo[0] != key:
            found = self.lvm.data_layout(pool.vg_name, pool.name) or "unknown"
            self._layout_memo = (key, found)
        found = self._layout_memo[1]
        if wanted in found.split(","):
            return None
        line = self.device_class.layout_line or self.device_class.line
        return (
            f"the data of thin pool {pool.full_name} of device class {self.name} is laid out "
            f"{found!r}, but the config says layout {wanted} ({self.inventory.config.source} "
            f"line {line}): convert it (lvconvert --type {wanted} {pool.full_name}_tdata) or "
            "change the layout"
        )

    def _space(self, group: VolumeGroup, scan: Scan, live: bool) -> ClassSpace:
        pool = scan.lv(group.name, self.pool)
        assert pool is not None  # else it would be missing
        provisioned = self._provisioned(group.name, scan.lvs)
        limit = math.floor(pool.size_bytes * self.device_class.overprovision_ratio)
        if live:
            pool = self._with_live_fill(pool)
        full = pool_fullness(self.device_class, pool)
        return ClassSpace(
            available_bytes=0 if full else max(0, limit - provisioned),
            extent_bytes=group.extent_bytes,
            total_bytes=limit,
            used_bytes=provisioned,
            full=full,
        )

    def _provisioned(self, volume_group: str, lvs: tuple[LogicalVolume, ...]) -> int:
        """The virtual sizes of the pool's volumes (its snapshots share their
        origins' blocks), summed once per report: every create, capacity call
        and scrape of a kept report asks again, and a sum over a thousand LVs
        each time would make them cost in proportion to the node's load."""
        memo = self._provisioned_memo
        if memo is not None and memo[0] is lvs:
            return memo[1]
        total = sum(
            lv.size_bytes
            for lv in lvs
            if lv.vg_name == volume_group and lv.pool == self.pool and not self._is_snapshot(lv)
        )
        self._provisioned_memo = (lvs, total)
        return total

    def _is_snapshot(self, lv: LogicalVolume) -> bool:
        owned = self.inventory.adopt(lv)
        return owned is not None and owned.kind is Kind.SNAPSHOT

    def room_for_snapshot(self, source: Owned, extent_bytes: int) -> int:
        # It shares its origin's blocks, but pins them: every later write to
        # the origin needs new ones, so a full pool refuses it (space.full).
        return 0

    def _with_live_fill(self, pool: LogicalVolume) -> LogicalVolume:
        """The pool with the fill the kernel counts now: tenants' writes fill
        it without telling the driver, so the scan's figures may be behind
        (the kernel's thin-pool status takes no LVM lock)."""
        fill = self.lvm.pool_fill(pool.vg_name, pool.name, 10.0)
        if fill is None:  # not active: nothing can have been written since
            return pool
        return dataclasses.replace(
            pool, data_percent=fill.data_percent, metadata_percent=fill.metadata_percent
        )

    def _create_blank(self, new: NewLv) -> None:
        group = self.device_class.volume_group
        self.lvm.create_thin_volume(group, self.pool, new.name, new.size, new.tags, new.timeout)

    def _create_from(self, new: NewLv, source: Owned) -> Owned:
        tags = [*new.tags, *lifecycle.copy_tags(Kind.VOLUME, by_copy=False)]
        self._thin_snapshot(new, source, tags, active=True)
        with self._removed_on_failure(new.name):
            return self._extended(self._made(new.name, new.timeout), new.size, new.timeout)

    def _snapshot(self, new: NewLv, source: Owned) -> Owned:
        self._thin_snapshot(new, source, new.tags, active=False)
        return self._made(new.name, new.timeout)

    def make_snapshots_at_once(
        self, members: Sequence[tuple[Ask, Owned]], scan: Scan, hold: Hold
    ) -> list[Owned]:
        """All are admitted first; then ``hold`` runs the cutting of every
        snapshot, and nothing else, while it holds the sources' writes. A
        failure removes every snapshot made here."""
        with contextlib.ExitStack() as admitted, contextlib.ExitStack() as undone:
            news = [
                admitted.enter_context(self._admitted(ask, source, scan, snapshot=True))
                for ask, source in members
            ]

            def cut() -> None:
                for new, (ask, source) in zip(news, members, strict=True):
                    try:
                        self._thin_snapshot(new, source, new.tags, active=False)
                    except LvmError as exc:  # answered as the hold sees it
                        raise refused_create(exc, self._create_refusal(exc, ask, new.size)) from exc
                    undone.enter_context(self._removed_on_failure(new.name))

            hold(cut)
            return [self._made(new.name, new.timeout) for new in news]

    def _thin_snapshot(
        self, new: NewLv, source: Owned, tags: Sequence[str], *, active: bool
    ) -> None:
        """A restore or clone is made active; a snapshot inactive, with
        activation skipped (see ``csi_lvm.lifecycle``)."""
        group = self.device_class.volume_group
        freezing.commit_btrfs(source.data_device())
        self.lvm.create_thin_snapshot(
            group, source.lv.name, new.name, tags, active=active, timeout=new.timeout
        )

    def _create_for_copy(self, new: NewLv) -> None:
        """A new thin LV maps no block, so it reads zeros wherever the copy
        writes nothing: only the source's allocated ranges are written, and a
        thin restore stays thin."""
        group = self.device_class.volume_group
        tags = [*new.tags, *lifecycle.copy_tags(Kind.VOLUME, by_copy=True)]
        self.lvm.create_thin_volume(group, self.pool, new.name, new.size, tags, new.timeout)

    def prepare_for_copy(self, lv: LogicalVolume) -> None:
        """Nothing: what a crash left written is written again, the rest
        maps no block."""

    def make_view(self, source: Owned, name: str, tags: Sequence[str], extent_bytes: int) -> None:
        """A thin snapshot: instant, and it cannot overflow."""
        freezing.commit_btrfs(source.data_device())
        self.lvm.create_thin_snapshot(source.lv.vg_name, source.lv.name, name, tags, active=False)

    def data_ranges(self, point: Owned, maps: BlockMaps, timeout: float | None) -> BlockMap:
        """The chunks the pool maps for it (its metadata's, as SnapshotMetadata
        answers them)."""
        return maps.allocated(point, timeout)

    def _resume(self, existing: Owned, source: Owned | None, new: NewLv) -> Owned:
        # A restore or clone interrupted between snapshot and extend: the
        # snapshot is as large as its source was; extend it now.
        if existing.kind is Kind.VOLUME and existing.source_id:
            return self._extended(existing, new.size, new.timeout)
        return existing

    def _extended(self, owned: Owned, size: int, timeout: float | None) -> Owned:
        if owned.size_bytes >= size:
            return owned
        self.lvm.extend(owned.lv.vg_name, owned.lv.name, size, timeout)
        return self._made(owned.lv.name, timeout)

    @staticmethod
    def reported_unmapped(lv: LogicalVolume) -> bool:
        """Whether LVM's report shows an active thin LV with no block of its
        pool mapped: ``data_percent`` 0.00. It is rounded, so the device's
        own count settles it (``contents``)."""
        return lv.attr.is_thin_volume and lv.attr.active and lv.data_percent == 0.0

    def contents(self, lv: LogicalVolume) -> Contents:
        """A thin LV that maps no block of its pool holds nothing and reads
        zeros all through; in a pool that zeroes each block it maps before the
        first write lands in it, a block partly written later still reads
        zeros in the rest."""
        if not self.reported_unmapped(lv):
            return Contents(blank=False, reads_zeros=False)
        blank = self.lvm.thin_mapped_sectors(lv) == 0
        return Contents(blank=blank, reads_zeros=blank and lv.attr.zeroes_new_blocks)

    def storage_problem(self, scan: Scan) -> str | None:
        pool = scan.lv(self.device_class.volume_group, self.pool)
        if pool is None:
            return f"its thin pool {self.pool} is missing"
        return (
            super().storage_problem(scan)
            or pool_fullness(self.device_class, pool)
            or self.leaks_old_data(pool)
        )

    def leaks_old_data(self, pool: LogicalVolume) -> str | None:
        """Why the pool can show a volume an earlier tenant's bytes, unless
        the config accepts that."""
        if pool.attr.zeroes_new_blocks or self.device_class.allow_pool_without_zeroing:
            return None
        return (
            f"thin pool {pool.full_name} does not zero the blocks it maps (made with "
            "lvcreate --zero n, or thin_pool_zero = 0): a volume reads an earlier tenant's "
            f"data in every block it writes only in part. Run lvchange --zero y "
            f"{pool.full_name}, or set allowPoolWithoutZeroing: true in device class "
            f"{self.device_class.name} if its users zero what they write themselves"
        )

    def warning(self, scan: Scan) -> str | None:
        pool = scan.lv(self.device_class.volume_group, self.pool)
        leak = None if pool is None else self.leaks_old_data(pool)
        return leak or super().warning(scan)


def pool_fullness(device_class: DeviceClass, pool: LogicalVolume) -> str | None:
    """Why a thin pool should take no new volumes, or None while it has headroom.

    Past the threshold, the blocks left belong to the volumes that exist: a new
    volume would only bring the moment their writes fail closer."""
    if pool.attr.problem is not None:
        return f"thin pool {pool.full_name}: {pool.attr.problem}"
    threshold = device_class.full_threshold_percent
    for what, percent in (("data", pool.data_percent), ("metadata", pool.metadata_percent)):
        if percent is not None and percent >= threshold:
            return (
                f"thin pool {pool.full_name} is {percent:g}% full of {what} (device class "
                f"{device_class.name} stops at {threshold:g}%); writes fail when it reaches "
                "100%: extend the pool (lvextend) or delete volumes and snapshots"
            )
    return None
