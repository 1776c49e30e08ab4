"""IO limits on the pods that use a volume, where the kernel enforces them:
cgroup v2's ``io.max`` of each pod's cgroup, one line per device.

A limit belongs to the volume (kept in an LV tag), and is applied to the pod
cgroup of each publication: the kubelet's target path names the pod, and the
kubelet makes a pod's cgroup before it mounts the pod's volumes. A pod
restarted keeps its cgroup; a new pod or a rebooted node gets the limit at
its next NodePublishVolume, with the device's number of that boot.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, fields
from pathlib import Path

from csi_lvm.errors import FailedPrecondition, InvalidArgument

# The mutable parameters (VolumeAttributesClass keys), by io.max's own keys.
PARAMETERS = {
    "readIOPS": "riops",
    "writeIOPS": "wiops",
    "readBytesPerSecond": "rbps",
    "writeBytesPerSecond": "wbps",
}
UNLIMITED = "max"  # io.max's word, and the parameter value that lifts a limit

_POD_UID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# kubelet's target paths: <kubelet>/pods/<uid>/volumes/kubernetes.io~csi/<pv>/mount
# for a filesystem, <kubelet>/plugins/kubernetes.io/csi/volumeDevices/publish/<pv>/<uid>
# for a block device.
_FILESYSTEM_TARGET = re.compile(rf"/pods/({_POD_UID})/volumes/")
_BLOCK_TARGET = re.compile(rf"/volumeDevices/publish/[^/]+/({_POD_UID})$")
_QUANTITY = re.compile(r"^([0-9]+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_MULTIPLIERS = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
                "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}  # fmt: skip


@dataclass(frozen=True)
class IoLimits:
    """Each limit per second, None where there is none."""

    riops: int | None = None
    wiops: int | None = None
    rbps: int | None = None
    wbps: int | None = None

    @property
    def any(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    def tag_value(self) -> str:
        """``riops=100,wbps=1048576``: the set limits, for the volume's tag."""
        return ",".join(
            f"{f.name}={getattr(self, f.name)}"
            for f in fields(self)
            if getattr(self, f.name) is not None
        )

    @classmethod
    def from_tag(cls, text: str) -> IoLimits:
        """The limits a tag holds; a malformed entry (none is ever written)
        is no limit."""
        values: dict[str, int] = {}
        known = {f.name for f in fields(cls)}
        for entry in text.split(","):
            key, _, value = entry.partition("=")
            if key in known and value.isdigit():
                values[key] = int(value)
        return cls(**values)

    def changed(self, changes: dict[str, int | None]) -> IoLimits:
        """These limits with ``changes`` (io.max keys) made: None lifts one."""
        return IoLimits(
            **{f.name: changes.get(f.name, getattr(self, f.name)) for f in fields(self)}
        )

    def io_max_line(self, device_number: str) -> str:
        """The io.max line that sets every limit of ``device_number``
        (``major:minor``), lifting those not set."""
        words = [
            f"{f.name}={UNLIMITED if getattr(self, f.name) is None else getattr(self, f.name)}"
            for f in fields(self)
        ]
        return f"{device_number} {' '.join(words)}"


def parse_limit(parameter: str, value: str) -> int | None:
    """A parameter's value: a positive count (IOPS) or quantity (bytes per
    second: 10Mi, 500k), or ``max`` for no limit."""
    text = value.strip()
    if text == UNLIMITED:
        return None
    found = _QUANTITY.match(text)
    iops = parameter.endswith("IOPS")
    if not found or (found.group(2) and iops):
        wanted = "a whole number" if iops else "a whole number or a quantity such as 10Mi"
        raise InvalidArgument(
            f"mutable parameter {parameter}={value!r} is not a number of "
            f"{'IOPS' if iops else 'bytes per second'}: give {wanted}, or {UNLIMITED} to lift "
            "the limit"
        )
    number = int(found.group(1)) * _MULTIPLIERS[found.group(2) or ""]
    if number <= 0:
        raise InvalidArgument(
            f"mutable parameter {parameter}={value!r} must be above 0 ({UNLIMITED} lifts the limit)"
        )
    return number


def pod_uid_of(target_path: str) -> str | None:
    """The pod a kubelet target path belongs to; None for any other path."""
    found = _FILESYSTEM_TARGET.search(target_path) or _BLOCK_TARGET.search(target_path)
    return found.group(1) if found else None


class PodCgroups:
    """The pods' cgroups under the cgroup v2 mount at ``root``: the kubelet
    names a pod's ``pod<uid>`` (cgroupfs driver) or
    ``kubepods[-<qos>]-pod<uid with underscores>.slice`` (systemd driver),
    under ``kubepods``, or its QoS class's cgroup in it; ``kubepods`` is at
    the root, or in the kubelet's ``cgroupRoot``."""

    def __init__(self, root: str = "/sys/fs/cgroup") -> None:
        self.root = Path(root)

    def find(self, pod_uid: str) -> Path | None:
        systemd = f"kubepods-*pod{pod_uid.replace('-', '_')}.slice"
        # kubepods at the root, or under the kubelet's --cgroup-root.
        tops = [*self.root.glob("kubepods*"), *self.root.glob("*/kubepods*")]
        for top in sorted(t for t in tops if t.is_dir()):
            for directory in (top, *sorted(p for p in top.iterdir() if p.is_dir())):
                if (directory / f"pod{pod_uid}").is_dir():
                    return directory / f"pod{pod_uid}"
                for found in directory.glob(systemd):
                    return found
        return None

    def apply(self, pod_uid: str, device_number: str, limits: IoLimits) -> bool:
        """Set ``limits`` on ``device_number`` for the pod; False when the
        pod has no cgroup here (it is gone)."""
        cgroup = self.find(pod_uid)
        if cgroup is None:
            return False
        io_max = cgroup / "io.max"
        try:
            io_max.write_text(limits.io_max_line(device_number) + "\n")
        except FileNotFoundError:
            raise FailedPrecondition(
                f"{cgroup} has no io.max: the io controller is not enabled for the pods' "
                "cgroups on this node (cgroup v2, with io in kubepods' cgroup.subtree_control); "
                "IO limits cannot be enforced here"
            ) from None
        except OSError as error:
            if error.errno == errno.ENODEV:  # the device went first
                return False
            raise FailedPrecondition(
                f"could not set IO limits in {io_max}: {error.strerror}"
            ) from error
        return True
