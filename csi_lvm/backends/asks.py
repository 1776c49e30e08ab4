"""What a create asks of a device class, and what a class says of an LV:
the plain records the backends and their callers pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from csi_lvm.validation import SizeRange

# A create that asks no range (a snapshot: it takes its source's size).
ANY_SIZE = SizeRange(0, 0)


@dataclass(frozen=True)
class Ask:
    """A new volume or snapshot a create asks of its class: its name in messages,
    LV name, driver tags, size range (a snapshot takes its source's size) and
    the least its filesystem needs, within the caller's time."""

    what: str
    lv_name: str
    tags: Sequence[str]
    timeout: float | None
    wanted: SizeRange = ANY_SIZE
    minimum: int = 0


@dataclass(frozen=True)
class NewLv:
    """An LV a backend makes: its name, size (whole extents of its volume
    group's ``extent_bytes``) and the driver's tags for it (the lifecycle's
    tags are the backend's to add), within the caller's time."""

    name: str
    size: int
    tags: Sequence[str]
    timeout: float | None
    extent_bytes: int


@dataclass(frozen=True)
class Contents:
    blank: bool  # certainly holds nothing, so probing it is wasted
    # Every block reads zeros now, and the rest of a block still does once
    # part of it is written: zeroing any of it again (mkfs's) is wasted work.
    reads_zeros: bool


@dataclass(frozen=True)
class Condition:
    abnormal: bool
    message: str
