"""Topology beyond the node: the labels a node reports (a zone, a rack) and
how requests' terms of any subset of keys are judged against them; doctor's
comparison of what the plugin reported with the node's labels now."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import structlog
from structlog.testing import capture_logs

from csi_lvm.admin import topology_checks
from csi_lvm.cli import with_node_labels
from csi_lvm.csi import csi_pb2
from csi_lvm.errors import ConfigError, ResourceExhausted
from csi_lvm.topology import NodeTopology, missing_labels
from csi_lvm.wiring import Options
from tests.lvm.helpers import create_request, expect_error
from tests.testbed import NODE_ID, TOPOLOGY_KEY
from tests.unit.host_server import MemoryNode, serve_memory

ZONE, RACK = "topology.kubernetes.io/zone", "example.com/rack"
LABELS = {ZONE: "cn-hangzhou-b", RACK: "rack1"}
HERE = NodeTopology(TOPOLOGY_KEY, NODE_ID, LABELS)
LOG = structlog.get_logger("test")


def requirement(*terms: dict[str, str], preferred: bool = False) -> csi_pb2.TopologyRequirement:
    topologies = [csi_pb2.Topology(segments=term) for term in terms]
    if preferred:
        return csi_pb2.TopologyRequirement(preferred=topologies)
    return csi_pb2.TopologyRequirement(requisite=topologies)


def test_the_node_reports_its_key_and_labels_and_volumes_only_the_node() -> None:
    assert HERE.segments == {TOPOLOGY_KEY: NODE_ID, **LABELS}
    assert dict(HERE.volume().segments) == {TOPOLOGY_KEY: NODE_ID}


@pytest.mark.parametrize(
    "term",
    [
        {ZONE: "cn-hangzhou-b"},
        {RACK: "rack1"},
        {ZONE: "cn-hangzhou-b", RACK: "rack1"},
        {TOPOLOGY_KEY: NODE_ID, ZONE: "cn-hangzhou-b"},
        {},
    ],
)
def test_a_term_of_any_subset_of_the_node_s_keys_accepts_it(term: dict[str, str]) -> None:
    assert HERE.accepts(term)
    HERE.check(requirement({ZONE: "cn-hangzhou-d"}, term))


@pytest.mark.parametrize(
    "term",
    [
        {ZONE: "cn-hangzhou-d"},
        {ZONE: "cn-hangzhou-b", RACK: "rack2"},
        {TOPOLOGY_KEY: "another-node"},
        {"topology.kubernetes.io/region": "cn-hangzhou"},  # a key this node lacks
    ],
)
def test_a_term_this_node_is_outside_is_refused_naming_both(term: dict[str, str]) -> None:
    assert not HERE.accepts(term)
    with pytest.raises(ResourceExhausted) as refused:
        HERE.check(requirement(term))
    message = str(refused.value)
    assert f"{ZONE}=cn-hangzhou-b" in message and f"{RACK}=rack1" in message
    assert all(f"{key}={value}" in message for key, value in term.items())


def test_preferred_terms_count_only_without_requisite_ones() -> None:
    with pytest.raises(ResourceExhausted):
        HERE.check(requirement({ZONE: "cn-hangzhou-d"}, preferred=True))
    both = requirement({ZONE: "cn-hangzhou-b"})
    both.preferred.add(segments={ZONE: "cn-hangzhou-d"})
    HERE.check(both)  # the requisite term decides
    HERE.check(csi_pb2.TopologyRequirement())


def test_a_node_lacking_a_listed_label_is_in_no_domain_of_it() -> None:
    assert missing_labels([ZONE, RACK, "topology.kubernetes.io/region"], LABELS) == [
        "topology.kubernetes.io/region"
    ]
    unlabelled = NodeTopology(TOPOLOGY_KEY, NODE_ID, {})
    assert not unlabelled.accepts({ZONE: "cn-hangzhou-b"})
    assert unlabelled.accepts({TOPOLOGY_KEY: NODE_ID})


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"topology_labels": ("bad key",)}, "'bad key' is not a valid label key"),
        ({"topology_labels": (TOPOLOGY_KEY,)}, "the driver's node key already"),
        ({"topology_labels": (ZONE, ZONE)}, "more than once"),
        ({"node_labels": {RACK: "rack1"}}, "not in --topology-labels"),
    ],
)
def test_bad_topology_labels_are_refused_naming_the_flag(
    fields: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ConfigError, match="topology-labels") as refused:
        Options(NODE_ID, topology_key=TOPOLOGY_KEY, **fields)  # type: ignore[arg-type]
    assert fragment in str(refused.value)


@pytest.fixture
def zoned(tmp_path: Path) -> Iterator[MemoryNode]:
    options = Options(NODE_ID, topology_key=TOPOLOGY_KEY, topology_labels=(ZONE, RACK),
                      node_labels=LABELS)  # fmt: skip
    served = serve_memory(tmp_path, options)
    yield served
    served.close()


def test_node_get_info_and_create_volume_speak_of_the_zone(zoned: MemoryNode) -> None:
    info = zoned.csi.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert dict(info.accessible_topology.segments) == {TOPOLOGY_KEY: NODE_ID, **LABELS}
    request = create_request("zoned")
    request.accessibility_requirements.requisite.add(segments={ZONE: "cn-hangzhou-d"})
    expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, zoned.csi.controller.CreateVolume,
                 request, "cn-hangzhou-d", f"{ZONE}=cn-hangzhou-b")  # fmt: skip
    request.accessibility_requirements.requisite.add(segments={ZONE: "cn-hangzhou-b"})
    volume = zoned.csi.controller.CreateVolume(request).volume
    assert [dict(t.segments) for t in volume.accessible_topology] == [{TOPOLOGY_KEY: NODE_ID}]


def test_capacity_is_offered_to_segments_this_node_lies_in(zoned: MemoryNode) -> None:
    def capacity(segments: dict[str, str]) -> int:
        request = csi_pb2.GetCapacityRequest(
            parameters={"deviceClass": "thin"},
            accessible_topology=csi_pb2.Topology(segments=segments),
        )
        return int(zoned.csi.controller.GetCapacity(request).available_capacity)

    assert capacity({TOPOLOGY_KEY: NODE_ID, **LABELS}) > 0
    assert capacity({RACK: "rack1"}) > 0
    assert capacity({ZONE: "cn-hangzhou-d"}) == 0


def test_doctor_tells_a_label_changed_since_the_plugin_registered() -> None:
    reported = {TOPOLOGY_KEY: NODE_ID, ZONE: "cn-hangzhou-b"}
    same = topology_checks(reported, TOPOLOGY_KEY, [ZONE], {ZONE: "cn-hangzhou-b"})
    assert [c.ok for c in same] == [True]
    moved = topology_checks(reported, TOPOLOGY_KEY, [ZONE], {ZONE: "cn-hangzhou-c"})
    assert [c.ok for c in moved] == [False] and "restart the plugin" in moved[0].fix
    added = topology_checks({TOPOLOGY_KEY: NODE_ID}, TOPOLOGY_KEY, [RACK], {RACK: "rack2"})
    assert [c.ok for c in added] == [False] and "reports example.com/rack=(none)" in added[0].fix
    unlabelled = topology_checks(None, TOPOLOGY_KEY, [RACK], {})
    assert [c.ok for c in unlabelled] == [False] and "kubectl label node" in unlabelled[0].fix
    no_api = topology_checks(reported, TOPOLOGY_KEY, [ZONE], None, "no API here")
    assert [(c.ok, c.fix) for c in no_api] == [(False, "no API here")]
    assert topology_checks({TOPOLOGY_KEY: NODE_ID}, TOPOLOGY_KEY, [], None) == []


def test_a_node_lacking_a_listed_label_starts_without_it_and_says_how_to_fix_it() -> None:
    options = Options(NODE_ID, topology_key=TOPOLOGY_KEY, topology_labels=(ZONE, RACK))
    with capture_logs() as logged:
        labelled = with_node_labels(options, {ZONE: "cn-hangzhou-b", "other": "x"}, LOG)
    assert dict(labelled.node_labels) == {ZONE: "cn-hangzhou-b"}
    assert labelled.topology.segments == {TOPOLOGY_KEY: NODE_ID, ZONE: "cn-hangzhou-b"}
    (warning,) = logged
    assert warning["log_level"] == "warning" and warning["label"] == RACK
    assert f"kubectl label node {NODE_ID} {RACK}=<value>" in warning["fix"]
