"""Group snapshots: snapshots of several volumes of one node and one thin
device class, all as of one instant (CSI's GroupController).

A group is nothing but its member snapshots: ordinary snapshots (restorable,
clonable, with SnapshotMetadata, deletable one by one) that carry the
group's key in a tag (``Tag.GROUP``; the group id is
``<node>:<class>:<key>``, the key a hash of the group's name). Each member's
name is derived from the group's name and its source's LV, so a retried
create finds what an earlier attempt made.

One instant: every member whose filesystem is mounted here is frozen
(FIFREEZE: flushed, its journal clean, every write held) before the first
snapshot is cut, and all are thawed once the last is cut, whatever happened.
A write issued after the instant reaches no snapshot; one completed before
it is in its volume's. A member nobody has open takes no writes and needs no
hold; one open but not mounted here (a raw block volume in use, or a
filesystem mounted outside this plugin's view) cannot be held, and fails the
group before anything is made. (Suspending the device-mapper device instead
does not work: LVM finds the origin suspended, skips its own suspend and
leaves the pool's transaction id behind its metadata, measured with LVM
2.03.16. A frozen filesystem needs a kernel that lets LVM suspend it again:
Linux 6.12 does, 6.1 refuses with EBUSY, and the group fails saying so.)

No half group: members are made MAKING (``lifecycle``) and become READY
together once every one is cut. A crash in between leaves MAKING members,
which start-up removes; a retry of the create finding any member not ready
removes them all and cuts the group again (an instant cannot be resumed).
Filesystems a crash left frozen are thawed at start-up (``thaw_left_frozen``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from csi_lvm import freezing, fs, lifecycle
from csi_lvm.backends import Backends
from csi_lvm.backends.asks import Ask
from csi_lvm.errors import (
    AlreadyExists,
    DriverError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from csi_lvm.ids import (
    GroupId,
    Kind,
    ObjectId,
    Tag,
    encode_tags,
    lv_name_for,
    member_name,
    node_component,
)
from csi_lvm.locks import KeyedLocks
from csi_lvm.volumes import Inventory, Owned, Scan

log = structlog.get_logger("csi_lvm.group_snapshots")


@dataclass(frozen=True)
class Group:
    id: GroupId
    members: list[Owned]  # in the order of their sources' ids

    @property
    def ready(self) -> bool:
        return bool(self.members) and all(lifecycle.is_ready(m) for m in self.members)


class GroupSnapshots:
    def __init__(
        self, inventory: Inventory, backends: Backends, locks: KeyedLocks, node_id: str
    ) -> None:
        self.inventory = inventory
        self.backends = backends
        self.locks = locks
        self.node_id = node_id

    # ---- create

    def create(self, name: str, source_ids: Sequence[str], timeout: float | None) -> Group:
        """The group ``name`` of snapshots of ``source_ids``: made now, or as
        an earlier call of the same name and sources made it."""
        if not source_ids:
            raise InvalidArgument("source_volume_ids is required: name the volumes to snapshot")
        repeated = sorted({s for s in source_ids if list(source_ids).count(s) > 1})
        if repeated:
            raise InvalidArgument(f"source_volume_ids names {', '.join(repeated)} more than once")
        parsed = self._parsed_together(source_ids)
        group_id = GroupId.build(self.node_id, parsed[0].device_class, name)
        sources_sorted = sorted(source_ids)
        with self.locks.hold(group_id.key, *sorted(o.lv_name for o in parsed)):
            scan = self.inventory.scan(timeout)
            sources = [self._volume(text, scan) for text in sources_sorted]
            earlier = self._members(group_id, scan)
            if earlier:
                made_from = sorted(m.source_id for m in earlier)
                if made_from != sources_sorted:
                    raise AlreadyExists(
                        f"group snapshot {name} already exists for volumes "
                        f"{', '.join(made_from)}, not {', '.join(sources_sorted)}"
                    )
                group = Group(group_id, earlier)
                if group.ready:
                    return group
                self._discard(earlier, "its snapshots were not all cut", timeout)
                scan = self.inventory.scan(timeout)
                sources = [self._volume(text, scan) for text in sources_sorted]
            return self._cut(name, group_id, sources, scan, timeout)

    def _parsed_together(self, source_ids: Sequence[str]) -> list[ObjectId]:
        """The sources' ids, all of this node and of one device class; a group
        that spans nodes or classes cannot be cut at one instant here."""
        parsed = []
        for text in source_ids:
            object_id = ObjectId.parse(text)
            if object_id is None or object_id.kind is not Kind.VOLUME:
                raise NotFound(f"volume {text} does not exist (not a csi-lvm volume id)")
            parsed.append((text, object_id))
        here = node_component(self.node_id)
        elsewhere = sorted({o.node for _, o in parsed if o.node != here})
        if elsewhere:
            raise FailedPrecondition(
                f"volumes of a group snapshot must all live on one node: node {self.node_id} "
                f"cannot hold the I/O of volumes on {', '.join(elsewhere)}; snapshot each "
                "node's volumes in a group of their own"
            )
        classes = sorted({o.device_class for _, o in parsed})
        if len(classes) > 1:
            raise FailedPrecondition(
                "volumes of a group snapshot must all be in one device class (one thin "
                f"pool); these are in {', '.join(classes)}"
            )
        return [o for _, o in parsed]

    def _volume(self, text: str, scan: Scan) -> Owned:
        source = self.inventory.require(text, Kind.VOLUME, "volume", scan)
        lifecycle.check_ready(source, "source volume")
        return source

    def _cut(
        self,
        name: str,
        group_id: GroupId,
        sources: list[Owned],
        scan: Scan,
        timeout: float | None,
    ) -> Group:
        device_class = sources[0].device_class
        backend = self.backends.of(device_class)
        members = []
        for source in sources:
            csi_name = member_name(name, source.lv.name)
            tags = [
                *self.inventory.tags_for(Kind.SNAPSHOT, csi_name, device_class, source),
                *encode_tags({Tag.GROUP: group_id.key}),
                lifecycle.MAKING_TAG,  # READY only once every member is cut
            ]
            lv_name = lv_name_for(Kind.SNAPSHOT, csi_name)
            members.append((Ask(f"group snapshot {name}", lv_name, tags, timeout), source))
        made = backend.make_snapshots_at_once(members, scan, self._holding(sources))
        try:
            for member in made:
                backend.states.made(member.lv.vg_name, member.lv.name, timeout)
        except Exception:
            self._discard(made, "it could not be completed", None)
            raise
        log.info("group snapshot created", group=str(group_id), snapshots=len(made))
        return Group(group_id, self._members(group_id, self.inventory.scan(timeout)))

    def _holding(self, sources: list[Owned]) -> Callable[[Callable[[], None]], None]:
        """What runs the cutting while every source that takes writes is frozen."""

        def hold(cut: Callable[[], None]) -> None:
            frozen: list[str] = []
            holds = self._holds(sources)
            started = time.monotonic()
            try:
                for mount_point in holds:
                    freezing.freeze(mount_point)
                    frozen.append(mount_point)
                try:
                    cut()
                except DriverError as error:
                    if frozen and "suspend" in str(error):
                        raise FailedPrecondition(
                            f"this node's kernel does not let LVM snapshot a frozen filesystem "
                            f"({error}); Linux 6.12 does, 6.1 does not: upgrade the node's "
                            "kernel, or snapshot the volumes while their pods are stopped"
                        ) from error
                    raise
                held = round(time.monotonic() - started, 3)
                log.info("snapshots cut at one instant", volumes=len(sources),
                         frozen=len(frozen), held_seconds=held)  # fmt: skip
            finally:
                for mount_point in frozen:
                    try:
                        freezing.thaw(mount_point)
                    except Exception as error:  # every other one is thawed still
                        log.error("a filesystem stayed frozen after a group snapshot; the "
                                  "plugin thaws it when it restarts, or run fsfreeze -u",
                                  mount_point=mount_point, error=str(error))  # fmt: skip

        return hold

    def _holds(self, sources: list[Owned]) -> list[str]:
        """Where each source that takes writes is frozen: its filesystem's
        mount point here. A source open otherwise cannot be held."""
        holds = []
        mounted = freezing.filesystem_mounts()
        for source in sources:
            if not source.lv.attr.active:
                continue  # no device: nothing writes to it
            mount_point = _mount_of(source, mounted)
            if mount_point is not None:
                holds.append(mount_point)
            elif source.lv.attr.device_open:
                raise FailedPrecondition(
                    f"volume {source.id} is in use but has no filesystem mounted on this node "
                    "(a raw block volume, or mounted outside this plugin's view): its writes "
                    "cannot be held for one instant; stop what uses it, or leave it out of "
                    "the group"
                )
        return holds

    # ---- get and delete

    def get(self, group_text: str, snapshot_ids: Sequence[str], timeout: float | None) -> Group:
        group_id = self._parse(group_text)
        members = self._members(group_id, self.inventory.scan(timeout))
        if group_id is None or not members:
            raise NotFound(f"group snapshot {group_text} does not exist on node {self.node_id}")
        group = Group(group_id, members)
        self._check_members(group, snapshot_ids)
        return group

    def delete(self, group_text: str, snapshot_ids: Sequence[str], timeout: float | None) -> None:
        group_id = self._parse(group_text)
        if group_id is None:
            return  # never one of ours: nothing to delete
        with self.locks.hold(group_id.key):
            group = Group(group_id, self._members(group_id, self.inventory.scan(timeout)))
            if not group.members:
                return
            self._check_members(group, snapshot_ids)
            self._discard(group.members, "it was deleted", timeout)
        log.info("group snapshot deleted", group=str(group_id), snapshots=len(group.members))

    def _parse(self, text: str) -> GroupId | None:
        if not text:
            raise InvalidArgument("group_snapshot_id is required")
        group_id = GroupId.parse(text)
        if group_id is not None and group_id.node != node_component(self.node_id):
            raise FailedPrecondition(
                f"group snapshot {text} belongs to node {group_id.node}, not to this node "
                f"({self.node_id}); send the call to the csi-lvm of that node"
            )
        if group_id is not None and self.inventory.config.find(group_id.device_class) is None:
            return None
        return group_id

    def _check_members(self, group: Group, snapshot_ids: Sequence[str]) -> None:
        """Where the caller names the group's snapshots, they must be its own."""
        if not snapshot_ids:
            return
        mine = sorted(str(m.id) for m in group.members)
        if sorted(snapshot_ids) != mine:
            raise InvalidArgument(
                f"snapshot_ids do not match group snapshot {group.id}: it has "
                f"{', '.join(mine)}; the call named {', '.join(sorted(snapshot_ids))}"
            )

    def _members(self, group_id: GroupId | None, scan: Scan) -> list[Owned]:
        if group_id is None:
            return []
        return sorted(
            (
                s
                for s in self.inventory.owned(Kind.SNAPSHOT, scan)
                if s.tags.get(Tag.GROUP) == group_id.key
                and s.device_class.name == group_id.device_class
            ),
            key=lambda s: s.source_id,
        )

    def _discard(self, members: list[Owned], why: str, timeout: float | None) -> None:
        for member in members:
            log.info("removing a snapshot of a group snapshot", lv=member.lv.full_name, why=why)
            self.backends.of(member.device_class).delete(member, timeout)

    # ---- start-up

    def thaw_left_frozen(self, timeout: float | None = None) -> int:
        """Thaw the mounted filesystems of the driver's volumes that a crash in
        the middle of a group snapshot left frozen (thawing one that is not
        frozen does nothing); how many were."""
        thawed = 0
        mounted = freezing.filesystem_mounts()
        # The report start-up has just made serves: no report of its own.
        for volume in self.inventory.owned(Kind.VOLUME, self.inventory.view(timeout)):
            if not volume.lv.attr.active or not volume.lv.attr.device_open:
                continue
            mount_point = _mount_of(volume, mounted)
            if mount_point is None:
                continue
            try:
                was_frozen = freezing.thaw(mount_point)
            except DriverError as error:  # the others are thawed still
                log.error("could not thaw a filesystem of the driver's", lv=volume.lv.full_name,
                          mount_point=mount_point, error=str(error))  # fmt: skip
                continue
            if was_frozen:
                log.warning("thawed a filesystem left frozen (a group snapshot was cut short)",
                            lv=volume.lv.full_name, mount_point=mount_point)  # fmt: skip
                thawed += 1
        return thawed


def _mount_of(volume: Owned, mounted: dict[str, str]) -> str | None:
    """Where the active volume's filesystem is mounted here (``mounted``:
    ``freezing.filesystem_mounts``); None when it is not, or its device node is
    not there to say (nothing here mounted it through that node then)."""
    try:
        return mounted.get(fs.device_number(volume.data_device()))
    except (OSError, DriverError):
        return None
