"""The only code that formats, mounts, unmounts and inspects filesystems.

Commands run as argument lists with ``LC_ALL=C``; mount state is read from
``/proc/self/mountinfo`` rather than guessed. Nothing here knows about LVM or
CSI: callers hand in device nodes and paths they have already checked.
"""

from __future__ import annotations

import ctypes
import enum
import os
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from csi_lvm.errors import AlreadyExists, DeadlineExceeded, FailedPrecondition, Internal
from csi_lvm.filesystems import DEFAULT_FILESYSTEM as DEFAULT_FILESYSTEM
from csi_lvm.filesystems import MINIMUM_BYTES as MINIMUM_BYTES
from csi_lvm.filesystems import MS_BIND, MS_RDONLY, MS_REMOUNT, Mount, kernel_mount_options
from csi_lvm.filesystems import MS_NOATIME as MS_NOATIME
from csi_lvm.filesystems import MS_NODEV as MS_NODEV
from csi_lvm.filesystems import SUPPORTED_FILESYSTEMS as SUPPORTED_FILESYSTEMS
from csi_lvm.filesystems import parse_mountinfo as parse_mountinfo
from csi_lvm.zero_range import call_with_zero_range_skipped

_ENV = {**os.environ, "LC_ALL": "C"}


class FsError(Internal):
    pass


def _run(command: Sequence[str], timeout: float | None) -> subprocess.CompletedProcess[str]:
    """Run a command; ``timeout`` None runs it to the end, as every step that
    makes or changes a filesystem is: cut short, it would leave one half-made."""
    try:
        return subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            env=_ENV,
            timeout=None if timeout is None else max(0.1, timeout),
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise DeadlineExceeded(f"{command[0]} did not finish within {timeout:.0f}s") from exc
    except FileNotFoundError as exc:
        raise FailedPrecondition(f"{command[0]} is not installed on this node") from exc


def _check(command: Sequence[str], timeout: float | None) -> str:
    return _checked(command, _run(command, timeout))


def _checked(command: Sequence[str], done: subprocess.CompletedProcess[str]) -> str:
    if done.returncode != 0:
        message = " ".join((done.stderr or done.stdout).split()) or f"exit code {done.returncode}"
        raise FsError(f"{' '.join(command[:2])} failed: {message}")
    return done.stdout


# ------------------------------------------------------------------ contents


def detect_content(device: str, timeout: float = 60) -> str | None:
    """What the device already holds ("ext4", "xfs", "partition table dos",
    ...), or None when blkid finds nothing at all, i.e. it is blank."""
    done = _run(["blkid", "--probe", "--output", "export", "--", device], timeout)
    if done.returncode == 2:  # blkid: nothing found, or nothing it could read
        _check_readable(device)
        return None
    if done.returncode != 0:
        message = " ".join(done.stderr.split()) or f"exit code {done.returncode}"
        raise FsError(f"blkid could not read {device}: {message}")
    fields = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    if "TYPE" in fields:
        return fields["TYPE"]
    if "PTTYPE" in fields:
        return f"partition table {fields['PTTYPE']}"
    return "unrecognised data"


