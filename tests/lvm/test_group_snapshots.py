"""Group snapshots on real LVM: one instant for several mounted volumes, the
limits, and the repair of a group cut short by a crash.

The instant is checked with a writer that appends sequence numbers to a file
on each of three mounted volumes in turn (0 to volume 0, 1 to volume 1, 2 to
volume 2, 3 to volume 0, ...), each write synchronous before the next
begins. Snapshots of one instant hold a prefix of that sequence: if the
newest number in any of them is ``top``, each volume holds exactly its own
numbers up to ``top``. The same check on snapshots taken one by one fails
(the writer goes on between them), which shows the check can fail.

Holding a mounted filesystem for the instant needs a kernel that lets LVM
suspend a frozen filesystem: on Linux 6.1 the group is refused, on 6.12 it
is cut (``make lvm-tests`` runs this file on both).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from csi_lvm.csi import csi_pb2
from csi_lvm.ids import GroupId, Kind, ObjectId, Tag, encode_tags, lv_name_for, member_name
from csi_lvm.lifecycle import MAKING_TAG
from csi_lvm.lvm.names import dm_name
from tests.lvm.helpers import (
    block_capability,
    create,
    driver_of_its_own,
    expect_error,
)
from tests.testbed import CsiClient, LoopVolumeGroup

Code = grpc.StatusCode
MiB = 1 << 20
RECORD = 8
VOLUMES = 3
SEQUENCE = "sequence"


def kernel() -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", platform.release())
    assert found is not None, platform.release()
    return int(found[1]), int(found[2])


# Whether LVM may suspend (and so snapshot) a frozen filesystem here.
SNAPSHOTS_FROZEN = kernel() >= (6, 12)


def device(vg: LoopVolumeGroup, object_id: str) -> str:
    return f"/dev/mapper/{dm_name(vg.name, object_id.rsplit(':', 1)[-1])}"


class Writer:
    """Appends 0, 1, 2, ... to a file on each mount in turn, one synchronous
    write each."""

    def __init__(self, mounts: list[Path]) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_DSYNC
        self.fds = [os.open(m / SEQUENCE, flags, 0o644) for m in mounts]
        self.count = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._write, daemon=True)

    def _write(self) -> None:
        while not self.stop.is_set():
            number = self.count
            volume, slot = number % len(self.fds), number // len(self.fds)
            # number + 1: a hole of the file reads 0, "nothing here".
            os.pwrite(self.fds[volume], (number + 1).to_bytes(RECORD, "little"), slot * RECORD)
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


def last_number(vg: LoopVolumeGroup, snapshot_id: str, where: Path) -> int:
    """The newest number the snapshot's file holds (-1: none)."""
    lv = f"{vg.name}/{snapshot_id.rsplit(':', 1)[-1]}"
    subprocess.run(["lvchange", "-q", "-ay", "-K", lv], check=True)
    where.mkdir(exist_ok=True)
    try:
        path = device(vg, snapshot_id)
        # An xfs snapshot has its origin's UUID, which is mounted too.
        probed = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", path],
                                capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        options = "ro,nouuid" if probed == "xfs" else "ro"
        subprocess.run(["mount", "-o", options, path, str(where)], check=True)
        try:
            data = (where / SEQUENCE).read_bytes()
        finally:
            subprocess.run(["umount", str(where)], check=True)
    finally:
        subprocess.run(["lvchange", "-q", "-an", lv], check=True)
    last = -1
    for slot in range(len(data) // RECORD):
        number = int.from_bytes(data[slot * RECORD : (slot + 1) * RECORD], "little") - 1
        if number < 0:
            break
        last = number
    return last


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


def volumes_of(csi: CsiClient, name: str, count: int = VOLUMES) -> list[csi_pb2.Volume]:
    """Thin volumes large enough for xfs (300 MiB at least); they map only
    what their filesystems write."""
    return [
        create(csi, f"{name}-{i}", 320 * MiB, capability=block_capability()) for i in range(count)
    ]


@contextmanager
def mounted(
    vg: LoopVolumeGroup,
    volumes: list[csi_pb2.Volume],
    where: Path,
    filesystems: tuple[str, ...] = ("ext4", "xfs"),
) -> Iterator[list[Path]]:
    """The volumes with a filesystem each (ext4, then xfs, ...), mounted."""
    points = []
    try:
        for i, volume in enumerate(volumes):
            path = device(vg, volume.volume_id)
            fs_type = filesystems[i % len(filesystems)]
            subprocess.run([f"mkfs.{fs_type}", "-q", *(["-f"] if fs_type == "xfs" else []), path],
                           check=True, capture_output=True)  # fmt: skip
            point = where / f"volume-{i}"
            point.mkdir()
            subprocess.run(["mount", path, str(point)], check=True)
            points.append(point)
        yield points
    finally:
        for point in points:
            subprocess.run(["umount", str(point)], check=True)


def group_request(
    name: str, volumes: list[csi_pb2.Volume]
) -> csi_pb2.CreateVolumeGroupSnapshotRequest:
    return csi_pb2.CreateVolumeGroupSnapshotRequest(
        name=name, source_volume_ids=[v.volume_id for v in volumes]
    )


def lasts_of(
    vg: LoopVolumeGroup, volumes: list[csi_pb2.Volume], snapshots: list[csi_pb2.Snapshot],
    where: Path,
) -> list[int]:  # fmt: skip
    """Each volume's newest number in its snapshot, in the volumes' order."""
    by_source = {s.source_volume_id: last_number(vg, s.snapshot_id, where) for s in snapshots}
    return [by_source[v.volume_id] for v in volumes]


def delete_all(csi: CsiClient, volumes: list[csi_pb2.Volume], *groups: str) -> None:
    for group in groups:
        csi.group_controller.DeleteVolumeGroupSnapshot(
            csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group)
        )
    for volume in volumes:
        csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))


