from __future__ import annotations

import pytest

from csi_lvm.config import parse_config
from csi_lvm.csi import csi_pb2
from csi_lvm.errors import InvalidArgument, OutOfRange
from csi_lvm.validation import (
    DEFAULT_VOLUME_BYTES,
    capability_problem,
    check_capabilities,
    check_path,
    choose_size,
    device_class_for,
    size_range,
)

Mode = csi_pb2.VolumeCapability.AccessMode
MiB = 1 << 20
CONFIG = parse_config(
    "deviceClasses:\n"
    "  - {name: thin, volumeGroup: vg0, thinPool: pool0, default: true}\n"
    "  - {name: thick, volumeGroup: vg0}\n"
)


def capability(mode: int = Mode.SINGLE_NODE_WRITER, fs_type: str = "") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=Mode(mode=mode),
    )


def test_single_node_modes_and_supported_filesystems_are_accepted() -> None:
    for mode in (Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY,
                 Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER):  # fmt: skip
        assert capability_problem(capability(mode)) is None
    assert capability_problem(capability(fs_type="xfs")) is None


@pytest.mark.parametrize(
    ("cap", "message"),
    [
        (capability(Mode.MULTI_NODE_MULTI_WRITER), "local to one node"),
        (capability(Mode.UNKNOWN), "not supported"),
        (capability(fs_type="ntfs"), "filesystem 'ntfs' is not supported"),
        (
            csi_pb2.VolumeCapability(access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER)),
            "block or mount",
        ),
        (csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume()), "access mode"),
    ],
)
def test_unsupported_capabilities_say_why(cap: csi_pb2.VolumeCapability, message: str) -> None:
    problem = capability_problem(cap)
    assert problem is not None and message in problem


def test_capabilities_are_required() -> None:
    with pytest.raises(InvalidArgument, match="required"):
        check_capabilities([])


def test_device_class_selection() -> None:
    assert device_class_for(CONFIG, {}).name == "thin"
    assert device_class_for(CONFIG, {"deviceClass": "thick"}).name == "thick"
    assert device_class_for(CONFIG, {"csi.storage.k8s.io/pvc/name": "data"}).name == "thin"
    with pytest.raises(
        InvalidArgument, match="unknown device class 'fast'; this node offers: thin, thick"
    ):
        device_class_for(CONFIG, {"deviceClass": "fast"})
    with pytest.raises(InvalidArgument, match="unknown parameter.*'fsType'.*deviceClass"):
        device_class_for(CONFIG, {"fsType": "xfs"})


def test_sizes_round_up_to_extents_and_respect_limits() -> None:
    extent = 4 * MiB
    assert choose_size(size_range(0, 0), extent) == DEFAULT_VOLUME_BYTES
    assert choose_size(size_range(1, 0), extent) == extent
    assert choose_size(size_range(10 * MiB, 0), extent) == 12 * MiB
    assert choose_size(size_range(10 * MiB, 13 * MiB), extent) == 12 * MiB
    assert choose_size(size_range(0, 10 * MiB), extent) == 8 * MiB
    assert (
        choose_size(size_range(0, 0), extent, minimum=2 * DEFAULT_VOLUME_BYTES)
        == 2 * DEFAULT_VOLUME_BYTES
    )
    with pytest.raises(OutOfRange, match="whole extents"):
        choose_size(size_range(10 * MiB, 11 * MiB), extent)
    with pytest.raises(OutOfRange, match="whole extents"):
        choose_size(size_range(0, 1 * MiB), extent)
    with pytest.raises(OutOfRange):
        choose_size(size_range(0, 8 * MiB), extent, minimum=12 * MiB)
    with pytest.raises(OutOfRange, match="exceeds"):
        size_range(2, 1)
    with pytest.raises(InvalidArgument, match="negative"):
        size_range(-1, 0)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", "required"),
        ("relative/path", "absolute"),
        ("/var/lib/../etc", "normalised"),
        ("/a//b", "normalised"),
        ("/", "normalised"),
        ("/a\0b", "NUL"),
        ("/" + "a" * 5000, "longer"),
    ],
)
def test_bad_paths_are_refused(path: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_path(path, "target_path")


def test_good_paths_pass() -> None:
    assert (
        check_path("/var/lib/kubelet/pods/x/volumes/y/mount", "p")
        == "/var/lib/kubelet/pods/x/volumes/y/mount"
    )
    assert check_path("/tmp/dir/", "p") == "/tmp/dir"
