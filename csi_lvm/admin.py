"""What an admin asks of a node: ``csi-lvm status`` (classes, volumes,
snapshots) and ``csi-lvm doctor`` (is this node fit to run csi-lvm?)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from csi_lvm import lifecycle
from csi_lvm.backends import Backends
from csi_lvm.backends.admission import metadata_room_lvs
from csi_lvm.config import Config
from csi_lvm.errors import ConfigError, DriverError
from csi_lvm.ids import Kind, Tag
from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.errors import LvmError
from csi_lvm.lvm.layouts import RAID_LAYOUTS
from csi_lvm.volumes import Owned
from csi_lvm.wiring import Options, build


@dataclass
class ObjectStatus:
    kind: str
    id: str
    name: str
    lv: str
    size_bytes: int
    used_percent: float | None
    condition: str
    abnormal: bool
    kubernetes: dict[str, str] = field(default_factory=dict)
    source: str = ""
    # A copy into it from another node, in flight or interrupted: bytes
    # durable so far and the rate it went at, as last recorded.
    copied_bytes: int | None = None
    copy_bytes_per_second: int | None = None
    encrypted: bool = False


@dataclass
class ClassStatus:
    name: str
    backing: str
    size_bytes: int
    used_bytes: int
    available_bytes: int
    overprovision_ratio: float
    data_percent: float | None = None
    metadata_percent: float | None = None
    unavailable: str | None = None  # why the class takes no new volumes here
    encrypted: bool = False  # new volumes are LUKS2
    volume_group: str = ""
    # The VG's metadata area (records of every LV): its size, the room left,
    # and about how many more volumes or snapshots that room holds.
    metadata_area_bytes: int = 0
    metadata_free_bytes: int = 0
    metadata_room_volumes: int | None = None
    objects: list[ObjectStatus] = field(default_factory=list)


_KUBERNETES_TAGS = {
    Tag.PVC_NAMESPACE: "pvcNamespace",
    Tag.PVC_NAME: "pvc",
    Tag.PV_NAME: "pv",
    Tag.SNAPSHOT_NAMESPACE: "volumeSnapshotNamespace",
    Tag.SNAPSHOT_NAME: "volumeSnapshot",
    Tag.SNAPSHOT_CONTENT_NAME: "volumeSnapshotContent",
}


def node_status(backends: Backends, owners: Mapping[str, str] | None = None) -> list[ClassStatus]:
    """Each class and its objects; ``owners`` (from the Kubernetes API) names
    the PVC or VolumeSnapshot of each id, which the LVs' tags no longer keep."""
    inventory = backends.inventory
    scan = inventory.scan()
    owned = [*inventory.owned(Kind.VOLUME, scan), *inventory.owned(Kind.SNAPSHOT, scan)]
    classes = []
    for device_class in inventory.config.device_classes:
        backend = backends.of(device_class)
        space = backend.space(scan)
        status = ClassStatus(
            name=device_class.name,
            backing=device_class.describe(),
            size_bytes=space.total_bytes,
            used_bytes=space.used_bytes,
            available_bytes=space.available_bytes,
            overprovision_ratio=device_class.overprovision_ratio,
            unavailable=space.refusal,
            volume_group=device_class.volume_group,
            encrypted=device_class.encrypted,
        )
        group = scan.vgs.get(device_class.volume_group)
        if group is not None:
            status.metadata_area_bytes = group.metadata_area_bytes
            status.metadata_free_bytes = group.metadata_free_bytes
            status.metadata_room_volumes = metadata_room_lvs(group)
        if device_class.thin_pool is not None:
            pool = scan.lv(device_class.volume_group, device_class.thin_pool)
            if pool is not None:
                status.data_percent = pool.data_percent
                status.metadata_percent = pool.metadata_percent
        for item in owned:
            if item.device_class.name != device_class.name:
                continue
            condition = backend.condition(item, scan)
            status.objects.append(
                ObjectStatus(
                    kind=item.kind.value,
                    id=str(item.id),
                    name=item.name,
                    lv=item.lv.full_name,
                    size_bytes=item.size_bytes,
                    used_percent=item.lv.data_percent,
                    condition=condition.message,
                    abnormal=condition.abnormal,
                    kubernetes=_kubernetes_names(item.kind, item.tags, owners, str(item.id)),
                    source=item.source_id,
                    encrypted=item.encrypted,
                    **_copy_progress(item),
                )
            )
        classes.append(status)
    return classes


