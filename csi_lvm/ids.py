"""Volume and snapshot ids, LV names and LVM tags: pure encoding, no I/O.

A volume id reads ``<node>:<class>:<lv>``; it names the node and device class
that own the volume and the LV that holds it. The LV name is a pure function
of the CSI name, so LVM itself refuses a second LV for one name even across
driver restarts. Tags carry everything else (the CSI name, the class, the
PVC/PV names) and are written by the command that creates the LV; the tags
that mark a volume's lifecycle state are ``csi_lvm.lifecycle``'s.
"""

from __future__ import annotations

import enum
import hashlib
import re
import string
from dataclasses import dataclass

from csi_lvm.errors import InvalidArgument

MAX_ID_BYTES = 128
MAX_NAME_BYTES = 128  # the CSI spec's general limit for strings
MAX_CLASS_NAME = 32
MAX_RAW_NODE = 40  # longer node names are hashed inside ids

CLASS_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")
_READABLE_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,46}[a-z0-9])?")
_RAW_NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}")
_HASHED_NODE_RE = re.compile(r"=[0-9a-f]{16}")
_LV_RE = re.compile(r"(?:csi|snap)(?:-[a-z0-9-]{1,48}|_[0-9a-f]{40})")


class Kind(enum.Enum):
    VOLUME = "volume"
    SNAPSHOT = "snapshot"

    @property
    def lv_prefix(self) -> str:
        return "csi" if self is Kind.VOLUME else "snap"


def lv_name_for(kind: Kind, csi_name: str) -> str:
    """The LV name for a CSI name: readable when the name is a short DNS
    label (``pvc-<uuid>``), otherwise a hash; '-' and '_' keep the two forms
    from ever colliding."""
    if _READABLE_NAME_RE.fullmatch(csi_name):
        return f"{kind.lv_prefix}-{csi_name}"
    digest = hashlib.sha256(csi_name.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return f"{kind.lv_prefix}_{digest}"


def csi_name_in(lv_name: str) -> str | None:
    """The CSI name an LV name spells out (its readable form), else None: a
    hashed name needs the name tag to say it."""
    kind = kind_of_lv(lv_name)
    if kind is None or not lv_name.startswith(f"{kind.lv_prefix}-"):
        return None
    name = lv_name[len(kind.lv_prefix) + 1 :]
    return name if _READABLE_NAME_RE.fullmatch(name) else None


def view_name_for(lv_name: str) -> str:
    """The temporary COW snapshot that a copy into ``lv_name`` reads from. The
    '.' keeps it from ever being a volume or snapshot name (or id)."""
    return f"{lv_name}.view"


def kind_of_lv(lv_name: str) -> Kind | None:
    if not _LV_RE.fullmatch(lv_name):
        return None
    return Kind.VOLUME if lv_name.startswith("csi") else Kind.SNAPSHOT


def node_component(node_id: str) -> str:
    """How a node appears inside ids: itself when short and plain, else a hash."""
    if _RAW_NODE_RE.fullmatch(node_id):
        return node_id
    return "=" + hashlib.sha256(node_id.encode()).hexdigest()[:16]


def _is_node_component(text: str) -> bool:
    """Whether ``text`` is what ``node_component`` makes of some node id."""
    return bool(_RAW_NODE_RE.fullmatch(text) or _HASHED_NODE_RE.fullmatch(text))


@dataclass(frozen=True)
class ObjectId:
    """A parsed volume or snapshot id."""

    node: str  # the node component, possibly hashed
    device_class: str
    lv_name: str

    @property
    def kind(self) -> Kind:
        kind = kind_of_lv(self.lv_name)
        assert kind is not None  # guaranteed by parse()
        return kind

    def __str__(self) -> str:
        return f"{self.node}:{self.device_class}:{self.lv_name}"

    @classmethod
    def build(cls, node_id: str, device_class: str, lv_name: str) -> ObjectId:
        return cls(node_component(node_id), device_class, lv_name)

    @classmethod
    def parse(cls, text: str) -> ObjectId | None:
        """The id, or None when ``text`` is not an id this driver could have made."""
        if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
            return None
        parts = text.split(":")
        if len(parts) != 3:
            return None
        node, device_class, lv_name = parts
        if not _is_node_component(node):
            return None
        if not CLASS_NAME_RE.fullmatch(device_class) or kind_of_lv(lv_name) is None:
            return None
        return cls(node, device_class, lv_name)


GROUP_KEY_RE = re.compile(r"group_[0-9a-f]{40}")


@dataclass(frozen=True)
class GroupId:
    """A group snapshot's id, ``<node>:<class>:group_<hash of its name>``.
    The group is its member snapshots: those tagged with its key."""

    node: str  # the node component, possibly hashed
    device_class: str
    key: str

    def __str__(self) -> str:
        return f"{self.node}:{self.device_class}:{self.key}"

    @classmethod
    def build(cls, node_id: str, device_class: str, name: str) -> GroupId:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:40]
        return cls(node_component(node_id), device_class, f"group_{digest}")

    @classmethod
    def parse(cls, text: str) -> GroupId | None:
        """The id, or None when ``text`` is not a group id this driver could have made."""
        parts = text.split(":")
        if len(parts) != 3:
            return None
        node, device_class, key = parts
        if not _is_node_component(node):
            return None
        if not CLASS_NAME_RE.fullmatch(device_class) or not GROUP_KEY_RE.fullmatch(key):
            return None
        return cls(node, device_class, key)


