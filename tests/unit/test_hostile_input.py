"""Hostile requests over gRPC, on the host: the real server and servicers
with the real LVM tools, for a volume group this machine does not have.
Whatever is sent, the answer is a proper status with a message, and the
paths it is aimed at are left as they were. (The same requests run against a
real volume group, a hand-made LV and a hand-made mount in the stress suite.)"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings

from tests.hostile import Call, answer, hostile_calls
from tests.unit.host_server import serve_absent_vg

SEEN: dict[str, set[str]] = {}


class HostBed:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.kept = root / "kept"  # a directory the driver must not touch
        self.kept.mkdir()
        (self.kept / "data").write_text("mine")
        self.link = root / "link-to-kept"
        self.link.symlink_to(self.kept)
        self.server, self.client = serve_absent_vg(root, root / "state")

    def untouched(self) -> bool:
        return (
            (self.kept / "data").read_text() == "mine"
            and self.link.is_symlink()
            and os.readlink(self.link) == str(self.kept)
        )


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostBed]:
    host_bed = HostBed(tmp_path_factory.mktemp("hostile"))
    yield host_bed
    host_bed.client.close()
    host_bed.server.stop(grace=5)


def test_every_hostile_request_gets_a_proper_status(bed: HostBed) -> None:
    paths = [str(bed.kept), str(bed.link), str(bed.kept / "data"), f"{bed.link}/data"]

    @settings(
        max_examples=400,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(call=hostile_calls(paths, handmade_lv="root"))
    def check(call: Call) -> None:
        code, _ = answer(bed.client, call)
        SEEN.setdefault(call.method, set()).add(code.name)
        assert bed.untouched(), f"{call} changed a path the driver does not own"

    check()
    # Every RPC was driven, and the answers were not all one code.
    assert len(SEEN) >= 16, sorted(SEEN)
    assert {"GetMetadataAllocated", "GetMetadataDelta"} <= set(SEEN), sorted(SEEN)
    assert "INVALID_ARGUMENT" in set().union(*SEEN.values())
    assert SEEN["ControllerPublishVolume"] == {grpc.StatusCode.UNIMPLEMENTED.name}
