"""The kept view of LVM: the reports the driver reads, shared between calls,
and the one place that decides whether what a call read is fresh enough.

One ``Scan`` (a single LVM report) answers every question an RPC has about
space, names and health, so a call costs one report, not one per question;
calls that want a report at the same time share one (``ScanBatcher``). The
calls a node serves all day (stats, capacity, metrics, creates) read the kept
view instead (``KeptView.view`` and ``current``): the latest report, renewed
in the background every refresh interval, with the driver's own changes since
applied at once, so that their cost does not grow with the node's volumes.
Others' changes (an admin's lvcreate, a pool that fills) show within the
interval; where a call must not act on a view that is behind, ``decided`` and
``named`` say when to read LVM again.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog

from csi_lvm.errors import DeadlineExceeded, NameTaken, Vanished
from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.errors import LvmNotFound
from csi_lvm.lvm.records import LogicalVolume, VolumeGroup

log = structlog.get_logger("csi_lvm.kept_view")
T = TypeVar("T")


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

# How often the kept view is read again, for changes made by others than the
# driver (an admin's lvcreate, a pool that fills): they show within this.
REFRESH_SECONDS = 10.0
# Every this many refreshes, a whole report even when no VG's metadata changed
# (an LV's state outside the metadata: an admin's dmsetup, a failed device).
FULL_REFRESH_EVERY = 6


class KeptView:
    """The reports of the configured volume groups, kept and shared."""

    def __init__(
        self, lvm: Lvm, volume_groups: Sequence[str], refresh_seconds: float = REFRESH_SECONDS
    ) -> None:
        self.lvm = lvm
        self.volume_groups = list(volume_groups)
        self.refresh_seconds = refresh_seconds
        self._batcher = ScanBatcher(self._fresh_scan, lambda: self.lvm.changes)
        # The last view with removals: its report, the removed, what is left.
        self._view_memo: _ViewMemo | None = None
        # LVs read again since the kept report: the change count when each was
        # read, and what it was then.
        self._rereads: dict[tuple[str, str], tuple[int, LogicalVolume | None]] = {}
        self._rereads_lock = threading.Lock()

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
        groups = self.volume_groups
        try:
            lvs, vgs = self.lvm.scan(groups, timeout)
        except LvmNotFound:
            # A VG of the config is not on this node (one config serves nodes
            # that differ): the others are reported, the backends say what
            # is missing.
            present = [vg.name for vg in self.lvm.list_vgs(groups, timeout)]
            lvs, vgs = self.lvm.scan(present, timeout) if present else ([], [])
        return Scan(tuple(lvs), {vg.name: vg for vg in vgs}, started)

    # ---- freshness decisions

    def decided(self, decide: Callable[[Scan, bool], T], timeout: float | None) -> T:
        """A create decided from the kept view: the name, the source and the
        room need no report of the whole VG (reservations count recent
        creates). Where LVM shows the view was behind others' changes within
        the refresh interval (an LV of the name it lacks, made by hand or by
        another process; an LV it shows, removed since), a report of now
        decides again. Neither refusal made anything. ``decide`` learns
        whether its scan is a report of now."""
        try:
            return decide(self.view(timeout), False)
        except (NameTaken, Vanished):
            return decide(self.scan(timeout), True)

    def named(
        self,
        volume_group: str,
        name: str,
        scan: Scan,
        fresh: bool,
        timeout: float | None,
        *,
        lvm_corrects_absence: bool,
    ) -> LogicalVolume | None:
        """The LV of this name as it is now, judged from ``scan`` (a report of
        now when ``fresh``). The kept view may be behind others' changes: an
        LV it shows is read again alone (removed by hand, it must not be
        answered as there), and so is one it lacks, unless the caller's next
        LVM command finds that out by itself (``lvm_corrects_absence``: a
        create, which lvcreate refuses under a taken name)."""
        lv = scan.lv(volume_group, name)
        if fresh or (lv is None and lvm_corrects_absence):
            return lv
        try:
            return self.lvm.find_lv(volume_group, name, timeout)
        except LvmNotFound:  # the volume group is not on this node
            return None

    def still_there(self, volume_group: str, name: str, timeout: float | None) -> bool:
        """Whether an LV a call found a moment ago is still there, for a call
        that asks again and again (a stream, between messages): the driver's
        own removals show in the kept view at once, so an LV it shows is
        there; one it lacks (made by another process since its report) is
        read from LVM."""
        if self.view(timeout).lv(volume_group, name) is not None:
            return True
        try:
            return self.lvm.find_lv(volume_group, name, timeout) is not None
        except LvmNotFound:  # the volume group is not on this node
            return False
