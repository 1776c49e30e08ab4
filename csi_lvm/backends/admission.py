"""Whether a device class takes a new object now, and the room it holds
while the object is made: the class's space, the reservations of creates
under way, the pause after LVM asked for a repair, and the room the volume
group's metadata area keeps. Pure bookkeeping: no LVM command runs here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from csi_lvm.lvm.errors import METADATA_FIX
from csi_lvm.lvm.records import VolumeGroup

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
    # Of the room there is, what the class's ``spare`` keeps from new
    # objects (not counted in ``available_bytes``; growth may take it).
    spare_bytes: int = 0

    @property
    def refusal(self) -> str | None:
        """Why the class takes no new volumes, or None while it does."""
        return self.missing or self.needs_repair or self.metadata_full or self.full

    @property
    def room_for_growth(self) -> int:
        """What existing volumes may still grow into: the spare too."""
        return 0 if self.refusal else self.available_bytes + self.spare_bytes


def metadata_room_lvs(group: VolumeGroup) -> int | None:
    """About how many more LVs the VG's metadata area holds (None when the
    report did not say)."""
    if group.metadata_area_bytes <= 0:
        return None
    return max(0, group.metadata_free_bytes - METADATA_RESERVE_BYTES) // METADATA_BYTES_PER_LV


def metadata_low(group: VolumeGroup) -> str | None:
    """A warning while the VG's metadata area has little room left."""
    room = metadata_room_lvs(group)
    if room is None or room >= METADATA_LOW_LVS:
        return None
    return (
        f"the metadata area of volume group {group.name} has room for about {room} more "
        f"volumes or snapshots ({group.metadata_free_bytes} of "
        f"{group.metadata_area_bytes} bytes left). {METADATA_FIX}"
    )


def metadata_full(group: VolumeGroup) -> str | None:
    """Why the VG takes no new LVs for want of metadata room, or None."""
    if group.metadata_area_bytes <= 0 or group.metadata_free_bytes >= METADATA_RESERVE_BYTES:
        return None
    return (
        f"the metadata area of volume group {group.name} is full ({group.metadata_free_bytes} "
        f"of {group.metadata_area_bytes} bytes left). {METADATA_FIX}"
    )


class NoRoom(Exception):
    """What a create asks does not fit in the room left (``available`` bytes)."""

    def __init__(self, available: int) -> None:
        super().__init__(available)
        self.available = available


@dataclass
class _Reservation:
    bytes: int
    done: float | None = None  # when the create that held it ended


class Reservations:
    """Room held by creates under way and just ended. Creates that run at
    once each read the room from a report that need not show the others' LVs
    yet (LVM itself does not enforce a thin class's overprovisionRatio): a
    reservation counts for every report that began before its create ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[_Reservation] = []

    @contextmanager
    def holding(self, needed: int, available: int, report_started: float) -> Iterator[None]:
        """Hold ``needed`` of ``available`` bytes (as a report begun at
        ``report_started`` saw them) while an object is made, or raise NoRoom."""
        with self._lock:
            now = time.monotonic()
            self._held = [
                r for r in self._held if r.done is None or now - r.done < RESERVATION_SECONDS
            ]
            unseen = sum(r.bytes for r in self._held if r.done is None or r.done > report_started)
            left = max(0, available - unseen)
            if needed > left:
                raise NoRoom(left)
            reservation = _Reservation(needed)
            self._held.append(reservation)
        made = False
        try:
            yield
            made = True
        finally:
            with self._lock:
                if made:
                    reservation.done = time.monotonic()
                else:  # nothing was made: nothing to count
                    self._held.remove(reservation)


class RepairPause:
    """LVM refused a create until an admin repairs the storage: the class
    takes no new volumes for a while, so the scheduler looks elsewhere."""

    def __init__(self) -> None:
        self._since: tuple[float, str] | None = None

    def note(self, message: str) -> None:
        self._since = (time.monotonic(), message)

    def reason(self) -> str | None:
        if self._since is None:
            return None
        since, message = self._since
        if time.monotonic() - since > NEEDS_REPAIR_SECONDS:
            self._since = None  # let the next create find out again
            return None
        return (
            f"{message} (csi-lvm takes no new volumes in this class for "
            f"{NEEDS_REPAIR_SECONDS / 60:.0f} minutes after such a refusal; restart the "
            "plugin once the pool is repaired)"
        )