def test_a_group_snapshot_of_mounted_volumes_is_one_instant(
    csi: CsiClient, vg: LoopVolumeGroup, name: str, tmp_path: Path
) -> None:
    volumes = volumes_of(csi, name)
    groups = []
    with mounted(vg, volumes, tmp_path) as points, Writer(points).running() as writer:
        for round_ in range(3):
            writer.wait_for(writer.count + 30)  # it writes between the groups
            request = group_request(f"{name}-g{round_}", volumes)
            if not SNAPSHOTS_FROZEN:
                before = lvs(vg)
                expect_error(Code.FAILED_PRECONDITION, csi.group_controller.CreateVolumeGroupSnapshot,
                             request, "frozen filesystem", "6.12")  # fmt: skip
                writer.wait_for(writer.count + 10)  # nothing was left frozen
                assert lvs(vg) == before  # nor made
                break
            groups.append(csi.group_controller.CreateVolumeGroupSnapshot(request).group_snapshot)
    for group in groups:
        assert group.ready_to_use and len(group.snapshots) == VOLUMES
        assert all(s.group_snapshot_id == group.group_snapshot_id for s in group.snapshots)
        lasts = lasts_of(vg, volumes, list(group.snapshots), tmp_path / "snapshot")
        assert max(lasts) >= 30 and one_instant(lasts), lasts
    delete_all(csi, volumes, *(g.group_snapshot_id for g in groups))


def test_snapshots_taken_one_by_one_are_not_one_instant(
    csi: CsiClient, vg: LoopVolumeGroup, name: str, tmp_path: Path
) -> None:
    volumes = volumes_of(csi, name)
    seen: list[tuple[list[csi_pb2.Snapshot], list[int]]] = []
    with mounted(vg, volumes, tmp_path) as points, Writer(points).running() as writer:
        for round_ in range(3):
            writer.wait_for(writer.count + 30)
            snapshots = [
                csi.controller.CreateSnapshot(
                    csi_pb2.CreateSnapshotRequest(
                        name=f"{name}-{round_}-{i}", source_volume_id=v.volume_id
                    )
                ).snapshot
                for i, v in enumerate(volumes)
            ]
            seen.append((snapshots, lasts_of(vg, volumes, snapshots, tmp_path / "snapshot")))
            if not one_instant(seen[-1][1]):
                break
    assert not one_instant(seen[-1][1]), [lasts for _, lasts in seen]
    for snapshots, _ in seen:
        for snapshot in snapshots:
            csi.controller.DeleteSnapshot(
                csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id)
            )
    delete_all(csi, volumes)


