"""The csi-lvm demo: a real volume group, a running driver, and a volume's
whole life through the CSI socket, then the lecture's snapshot and restore.

Run with `make demo` (boots the VM where this kernel lacks device-mapper).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from csi_lvm.csi import csi_pb2
from tests.testbed import (
    NODE_ID,
    TOPOLOGY_KEY,
    CsiClient,
    Driver,
    LoopVolumeGroup,
    sh,
    write_config,
)

MiB = 1 << 20
Mode = csi_pb2.VolumeCapability.AccessMode
XFS = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(fs_type="xfs"),
    access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER),
)
AT_SNAPSHOT = "order 1\norder 2\n"
LATER = AT_SNAPSHOT + "order 3\n"


@contextmanager
def step(title: str) -> Iterator[list[str]]:
    """Print one line per step: what it did, its result and how long it took."""
    result: list[str] = []
    started = time.monotonic()
    yield result
    elapsed = time.monotonic() - started
    print(f"  {title:<50} {' '.join(result) or 'ok'}  ({elapsed:.2f}s)", flush=True)


def lvs(vg: str) -> str:
    return sh("lvs", "-o", "lv_name,lv_size,pool_lv,origin,lv_attr", vg).rstrip()


class Walkthrough:
    def __init__(self, csi: CsiClient, vg: LoopVolumeGroup, work: Path) -> None:
        self.controller, self.node, self.identity = csi.controller, csi.node, csi.identity
        self.vg, self.work = vg, work

    def create(self, name: str, size: int, source: str = "") -> csi_pb2.Volume:
        request = csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[XFS],
            parameters={"deviceClass": "thin"},
            accessibility_requirements=csi_pb2.TopologyRequirement(
                requisite=[csi_pb2.Topology(segments={TOPOLOGY_KEY: NODE_ID})]
            ),
        )
        if source:
            request.volume_content_source.snapshot.snapshot_id = source
        return self.controller.CreateVolume(request).volume

    def stage_and_publish(self, volume_id: str, name: str) -> Path:
        staging, target = self.work / f"{name}-staging", self.work / f"{name}-pod"
        staging.mkdir()
        self.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume_id, staging_target_path=str(staging), volume_capability=XFS
            )
        )
        self.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume_id,
                staging_target_path=str(staging),
                target_path=str(target),
                volume_capability=XFS,
            )
        )
        return target

    def unpublish_and_unstage(self, volume_id: str, name: str) -> None:
        target, staging = self.work / f"{name}-pod", self.work / f"{name}-staging"
        self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
        )
        self.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging))
        )

    def run(self) -> bool:
        with step("GetPluginInfo") as out:
            info = self.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
            out.append(f"{info.name} {info.vendor_version}")
        with step("NodeGetInfo") as out:
            node = self.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
            out.append(f"node {node.node_id}, topology {dict(node.accessible_topology.segments)}")
        with step("GetCapacity deviceClass=thin") as out:
            capacity = self.controller.GetCapacity(
                csi_pb2.GetCapacityRequest(parameters={"deviceClass": "thin"})
            )
            out.append(f"{capacity.available_capacity // MiB} MiB (1 GiB pool x ratio 4)")

        print("\n== a volume's life: create, stage, publish, write, stats")
        with step("CreateVolume pvc-demo, 256 MiB asked, thin, xfs") as out:
            volume = self.create("pvc-demo", 256 * MiB)
            volume_id = volume.volume_id
            out.append(f"id {volume_id}, {volume.capacity_bytes // MiB} MiB (xfs minimum)")
        with step("NodeStageVolume + NodePublishVolume") as out:
            target = self.stage_and_publish(volume_id, "demo")
            out.append(f"mounted at {target}")
        with step("write orders.txt") as out:
            (target / "orders.txt").write_text(AT_SNAPSHOT)
            out.append("2 orders")
        with step("NodeGetVolumeStats") as out:
            stats = self.node.NodeGetVolumeStats(
                csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(target))
            )
            used, total = stats.usage[0].used, stats.usage[0].total
            out.append(f"{used // MiB} MiB used of {total // MiB} MiB,")
            out.append(f"abnormal={stats.volume_condition.abnormal}")

        print("\n== the lecture: snapshot, write more, restore into a new volume")
        with step("CreateSnapshot snap-1 of pvc-demo") as out:
            snapshot = self.controller.CreateSnapshot(
                csi_pb2.CreateSnapshotRequest(name="snap-1", source_volume_id=volume_id)
            ).snapshot
            out.append(f"id {snapshot.snapshot_id}, ready={snapshot.ready_to_use}")
        with step("write more to pvc-demo") as out:
            (target / "orders.txt").write_text(LATER)
            out.append("3 orders")
        with step("CreateVolume pvc-restore from snap-1, 512 MiB") as out:
            restore_id = self.create(
                "pvc-restore", 512 * MiB, source=snapshot.snapshot_id
            ).volume_id
            out.append(f"id {restore_id}")
        with step("stage + publish the restore beside the original") as out:
            restored = self.stage_and_publish(restore_id, "restore")
            out.append(f"mounted at {restored} (new XFS UUID)")
        original_text = (target / "orders.txt").read_text()
        restored_text = (restored / "orders.txt").read_text()
        print(f"  pvc-demo    orders.txt: {original_text.splitlines()}")
        print(f"  pvc-restore orders.txt: {restored_text.splitlines()}")
        exact = restored_text == AT_SNAPSHOT and original_text == LATER
        print(f"  the restore holds exactly the data at snapshot time: {exact}")
        size = sh("df", "-h", "--output=size", str(restored)).split()[-1]
        print(f"  the restored filesystem grew to the larger volume: {size}")
        print("\n" + lvs(self.vg.name))

        print("\n== cleanup, in the order Kubernetes would do it")
        with step("unpublish + unstage both"):
            self.unpublish_and_unstage(restore_id, "restore")
            self.unpublish_and_unstage(volume_id, "demo")
        with step("DeleteVolume pvc-demo (its snapshot stays)"):
            self.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
        with step("DeleteSnapshot snap-1 (the restore stays)"):
            self.controller.DeleteSnapshot(
                csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id)
            )
        with step("DeleteVolume pvc-restore"):
            self.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=restore_id))
        print("\n" + lvs(self.vg.name))
        return exact


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="csi-lvm-demo-", dir="/tmp"))
    print(f"== a loop-backed volume group with a thin pool, in {work}")
    with step("vgcreate demo (4 GiB) + thin pool pool0 (1 GiB)"):
        vg = LoopVolumeGroup(work, "demo", "4G", pool_size="1G").create()
    driver = Driver(work, write_config(work / "config.yaml", vg.name, vg.pool, ratio=4))
    try:
        with step("csi-lvm serve") as out:
            csi = driver.start()
            out.append(f"socket {driver.socket}")
        ok = Walkthrough(csi, vg, work).run()
    finally:
        driver.stop()
        vg.destroy()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
