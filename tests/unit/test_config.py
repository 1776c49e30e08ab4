from __future__ import annotations

import pytest

from csi_lvm.config import parse_config
from csi_lvm.errors import ConfigError

GOOD = """\
deviceClasses:
  - name: thin            # what StorageClasses ask for
    volumeGroup: vg0
    thinPool: pool0
    overprovisionRatio: 4
    default: true
  - name: thick
    volumeGroup: vg0
"""


def test_issue_example_parses() -> None:
    config = parse_config(GOOD)
    thin, thick = config.device_classes
    assert (thin.name, thin.volume_group, thin.thin_pool, thin.overprovision_ratio) == (
        "thin", "vg0", "pool0", 4.0,
    )  # fmt: skip
    assert thin.default and thin.is_thin and not thick.is_thin
    assert config.default_class is thin
    assert config.volume_groups == ["vg0"]


def test_single_class_is_the_default() -> None:
    config = parse_config("deviceClasses:\n  - name: only\n    volumeGroup: vg1\n")
    assert config.default_class is not None and config.default_class.name == "only"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("deviceClasses: [", "line 1: not valid YAML"),
        ("classes: []\n", "line 1: unknown key 'classes'"),
        ("deviceClasses: []\n", "line 1: 'deviceClasses' must be a non-empty list"),
        ("deviceClasses:\n  - name: a\n", "line 2: device class lacks 'volumeGroup'"),
        (
            "deviceClasses:\n  - name: a\n    volumeGroup: vg0\n    pool: p\n",
            "line 4: unknown key 'pool'",
        ),
        ("deviceClasses:\n  - name: Bad_Name\n    volumeGroup: vg0\n", "line 2: class name"),
        ("deviceClasses:\n  - name: a\n    volumeGroup: 'vg 0'\n", "line 3: volumeGroup"),
        (
            "deviceClasses:\n  - name: a\n    volumeGroup: vg0\n    overprovisionRatio: 2\n",
            "line 4: overprovisionRatio applies to thin classes only",
        ),
        (
            "deviceClasses:\n  - name: a\n    volumeGroup: vg0\n    thinPool: p\n"
            "    overprovisionRatio: 0.5\n",
            "line 5: overprovisionRatio must be at least 1",
        ),
        (
            "deviceClasses:\n  - name: a\n    volumeGroup: vg0\n    fullThresholdPercent: 90\n",
            "line 4: fullThresholdPercent applies to thin classes only",
        ),
        (
            "deviceClasses:\n  - name: a\n    volumeGroup: vg0\n    thinPool: p\n"
            "    fullThresholdPercent: 120\n",
            "line 5: fullThresholdPercent must be above 0 and at most 100",
        ),
        (
            "deviceClasses:\n  - name: a\n    volumeGroup: vg0\n  - name: a\n    volumeGroup: vg1\n",
            "line 4: device class 'a' is listed twice",
        ),
        (
            "deviceClasses:\n  - name: a\n    volumeGroup: vg0\n    default: true\n"
            "  - name: b\n    volumeGroup: vg0\n    default: true\n",
            "line 5: only one device class may be the default",
        ),
        ("deviceClasses:\n  - name: a\n    volumeGroup: vg0\n    default: yes please\n", "line 4"),
    ],
)
def test_bad_configs_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text, "config.yaml")


def test_full_threshold_defaults_to_95_and_can_be_set() -> None:
    config = parse_config(
        "deviceClasses:\n"
        "  - name: a\n    volumeGroup: vg0\n    thinPool: p\n"
        "  - name: b\n    volumeGroup: vg0\n    thinPool: q\n    fullThresholdPercent: 80.5\n"
    )
    assert [c.full_threshold_percent for c in config.device_classes] == [95.0, 80.5]


def test_a_class_can_name_its_nodes_and_its_mkfs_options() -> None:
    config = parse_config(
        "deviceClasses:\n  - name: fast\n    volumeGroup: nvme\n"
        "    nodes: [storage-*, db-1]\n"
        "    mkfsOptions:\n      xfs: [-m, 'bigtime=0,inobtcount=0']\n"
        "  - name: any\n    volumeGroup: vg0\n"
    )
    fast, anywhere = config.device_classes
    assert fast.on_node("storage-7") and fast.on_node("db-1")
    assert not fast.on_node("db-10") and not fast.on_node("web-storage-1")
    assert anywhere.on_node("web-1")  # no nodes: every node
    assert fast.mkfs_options_for("xfs") == ("-m", "bigtime=0,inobtcount=0")
    assert fast.mkfs_options_for("ext4") == () and anywhere.mkfs_options_for("xfs") == ()


@pytest.mark.parametrize(
    ("fragment", "message"),
    [
        ("    nodes: []\n", "line 4: nodes must be a non-empty list"),
        ("    nodes: storage-1\n", "line 4: nodes must be a non-empty list"),
        ("    mkfsOptions:\n      btrfs: [-f]\n", "line 5: unknown key 'btrfs'"),
        ("    mkfsOptions:\n      xfs: -f\n", "line 5: mkfsOptions.xfs must be a non-empty list"),
        ("    mkfsOptions:\n      xfs: ['--']\n", "line 5: mkfs argument '--' is not allowed"),
    ],
)
def test_bad_nodes_and_mkfs_options_name_the_line(fragment: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config("deviceClasses:\n  - name: a\n    volumeGroup: vg0\n" + fragment)
