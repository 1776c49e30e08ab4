"""What a device class can do, as one interface; ``thin`` and ``thick``
implement it.

A backend makes the LVs of its class (blank, from a snapshot or volume, a
snapshot), says how much room each needs and how much the class has, grows
and removes them, and knows what its LVs hold before anything is written.
It raises LVM's errors as they come (``csi_lvm.lvm.errors``) and domain
errors for refusals of its own; the servicers turn LVM's refusals into the
answers of the call that met them. It never sees a CSI request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import structlog

from csi_lvm import lifecycle
from csi_lvm.config import DeviceClass
from csi_lvm.errors import Aborted, FailedPrecondition
from csi_lvm.lifecycle import Lifecycle
from csi_lvm.lvm.errors import METADATA_FIX
from csi_lvm.lvm.records import LogicalVolume, VolumeGroup
from csi_lvm.volumes import Inventory, Owned, Scan

log = structlog.get_logger("csi_lvm.backends")

# How long a finished create's reservation is kept: longer than any report
# that began before it ended can be in use.
RESERVATION_SECONDS = 600.0
# About what one volume's or snapshot's record takes in the VG's metadata area
# (measured with the driver's tags: README, "How many volumes a node holds").
METADATA_BYTES_PER_LV = 500
# The room a class leaves in the metadata area when it takes new volumes: a
# few records, for creates under way and the temporary views of thick copies.
METADATA_RESERVE_BYTES = 8 * METADATA_BYTES_PER_LV
# Below this many LVs of room, start-up and ``doctor`` warn.
METADATA_LOW_LVS = 100


def metadata_room_lvs(group: VolumeGroup) -> int | None:
    """About how many more LVs the VG's metadata area holds (None when the
    report did not say)."""
    if group.metadata_area_bytes <= 0:
        return None
    return max(0, group.metadata_free_bytes - METADATA_RESERVE_BYTES) // METADATA_BYTES_PER_LV


def metadata_full(group: VolumeGroup) -> str | None:
    """Why the VG takes no new LVs for want of metadata room, or None."""
    if group.metadata_area_bytes <= 0 or group.metadata_free_bytes >= METADATA_RESERVE_BYTES:
        return None
    return (
        f"the metadata area of volume group {group.name} is full ({group.metadata_free_bytes} "
        f"of {group.metadata_area_bytes} bytes left). {METADATA_FIX}"
    )


# How long a class whose thin pool refused a create for want of repair stays
# closed before a create may try it again (a restart of the plugin retries at
# once, for an admin who has just repaired it).
NEEDS_REPAIR_SECONDS = 600.0


@dataclass(frozen=True)
class ClassSpace:
    """Room in a device class, in bytes, and why it takes no new volumes."""

    available_bytes: int  # 0 whenever ``refusal`` is set
    extent_bytes: int  # 0 when the volume group is not on this node
    total_bytes: int
    used_bytes: int  # provisioned (thin: virtual sizes) or allocated (thick)
    full: str | None = None  # the thin pool is past the class's threshold
    missing: str | None = None  # the class's storage is not on this node
    needs_repair: str | None = None  # LVM refused the pool until an admin repairs it
    metadata_full: str | None = None  # the VG's metadata area has no room for more LVs

    @property
    def refusal(self) -> str | None:
        """Why the class takes no new volumes, or None while it does."""
        return self.missing or self.needs_repair or self.metadata_full or self.full


class NoRoom(Exception):
    """What a create asks does not fit in the room left (``available`` bytes)."""

    def __init__(self, available: int) -> None:
        super().__init__(available)
        self.available = available


@dataclass
class _Reservation:
    bytes: int
    done: float | None = None  # when the create that held it ended


@dataclass(frozen=True)
class NewLv:
    """An LV a backend is asked to make: its name, size (whole extents) and
    the driver's tags for it (the lifecycle's tags are the backend's to add),
    within the caller's time."""

    name: str
    size: int
    tags: Sequence[str]
    timeout: float | None


@dataclass(frozen=True)
class Contents:
    blank: bool  # certainly holds nothing, so probing it is wasted
    # Every block reads zeros now, and the rest of a block still does once
    # part of it is written: zeroing any of it again (mkfs's) is wasted work.
    reads_zeros: bool


@dataclass(frozen=True)
class Condition:
    abnormal: bool
    message: str


