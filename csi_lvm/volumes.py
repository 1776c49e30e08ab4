"""The driver's inventory: which LVs it owns, and what each one is.

An LV belongs to csi-lvm only when it carries this driver's ownership tag and
a name and class tag that agree with its id. Everything that answers "does
volume X exist?" goes through here, so "no tag, no touch" holds everywhere.
This module asks the LVM layer for records (and to activate an LV that a
caller needs as a device); it holds no policy of thin or thick classes, whose
space and health are ``csi_lvm.backends``' business. One ``Scan`` (a single
LVM report) answers every question an RPC has about space, names and health,
so a call costs one report, not one per question; calls that want a scan at
the same time share one (``ScanBatcher``). The calls a node serves all day
(stats, capacity, metrics, creates) read the kept view instead
(``Inventory.view`` and ``current``): the latest report, renewed in the
background every refresh interval, with the driver's own changes since
applied at once, so that their cost does not grow with the node's volumes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from csi_lvm.config import Config, DeviceClass
from csi_lvm.errors import AlreadyExists, DeadlineExceeded, FailedPrecondition, NotFound
from csi_lvm.ids import (
    Kind,
    ObjectId,
    Tag,
    csi_name_in,
    decode_tags,
    node_component,
    view_name_for,
)
from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.errors import LvmNotFound
from csi_lvm.lvm.records import LogicalVolume, VolumeGroup

log = structlog.get_logger("csi_lvm.volumes")


@dataclass(frozen=True)
class Owned:
    """An LV csi-lvm created: a volume or a snapshot."""

    id: ObjectId
    lv: LogicalVolume
    device_class: DeviceClass
    tags: dict[Tag, str]

    @property
    def kind(self) -> Kind:
        return self.id.kind

    @property
    def name(self) -> str:
        return self.tags.get(Tag.NAME) or csi_name_in(self.lv.name) or ""

    @property
    def size_bytes(self) -> int:
        return self.lv.size_bytes

    @property
    def source_id(self) -> str:
        """The id of the volume or snapshot this was made from ("" if none)."""
        source = self.tags.get(Tag.SOURCE, "")
        if not source or ":" in source:  # empty, or a whole id (earlier versions)
            return source
        return str(ObjectId(self.id.node, self.id.device_class, source))


@dataclass(frozen=True)
class Scan:
    """The configured volume groups and their LVs, as one report saw them."""

    lvs: tuple[LogicalVolume, ...]
    vgs: dict[str, VolumeGroup]
    started: float = 0.0  # time.monotonic() when the report began

    @functools.cached_property
    def _by_name(self) -> dict[tuple[str, str], LogicalVolume]:
        return {(lv.vg_name, lv.name): lv for lv in self.lvs}

    def lv(self, volume_group: str, name: str) -> LogicalVolume | None:
        return self._by_name.get((volume_group, name))

    def named(self, name: str) -> list[LogicalVolume]:
        """The LVs of this name, in any of the scan's volume groups."""
        found = (self.lv(group, name) for group in self.vgs)
        return [lv for lv in found if lv is not None]


@dataclass(frozen=True)
class ChangedScan(Scan):
    """A kept report with the LVs the driver has changed since it began
    (``touched``) read again, one at a time, when a caller asks for one of
    them by name. Its ``lvs`` and ``vgs`` are the report's less what the
    driver removed since (``Inventory.view`` makes it); what the driver made
    since, the backends' reservations count in a class's room."""

    touched: frozenset[tuple[str, str]] = frozenset()
    reread: Callable[[str, str], LogicalVolume | None] | None = None
    # The report this view is made of: its index by name, built once per
    # report, serves the untouched LVs (a view is made per call, and an
    # index of its own would cost every call a pass over every LV).
    kept: Scan | None = None

    @functools.cached_property
    def _reread(self) -> dict[tuple[str, str], LogicalVolume | None]:
        return {}

    def lv(self, volume_group: str, name: str) -> LogicalVolume | None:
        key = (volume_group, name)
        if key not in self.touched or self.reread is None:
            if self.kept is not None:
                return self.kept.lv(volume_group, name)
            return super().lv(volume_group, name)
        if key not in self._reread:
            self._reread[key] = self.reread(volume_group, name)
        return self._reread[key]


