"""Encrypted classes on real LVM and dm-crypt: LUKS2 under every volume of
the class, a key per volume wrapped by the node-stage Secret's key, data at
rest never in the clear, crypto-erase on delete, KEK rotation."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_lvm import crypt
from csi_lvm.admin import node_status, status_text
from csi_lvm.config import load_config
from csi_lvm.csi import csi_pb2
from csi_lvm.wiring import Options, build
from tests.lvm.helpers import (
    MiB,
    block_capability,
    create,
    create_request,
    delete,
    driver_of_its_own,
    expect_error,
    is_mounted,
    mount_capability,
    publish,
    unpublish,
)
from tests.testbed import (
    DRIVER_NAME,
    NODE_ID,
    CsiClient,
    Driver,
    LoopVolumeGroup,
    raw_holds,
    sh,
)

Code = grpc.StatusCode
KEY = "k" * 8 + "0123456789abcdef0123456789abcdef"  # a test's KEK: 40 bytes
NEW_KEY = "n" * 8 + "fedcba9876543210fedcba9876543210"
SECRETS = {crypt.KEY_FIELD: KEY}
# Written into the volumes; must never be found on the raw LV.
PLAINTEXT = b"csi-lvm plaintext marker: the quick brown fox " * 90
ENCRYPTED_CLASSES = (
    "  - name: vault\n    volumeGroup: {vg}\n    thinPool: {pool}\n    overprovisionRatio: 10\n"
    "    encryption: luks2\n"
    "  - name: vault-thick\n    volumeGroup: {vg}\n    encryption: luks2\n"
)


@pytest.fixture(scope="module")
def vault(workdir: Path, vg: LoopVolumeGroup) -> Iterator[tuple[CsiClient, Driver]]:
    """A driver of its own whose config has an encrypted thin and thick class."""
    driver = driver_of_its_own(workdir, "vault", vg)
    with driver.config.open("a") as text:
        text.write(ENCRYPTED_CLASSES.format(vg=vg.name, pool=vg.pool))
    client = driver.start()
    try:
        yield client, driver
    finally:
        client.close()
        assert driver.stop() == 0
        log = driver.log_path.read_bytes()
        for secret in (KEY, NEW_KEY):
            assert secret.encode() not in log, "a key reached the driver's log"


@pytest.fixture
def csi(vault: tuple[CsiClient, Driver]) -> CsiClient:
    return vault[0]


def stage(
    csi: CsiClient,
    volume_id: str,
    staging: Path,
    capability: csi_pb2.VolumeCapability,
    secrets: dict[str, str] | None = None,
) -> None:
    staging.mkdir(exist_ok=True)
    csi.node.NodeStageVolume(stage_request(volume_id, staging, capability, secrets))


def stage_request(
    volume_id: str,
    staging: Path,
    capability: csi_pb2.VolumeCapability,
    secrets: dict[str, str] | None = None,
) -> csi_pb2.NodeStageVolumeRequest:
    return csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id,
        staging_target_path=str(staging),
        volume_capability=capability,
        secrets=SECRETS if secrets is None else secrets,
    )


def unstage(csi: CsiClient, volume_id: str, staging: str) -> None:
    """Unstage, which closes the volume's mapping."""
    csi.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging)
    )
    assert not is_mounted(staging)
    assert not crypt.is_open(mapping_of(volume_id)), "unstage left the mapping open"


def lv_device(vg: LoopVolumeGroup, volume_id: str) -> str:
    return f"/dev/{vg.name}/{volume_id.rsplit(':', 1)[-1]}"


def mapping_of(volume_id: str) -> str:
    device_class, lv_name = volume_id.split(":")[1:]
    return crypt.mapping_name(device_class, lv_name)


def fs_bytes(path: Path) -> int:
    info = os.statvfs(path)
    return info.f_blocks * info.f_frsize


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


