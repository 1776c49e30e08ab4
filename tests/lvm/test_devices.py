"""The filesystem layer against devices that misbehave, in the VM's real
device-mapper."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from csi_lvm import fs


@pytest.fixture
def unreadable(name: str) -> Iterator[str]:
    """A device every read of which fails (device-mapper's error target)."""
    device = f"csi-lvm-error-{name}"
    subprocess.run(["dmsetup", "create", device, "--table", "0 8192 error"], check=True)
    try:
        yield f"/dev/mapper/{device}"
    finally:
        subprocess.run(["dmsetup", "remove", device], check=False)


def test_a_device_that_cannot_be_read_is_never_taken_for_blank(unreadable: str) -> None:
    probe = subprocess.run(["blkid", "--probe", unreadable], capture_output=True)
    assert probe.returncode == 2  # what blkid says of it: the same as of a blank device
    with pytest.raises(fs.FsError, match="cannot be read"):
        fs.detect_content(unreadable)
