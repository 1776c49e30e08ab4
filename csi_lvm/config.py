"""The driver's configuration: device classes read from YAML, checked at start.

Errors name the file and line, so an admin can fix a config map without
reading code. Whether the named volume groups and pools exist is checked by
the caller against LVM (see ``cli.serve``); this module does no I/O beyond
reading the file.

One config serves every node, and a class name may be listed more than once:
at most one entry without ``nodes:`` (the general one) and any number with
it, so that one StorageClass is backed by different volume groups on nodes
that differ. ``Config.for_node`` picks the entry each node uses; the driver
only ever sees that resolved config, one entry per name.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from csi_lvm.config_fields import (
    at,
    boolean,
    mapping,
    number,
    quantity,
    reject_unknown,
    string,
    string_list,
    whole,
)
from csi_lvm.errors import ConfigError
from csi_lvm.filesystems import SUPPORTED_FILESYSTEMS
from csi_lvm.ids import CLASS_NAME_RE, MAX_CLASS_NAME
from csi_lvm.lvm.layouts import (
    LAYOUTS,
    LINEAR,
    MAX_MIRRORS,
    MAX_STRIPE_BYTES,
    MAX_STRIPES,
    MIN_STRIPE_BYTES,
    PLAIN,
    RAID10,
    RAID_LAYOUTS,
    STRIPED_LAYOUTS,
    Layout,
)

# LVM's own rule for VG and LV names, minus names it reserves.
LVM_NAME_RE = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")

_CLASS_KEYS = {
    "name", "volumeGroup", "thinPool", "overprovisionRatio", "fullThresholdPercent", "default",
    "nodes", "mkfsOptions", "allowPoolWithoutZeroing", "encryption", "layout", "stripes",
    "stripeSize", "mirrors", "integrity", "spare",
}  # fmt: skip
# What a thick class makes by lvcreate; a thin class's pool was made by its
# admin, so of these it names only the layout, which the driver checks.
_SHAPE_KEYS = ("stripes", "stripeSize", "mirrors", "integrity")
# What ``encryption:`` accepts: LUKS2 (dm-crypt) with a key per volume, or none.
ENCRYPTIONS = ("luks2", "none")
# A thin pool this full refuses new volumes: writes to a full pool fail, so
# leave headroom for the volumes that already exist.
DEFAULT_FULL_THRESHOLD_PERCENT = 95.0
_TOP_KEYS = {"deviceClasses"}


@dataclass(frozen=True)
class DeviceClass:
    name: str
    volume_group: str
    thin_pool: str | None = None
    overprovision_ratio: float = 1.0
    default: bool = False
    full_threshold_percent: float = DEFAULT_FULL_THRESHOLD_PERCENT  # thin pools only
    # Node-name patterns (fnmatch) of the nodes that have this class; empty:
    # every node. One config serves a cluster whose nodes differ.
    nodes: tuple[str, ...] = ()
    # Extra mkfs arguments per filesystem, before the device (features a host
    # kernel lacks turned off, say).
    mkfs_options: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # A thin pool that does not zero new blocks leaks earlier tenants' data
    # into partly written blocks; only an admin whose users zero themselves
    # may accept one (thin only).
    allow_pool_without_zeroing: bool = False
    # Volumes made from now on are LUKS2 (csi_lvm.crypt); each LV records
    # its own, so a class that changes this leaves its volumes as they are.
    encrypted: bool = False
    # How each LV lies on the VG's PVs (thick); for a thin class, what its
    # pool's data LV must be (checked, never made: the pool is the admin's).
    layout: Layout = PLAIN
    # Room no new volume or snapshot may take (growth of existing volumes
    # may): bytes of the class's capacity, in usable bytes.
    spare_bytes: int = 0
    line: int = 0  # where the class starts in the config file, for messages
    volume_group_line: int = 0
    thin_pool_line: int = 0
    layout_line: int = 0

    @property
    def is_thin(self) -> bool:
        return self.thin_pool is not None

    def on_node(self, node_id: str) -> bool:
        """Whether the config says this node has the class."""
        return not self.nodes or self.pattern_for(node_id) is not None

    def pattern_for(self, node_id: str) -> str | None:
        """The first of the class's ``nodes:`` patterns that the node matches."""
        return next((p for p in self.nodes if fnmatch.fnmatchcase(node_id, p)), None)

    def mkfs_options_for(self, fs_type: str) -> tuple[str, ...]:
        return dict(self.mkfs_options).get(fs_type, ())

    def describe(self) -> str:
        where = f"{self.volume_group}/{self.thin_pool}" if self.thin_pool else self.volume_group
        shape = "" if self.layout.is_linear else f", {self.layout.describe()}"
        return f"{self.name} ({'thin pool' if self.is_thin else 'volume group'} {where}{shape})"


