"""The SnapshotMetadata service over gRPC on the host: the real server,
interceptor and servicer with the real LVM tools, for a volume group this
machine does not have. Requests that cannot name a snapshot of this node get
the statuses of the CSI spec's error tables, and an error raised while a
stream runs ends it with its own status after the messages before it.
(The maps themselves are read from real thin pools in tests/lvm.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_lvm.csi import csi_pb2, csi_pb2_grpc
from csi_lvm.errors import NotFound
from csi_lvm.identity import IdentityService
from csi_lvm.snapshot_metadata import SnapshotMetadataService
from tests.testbed import DRIVER_NAME, NODE_ID
from tests.unit.host_server import serve_absent_vg

Code = grpc.StatusCode
SNAPSHOT_OF_THIS_NODE = f"{NODE_ID}:thin:snap-nothing-here"


class Faltering(SnapshotMetadataService):
    """A stream that fails after its first message, as one does whose
    snapshot is deleted while it streams."""

    def GetMetadataAllocated(
        self, request: csi_pb2.GetMetadataAllocatedRequest, context: grpc.ServicerContext
    ) -> Iterator[csi_pb2.GetMetadataAllocatedResponse]:
        if request.snapshot_id != "falter":
            yield from super().GetMetadataAllocated(request, context)
            return
        yield csi_pb2.GetMetadataAllocatedResponse(
            block_metadata_type=csi_pb2.BlockMetadataType.VARIABLE_LENGTH,
            volume_capacity_bytes=1 << 20,
            block_metadata=[csi_pb2.BlockMetadata(byte_offset=0, size_bytes=4096)],
        )
        raise NotFound("snapshot falter was deleted while its block metadata was being sent")


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[csi_pb2_grpc.SnapshotMetadataStub]:
    root: Path = tmp_path_factory.mktemp("cbt")
    server, client = serve_absent_vg(root, root, Faltering)
    yield csi_pb2_grpc.SnapshotMetadataStub(client.channel)
    client.close()
    server.stop(grace=5)


def allocated_error(stub: csi_pb2_grpc.SnapshotMetadataStub, **fields: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.GetMetadataAllocated(csi_pb2.GetMetadataAllocatedRequest(**fields)))  # type: ignore[arg-type]
    return caught.value


def delta_error(stub: csi_pb2_grpc.SnapshotMetadataStub, **fields: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.GetMetadataDelta(csi_pb2.GetMetadataDeltaRequest(**fields)))  # type: ignore[arg-type]
    return caught.value


@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [
        ({}, Code.INVALID_ARGUMENT, "snapshot_id is required"),
        ({"snapshot_id": "x", "max_results": -1}, Code.INVALID_ARGUMENT, "max_results"),
        ({"snapshot_id": "not-an-id-of-ours"}, Code.NOT_FOUND, "does not exist"),
        ({"snapshot_id": f"{NODE_ID}:thin:csi-a-volume"}, Code.NOT_FOUND, "does not exist"),
        ({"snapshot_id": SNAPSHOT_OF_THIS_NODE}, Code.NOT_FOUND, "does not exist"),
        ({"snapshot_id": "other-node:thin:snap-x"}, Code.FAILED_PRECONDITION, "other-node"),
    ],
)
def test_allocated_refusals(
    stub: csi_pb2_grpc.SnapshotMetadataStub, fields: dict[str, object], code: Code, fragment: str
) -> None:
    error = allocated_error(stub, **fields)
    assert error.code() == code, error.details()
    assert fragment in (error.details() or "")


@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [
        ({"target_snapshot_id": "x"}, Code.INVALID_ARGUMENT, "base_snapshot_id is required"),
        ({"base_snapshot_id": "x"}, Code.INVALID_ARGUMENT, "target_snapshot_id is required"),
        (
            {"base_snapshot_id": SNAPSHOT_OF_THIS_NODE, "target_snapshot_id": "garbage"},
            Code.NOT_FOUND,
            "does not exist",
        ),
        (
            {"base_snapshot_id": "x", "target_snapshot_id": "y", "max_results": -5},
            Code.INVALID_ARGUMENT,
            "max_results",
        ),
    ],
)
def test_delta_refusals(
    stub: csi_pb2_grpc.SnapshotMetadataStub, fields: dict[str, object], code: Code, fragment: str
) -> None:
    error = delta_error(stub, **fields)
    assert error.code() == code, error.details()
    assert fragment in (error.details() or "")


def test_an_error_mid_stream_ends_it_after_the_messages_before(
    stub: csi_pb2_grpc.SnapshotMetadataStub,
) -> None:
    stream = stub.GetMetadataAllocated(csi_pb2.GetMetadataAllocatedRequest(snapshot_id="falter"))
    first = next(stream)
    assert first.block_metadata[0].size_bytes == 4096
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    assert caught.value.code() == Code.NOT_FOUND
    assert "deleted while" in (caught.value.details() or "")


def test_the_plugin_offers_the_service(tmp_path: Path) -> None:
    capabilities = IdentityService(DRIVER_NAME).GetPluginCapabilities(
        csi_pb2.GetPluginCapabilitiesRequest(),
        None,  # type: ignore[arg-type]
    )
    services = {c.service.type for c in capabilities.capabilities if c.HasField("service")}
    assert csi_pb2.PluginCapability.Service.SNAPSHOT_METADATA_SERVICE in services
