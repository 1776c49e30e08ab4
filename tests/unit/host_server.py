"""The real gRPC server and servicers on the host, with the real LVM tools,
for a volume group this machine does not have: for tests of what the driver
answers without any LVM state (hostile input, the SnapshotMetadata refusals)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from csi_lvm.block_maps import BlockMaps
from csi_lvm.config import parse_config
from csi_lvm.server import Server
from csi_lvm.snapshot_metadata import SnapshotMetadataService
from csi_lvm.volumes import Inventory
from csi_lvm.wiring import Options, build
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
