"""Mutable parameters (VolumeAttributesClass): which keys each class takes,
every value checked, and the IO limits as the volume's tag and as io.max
lines. Writing io.max and converting LVs are tested on the real kernel and
LVM in tests/lvm/test_modify.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi_lvm.config import parse_config
from csi_lvm.errors import InvalidArgument
from csi_lvm.io_limits import IoLimits, PodCgroups, parse_limit, pod_uid_of
from csi_lvm.modifications import Change, allowed_parameters, parse_change

UID = "0f6b3c5e-8d1a-4c2b-9e7f-1a2b3c4d5e6f"
IO_KEYS = ["readIOPS", "writeIOPS", "readBytesPerSecond", "writeBytesPerSecond"]


def device_class(settings: str = "", pool: str = ""):  # type: ignore[no-untyped-def]
    text = f"deviceClasses:\n  - name: c\n    volumeGroup: vg0\n{settings}"
    if pool:
        text += f"    thinPool: {pool}\n"
    return parse_config(text).device_classes[0]


@pytest.mark.parametrize(
    ("settings", "pool", "layout_too"),
    [
        ("", "", True),  # linear thick
        ("    layout: raid1\n", "", True),
        ("    layout: raid1\n    mirrors: 2\n", "", False),  # three copies
        ("    layout: raid1\n    integrity: true\n", "", False),
        ("    layout: striped\n", "", False),
        ("    layout: raid10\n", "", False),
        ("", "pool0", False),  # thin
    ],
)
def test_every_class_takes_io_limits_and_some_take_a_layout(
    settings: str, pool: str, layout_too: bool
) -> None:
    expected = IO_KEYS + (["layout"] if layout_too else [])
    assert allowed_parameters(device_class(settings, pool)) == expected


def test_unknown_keys_are_named_with_what_the_class_takes() -> None:
    with pytest.raises(InvalidArgument) as refused:
        parse_change({"XXX_FakeKey": "1", "layout": "raid1", "iops": "5"}, device_class(pool="p"))
    message = str(refused.value)
    assert "XXX_FakeKey, iops, layout cannot be set" in message
    assert "device class c, which takes readIOPS, writeIOPS" in message


def test_a_change_is_parsed_whole() -> None:
    change = parse_change(
        {"readIOPS": "100", "writeBytesPerSecond": "10Mi", "readBytesPerSecond": "max",
         "layout": "raid1"},
        device_class(),
    )  # fmt: skip
    assert change == Change({"riops": 100, "wbps": 10 << 20, "rbps": None}, "raid1")
    assert parse_change({}, device_class()) == Change()


@pytest.mark.parametrize(
    ("parameter", "value", "expected"),
    [
        ("readIOPS", "1", 1),
        ("writeIOPS", " 250 ", 250),
        ("readBytesPerSecond", "1Mi", 1 << 20),
        ("writeBytesPerSecond", "500k", 500_000),
        ("writeBytesPerSecond", "2G", 2 * 10**9),
        ("writeBytesPerSecond", "max", None),
    ],
)
def test_limits_take_counts_quantities_and_max(parameter: str, value: str, expected: int) -> None:
    assert parse_limit(parameter, value) == expected


@pytest.mark.parametrize(
    ("parameter", "value", "says"),
    [
        ("readIOPS", "10k", "not a number of IOPS"),
        ("readIOPS", "-5", "not a number of IOPS"),
        ("readIOPS", "1.5", "not a number of IOPS"),
        ("readIOPS", "0", "must be above 0"),
        ("writeBytesPerSecond", "fast", "not a number of bytes per second"),
        ("writeBytesPerSecond", "10MB", "quantity such as 10Mi"),
        ("writeBytesPerSecond", "", "not a number of bytes per second"),
    ],
)
def test_bad_limits_are_refused_saying_what_to_give(parameter: str, value: str, says: str) -> None:
    with pytest.raises(InvalidArgument, match=says):
        parse_limit(parameter, value)


def test_a_layout_outside_linear_and_raid1_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="give linear or raid1"):
        parse_change({"layout": "raid10"}, device_class())


def test_limits_round_trip_through_the_tag_and_become_io_max_lines() -> None:
    limits = IoLimits(riops=100, wbps=1 << 20)
    assert limits.tag_value() == "riops=100,wbps=1048576"
    assert IoLimits.from_tag(limits.tag_value()) == limits
    assert IoLimits.from_tag("riops=x,junk,wiops=7") == IoLimits(wiops=7)
    assert limits.io_max_line("253:4") == "253:4 riops=100 wiops=max rbps=max wbps=1048576"
    assert IoLimits().io_max_line("253:4") == "253:4 riops=max wiops=max rbps=max wbps=max"
    changed = limits.changed({"riops": None, "rbps": 4096})
    assert changed == IoLimits(rbps=4096, wbps=1 << 20) and changed.any
    assert not IoLimits().any and IoLimits().tag_value() == ""


@pytest.mark.parametrize(
    ("target", "uid"),
    [
        (f"/var/lib/kubelet/pods/{UID}/volumes/kubernetes.io~csi/pvc-1/mount", UID),
        (f"/data/kubelet/pods/{UID}/volumes/kubernetes.io~csi/pvc-1/mount", UID),
        (f"/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-1/{UID}", UID),
        ("/var/lib/kubelet/plugins/kubernetes.io/csi/lvm.csi-lvm.io/abc/globalmount", None),
        (f"/mnt/{UID}/volumes/x", None),
    ],
)
def test_the_pod_is_read_from_the_kubelet_s_target_path(target: str, uid: str | None) -> None:
    assert pod_uid_of(target) == uid


@pytest.mark.parametrize(
    "path",
    [
        f"kubepods/pod{UID}",  # cgroupfs driver, Guaranteed
        f"kubepods/burstable/pod{UID}",
        f"node-1/kubepods/besteffort/pod{UID}",  # the kubelet's cgroupRoot: /node-1
        f"kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice",  # systemd driver
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice",
    ],
)
def test_a_pod_s_cgroup_is_found_under_either_cgroup_driver(tmp_path: Path, path: str) -> None:
    (tmp_path / path).mkdir(parents=True)
    (tmp_path / "kubepods" / "burstable" / "podother").mkdir(parents=True, exist_ok=True)
    cgroups = PodCgroups(str(tmp_path))
    assert cgroups.find(UID) == tmp_path / path
    assert cgroups.find(UID.replace("0f", "1f")) is None