class ScanBatcher:
    """Shares LVM reports between calls that want one at the same time.

    A caller always gets a report that *started* after it asked, so it sees
    every change that finished before its call; callers that arrive while a
    report runs wait for it to end and then share the next one. Under load
    this turns one ``lvs`` per call into one per batch of calls.
    """

    def __init__(
        self, scan: Callable[[float | None], Scan], changes: Callable[[], int] = lambda: 0
    ) -> None:
        self._scan = scan
        self._changes = changes  # the driver's own LVM changes, counted
        self._cond = threading.Condition()
        self._running = False
        self._started = 0  # reports started so far; the number of the latest
        self._finished = 0  # number of the latest report that ended
        self._result: Scan | None = None  # its result (None when it failed)
        # The newest success: when it began, the change count then, the scan.
        self._latest: tuple[float, int, Scan] | None = None

    def get(self, timeout: float | None) -> Scan:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            wanted = self._started + 1  # any report numbered >= this started after now
            while True:
                if self._finished >= wanted and self._result is not None:
                    return self._result
                if not self._running:
                    self._running = True
                    self._started += 1
                    number = self._started
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded("LVM report did not finish in time; retry")
                self._cond.wait(remaining)
        result = None
        began, changes = time.monotonic(), self._changes()
        try:
            result = self._scan(timeout)
            return result
        finally:
            # A failed report is not shared: each waiter runs its own next.
            with self._cond:
                self._running = False
                self._finished = number
                self._result = result
                if result is not None:
                    self._latest = (began, changes, result)
                self._cond.notify_all()

    def keep(self, began: float, changes: int, scan: Scan) -> None:
        """Make ``scan`` (a report that began at ``began``, when the change
        count stood at ``changes``) the latest."""
        with self._cond:
            if self._latest is None or self._latest[0] < began:
                self._latest = (began, changes, scan)

    def latest(self) -> tuple[float, int, Scan] | None:
        """The newest report that succeeded: when it began, the driver's
        change count then, and the report."""
        with self._cond:
            return self._latest

    def recent(self, max_age: float, timeout: float | None) -> Scan:
        """The latest report if it began less than ``max_age`` seconds ago and
        the driver has changed nothing since, else a new one: for readers that
        can live with a slightly old view of changes others make (a metrics
        scrape) and must not cost a report each."""
        with self._cond:
            latest = self._latest
        if latest is not None:
            began, changes, scan = latest
            if time.monotonic() - began < max_age and changes == self._changes():
                return scan
        return self.get(timeout)


# A kept report, the LVs removed since, and the view of what is left.
_ViewMemo = tuple[
    Scan, frozenset[tuple[str, str]], tuple[LogicalVolume, ...], dict[str, VolumeGroup]
]

# How many LVs' adoptions are kept (more than a VG's metadata area records).
_ADOPTIONS_KEPT = 16384
# An owned LV's id, class and decoded tags.
_Adoption = tuple[ObjectId, DeviceClass, dict[Tag, str]]

# How often the kept view is read again, for changes made by others than the
# driver (an admin's lvcreate, a pool that fills): they show within this.
REFRESH_SECONDS = 10.0
# Every this many refreshes, a whole report even when no VG's metadata changed
# (an LV's state outside the metadata: an admin's dmsetup, a failed device).
FULL_REFRESH_EVERY = 6