def _check_readable(device: str) -> None:
    """blkid answers "nothing found" for a device it cannot read, too: only a
    device whose start and end read back is blank, and may be formatted."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            for offset in {0, max(0, end - 4096)}:
                os.pread(fd, 4096, offset)
        finally:
            os.close(fd)
    except OSError as exc:
        raise FsError(
            f"{device} cannot be read ({exc.strerror}): it is not taken for blank, and "
            "nothing is written to it; check the disk and the kernel log"
        ) from exc


def make_filesystem(
    device: str, fs_type: str, options: Sequence[str] = (), *, reads_zeros: bool = False
) -> bool:
    """Format a blank device, to the end whatever time it takes. No discard
    pass (thin LVs read zeros already) and lazy inode table initialisation, so
    formatting costs about the same for any size; ext4 gets a checksum seed so
    a copy's UUID can change without a full check. ``options`` go to mkfs
    before the device (the device class's mkfsOptions).

    ``reads_zeros``: the caller knows every block reads zeros and will until
    written, so mkfs's own zeroing is skipped: mke2fs is told so with its own
    ``assume_storage_prezeroed`` (which also spares the background zeroing of
    every inode table after the first mount); mkfs.xfs's log zeroing is
    answered without I/O (``zero_range``). Anywhere else mkfs zeroes what it
    needs, the ext4 journal included: an earlier tenant's journal blocks must
    never be replayed. Returns whether zeroing was skipped."""
    if fs_type == "ext4":
        extended = "nodiscard,lazy_itable_init=1"
        if reads_zeros:
            extended += ",lazy_journal_init=1,assume_storage_prezeroed=1"
        command = [
            "mkfs.ext4", "-q", "-O", "metadata_csum_seed", "-E", extended,
            *options, "--", device,
        ]  # fmt: skip
        _check(command, None)
        return reads_zeros
    if fs_type == "btrfs":
        # mkfs.btrfs writes its trees and superblocks and reads nothing else.
        _check(["mkfs.btrfs", "-q", "--nodiscard", *options, "--", device], None)
        return False
    if fs_type != "xfs":
        raise FsError(f"unsupported filesystem {fs_type!r}")
    command = ["mkfs.xfs", "-q", "-K", *options, "--", device]
    if not reads_zeros:
        _check(command, None)
        return False
    done, skipped = call_with_zero_range_skipped(lambda: _run(command, None))
    _checked(command, done)
    return skipped


def filesystem_uuid(device: str, timeout: float = 60) -> str:
    done = _run(["blkid", "--probe", "--match-tag", "UUID", "--output", "value", device], timeout)
    return done.stdout.strip()


def new_filesystem_uuid(device: str, fs_type: str) -> None:
    """Give a copied filesystem its own UUID (XFS refuses to mount two alike).

    A snapshot of a mounted filesystem carries an unreplayed journal, which
    both tools refuse to work past (xfs_admin even exits 0 when it refuses):
    the UUID is compared before and after, and when it did not change, one
    private mount and unmount replays the journal before the second try.
    """
    before = filesystem_uuid(device)
    if fs_type == "btrfs":
        _new_btrfs_fsid(device, before)
        return
    command = (
        ["tune2fs", "-U", "random", device]
        if fs_type == "ext4"
        else ["xfs_admin", "-U", "generate", device]
    )
    if _run(command, None).returncode == 0 and filesystem_uuid(device) != before:
        return
    with tempfile.TemporaryDirectory(prefix="csi-lvm-replay-") as scratch:
        mount(device, scratch, fs_type, ["nouuid"] if fs_type == "xfs" else [], None)
        unmount(scratch, None)
    _check(command, None)
    if filesystem_uuid(device) == before:
        raise FsError(f"{' '.join(command)} left the filesystem UUID unchanged")


def _new_btrfs_fsid(device: str, before: str) -> None:
    """btrfs keys a filesystem by its fsid: Linux before 6.7 will not mount a
    copy beside its source. ``btrfstune -m`` gives the copy a new fsid in its
    superblock only (the trees keep theirs as metadata_uuid), but orphans a
    log tree of fsyncs not yet committed: the mount after fails. A copy cut
    with a log tree (its source was not cleanly unmounted, or was written
    between the commit ``freezing.commit_btrfs`` makes before every cut and
    the cut) is replayed first, by a private mount, which the kernel refuses
    while the source is mounted."""
    if _btrfs_log_root(device) != 0:
        with tempfile.TemporaryDirectory(prefix="csi-lvm-replay-") as scratch:
            try:
                mount(device, scratch, "btrfs", [], None)
            except FsError as error:
                raise FailedPrecondition(
                    f"{device} is a copy of a btrfs filesystem that was not cleanly unmounted "
                    f"and must replay its log before it gets an ID of its own, which Linux "
                    f"refuses while its source is mounted ({error}): stop the pods using the "
                    "source volume, then retry"
                ) from error
            unmount(scratch, None)
    _check(["btrfstune", "-m", device], None)
    if filesystem_uuid(device) == before:
        raise FsError(f"btrfstune -m left the filesystem ID of {device} unchanged")


def _btrfs_log_root(device: str) -> int:
    """The superblock's log tree root: 0 when no fsync awaits replay."""
    shown = _check(["btrfs", "inspect-internal", "dump-super", device], None)
    for line in shown.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == "log_root":
            return int(fields[1])
    raise FsError(f"btrfs inspect-internal dump-super {device} shows no log_root")


def grow_filesystem(device: str, mount_point: str, fs_type: str) -> None:
    """Grow a mounted filesystem to fill its device (online), to the end."""
    if fs_type == "ext4":
        _check(["resize2fs", device], None)
    elif fs_type == "xfs":
        _check(["xfs_growfs", mount_point], None)
    elif fs_type == "btrfs":
        _check(["btrfs", "filesystem", "resize", "max", mount_point], None)
    else:
        raise FsError(f"cannot grow filesystem {fs_type!r}")


# --------------------------------------------------------------------- mounts


def mounts() -> list[Mount]:
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def mount_at(path: str) -> Mount | None:
    """The topmost mount whose mount point is exactly ``path``."""
    found = None
    for entry in mounts():
        if entry.mount_point == path:
            found = entry
    return found


def backing_device(entry: Mount) -> str:
    """major:minor of the block device a mount's filesystem lives on. ext4
    and xfs give their device's number as the filesystem's own; btrfs gives
    an anonymous one (major 0, since one btrfs may span devices) and names
    its device as the mount's source."""
    if entry.device_number.startswith("0:") and entry.source.startswith("/"):
        try:
            info = os.stat(entry.source)
        except OSError:
            return entry.device_number
        if stat.S_ISBLK(info.st_mode):
            return f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"
    return entry.device_number


def mounted_device(path: str) -> str | None:
    """major:minor of what is mounted at ``path``: the filesystem's device, or
    for a bind-mounted device node, the device it stands for."""
    entry = mount_at(path)
    if entry is None:
        return None
    info = os.stat(path)
    if stat.S_ISBLK(info.st_mode):
        return f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"
    return backing_device(entry)


def device_at(path: str) -> str | None:
    """major:minor of the device whose data ``path`` shows: the device a
    block device node stands for, else the device of the filesystem holding
    ``path`` (``st_dev``, which ext4 and xfs set to their block device). One
    stat, where ``mounted_device`` reads the whole mount table: for calls
    that only ask whether a volume is what a path shows. An anonymous
    ``st_dev`` (btrfs) is looked up in the mount table."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    number = info.st_rdev if stat.S_ISBLK(info.st_mode) else info.st_dev
    if os.major(number) == 0:  # btrfs: another anonymous number per subvolume
        holding = mount_holding(path)
        if holding is not None:
            return backing_device(holding)
    return f"{os.major(number)}:{os.minor(number)}"


def mount_holding(path: str) -> Mount | None:
    """The mount that shows ``path``: the one mounted last on the path or
    on its nearest parent that is a mount point."""
    real = os.path.realpath(path)
    found = None
    for entry in mounts():
        point = entry.mount_point
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (found is None or len(point) >= len(found.mount_point)):
            found = entry
    return found


def is_stale_device_node(path: str) -> bool:
    """Whether ``path`` is a block device node (a bind mount of one, say)
    whose device is gone: nothing can be read or lost through it.

    When a device goes, devtmpfs unlinks its node, and a node kept alive by a
    bind mount is left with no links. The device number alone cannot tell: a
    new device may take the old one's number at once (device-mapper hands out
    the lowest free minor)."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISBLK(info.st_mode):
        return False
    number = f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"
    return info.st_nlink == 0 or not os.path.exists(f"/sys/dev/block/{number}")


