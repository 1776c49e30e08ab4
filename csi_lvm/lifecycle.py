"""The states a volume or snapshot passes through, and the repair of each one
a crash can leave behind.

csi-lvm keeps no state file: an LV's state is in its tags, written by the
same ``lvcreate`` that makes it and removed, one ``lvchange --deltag`` each,
when a step is done. So a crash (a kill, a node losing power) at any moment
leaves an LV in one of the states below, and every state says what to do.

========================  =======================  ==========================================
state (tag)               made by                  what a crash leaves, and the repair
========================  =======================  ==========================================
MAKING                    a blank thick volume:    The LV is not zeroed all through yet, so
(``incomplete``)          lvcreate, the zeroing    it could show an earlier tenant's data.
                          of all of it, then       Nobody has its id yet:
                          ``made()``               ``remove_unfinished`` removes it at
                                                   start-up, and the retry of the create
                                                   (``retried``) before it makes it again.
COPYING                   a thick snapshot,        The copy is not done; the object is not
(``copying``)             restore or clone:        ready (``check_ready`` refuses its data,
                          lvcreate, the copy,      its condition is abnormal). The retry of
                          then ``copied()``        the same call copies again
                                                   (``backends.thick``); a delete removes the
                                                   temporary view ``<lv>.view`` as well.
NEW_FS_UUID               a restore or clone,      The filesystem still has its source's
(``new-fs-uuid``)         thin or thick (with      UUID and size. The first stage gives it a
                          the states above)        new UUID, mounts and grows it, then
                                                   ``filesystem_prepared()``; a stage cut
                                                   short does it all again.
(no tag: undersized)      a thin restore or        A thin snapshot is as large as its source;
                          clone larger than its    a crash before ``lvextend`` leaves it so.
                          source: snapshot, then   The retry of the create extends it
                          ``lvextend``             (``backends.thin``).
READY                     every path, at its end   Nothing to repair.
========================  =======================  ==========================================

A create that fails (rather than crashes) after its lvcreate removes the LV
it made before it answers: the answer may send the PVC to another node, and
nothing would ever delete an LV left here (``Backend._removed_on_failure``).

Activation: a thin snapshot is made inactive with activation skipped (it is
never mounted, and a VG activation at boot leaves it alone); whatever reads
it (a thick copy, a stage of a restore) activates it with
``--ignoreactivationskip``. Volumes are made active.
"""

from __future__ import annotations

import dataclasses
import enum

import structlog

from csi_lvm import fs
from csi_lvm.errors import FailedPrecondition
from csi_lvm.ids import Kind, ObjectId
from csi_lvm.locks import KeyedLocks
from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.records import LogicalVolume
from csi_lvm.volumes import Inventory, Owned

log = structlog.get_logger("csi_lvm.lifecycle")

MAKING_TAG = "csi-lvm/incomplete"
COPYING_TAG = "csi-lvm/copying"
NEW_FS_UUID_TAG = "csi-lvm/new-fs-uuid"
# On a volume filled from another node: how far the copy is durable, and the
# rate it went at (bytes a second) when that was recorded.
COPIED_PREFIX = "csi-lvm/copied="
COPY_RATE_PREFIX = "csi-lvm/copy-rate="
# ... and the point in time it reads (the holder's snapshot or view LV UUID).
COPY_POINT_PREFIX = "csi-lvm/copy-point="
_PROGRESS = (COPIED_PREFIX, COPY_RATE_PREFIX, COPY_POINT_PREFIX)


class Stage(enum.Enum):
    MAKING = "making"
    COPYING = "copying"
    READY = "ready"


def stage_of(lv: LogicalVolume) -> Stage:
    if MAKING_TAG in lv.tags:
        return Stage.MAKING
    if COPYING_TAG in lv.tags:
        return Stage.COPYING
    return Stage.READY


def is_ready(owned: Owned) -> bool:
    """Whether the object's data can be used (a copy into it is not pending)."""
    return stage_of(owned.lv) is not Stage.COPYING


def check_ready(owned: Owned, what: str) -> None:
    """Refuse to use the data of an LV whose copy is not done."""
    if not is_ready(owned):
        raise FailedPrecondition(
            f"{what} {owned.id} is not ready: the copy of {owned.source_id or 'its source'} "
            f"into it is incomplete; retry the call that created it to finish the copy, "
            "or delete it"
        )


def unready_problem(owned: Owned) -> str | None:
    """The object's lifecycle problem, as a volume condition says it."""
    if is_ready(owned):
        return None
    if copied_from_another_node(owned):
        return (
            f"the copy from {owned.source_id} (another node) is not complete: "
            f"{copied_bytes(owned.lv)} bytes are in; the retry of the call that created it "
            "goes on from there"
        )
    return (
        f"the copy from {owned.source_id or 'its source'} is incomplete (interrupted); "
        "retrying the call that created it redoes the copy"
    )


def copied_from_another_node(owned: Owned) -> bool:
    """Whether the object's source is (or was) held by another node."""
    source = ObjectId.parse(owned.source_id)
    return source is not None and source.node != owned.id.node


