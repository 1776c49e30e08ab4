"""The Node service's decisions that come before any device or mount, on
the in-memory LVM: what it reports of the node, and the volumes it refuses
to stage or publish. Staging itself (format, mount, grow) is tested on real
LVM and real filesystems in the VM."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_lvm.csi import csi_pb2
from csi_lvm.ids import Kind, lv_name_for
from csi_lvm.lifecycle import COPYING_TAG
from tests.lvm.helpers import create_request, expect_error, mount_capability
from tests.testbed import NODE_ID, TOPOLOGY_KEY
from tests.unit.host_server import MEMORY_POOL, MEMORY_VG, MemoryNode, MiB, serve_memory

Code = grpc.StatusCode


@pytest.fixture
def node(tmp_path: Path) -> Iterator[MemoryNode]:
    served = serve_memory(tmp_path)
    yield served
    served.close()


def stage_request(volume_id: str, path: Path) -> csi_pb2.NodeStageVolumeRequest:
    return csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(path), volume_capability=mount_capability()
    )


def test_the_node_reports_its_id_and_topology(node: MemoryNode) -> None:
    info = node.csi.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == NODE_ID
    assert dict(info.accessible_topology.segments) == {TOPOLOGY_KEY: NODE_ID}


def test_volumes_that_are_not_here_are_not_found(node: MemoryNode, tmp_path: Path) -> None:
    expect_error(Code.NOT_FOUND, node.csi.node.NodeStageVolume,
                 stage_request(f"{NODE_ID}:thin:csi-never-made", tmp_path / "stage"),
                 "does not exist")  # fmt: skip
    # A class the config lost: the admin is told how to reach the volume again.
    expect_error(Code.FAILED_PRECONDITION, node.csi.node.NodeStageVolume,
                 stage_request(f"{NODE_ID}:gone:csi-x", tmp_path / "stage"),
                 "device class 'gone'", "restore the class")  # fmt: skip
    expect_error(Code.INVALID_ARGUMENT, node.csi.node.NodeStageVolume,
                 stage_request("", tmp_path / "stage"), "volume_id")  # fmt: skip


def test_a_volume_whose_copy_is_unfinished_is_never_staged(
    node: MemoryNode, tmp_path: Path
) -> None:
    # A thick restore that a crash cut short: its data is not whole.
    volume = node.csi.controller.CreateVolume(create_request("copied", 8 * MiB)).volume
    lv_name = lv_name_for(Kind.VOLUME, "copied")
    lv = node.lvm.find_lv(MEMORY_VG, lv_name)
    assert lv is not None
    node.lvm.remove(MEMORY_VG, lv_name)
    node.lvm.create_thin_volume(MEMORY_VG, MEMORY_POOL, lv_name, 8 * MiB,
                                [*lv.tags, COPYING_TAG])  # fmt: skip
    changes = node.lvm.changes
    expect_error(Code.FAILED_PRECONDITION, node.csi.node.NodeStageVolume,
                 stage_request(volume.volume_id, tmp_path / "stage"), "is not ready")  # fmt: skip
    assert node.lvm.changes == changes and not (tmp_path / "stage").exists()