@pytest.mark.parametrize("device_class", ["vault", "vault-thick"])
def test_an_encrypted_volume_keeps_only_ciphertext_on_its_lv(
    csi: CsiClient, workdir: Path, vg: LoopVolumeGroup, device_class: str
) -> None:
    volume = create(csi, f"enc-{device_class}", 64 * MiB, device_class)
    staging = workdir / f"enc-{device_class}"
    stage(csi, volume.volume_id, staging, mount_capability("ext4"))
    mapping = mapping_of(volume.volume_id)
    device = lv_device(vg, volume.volume_id)
    assert os.path.realpath(crypt.mapping_path(mapping)) == os.path.realpath(
        sh("findmnt", "-n", "-o", "SOURCE", str(staging)).strip()
    ), "the filesystem is not on the encrypted mapping"
    assert sh("blkid", "-p", "-o", "value", "-s", "TYPE", device).strip() == "crypto_LUKS"
    write_file(staging / "secret.txt", PLAINTEXT)
    sh("sync")
    assert raw_holds(crypt.mapping_path(mapping), PLAINTEXT), "the check cannot see the data"
    assert not raw_holds(device, PLAINTEXT), "plaintext reached the LV"
    # A second stage is a repeat; unstage closes the mapping; a stage opens it again.
    stage(csi, volume.volume_id, staging, mount_capability("ext4"))
    unstage(csi, volume.volume_id, str(staging))
    assert not crypt.is_open(mapping)
    stage(csi, volume.volume_id, staging, mount_capability("ext4"))
    assert (staging / "secret.txt").read_bytes() == PLAINTEXT
    unstage(csi, volume.volume_id, str(staging))
    delete(csi, volume.volume_id)


def test_a_block_volume_publishes_the_mapping_never_the_lv(
    csi: CsiClient, workdir: Path, vg: LoopVolumeGroup
) -> None:
    volume = create(csi, "enc-block", 32 * MiB, "vault-thick")
    staging, target = workdir / "enc-block-staging", str(workdir / "enc-block-target")
    expect_error(
        Code.FAILED_PRECONDITION,
        lambda _: publish(csi, volume.volume_id, str(staging), target, block_capability()),
        None,
        "is encrypted and not open",
        "NodeStageVolume",
    )
    stage(csi, volume.volume_id, staging, block_capability())
    publish(csi, volume.volume_id, str(staging), target, block_capability())
    mapping = crypt.mapping_path(mapping_of(volume.volume_id))
    assert os.stat(target).st_rdev == os.stat(mapping).st_rdev
    with open(target, "r+b") as block:
        block.write(PLAINTEXT)
        block.flush()
        os.fsync(block.fileno())
    assert not raw_holds(lv_device(vg, volume.volume_id), PLAINTEXT)
    # The mapping stays open while published: unstage first is refused.
    expect_error(
        Code.FAILED_PRECONDITION,
        csi.node.NodeUnstageVolume,
        csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=str(staging)
        ),
        "still published",
    )
    unpublish(csi, volume.volume_id, target)
    unstage(csi, volume.volume_id, str(staging))
    assert not crypt.is_open(mapping_of(volume.volume_id))
    delete(csi, volume.volume_id)


