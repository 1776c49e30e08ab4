"""The layout's rules, checked on the source: a module imports only modules
below it, and the LVM layer imports nothing of the rest of the driver."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "csi_lvm"

# Lowest first: each module may import only modules listed before it.
LAYERS = (
    "csi_lvm",  # the version
    "csi_lvm.csi",  # generated from proto/csi.proto
    "csi_lvm.peer",  # generated from proto/peer.proto
    "csi_lvm.zero_range",
    "csi_lvm.block_ranges",
    "csi_lvm.lvm",
    "csi_lvm.lvm.errors",
    "csi_lvm.lvm.names",
    "csi_lvm.lvm.process",
    "csi_lvm.lvm.layouts",
    "csi_lvm.lvm.records",
    "csi_lvm.lvm.journal",
    "csi_lvm.lvm.shell",
    "csi_lvm.lvm.runner",
    "csi_lvm.lvm.commands",
    "csi_lvm.lvm.thin_metadata",
    "csi_lvm.errors",
    "csi_lvm.ids",
    "csi_lvm.locks",
    "csi_lvm.blockcopy",
    "csi_lvm.filesystems",
    "csi_lvm.fs",
    "csi_lvm.freezing",
    "csi_lvm.io_limits",
    "csi_lvm.crypt",
    "csi_lvm.config_fields",
    "csi_lvm.config",
    "csi_lvm.tls",
    "csi_lvm.kube",
    "csi_lvm.peers",
    "csi_lvm.group_labels",
    "csi_lvm.rpc",
    "csi_lvm.topology",
    "csi_lvm.validation",
    "csi_lvm.kept_view",
    "csi_lvm.volumes",
    "csi_lvm.block_maps",
    "csi_lvm.lifecycle",
    "csi_lvm.backends.asks",
    "csi_lvm.backends.admission",
    "csi_lvm.backends.health",
    "csi_lvm.backends.base",
    "csi_lvm.backends.thin",
    "csi_lvm.backends.thick",
    "csi_lvm.backends.views",
    "csi_lvm.backends",
    "csi_lvm.modifications",
    "csi_lvm.metrics",
    "csi_lvm.identity",
    "csi_lvm.peer_source",
    "csi_lvm.peer_copy",
    "csi_lvm.volume_creation",
    "csi_lvm.group_snapshots",
    "csi_lvm.controller",
    "csi_lvm.group_controller",
    "csi_lvm.node_health",
    "csi_lvm.node",
    "csi_lvm.snapshot_metadata",
    "csi_lvm.forwarding",
    "csi_lvm.wiring",
    "csi_lvm.admin",
    "csi_lvm.release",
    "csi_lvm.server",
    "csi_lvm.forwarders",
    "csi_lvm.cli",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """The csi_lvm modules a file imports (``from csi_lvm import x`` names x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("csi_lvm"):
            module = node.module or ""
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                found.add(candidate if candidate in LAYERS else module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("csi_lvm"))
    return found


def modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).parts[0] not in ("csi", "peer")
    }


def test_every_module_has_a_place_in_the_layers() -> None:
    assert set(modules()) <= set(LAYERS), sorted(set(modules()) - set(LAYERS))


def layer_of(module: str) -> str:
    """The listed module that holds ``module`` (itself, or its package)."""
    while module not in LAYERS:
        module = module.rpartition(".")[0]
    return module


def test_no_module_imports_one_above_it() -> None:
    rank = {name: index for index, name in enumerate(LAYERS)}
    upward = [
        f"{name} imports {dependency}"
        for name, path in modules().items()
        for dependency in imported(path)
        if rank[layer_of(dependency)] >= rank[name]
    ]
    assert not upward, upward
    assert imported(PACKAGE / "errors.py") == {"csi_lvm.lvm.errors"}  # the check sees aliases


def test_the_lvm_layer_knows_nothing_of_the_driver_above_it() -> None:
    reaching_out = [
        f"{name} imports {dependency}"
        for name, path in modules().items()
        if name.startswith("csi_lvm.lvm")
        for dependency in imported(path)
        if not dependency.startswith("csi_lvm.lvm")
    ]
    assert not reaching_out, reaching_out


# The servicers: they validate, delegate and translate. LVM's refusals reach
# them as the driver's own errors (errors.py's tables), never as LVM's.
SERVICERS = (
    "csi_lvm.controller",
    "csi_lvm.node",
    "csi_lvm.snapshot_metadata",
    "csi_lvm.peer_source",
)


def test_the_servicers_never_touch_the_lvm_layer() -> None:
    found = modules()
    touching = [
        f"{name} imports {dependency}"
        for name in SERVICERS
        for dependency in imported(found[name])
        if dependency.startswith("csi_lvm.lvm")
    ]
    assert not touching, touching


# The driver's object graph has one home: wiring.build. Elsewhere in the
# driver and its runners, these parts come from a built graph, never by hand.
GRAPH_PARTS = frozenset(
    {
        "Inventory",
        "Backends",
        "KeyedLocks",
        "PoolReservations",
        "ControllerService",
        "NodeService",
        "SnapshotMetadataService",
        "IdentityService",
        "ForwardingService",
    }
)
RUNNERS = ("bench", "scripts", "sanity", "e2e")


def constructed(path: Path) -> set[str]:
    """The graph's parts a file calls by name."""
    return {
        node.func.id if isinstance(node.func, ast.Name) else node.func.attr
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute)
    } & GRAPH_PARTS


def test_only_the_wiring_builds_the_graph() -> None:
    runners = [path for folder in RUNNERS for path in (PACKAGE.parent / folder).rglob("*.py")]
    by_hand = {
        str(path.relative_to(PACKAGE.parent)): sorted(parts)
        for path in [*modules().values(), *runners]
        if path != PACKAGE / "wiring.py" and (parts := constructed(path))
    }
    assert not by_hand, by_hand
    assert constructed(PACKAGE / "wiring.py") == GRAPH_PARTS  # the check sees the calls


def test_no_module_is_over_500_lines() -> None:
    long = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text().splitlines())) > 500
    }
    assert not long, long
