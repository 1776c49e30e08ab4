"""Where this node is: its own key (``topology.<driver>/node`` = node id)
and the topology labels the admin listed (a zone, a region, a rack), with the
values its Node object has; and whether a request's topology accepts it.

A local volume lives on its node alone, so a volume's accessible topology is
the node key only; the labels let StorageClasses' ``allowedTopologies`` and
the scheduler speak of domains wider than a node. Pure: the labels are read
from the API server by ``csi_lvm.kube`` before the graph is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from csi_lvm.csi import csi_pb2
from csi_lvm.errors import ResourceExhausted


@dataclass(frozen=True)
class NodeTopology:
    node_key: str
    node_id: str
    # The listed labels this node has, with its values; a listed label the
    # node lacks is not here (the node is in no domain of that key).
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def segments(self) -> dict[str, str]:
        """What NodeGetInfo reports: the node key and the labels."""
        return {**self.labels, self.node_key: self.node_id}

    def node_info(self) -> csi_pb2.Topology:
        return csi_pb2.Topology(segments=self.segments)

    def volume(self) -> csi_pb2.Topology:
        """A volume's accessible topology: this node alone."""
        return csi_pb2.Topology(segments={self.node_key: self.node_id})

    def accepts(self, segments: Mapping[str, str]) -> bool:
        """Whether this node lies in the segment: every key it names is one
        of this node's, with this node's value (a term may name any subset)."""
        mine = self.segments
        return all(mine.get(key) == value for key, value in segments.items())

    def check(self, requirements: csi_pb2.TopologyRequirement, holder: str = "") -> None:
        """RESOURCE_EXHAUSTED, naming this node's segment and the request's,
        when no requisite term (or, with none, no preferred term) accepts this
        node. ``holder``: the source the new volume is made from, held here."""
        wanted = list(requirements.requisite) or list(requirements.preferred)
        if not wanted or any(self.accepts(term.segments) for term in wanted):
            return
        held = f" (the source {holder} is held here)" if holder else ""
        raise ResourceExhausted(
            f"this driver serves node {self.node_id} ({describe(self.segments)}) but the "
            f"request only accepts: {'; '.join(describe(t.segments) for t in wanted)}{held}"
        )


def describe(segments: Mapping[str, str]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(segments.items())) or "{}"


def missing_labels(keys: Iterable[str], labels: Mapping[str, str]) -> list[str]:
    """The listed keys the node has no label for."""
    return [key for key in keys if key not in labels]
