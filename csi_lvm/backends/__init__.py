"""The storage of each device class behind one interface (``base.Backend``):
``thin`` for classes with a thin pool, ``thick`` for plain volume groups.

``Backends`` holds one backend per configured class; the servicers, the
metrics and the admin commands ask it for the backend of a class and never
branch on thin versus thick themselves.
"""

from __future__ import annotations

from collections.abc import Iterator

from csi_lvm.backends.base import Backend
from csi_lvm.backends.thick import ThickBackend
from csi_lvm.backends.thin import ThinBackend
from csi_lvm.config import DeviceClass
from csi_lvm.lifecycle import Lifecycle
from csi_lvm.volumes import Inventory


class Backends:
    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self.states = Lifecycle(inventory.lvm)
        self._by_class: dict[str, Backend] = {
            device_class.name: self._make(device_class)
            for device_class in inventory.config.device_classes
        }

    def of(self, device_class: DeviceClass) -> Backend:
        """The class's backend; a class retired from the config (its LVs
        still to be deleted) gets one made for it."""
        found = self._by_class.get(device_class.name)
        if found is None or found.device_class != device_class:
            return self._make(device_class)
        return found

    def _make(self, device_class: DeviceClass) -> Backend:
        kind = ThinBackend if device_class.is_thin else ThickBackend
        return kind(device_class, self.inventory, self.states)

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._by_class.values())