# xfs on thin (a copy's filesystem gets a UUID of its own to be mounted
# beside its source); ext4 on thick, where each copy writes all of the LV.
@pytest.mark.parametrize(
    ("device_class", "fs_type", "size"),
    [("vault", "xfs", 320 * MiB), ("vault-thick", "ext4", 64 * MiB)],
)
def test_snapshots_restores_and_clones_open_with_the_sources_key_and_grow(
    csi: CsiClient, workdir: Path, device_class: str, fs_type: str, size: int
) -> None:
    source = create(csi, f"enc-src-{device_class}", size, device_class)
    staged = workdir / f"enc-src-{device_class}"
    stage(csi, source.volume_id, staged, mount_capability(fs_type))
    write_file(staged / "data", PLAINTEXT)
    snapshot = csi.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(
            source_volume_id=source.volume_id, name=f"enc-snap-{device_class}"
        )
    ).snapshot
    restored = create(
        csi, f"enc-restored-{device_class}", size + 80 * MiB, device_class,
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot.snapshot_id)
        ),
    )  # fmt: skip
    clone = create(
        csi, f"enc-clone-{device_class}", size, device_class,
        volume_content_source=csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=source.volume_id)
        ),
    )  # fmt: skip
    for copy in (restored, clone):
        path = workdir / f"enc-copy-{copy.volume_id.rsplit(':', 1)[-1]}"
        # Side by side with its source (xfs: a UUID of its own), same key.
        stage(csi, copy.volume_id, path, mount_capability(fs_type))
        assert (path / "data").read_bytes() == PLAINTEXT
        if copy is restored:
            grown = fs_bytes(path) - fs_bytes(staged)
            assert grown >= 70 * MiB, "the restore's filesystem did not grow"
        if copy is clone and fs_type == "xfs":
            assert sh(
                "blkid", "-s", "UUID", "-o", "value", crypt.mapping_path(mapping_of(copy.volume_id))
            ) != sh(
                "blkid",
                "-s",
                "UUID",
                "-o",
                "value",
                crypt.mapping_path(mapping_of(source.volume_id)),
            )
        unstage(csi, copy.volume_id, str(path))
        delete(csi, copy.volume_id)
    # Online expansion: the LV, the mapping, then the filesystem.
    before = fs_bytes(staged)
    csi.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(
            volume_id=source.volume_id,
            volume_path=str(staged),
            staging_target_path=str(staged),
            capacity_range=csi_pb2.CapacityRange(required_bytes=size + 160 * MiB),
        )
    )
    mapping_bytes = int(
        sh("blockdev", "--getsize64", crypt.mapping_path(mapping_of(source.volume_id)))
    )
    assert mapping_bytes == size + 160 * MiB - crypt.HEADER_BYTES
    assert fs_bytes(staged) >= before + 140 * MiB, "the filesystem did not grow with the mapping"
    unstage(csi, source.volume_id, str(staged))
    csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id))
    delete(csi, source.volume_id)


def pe_offset(vg: LoopVolumeGroup, lv_name: str) -> tuple[str, int]:
    """The PV and byte offset of a linear LV's first extent."""
    line = sh(
        "lvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "seg_pe_ranges,vg_extent_size",
        f"{vg.name}/{lv_name}",
    ).split()  # fmt: skip
    pv, first = line[0].split(":")[0], int(line[0].split(":")[1].split("-")[0])
    extent = int(line[1])
    start = int(sh("pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", pv))
    return pv, start + first * extent


def test_delete_destroys_the_keys_so_old_blocks_are_unreadable(
    csi: CsiClient, workdir: Path, vg: LoopVolumeGroup
) -> None:
    volume = create(csi, "enc-erase", 32 * MiB, "vault-thick")
    staging = workdir / "enc-erase"
    stage(csi, volume.volume_id, staging, mount_capability("ext4"))
    write_file(staging / "data", PLAINTEXT)
    unstage(csi, volume.volume_id, str(staging))
    pv, offset = pe_offset(vg, volume.volume_id.rsplit(":", 1)[-1])

    def header_opens() -> bool:
        """Whether the LUKS header at the extent, copied out, opens with the key."""
        copy = workdir / "enc-erase-header.img"
        sh("blockdev", "--flushbufs", pv)  # the erase went through the LV, not the PV
        with open(pv, "rb") as raw, open(copy, "wb") as out:
            raw.seek(offset)
            out.write(raw.read(crypt.HEADER_BYTES))
        done = subprocess.run(
            ["cryptsetup", "open", "--test-passphrase", "--key-file", "-", str(copy)],
            input=KEY.encode(), capture_output=True, check=False,
        )  # fmt: skip
        copy.unlink()
        return done.returncode == 0

    assert header_opens(), "the check cannot open the header it reads"
    delete(csi, volume.volume_id)
    assert not header_opens(), "the deleted volume's keyslots are still on the disk"


