"""Facts about filesystems and mounts, with no side effect: which
filesystems the driver makes and how small a volume each takes, the kernel's
mount table as records, and mount(8)'s options as mount(2)'s flags. Config
and validation read these without loading anything the filesystem layer
(``fs``) needs to act.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SUPPORTED_FILESYSTEMS = ("ext4", "xfs", "btrfs")
# mkfs.xfs refuses smaller devices (xfsprogs 5.19 and later). mkfs.btrfs
# makes one from 109 MiB, but Linux resizes no btrfs to under 256 MiB (the
# resize ioctl is EINVAL, even to the same size): the floor is what can grow.
MINIMUM_BYTES = {"ext4": 0, "xfs": 300 << 20, "btrfs": 256 << 20}
DEFAULT_FILESYSTEM = "ext4"


@dataclass(frozen=True)
class Mount:
    mount_point: str
    root: str  # the subtree of the source that is mounted (for bind mounts)
    device_number: str  # major:minor
    fs_type: str
    source: str
    options: tuple[str, ...]  # the mount's own (ro, noatime, ...)
    super_options: tuple[str, ...] = ()  # the filesystem's (discard, nouuid, ...)

    @property
    def read_only(self) -> bool:
        return "ro" in self.options

    def has_options(self, flags: Sequence[str]) -> bool:
        """Whether every mount option in ``flags`` is in effect here."""
        present = {*self.options, *self.super_options, "defaults"}
        wanted = {w.strip() for flag in flags for w in flag.split(",") if w.strip()}
        return wanted <= present


def _unescape_mountinfo(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and len(text[i + 1 : i + 4]) == 3 and text[i + 1 : i + 4].isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 6 or len(tail) < 2:
            continue
        mounts.append(
            Mount(
                mount_point=_unescape_mountinfo(fields[4]),
                root=_unescape_mountinfo(fields[3]),
                device_number=fields[2],
                fs_type=tail[0],
                source=_unescape_mountinfo(tail[1]),
                options=tuple(fields[5].split(",")),
                super_options=tuple(tail[2].split(",")) if len(tail) > 2 else (),
            )
        )
    return mounts


# mount(2) flags (linux/mount.h). Mounting through the system call saves a
# mount(8) process per mount; mount(8) still runs whenever the call fails, so
# an error always carries its usual message, and for any option the kernel
# does not take itself.
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS, MS_REMOUNT = 1, 2, 4, 8, 16, 32
MS_DIRSYNC, MS_NOATIME, MS_NODIRATIME, MS_BIND = 128, 1024, 2048, 4096
MS_RELATIME, MS_STRICTATIME, MS_LAZYTIME = 1 << 21, 1 << 24, 1 << 25
_SETS = {
    "ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
    "sync": MS_SYNCHRONOUS, "dirsync": MS_DIRSYNC, "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME,
    "lazytime": MS_LAZYTIME,
}  # fmt: skip
_CLEARS = {
    "rw": MS_RDONLY, "suid": MS_NOSUID, "dev": MS_NODEV, "exec": MS_NOEXEC,
    "async": MS_SYNCHRONOUS, "atime": MS_NOATIME, "diratime": MS_NODIRATIME,
    "norelatime": MS_RELATIME, "nostrictatime": MS_STRICTATIME, "nolazytime": MS_LAZYTIME,
    "defaults": 0,
}  # fmt: skip
# Options mount(8) itself acts on; the kernel never sees them.
_USERSPACE = ("x-", "_", "user", "nouser", "users", "owner", "group", "auto", "noauto",
              "nofail", "comment=", "loop", "offset=", "sizelimit=", "encryption=",
              "helper=", "remount", "bind", "rbind", "move")  # fmt: skip


def kernel_mount_options(options: Sequence[str]) -> tuple[int, str] | None:
    """mount(8)'s ``-o`` words as mount(2)'s flags and filesystem data, or
    None when a word is one mount(8) handles itself (then it runs)."""
    flags, data = 0, []
    for word in (w.strip() for option in options for w in option.split(",")):
        if not word:
            continue
        if word in _SETS:
            flags |= _SETS[word]
        elif word in _CLEARS:
            flags &= ~_CLEARS[word]
        elif word.startswith(_USERSPACE):
            return None
        else:
            data.append(word)
    return flags, ",".join(data)
