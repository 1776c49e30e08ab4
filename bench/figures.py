"""The figures the benchmark measures against a driver it runs, each beside its
raw LVM baseline (see ``bench/run.py``)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.measure import (
    BLOCK,
    IDLE_EXIT,
    GiB,
    MiB,
    Row,
    clock,
    mount_cap,
    percentile,
    private_mib,
    rss_mib,
    run,
    timed,
)
from csi_lvm import fs
from csi_lvm.config import Config, DeviceClass
from csi_lvm.csi import csi_pb2
from csi_lvm.ids import Kind, Tag, encode_tags, lv_name_for
from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.records import LV_FIELDS, VG_COLUMNS
from csi_lvm.lvm.runner import Runner
from csi_lvm.wiring import Options, build
from tests.testbed import (
    DRIVER_NAME,
    CsiClient,
    Driver,
    LoopVolumeGroup,
    child_pids,
)


class Bench:
    def __init__(self, csi: CsiClient, vg: LoopVolumeGroup, driver: Driver, work: Path) -> None:
        self.csi, self.vg, self.driver, self.work = csi, vg, driver, work
        self.rows: list[Row] = []
        self.counter = 0

    # ---- helpers

    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"pvc-{prefix}-{self.counter}"

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"  {row.figure}: {row.value:.3f} {row.unit}", flush=True)

    def create(
        self, name: str, size: int, cap: Any = None, source: str = "", device_class: str = "thin"
    ) -> csi_pb2.Volume:
        request = csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[cap or mount_cap()],
            parameters={"deviceClass": device_class},
        )
        if source:
            request.volume_content_source.snapshot.snapshot_id = source
        volume: csi_pb2.Volume = self.csi.controller.CreateVolume(request, timeout=300).volume
        return volume

    def delete(self, volume_id: str) -> None:
        self.csi.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=300
        )

    def raw_create(self, csi_name: str, size: int) -> None:
        """What the driver asks LVM for, typed by hand: same name, size, tags."""
        tags = encode_tags({Tag.DRIVER: DRIVER_NAME, Tag.NAME: csi_name, Tag.CLASS: "thin"})
        tag_args = [a for t in tags for a in ("--addtag", t)]
        run(
            "lvm", "lvcreate", "--yes", "--name", lv_name_for(Kind.VOLUME, csi_name),
            "--virtualsize", f"{size}b", "--thinpool", self.vg.pool, *tag_args, self.vg.name,
        )  # fmt: skip

    def raw_lvs(self) -> None:
        run(
            "lvm", "lvs", "-o", f"{LV_FIELDS},{VG_COLUMNS}", "--reportformat", "json",
            "--units", "b", "--nosuffix", self.vg.name,
        )  # fmt: skip

    def dm_path(self, lv: str) -> str:
        return run("lvm", "lvs", "--noheadings", "-o", "lv_dm_path", f"{self.vg.name}/{lv}").strip()

    def remove_all_but_pool(self) -> None:
        """Untimed cleanup between phases: one lvremove for every LV but the pool."""
        out = run("lvm", "lvs", "--noheadings", "-o", "lv_name,lv_attr", self.vg.name)
        names = [f"{self.vg.name}/{n}" for n, attr in (line.split() for line in out.splitlines())
                 if not attr.startswith("t")]  # fmt: skip
        if names:
            run("lvm", "lvremove", "--yes", *names)

    # ---- 5 and 6: memory and round trips first, on a fresh driver

    def memory_and_round_trips(self, rpcs: int, probes: int, infos: int) -> None:
        pid = self.driver.process.pid if self.driver.process else 0
        # Idle means the driver's lvm shell has ended too (--lvm-shell-idle-exit).
        deadline = time.monotonic() + IDLE_EXIT + 30
        while child_pids(pid) and time.monotonic() < deadline:
            time.sleep(1)
        idle_shells = sum(rss_mib(child) for child in child_pids(pid))
        idle = rss_mib(pid)
        probe_times = [timed(lambda: self.csi.identity.Probe(csi_pb2.ProbeRequest()))
                       for _ in range(probes)]  # fmt: skip
        # A deployed node is never that idle: the liveness probe calls Probe
        # every 20 s, which reads LVM, so the shell stays up between calls.
        time.sleep(2)
        probed = rss_mib(pid) + sum(rss_mib(child) for child in child_pids(pid))
        info_times = [timed(lambda: self.csi.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest()))
                      for _ in range(infos)]  # fmt: skip
        keep = self.create(self.name("keep"), 64 * MiB)
        calls = self.mixed_calls(rpcs, keep.volume_id)
        with ThreadPoolExecutor(16) as pool:
            done = sum(pool.map(lambda call: call(), calls))
        time.sleep(3)
        after = rss_mib(pid)
        shells = child_pids(pid)
        busy_shells = sum(rss_mib(child) for child in shells)
        shells_private = sum(private_mib(child) for child in shells)
        self.delete(keep.volume_id)
        idle_total = idle + idle_shells
        self.add(Row("Idle RSS, driver and its lvm shell", idle_total, None, None, "<= 60",
                     idle_total <= 60, "MiB",
                     f"{IDLE_EXIT:.0f} s after start; the shell ends when idle"))  # fmt: skip
        self.add(Row("Idle RSS, driver and its lvm shell kept up by Probe", probed, None, None,
                     "<= 60", probed <= 60, "MiB",
                     f"after {probes} Probes, as under the liveness probe"))  # fmt: skip
        growth = 100 * (after - idle) / idle
        self.add(Row(f"Driver RSS growth after {done} mixed RPCs", growth, idle, after / idle,
                     "< 10", growth < 10, "%",
                     f"{after:.1f} MiB after, concurrency 16"))  # fmt: skip
        self.add(Row("RSS while busy, driver and its lvm shell", after + busy_shells, None, None,
                     "-", None, "MiB", f"{len(shells)} shell process"))  # fmt: skip
        self.add(Row("  of which the lvm shell's own (not shared) memory", shells_private, None,
                     None, "-", None, "MiB", "Private_* of smaps_rollup"))  # fmt: skip
        for label, times in (("Probe", probe_times), ("NodeGetInfo", info_times)):
            for q in (0.5, 0.99):
                self.add(Row(f"{label} round trip p{round(q * 100)}",
                             1000 * percentile(times, q), None, None, "-", None, "ms",
                             f"{len(times)} calls"))  # fmt: skip

    def mixed_calls(self, count: int, volume_id: str) -> list[Callable[[], int]]:
        identity, controller, node = self.csi.identity, self.csi.controller, self.csi.node
        thin = {"deviceClass": "thin"}

        def ok(call: Callable[..., Any], request: Any) -> Callable[[], int]:
            def go() -> int:
                call(request, timeout=300)
                return 1

            return go

        def failing(call: Callable[..., Any], request: Any) -> Callable[[], int]:
            def go() -> int:
                try:
                    call(request, timeout=300)
                except Exception:  # the error is the point
                    return 1
                raise RuntimeError("expected an error")

            return go

        def create_delete() -> int:
            volume = self.create(f"pvc-mixed-{time.monotonic_ns()}", 64 * MiB)
            self.delete(volume.volume_id)
            return 2

        lvm_reads = [
            ok(controller.GetCapacity, csi_pb2.GetCapacityRequest(parameters=thin)),
            ok(controller.ListVolumes, csi_pb2.ListVolumesRequest()),
            ok(controller.ControllerGetVolume,
               csi_pb2.ControllerGetVolumeRequest(volume_id=volume_id)),
            ok(identity.Probe, csi_pb2.ProbeRequest()),
            ok(controller.ListSnapshots, csi_pb2.ListSnapshotsRequest()),
        ]  # fmt: skip
        cheap = [
            ok(identity.GetPluginInfo, csi_pb2.GetPluginInfoRequest()),
            ok(identity.GetPluginCapabilities, csi_pb2.GetPluginCapabilitiesRequest()),
            ok(node.NodeGetInfo, csi_pb2.NodeGetInfoRequest()),
            ok(node.NodeGetCapabilities, csi_pb2.NodeGetCapabilitiesRequest()),
            ok(controller.ControllerGetCapabilities,
               csi_pb2.ControllerGetCapabilitiesRequest()),
            ok(controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id="not-ours")),
            failing(controller.CreateVolume, csi_pb2.CreateVolumeRequest(name="")),
            failing(controller.ValidateVolumeCapabilities,
                    csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=volume_id)),
            failing(node.NodeGetVolumeStats,
                    csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id)),
        ]  # fmt: skip
        calls: list[Callable[[], int]] = []
        total = 0
        i = 0
        while total < count:
            if i % 250 == 125:
                calls.append(create_delete)
                total += 2
            elif i % 50 == 0:
                calls.append(lvm_reads[(i // 50) % len(lvm_reads)])
                total += 1
            else:
                calls.append(cheap[i % len(cheap)])
                total += 1
            i += 1
        return calls

    # ---- 1: latency

    def latency(self, samples: int) -> None:
        driver_times: list[float] = []
        raw_times: list[float] = []
        for _ in range(samples):
            raw_name = self.name("lat-raw")
            with clock(raw_times):
                self.raw_lvs()
                self.raw_create(raw_name, 64 * MiB)
            name = self.name("lat")
            with clock(driver_times):
                self.create(name, 64 * MiB)
        self.remove_all_but_pool()
        for q, target in ((0.5, 1.15), (0.95, None)):
            value, base = percentile(driver_times, q), percentile(raw_times, q)
            ratio = value / base
            self.add(Row(f"CreateVolume p{round(q * 100)} vs raw lvs+lvcreate", value, base,
                         ratio, f"<= {target}" if target else "-",
                         ratio <= target if target else None, "s",
                         f"{samples} each, interleaved"))  # fmt: skip

    # ---- 2: throughput

    def throughput(self, calls: int, levels: tuple[int, ...]) -> None:
        names = [self.name("tp-raw") for _ in range(calls)]
        spent: list[float] = []
        with clock(spent):
            for n in names:
                self.raw_create(n, 64 * MiB)
        raw_seconds = spent[0]
        raw_rate = calls / raw_seconds
        self.remove_all_but_pool()
        for level in levels:
            names = [self.name(f"tp{level}") for _ in range(calls)]
            with ThreadPoolExecutor(level) as pool, clock(spent):
                list(pool.map(lambda n: self.create(n, 64 * MiB), names))
            seconds = spent[-1]
            self.remove_all_but_pool()
            rate = calls / seconds
            target = 1.0 if level == 16 else None
            self.add(Row(f"Throughput, {calls} CreateVolume at concurrency {level}", rate,
                         raw_rate, rate / raw_rate, f">= {target}" if target else "-",
                         rate / raw_rate >= target if target else None, "vol/s",
                         f"baseline: {calls} sequential raw lvcreate"))  # fmt: skip

    # ---- 3: restore

    def restore(self, samples: int) -> None:
        times: dict[int, list[float]] = {4 * GiB: [], 64 * MiB: []}
        snapshots = {}
        for size, written in ((4 * GiB, 1 * GiB), (64 * MiB, 64 * MiB)):
            volume = self.create(self.name("src"), size, BLOCK)
            lv = volume.volume_id.rsplit(":", 1)[-1]
            run("dd", "if=/dev/zero", f"of={self.dm_path(lv)}", "bs=4M",
                f"count={written // (4 * MiB)}", "oflag=direct", "status=none")  # fmt: skip
            snapshot = self.csi.controller.CreateSnapshot(
                csi_pb2.CreateSnapshotRequest(
                    name=self.name("snap"), source_volume_id=volume.volume_id
                ),
                timeout=300,
            ).snapshot
            snapshots[size] = snapshot.snapshot_id
        for _ in range(samples):
            for size in times:
                name = self.name("restore")
                times[size].append(
                    timed(lambda: self.create(name, size, BLOCK, snapshots[size]))  # noqa: B023
                )
        self.remove_all_but_pool()
        big, small = statistics.median(times[4 * GiB]), statistics.median(times[64 * MiB])
        self.add(Row("Restore 4 GiB (1 GiB written) vs 64 MiB", big, small, big / small,
                     "<= 1.3", big / small <= 1.3, "s",
                     f"median of {samples} each"))  # fmt: skip

    # ---- issue 15: zeroing new thick volumes; ext4 on storage that reads zeros

    def zeroing(self, samples: int) -> None:
        """A thick CreateVolume zeroes the whole LV; its cost beside the same
        lvcreate followed by ``dd`` of zeros over it. (``blkdiscard -z`` fails
        with EIO on the VM's loop devices: it asks for a zero-range the
        backing file does not offer; the driver's punch-hole request works.)
        256 MiB: the VM's loop files live in its memory, and dd's zeros take
        room there that the driver's punched holes do not."""
        size = 256 * MiB
        driver_times, raw_times = [], []
        for _ in range(samples):
            name = self.name("thick")
            request = csi_pb2.CreateVolumeRequest(
                name=name,
                capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                volume_capabilities=[BLOCK],
                parameters={"deviceClass": "thick"},
            )
            create = self.csi.controller.CreateVolume
            driver_times.append(timed(lambda: create(request, timeout=600)))  # noqa: B023
            raw = f"raw-thick-{self.counter}"

            def raw_create_and_zero() -> None:
                run("lvm", "lvcreate", "--yes", "-n", raw, "-L", f"{size}b",  # noqa: B023
                    "--wipesignatures", "y", "--zero", "y", self.vg.name)  # fmt: skip
                run("dd", "if=/dev/zero", f"of={self.dm_path(raw)}", "bs=4M",  # noqa: B023
                    f"count={size // (4 * MiB)}", "oflag=direct", "status=none")  # fmt: skip

            raw_times.append(timed(raw_create_and_zero))
            self.remove_all_but_pool()
        value, base = statistics.median(driver_times), statistics.median(raw_times)
        self.add(Row("Thick CreateVolume 256 MiB (zeroed) vs lvcreate + dd of zeros", value,
                     base, value / base, "-", None, "s",
                     f"median of {samples} each"))  # fmt: skip

    def ext4_mapped(self, mounted_seconds: int) -> None:
        """Pool space a first ext4 stage maps, and after a while mounted (the
        kernel's ext4lazyinit zeroes inode tables not marked zeroed)."""
        mapped = {}
        for label, options in (
            ("driver (assume_storage_prezeroed)", None),
            ("lazy_journal_init without it", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"),
        ):
            name = self.name("ext4-mapped")
            target = self.work / f"mapped-{self.counter}"
            target.mkdir()
            if options is None:
                volume = self.create(name, 4 * GiB)
                self.csi.node.NodeStageVolume(
                    csi_pb2.NodeStageVolumeRequest(
                        volume_id=volume.volume_id, staging_target_path=str(target),
                        volume_capability=mount_cap("ext4"),
                    ),
                    timeout=300,
                )  # fmt: skip
                lv = volume.volume_id.rsplit(":", 1)[-1]
            else:
                self.raw_create(name, 4 * GiB)
                lv = lv_name_for(Kind.VOLUME, name)
                device = self.dm_path(lv)
                run("mkfs.ext4", "-q", "-O", "metadata_csum_seed", "-E", options, device)
                run("mount", device, str(target))
            after_stage = self.mapped_mib(lv)
            time.sleep(mounted_seconds)
            mapped[label] = (after_stage, self.mapped_mib(lv))
            run("umount", str(target))
        self.remove_all_but_pool()
        for label, (after_stage, _) in mapped.items():
            self.add(Row(f"Pool mapped by a 4 GiB ext4, first stage, {label}", after_stage, None,
                         None, "-", None, "MiB", "1 sample"))  # fmt: skip
        new = mapped["driver (assume_storage_prezeroed)"][1]
        old = mapped["lazy_journal_init without it"][1]
        self.add(Row(f"  the same after {mounted_seconds} s mounted, driver vs without it",
                     new, old, new / old if old else None, "-", None, "MiB",
                     "1 sample each"))  # fmt: skip

    def mapped_mib(self, lv: str) -> float:
        name = os.path.basename(self.dm_path(lv))
        fields = run("dmsetup", "status", name).split()
        return int(fields[3]) * 512 / MiB

    # ---- 4: first stage

    def stage(self, samples: int) -> None:
        # The first mount of a filesystem type loads its kernel module (from
        # the VM's 9p root, slowly); a node that runs pods has it loaded.
        run("modprobe", "-a", "ext4", "xfs")
        for fs_type in ("ext4", "xfs"):
            driver_times, mkfs_times = [], []
            for _ in range(samples):
                raw = self.name(f"mkfs-{fs_type}")
                self.raw_create(raw, 4 * GiB)
                device = self.dm_path(lv_name_for(Kind.VOLUME, raw))
                mkfs_times.append(timed(lambda: run(f"mkfs.{fs_type}", "-q", device)))  # noqa: B023
                volume = self.create(self.name(f"stage-{fs_type}"), 4 * GiB, mount_cap(fs_type))
                staging = self.work / f"stage-{self.counter}"
                staging.mkdir()
                request = csi_pb2.NodeStageVolumeRequest(
                    volume_id=volume.volume_id,
                    staging_target_path=str(staging),
                    volume_capability=mount_cap(fs_type),
                )
                driver_times.append(
                    timed(lambda: self.csi.node.NodeStageVolume(request, timeout=300))  # noqa: B023
                )
                self.csi.node.NodeUnstageVolume(
                    csi_pb2.NodeUnstageVolumeRequest(
                        volume_id=volume.volume_id, staging_target_path=str(staging)
                    ),
                    timeout=300,
                )
            parts = self.stage_parts(fs_type)
            self.remove_all_but_pool()
            value, base = statistics.median(driver_times), statistics.median(mkfs_times)
            self.add(Row(f"First NodeStageVolume 4 GiB {fs_type} vs mkfs.{fs_type} defaults",
                         value, base, value / base, "<= 1.0", value / base <= 1.0, "s",
                         f"median of {samples} each"))  # fmt: skip
            for step, seconds in parts.items():
                self.add(Row(f"  where it goes: {step} ({fs_type})", seconds, None, None, "-",
                             None, "s", "1 sample, raw LV"))  # fmt: skip

    def stage_parts(self, fs_type: str) -> dict[str, float]:
        """The steps of a first stage, each timed on its own on a raw LV."""
        raw = self.name(f"parts-{fs_type}")
        self.raw_create(raw, 4 * GiB)
        lv = lv_name_for(Kind.VOLUME, raw)
        device = self.dm_path(lv)
        target = self.work / f"parts-{self.counter}"
        target.mkdir()
        zeroed = self.name(f"parts-zeroed-{fs_type}")
        self.raw_create(zeroed, 4 * GiB)
        zeroed_device = self.dm_path(lv_name_for(Kind.VOLUME, zeroed))
        shell = Lvm(Runner(shell=True))  # noqa: S604 - the lvm shell, as the driver runs LVM; no sh
        try:
            found = shell.find_lv(self.vg.name, lv)  # starts the shell
            # The driver's own judgement, from its thin backend.
            thin = DeviceClass("thin", self.vg.name, self.vg.pool)
            backend = build(Config((thin,)), Options("bench", "bench"), shell).backends.of(thin)
            reads_zeros = found is not None and backend.contents(found).reads_zeros
            parts = {
                "lvs of the LV (a process)": timed(lambda: self.dm_path(lv)),
                "lvs of the LV (an lvm shell, as the driver)": timed(
                    lambda: shell.find_lv(self.vg.name, lv)
                ),
                "blkid --probe (skipped on a thin LV never written)": timed(
                    lambda: fs.detect_content(device)
                ),
                "mkfs with the driver's options": timed(
                    lambda: fs.make_filesystem(device, fs_type, reads_zeros=reads_zeros)
                ),
                "  the same, on an LV that was written (mkfs zeroes itself)": timed(
                    lambda: fs.make_filesystem(zeroed_device, fs_type)
                ),
                "mount": timed(lambda: fs.mount(device, str(target), fs_type, [], 60)),
            }
        finally:
            shell.close()
        fs.unmount(str(target), 60)
        return parts
