"""Small helpers every servicer shares: the call's time budget and the
node's topology segment."""

from __future__ import annotations

import grpc

from csi_lvm.csi import csi_pb2

# Calls without a deadline report an effectively infinite time remaining.
NO_DEADLINE_SECONDS = 24 * 3600


def budget(context: grpc.ServicerContext | None) -> float | None:
    """Seconds left before the caller's deadline, or None when it set none."""
    remaining = context.time_remaining() if context is not None else None
    if remaining is None or remaining > NO_DEADLINE_SECONDS:
        return None
    return max(0.1, float(remaining))


def node_topology(topology_key: str, node_id: str) -> csi_pb2.Topology:
    return csi_pb2.Topology(segments={topology_key: node_id})