def test_bad_keys_and_damaged_headers_are_refused_without_harm(
    csi: CsiClient, workdir: Path, vg: LoopVolumeGroup
) -> None:
    volume = create(csi, "enc-bad", 32 * MiB, "vault")
    staging = workdir / "enc-bad"
    staging.mkdir()
    capability = mount_capability("ext4")

    def refused(code: grpc.StatusCode, secrets: dict[str, str], *fragments: str) -> None:
        details = expect_error(
            code, csi.node.NodeStageVolume,
            stage_request(volume.volume_id, staging, capability, secrets), *fragments,
        )  # fmt: skip
        for value in secrets.values():
            assert value not in details, "a key is in an error message"
        assert not crypt.is_open(mapping_of(volume.volume_id))
        assert not is_mounted(str(staging))

    refused(Code.INVALID_ARGUMENT, {}, "no 'key' secret", "node-stage-secret-name")
    refused(Code.INVALID_ARGUMENT, {"key": "short-password"}, "at least 32 bytes")
    assert sh("blkid", "-p", lv_device(vg, volume.volume_id), check=False) == "", "LV was written"
    stage(csi, volume.volume_id, staging, capability)
    write_file(staging / "data", PLAINTEXT)
    unstage(csi, volume.volume_id, str(staging))
    refused(Code.PERMISSION_DENIED, {"key": NEW_KEY}, "does not open", "previousKey")
    refused(Code.PERMISSION_DENIED, {"key": NEW_KEY, "previousKey": NEW_KEY[::-1]}, "neither")
    # Both copies of the LUKS2 header damaged on purpose: the rest is kept.
    device = lv_device(vg, volume.volume_id)
    before = hashlib.sha256(Path(device).read_bytes()[64 * 1024 :]).hexdigest()
    with open(device, "r+b") as raw:
        raw.write(b"\xa5" * 64 * 1024)
        os.fsync(raw.fileno())
    refused(Code.DATA_LOSS, SECRETS, "holds no LUKS2 header", "luksHeaderRestore")
    assert hashlib.sha256(Path(device).read_bytes()[64 * 1024 :]).hexdigest() == before
    delete(csi, volume.volume_id)


def test_the_key_encryption_key_is_rotated_without_rewriting_data(
    csi: CsiClient, workdir: Path
) -> None:
    volume = create(csi, "enc-rotate", 32 * MiB, "vault")
    staging = workdir / "enc-rotate"
    capability = mount_capability("ext4")
    stage(csi, volume.volume_id, staging, capability)
    write_file(staging / "data", PLAINTEXT)
    unstage(csi, volume.volume_id, str(staging))
    # The Secret after a rotation: the new key, the old one as previousKey.
    stage(csi, volume.volume_id, staging, capability, {"key": NEW_KEY, "previousKey": KEY})
    assert (staging / "data").read_bytes() == PLAINTEXT
    unstage(csi, volume.volume_id, str(staging))
    expect_error(
        Code.PERMISSION_DENIED, csi.node.NodeStageVolume,
        stage_request(volume.volume_id, staging, capability, {"key": KEY}), "does not open",
    )  # fmt: skip
    stage(csi, volume.volume_id, staging, capability, {"key": NEW_KEY})
    assert (staging / "data").read_bytes() == PLAINTEXT
    unstage(csi, volume.volume_id, str(staging))
    delete(csi, volume.volume_id)


