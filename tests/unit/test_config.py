from __future__ import annotations

from pathlib import Path

import pytest

from csi_lvm.admin import doctor, node_status
from csi_lvm.config import parse_config
from csi_lvm.errors import ConfigError
from csi_lvm.wiring import Options, build
from tests.lvm.helpers import create_request
from tests.memory_lvm import MemoryLvm
from tests.testbed import DRIVER_NAME, TOPOLOGY_KEY
from tests.unit.host_server import MEMORY_POOL, MEMORY_VG, MiB, serve_memory

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
            "line 4: device class 'a' is listed again without nodes: \\(as at line 2\\)",
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
        ("    mkfsOptions:\n      zfs: [-f]\n", "line 5: unknown key 'zfs'"),
        ("    mkfsOptions:\n      xfs: -f\n", "line 5: mkfsOptions.xfs must be a non-empty list"),
        ("    mkfsOptions:\n      xfs: ['--']\n", "line 5: mkfs argument '--' is not allowed"),
    ],
)
def test_bad_nodes_and_mkfs_options_name_the_line(fragment: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config("deviceClasses:\n  - name: a\n    volumeGroup: vg0\n" + fragment)


# One class name, a volume group for every node and another for storage nodes.
PER_NODE = """\
deviceClasses:
  - name: thin            # every node...
    volumeGroup: vg0
    thinPool: pool0
    default: true
  - name: thick
    volumeGroup: vg0
  - name: thin            # ...except these, where the class lives in vg-nvme
    volumeGroup: vg-nvme
    thinPool: pool0
    overprovisionRatio: 2
    nodes: ["storage-*"]
"""


def test_a_class_may_be_listed_for_some_nodes_beside_its_general_entry() -> None:
    config = parse_config(PER_NODE, "config.yaml")
    assert [(c.name, c.volume_group, c.line) for c in config.device_classes] == [
        ("thin", "vg0", 2), ("thick", "vg0", 6), ("thin", "vg-nvme", 8),
    ]  # fmt: skip


def test_for_node_picks_the_node_s_entry_else_the_general_one() -> None:
    config = parse_config(PER_NODE, "config.yaml")
    storage = config.for_node("storage-1")
    assert [(c.name, c.volume_group) for c in storage.device_classes] == [
        ("thin", "vg-nvme"), ("thick", "vg0"),
    ]  # fmt: skip
    thin = storage.find("thin")
    assert thin is not None and thin.overprovision_ratio == 2 and thin.line == 8
    # The default is the class's, whichever of its entries says so.
    assert thin.default and storage.default_class is thin
    assert storage.volume_groups == ["vg-nvme", "vg0"]
    web = config.for_node("web-1")
    assert [(c.name, c.volume_group) for c in web.device_classes] == [
        ("thin", "vg0"), ("thick", "vg0"),
    ]  # fmt: skip
    assert web.device_classes == config.device_classes[:2]
    assert web.volume_groups == ["vg0"] and web.source == "config.yaml"
    # Resolving again changes nothing.
    assert storage.for_node("storage-1") == storage and web.for_node("web-1") == web


def test_two_entries_that_match_one_node_are_refused_for_that_node() -> None:
    config = parse_config(
        PER_NODE + "  - name: thin\n    volumeGroup: vg-db\n    thinPool: pool0\n"
        "    nodes: [db-*, storage-1]\n",
        "config.yaml",
    )
    db, storage = (config.for_node(n).find("thin") for n in ("db-1", "storage-2"))
    assert db is not None and (db.volume_group, db.line) == ("vg-db", 13)
    assert storage is not None and (storage.volume_group, storage.line) == ("vg-nvme", 8)
    with pytest.raises(
        ConfigError,
        match=r"config.yaml lines 8 and 13: node storage-1 matches two entries of device class "
        r"'thin' \(patterns 'storage-\*' and 'storage-1'\); make the nodes: patterns",
    ):
        config.for_node("storage-1")


def test_a_class_on_other_nodes_only_keeps_its_first_entry() -> None:
    config = parse_config(
        "deviceClasses:\n"
        "  - name: fast\n    volumeGroup: vg-nvme\n    nodes: [storage-*]\n"
        "  - name: any\n    volumeGroup: vg0\n"
        "  - name: fast\n    volumeGroup: vg-db\n    nodes: [db-*]\n",
        "config.yaml",
    )
    web = config.for_node("web-1")
    assert [c.name for c in web.device_classes] == ["fast", "any"]
    fast = web.find("fast")
    assert fast is not None and (fast.volume_group, fast.line) == ("vg-nvme", 2)
    # Not on this node, and the patterns of all its entries say where it is.
    assert not fast.on_node("web-1") and fast.nodes == ("storage-*", "db-*")
    assert web.for_node("web-1") == web
    db = config.for_node("db-1").find("fast")
    assert db is not None and db.volume_group == "vg-db" and db.on_node("db-1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            PER_NODE + "  - name: thin\n    volumeGroup: vg1\n    thinPool: pool0\n",
            "config.yaml line 13: device class 'thin' is listed again without nodes: "
            "\\(as at line 2\\); a class has one entry for every node at most",
        ),
        (
            PER_NODE + "  - name: thin\n    volumeGroup: vg-db\n    nodes: [db-*]\n",
            "config.yaml line 13: this entry of device class 'thin' is thick \\(no thinPool\\) "
            "but the one at line 2 is thin \\(it has thinPool\\); .* must all have thinPool or none",
        ),
        (
            PER_NODE.replace("    thinPool: pool0\n    overprovisionRatio: 2\n", ""),
            "config.yaml line 8: this entry of device class 'thin' is thick",
        ),
        (
            PER_NODE + "  - name: thin\n    volumeGroup: vg-db\n    thinPool: pool0\n"
            "    nodes: [db-*, storage-*]\n",
            "config.yaml line 13: node pattern 'storage-\\*' is also in the entry of device "
            "class 'thin' at line 8; a node may match one entry of a class only",
        ),
        (
            PER_NODE.replace("  - name: thick\n", "  - name: thick\n    default: true\n"),
            "config.yaml line 6: only one device class may be the default \\(thin, thick all",
        ),
    ],
)
def test_entries_of_one_class_must_agree(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text, "config.yaml")


