"""Freezing a mounted filesystem: every write held while something below it
(LVM cutting snapshots) takes a point in time, and let go after. Part of the
filesystem layer, beside ``fs``, whose mount table it reads.
"""

from __future__ import annotations

import errno
import fcntl
import os

from csi_lvm.fs import FsError, backing_device, mounts

_FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
_FITHAW = 0xC0045878  # _IOWR('X', 120, int)


def filesystem_mounts() -> dict[str, str]:
    """A mount point here of each mounted filesystem, by its device's
    ``major:minor`` (any one: a freeze holds the whole filesystem)."""
    found: dict[str, str] = {}
    for entry in mounts():
        found.setdefault(backing_device(entry), entry.mount_point)
    return found


def _open_directory(mount_point: str, doing: str) -> int:
    try:
        return os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise FsError(f"could not {doing} the filesystem at {mount_point}: {exc.strerror}") from exc


def freeze(mount_point: str) -> None:
    """Hold every write to the filesystem at ``mount_point`` until ``thaw``
    (FIFREEZE: the kernel flushes it first and leaves its journal clean)."""
    fd = _open_directory(mount_point, "freeze")
    try:
        fcntl.ioctl(fd, _FIFREEZE, 0)
    except OSError as exc:
        raise FsError(f"could not freeze the filesystem at {mount_point}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def thaw(mount_point: str) -> bool:
    """Let the writes to the filesystem at ``mount_point`` go on; False when
    it was not frozen."""
    fd = _open_directory(mount_point, "thaw")
    try:
        fcntl.ioctl(fd, _FITHAW, 0)
        return True
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # not frozen
            return False
        raise FsError(f"could not thaw the filesystem at {mount_point}: {exc.strerror}") from exc
    finally:
        os.close(fd)
