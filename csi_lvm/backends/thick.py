"""Thick classes: LVs in a volume group, laid out as the class says
(linear, striped, RAID: ``csi_lvm.lvm.layouts``); snapshots, restores and
clones by copy.

A thick class has no thin pool to share blocks, so each of these is a copy:

1. ``ThickBackend`` creates the target LV, tagged like any snapshot or volume
   plus ``COPYING_TAG`` (one ``lvcreate``: no LV ever exists without its tags);
2. ``ThickCopier.fill`` takes a point-in-time view of the source (a temporary
   classic COW snapshot, ``<target>.view``, when the source is a volume that
   may be written meanwhile; a snapshot is never written and is read as is),
   copies it block by block into the target (``blockcopy``), checks that the
   view did not overflow, removes it, and only then deletes ``COPYING_TAG``
   (``Lifecycle.copied``).

A group snapshot (``make_snapshots_at_once``) does the same for each member,
except that the views of all members are taken while the group's writes are
held, and nothing else is: the copies read them once the writes go on.

LVM takes no COW snapshot of a RAID LV with dm-integrity, so in a class with
``integrity`` a volume is copied from itself, only while nothing uses it: it
must not be open, and the copy holds its exclusive claim (O_EXCL), so nothing
mounts it meanwhile. Group snapshots and views for copies across nodes are
refused there.

A crash anywhere leaves the tag on the target, so the target is never taken
for a finished copy; the retry of the same call finds it, removes a stale view
(one that carries this driver's tags for that target, nothing else) and
redoes the copy. The copy's result outlives the caller's deadline: LVM
commands after the copy started use the driver's own timeout, so a sidecar's
retry finds the work done instead of repeating it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import structlog

from csi_lvm import blockcopy, freezing, lifecycle
from csi_lvm.backends.admission import ClassSpace
from csi_lvm.backends.asks import Ask, NewLv
from csi_lvm.backends.base import Backend, Hold
from csi_lvm.block_maps import BlockMap, BlockMaps
from csi_lvm.block_ranges import RangeSpool
from csi_lvm.config import DeviceClass
from csi_lvm.errors import Aborted, AlreadyExists, FailedPrecondition, refused_create
from csi_lvm.ids import Kind, Tag, encode_tags, view_name_for
from csi_lvm.lifecycle import MAKING_TAG, Lifecycle
from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.errors import LvmError
from csi_lvm.lvm.layouts import LINEAR, PLAIN, RAID1, Layout
from csi_lvm.lvm.records import LogicalVolume, PhysicalVolume, VolumeGroup
from csi_lvm.volumes import Inventory, Owned, Scan

log = structlog.get_logger("csi_lvm.backends.thick")

MiB = 1 << 20
# COW space of the temporary view: what the source may be written during the
# copy before the view is lost (the copy then fails with ABORTED, never with
# wrong data). A fifth of the source, at least 64 MiB, at most the source.
VIEW_FRACTION = 5
VIEW_MINIMUM_BYTES = 64 * MiB
VIEW_CHUNK_BYTES = 64 << 10  # COW granularity (LVM's default of 4 KiB is slow to read)


def view_bytes(source_bytes: int, extent_bytes: int) -> int:
    """COW space for a view of a ``source_bytes`` volume, in whole extents."""
    wanted = min(source_bytes, max(source_bytes // VIEW_FRACTION, VIEW_MINIMUM_BYTES))
    return -(-wanted // extent_bytes) * extent_bytes


def create_view(lvm: Lvm, source: Owned, name: str, tags: Sequence[str], extent_bytes: int) -> None:
    """``name``: a classic COW snapshot of ``source`` with ``view_bytes`` of
    room for the changes written while a copy reads it."""
    size = view_bytes(source.size_bytes, extent_bytes)
    freezing.commit_btrfs(source.data_device())
    lvm.create_cow_snapshot(source.lv.vg_name, source.lv.name, name, size, VIEW_CHUNK_BYTES, tags)


def view_intact(lvm: Lvm, view: LogicalVolume) -> bool:
    """Whether the COW view still shows its point in time (it is there, not
    invalidated, its room not full)."""
    now = lvm.find_lv(view.vg_name, view.name)
    full = now is not None and (now.data_percent or 0) >= 100
    return not (now is None or now.attr.snapshot_invalid or full)


class ThickBackend(Backend):
    # Every new thick LV is written all through: zeroed, or filled by a copy.
    slow_to_make = True

    def __init__(self, device_class: DeviceClass, inventory: Inventory, states: Lifecycle):
        super().__init__(device_class, inventory, states)
        self.copier = ThickCopier(inventory, states, views=not device_class.layout.integrity)
        self._pv_memo: tuple[tuple[str, int, int], list[PhysicalVolume]] | None = None

    def missing(self, scan: Scan) -> str | None:
        missing = super().missing(scan)
        layout = self.device_class.layout
        if missing is not None or layout.is_linear:
            return missing
        group = scan.vgs[self.device_class.volume_group]
        present = [pv for pv in self._pvs(group) if not pv.missing]
        if len(present) >= layout.images:
            return None
        line = self.device_class.layout_line or self.device_class.line
        return (
            f"volume group {group.name} of device class {self.name} on node {self.node_id} "
            f"has {len(present)} physical volumes present, and layout {layout.describe()} "
            f"needs {layout.images}, each image on a PV of its own: add PVs (vgextend) or "
            f"change the layout ({self.inventory.config.source} line {line})"
        )

    def _space(self, group: VolumeGroup, scan: Scan, live: bool) -> ClassSpace:
        layout = self.device_class.layout
        used = group.size_bytes - group.free_bytes
        if layout.is_linear:
            available = group.free_bytes
        else:  # what fits with each image on a PV of its own
            extent = group.extent_bytes
            free = [pv.free_bytes // extent for pv in self._pvs(group) if not pv.missing]
            available = layout.largest(free, extent)
        return ClassSpace(
            available_bytes=available,
            extent_bytes=group.extent_bytes * layout.stripes,
            total_bytes=layout.usable_share(group.size_bytes),
            used_bytes=layout.usable_share(used),
        )

    def _pvs(self, group: VolumeGroup) -> list[PhysicalVolume]:
        """The VG's PVs as of the scan's metadata: read again only when the
        VG's metadata changed (its seqno) or a PV went missing or came back,
        so a capacity call costs no report of its own."""
        key = (group.name, group.seqno, group.missing_pvs)
        memo = self._pv_memo
        if memo is None or memo[0] != key:
            memo = self._pv_memo = (key, self.lvm.list_pvs(group.name))
        return memo[1]

    def room_for_volume(self, size: int, source: Owned | None, extent_bytes: int) -> int:
        if source is None:
            return size
        return self.copier.room_needed(source, size, extent_bytes)

    def room_for_snapshot(self, source: Owned, extent_bytes: int) -> int:
        return self.copier.room_needed(source, source.size_bytes, extent_bytes)

    def _create_blank(self, new: NewLv) -> None:
        """A linear LV zeroed all through before anyone gets it: its extents
        may hold an earlier tenant's data (lvcreate zeroes only the first
        4 KiB). It stays MAKING until the zeroing is flushed, so a crash
        before that leaves an LV that is removed and made again."""
        self._create(new, [MAKING_TAG])
        with self._removed_on_failure(new.name):
            lv = self.inventory.activated(self._made(new.name, new.timeout).lv, new.timeout)
            # The zeroing outlives the caller's deadline (the controller runs
            # it off the RPC threads): the driver's own timeouts from here on.
            stats = blockcopy.zero_device(lv.device, new.size)
        log.info(
            "zeroed",
            lv=lv.full_name,
            punched_bytes=stats.punched_bytes,
            zeroed_bytes=stats.zeroed_bytes,
            skipped_bytes=stats.skipped_bytes,
            seconds=round(stats.seconds, 2),
        )
        self.states.made(self.device_class.volume_group, new.name, None)

    def _create_from(self, new: NewLv, source: Owned) -> Owned:
        return self._copy_into(new, Kind.VOLUME, source)

    def _snapshot(self, new: NewLv, source: Owned) -> Owned:
        """A new LV of the source's size holding a copy of a point-in-time
        view of it."""
        return self._copy_into(new, Kind.SNAPSHOT, source)

    def make_snapshots_at_once(
        self, members: Sequence[tuple[Ask, Owned]], scan: Scan, hold: Hold
    ) -> list[Owned]:
        """Copies of several volumes as of one instant. Every target is
        admitted and made first (tagged COPYING, like any copy); ``hold``
        runs the cutting of the sources' temporary views alone; each target
        is then filled from its view while the sources take writes again. A
        failure removes every target and view made here."""
        self.copier.check_views(self.name)
        with contextlib.ExitStack() as admitted, contextlib.ExitStack() as undone:
            news = [
                admitted.enter_context(self._admitted(ask, source, scan, snapshot=True))
                for ask, source in members
            ]
            targets = []
            for new, (ask, _) in zip(news, members, strict=True):
                try:
                    self._create(new, lifecycle.copy_tags(Kind.SNAPSHOT, by_copy=True))
                except LvmError as exc:
                    raise refused_create(exc, self._create_refusal(exc, ask, new.size)) from exc
                undone.enter_context(self._removed_on_failure(new.name))
                targets.append(self._made(new.name, new.timeout))
            for target in targets:
                self.copier.remove_view(target)  # a crash left-over of an earlier try

            def cut_views() -> None:
                for target, new, (ask, source) in zip(targets, news, members, strict=True):
                    try:
                        self.copier.cut_view(source, target, new.extent_bytes)
                    except LvmError as exc:  # answered as the hold sees it
                        raise refused_create(exc, self._create_refusal(exc, ask, new.size)) from exc

            try:
                hold(cut_views)
                for target, (_, source) in zip(targets, members, strict=True):
                    self.copier.fill_from_view(target, source)
            except BaseException:
                # Every target's: a refused lvcreate may leave its view behind
                # (LVM 2.03 does, when it cannot suspend a frozen origin).
                for target in targets:
                    with contextlib.suppress(Exception):  # else start-up repair removes it
                        self.copier.remove_view(target)
                raise
            return [self._made(new.name, None) for new in news]

    def _create(self, new: NewLv, lifecycle_tags: Sequence[str]) -> None:
        group = self.device_class.volume_group
        tags = [*new.tags, *lifecycle_tags]
        layout = self.device_class.layout
        if layout.is_linear:
            self.lvm.create_linear_volume(group, new.name, new.size, tags, new.timeout)
        else:
            self.lvm.create_shaped_volume(group, new.name, new.size, tags, layout, new.timeout)

    def _copy_into(self, new: NewLv, kind: Kind, source: Owned) -> Owned:
        if self.copier.copies_unused(source):
            self.copier.check_unused(source)  # before any LV is made for it
        self._create(new, lifecycle.copy_tags(kind, by_copy=True))
        with self._removed_on_failure(new.name):
            self.copier.fill(self._made(new.name, new.timeout), source, new.extent_bytes)
            return self._made(new.name, None)

    def _resume(self, existing: Owned, source: Owned | None, new: NewLv) -> Owned:
        if lifecycle.is_ready(existing):
            return existing
        if source is None:  # the caller found no source to copy again
            lifecycle.check_ready(existing, existing.kind.value)
            return existing
        self.copier.fill(existing, source, new.extent_bytes)
        return self._made(existing.lv.name, None)

    def _create_for_copy(self, new: NewLv) -> None:
        self._create(new, lifecycle.copy_tags(Kind.VOLUME, by_copy=True))

    def prepare_for_copy(self, lv: LogicalVolume) -> None:
        """Zeroed all through before the copy writes it: its extents may hold
        an earlier tenant's data, and a target larger than its source must
        read zeros past it. Done again by a retry while no progress is
        recorded (COPYING covers the zeroing too)."""
        blockcopy.zero_device(lv.device, lv.size_bytes)

    def make_view(self, source: Owned, name: str, tags: Sequence[str], extent_bytes: int) -> None:
        """A classic COW snapshot with a fifth of the source as room for
        the changes written while the copy reads it (``view_intact`` says
        whether they fitted)."""
        self.copier.check_views(self.name)
        create_view(self.lvm, source, name, tags, extent_bytes)

    def view_intact(self, view: LogicalVolume) -> bool:
        return view_intact(self.lvm, view)

    def data_ranges(self, point: Owned, maps: BlockMaps, timeout: float | None) -> BlockMap:
        """All of it: a thick LV has no map of what holds data."""
        whole = RangeSpool(maps.spool_dir).write([(0, point.size_bytes)])
        return BlockMap(point.size_bytes, 0, whole)

    def convert_layout(self, owned: Owned, kind: str, timeout: float | None) -> None:
        """Lay the volume out as ``kind`` (linear, or two-way RAID1) in place,
        online; nothing is done when it is laid out so. LVM's test mode
        first: a conversion it cannot make here (no second PV with room, a
        snapshot's copy reading the volume) changes nothing."""
        lv = owned.lv
        if lv.attr.is_raid == (kind == RAID1):
            return
        target = PLAIN if kind == LINEAR else Layout(kind=RAID1, mirrors=1)
        # Dropping a copy needs no room (and LVM's test mode cannot act it out).
        steps = [True, False] if kind == RAID1 else [False]
        for test in steps:
            try:
                self.lvm.convert_layout(lv.vg_name, lv.name, target, timeout, test=test)
            except LvmError as error:
                room = ": RAID1 needs a second PV with room for a copy" if kind == RAID1 else ""
                raise FailedPrecondition(
                    f"volume {owned.id} cannot be made {kind} on node {self.node_id}: {error}{room}"
                ) from error
        log.info("volume layout changed", lv=lv.full_name, layout=kind)

    def remove(self, owned: Owned, timeout: float | None) -> None:
        """Remove the LV, and the temporary view an interrupted copy into it
        left behind."""
        if not lifecycle.is_ready(owned):
            self.copier.remove_view(owned)
        super().remove(owned, timeout)


def _in_use(source: Owned) -> FailedPrecondition:
    return FailedPrecondition(
        f"volume {source.id} is in use; its class has RAID with integrity, of which LVM "
        "takes no snapshot, so csi-lvm copies its volumes only while nothing uses them: "
        "stop the pods using it (scale the workload down), then retry"
    )


class ThickCopier:
    def __init__(self, inventory: Inventory, states: Lifecycle, views: bool = True) -> None:
        self.inventory = inventory
        self.lvm = inventory.lvm
        self.states = states
        # LVM takes no COW snapshot of a RAID LV with integrity: a copy of
        # such a volume reads it whole while nothing else may mount it.
        self.views = views

    def check_views(self, device_class: str) -> None:
        """Refuse what needs a view of a volume in use, where none can be had."""
        if not self.views:
            raise FailedPrecondition(
                f"device class {device_class} has RAID with integrity, of which LVM takes no "
                "snapshot: its volumes are copied only while nothing uses them, one at a "
                "time (snapshot or clone each unstaged volume on its own node)"
            )

    def copies_unused(self, source: Owned) -> bool:
        """Whether ``source`` is copied from itself, unused, for want of a view."""
        return not self.views and source.kind is Kind.VOLUME

    def check_unused(self, source: Owned) -> LogicalVolume:
        """Refuse to copy such a volume while it is open now (a fresh report:
        the scan's may show a stage or unstage of moments ago the other way
        round); the source's LV as that report shows it."""
        now = self.lvm.find_lv(source.lv.vg_name, source.lv.name)
        if now is None:
            raise Aborted(f"volume {source.id} vanished while being copied; retry")
        if now.attr.device_open:
            raise _in_use(source)
        return now

    def room_needed(self, source: Owned, target_bytes: int, extent_bytes: int) -> int:
        """VG space a copy of ``source`` into a new ``target_bytes`` LV takes
        while it runs: the target, plus the view of a volume source."""
        if source.kind is Kind.SNAPSHOT or not self.views:
            return target_bytes
        return target_bytes + view_bytes(source.size_bytes, extent_bytes)

    # ---- the copy

    def fill(self, target: Owned, source: Owned, extent_bytes: int) -> None:
        """Copy ``source`` into ``target`` (tagged ``COPYING_TAG``), then mark
        the target complete."""
        if source.lv.vg_name != target.lv.vg_name:
            raise FailedPrecondition(
                f"{source.id} and {target.id} are in different volume groups; csi-lvm "
                "copies only within one"
            )
        if self.copies_unused(source):
            self._copy_unused(target, source)
            return
        if source.kind is Kind.VOLUME:
            self.remove_view(target)  # a crash left-over of an earlier try
            self.cut_view(source, target, extent_bytes)
            self.fill_from_view(target, source)
            return
        self._copy(self.inventory.activated(source.lv), target, source)
        self.states.copied(target.lv)
        log.info("copy complete", target=str(target.id), source=str(source.id))

    def fill_from_view(self, target: Owned, source: Owned) -> None:
        """Copy the view ``cut_view`` took of the volume ``source`` into
        ``target``, remove the view, then mark the target complete."""
        view = self._view(source, target)
        try:
            self._copy(view, target, source)
            self._check_view(view, source)
        except BaseException:
            with contextlib.suppress(Exception):  # else the retry removes it
                self.lvm.remove(view.vg_name, view.name)
            raise
        self.lvm.remove(view.vg_name, view.name)
        self.states.copied(target.lv)
        log.info("copy complete", target=str(target.id), source=str(source.id))

    def _copy_unused(self, target: Owned, source: Owned) -> None:
        """Copy the volume ``source`` itself, which nothing may use meanwhile:
        it is not open now, and its exclusive claim, held for the copy, keeps
        anyone from mounting it until the copy is done."""
        now = self.check_unused(source)
        try:
            self._copy(self.inventory.activated(now), target, source, exclusive=True)
        except blockcopy.SourceInUse:
            raise _in_use(source) from None
        self.states.copied(target.lv)
        log.info("copy complete", target=str(target.id), source=str(source.id))

    def _copy(
        self, source_lv: LogicalVolume, target: Owned, source: Owned, exclusive: bool = False
    ) -> None:
        target_lv = self.inventory.activated(target.lv)
        stats = blockcopy.copy_device(
            source_lv.device,
            target_lv.device,
            source.size_bytes,
            target.size_bytes,
            source_exclusive=exclusive,
        )
        log.info(
            "copied",
            target=str(target.id),
            source=str(source.id),
            data_bytes=stats.copied_bytes,
            punched_bytes=stats.punched_bytes,
            zeroed_bytes=stats.zeroed_bytes,
            skipped_bytes=stats.skipped_bytes,
            seconds=round(stats.seconds, 2),
        )

    # ---- the temporary view

    def cut_view(self, source: Owned, target: Owned, extent_bytes: int) -> None:
        """The point in time a copy of the volume ``source`` into ``target``
        reads: one lvcreate, nothing else (a group cuts it while writes are
        held)."""
        name = view_name_for(target.lv.name)
        size = view_bytes(source.size_bytes, extent_bytes)
        tags = encode_tags({Tag.DRIVER: self.inventory.driver_name, Tag.VIEW_FOR: target.lv.name})
        try:
            create_view(self.lvm, source, name, tags, extent_bytes)
        except LvmError as exc:
            raise refused_create(
                exc,
                f"volume group {source.lv.vg_name} has no room for the {size}-byte temporary "
                f"snapshot that copies {source.id} consistently",
            ) from exc

    def _view(self, source: Owned, target: Owned) -> LogicalVolume:
        name = view_name_for(target.lv.name)
        view = self.lvm.find_lv(source.lv.vg_name, name)
        if view is None:
            raise Aborted(f"the temporary snapshot {source.lv.vg_name}/{name} vanished; retry")
        return self.inventory.activated(view)

    def _check_view(self, view: LogicalVolume, source: Owned) -> None:
        if not view_intact(self.lvm, view):
            raise Aborted(
                f"volume {source.id} was written faster during the copy than its temporary "
                f"snapshot could hold ({view.size_bytes} bytes of changes); the copy is "
                "discarded: retry, ideally while the volume is written less"
            )

    def remove_view(self, target: Owned) -> None:
        """Remove the temporary view of a copy into ``target``, if there is one.
        An LV of that name without this driver's tags for ``target`` is left
        alone and refused."""
        name = view_name_for(target.lv.name)
        found = self.lvm.find_lv(target.lv.vg_name, name)
        if found is None:
            return
        if not self.inventory.is_own_view(found, target.lv.name):
            raise AlreadyExists(
                f"volume group {found.vg_name} has an LV named {name} that csi-lvm does not "
                "own; it needs that name for a temporary snapshot: rename or remove it"
            )
        self.lvm.remove(found.vg_name, found.name)
