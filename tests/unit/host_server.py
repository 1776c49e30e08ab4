"""The real gRPC server and servicers on the host, with the real LVM tools,
for a volume group this machine does not have: for tests of what the driver
answers without any LVM state (hostile input, the SnapshotMetadata refusals)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from csi_lvm.backends import Backends
from csi_lvm.block_maps import BlockMaps, PoolReservations
from csi_lvm.config import parse_config
from csi_lvm.controller import ControllerService
from csi_lvm.identity import IdentityService
from csi_lvm.locks import KeyedLocks
from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.thin_metadata import ThinMetadata
from csi_lvm.node import NodeService
from csi_lvm.server import Server
from csi_lvm.snapshot_metadata import SnapshotMetadataService
from csi_lvm.volumes import Inventory
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
    lvm = Lvm()
    inventory = Inventory(config, lvm, NODE_ID, DRIVER_NAME)
    backends = Backends(inventory)
    locks = KeyedLocks()
    maps = BlockMaps(lvm, PoolReservations(ThinMetadata(), str(state_dir)))
    server = Server(
        f"unix://{root}/csi.sock",
        IdentityService(DRIVER_NAME),
        ControllerService(inventory, backends, locks, TOPOLOGY_KEY),
        NodeService(inventory, backends, locks, TOPOLOGY_KEY),
        snapshot_metadata(inventory, maps),
    )
    server.start()
    return server, CsiClient(f"{root}/csi.sock")