def _copy_progress(item: Owned) -> dict[str, int | None]:
    if lifecycle.is_ready(item) or not lifecycle.copied_from_another_node(item):
        return {}
    return {
        "copied_bytes": lifecycle.copied_bytes(item.lv),
        "copy_bytes_per_second": lifecycle.copy_rate(item.lv) or None,
    }


def _kubernetes_names(
    kind: Kind, tags: Mapping[Tag, str], owners: Mapping[str, str] | None, object_id: str
) -> dict[str, str]:
    names = {v: tags[k] for k, v in _KUBERNETES_TAGS.items() if k in tags}
    owner = (owners or {}).get(object_id)
    if owner is not None:
        names["pvc" if kind is Kind.VOLUME else "volumeSnapshot"] = owner
    return names


def status_json(classes: list[ClassStatus]) -> list[dict[str, object]]:
    return [asdict(c) for c in classes]


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def status_text(classes: list[ClassStatus], no_api: str = "") -> str:
    """The classes as text; ``no_api`` says why PVC and VolumeSnapshot names
    are missing (no access to the Kubernetes API)."""
    lines = [f"(PVC and VolumeSnapshot names not shown: {no_api})"] if no_api else []
    for c in classes:
        pool = ""
        if c.data_percent is not None:
            pool = f", pool data {c.data_percent:.1f}%, metadata {c.metadata_percent or 0:.1f}%"
        lines.append(
            f"{c.name}: {c.backing}; {_size(c.used_bytes)} of {_size(c.size_bytes)} provisioned, "
            f"{_size(c.available_bytes)} free (overprovision x{c.overprovision_ratio:g}){pool}"
        )
        if c.metadata_room_volumes is not None:
            lines.append(
                f"  volume group {c.volume_group} metadata area: {_size(c.metadata_free_bytes)} "
                f"of {_size(c.metadata_area_bytes)} free, room for about "
                f"{c.metadata_room_volumes} more volumes or snapshots"
            )
        if c.unavailable:
            lines.append(f"  takes no new volumes: {c.unavailable}")
        if c.encrypted:
            plain = sum(not o.encrypted for o in c.objects)
            lines.append(
                "  encrypted (LUKS2, a key per volume)"
                + (f"; {plain} made before the class was encrypted are plain" if plain else "")
            )
        for o in c.objects:
            owner = " ".join(f"{k}={v}" for k, v in o.kubernetes.items()) or "-"
            used = f"{o.used_percent:.1f}% used" if o.used_percent is not None else "thick"
            flag = ("ABNORMAL " if o.abnormal else "") + ("encrypted " if o.encrypted else "")
            lines.append(
                f"  {o.kind:<8} {o.name:<40} {_size(o.size_bytes):>10} {used:<12} "
                f"{owner}  {flag}{o.condition}"
            )
            if o.copied_bytes is not None:
                rate = f", {_size(o.copy_bytes_per_second)}/s" if o.copy_bytes_per_second else ""
                lines.append(
                    f"           copying from {o.source}: {_size(o.copied_bytes)} of "
                    f"{_size(o.size_bytes)} in{rate}"
                )
        if not c.objects:
            lines.append("  (no volumes or snapshots)")
    return "\n".join(lines)


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str
    fix: str = ""


def _class_checks(config: Config, lvm: Lvm, node_id: str) -> list[Check]:
    """One check per device class: its storage is here, or the config puts
    it on other nodes only."""
    backends = build(config, Options(node_id, "doctor"), lvm).backends
    try:
        scan = backends.inventory.scan()
    except (DriverError, LvmError) as error:
        return [Check(False, "volume groups", str(error))]
    checks = []
    for backend in backends:
        what = f"device class {backend.device_class.describe()}"
        if not backend.offered_here:
            checks.append(Check(True, f"{what}: not on node {node_id} (the config says so)"))
            continue
        missing = backend.missing(scan)
        problem = f"{missing}: create it, or fix the config" if missing else backend.warning(scan)
        checks.append(Check(problem is None, what, problem or ""))
    return checks


def _encryption_checks() -> list[Check]:
    """What an encrypted class needs: dm-crypt and cryptsetup."""
    return [
        Check(
            Path("/sys/module/dm_crypt").exists(),
            "kernel module dm_crypt",
            "run `modprobe dm_crypt` (encrypted classes need it) and add it to /etc/modules-load.d",
        ),
        Check(
            shutil.which("cryptsetup") is not None,
            "cryptsetup",
            "install cryptsetup (Debian: cryptsetup-bin): encrypted classes open volumes with it",
        ),
    ]