def test_a_member_restores_like_any_snapshot_and_its_filesystem_is_clean(
    csi: CsiClient, vg: LoopVolumeGroup, name: str, tmp_path: Path
) -> None:
    """A frozen filesystem's snapshot needs no journal replay; a member is a
    snapshot like any other. Where this kernel cannot snapshot a frozen
    filesystem, the group is refused and the filesystems go on."""
    volumes = volumes_of(csi, name, 2)
    with mounted(vg, volumes, tmp_path) as points:
        (points[0] / "before").write_text("written before the group")
        request = group_request(f"{name}-g", volumes)
        if not SNAPSHOTS_FROZEN:
            expect_error(Code.FAILED_PRECONDITION, csi.group_controller.CreateVolumeGroupSnapshot,
                         request, "frozen filesystem")  # fmt: skip
            (points[0] / "after").write_text("the filesystem was thawed")
            group = None
        else:
            group = csi.group_controller.CreateVolumeGroupSnapshot(request).group_snapshot
            (points[0] / "after").write_text("written after the group")
    if group is None:
        delete_all(csi, volumes)
        return
    member = next(s for s in group.snapshots if s.source_volume_id == volumes[0].volume_id)
    restored = csi.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=f"{name}-restored",
            capacity_range=csi_pb2.CapacityRange(required_bytes=320 * MiB),
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
    view = tmp_path / "restored"
    view.mkdir()
    subprocess.run(["mount", "-o", "ro", copy, str(view)], check=True)
    try:
        assert (view / "before").read_text() == "written before the group"
        assert not (view / "after").exists()
    finally:
        subprocess.run(["umount", str(view)], check=True)
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=restored.volume_id))
    delete_all(csi, volumes, group.group_snapshot_id)


def test_a_group_is_made_once_found_again_and_deleted_whole(
    csi: CsiClient, vg: LoopVolumeGroup, name: str
) -> None:
    volumes = volumes_of(csi, name)  # none in use: nothing to hold, on any kernel
    groups = csi.group_controller
    assert [c.rpc.type for c in groups.GroupControllerGetCapabilities(
        csi_pb2.GroupControllerGetCapabilitiesRequest()).capabilities] == [
        csi_pb2.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT
    ]  # fmt: skip
    group = groups.CreateVolumeGroupSnapshot(group_request(f"{name}-g", volumes)).group_snapshot
    again = groups.CreateVolumeGroupSnapshot(group_request(f"{name}-g", volumes[::-1]))
    assert again.group_snapshot.group_snapshot_id == group.group_snapshot_id
    ids = sorted(s.snapshot_id for s in group.snapshots)
    assert len(ids) == VOLUMES
    assert sorted(s.snapshot_id for s in again.group_snapshot.snapshots) == ids
    for snapshot_id in ids:  # each member is an ordinary snapshot too
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
    delete_all(csi, volumes, group.group_snapshot_id)  # the group gone already: still OK


def test_what_cannot_be_one_instant_is_refused_before_anything_is_made(
    csi: CsiClient, vg: LoopVolumeGroup, name: str
) -> None:
    groups = csi.group_controller
    thin = volumes_of(csi, name, 2)
    thick = create(csi, f"{name}-thick", 8 * MiB, "thick", capability=block_capability())
    before = lvs(vg)
    expect_error(Code.FAILED_PRECONDITION, groups.CreateVolumeGroupSnapshot,
                 group_request(f"{name}-mixed", [*thin, thick]), "one device class")  # fmt: skip
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
    # A raw block volume in use: its writes cannot be held.
    held_open = os.open(device(vg, thin[1].volume_id), os.O_RDWR)
    try:
        expect_error(Code.FAILED_PRECONDITION, groups.CreateVolumeGroupSnapshot,
                     group_request(f"{name}-open", thin), "in use", "cannot be held")  # fmt: skip
    finally:
        os.close(held_open)
    assert lvs(vg) == before  # nothing made
    delete_all(csi, [*thin, thick])