class Inventory:
    def __init__(
        self,
        config: Config,
        lvm: Lvm,
        node_id: str,
        driver_name: str,
        refresh_seconds: float = REFRESH_SECONDS,
    ):
        self.config = config
        self.lvm = lvm
        self.node_id = node_id
        self.node_part = node_component(node_id)
        self.driver_name = driver_name
        self.refresh_seconds = refresh_seconds
        self._batcher = ScanBatcher(self._fresh_scan, lambda: self.lvm.changes)
        self._owned_memo: (
            tuple[Scan, dict[Kind, list[Owned]], dict[tuple[str, Kind], int]] | None
        ) = None
        # The last view with removals: its report, the removed, what is left.
        self._view_memo: _ViewMemo | None = None
        # LVs read again since the kept report: the change count when each was
        # read, and what it was then.
        self._rereads: dict[tuple[str, str], tuple[int, LogicalVolume | None]] = {}
        self._rereads_lock = threading.Lock()
        # What ``adopt`` found for an LV's name, pool and tags (the config
        # does not change while the driver runs).
        self._adoptions: dict[tuple[str, str, str, tuple[str, ...]], _Adoption | None] = {}

    # ---- ids

    def make_id(self, device_class: DeviceClass, lv_name: str) -> ObjectId:
        return ObjectId(self.node_part, device_class.name, lv_name)

    def local_id(self, text: str, kind: Kind, what: str) -> ObjectId | None:
        """The id when ``text`` names an object of this node; None when it
        cannot be one of ours at all. An id of another node is refused, never
        treated as absent: the object may well exist where the id says."""
        object_id = ObjectId.parse(text)
        if object_id is None or object_id.kind is not kind:
            return None
        if object_id.node != self.node_part:
            raise FailedPrecondition(
                f"{what} {text} belongs to node {object_id.node}, not to this node "
                f"({self.node_id}); send the call to the csi-lvm of that node"
            )
        return object_id

    def parse_local_id(
        self, text: str, kind: Kind, what: str
    ) -> tuple[ObjectId, DeviceClass] | None:
        """Like ``local_id``, with the object's class; an id of a class this
        node's config lacks is refused too."""
        object_id = self.local_id(text, kind, what)
        if object_id is None:
            return None
        device_class = self.config.find(object_id.device_class)
        if device_class is None:
            raise FailedPrecondition(
                f"{what} {text} is in device class {object_id.device_class!r}, which this "
                f"node's config does not define (it has: {self.class_names()}); "
                "restore the class to reach it"
            )
        return object_id, device_class

    def class_names(self) -> str:
        return ", ".join(c.name for c in self.config.device_classes)

    # ---- ownership

    def adopt(self, lv: LogicalVolume, device_class: DeviceClass | None = None) -> Owned | None:
        """The LV as an owned object, or None when csi-lvm did not make it."""
        if device_class is not None:
            return self._adopted(lv, device_class)
        # Every new report is adopted whole (the owned objects, the thin
        # pool's sum), and it repeats the LVs of the last: what the answer
        # depends on is kept, so a report costs a lookup per LV.
        key = (lv.vg_name, lv.name, lv.pool, lv.tags)
        try:
            known = self._adoptions[key]
        except KeyError:
            owned = self._adopted(lv, None)
            known = None if owned is None else (owned.id, owned.device_class, owned.tags)
            if len(self._adoptions) >= _ADOPTIONS_KEPT:
                self._adoptions.clear()
            self._adoptions[key] = known
        return None if known is None else Owned(known[0], lv, known[1], known[2])

    def _adopted(self, lv: LogicalVolume, device_class: DeviceClass | None) -> Owned | None:
        tags = decode_tags(lv.tags)
        if tags.get(Tag.DRIVER) != self.driver_name:
            return None
        device_class = device_class or self.config.find(tags.get(Tag.CLASS, ""))
        if device_class is None or tags.get(Tag.CLASS) != device_class.name:
            return None
        if lv.vg_name != device_class.volume_group:
            return None
        if device_class.thin_pool is not None and lv.pool != device_class.thin_pool:
            return None
        object_id = self.make_id(device_class, lv.name)
        if ObjectId.parse(str(object_id)) is None:
            return None
        if not tags.get(Tag.NAME) and csi_name_in(lv.name) is None:
            return None
        return Owned(object_id, lv, device_class, tags)

    def is_own_view(self, lv: LogicalVolume, target: str | None = None) -> bool:
        """Whether ``lv`` is a temporary view this driver made for a copy
        (into ``target``, when given): a classic snapshot with its tags."""
        tags = decode_tags(lv.tags)
        view_for = tags.get(Tag.VIEW_FOR, "")
        return (
            tags.get(Tag.DRIVER) == self.driver_name
            and bool(view_for)
            and (target is None or view_for == target)
            and lv.name == view_name_for(view_for)
            and lv.attr.is_cow_snapshot
        )

    def scan(self, timeout: float | None = None) -> Scan:
        """The configured VGs and their LVs, from a report begun after this call."""
        return self._batcher.get(timeout)

    # ---- the kept view: what calls that must not cost a report read

    def view(self, timeout: float | None = None) -> Scan:
        """The latest report (``keep_fresh`` keeps it younger than the refresh
        interval), with every LV the driver has changed since it began read
        again when asked for by name: the driver's own changes show at once,
        others' within the interval, and a call costs at most a report of
        the one LV it names. A new report only when there is no recent one."""
        latest = self._batcher.latest()
        if latest is None or time.monotonic() - latest[0] > 3 * self.refresh_seconds:
            return self.scan(timeout)
        _, changes, scan = latest
        touched = self.lvm.touched_since(changes)
        if touched is None:
            return self.scan(timeout)
        if not touched:
            return scan
        # What the driver removed since is gone from the sums at once (a
        # create right after a delete finds the room); what it made since,
        # the backends' reservations count.
        removed = frozenset(key for key, (_, was_removed) in touched.items() if was_removed)
        lvs, vgs = scan.lvs, scan.vgs
        memo = self._view_memo
        if removed and memo is not None and memo[0] is scan and memo[1] == removed:
            lvs, vgs = memo[2], memo[3]  # the same view as the last call's
        elif removed:
            lvs = tuple(lv for lv in scan.lvs if (lv.vg_name, lv.name) not in removed)
            freed: dict[str, int] = {}
            for lv in scan.lvs:
                if (lv.vg_name, lv.name) in removed and not lv.pool:  # extents of the VG
                    freed[lv.vg_name] = freed.get(lv.vg_name, 0) + lv.size_bytes
            vgs = {
                name: dataclasses.replace(group, free_bytes=group.free_bytes + freed[name])
                if name in freed
                else group
                for name, group in scan.vgs.items()
            }
            self._view_memo = (scan, removed, lvs, vgs)
        return ChangedScan(
            lvs,
            vgs,
            scan.started,
            touched=frozenset(touched),
            reread=lambda group, name: self._reread(group, name, touched[group, name][0], timeout),
            kept=scan,
        )

    def _reread(
        self, volume_group: str, name: str, last_change: int, timeout: float | None
    ) -> LogicalVolume | None:
        """One LV the driver changed since the kept report, read again: once,
        not per call, until a change touches it again."""
        with self._rereads_lock:
            kept = self._rereads.get((volume_group, name))
        if kept is not None and kept[0] >= last_change:
            return kept[1]
        count = self.lvm.changes
        lv = self.lvm.find_lv(volume_group, name, timeout)
        with self._rereads_lock:
            if len(self._rereads) > 4096:  # only the recently changed matter
                self._rereads.clear()
            self._rereads[(volume_group, name)] = (count, lv)
        return lv

    def current(self, timeout: float | None = None) -> Scan:
        """The kept report when the driver has changed nothing since it
        began, else a new one (shared with every caller that wants one at
        the same time): for totals over a class (capacity, metrics, status)
        that must show the driver's changes at once."""
        return self._batcher.recent(3 * self.refresh_seconds, timeout)

    def keep_fresh(self, stop: threading.Event) -> None:
        """Read the VGs again whenever the kept report is a refresh interval
        old, until ``stop`` is set (run it on a thread of its own). Where
        nothing but the thin pools' use can have changed, only they are read."""
        refreshes = 0
        while not stop.is_set():
            latest = self._batcher.latest()
            age = self.refresh_seconds if latest is None else time.monotonic() - latest[0]
            if age >= self.refresh_seconds:
                refreshes += 1
                try:
                    if refreshes % FULL_REFRESH_EVERY == 0 or not self._refresh_pools():
                        log.debug("refreshing the kept view")
                        self.scan(timeout=max(30.0, self.refresh_seconds))
                except Exception as error:  # retried at the next interval
                    log.warning("refreshing the kept LVM view failed", error=str(error))
                age = 0.0
            stop.wait(max(0.05, self.refresh_seconds - age))

    def _refresh_pools(self) -> bool:
        """Renew the kept report from its VGs' thin pools alone, when no VG's
        metadata changed since it began (its ``seqno``, which every LVM change
        by anyone bumps) and the driver made no change: what can still have
        moved is the pools' use, which tenants' writes change. False when a
        whole report is needed."""
        latest = self._batcher.latest()
        if latest is None:
            return False
        _, changes, kept = latest
        began, count = time.monotonic(), self.lvm.changes
        if count != changes or self.lvm.touched_since(changes):
            return False
        log.debug("refreshing the thin pools")
        try:
            # The VGs of the kept report: a configured VG missing from the
            # node is looked for again by the whole reports.
            pools, groups = self.lvm.thin_pools(kept.vgs, timeout=max(30.0, self.refresh_seconds))
        except LvmNotFound:  # a VG went away: a whole report says what is left
            return False
        now = {group.name: group for group in groups}
        if self.lvm.changes != count or set(now) != set(kept.vgs):
            return False
        if any(now[name].seqno != group.seqno for name, group in kept.vgs.items()):
            return False
        renewed = {(pool.vg_name, pool.name): pool for pool in pools}
        lvs = tuple(renewed.get((lv.vg_name, lv.name), lv) for lv in kept.lvs)
        self._batcher.keep(began, count, Scan(lvs, now, began))
        return True

    def _fresh_scan(self, timeout: float | None) -> Scan:
        started = time.monotonic()
        groups = self.config.volume_groups
        try:
            lvs, vgs = self.lvm.scan(groups, timeout)
        except LvmNotFound:
            # A VG of the config is not on this node (one config serves nodes
            # that differ): the others are reported, the backends say what
            # is missing.
            present = [vg.name for vg in self.lvm.list_vgs(groups, timeout)]
            lvs, vgs = self.lvm.scan(present, timeout) if present else ([], [])
        return Scan(tuple(lvs), {vg.name: vg for vg in vgs}, started)

    def get(
        self, object_id: ObjectId, device_class: DeviceClass, timeout: float | None = None
    ) -> Owned | None:
        lv = self.lvm.find_lv(device_class.volume_group, object_id.lv_name, timeout)
        return None if lv is None else self.adopt(lv, device_class)

    def activated(self, lv: LogicalVolume, timeout: float | None = None) -> LogicalVolume:
        """The LV with its device node present, activating it when it is not
        (a thin snapshot, made with activation skipped, or a VG activated
        only in part)."""
        if lv.attr.active and os.path.exists(lv.device):
            return lv
        self.lvm.activate(lv.vg_name, lv.name, timeout)
        refreshed = self.lvm.find_lv(lv.vg_name, lv.name, timeout)
        if refreshed is None or not os.path.exists(refreshed.device):
            raise FailedPrecondition(
                f"LV {lv.full_name} could not be activated: its device node is missing"
            )
        return refreshed

    def find_anywhere(self, object_id: ObjectId, timeout: float | None) -> Owned | None:
        """The driver's own LV with the id's name and class, in any volume
        group: also when the class has left the config (its PVs must still be
        deleted and unstaged) or the node's id has changed. It is owned only
        when its tags say it is this driver's object of that class. The
        class's own volume group is asked first (one LV's report); the
        others only when it is not there."""
        configured = self.config.find(object_id.device_class)
        if configured is not None:
            try:
                owned = self.get(object_id, configured, timeout)
            except LvmNotFound:  # the class's VG is not on this node
                owned = None
            if owned is not None:
                return owned
        for lv in self.lvm.find_lvs_named(object_id.lv_name, timeout):
            device_class = self.config.find(object_id.device_class)
            if device_class is None or device_class.volume_group != lv.vg_name:
                device_class = DeviceClass(object_id.device_class, lv.vg_name, lv.pool or None)
            owned = self.adopt(lv, device_class)
            if owned is not None and owned.kind is object_id.kind:
                return owned
        return None

    def lookup(self, text: str, kind: Kind, what: str, scan: Scan) -> Owned | None:
        """The owned object an id names, from a scan; None when there is none."""
        parsed = self.parse_local_id(text, kind, what)
        if parsed is None:
            return None
        object_id, device_class = parsed
        lv = scan.lv(device_class.volume_group, object_id.lv_name)
        return None if lv is None else self.adopt(lv, device_class)

    def require(self, text: str, kind: Kind, what: str, scan: Scan) -> Owned:
        """Like ``lookup``, but an absent object is NOT_FOUND."""
        found = self.lookup(text, kind, what, scan)
        if found is None:
            raise NotFound(f"{what} {text} does not exist on node {self.node_id}")
        return found

    def find_by_name(self, kind: Kind, lv_name: str, scan: Scan) -> Owned | None:
        """The owned object with this LV name in any configured volume group.

        An LV of that name that csi-lvm did not make is an error: the driver
        will neither adopt nor replace it."""
        for lv in scan.named(lv_name):
            owned = self.adopt(lv)
            if owned is None or owned.kind is not kind:
                raise AlreadyExists(
                    f"volume group {lv.vg_name} already has an LV named {lv_name} that csi-lvm "
                    "does not own; rename or remove it, or use another name"
                )
            return owned
        return None

    def counts(self, scan: Scan) -> dict[tuple[str, Kind], int]:
        """How many owned objects of each class and kind ``scan`` shows (worked
        out with ``owned``, once per report)."""
        self.owned(Kind.VOLUME, scan)
        assert self._owned_memo is not None
        return self._owned_memo[2]

    def owned(self, kind: Kind, scan: Scan) -> list[Owned]:
        """The owned objects of one kind in ``scan``, sorted by id; worked out
        once per report (a scrape of a kept report costs no pass over it)."""
        memo = self._owned_memo
        if memo is None or memo[0] is not scan:
            by_kind: dict[Kind, list[Owned]] = {k: [] for k in Kind}
            counts: dict[tuple[str, Kind], int] = {}
            for lv in scan.lvs:
                if (found := self.adopt(lv)) is not None:
                    by_kind[found.kind].append(found)
                    key = (found.device_class.name, found.kind)
                    counts[key] = counts.get(key, 0) + 1
            for objects in by_kind.values():
                objects.sort(key=lambda o: str(o.id))
            memo = self._owned_memo = (scan, by_kind, counts)
        return list(memo[1][kind])
