"""The storage of each device class behind one interface (``base.Backend``):
``thin`` for classes with a thin pool, ``thick`` for plain volume groups.

``Backends`` holds one backend per configured class; the servicers, the
metrics and the admin commands ask it for the backend of a class and never
branch on thin versus thick themselves.
"""

from __future__ import annotations

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
            device_class.name: (ThinBackend if device_class.is_thin else ThickBackend)(
                device_class, inventory, self.states
            )
            for device_class in inventory.config.device_classes
        }

    def of(self, device_class: DeviceClass) -> Backend:
        return self._by_class[device_class.name]
