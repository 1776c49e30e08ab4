"""The real gRPC server and servicers on the host: with the real LVM tools
for a volume group this machine does not have (tests of what the driver
answers without any LVM state: hostile input, the SnapshotMetadata
refusals), or on the in-memory LVM (the servicers' logic)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from csi_lvm.block_maps import BlockMaps
from csi_lvm.config import Config, parse_config
from csi_lvm.server import Server
from csi_lvm.snapshot_metadata import SnapshotMetadataService
from csi_lvm.volumes import Inventory
from csi_lvm.wiring import Graph, Options, build
from tests.memory_lvm import MemoryLvm
from tests.testbed import DRIVER_NAME, NODE_ID, TOPOLOGY_KEY, CsiClient


def serve_absent_vg(
    root: Path,
    state_dir: Path,
    snapshot_metadata: Callable[[Inventory, BlockMaps], SnapshotMetadataService] = (
        SnapshotMetadataService
    ),
) -> tuple[Server, CsiClient]:
    """A started server on ``root``/csi.sock, with a thin and a thick class
    in a volume group that does not exist, and a client of it."""
    config = parse_config(
        f"deviceClasses:\n  - name: thin\n    volumeGroup: absentvg{os.getpid()}\n"
        "    thinPool: pool0\n    default: true\n"
        f"  - name: thick\n    volumeGroup: absentvg{os.getpid()}\n"
    )
    options = Options(NODE_ID, DRIVER_NAME, TOPOLOGY_KEY, state_dir=str(state_dir))
    graph = build(config, options)
    assert graph.snapshot_metadata is not None  # a state directory is given
    server = Server(
        f"unix://{root}/csi.sock",
        graph.identity,
        graph.controller,
        graph.node,
        # The graph's own service, or a test's subclass of it on the same block maps.
        snapshot_metadata(graph.inventory, graph.snapshot_metadata.maps),
    )
    server.start()
    return server, CsiClient(f"{root}/csi.sock")


# The in-memory node: a VG of 4 GiB with a thin pool of 1 GiB (class thin,
# overcommitted 10x), a small pool of 64 MiB that no create may overcommit
# (class small, full at 90 %), the rest for thick LVs, and an LV made by hand.
MEMORY_VG, MEMORY_POOL, SMALL_POOL, HAND_MADE = "vg0", "pool0", "small0", "root"
MiB = 1 << 20


@dataclass
class MemoryNode:
    """The driver's graph on the in-memory LVM, served on a socket: the
    servicers' logic at host speed. Nothing here has a device; staging,
    copies and the zeroing of thick volumes are the real-LVM suite's."""

    lvm: MemoryLvm
    graph: Graph
    server: Server
    csi: CsiClient

    def close(self) -> None:
        self.csi.close()
        self.server.stop(0)
        self.graph.close()


def serve_memory(
    root: Path, options: Options | None = None, config: Config | None = None
) -> MemoryNode:
    """The in-memory node, served; ``config`` instead of its own classes
    (thin, small and thick, above)."""
    lvm = MemoryLvm()
    lvm.add_volume_group(MEMORY_VG, 4096 * MiB)
    lvm.add_thin_pool(MEMORY_VG, MEMORY_POOL, 1024 * MiB)
    lvm.add_thin_pool(MEMORY_VG, SMALL_POOL, 64 * MiB)
    lvm.create_linear_volume(MEMORY_VG, HAND_MADE, 64 * MiB, [])
    config = config or parse_config(
        f"deviceClasses:\n  - name: thin\n    volumeGroup: {MEMORY_VG}\n"
        f"    thinPool: {MEMORY_POOL}\n    overprovisionRatio: 10\n    default: true\n"
        f"  - name: small\n    volumeGroup: {MEMORY_VG}\n    thinPool: {SMALL_POOL}\n"
        "    fullThresholdPercent: 90\n"
        f"  - name: thick\n    volumeGroup: {MEMORY_VG}\n"
    )
    graph = build(config, options or Options(NODE_ID, DRIVER_NAME, TOPOLOGY_KEY), lvm=lvm)
    server = Server(f"unix://{root}/csi.sock", graph.identity, graph.controller, graph.node)
    server.start()
    return MemoryNode(lvm, graph, server, CsiClient(f"{root}/csi.sock"))