def _tag_value(lv: LogicalVolume, prefix: str) -> str:
    """What follows ``prefix`` in the LV's tag that starts with it ("": none)."""
    for tag in lv.tags:
        if tag.startswith(prefix):
            return tag[len(prefix) :]
    return ""


def _tag_number(lv: LogicalVolume, prefix: str) -> int:
    value = _tag_value(lv, prefix)
    return int(value) if value.isdigit() else 0


def copied_bytes(lv: LogicalVolume) -> int:
    """How far a copy from another node is written and flushed: every byte of
    the source before it is in the LV (0 when nothing is recorded)."""
    return _tag_number(lv, COPIED_PREFIX)


def copy_point(lv: LogicalVolume) -> str:
    """The point in time that copy reads, as recorded ("" when none is)."""
    return _tag_value(lv, COPY_POINT_PREFIX)


def copy_rate(lv: LogicalVolume) -> int:
    """The bytes a second of that copy, as last recorded (0: none)."""
    return _tag_number(lv, COPY_RATE_PREFIX)


def needs_new_filesystem_uuid(lv: LogicalVolume) -> bool:
    return NEW_FS_UUID_TAG in lv.tags


def copy_tags(kind: Kind, by_copy: bool) -> list[str]:
    """Extra tags of an LV made from a source: a copy starts COPYING; a
    volume's filesystem needs a UUID of its own."""
    tags = [COPYING_TAG] if by_copy else []
    if kind is Kind.VOLUME:
        tags.append(NEW_FS_UUID_TAG)
    return tags


class Lifecycle:
    """The transitions between the states, each one ``lvchange --deltag``."""

    def __init__(self, lvm: Lvm) -> None:
        self.lvm = lvm

    def made(self, volume_group: str, lv_name: str, timeout: float | None) -> None:
        """MAKING -> READY: lvcreate has zeroed the start of the new LV."""
        self.lvm.delete_tag(volume_group, lv_name, MAKING_TAG, timeout)

    def copied(self, lv: LogicalVolume) -> None:
        """COPYING -> READY: the copy is complete and flushed. The driver's own
        timeout, not the caller's: the copy's result outlives its deadline."""
        progress = [t for t in lv.tags if t.startswith(_PROGRESS)]
        self.lvm.change_tags(lv.vg_name, lv.name, [], [COPYING_TAG, *progress])

    def progress(self, lv: LogicalVolume, done: int, rate: int, point: str) -> LogicalVolume:
        """COPYING, with the copy from another node of the point in time
        ``point`` durable up to ``done`` bytes; the LV with its new tags."""
        old = [t for t in lv.tags if t.startswith(_PROGRESS)]
        new = [f"{COPIED_PREFIX}{done}", f"{COPY_RATE_PREFIX}{rate}", f"{COPY_POINT_PREFIX}{point}"]
        self.lvm.change_tags(lv.vg_name, lv.name, new, old)
        kept = tuple(t for t in lv.tags if t not in old)
        return dataclasses.replace(lv, tags=kept + tuple(new))

    def prepare_copied_filesystem(
        self, lv: LogicalVolume, device: str, mount_path: str, fs_type: str, timeout: float
    ) -> None:
        """NEW_FS_UUID -> READY, once the stage gave the copy's filesystem a
        UUID of its own and mounted it at ``mount_path``: a restore or clone
        may be larger than its source, so the filesystem is grown to fill it
        (never cut short), and only then is the copy marked prepared."""
        fs.grow_filesystem(device, mount_path, fs_type)
        self.lvm.delete_tag(lv.vg_name, lv.name, NEW_FS_UUID_TAG, timeout)

    def retried(self, existing: Owned, timeout: float | None) -> Owned | None:
        """What a retried create finds of its earlier attempt, after the
        repair its state needs: an LV left MAKING is removed (None: make it
        again); any other is the backend's to finish."""
        if stage_of(existing.lv) is Stage.MAKING:
            self.discard_unfinished(existing, timeout)
            return None
        return existing

    def discard_unfinished(self, owned: Owned, timeout: float | None) -> None:
        """Remove an LV left MAKING: its content cannot be trusted."""
        log.warning(
            "repairing an interrupted creation: removing the LV to make it again",
            lv=owned.lv.full_name,
            name=owned.name,
        )
        self.lvm.remove(owned.lv.vg_name, owned.lv.name, timeout)

    def remove_unfinished(
        self, inventory: Inventory, locks: KeyedLocks, timeout: float | None = None
    ) -> int:
        """At start-up: remove every owned LV left MAKING. Its id was never
        returned, so nothing refers to it; a retry of the call makes it again.
        Returns how many were removed."""
        scan = inventory.scan(timeout)
        unfinished = [
            owned
            for kind in Kind
            for owned in inventory.owned(kind, scan)
            if stage_of(owned.lv) is Stage.MAKING
        ]
        for owned in unfinished:
            with locks.hold(owned.lv.name):
                self.discard_unfinished(owned, timeout)
        return len(unfinished)
