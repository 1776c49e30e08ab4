from __future__ import annotations

from csi_lvm import fs
from csi_lvm.fs import parse_mountinfo

MOUNTINFO = (
    "22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    "98 22 253:3 / /tmp/staging rw,relatime shared:50 - xfs /dev/mapper/vg0-csi--a rw,attr2\n"
    "99 22 253:3 / /tmp/my\\040target ro,relatime shared:50 - xfs /dev/mapper/vg0-csi--a rw\n"
    "100 22 0:5 /dm-3 /tmp/block rw,nosuid shared:2 - devtmpfs udev rw,size=1k\n"
)


def test_mountinfo_parsing() -> None:
    root, staging, target, block = parse_mountinfo(MOUNTINFO)
    assert root.mount_point == "/" and root.fs_type == "ext4"
    assert staging.device_number == "253:3" and staging.source == "/dev/mapper/vg0-csi--a"
    assert target.mount_point == "/tmp/my target" and target.read_only
    assert not staging.read_only
    assert block.root == "/dm-3" and block.fs_type == "devtmpfs"


def test_mount_words_become_kernel_flags_and_filesystem_data() -> None:
    flags, data = fs.kernel_mount_options(["noatime,nodev", "discard", "ro"])
    assert flags == fs.MS_NOATIME | fs.MS_NODEV | fs.MS_RDONLY
    assert data == "discard"
    # A later word undoes an earlier one, as in mount(8).
    assert fs.kernel_mount_options(["ro", "rw", "defaults", ""]) == (0, "")
    assert fs.kernel_mount_options([]) == (0, "")
    assert fs.kernel_mount_options(["nouuid", "logbsize=256k"]) == (0, "nouuid,logbsize=256k")


def test_words_only_mount8_understands_leave_the_mount_to_it() -> None:
    for word in ("x-systemd.automount", "_netdev", "nofail", "user", "loop", "remount", "bind"):
        assert fs.kernel_mount_options(["noatime", word]) is None, word


def test_a_mount_has_the_options_asked_for_only_when_all_are_in_effect() -> None:
    _, staging, target, _ = parse_mountinfo(MOUNTINFO)
    assert staging.super_options == ("rw", "attr2")
    assert staging.has_options([]) and staging.has_options(["defaults", "rw"])
    assert staging.has_options(["relatime,attr2"])  # per-mount and filesystem options alike
    assert not staging.has_options(["noatime"]) and not staging.has_options(["ro"])
    assert target.has_options(["ro"])
