"""Small helpers every servicer shares: the call's time budget and the
node's topology segment."""

from __future__ import annotations

import grpc

from csi_lvm.csi import csi_pb2
from csi_lvm.errors import DeadlineExceeded

# Calls without a deadline report an effectively infinite time remaining.
NO_DEADLINE_SECONDS = 24 * 3600
# Less than this left is no time at all: no LVM command or mount fits in it.
MINIMUM_BUDGET_SECONDS = 0.05


def budget(context: grpc.ServicerContext | None) -> float | None:
    """Seconds left before the caller's deadline, or None when it set none.

    Every servicer asks before its first side effect, so a call that arrives
    with its deadline passed (a sidecar's queue, a slow network) is answered
    DEADLINE_EXCEEDED having done nothing."""
    remaining = context.time_remaining() if context is not None else None
    if remaining is None or remaining > NO_DEADLINE_SECONDS:
        return None
    if remaining < MINIMUM_BUDGET_SECONDS:
        raise DeadlineExceeded(
            "the call's deadline had passed when csi-lvm took it up; nothing was done: retry "
            "with a longer deadline"
        )
    return float(remaining)


def node_topology(topology_key: str, node_id: str) -> csi_pb2.Topology:
    return csi_pb2.Topology(segments={topology_key: node_id})
