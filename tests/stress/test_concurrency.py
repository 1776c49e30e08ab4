"""Concurrency: 64 calls with distinct names plus 8 duplicates of one of them,
all sent at once, for creates, snapshots and deletes. Exactly the right LVs
exist afterwards; a duplicate sees ABORTED or the same answer, never a second
LV; no call fails on LVM's own locking."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_lvm.csi import csi_pb2
from csi_lvm.ids import Tag, csi_name_in
from tests.lvm.helpers import MiB, create_request
from tests.stress.conftest import lv_report, owned_by_driver, untouched_part
from tests.testbed import CsiClient, Driver, LoopVolumeGroup, write_config

DISTINCT, DUPLICATES = 64, 8


@pytest.fixture(scope="module")
def csi(workdir: Path, vg: LoopVolumeGroup) -> Iterator[CsiClient]:
    config = write_config(workdir / "concurrency-config.yaml", vg.name, vg.pool, ratio=40)
    driver = Driver(workdir / "concurrency", config)
    driver.workdir.mkdir(exist_ok=True)
    client = driver.start()
    yield client
    client.close()
    assert driver.stop() == 0


def all_at_once(call: Callable[..., Any], requests: list[Any]) -> list[Any]:
    """Send every request before waiting for any answer; answers or RpcErrors."""
    pending = [call.future(r, timeout=900) for r in requests]
    outcomes: list[Any] = []
    for future in pending:
        try:
            outcomes.append(future.result())
        except grpc.RpcError as error:
            outcomes.append(error)
    return outcomes


def check_outcomes(outcomes: list[Any], same: Callable[[Any, Any], bool]) -> int:
    """The distinct calls all succeed; each duplicate is ABORTED or answers the
    same as the original. Returns how many duplicates were ABORTED."""
    originals, duplicates = outcomes[:DISTINCT], outcomes[DISTINCT:]
    failed = [o for o in originals if isinstance(o, grpc.RpcError)]
    assert not failed, [f"{e.code().name}: {e.details()}" for e in failed]
    aborted = 0
    for outcome in duplicates:
        if isinstance(outcome, grpc.RpcError):
            assert outcome.code() == grpc.StatusCode.ABORTED, outcome.details()
            aborted += 1
        else:
            assert same(outcome, originals[0])
    return aborted


def owned_names(vg: LoopVolumeGroup) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for row in lv_report(vg.name):
        tags = owned_by_driver(row)
        if tags is not None:
            csi_name = tags.get(Tag.NAME) or csi_name_in(row["lv_name"]) or ""
            names.setdefault(csi_name, []).append(row["lv_name"])
    return names


def test_64_calls_and_8_duplicates_at_once(csi: CsiClient, vg: LoopVolumeGroup) -> None:
    untouched = untouched_part(lv_report(vg.name))
    controller = csi.controller
    names = [f"together-{i}" for i in range(DISTINCT)]

    creates = [create_request(n, 4 * MiB) for n in names]
    outcomes = all_at_once(controller.CreateVolume, creates + [creates[0]] * DUPLICATES)
    check_outcomes(outcomes, lambda a, b: a.volume.volume_id == b.volume.volume_id)
    volumes = [o.volume.volume_id for o in outcomes[:DISTINCT]]
    assert owned_names(vg) == {n: [f"csi-{n}"] for n in names}

    snapshot_requests = [
        csi_pb2.CreateSnapshotRequest(name=f"{n}-snap", source_volume_id=v)
        for n, v in zip(names, volumes, strict=True)
    ]
    outcomes = all_at_once(
        controller.CreateSnapshot, snapshot_requests + [snapshot_requests[0]] * DUPLICATES
    )
    check_outcomes(outcomes, lambda a, b: a.snapshot.snapshot_id == b.snapshot.snapshot_id)
    snapshots = [o.snapshot.snapshot_id for o in outcomes[:DISTINCT]]
    expected = {n: [f"csi-{n}"] for n in names} | {f"{n}-snap": [f"snap-{n}-snap"] for n in names}
    assert owned_names(vg) == expected

    deletes = [csi_pb2.DeleteSnapshotRequest(snapshot_id=s) for s in snapshots]
    outcomes = all_at_once(controller.DeleteSnapshot, deletes + [deletes[0]] * DUPLICATES)
    check_outcomes(outcomes, lambda a, b: True)  # an empty answer: OK is the same answer
    assert owned_names(vg) == {n: [f"csi-{n}"] for n in names}

    volume_deletes = [csi_pb2.DeleteVolumeRequest(volume_id=v) for v in volumes]
    outcomes = all_at_once(
        controller.DeleteVolume, volume_deletes + [volume_deletes[0]] * DUPLICATES
    )
    check_outcomes(outcomes, lambda a, b: True)
    assert owned_names(vg) == {}
    assert untouched_part(lv_report(vg.name)) == untouched