def _raid_checks(integrity: bool) -> list[Check]:
    """What RAID classes need: dm-raid, and dm-integrity under checked ones."""
    modules = [("dm_raid", "RAID classes")] + (
        [("dm_integrity", "classes with integrity")] if integrity else []
    )
    return [
        Check(
            Path(f"/sys/module/{module}").exists(),
            f"kernel module {module}",
            f"run `modprobe {module}` ({who} need it) and add it to /etc/modules-load.d",
        )
        for module, who in modules
    ]


def doctor(config: Config | None, lvm: Lvm, socket_dir: str, node_id: str) -> list[Check]:
    """Everything a node needs, each with what to do when it is missing."""
    checks: list[Check] = []
    misc = Path("/proc/misc").read_text() if Path("/proc/misc").exists() else ""
    checks.append(
        Check(
            "device-mapper" in misc,
            "kernel device-mapper",
            "this kernel has no device-mapper: LVM cannot activate volumes here; "
            "load dm_mod or use a kernel built with CONFIG_BLK_DEV_DM",
        )
    )
    thin = Path("/sys/module/dm_thin_pool").exists()
    checks.append(
        Check(
            thin, "kernel module dm_thin_pool", "run `modprobe dm_thin_pool` (thin classes need it)"
        )
    )
    cow = Path("/sys/module/dm_snapshot").exists()
    checks.append(
        Check(
            cow,
            "kernel module dm_snapshot",
            "run `modprobe dm_snapshot` (thick snapshots and clones copy through a COW snapshot)",
        )
    )
    if config is not None and any(c.encrypted for c in config.device_classes):
        checks += _encryption_checks()
    if config is not None and any(c.layout.kind in RAID_LAYOUTS for c in config.device_classes):
        checks += _raid_checks(any(c.layout.integrity for c in config.device_classes))
    try:
        version = lvm.version().splitlines()[0]
        checks.append(Check(True, f"LVM tools ({version.strip()})"))
    except (DriverError, LvmError) as error:
        checks.append(Check(False, "LVM tools", f"install lvm2: {error}"))
    if config is None:
        checks.append(Check(False, "config", "give --config with the node's device classes"))
    else:
        try:
            resolved = config.for_node(node_id)
        except ConfigError as error:  # two entries of a class match this node
            checks.append(Check(False, "config", str(error)))
        else:
            checks += _class_checks(resolved, lvm, node_id)
    usable = os.path.isdir(socket_dir) and os.access(socket_dir, os.W_OK)
    checks.append(
        Check(usable, f"socket directory {socket_dir}", "create it and make it writable by root")
    )
    return checks


def compared_label_keys(
    reported: Mapping[str, str] | None, node_key: str, listed: Sequence[str]
) -> list[str]:
    """The label keys doctor compares: those listed, and those the running
    plugin reported beside its node key."""
    return sorted(set(listed) | (set(reported or {}) - {node_key}))


def topology_checks(
    reported: Mapping[str, str] | None,
    node_key: str,
    listed: Sequence[str],
    labels_now: Mapping[str, str] | None,
    api_problem: str = "",
) -> list[Check]:
    """The topology the running plugin reported (its NodeGetInfo; None when
    no plugin answers here) against the node's labels now. The kubelet reads
    NodeGetInfo once, at registration: a label changed since needs a restart."""
    keys = compared_label_keys(reported, node_key, listed)
    if not keys:
        return []
    if labels_now is None:
        return [Check(False, "Kubernetes API (topology labels)", api_problem)]
    checks = []
    for key in keys:
        now = labels_now.get(key)
        if reported is None:
            checks.append(
                Check(
                    now is not None,
                    f"topology label {key}",
                    f"the node has no label {key}: label it (kubectl label node NODE "
                    f"{key}=VALUE) before the plugin starts",
                )
            )
            continue
        then = reported.get(key)
        checks.append(
            Check(
                then == now,
                f"topology label {key}" + (f" = {now}" if now else ""),
                f"the plugin reports {key}={then or '(none)'} but the node's label is now "
                f"{now or '(none)'}: restart the plugin's pod (the kubelet reads the node's "
                "topology when the plugin registers)",
            )
        )
    return checks
