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

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from csi_lvm import lifecycle
from csi_lvm.config import DeviceClass
from csi_lvm.errors import Aborted, FailedPrecondition
from csi_lvm.lifecycle import Lifecycle
from csi_lvm.lvm.records import LogicalVolume, VolumeGroup
from csi_lvm.volumes import Inventory, Owned, Scan


@dataclass(frozen=True)
class ClassSpace:
    """Room in a device class, in bytes."""

    available_bytes: int
    extent_bytes: int
    total_bytes: int
    used_bytes: int  # provisioned (thin: virtual sizes) or allocated (thick)
    full: str | None = None  # why the class takes no new volumes, when it is full


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
class Condition:
    abnormal: bool
    message: str


class Backend(ABC):
    """One device class's storage."""

    def __init__(self, device_class: DeviceClass, inventory: Inventory, states: Lifecycle):
        self.device_class = device_class
        self.inventory = inventory
        self.lvm = inventory.lvm
        self.states = states

    # ---- room

    @abstractmethod
    def space(self, scan: Scan) -> ClassSpace:
        """The class's capacity, use and room, from one scan."""

    def room_for_volume(self, size: int, source: Owned | None, extent_bytes: int) -> int:
        """Room a new ``size``-byte volume takes, blank or made from ``source``."""
        return size

    @abstractmethod
    def room_for_snapshot(self, source: Owned, extent_bytes: int) -> int:
        """Room a snapshot of ``source`` takes."""

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
        self.lvm.remove(owned.lv.vg_name, owned.lv.name, timeout)

    # ---- contents and health

    def known_blank(self, lv: LogicalVolume) -> bool:
        """Whether the LV certainly holds nothing, so probing it is wasted."""
        return False

    def reads_zeros(self, lv: LogicalVolume) -> bool:
        """Whether every block reads zeros now, and the rest of a block still
        does once part of it is written: zeroing any of it again (mkfs's own
        zeroing) is wasted work."""
        return False

    def storage_problem(self, scan: Scan) -> str | None:
        """A problem of the class's storage itself that makes its objects
        abnormal (a thin pool out of room, say)."""
        return None

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

    def _volume_group(self, scan: Scan) -> VolumeGroup:
        group = scan.vgs.get(self.device_class.volume_group)
        if group is None:
            raise FailedPrecondition(
                f"volume group {self.device_class.volume_group} is not present on node "
                f"{self.inventory.node_id}; check the node's disks and the csi-lvm config"
            )
        return group

    def _made(self, lv_name: str, timeout: float | None) -> Owned:
        """The LV just made, from a shared scan (not an ``lvs`` of this LV:
        concurrent creates share one)."""
        lv = self.inventory.scan(timeout).lv(self.device_class.volume_group, lv_name)
        owned = None if lv is None else self.inventory.adopt(lv, self.device_class)
        if owned is None:
            raise Aborted(
                f"LV {self.device_class.volume_group}/{lv_name} vanished while being made; retry"
            )
        return owned
