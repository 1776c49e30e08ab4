"""The driver's inventory: which LVs it owns, and what each one is.

An LV belongs to csi-lvm only when it carries this driver's ownership tag and
a name and class tag that agree with its id. Everything that answers "does
volume X exist?" goes through here, so "no tag, no touch" holds everywhere.
This module asks the LVM layer for records; it never runs a command itself.
One ``Scan`` (a single LVM report) answers every question an RPC has about
space, names and health, so a call costs one report, not one per question;
calls that want a scan at the same time share one (``ScanBatcher``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from csi_lvm.config import Config, DeviceClass
from csi_lvm.errors import AlreadyExists, DeadlineExceeded, FailedPrecondition, NotFound
from csi_lvm.ids import COPYING_TAG, Kind, ObjectId, Tag, decode_tags, node_component
from csi_lvm.lvm import LogicalVolume, Lvm, VolumeGroup


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
        return self.tags.get(Tag.NAME, "")

    @property
    def size_bytes(self) -> int:
        return self.lv.size_bytes

    @property
    def source_id(self) -> str:
        return self.tags.get(Tag.SOURCE, "")

    @property
    def complete(self) -> bool:
        """False while (or after an interrupted) copy into a thick LV."""
        return COPYING_TAG not in self.lv.tags

    def check_complete(self, what: str) -> None:
        """Refuse to use the data of an LV whose copy is not done."""
        if not self.complete:
            raise FailedPrecondition(
                f"{what} {self.id} is not ready: the copy of {self.source_id or 'its source'} "
                f"into it is incomplete; retry the call that created it to finish the copy, "
                "or delete it"
            )


@dataclass(frozen=True)
class Condition:
    abnormal: bool
    message: str


@dataclass(frozen=True)
class ClassSpace:
    """Room in a device class, in bytes."""

    available_bytes: int
    extent_bytes: int
    total_bytes: int
    used_bytes: int  # provisioned (thin: virtual sizes) or allocated (thick)
    full: str | None = None  # why the class takes no new volumes, when it is full


@dataclass(frozen=True)
class Scan:
    """The configured volume groups and their LVs, as one report saw them."""

    lvs: tuple[LogicalVolume, ...]
    vgs: dict[str, VolumeGroup]

    def lv(self, volume_group: str, name: str) -> LogicalVolume | None:
        return next((v for v in self.lvs if v.vg_name == volume_group and v.name == name), None)


class ScanBatcher:
    """Shares LVM reports between calls that want one at the same time.

    A caller always gets a report that *started* after it asked, so it sees
    every change that finished before its call; callers that arrive while a
    report runs wait for it to end and then share the next one. Under load
    this turns one ``lvs`` per call into one per batch of calls.
    """

    def __init__(self, scan: Callable[[float | None], Scan]) -> None:
        self._scan = scan
        self._cond = threading.Condition()
        self._running = False
        self._started = 0  # reports started so far; the number of the latest
        self._finished = 0  # number of the latest report that ended
        self._result: Scan | None = None  # its result (None when it failed)

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
        try:
            result = self._scan(timeout)
            return result
        finally:
            # A failed report is not shared: each waiter runs its own next.
            with self._cond:
                self._running = False
                self._finished = number
                self._result = result
                self._cond.notify_all()


class Inventory:
    def __init__(self, config: Config, lvm: Lvm, node_id: str, driver_name: str):
        self.config = config
        self.lvm = lvm
        self.node_id = node_id
        self.node_part = node_component(node_id)
        self.driver_name = driver_name
        self._batcher = ScanBatcher(self._fresh_scan)

    # ---- ids

    def make_id(self, device_class: DeviceClass, lv_name: str) -> ObjectId:
        return ObjectId(self.node_part, device_class.name, lv_name)

    def parse_local_id(
        self, text: str, kind: Kind, what: str
    ) -> tuple[ObjectId, DeviceClass] | None:
        """The id and its class when ``text`` names an object of this node;
        None when it cannot be one of ours at all. An id of another node, or
        of a class this node lacks, is refused, never treated as absent: the
        object may well exist where the id says."""
        object_id = ObjectId.parse(text)
        if object_id is None or object_id.kind is not kind:
            return None
        if object_id.node != self.node_part:
            raise FailedPrecondition(
                f"{what} {text} belongs to node {object_id.node}, not to this node "
                f"({self.node_id}); send the call to the csi-lvm of that node"
            )
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
        if ObjectId.parse(str(object_id)) is None or not tags.get(Tag.NAME):
            return None
        return Owned(object_id, lv, device_class, tags)

    def scan(self, timeout: float | None = None) -> Scan:
        """The configured VGs and their LVs, from a report begun after this call."""
        return self._batcher.get(timeout)

    def _fresh_scan(self, timeout: float | None) -> Scan:
        lvs, vgs = self.lvm.scan(self.config.volume_groups, timeout)
        return Scan(tuple(lvs), {vg.name: vg for vg in vgs})

    def get(
        self, object_id: ObjectId, device_class: DeviceClass, timeout: float | None = None
    ) -> Owned | None:
        lv = self.lvm.find_lv(device_class.volume_group, object_id.lv_name, timeout)
        return None if lv is None else self.adopt(lv, device_class)

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
        for lv in scan.lvs:
            if lv.name != lv_name:
                continue
            owned = self.adopt(lv)
            if owned is None or owned.kind is not kind:
                raise AlreadyExists(
                    f"volume group {lv.vg_name} already has an LV named {lv_name} that csi-lvm "
                    "does not own; rename or remove it, or use another name"
                )
            return owned
        return None

    def owned(self, kind: Kind, scan: Scan) -> list[Owned]:
        found = [o for lv in scan.lvs if (o := self.adopt(lv)) is not None and o.kind is kind]
        return sorted(found, key=lambda o: str(o.id))

    def missing_storage(self, timeout: float | None = None) -> list[tuple[DeviceClass, str, int]]:
        """Each class whose volume group or thin pool is absent: the class, what
        is missing, and the config line that names it."""
        try:
            scan = self.scan(timeout)  # one report when all is well
            present = set(scan.vgs)
            pools = {lv.full_name for lv in scan.lvs if lv.attr.is_thin_pool}
        except NotFound:  # a VG is missing: ask about each one on its own
            present = {vg.name for vg in self.lvm.list_vgs(self.config.volume_groups, timeout)}
            pools = set()
            thin_groups = {c.volume_group for c in self.config.device_classes if c.thin_pool}
            if thin_groups & present:
                lvs = self.lvm.list_lvs(thin_groups & present, timeout)
                pools = {lv.full_name for lv in lvs if lv.attr.is_thin_pool}
        missing = []
        for device_class in self.config.device_classes:
            if device_class.volume_group not in present:
                missing.append(
                    (
                        device_class,
                        f"volume group {device_class.volume_group!r}",
                        device_class.volume_group_line,
                    )
                )
            elif (
                device_class.thin_pool
                and f"{device_class.volume_group}/{device_class.thin_pool}" not in pools
            ):
                missing.append(
                    (
                        device_class,
                        f"thin pool {device_class.thin_pool!r} in volume group "
                        f"{device_class.volume_group!r}",
                        device_class.thin_pool_line,
                    )
                )
        return missing

    # ---- space

    def space(self, device_class: DeviceClass, scan: Scan) -> ClassSpace:
        group = scan.vgs.get(device_class.volume_group)
        if group is None:
            raise FailedPrecondition(
                f"volume group {device_class.volume_group} is not present on node "
                f"{self.node_id}; check the node's disks and the csi-lvm config"
            )
        if device_class.thin_pool is None:
            return ClassSpace(
                available_bytes=group.free_bytes,
                extent_bytes=group.extent_bytes,
                total_bytes=group.size_bytes,
                used_bytes=group.size_bytes - group.free_bytes,
            )
        pool = scan.lv(device_class.volume_group, device_class.thin_pool)
        if pool is None or not pool.attr.is_thin_pool:
            raise FailedPrecondition(
                f"thin pool {device_class.volume_group}/{device_class.thin_pool} of device class "
                f"{device_class.name} is missing on node {self.node_id}"
            )
        # Snapshots are left out: they share their origin's blocks and are never
        # written, so counting them would make every snapshot halve the room.
        provisioned = sum(
            lv.size_bytes
            for lv in scan.lvs
            if lv.vg_name == group.name
            and lv.pool == device_class.thin_pool
            and not self._is_snapshot(lv)
        )
        limit = math.floor(pool.size_bytes * device_class.overprovision_ratio)
        full = pool_fullness(device_class, pool)
        return ClassSpace(
            available_bytes=0 if full else max(0, limit - provisioned),
            extent_bytes=group.extent_bytes,
            total_bytes=limit,
            used_bytes=provisioned,
            full=full,
        )

    def _is_snapshot(self, lv: LogicalVolume) -> bool:
        owned = self.adopt(lv)
        return owned is not None and owned.kind is Kind.SNAPSHOT

    # ---- health

    def condition(self, owned: Owned, scan: Scan) -> Condition:
        problem = owned.lv.attr.problem
        if problem is None and not owned.complete:
            problem = (
                f"the copy from {owned.source_id or 'its source'} is incomplete (interrupted); "
                "retrying the call that created it redoes the copy"
            )
        if problem is None and owned.device_class.thin_pool is not None:
            pool = scan.lv(owned.lv.vg_name, owned.device_class.thin_pool)
            if pool is None:
                problem = f"its thin pool {owned.device_class.thin_pool} is missing"
            else:
                problem = pool_fullness(owned.device_class, pool)
        group = scan.vgs.get(owned.lv.vg_name)
        if problem is None and group is not None and group.partial:
            problem = f"volume group {owned.lv.vg_name} is missing a physical volume"
        if problem is not None:
            return Condition(True, f"LV {owned.lv.full_name}: {problem}")
        return Condition(False, "healthy")


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
