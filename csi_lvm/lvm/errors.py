"""LVM's failures as errors of LVM's own kind, and the thin-provisioning
tools' and thin pool's.

A failed command is classified once, here, from its messages (always read
with ``LC_ALL=C``). These errors say what LVM refused; they carry no gRPC
status. ``csi_lvm.errors`` maps each kind to a status, and the servicers
translate the ones whose meaning depends on the call (no space for a create,
a name that appeared meanwhile) with messages of their own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


class LvmError(Exception):
    """An LVM command failed for a reason not classified below."""


class LvmNotFound(LvmError):
    """The VG or LV a command names does not exist."""


class LvmAlreadyExists(LvmError):
    """An LV of that name exists already."""


class LvmNoSpace(LvmError):
    """The VG or thin pool has no room for what the command asks."""


class LvmInUse(LvmError):
    """The LV is open (mounted, or read by a copy), so LVM will not remove it."""


class LvmTimeout(LvmError):
    """The command did not finish within the caller's time; it was not killed."""


class LvmToolMissing(LvmError):
    """The ``lvm`` binary is not installed where the driver runs it."""


class LvmBadName(LvmError):
    """A name or tag that LVM's grammar does not accept; nothing was run."""


class LvmPoolNeedsRepair(LvmError):
    """A thin pool's kernel transaction id disagrees with LVM's metadata."""

    def __init__(self, message: str) -> None:
        super().__init__(
            f"{message} -- the thin pool's kernel state and LVM's metadata disagree, which "
            "happens when an LVM command is killed in the middle of a thin-pool change "
            "(the whole container killed during a create or delete). LVM refuses new thin "
            "volumes in this pool until an admin repairs it; see lvmthin(7), "
            "'Thin pool transaction id' and 'Metadata check and repair'."
        )


class LvmPoolCheckFailed(LvmError):
    """LVM would not activate a thin pool: its metadata check (thin_check)
    failed. A device opened for a moment by another prober makes it fail
    once; damaged metadata makes it fail every time."""

    def __init__(self, message: str) -> None:
        super().__init__(
            f"{message} -- LVM checks a thin pool's metadata (thin_check) each time it "
            "activates the pool, and would not activate it. A check that found its device "
            "busy passes on a retry; if it keeps failing, the metadata needs an admin: "
            "lvchange -an VG/POOL, then lvconvert --repair VG/POOL (lvmthin(7), 'Metadata "
            "check and repair')."
        )


METADATA_FIX = (
    "LVM keeps a record of every LV in the volume group's metadata area, whose size was "
    "fixed when its PVs were made: delete volumes and snapshots that are no longer "
    "needed, or add a PV with a larger area (pvcreate --metadatasize 64m DEVICE; vgextend "
    "VG DEVICE) and stop using the small ones (pvchange --metadataignore y OLD-PV)"
)


class LvmMetadataFull(LvmError):
    """The VG's metadata area has no room for the change."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message} -- the volume group's metadata area is full. {METADATA_FIX}")


class ThinMetadataError(LvmError):
    """A thin-provisioning tool or a message to the pool failed."""


class ThinDeviceMissing(LvmNotFound):
    """The metadata snapshot has no thin device of that id (it was deleted
    before the snapshot of the metadata was taken)."""


class MetadataSnapshotHeld(ThinMetadataError):
    """The pool has a metadata snapshot reserved already; the kernel keeps one."""


class PoolNotActive(ThinMetadataError):
    """The pool has no device-mapper device: its metadata is not live."""


_CLASSIFIERS: tuple[tuple[re.Pattern[str], type[LvmError]], ...] = (
    (
        re.compile(
            r"exceeds maximum metadata size|metadata (area )?(is )?too (large|small)|"
            r"no space for metadata|metadata area is full",
            re.I,
        ),
        LvmMetadataFull,
    ),
    (
        re.compile(r"unexpected transaction id|transaction_id is \d+, while expected", re.I),
        LvmPoolNeedsRepair,
    ),
    (re.compile(r"check of pool \S+ failed", re.I), LvmPoolCheckFailed),
    (re.compile(r"already exists", re.I), LvmAlreadyExists),
    (
        re.compile(
            r"insufficient (free|suitable)|not enough free|free space in thin pool|"
            r"over (the )?threshold|exceeds the size of thin pool|no free extents",
            re.I,
        ),
        LvmNoSpace,
    ),
    (
        re.compile(
            r"failed to find logical volume|volume group \S+ not found|"
            r"logical volume \S+ not found|not found in volume group",
            re.I,
        ),
        LvmNotFound,
    ),
    (re.compile(r"\bin use\b|open logical volume", re.I), LvmInUse),
)


def classify_failure(command: Sequence[str], returncode: int, stderr: str) -> LvmError:
    """The error for a failed LVM command, from its messages."""
    message = " ".join(line.strip() for line in stderr.splitlines() if line.strip())
    message = message or f"exit code {returncode}"
    for pattern, error in _CLASSIFIERS:
        if pattern.search(message):
            return error(message)
    verb = command[1] if len(command) > 1 else "lvm"
    return LvmError(f"lvm {verb} failed: {message}")


def classify_tool_failure(args: Sequence[str], returncode: int, message: str) -> LvmError:
    """The error for a failed thin-provisioning tool, from its messages."""
    if "unable to find mapping tree" in message.lower():
        return ThinDeviceMissing(f"{args[0]}: {message.split(' Usage:')[0]}")
    if "no current metadata snap" in message.lower():
        return ThinMetadataError(f"{args[0]}: the pool's metadata snapshot is gone: {message}")
    return ThinMetadataError(
        f"{args[0]} failed (exit code {returncode}): {message[:500] or 'no message'}"
    )