def test_a_thick_group_is_copied_from_one_instant(
    csi: CsiClient, vg: LoopVolumeGroup, name: str, tmp_path: Path
) -> None:
    """Thick members are copies: their temporary views are cut while the
    writes are held, and the copies read them afterwards. Idle volumes need
    no hold, on any kernel."""
    volumes = [
        create(csi, f"{name}-{i}", 32 * MiB, "thick", capability=block_capability())
        for i in range(2)
    ]
    groups = []
    with (
        mounted(vg, volumes, tmp_path, ("ext4",)) as points,
        Writer(points).running() as writer,
    ):
        writer.wait_for(30)
        request = group_request(f"{name}-live", volumes)
        if SNAPSHOTS_FROZEN:
            groups.append(csi.group_controller.CreateVolumeGroupSnapshot(request).group_snapshot)
        else:
            before = lvs(vg)
            expect_error(Code.FAILED_PRECONDITION, csi.group_controller.CreateVolumeGroupSnapshot,
                         request, "frozen filesystem")  # fmt: skip
            assert lvs(vg) == before  # no copy target and no view left
        writer.wait_for(writer.count + 10)  # nothing was left frozen
    written = writer.count  # stopped, and the filesystems unmounted
    idle = csi.group_controller.CreateVolumeGroupSnapshot(group_request(f"{name}-idle", volumes))
    groups.append(idle.group_snapshot)
    assert not [lv for lv in lvs(vg) if lv.endswith(".view")]  # the views are gone
    for group in groups:
        assert group.ready_to_use and len(group.snapshots) == 2
        lasts = lasts_of(vg, volumes, list(group.snapshots), tmp_path / "snapshot")
        assert max(lasts) >= 29 and one_instant(lasts), lasts
    # The idle group holds everything the writer wrote.
    assert max(lasts_of(vg, volumes, list(idle.group_snapshot.snapshots), tmp_path / "s")) == (
        written - 1
    )
    delete_all(csi, volumes, *(g.group_snapshot_id for g in groups))


def lvs(vg: LoopVolumeGroup) -> list[str]:
    done = subprocess.run(["lvs", "--noheadings", "-o", "lv_name", vg.name],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return sorted(done.stdout.split())


def frozen(point: Path) -> bool:
    """Whether the filesystem at ``point`` is frozen (thawing it if so)."""
    return subprocess.run(["fsfreeze", "-u", str(point)], capture_output=True).returncode == 0


def test_a_group_cut_short_by_a_crash_is_undone_at_start(
    csi: CsiClient, vg: LoopVolumeGroup, name: str, workdir: Path, tmp_path: Path
) -> None:
    """What a kill in the middle of a group leaves: a source's filesystem
    frozen, a member made (MAKING), the others not. A plugin starting on the
    VG thaws the filesystem and removes the member; the retried create cuts
    the whole group anew."""
    volumes = volumes_of(csi, name, 2)
    source = volumes[0].volume_id.rsplit(":", 1)[-1]
    group_id = GroupId.build("node-under-test", "thin", f"{name}-g")
    member = lv_name_for(Kind.SNAPSHOT, member_name(f"{name}-g", source))
    with mounted(vg, volumes[:1], tmp_path) as points:
        tags = encode_tags({Tag.DRIVER: "lvm.csi-lvm.io", Tag.NAME: member_name(f"{name}-g", source),
                            Tag.CLASS: "thin", Tag.SOURCE: source, Tag.GROUP: group_id.key})  # fmt: skip
        subprocess.run(["lvcreate", "-q", "-s", "-n", member, "-ky", "--addtag", MAKING_TAG,
                        *(f"--addtag={tag}" for tag in tags), f"{vg.name}/{source}"],
                       check=True)  # fmt: skip
        subprocess.run(["fsfreeze", "-f", str(points[0])], check=True)
        plugin = driver_of_its_own(workdir, name, vg)
        try:
            plugin.start()
        finally:
            plugin.stop()
        assert not frozen(points[0])
        assert member not in lvs(vg)
    group = csi.group_controller.CreateVolumeGroupSnapshot(
        group_request(f"{name}-g", volumes)
    ).group_snapshot
    assert group.group_snapshot_id == str(group_id) and len(group.snapshots) == 2
    assert all(ObjectId.parse(s.snapshot_id) is not None for s in group.snapshots)
    delete_all(csi, volumes, group.group_snapshot_id)