def device_number(device: str) -> str:
    info = os.stat(device)
    if not stat.S_ISBLK(info.st_mode):
        raise FsError(f"{device} is not a block device")
    return f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]  # fmt: skip
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _mount_call(source: str, target: str, fs_type: str | None, flags: int, data: str) -> bool:
    """mount(2); False when it failed (the caller then runs mount(8))."""
    done = _libc.mount(
        source.encode(), target.encode(), fs_type.encode() if fs_type else None, flags,
        data.encode() if data else None,
    )  # fmt: skip
    return bool(done == 0)


def mount(
    device: str, target: str, fs_type: str, options: Sequence[str], timeout: float | None
) -> None:
    arguments = kernel_mount_options(options)
    if arguments is not None and _mount_call(device, target, fs_type, *arguments):
        return
    command = ["mount", "-t", fs_type]
    if options:
        command += ["-o", ",".join(options)]
    _check([*command, "--", device, target], timeout)


def bind_mount(source: str, target: str, read_only: bool, timeout: float) -> None:
    if not _mount_call(source, target, None, MS_BIND, ""):
        _check(["mount", "--bind", "--", source, target], timeout)
    if read_only:
        # A bind mount takes "ro" only from a remount of itself.
        if _mount_call("none", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY, ""):
            return
        try:
            _check(["mount", "-o", "remount,bind,ro", "--", target], timeout)
        except FsError:
            unmount(target, timeout)
            raise


