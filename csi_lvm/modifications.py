"""Volumes changed after they are made: the mutable parameters of
ControllerModifyVolume and CreateVolume (Kubernetes' VolumeAttributesClass).

Every class takes the IO limits (``io_limits.PARAMETERS``). A thick class
laid out linear or as two-way RAID1, without integrity, also takes
``layout`` (``linear`` or ``raid1``): LVM converts the LV in place, online.
Anything else is refused by name before anything changes; a conversion is
tried in LVM's test mode first, so one that cannot be made here changes
nothing.

A volume's limits live in its ``io`` tag; they are set on the pod cgroups of
its publications on this node at once, and on each later publication.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

from csi_lvm import fs
from csi_lvm.backends import Backends
from csi_lvm.config import DeviceClass
from csi_lvm.errors import DriverError, FailedPrecondition, InvalidArgument
from csi_lvm.ids import Tag
from csi_lvm.io_limits import PARAMETERS, IoLimits, PodCgroups, parse_limit, pod_uid_of
from csi_lvm.lvm.layouts import LINEAR, RAID1
from csi_lvm.volumes import Inventory, Owned

log = structlog.get_logger("csi_lvm.modifications")

LAYOUT = "layout"
CONVERTIBLE = (LINEAR, RAID1)


@dataclass(frozen=True)
class Change:
    """What a request's mutable parameters ask: limits by io.max key (None
    lifts one), and a layout (None: the volume's stays)."""

    limits: dict[str, int | None] = field(default_factory=dict)
    layout: str | None = None


def convertible(device_class: DeviceClass) -> bool:
    layout = device_class.layout
    two_way_mirror = layout.kind == RAID1 and layout.mirrors == 1
    return (
        not device_class.is_thin and not layout.integrity and (layout.is_linear or two_way_mirror)
    )


def allowed_parameters(device_class: DeviceClass) -> list[str]:
    return [*PARAMETERS, *([LAYOUT] if convertible(device_class) else [])]


def parse_change(parameters: Mapping[str, str], device_class: DeviceClass) -> Change:
    """The change ``parameters`` ask of a volume of ``device_class``, every
    key and value checked."""
    allowed = allowed_parameters(device_class)
    unknown = sorted(key for key in parameters if key not in allowed)
    if unknown:
        raise InvalidArgument(
            f"mutable parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"cannot be set on a volume of device class {device_class.name}, which takes "
            f"{', '.join(allowed)}: fix the VolumeAttributesClass"
        )
    layout = parameters.get(LAYOUT)
    if layout is not None and layout not in CONVERTIBLE:
        raise InvalidArgument(
            f"mutable parameter {LAYOUT}={layout!r} is not one a volume can change to: "
            f"give {' or '.join(CONVERTIBLE)}"
        )
    limits = {PARAMETERS[k]: parse_limit(k, v) for k, v in parameters.items() if k in PARAMETERS}
    return Change(limits, layout)


def limits_of(owned: Owned) -> IoLimits:
    return IoLimits.from_tag(owned.tags.get(Tag.IO_LIMITS, ""))


class Modifier:
    """Makes a change to a volume of this node, and keeps its IO limits on
    the pods that use it."""

    def __init__(self, inventory: Inventory, backends: Backends, cgroups: PodCgroups) -> None:
        self.inventory = inventory
        self.backends = backends
        self.cgroups = cgroups

    def modify(self, owned: Owned, change: Change, timeout: float | None) -> None:
        """The layout first (the step that may be refused), then the limits;
        a repeat finds both done."""
        if change.layout is not None:
            self.backends.of(owned.device_class).convert_layout(owned, change.layout, timeout)
        current = limits_of(owned)
        limits = current.changed(change.limits)
        if limits != current:
            self.inventory.set_tag(owned, Tag.IO_LIMITS, limits.tag_value(), timeout)
            log.info("IO limits set", lv=owned.lv.full_name, limits=limits.tag_value() or "none")
        self._apply_to_publications(owned, limits)

    def _apply_to_publications(self, owned: Owned, limits: IoLimits) -> None:
        device = owned.data_device()
        if not os.path.exists(device):  # not active here: nothing uses it
            return
        number = fs.device_number(device)
        node = "/" + os.path.basename(os.path.realpath(device))
        for entry in fs.mounts():
            uid = pod_uid_of(entry.mount_point)
            if uid and (entry.root == node or fs.backing_device(entry) == number):
                self.cgroups.apply(uid, number, limits)

    def on_publish(self, owned: Owned, target: str, device_number: str) -> None:
        """Before a publication's mount: the volume's limits on its pod."""
        limits = limits_of(owned)
        uid = pod_uid_of(target)
        if not limits.any or uid is None:
            return
        if not self.cgroups.apply(uid, device_number, limits):
            raise FailedPrecondition(
                f"volume {owned.id} has IO limits ({limits.tag_value()}), but pod {uid}'s "
                f"cgroup is not under {self.cgroups.root}: the limits cannot be enforced; "
                "check the plugin's --cgroup-root"
            )

    def on_unpublish(self, owned: Owned, target: str, device_number: str) -> None:
        """After a publication's unmount: its pod's limits on the device
        lifted (the pod, if it stays, no longer uses it)."""
        uid = pod_uid_of(target)
        if uid is None or not limits_of(owned).any:
            return
        try:
            self.cgroups.apply(uid, device_number, IoLimits())
        except DriverError as error:
            log.warning("could not lift a pod's IO limits", pod=uid, error=str(error))