@dataclass(frozen=True)
class Config:
    device_classes: tuple[DeviceClass, ...]
    source: str = "<config>"

    @property
    def default_class(self) -> DeviceClass | None:
        for device_class in self.device_classes:
            if device_class.default:
                return device_class
        return self.device_classes[0] if len(self.device_classes) == 1 else None

    def find(self, name: str) -> DeviceClass | None:
        return next((c for c in self.device_classes if c.name == name), None)

    @property
    def volume_groups(self) -> list[str]:
        return sorted({c.volume_group for c in self.device_classes})

    def for_node(self, node_id: str) -> Config:
        """The config as node ``node_id`` sees it: one entry per class name,
        in the order the names first appear. A name's entry is the one whose
        ``nodes:`` match the node, else the one without ``nodes:``; a name
        whose entries all name other nodes keeps its first entry, with the
        patterns of them all, so that the class is reported as not on this
        node. The class is the default when any of its entries says so.
        Resolving a resolved config changes nothing.

        Two entries of a name whose patterns both match the node are a
        ConfigError: which volume group the node's volumes of that class live
        in must not depend on the order of the file."""
        resolved = [
            _entry_for(name, entries, node_id, self.source)
            for name, entries in _by_name(self.device_classes).items()
        ]
        return Config(tuple(resolved), self.source)


def _entry_for(name: str, entries: list[DeviceClass], node_id: str, source: str) -> DeviceClass:
    """The entry of class ``name`` that node ``node_id`` uses."""
    matching = [c for c in entries if c.nodes and c.on_node(node_id)]
    if len(matching) > 1:
        first, second = matching[:2]
        raise ConfigError(
            f"{source} lines {first.line} and {second.line}: node {node_id} matches two "
            f"entries of device class {name!r} (patterns {first.pattern_for(node_id)!r} and "
            f"{second.pattern_for(node_id)!r}); make the nodes: patterns of a class's entries "
            "disjoint, so that each node matches one of them at most"
        )
    general = next((c for c in entries if not c.nodes), None)
    if matching:
        entry = matching[0]
    elif general is not None:
        entry = general
    else:  # on other nodes only: reported missing here, naming all its nodes
        patterns = tuple(dict.fromkeys(p for c in entries for p in c.nodes))
        entry = dataclasses.replace(entries[0], nodes=patterns)
    default = any(c.default for c in entries)
    return entry if entry.default == default else dataclasses.replace(entry, default=default)


