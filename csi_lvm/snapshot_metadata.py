"""The CSI SnapshotMetadata service: changed block tracking for backups.

GetMetadataAllocated streams the byte ranges a snapshot holds data in, and
GetMetadataDelta the ranges where a later snapshot of the same volume
differs from an earlier one, both as VARIABLE_LENGTH runs at the thin pool's
chunk granularity. The maps come from ``csi_lvm.block_maps`` (the pool's own
metadata); this servicer validates the request, finds the snapshots, and
turns the ranges into messages of at most ``max_results`` each, from
``starting_offset`` on. A snapshot deleted while its ranges stream ends the
stream with NOT_FOUND. Thin classes only: thick snapshots are full copies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from csi_lvm.block_maps import BlockMap, BlockMaps, thin_only
from csi_lvm.block_ranges import batches, starting_at
from csi_lvm.csi import csi_pb2, csi_pb2_grpc
from csi_lvm.errors import InvalidArgument, NotFound, OutOfRange
from csi_lvm.ids import Kind
from csi_lvm.rpc import budget
from csi_lvm.volumes import Inventory, Owned

Context = grpc.ServicerContext
# Ranges per message when the caller leaves it to the driver: about 20 KiB.
DEFAULT_MAX_RESULTS = 1024
VARIABLE_LENGTH = csi_pb2.BlockMetadataType.VARIABLE_LENGTH
Response = TypeVar(
    "Response", csi_pb2.GetMetadataAllocatedResponse, csi_pb2.GetMetadataDeltaResponse
)


class SnapshotMetadataService(csi_pb2_grpc.SnapshotMetadataServicer):
    def __init__(self, inventory: Inventory, maps: BlockMaps) -> None:
        self.inventory = inventory
        self.maps = maps

    def GetMetadataAllocated(
        self, request: csi_pb2.GetMetadataAllocatedRequest, context: Context
    ) -> Iterator[csi_pb2.GetMetadataAllocatedResponse]:
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        per_message = _per_message(request.max_results)
        timeout = budget(context)
        snapshot = self._snapshot(request.snapshot_id, "snapshot", timeout)
        _check_offset(request.starting_offset, snapshot)
        block_map = self.maps.allocated(snapshot, timeout)
        return self._stream(
            block_map,
            request.starting_offset,
            per_message,
            [snapshot],
            csi_pb2.GetMetadataAllocatedResponse,
        )

    def GetMetadataDelta(
        self, request: csi_pb2.GetMetadataDeltaRequest, context: Context
    ) -> Iterator[csi_pb2.GetMetadataDeltaResponse]:
        if not request.base_snapshot_id:
            raise InvalidArgument("base_snapshot_id is required")
        if not request.target_snapshot_id:
            raise InvalidArgument("target_snapshot_id is required")
        per_message = _per_message(request.max_results)
        timeout = budget(context)
        base = self._snapshot(request.base_snapshot_id, "base snapshot", timeout)
        target = self._snapshot(request.target_snapshot_id, "target snapshot", timeout)
        thin_only(base)  # before the pair's checks: a thick snapshot has no delta at all
        thin_only(target)
        if str(base.id) == str(target.id):
            raise InvalidArgument(
                f"base and target are the same snapshot ({base.id}); a delta needs two"
            )
        if base.source_id != target.source_id:
            raise InvalidArgument(
                f"base snapshot {base.id} is of volume {base.source_id or '(unknown)'} and "
                f"target snapshot {target.id} of volume {target.source_id or '(unknown)'}: a "
                "delta is between two snapshots of the same volume"
            )
        _check_offset(request.starting_offset, target)
        block_map = self.maps.delta(base, target, timeout)
        return self._stream(
            block_map,
            request.starting_offset,
            per_message,
            [base, target],
            csi_pb2.GetMetadataDeltaResponse,
        )

    def _snapshot(self, snapshot_id: str, what: str, timeout: float | None) -> Owned:
        found = self.inventory.lookup_now(snapshot_id, Kind.SNAPSHOT, what, timeout)
        if found is None:
            raise NotFound(f"{what} {snapshot_id} does not exist on node {self.inventory.node_id}")
        return found

    def _stream(
        self,
        block_map: BlockMap,
        starting_offset: int,
        per_message: int,
        snapshots: list[Owned],
        response: Callable[..., Response],
    ) -> Iterator[Response]:
        """The spooled ranges from ``starting_offset`` on, ``per_message`` to a
        message (one message, without ranges, when there are none), each
        sent only while every snapshot of the call still exists."""
        try:
            sent = False
            ranges = starting_at(block_map.ranges, starting_offset)
            for batch in batches(ranges, per_message):
                self._check_still_there(snapshots)
                yield _message(response, block_map, batch)
                sent = True
            self._check_still_there(snapshots)
            if not sent:
                yield _message(response, block_map, [])
        finally:
            block_map.close()

    def _check_still_there(self, snapshots: list[Owned]) -> None:
        for snapshot in snapshots:
            if not self.inventory.kept.still_there(snapshot.lv.vg_name, snapshot.lv.name, None):
                raise NotFound(
                    f"snapshot {snapshot.id} was deleted while its block metadata was being "
                    "sent; the ranges received are incomplete"
                )


def _message(
    response: Callable[..., Response], block_map: BlockMap, batch: list[tuple[int, int]]
) -> Response:
    return response(
        block_metadata_type=VARIABLE_LENGTH,
        volume_capacity_bytes=block_map.capacity_bytes,
        block_metadata=[
            csi_pb2.BlockMetadata(byte_offset=offset, size_bytes=length) for offset, length in batch
        ],
    )


def _per_message(max_results: int) -> int:
    if max_results < 0:
        raise InvalidArgument(f"max_results must not be negative (got {max_results})")
    return max_results or DEFAULT_MAX_RESULTS


def _check_offset(starting_offset: int, snapshot: Owned) -> None:
    if not 0 <= starting_offset <= snapshot.size_bytes:
        raise OutOfRange(
            f"starting_offset {starting_offset} is outside snapshot {snapshot.id}, whose "
            f"volume is {snapshot.size_bytes} bytes: give an offset from 0 to its size"
        )