class Backend(ABC):
    """One device class's storage."""

    # Whether making an LV writes all of it (time in proportion to its size).
    slow_to_make = False

    def __init__(self, device_class: DeviceClass, inventory: Inventory, states: Lifecycle):
        self.device_class = device_class
        self.inventory = inventory
        self.lvm = inventory.lvm
        self.states = states
        self._needs_repair: tuple[float, str] | None = None
        self._ledger_lock = threading.Lock()
        self._reservations: list[_Reservation] = []

    @property
    def name(self) -> str:
        return self.device_class.name

    @property
    def offered_here(self) -> bool:
        """Whether the config puts this class on this node at all."""
        return self.device_class.on_node(self.inventory.node_id)

    # ---- room

    def space(self, scan: Scan) -> ClassSpace:
        """The class's capacity, use and room, from one scan."""
        missing = self.missing(scan)
        group = scan.vgs.get(self.device_class.volume_group)
        if missing is not None:
            extent = group.extent_bytes if group is not None else 0
            return ClassSpace(0, extent, 0, 0, missing=missing)
        assert group is not None  # else it would be missing
        space = self._space(group, scan)
        if (full := metadata_full(group)) is not None:
            space = dataclasses.replace(space, available_bytes=0, metadata_full=full)
        needs_repair = self.needs_repair()
        if needs_repair is None:
            return space
        return dataclasses.replace(space, available_bytes=0, needs_repair=needs_repair)

    @abstractmethod
    def _space(self, group: VolumeGroup, scan: Scan) -> ClassSpace:
        """The space of a class whose storage is present."""

    def missing(self, scan: Scan) -> str | None:
        """What of the class's storage this node lacks, with the config line
        that names it; None when all is there."""
        device_class = self.device_class
        node = self.inventory.node_id
        if not self.offered_here:
            return (
                f"device class {device_class.name} is not on node {node}: the config gives "
                f"it to nodes {', '.join(device_class.nodes)} only"
            )
        if device_class.volume_group not in scan.vgs:
            return (
                f"volume group {device_class.volume_group!r} of device class "
                f"{device_class.name} does not exist on node {node} "
                f"({self.inventory.config.source} line {device_class.volume_group_line})"
            )
        return None

    def note_needs_repair(self, message: str) -> None:
        """LVM refused a create until an admin repairs the storage: take no
        new volumes for a while, so the scheduler looks elsewhere."""
        self._needs_repair = (time.monotonic(), message)

    def needs_repair(self) -> str | None:
        if self._needs_repair is None:
            return None
        since, message = self._needs_repair
        if time.monotonic() - since > NEEDS_REPAIR_SECONDS:
            self._needs_repair = None  # let the next create find out again
            return None
        return (
            f"{message} (csi-lvm takes no new volumes in this class for "
            f"{NEEDS_REPAIR_SECONDS / 60:.0f} minutes after such a refusal; restart the "
            "plugin once the pool is repaired)"
        )

    def room_for_volume(self, size: int, source: Owned | None, extent_bytes: int) -> int:
        """Room a new ``size``-byte volume takes, blank or made from ``source``."""
        return size

    @abstractmethod
    def room_for_snapshot(self, source: Owned, extent_bytes: int) -> int:
        """Room a snapshot of ``source`` takes."""

    @contextmanager
    def reserved(self, needed: int, space: ClassSpace, scan: Scan) -> Iterator[None]:
        """Hold ``needed`` bytes of the class's room while an object is made,
        or raise NoRoom. Creates that run at once each read the room from a
        report that need not show the others' LVs yet (LVM itself does not
        enforce a thin class's overprovisionRatio): a reservation counts for
        every report that began before its create ended."""
        with self._ledger_lock:
            now = time.monotonic()
            self._reservations = [
                r
                for r in self._reservations
                if r.done is None or now - r.done < RESERVATION_SECONDS
            ]
            unseen = sum(
                r.bytes for r in self._reservations if r.done is None or r.done > scan.started
            )
            available = max(0, space.available_bytes - unseen)
            if needed > available:
                raise NoRoom(available)
            reservation = _Reservation(needed)
            self._reservations.append(reservation)
        made = False
        try:
            yield
            made = True
        finally:
            with self._ledger_lock:
                if made:
                    reservation.done = time.monotonic()
                else:  # nothing was made: nothing to count
                    self._reservations.remove(reservation)

    # ---- making

    @abstractmethod
    def create_blank(self, new: NewLv) -> None:
        """A new LV of exactly ``new.size`` bytes that reads no earlier
        tenant's data where a filesystem would look."""

    @abstractmethod
    def create_from(self, new: NewLv, source: Owned, extent_bytes: int) -> Owned:
        """A new volume of at least ``new.size`` bytes holding ``source``'s data."""

    @abstractmethod
    def snapshot(self, new: NewLv, source: Owned, extent_bytes: int) -> Owned:
        """A snapshot of the volume ``source`` as it is now (``new.size`` is
        the source's)."""

    @abstractmethod
    def resume(self, existing: Owned, source: Owned | None, new: NewLv, extent_bytes: int) -> Owned:
        """Finish making ``new`` from ``source`` where an interrupted
        ``create_from`` or ``snapshot`` left ``existing`` (see
        ``csi_lvm.lifecycle``). An object that is done comes back as it is."""

    def grow(self, owned: Owned, size: int, timeout: float | None) -> None:
        self.lvm.extend(owned.lv.vg_name, owned.lv.name, size, timeout)

    # ---- removing

    def held_open(self, owned: Owned, timeout: float | None) -> bool:
        """Whether the LV's device stays open. udev opens a device for a moment
        after a writer closes it (to probe it again), so an open device is
        looked at a few more times, for about a second, before the answer is
        yes; LVM's own deactivation retries for the same reason."""
        if not owned.lv.attr.device_open:
            return False
        for _ in range(4):
            time.sleep(0.25)
            lv = self.lvm.find_lv(owned.lv.vg_name, owned.lv.name, timeout)
            if lv is None or not lv.attr.device_open:
                return False
        return True

    def remove(self, owned: Owned, timeout: float | None) -> None:
        if owned.lv.attr.is_cow_origin:
            self._refuse_foreign_snapshots(owned, timeout)
        self.lvm.remove(owned.lv.vg_name, owned.lv.name, timeout)

    def _refuse_foreign_snapshots(self, owned: Owned, timeout: float | None) -> None:
        """``lvremove`` of an origin removes its classic snapshots with it: one
        an admin made by hand (``lvcreate -s``) is not the driver's to remove."""
        foreign = [
            lv.full_name
            for lv in self.lvm.snapshots_of(owned.lv.vg_name, owned.lv.name, timeout)
            if lv.attr.is_cow_snapshot and not self.inventory.is_own_view(lv)
        ]
        if foreign:
            raise FailedPrecondition(
                f"{owned.kind.value} {owned.id} has snapshots that csi-lvm did not make "
                f"({', '.join(foreign)}); removing the LV would remove them too: remove or "
                "merge them first (lvremove, lvconvert --merge)"
            )

    # ---- contents and health

    def contents(self, lv: LogicalVolume) -> Contents:
        """What the LV is known to hold before a first stage: nothing known."""
        return Contents(blank=False, reads_zeros=False)

    def warning(self, scan: Scan) -> str | None:
        """Something about present storage an admin must hear of at start-up
        and from ``doctor`` (it still takes volumes)."""
        group = scan.vgs.get(self.device_class.volume_group)
        room = None if group is None else metadata_room_lvs(group)
        if group is None or room is None or room >= METADATA_LOW_LVS:
            return None
        return (
            f"the metadata area of volume group {group.name} has room for about {room} more "
            f"volumes or snapshots ({group.metadata_free_bytes} of "
            f"{group.metadata_area_bytes} bytes left). {METADATA_FIX}"
        )

    def storage_problem(self, scan: Scan) -> str | None:
        """A problem of the class's storage itself that makes its objects
        abnormal (a thin pool out of room or in need of repair, say)."""
        return self.needs_repair()

    def condition(self, owned: Owned, scan: Scan) -> Condition:
        problem = (
            owned.lv.attr.problem or lifecycle.unready_problem(owned) or self.storage_problem(scan)
        )
        group = scan.vgs.get(owned.lv.vg_name)
        if problem is None and group is not None and group.partial:
            problem = f"volume group {owned.lv.vg_name} is missing a physical volume"
        if problem is not None:
            return Condition(True, f"LV {owned.lv.full_name}: {problem}")
        return Condition(False, "healthy")

    # ---- for the implementations

    @contextmanager
    def _removed_on_failure(self, name: str) -> Iterator[None]:
        """Around what a create does after its lvcreate: when that fails, the
        LV it made is removed before the failure is answered. The provisioner
        may send the PVC to another node on the answer, and nothing would ever
        delete an LV left here (a crash, which answers nothing, leaves its
        state for the retry instead: see ``csi_lvm.lifecycle``)."""
        try:
            yield
        except Exception:
            with contextlib.suppress(Exception):  # the failure is the answer
                self._remove_unfinished(name)
            raise

    def _remove_unfinished(self, name: str) -> None:
        lv = self.lvm.find_lv(self.device_class.volume_group, name)
        owned = None if lv is None else self.inventory.adopt(lv, self.device_class)
        if owned is not None:
            log.warning("removing what a failed create made", lv=owned.lv.full_name)
            self.lvm.remove(owned.lv.vg_name, owned.lv.name)

    def _made(self, lv_name: str, timeout: float | None) -> Owned:
        """The LV just made: a report of it alone (one of the whole VG would
        cost in proportion to the volumes the node has)."""
        lv = self.lvm.find_lv(self.device_class.volume_group, lv_name, timeout)
        owned = None if lv is None else self.inventory.adopt(lv, self.device_class)
        if owned is None:
            raise Aborted(
                f"LV {self.device_class.volume_group}/{lv_name} vanished while being made; retry"
            )
        return owned