def _by_name(classes: Iterable[DeviceClass]) -> dict[str, list[DeviceClass]]:
    """The entries of each class name, names in the order they first appear."""
    by_name: dict[str, list[DeviceClass]] = {}
    for device_class in classes:
        by_name.setdefault(device_class.name, []).append(device_class)
    return by_name


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from exc
    return parse_config(text, str(path))


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source} line {mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if root is None:
        raise ConfigError(f"{source}: the file is empty; it must list deviceClasses")
    top = mapping(root, source, "the top level")
    reject_unknown(top, _TOP_KEYS, source)
    if "deviceClasses" not in top:
        raise ConfigError(f"{source} line {root.start_mark.line + 1}: 'deviceClasses' is missing")
    list_node = top["deviceClasses"][1]
    if not isinstance(list_node, yaml.SequenceNode) or not list_node.value:
        raise ConfigError(
            f"{at(source, list_node)}: 'deviceClasses' must be a non-empty list of classes"
        )
    classes = [_device_class(node, source) for node in list_node.value]
    _check_classes(classes, source)
    return Config(tuple(classes), source)


def _device_class(node: yaml.Node, source: str) -> DeviceClass:
    fields = mapping(node, source, "a device class")
    reject_unknown(fields, _CLASS_KEYS, source)
    for required in ("name", "volumeGroup"):
        if required not in fields:
            raise ConfigError(f"{at(source, node)}: device class lacks '{required}'")
    name = string(fields["name"][1], source, "name")
    if not CLASS_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{at(source, fields['name'][1])}: class name {name!r} must be lower-case letters, "
            f"digits and '-', at most {MAX_CLASS_NAME} characters"
        )
    volume_group = _lvm_name(fields["volumeGroup"][1], source, "volumeGroup")
    thin_pool = (
        _lvm_name(fields["thinPool"][1], source, "thinPool") if "thinPool" in fields else None
    )
    ratio = _thin_only_number(fields, "overprovisionRatio", thin_pool, source, 1.0)
    if ratio < 1.0:
        raise ConfigError(
            f"{at(source, fields['overprovisionRatio'][1])}: overprovisionRatio must be at least 1"
        )
    threshold = _thin_only_number(
        fields, "fullThresholdPercent", thin_pool, source, DEFAULT_FULL_THRESHOLD_PERCENT
    )
    if not 0 < threshold <= 100:
        raise ConfigError(
            f"{at(source, fields['fullThresholdPercent'][1])}: fullThresholdPercent must be "
            "above 0 and at most 100 (the pool data or metadata use, in percent, that stops "
            "new volumes)"
        )
    nodes = string_list(fields["nodes"][1], source, "nodes") if "nodes" in fields else ()
    mkfs_options = (
        _mkfs_options(fields["mkfsOptions"][1], source) if "mkfsOptions" in fields else ()
    )
    default = boolean(fields, "default", source)
    allow_unzeroed = boolean(fields, "allowPoolWithoutZeroing", source)
    if allow_unzeroed and thin_pool is None:
        raise ConfigError(
            f"{at(source, fields['allowPoolWithoutZeroing'][1])}: allowPoolWithoutZeroing "
            "applies to thin classes only; add thinPool or remove it"
        )
    encrypted = _encryption(fields, source)
    layout = _layout(fields, thin_pool, source)
    spare = quantity(fields["spare"][1], source, "spare") if "spare" in fields else 0
    return DeviceClass(
        name,
        volume_group,
        thin_pool,
        ratio,
        default,
        full_threshold_percent=threshold,
        nodes=nodes,
        mkfs_options=mkfs_options,
        allow_pool_without_zeroing=allow_unzeroed,
        encrypted=encrypted,
        layout=layout,
        spare_bytes=spare,
        line=node.start_mark.line + 1,
        volume_group_line=fields["volumeGroup"][1].start_mark.line + 1,
        thin_pool_line=fields["thinPool"][1].start_mark.line + 1 if thin_pool else 0,
        layout_line=fields["layout"][1].start_mark.line + 1 if "layout" in fields else 0,
    )


def _layout(
    fields: dict[str, tuple[yaml.Node, yaml.Node]], thin_pool: str | None, source: str
) -> Layout:
    """The class's layout: named settings only, each checked against the
    layouts it applies to, so that nothing unchecked reaches lvcreate."""
    kind = string(fields["layout"][1], source, "layout") if "layout" in fields else LINEAR
    if kind not in LAYOUTS:
        raise ConfigError(
            f"{at(source, fields['layout'][1])}: layout {kind!r} is not one csi-lvm makes; "
            f"use one of {', '.join(LAYOUTS)}"
        )
    if thin_pool is not None:
        for key in _SHAPE_KEYS:
            if key in fields:
                raise ConfigError(
                    f"{at(source, fields[key][1])}: {key} applies to thick classes only: a "
                    "thin class's pool is made by its admin (lvcreate, lvconvert), and the "
                    "driver checks its layout only; remove it"
                )
        return Layout(kind)

    def only_for(key: str, layouts: tuple[str, ...]) -> yaml.Node | None:
        if key not in fields:
            return None
        if kind not in layouts:
            raise ConfigError(
                f"{at(source, fields[key][1])}: {key} applies to layout "
                f"{' and '.join(layouts)} only, and this class's layout is {kind}; remove it "
                "or change the layout"
            )
        return fields[key][1]

    stripes_node = only_for("stripes", STRIPED_LAYOUTS)
    stripes = 2 if kind in STRIPED_LAYOUTS else 1
    if stripes_node is not None:
        stripes = whole(stripes_node, source, "stripes", 2, MAX_STRIPES)
    stripe_bytes = 0
    if (size_node := only_for("stripeSize", STRIPED_LAYOUTS)) is not None:
        stripe_bytes = quantity(size_node, source, "stripeSize")
        power_of_two = stripe_bytes & (stripe_bytes - 1) == 0
        if not power_of_two or not MIN_STRIPE_BYTES <= stripe_bytes <= MAX_STRIPE_BYTES:
            raise ConfigError(
                f"{at(source, size_node)}: stripeSize must be a power of two from 4Ki to 4Gi "
                "(64Ki, say)"
            )
    mirrors = 1 if kind in RAID_LAYOUTS else 0
    if (mirrors_node := only_for("mirrors", RAID_LAYOUTS)) is not None:
        mirrors = whole(mirrors_node, source, "mirrors", 1, MAX_MIRRORS)
        if kind == RAID10 and mirrors != 1:
            raise ConfigError(
                f"{at(source, mirrors_node)}: LVM's raid10 keeps two copies of each stripe "
                "(mirrors: 1); for more copies use layout raid1"
            )
    integrity_node = only_for("integrity", RAID_LAYOUTS)
    integrity = boolean(fields, "integrity", source) if integrity_node is not None else False
    return Layout(kind, stripes, stripe_bytes, mirrors, integrity)


