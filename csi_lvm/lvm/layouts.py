"""How an LV lies over its volume group's physical volumes: linear,
striped, RAID1 or RAID10, with or without dm-integrity under each RAID
image. Pure arithmetic, no I/O: the config reads the names from here,
``commands`` turns a ``Layout`` into lvcreate's options, and the thick
backend asks how large a volume the PVs' free extents can still hold.

Sizes are usable bytes (what the volume's user sees). Each image of a
striped or RAID LV must sit on a PV of its own (LVM's normal allocation), so
how much fits depends on the PVs, not on the VG's free total: ``largest``
answers with the biggest volume that fits when each image takes space on
one PV, which LVM can always make, so capacity never promises more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30

LINEAR, STRIPED, RAID1, RAID10 = "linear", "striped", "raid1", "raid10"
LAYOUTS = (LINEAR, STRIPED, RAID1, RAID10)
RAID_LAYOUTS = (RAID1, RAID10)
STRIPED_LAYOUTS = (STRIPED, RAID10)  # the layouts whose data lies in stripes
# LVM's limits: stripes of a striped LV, and copies of a RAID1 LV.
MAX_STRIPES = 128
MAX_MIRRORS = 9
MIN_STRIPE_BYTES = 4 << 10
MAX_STRIPE_BYTES = 4 * GiB
# The RAID metadata sub-LV (``_rmeta_N``) beside each image: one extent.
RMETA_EXTENTS = 1


def integrity_metadata_bytes(image_bytes: int) -> int:
    """What LVM allocates for the dm-integrity metadata of one RAID image of
    ``image_bytes``: 4 MiB for every started 500 MiB of data, plus the
    journal's room, which newer LVM releases add by size (taken here always,
    so the figure is never below what any release takes)."""
    per_data = (image_bytes // (500 * MiB) + 1) * 4 * MiB
    if image_bytes <= 512 * MiB:
        journal = 4 * MiB
    elif image_bytes <= GiB:
        journal = 8 * MiB
    elif image_bytes <= 4 * GiB:
        journal = 32 * MiB
    else:
        journal = 64 * MiB
    return per_data + journal


@dataclass(frozen=True)
class Layout:
    """A class's LV layout, as its config names it."""

    kind: str = LINEAR
    stripes: int = 1  # striped and RAID10: data areas side by side
    stripe_bytes: int = 0  # 0: LVM's default
    mirrors: int = 0  # RAID1 and RAID10: copies beside the first
    integrity: bool = False  # dm-integrity under each RAID image

    @property
    def is_linear(self) -> bool:
        return self.kind == LINEAR

    @property
    def copies(self) -> int:
        return self.mirrors + 1 if self.kind in RAID_LAYOUTS else 1

    @property
    def images(self) -> int:
        """The areas an LV of this layout needs, each on a PV of its own."""
        return self.stripes * self.copies

    def describe(self) -> str:
        words = [self.kind]
        if self.stripes > 1:
            size = f" of {self.stripe_bytes >> 10} KiB" if self.stripe_bytes else ""
            words.append(f"{self.stripes} stripes{size}")
        if self.kind in RAID_LAYOUTS:
            words.append(f"{self.copies} copies")
        if self.integrity:
            words.append("integrity")
        return ", ".join(words)

    # ---- room

    def data_extents(self, size_bytes: int, extent_bytes: int) -> int:
        """The extents of data a ``size_bytes`` volume gets, rounded up as
        lvcreate rounds: to whole extents in every stripe."""
        per_stripe = -(-size_bytes // (extent_bytes * self.stripes))
        return per_stripe * self.stripes

    def image_extents(self, size_bytes: int, extent_bytes: int) -> int:
        """The extents each image of a ``size_bytes`` volume takes on its PV,
        metadata included."""
        data = self.data_extents(size_bytes, extent_bytes) // self.stripes
        if self.kind not in RAID_LAYOUTS:
            return data
        meta = RMETA_EXTENTS
        if self.integrity:
            meta += -(-integrity_metadata_bytes(data * extent_bytes) // extent_bytes)
        return data + meta

    def raw_bytes(self, size_bytes: int, extent_bytes: int) -> int:
        """The VG space a ``size_bytes`` volume takes, all images together."""
        return self.image_extents(size_bytes, extent_bytes) * self.images * extent_bytes

    def fits(self, size_bytes: int, free_extents: Sequence[int], extent_bytes: int) -> bool:
        """Whether a ``size_bytes`` volume fits the PVs' free extents."""
        if self.is_linear:
            return self.data_extents(size_bytes, extent_bytes) <= sum(free_extents)
        largest_first = sorted(free_extents, reverse=True)
        if len(largest_first) < self.images:
            return False
        return self.image_extents(size_bytes, extent_bytes) <= largest_first[self.images - 1]

    def largest(self, free_extents: Sequence[int], extent_bytes: int) -> int:
        """The largest volume, in usable bytes and whole extents per stripe,
        that the PVs' free extents hold (0 when none does)."""
        unit = extent_bytes * self.stripes
        low, high = 0, sum(free_extents) * extent_bytes // unit
        while low < high:  # the most units of ``unit`` bytes that fit
            middle = (low + high + 1) // 2
            if self.fits(middle * unit, free_extents, extent_bytes):
                low = middle
            else:
                high = middle - 1
        return low * unit

    def usable_share(self, raw_bytes: int) -> int:
        """About what ``raw_bytes`` of VG space hold in usable bytes (for
        totals and use, not for promises: ``largest`` is the promise)."""
        return raw_bytes // self.copies


PLAIN = Layout()  # linear, the default
