"""Names: those LVM accepts for VGs, LVs and tags, checked before any reaches
a command line, and those LVM gives the device-mapper devices of an LV.

Pure functions, no I/O. Every verb checks its names here first; a name LVM
would refuse (or read as an option) never reaches it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from csi_lvm.lvm.errors import LvmBadName

# LVM's grammar for VG and LV names (lvm(8), "Valid names"), and for tags.
NAME_RE = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")
TAG_RE = re.compile(r"[A-Za-z0-9_+.:/=!&#][A-Za-z0-9_+.:/=!&#-]{0,1023}")


def check_name(name: str, what: str) -> None:
    """Names reach LVM only once they match LVM's own grammar."""
    if not NAME_RE.fullmatch(name) or name in {".", ".."}:
        raise LvmBadName(f"{what} {name!r} is not a valid LVM name")


def check_lv_names(volume_group: str, *lv_names: str) -> None:
    check_name(volume_group, "volume group")
    for name in lv_names:
        check_name(name, "logical volume")


def tag_args(tags: Sequence[str], flag: str = "--addtag") -> list[str]:
    """``flag`` before each tag, once every tag is one LVM accepts."""
    args: list[str] = []
    for tag in tags:
        if not TAG_RE.fullmatch(tag):
            raise LvmBadName(f"LVM tag {tag!r} has characters LVM does not accept")
        args += [flag, tag]
    return args


def dm_name(volume_group: str, lv_name: str, layer: str = "") -> str:
    """The device-mapper name LVM gives an LV (or a layer of it, ``tpool``):
    ``<vg>-<lv>[-<layer>]``, each dash inside a VG or LV name doubled."""
    name = f"{volume_group.replace('-', '--')}-{lv_name.replace('-', '--')}"
    return f"{name}-{layer}" if layer else name


def pool_dm_names(volume_group: str, pool: str) -> tuple[str, str]:
    """Where a thin pool's thin-pool target may be, in the order to look:
    ``<vg>-<pool>-tpool`` while thin volumes use the pool (``<vg>-<pool>``
    is then a read-only linear device over it), and ``<vg>-<pool>`` itself
    when LVM activated the pool with no thin volume active."""
    return dm_name(volume_group, pool, "tpool"), dm_name(volume_group, pool)


def metadata_dm_name(volume_group: str, pool: str) -> str:
    """The device-mapper name of the pool's metadata device (its hidden
    ``_tmeta`` LV)."""
    return dm_name(volume_group, f"{pool}_tmeta")