def member_name(group_name: str, source_lv: str) -> str:
    """The CSI name of a group's snapshot of the volume ``source_lv``: never
    a name the CO could give a snapshot of its own (it holds a NUL)."""
    return f"{group_name}\x00{source_lv}"


def check_csi_name(name: str, what: str = "name") -> None:
    if not name:
        raise InvalidArgument(f"{what} is required")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidArgument(f"{what} is longer than the CSI limit of {MAX_NAME_BYTES} bytes")


# ---- tags ------------------------------------------------------------------
# LVM tags allow [A-Za-z0-9_+.:/=!&#-]; values are escaped so any string fits:
# safe characters stay, everything else becomes '+XX' per UTF-8 byte.

TAG_PREFIX = "csi-lvm/"
_TAG_SAFE = frozenset(string.ascii_letters + string.digits + "_.-")


def escape_tag_value(value: str) -> str:
    out = []
    for ch in value:
        if ch in _TAG_SAFE:
            out.append(ch)
        else:
            out.extend(f"+{byte:02X}" for byte in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


def unescape_tag_value(text: str) -> str:
    if "+" not in text and text.isascii():  # nothing escaped: every report decodes them all
        return text
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "+":
            raw.append(int(text[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(text[i].encode())
            i += 1
    return raw.decode("utf-8", "surrogatepass")


class Tag(enum.Enum):
    """The keys csi-lvm writes; the driver tag marks ownership.

    Every tag takes room in the VG's metadata area, which bounds how many
    LVs a VG holds, so an LV carries only what the driver needs to be
    stateless: driver, class, the CSI name only where the LV name does not
    spell it, the source's LV name (a source is always of the same node and
    class). The Kubernetes names below were written by earlier versions and
    are still read."""

    DRIVER = "driver"
    NAME = "name"
    CLASS = "class"
    SOURCE = "source"  # the LV (or, before, the id) a volume or snapshot was made from
    PVC_NAME = "pvc-name"
    PVC_NAMESPACE = "pvc-namespace"
    PV_NAME = "pv-name"
    SNAPSHOT_NAME = "snapshot-name"
    SNAPSHOT_NAMESPACE = "snapshot-namespace"
    SNAPSHOT_CONTENT_NAME = "snapshot-content-name"
    VIEW_FOR = "view-for"  # on a temporary COW snapshot: the LV it is copied into
    GROUP = "group"  # on a snapshot of a group snapshot: the group's key (``GroupId.key``)
    ENCRYPTION = "encryption"  # "luks2": the LV holds a LUKS2 header (csi_lvm.crypt)
    IO_LIMITS = "io"  # a volume's IO limits (csi_lvm.io_limits), e.g. "riops=100,wbps=1048576"


_TAGS_BY_KEY = {tag.value: tag for tag in Tag}


def encode_tags(values: dict[Tag, str]) -> list[str]:
    return [f"{TAG_PREFIX}{key.value}={escape_tag_value(v)}" for key, v in values.items() if v]


def decode_tags(tags: tuple[str, ...] | list[str]) -> dict[Tag, str]:
    """Our tags from an LV's tag list; foreign or malformed tags are ignored."""
    known = _TAGS_BY_KEY
    decoded: dict[Tag, str] = {}
    for raw in tags:
        if not raw.startswith(TAG_PREFIX) or "=" not in raw:
            continue
        key, _, value = raw[len(TAG_PREFIX) :].partition("=")
        if key in known:
            try:
                decoded[known[key]] = unescape_tag_value(value)
            except (ValueError, UnicodeDecodeError):
                continue
    return decoded