def unmount(target: str, timeout: float | None) -> None:
    if _libc.umount2(target.encode(), 0) != 0:
        _check(["umount", "--", target], timeout)


# ---------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Usage:
    total_bytes: int
    available_bytes: int
    used_bytes: int
    total_inodes: int
    free_inodes: int
    used_inodes: int


def usage(path: str) -> Usage:
    info = os.statvfs(path)
    total = info.f_blocks * info.f_frsize
    available = info.f_bavail * info.f_frsize
    used = (info.f_blocks - info.f_bfree) * info.f_frsize
    return Usage(
        total_bytes=total,
        available_bytes=available,
        used_bytes=used,
        total_inodes=info.f_files,
        free_inodes=info.f_ffree,
        used_inodes=info.f_files - info.f_ffree,
    )


def block_device_size(device: str) -> int:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ staging


class Staged(enum.Enum):
    ALREADY = "already"  # the same filesystem was mounted there with the same flags
    FORMATTED = "formatted"  # the device held nothing: made and mounted
    MOUNTED = "mounted"  # the device's filesystem, mounted


@dataclass(frozen=True)
class Staging:
    """What a stage asks of a device's filesystem."""

    what: str  # "volume <id>", for messages
    device: str
    path: str
    fs_type: str
    flags: Sequence[str]
    size_bytes: int
    mkfs_options: Sequence[str]
    blank: bool  # certainly holds nothing: not probed
    reads_zeros: bool  # zeroing it again (mkfs's) is wasted
    new_uuid: bool  # a copy of another filesystem: it gets a UUID of its own first


def stage(staging: Staging, timeout: float) -> Staged:
    """Mount the device's filesystem at the staging path, making one only on
    a device that holds nothing: a device that holds anything else is
    refused, never reformatted. A repeat finds the same mount and answers
    ALREADY; another mount there is ALREADY_EXISTS."""
    if mounted_device(staging.path) is not None:
        _check_staged(staging)
        return Staged.ALREADY
    path = staging.path
    if not os.path.isdir(path) or os.path.islink(path):
        # A symlink would take the mount wherever it points.
        raise FailedPrecondition(
            f"staging path {path} is not an existing directory (a symlink is refused)"
        )
    wanted = staging.fs_type
    content = None if staging.blank else detect_content(staging.device, timeout)
    if content is None:
        minimum = MINIMUM_BYTES[wanted]
        if staging.size_bytes < minimum:
            raise FailedPrecondition(
                f"{staging.what} has {staging.size_bytes} bytes; {wanted} needs at least "
                f"{minimum}: create a larger volume"
            )
        # Never cut short, whatever the deadline: a half-made filesystem is
        # worse than a late answer.
        make_filesystem(
            staging.device, wanted, staging.mkfs_options, reads_zeros=staging.reads_zeros
        )
    elif content != wanted:
        raise FailedPrecondition(
            f"{staging.what} already holds {content}, not {wanted}; csi-lvm never reformats "
            f"a volume that holds data: ask for fsType {content} or use a new volume"
        )
    elif staging.new_uuid:
        new_filesystem_uuid(staging.device, wanted)
    mount(staging.device, path, wanted, staging.flags, timeout)
    return Staged.FORMATTED if content is None else Staged.MOUNTED


def _check_staged(staging: Staging) -> None:
    """A repeated stage answers OK only when what is mounted is this device
    with the filesystem and flags asked for (ALREADY_EXISTS else)."""
    current = mounted_device(staging.path)
    entry = mount_at(staging.path)
    if current != device_number(staging.device) or entry is None:
        raise AlreadyExists(
            f"staging path {staging.path} already has another device ({current}) mounted"
        )
    if entry.fs_type != staging.fs_type or not entry.has_options(staging.flags):
        raise AlreadyExists(
            f"{staging.what} is staged at {staging.path} as {entry.fs_type} with options "
            f"{','.join(entry.options)}, not as {staging.fs_type} with "
            f"{','.join(staging.flags) or 'none'}: unstage it first"
        )