def test_entries_of_the_default_class_may_each_say_so() -> None:
    config = parse_config(PER_NODE.replace("    nodes:", "    default: true\n    nodes:"))
    for node in ("storage-1", "web-1"):
        thin = config.for_node(node).default_class
        assert thin is not None and thin.name == "thin"


# The driver's graph sees the node's entry of each class, and nothing else.

NVME_VG = "vg-nvme"


def memory_lvm() -> MemoryLvm:
    """vg0 and vg-nvme, each with a thin pool pool0."""
    lvm = MemoryLvm()
    for group in (MEMORY_VG, NVME_VG):
        lvm.add_volume_group(group, 1024 * MiB)
        lvm.add_thin_pool(group, MEMORY_POOL, 256 * MiB)
    return lvm


@pytest.mark.parametrize(("node", "thin_group"), [("storage-1", NVME_VG), ("web-1", MEMORY_VG)])
def test_build_gives_each_class_one_backend_in_the_node_s_volume_group(
    node: str, thin_group: str
) -> None:
    config = parse_config(PER_NODE, "config.yaml")
    graph = build(config, Options(node), lvm=memory_lvm())
    try:
        assert graph.config == config.for_node(node)
        assert graph.inventory.config == graph.config
        backends = list(graph.backends)
        assert [(b.name, b.device_class.volume_group) for b in backends] == [
            ("thin", thin_group), ("thick", MEMORY_VG),
        ]  # fmt: skip
        scan = graph.inventory.scan()
        assert all(b.offered_here and b.missing(scan) is None for b in backends)
        status = node_status(graph.backends)
        assert [(c.name, c.volume_group) for c in status] == [
            ("thin", thin_group), ("thick", MEMORY_VG),
        ]  # fmt: skip
    finally:
        graph.close()


def test_build_refuses_a_node_that_two_entries_of_a_class_match() -> None:
    config = parse_config(
        PER_NODE + "  - name: thin\n    volumeGroup: vg-db\n    thinPool: pool0\n"
        "    nodes: [storage-1]\n",
        "config.yaml",
    )
    with pytest.raises(ConfigError, match="config.yaml lines 8 and 13: node storage-1 matches"):
        build(config, Options("storage-1"), lvm=memory_lvm())
    checks = doctor(config, memory_lvm(), "/nonexistent", "storage-1")
    failed = [c for c in checks if c.what == "config"]
    assert failed and not failed[0].ok and "lines 8 and 13" in failed[0].fix
    assert not any(c.what.startswith("device class") for c in checks)
    build(config, Options("storage-2"), lvm=memory_lvm()).close()  # one entry matches there


def test_a_class_on_other_nodes_only_is_missing_from_the_graph_as_before() -> None:
    config = parse_config(
        "deviceClasses:\n"
        "  - name: fast\n    volumeGroup: vg-nvme\n    nodes: [storage-*]\n"
        "  - name: fast\n    volumeGroup: vg-db\n    nodes: [db-*]\n"
        "  - name: any\n    volumeGroup: vg0\n",
        "config.yaml",
    )
    graph = build(config, Options("web-1"), lvm=memory_lvm())
    try:
        fast = next(iter(graph.backends))
        assert (fast.name, fast.device_class.volume_group) == ("fast", NVME_VG)
        assert not fast.offered_here
        assert fast.missing(graph.inventory.scan()) == (
            "device class fast is not on node web-1: the config gives it to nodes "
            "storage-*, db-* only"
        )
    finally:
        graph.close()
    checks = doctor(config, memory_lvm(), "/nonexistent", "web-1")
    assert any(
        c.ok and c.what.endswith("not on node web-1 (the config says so)")
        for c in checks
        if c.what.startswith("device class fast")
    )


def test_a_storage_node_creates_the_class_s_volumes_in_its_own_volume_group(
    tmp_path: Path,
) -> None:
    config = parse_config(PER_NODE, "config.yaml")
    node = serve_memory(tmp_path, Options("storage-1", DRIVER_NAME, TOPOLOGY_KEY), config)
    try:
        node.lvm.add_volume_group(NVME_VG, 1024 * MiB)
        node.lvm.add_thin_pool(NVME_VG, MEMORY_POOL, 256 * MiB)
        volume = node.csi.controller.CreateVolume(create_request("data")).volume
        assert volume.volume_id == "storage-1:thin:csi-data"
        assert node.lvm.find_lv(NVME_VG, "csi-data") is not None
        assert node.lvm.find_lv(MEMORY_VG, "csi-data") is None
    finally:
        node.close()