def _encryption(fields: dict[str, tuple[yaml.Node, yaml.Node]], source: str) -> bool:
    if "encryption" not in fields:
        return False
    value = string(fields["encryption"][1], source, "encryption")
    if value not in ENCRYPTIONS:
        raise ConfigError(
            f"{at(source, fields['encryption'][1])}: encryption {value!r} is not one csi-lvm "
            f"offers; use one of {', '.join(ENCRYPTIONS)}"
        )
    return value == "luks2"


def _check_classes(classes: list[DeviceClass], source: str) -> None:
    by_name = _by_name(classes)
    for name, entries in by_name.items():
        general = [c for c in entries if not c.nodes]
        if len(general) > 1:
            raise ConfigError(
                f"{source} line {general[1].line}: device class {name!r} is listed again "
                f"without nodes: (as at line {general[0].line}); a class has one entry for "
                "every node at most: give this entry the nodes: it is for, or remove one"
            )
        first = entries[0]
        for other in entries[1:]:
            if other.is_thin != first.is_thin:
                kinds = ("thin (it has thinPool)", "thick (no thinPool)")
                this, that = kinds if other.is_thin else kinds[::-1]
                raise ConfigError(
                    f"{source} line {other.line}: this entry of device class {name!r} is {this} "
                    f"but the one at line {first.line} is {that}; a class's volumes are all "
                    "of one kind, so its entries must all have thinPool or none: fix the "
                    "entry, or give it a class name of its own"
                )
            if other.layout != first.layout:
                raise ConfigError(
                    f"{source} line {other.line}: this entry of device class {name!r} has "
                    f"layout {other.layout.describe()} but the one at line {first.line} has "
                    f"{first.layout.describe()}; a class's volumes have one layout on every "
                    "node: give every entry the same layout settings"
                )
            if other.encrypted != first.encrypted:
                raise ConfigError(
                    f"{source} line {other.line}: this entry of device class {name!r} says "
                    f"encryption {'luks2' if other.encrypted else 'none'} but the one at line "
                    f"{first.line} does not; a class's volumes are encrypted on every node or "
                    "on none: give every entry the same encryption"
                )
        seen: dict[str, DeviceClass] = {}
        for entry in entries:
            for pattern in entry.nodes:
                earlier = seen.setdefault(pattern, entry)
                if earlier is not entry:
                    raise ConfigError(
                        f"{source} line {entry.line}: node pattern {pattern!r} is also in the "
                        f"entry of device class {name!r} at line {earlier.line}; a node may "
                        "match one entry of a class only: keep the pattern in one of them"
                    )
    defaults = list(_by_name(c for c in classes if c.default).values())
    if len(defaults) > 1:
        raise ConfigError(
            f"{source} line {defaults[1][0].line}: only one device class may be the default "
            f"({', '.join(entries[0].name for entries in defaults)} all say default: true; "
            "entries of one class may each say it)"
        )


def _mkfs_options(node: yaml.Node, source: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    fields = mapping(node, source, "mkfsOptions")
    reject_unknown(fields, set(SUPPORTED_FILESYSTEMS), source)
    options = []
    for fs_type, (_, value) in fields.items():
        words = string_list(value, source, f"mkfsOptions.{fs_type}")
        for word, item in zip(words, value.value, strict=True):
            if "\0" in word or word == "--":
                raise ConfigError(f"{at(source, item)}: mkfs argument {word!r} is not allowed")
        options.append((fs_type, words))
    return tuple(options)


def _lvm_name(node: yaml.Node, source: str, what: str) -> str:
    value = string(node, source, what)
    if not LVM_NAME_RE.fullmatch(value) or value in {".", ".."}:
        raise ConfigError(f"{at(source, node)}: {what} {value!r} is not a valid LVM name")
    return value


def _thin_only_number(
    fields: dict[str, tuple[yaml.Node, yaml.Node]],
    key: str,
    thin_pool: str | None,
    source: str,
    default: float,
) -> float:
    """A number that only a thin class may set; ``default`` when absent."""
    if key not in fields:
        return default
    node = fields[key][1]
    if thin_pool is None:
        raise ConfigError(
            f"{at(source, node)}: {key} applies to thin classes only; add thinPool or remove it"
        )
    return number(node, source, key)
