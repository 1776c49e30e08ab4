"""The driver's inventory: which LVs it owns, and what each one is.

An LV belongs to csi-lvm only when it carries this driver's ownership tag and
a name and class tag that agree with its id. Everything that answers "does
volume X exist?" goes through here, so "no tag, no touch" holds everywhere.
This module asks the LVM layer for records (and to activate an LV that a
caller needs as a device); it holds no policy of thin or thick classes, whose
space and health are ``csi_lvm.backends``' business. The reports it reads
come from the kept view (``csi_lvm.kept_view``), which also decides when a
report is fresh enough for a call.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import structlog

from csi_lvm import crypt
from csi_lvm.config import Config, DeviceClass
from csi_lvm.crypt import LUKS2
from csi_lvm.csi import csi_pb2
from csi_lvm.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from csi_lvm.ids import (
    Kind,
    ObjectId,
    Tag,
    csi_name_in,
    decode_tags,
    encode_tags,
    lv_name_for,
    node_component,
    view_name_for,
)
from csi_lvm.kept_view import REFRESH_SECONDS as REFRESH_SECONDS
from csi_lvm.kept_view import KeptView
from csi_lvm.kept_view import Scan as Scan
from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.errors import LvmNotFound
from csi_lvm.lvm.records import LogicalVolume
from csi_lvm.validation import source_reference

log = structlog.get_logger("csi_lvm.volumes")


@dataclass(frozen=True)
class Owned:
    """An LV csi-lvm created: a volume or a snapshot."""

    id: ObjectId
    lv: LogicalVolume
    device_class: DeviceClass
    tags: dict[Tag, str]

    @property
    def kind(self) -> Kind:
        return self.id.kind

    @property
    def name(self) -> str:
        return self.tags.get(Tag.NAME) or csi_name_in(self.lv.name) or ""

    @property
    def size_bytes(self) -> int:
        return self.lv.size_bytes

    @property
    def encrypted(self) -> bool:
        """Whether the LV holds a LUKS2 header and its data only through it."""
        return self.tags.get(Tag.ENCRYPTION) == LUKS2

    @property
    def mapping(self) -> str:
        """The name of the dm-crypt mapping an encrypted LV is opened as."""
        return crypt.mapping_name(self.id.device_class, self.lv.name)

    def data_device(self) -> str:
        """The device node the data is read and written through: an
        encrypted volume's open mapping, else the LV's own."""
        if self.encrypted and crypt.is_open(self.mapping):
            return crypt.mapping_path(self.mapping)
        return self.lv.device

    @property
    def source_id(self) -> str:
        """The id of the volume or snapshot this was made from ("" if none)."""
        source = self.tags.get(Tag.SOURCE, "")
        if not source or ":" in source:  # empty, or a whole id (earlier versions)
            return source
        return str(ObjectId(self.id.node, self.id.device_class, source))


# How many LVs' adoptions are kept (more than a VG's metadata area records).
_ADOPTIONS_KEPT = 16384
# An owned LV's id, class and decoded tags.
_Adoption = tuple[ObjectId, DeviceClass, dict[Tag, str]]


class Inventory:
    def __init__(
        self,
        config: Config,
        lvm: Lvm,
        node_id: str,
        driver_name: str,
        refresh_seconds: float = REFRESH_SECONDS,
    ):
        self.config = config
        self.lvm = lvm
        self.node_id = node_id
        self.node_part = node_component(node_id)
        self.driver_name = driver_name
        self.kept = KeptView(lvm, config.volume_groups, refresh_seconds)
        self._owned_memo: (
            tuple[Scan, dict[Kind, list[Owned]], dict[tuple[str, Kind], int]] | None
        ) = None
        # What ``adopt`` found for an LV's name, pool and tags (the config
        # does not change while the driver runs).
        self._adoptions: dict[tuple[str, str, str, tuple[str, ...]], _Adoption | None] = {}

    # ---- ids

    def make_id(self, device_class: DeviceClass, lv_name: str) -> ObjectId:
        return ObjectId(self.node_part, device_class.name, lv_name)

    def local_id(self, text: str, kind: Kind, what: str) -> ObjectId | None:
        """The id when ``text`` names an object of this node; None when it
        cannot be one of ours at all. An id of another node is refused, never
        treated as absent: the object may well exist where the id says."""
        object_id = ObjectId.parse(text)
        if object_id is None or object_id.kind is not kind:
            return None
        if object_id.node != self.node_part:
            raise FailedPrecondition(
                f"{what} {text} belongs to node {object_id.node}, not to this node "
                f"({self.node_id}); send the call to the csi-lvm of that node"
            )
        return object_id

    def parse_local_id(
        self, text: str, kind: Kind, what: str
    ) -> tuple[ObjectId, DeviceClass] | None:
        """Like ``local_id``, with the object's class; an id of a class this
        node's config lacks is refused too."""
        object_id = self.local_id(text, kind, what)
        if object_id is None:
            return None
        device_class = self.config.find(object_id.device_class)
        if device_class is None:
            raise FailedPrecondition(
                f"{what} {text} is in device class {object_id.device_class!r}, which this "
                f"node's config does not define (it has: {self.class_names()}); "
                "restore the class to reach it"
            )
        return object_id, device_class

    def class_names(self) -> str:
        return ", ".join(c.name for c in self.config.device_classes)

    # ---- ownership

    def tags_for(
        self,
        kind: Kind,
        name: str,
        device_class: DeviceClass,
        source: Owned | None,
        remote_source: str = "",
    ) -> list[str]:
        """The tags of a new volume or snapshot: only what the driver needs
        (see ``Tag``); the CSI name only when its LV name is a hash. A
        source of this node is named by its LV, one of another node
        (``remote_source``) by its whole id. What is made from a source of
        this node holds its data, so it is encrypted when the source is;
        anything else, when its class encrypts."""
        lv_name = lv_name_for(kind, name)
        encrypted = device_class.encrypted if source is None else source.encrypted
        return encode_tags(
            {
                Tag.DRIVER: self.driver_name,
                Tag.NAME: "" if csi_name_in(lv_name) == name else name,
                Tag.CLASS: device_class.name,
                Tag.SOURCE: remote_source or ("" if source is None else source.lv.name),
                Tag.ENCRYPTION: LUKS2 if encrypted else "",
            }
        )

    def adopt(self, lv: LogicalVolume, device_class: DeviceClass | None = None) -> Owned | None:
        """The LV as an owned object, or None when csi-lvm did not make it."""
        if device_class is not None:
            return self._adopted(lv, device_class)
        # Every new report is adopted whole (the owned objects, the thin
        # pool's sum), and it repeats the LVs of the last: what the answer
        # depends on is kept, so a report costs a lookup per LV.
        key = (lv.vg_name, lv.name, lv.pool, lv.tags)
        try:
            known = self._adoptions[key]
        except KeyError:
            owned = self._adopted(lv, None)
            known = None if owned is None else (owned.id, owned.device_class, owned.tags)
            if len(self._adoptions) >= _ADOPTIONS_KEPT:
                self._adoptions.clear()
            self._adoptions[key] = known
        return None if known is None else Owned(known[0], lv, known[1], known[2])

    def _adopted(self, lv: LogicalVolume, device_class: DeviceClass | None) -> Owned | None:
        tags = decode_tags(lv.tags)
        if tags.get(Tag.DRIVER) != self.driver_name:
            return None
        device_class = device_class or self.config.find(tags.get(Tag.CLASS, ""))
        if device_class is None or tags.get(Tag.CLASS) != device_class.name:
            return None
        if lv.vg_name != device_class.volume_group:
            return None
        if device_class.thin_pool is not None and lv.pool != device_class.thin_pool:
            return None
        object_id = self.make_id(device_class, lv.name)
        if ObjectId.parse(str(object_id)) is None:
            return None
        if not tags.get(Tag.NAME) and csi_name_in(lv.name) is None:
            return None
        return Owned(object_id, lv, device_class, tags)

    def is_own_view(self, lv: LogicalVolume, target: str | None = None) -> bool:
        """Whether ``lv`` is a temporary view this driver made for a copy
        (into ``target``, when given): a classic snapshot with its tags, or
        the plain LV with those tags that LVM 2.03 leaves of one whose
        lvcreate failed ("Failed to revert ... Manual intervention required",
        when it cannot suspend a frozen origin)."""
        tags = decode_tags(lv.tags)
        view_for = tags.get(Tag.VIEW_FOR, "")
        # A view for another node's copy names its target by id.
        remote = ObjectId.parse(view_for) if ":" in view_for else None
        view_for = remote.lv_name if remote is not None else view_for
        return (
            tags.get(Tag.DRIVER) == self.driver_name
            and bool(view_for)
            and (target is None or view_for == target)
            and lv.name == view_name_for(view_for)
            and (lv.attr.is_cow_snapshot or not lv.attr.is_cow_origin)
        )

    # ---- the kept view (csi_lvm.kept_view)

    def scan(self, timeout: float | None = None) -> Scan:
        """The configured VGs and their LVs, from a report begun after this call."""
        return self.kept.scan(timeout)

    def view(self, timeout: float | None = None) -> Scan:
        return self.kept.view(timeout)

    def current(self, timeout: float | None = None) -> Scan:
        return self.kept.current(timeout)

    def keep_fresh(self, stop: threading.Event) -> None:
        self.kept.keep_fresh(stop)

    def get(
        self, object_id: ObjectId, device_class: DeviceClass, timeout: float | None = None
    ) -> Owned | None:
        lv = self.lvm.find_lv(device_class.volume_group, object_id.lv_name, timeout)
        return None if lv is None else self.adopt(lv, device_class)

    def get_if_here(
        self, object_id: ObjectId, device_class: DeviceClass, timeout: float | None = None
    ) -> Owned | None:
        """As ``get``, and None too when the class's volume group is not on
        this node."""
        try:
            return self.get(object_id, device_class, timeout)
        except LvmNotFound:
            return None

    def set_tag(self, owned: Owned, tag: Tag, value: str, timeout: float | None) -> None:
        """One of the driver's tags on an owned LV, set anew ("": removed),
        in one metadata update."""
        old = [raw for raw in owned.lv.tags if decode_tags([raw]).keys() == {tag}]
        self.lvm.change_tags(
            owned.lv.vg_name, owned.lv.name, encode_tags({tag: value}), old, timeout
        )

    def activated(self, lv: LogicalVolume, timeout: float | None = None) -> LogicalVolume:
        """The LV with its device node present, activating it when it is not
        (a thin snapshot, made with activation skipped, or a VG activated
        only in part)."""
        if lv.attr.active and os.path.exists(lv.device):
            return lv
        self.lvm.activate(lv.vg_name, lv.name, timeout)
        refreshed = self.lvm.find_lv(lv.vg_name, lv.name, timeout)
        if refreshed is None or not os.path.exists(refreshed.device):
            raise FailedPrecondition(
                f"LV {lv.full_name} could not be activated: its device node is missing"
            )
        return refreshed

    def find_anywhere(self, object_id: ObjectId, timeout: float | None) -> Owned | None:
        """The driver's own LV with the id's name and class, in any volume
        group: also when the class has left the config (its PVs must still be
        deleted and unstaged) or the node's id has changed. It is owned only
        when its tags say it is this driver's object of that class. The
        class's own volume group is asked first (one LV's report); the
        others only when it is not there."""
        configured = self.config.find(object_id.device_class)
        if configured is not None:
            owned = self.get_if_here(object_id, configured, timeout)
            if owned is not None:
                return owned
        for lv in self.lvm.find_lvs_named(object_id.lv_name, timeout):
            device_class = self.config.find(object_id.device_class)
            if device_class is None or device_class.volume_group != lv.vg_name:
                device_class = DeviceClass(object_id.device_class, lv.vg_name, lv.pool or None)
            owned = self.adopt(lv, device_class)
            if owned is not None and owned.kind is object_id.kind:
                return owned
        return None

    def lookup(self, text: str, kind: Kind, what: str, scan: Scan) -> Owned | None:
        """The owned object an id names, from a scan; None when there is none."""
        parsed = self.parse_local_id(text, kind, what)
        if parsed is None:
            return None
        object_id, device_class = parsed
        lv = scan.lv(device_class.volume_group, object_id.lv_name)
        return None if lv is None else self.adopt(lv, device_class)

    def content_source(
        self, content: csi_pb2.VolumeContentSource, scan: Scan, must_exist: bool, topology_key: str
    ) -> Owned | None:
        """The snapshot or volume a new volume is made from; NOT_FOUND when it
        does not exist, unless ``must_exist`` is false (then None). One held
        by another node is RESOURCE_EXHAUSTED: the volume belongs there."""
        reference = source_reference(content)
        if reference is None:
            raise InvalidArgument("volume_content_source must name a snapshot or a volume")
        text, kind, what = reference
        if not text:
            raise InvalidArgument(f"volume_content_source: the {what} id is required")
        object_id = ObjectId.parse(text)
        if object_id is not None and object_id.node != self.node_part:
            raise ResourceExhausted(
                f"{what} {text} is held by node {object_id.node}; a volume made from it can "
                f"only live on that node, not on {self.node_id}: schedule the pod that uses "
                f"the new PVC to node {object_id.node} (a nodeAffinity on "
                f"{topology_key}, or a podAffinity to the source's pod)"
            )
        found = self.lookup(text, kind, what, scan)
        if found is None and must_exist:
            raise NotFound(f"{what} {text} does not exist on node {self.node_id}")
        return found

    def require(self, text: str, kind: Kind, what: str, scan: Scan) -> Owned:
        """Like ``lookup``, but an absent object is NOT_FOUND."""
        found = self.lookup(text, kind, what, scan)
        if found is None:
            raise NotFound(f"{what} {text} does not exist on node {self.node_id}")
        return found

    def find_by_name(self, kind: Kind, lv_name: str, scan: Scan) -> Owned | None:
        """The owned object with this LV name in any configured volume group.

        An LV of that name that csi-lvm did not make is an error: the driver
        will neither adopt nor replace it."""
        for lv in scan.named(lv_name):
            owned = self.adopt(lv)
            if owned is None or owned.kind is not kind:
                raise AlreadyExists(
                    f"volume group {lv.vg_name} already has an LV named {lv_name} that csi-lvm "
                    "does not own; rename or remove it, or use another name"
                )
            return owned
        return None

    def existing(
        self, kind: Kind, lv_name: str, scan: Scan, fresh: bool, timeout: float | None
    ) -> Owned | None:
        """The object of this LV name that a create decided from ``scan``
        meets, as it is now (``KeptView.named`` decides when to read again)."""
        found = self.find_by_name(kind, lv_name, scan)
        if found is None:
            return None
        lv = self.kept.named(found.lv.vg_name, lv_name, scan, fresh, timeout,
                             lvm_corrects_absence=True)  # fmt: skip
        return None if lv is None else self.adopt(lv, found.device_class)

    def lookup_now(self, text: str, kind: Kind, what: str, timeout: float | None) -> Owned | None:
        """The owned object an id names, as it is now: for a reader that acts
        on it at once (a backup may follow a snapshot's creation at once, or
        its deletion)."""
        parsed = self.parse_local_id(text, kind, what)
        if parsed is None:
            return None
        object_id, device_class = parsed
        lv = self.kept.named(device_class.volume_group, object_id.lv_name, self.view(timeout),
                             False, timeout, lvm_corrects_absence=False)  # fmt: skip
        return None if lv is None else self.adopt(lv, device_class)

    def counts(self, scan: Scan) -> dict[tuple[str, Kind], int]:
        """How many owned objects of each class and kind ``scan`` shows (worked
        out with ``owned``, once per report)."""
        self.owned(Kind.VOLUME, scan)
        assert self._owned_memo is not None
        return self._owned_memo[2]

    def owned(self, kind: Kind, scan: Scan) -> list[Owned]:
        """The owned objects of one kind in ``scan``, sorted by id; worked out
        once per report (a scrape of a kept report costs no pass over it)."""
        memo = self._owned_memo
        if memo is None or memo[0] is not scan:
            by_kind: dict[Kind, list[Owned]] = {k: [] for k in Kind}
            counts: dict[tuple[str, Kind], int] = {}
            for lv in scan.lvs:
                if (found := self.adopt(lv)) is not None:
                    by_kind[found.kind].append(found)
                    key = (found.device_class.name, found.kind)
                    counts[key] = counts.get(key, 0) + 1
            for objects in by_kind.values():
                objects.sort(key=lambda o: str(o.id))
            memo = self._owned_memo = (scan, by_kind, counts)
        return list(memo[1][kind])
