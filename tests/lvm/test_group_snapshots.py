"""Group snapshots on real LVM: one instant for several volumes, the limits,
and the repair of a group cut short by a crash.

The instant is checked with a writer that appends sequence numbers to three
volumes in turn (0 to volume 0, 1 to volume 1, 2 to volume 2, 3 to volume
0, ...), each write synchronous before the next begins. Snapshots of one
instant hold a prefix of that sequence: if the newest number in any of them
is ``top``, each volume holds exactly its own numbers up to ``top``. The same
check on snapshots taken one by one fails (the writer goes on between them),
which shows the check can fail.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from csi_lvm.csi import csi_pb2
from csi_lvm.ids import GroupId, Kind, ObjectId, lv_name_for, member_name
from csi_lvm.lifecycle import MAKING_TAG
from csi_lvm.lvm.names import dm_name
from tests.lvm.helpers import block_capability, create, driver_of_its_own, expect_error
from tests.testbed import CsiClient, LoopVolumeGroup

Code = grpc.StatusCode
MiB = 1 << 20
RECORD = 4096
VOLUMES = 3


def device(vg: LoopVolumeGroup, object_id: str) -> str:
    return f"/dev/mapper/{dm_name(vg.name, object_id.rsplit(':', 1)[-1])}"


class Writer:
    """Appends 0, 1, 2, ... to the devices in turn, one synchronous write each."""

    def __init__(self, devices: list[str]) -> None:
        self.fds = [os.open(d, os.O_WRONLY | os.O_DIRECT | os.O_SYNC) for d in devices]
        self.buffer = mmap.mmap(-1, RECORD)  # page-aligned, as O_DIRECT wants
        self.count = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._write, daemon=True)

    def _write(self) -> None:
        while not self.stop.is_set():
            number = self.count
            volume, slot = number % len(self.fds), number // len(self.fds)
            self.buffer[:8] = (number + 1).to_bytes(8, "little")  # 0 stays "nothing here"
            os.pwrite(self.fds[volume], self.buffer, slot * RECORD)
            self.count = number + 1

    def wait_for(self, count: int, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while self.count < count:
            assert self.thread.is_alive(), "the writer stopped"
            assert time.monotonic() < deadline, f"the writer did not reach {count}"
            time.sleep(0.05)

    @contextmanager
    def running(self) -> Iterator[Writer]:
        self.thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            self.thread.join(60)
            for fd in self.fds:
                os.close(fd)


def last_number(vg: LoopVolumeGroup, snapshot_id: str) -> int:
    """The newest number a snapshot holds (-1: none)."""
    lv = f"{vg.name}/{snapshot_id.rsplit(':', 1)[-1]}"
    subprocess.run(["lvchange", "-q", "-ay", "-K", lv], check=True)
    try:
        with open(device(vg, snapshot_id), "rb") as source:
            last = -1
            while record := source.read(RECORD):
                number = int.from_bytes(record[:8], "little") - 1
                if number < 0:
                    break
                last = number
            return last
    finally:
        subprocess.run(["lvchange", "-q", "-an", lv], check=True)


def one_instant(lasts: list[int]) -> bool:
    """Whether each volume's newest number is the newest of its own up to
    the newest of all: a prefix of the sequence, as at one instant."""
    top = max(lasts)
    return all(
        last == (top - (top - volume) % len(lasts) if top >= volume else -1)
        for volume, last in enumerate(lasts)
    )


def test_the_instant_check_knows_a_prefix() -> None:
    assert one_instant([6, 4, 5]) and one_instant([3, 1, 2]) and one_instant([0, -1, -1])
    assert not one_instant([0, 4, 2]) and not one_instant([6, 1, 5])


def volumes_of(csi: CsiClient, name: str) -> list[csi_pb2.Volume]:
    return [
        create(csi, f"{name}-{i}", 32 * MiB, capability=block_capability()) for i in range(VOLUMES)
    ]


def group_request(
    name: str, volumes: list[csi_pb2.Volume]
) -> csi_pb2.CreateVolumeGroupSnapshotRequest:
    return csi_pb2.CreateVolumeGroupSnapshotRequest(
        name=name, source_volume_ids=[v.volume_id for v in volumes]
    )


def lasts_of(vg: LoopVolumeGroup, volumes: list[csi_pb2.Volume], snapshots: list[str]) -> list[int]:
    """Each volume's newest number in its snapshot, in the volumes' order."""
    by_source = {}
    for snapshot_id in snapshots:
        source = next(v.volume_id for v in volumes if source_lv(v.volume_id, snapshot_id, vg))
        by_source[source] = last_number(vg, snapshot_id)
    return [by_source[v.volume_id] for v in volumes]


def source_lv(volume_id: str, snapshot_id: str, vg: LoopVolumeGroup) -> bool:
    """Whether the snapshot's LV has the volume's LV as its origin."""
    lv = snapshot_id.rsplit(":", 1)[-1]
    origin = subprocess.run(
        ["lvs", "--noheadings", "-o", "origin", f"{vg.name}/{lv}"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    return origin == volume_id.rsplit(":", 1)[-1]


def test_a_group_snapshot_is_one_instant(csi: CsiClient, vg: LoopVolumeGroup, name: str) -> None:
    volumes = volumes_of(csi, name)
    groups = []
    with Writer([device(vg, v.volume_id) for v in volumes]).running() as writer:
        for round_ in range(3):
            writer.wait_for(writer.count + 30)  # it writes between the groups
            request = group_request(f"{name}-g{round_}", volumes)
            groups.append(csi.group_controller.CreateVolumeGroupSnapshot(request).group_snapshot)
    for group in groups:
        assert group.ready_to_use and len(group.snapshots) == VOLUMES
        assert all(s.group_snapshot_id == group.group_snapshot_id for s in group.snapshots)
        lasts = lasts_of(vg, volumes, [s.snapshot_id for s in group.snapshots])
        assert max(lasts) >= 30 and one_instant(lasts), lasts
    for group in groups:
        csi.group_controller.DeleteVolumeGroupSnapshot(
            csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id)
        )
    for volume in volumes:
        csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))


def test_snapshots_taken_one_by_one_are_not_one_instant(
    csi: CsiClient, vg: LoopVolumeGroup, name: str
) -> None:
    volumes = volumes_of(csi, name)
    seen = []
    with Writer([device(vg, v.volume_id) for v in volumes]).running() as writer:
        for round_ in range(3):
            writer.wait_for(writer.count + 30)
            snapshots = [
                csi.controller.CreateSnapshot(
                    csi_pb2.CreateSnapshotRequest(
                        name=f"{name}-{round_}-{i}", source_volume_id=v.volume_id
                    )
                ).snapshot.snapshot_id
                for i, v in enumerate(volumes)
            ]
            seen.append((snapshots, lasts_of(vg, volumes, snapshots)))
            if not one_instant(seen[-1][1]):
                break
    assert not one_instant(seen[-1][1]), [lasts for _, lasts in seen]
    for snapshots, _ in seen:
        for snapshot_id in snapshots:
            csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id))
    for volume in volumes:
        csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))


def test_a_mounted_member_snapshots_clean_and_restores(
    csi: CsiClient, vg: LoopVolumeGroup, name: str, tmp_path: Path
) -> None:
    """A mounted filesystem is frozen at the instant: its snapshot mounts
    without replaying a journal, and a member restores like any snapshot."""
    volumes = volumes_of(csi, name)
    first = device(vg, volumes[0].volume_id)
    subprocess.run(["mkfs.ext4", "-q", first], check=True)
    mount = tmp_path / "mounted"
    mount.mkdir()
    subprocess.run(["mount", first, str(mount)], check=True)
    try:
        (mount / "before").write_text("written before the group")
        group = csi.group_controller.CreateVolumeGroupSnapshot(
            group_request(f"{name}-g", volumes)
        ).group_snapshot
        (mount / "after").write_text("written after the group")
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    member = next(s for s in group.snapshots if s.source_volume_id == volumes[0].volume_id)
    restored = csi.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=f"{name}-restored",
            capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MiB),
            volume_capabilities=[block_capability()],
            parameters={"deviceClass": "thin"},
            volume_content_source=csi_pb2.VolumeContentSource(
                snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=member.snapshot_id)
            ),
        )
    ).volume
    copy = device(vg, restored.volume_id)
    check = subprocess.run(["e2fsck", "-n", copy], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr  # clean: it was frozen
    subprocess.run(["mount", "-o", "ro,noload", copy, str(mount)], check=True)
    try:
        assert (mount / "before").read_text() == "written before the group"
        assert not (mount / "after").exists()
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=restored.volume_id))
    csi.group_controller.DeleteVolumeGroupSnapshot(
        csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id)
    )
    for volume in volumes:
        csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))


def test_a_group_is_made_once_found_again_and_deleted_whole(
    csi: CsiClient, vg: LoopVolumeGroup, name: str
) -> None:
    volumes = volumes_of(csi, name)
    groups = csi.group_controller
    assert [c.rpc.type for c in groups.GroupControllerGetCapabilities(
        csi_pb2.GroupControllerGetCapabilitiesRequest()).capabilities] == [
        csi_pb2.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT
    ]  # fmt: skip
    group = groups.CreateVolumeGroupSnapshot(group_request(f"{name}-g", volumes)).group_snapshot
    again = groups.CreateVolumeGroupSnapshot(group_request(f"{name}-g", volumes[::-1]))
    assert again.group_snapshot.group_snapshot_id == group.group_snapshot_id
    ids = sorted(s.snapshot_id for s in group.snapshots)
    assert sorted(s.snapshot_id for s in again.group_snapshot.snapshots) == ids
    # Each member is an ordinary snapshot too.
    for snapshot_id in ids:
        found = csi.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=snapshot_id))
        assert found.snapshot.ready_to_use
    got = groups.GetVolumeGroupSnapshot(
        csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id)
    ).group_snapshot
    assert sorted(s.snapshot_id for s in got.snapshots) == ids and got.ready_to_use
    expect_error(Code.ALREADY_EXISTS, groups.CreateVolumeGroupSnapshot,
                 group_request(f"{name}-g", volumes[:2]), "already exists")  # fmt: skip
    expect_error(Code.INVALID_ARGUMENT, groups.GetVolumeGroupSnapshot,
                 csi_pb2.GetVolumeGroupSnapshotRequest(
                     group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids[:2]),
                 "do not match")  # fmt: skip
    expect_error(Code.INVALID_ARGUMENT, groups.DeleteVolumeGroupSnapshot,
                 csi_pb2.DeleteVolumeGroupSnapshotRequest(
                     group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids[1:]),
                 "do not match")  # fmt: skip
    groups.DeleteVolumeGroupSnapshot(
        csi_pb2.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids
        )
    )
    for snapshot_id in ids:
        expect_error(Code.NOT_FOUND, csi.controller.GetSnapshot,
                     csi_pb2.GetSnapshotRequest(snapshot_id=snapshot_id), "does not exist")  # fmt: skip
    expect_error(Code.NOT_FOUND, groups.GetVolumeGroupSnapshot,
                 csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id),
                 "does not exist")  # fmt: skip
    groups.DeleteVolumeGroupSnapshot(  # gone already: still OK
        csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id)
    )
    for volume in volumes:
        csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))


def test_what_cannot_be_one_instant_is_refused_before_anything_is_made(
    csi: CsiClient, vg: LoopVolumeGroup, name: str
) -> None:
    groups = csi.group_controller
    thin = volumes_of(csi, name)[:2]
    thick = create(csi, f"{name}-thick", 8 * MiB, "thick", capability=block_capability())
    before = lvs(vg)
    expect_error(Code.FAILED_PRECONDITION, groups.CreateVolumeGroupSnapshot,
                 group_request(f"{name}-mixed", [*thin, thick]), "one device class")  # fmt: skip
    expect_error(Code.FAILED_PRECONDITION, groups.CreateVolumeGroupSnapshot,
                 group_request(f"{name}-thick", [thick]), "thin device class")  # fmt: skip
    elsewhere = csi_pb2.Volume(volume_id=f"other-node:thin:{thin[0].volume_id.rsplit(':')[-1]}")
    expect_error(Code.FAILED_PRECONDITION, groups.CreateVolumeGroupSnapshot,
                 group_request(f"{name}-nodes", [thin[1], elsewhere]), "one node",
                 "other-node")  # fmt: skip
    expect_error(Code.INVALID_ARGUMENT, groups.CreateVolumeGroupSnapshot,
                 group_request(f"{name}-twice", [thin[0], thin[0]]), "more than once")  # fmt: skip
    expect_error(Code.INVALID_ARGUMENT, groups.CreateVolumeGroupSnapshot,
                 group_request("", thin), "name is required")  # fmt: skip
    expect_error(Code.INVALID_ARGUMENT, groups.CreateVolumeGroupSnapshot,
                 csi_pb2.CreateVolumeGroupSnapshotRequest(name=f"{name}-none"),
                 "source_volume_ids is required")  # fmt: skip
    unknown = group_request(f"{name}-params", thin)
    unknown.parameters["fsfreeze"] = "no"
    expect_error(Code.INVALID_ARGUMENT, groups.CreateVolumeGroupSnapshot, unknown,
                 "'fsfreeze'")  # fmt: skip
    missing = csi_pb2.Volume(volume_id=f"{thin[0].volume_id.rsplit(':', 1)[0]}:csi-nothing-here")
    expect_error(Code.NOT_FOUND, groups.CreateVolumeGroupSnapshot,
                 group_request(f"{name}-missing", [thin[0], missing]), "does not exist")  # fmt: skip
    assert lvs(vg) == before  # nothing made, nothing left suspended
    assert not suspended(vg)
    for volume in [*thin, thick]:
        csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))


def lvs(vg: LoopVolumeGroup) -> list[str]:
    done = subprocess.run(["lvs", "--noheadings", "-o", "lv_name", vg.name],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return sorted(done.stdout.split())


def suspended(vg: LoopVolumeGroup) -> list[str]:
    done = subprocess.run(
        ["lvs", "--noheadings", "-o", "lv_name", "-S", "lv_suspended=suspended", vg.name],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.split()


def test_a_group_cut_short_by_a_crash_is_undone_at_start(
    csi: CsiClient, vg: LoopVolumeGroup, name: str, workdir: Path
) -> None:
    """What a kill in the middle of a group leaves: a source still suspended,
    a member made (MAKING), the others not. A plugin starting on the VG
    resumes the source and removes the member; the retried create cuts the
    whole group anew."""
    volumes = volumes_of(csi, name)[:2]
    held = volumes[0].volume_id.rsplit(":", 1)[-1]
    group_id = GroupId.build("node-under-test", "thin", f"{name}-g")
    member = lv_name_for(Kind.SNAPSHOT, member_name(f"{name}-g", held))
    subprocess.run(["lvcreate", "-q", "-s", "-n", member, "-ky", "--addtag", MAKING_TAG,
                    "--addtag", "csi-lvm/driver=lvm.csi-lvm.io", "--addtag", "csi-lvm/class=thin",
                    "--addtag", f"csi-lvm/group={group_id.key}", f"{vg.name}/{held}"],
                   check=True)  # fmt: skip
    subprocess.run(["dmsetup", "suspend", dm_name(vg.name, held)], check=True)
    assert suspended(vg) == [held]
    plugin = driver_of_its_own(workdir, name, vg)
    try:
        plugin.start()
    finally:
        plugin.stop()
    assert suspended(vg) == []
    assert member not in lvs(vg)
    group = csi.group_controller.CreateVolumeGroupSnapshot(
        group_request(f"{name}-g", volumes)
    ).group_snapshot
    assert group.group_snapshot_id == str(group_id) and len(group.snapshots) == 2
    assert ObjectId.parse(group.snapshots[0].snapshot_id) is not None
    csi.group_controller.DeleteVolumeGroupSnapshot(
        csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id)
    )
    for volume in volumes:
        csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
