"""Freezing a mounted filesystem: every write held while something below it
(LVM cutting snapshots) takes a point in time, and let go after. Part of the
filesystem layer, beside ``fs``, whose mount table it reads.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

from csi_lvm.fs import FsError, backing_device, device_number, mounts

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


_libc = ctypes.CDLL(None, use_errno=True)


def commit_btrfs(device: str) -> None:
    """A btrfs mounted here from ``device`` commits what it has (syncfs), so
    that a snapshot cut next holds no log tree: LVM cuts without freezing,
    btrfs keeps fsyncs since its last commit in a log tree, and a copy with
    one cannot get an ID of its own beside its mounted source (``fs``). ext4
    and xfs replay their journals anywhere: nothing for them."""
    if not os.path.exists(device):
        return
    number = device_number(device)
    for entry in mounts():
        if entry.fs_type == "btrfs" and backing_device(entry) == number:
            fd = _open_directory(entry.mount_point, "commit")
            try:
                if _libc.syncfs(fd) != 0:
                    error = ctypes.get_errno()
                    raise FsError(
                        f"could not commit the btrfs at {entry.mount_point}: {os.strerror(error)}"
                    )
            finally:
                os.close(fd)
            return