def test_a_class_turned_encrypted_keeps_its_plain_volumes_plain(
    workdir: Path, vg: LoopVolumeGroup
) -> None:
    """Volumes made before stay plain (never formatted over nor opened as
    encrypted); what is made from them is refused; new ones are encrypted."""
    plain = driver_of_its_own(workdir, "turned-plain", vg)
    with plain.config.open("a") as text:
        text.write(f"  - name: turned\n    volumeGroup: {vg.name}\n    thinPool: {vg.pool}\n")
    csi = plain.start()
    volume = create(csi, "turned-old", 32 * MiB, "turned")
    staging = workdir / "turned-old"
    stage(csi, volume.volume_id, staging, mount_capability("ext4"), {})
    write_file(staging / "data", PLAINTEXT)
    unstage(csi, volume.volume_id, str(staging))
    snapshot = csi.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(source_volume_id=volume.volume_id, name="turned-snap")
    ).snapshot
    csi.close()
    assert plain.stop() == 0

    encrypted = driver_of_its_own(workdir, "turned-encrypted", vg)
    with encrypted.config.open("a") as text:
        text.write(
            f"  - name: turned\n    volumeGroup: {vg.name}\n    thinPool: {vg.pool}\n"
            "    encryption: luks2\n"
        )
    csi = encrypted.start()
    try:
        stage(csi, volume.volume_id, staging, mount_capability("ext4"))
        assert (staging / "data").read_bytes() == PLAINTEXT
        assert not crypt.is_open(mapping_of(volume.volume_id))
        unstage(csi, volume.volume_id, str(staging))
        expect_error(
            Code.FAILED_PRECONDITION,
            csi.controller.CreateVolume,
            create_request(
                "turned-restore",
                32 * MiB,
                "turned",
                volume_content_source=csi_pb2.VolumeContentSource(
                    snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
                        snapshot_id=snapshot.snapshot_id
                    )
                ),
            ),
            "holds plain data",
            "unencrypted",
        )
        fresh = create(csi, "turned-new", 32 * MiB, "turned")
        new_staging = workdir / "turned-new"
        stage(csi, fresh.volume_id, new_staging, mount_capability("ext4"))
        assert crypt.is_open(mapping_of(fresh.volume_id))
        unstage(csi, fresh.volume_id, str(new_staging))
        # What csi-lvm status says of the class: encrypted, two plain objects.
        graph = build(load_config(encrypted.config), Options(NODE_ID, DRIVER_NAME))
        (turned,) = [c for c in node_status(graph.backends) if c.name == "turned"]
        flags = {o.name: o.encrypted for o in turned.objects}
        assert flags == {"turned-old": False, "turned-snap": False, "turned-new": True}
        text = status_text([turned])
        assert "encrypted (LUKS2, a key per volume); 2 made before the class" in text
        csi.controller.DeleteSnapshot(
            csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id)
        )
        for made in (fresh, volume):
            delete(csi, made.volume_id)
    finally:
        csi.close()
        assert encrypted.stop() == 0


def test_a_group_snapshot_holds_encrypted_volumes_through_their_mappings(
    csi: CsiClient, workdir: Path, vg: LoopVolumeGroup
) -> None:
    """The filesystems a group freezes are found on the mappings: the group
    is cut and each member's filesystem is clean, or, where the kernel will
    not let LVM snapshot a frozen filesystem, it is refused for that reason
    (not for a volume in use with no filesystem found) and nothing stays
    frozen."""
    volumes = [create(csi, f"enc-group-{i}", 32 * MiB, "vault") for i in range(2)]
    points = [workdir / f"enc-group-{i}" for i in range(2)]
    for volume, point in zip(volumes, points, strict=True):
        stage(csi, volume.volume_id, point, mount_capability("ext4"))
        write_file(point / "data", PLAINTEXT)
    try:
        group = csi.group_controller.CreateVolumeGroupSnapshot(
            csi_pb2.CreateVolumeGroupSnapshotRequest(
                name="enc-group", source_volume_ids=[v.volume_id for v in volumes]
            )
        ).group_snapshot
    except grpc.RpcError as error:  # refused, but with the mounts found
        assert error.code() == Code.FAILED_PRECONDITION, error.details()
        assert "frozen filesystem" in str(error.details()), error.details()
        group = None
    for point in points:
        write_file(point / "after", b"written after the group")  # nothing stayed frozen
    for volume, point in zip(volumes, points, strict=True):
        unstage(csi, volume.volume_id, str(point))
    if group is not None:
        for member in group.snapshots:
            device = lv_device(vg, member.snapshot_id)
            sh("lvchange", "-ay", "-K", f"{vg.name}/{member.snapshot_id.rsplit(':', 1)[-1]}")
            mapping = crypt.open_mapping(device, "enc-group-check", KEY.encode())
            try:
                check = subprocess.run(["e2fsck", "-n", mapping], capture_output=True, text=True)
                assert check.returncode == 0, check.stdout + check.stderr  # it was frozen
            finally:
                crypt.close_mapping("enc-group-check")
        csi.group_controller.DeleteVolumeGroupSnapshot(
            csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id)
        )
    for volume in volumes:
        delete(csi, volume.volume_id)
