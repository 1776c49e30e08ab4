"""Issue 18: what a call costs on a node with 10 and with 1000 volumes.

One volume group with a thin pool and a metadata area large enough for 1500
LVs; the driver serves it from the start. Measured at 10 volumes, then again
once the VG holds 1000 (half of them with a snapshot), each figure against
its own value at 10 or against the floor: the same ``lvcreate`` sent to a
warm ``lvm shell`` (csi-lvm's LVM layer), beside one ``lvm`` process per
command. Then a steady load at 1000: a kubelet's stats poll of every volume
once a minute while 16 creates run, with Probe timed throughout. Last, how
many volumes a volume group made with LVM's defaults holds before its
metadata area is full.

The filler volumes are made straight through the LVM layer with the driver's
own tags (so the driver owns them), inactive, several commands in flight at
once: thin LVs cost little to make, activation and udev most of it.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from bench.measure import MiB, Row, mount_cap, percentile, rss_mib, timed
from csi_lvm.csi import csi_pb2
from csi_lvm.ids import Kind, Tag, encode_tags, lv_name_for
from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.errors import LvmMetadataFull
from csi_lvm.lvm.runner import Runner, config_overrides_from
from tests.testbed import DRIVER_NAME, CsiClient, Driver, LoopVolumeGroup, write_config

METRICS_PORT = 9899
SIZE = 4 * MiB


class ScaleBench:
    def __init__(self, work: Path, add: Callable[[Row], None]) -> None:
        # The LVM layer's own log lines (one per command) stay out of the table.
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
        self.work = work / "scale"
        self.work.mkdir()
        self.add = add
        self.counter = 0
        # Room for 1500 LVs' records in the VG, and for as many thin devices
        # in the pool's own metadata (LVM refuses new ones past 75 % of it).
        self.vg = LoopVolumeGroup(
            self.work, "scale", "8G", pool_size="2G", metadata_size="8m", pool_metadata_size="64m"
        )
        # LVM archives a VG's metadata before each change (into the VM's
        # memory here): thousands of changes of a large VG would fill it.
        self.overrides = self.work / "lvm-overrides.conf"
        self.overrides.write_text("backup {\n    backup = 0\n    archive = 0\n}\n")
        overrides = config_overrides_from(self.overrides.read_text())
        self.lvm = Lvm(Runner(shell=True, config_overrides=overrides))  # noqa: S604 - the floor
        self.process_lvm = Lvm(Runner(config_overrides=overrides))
        self.csi: CsiClient | None = None
        self.driver: Driver | None = None
        self.published: list[csi_pb2.NodeGetVolumeStatsRequest] = []
        self.at: dict[int, dict[str, float]] = {}
        self.metadata_per_volume = 0.0  # bytes of metadata area a volume took

    # ---- helpers

    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"pvc-{prefix}-{self.counter}"

    @property
    def client(self) -> CsiClient:
        assert self.csi is not None
        return self.csi

    def create(self, name: str) -> csi_pb2.Volume:
        request = csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
            volume_capabilities=[mount_cap()],
            parameters={"deviceClass": "thin"},
        )
        volume: csi_pb2.Volume = self.client.controller.CreateVolume(request, timeout=300).volume
        return volume

    def delete(self, volume_id: str) -> None:
        request = csi_pb2.DeleteVolumeRequest(volume_id=volume_id)
        self.client.controller.DeleteVolume(request, timeout=300)

    def tags(self) -> list[str]:
        """The driver's tags for a thin volume or snapshot of a readable name."""
        return encode_tags({Tag.DRIVER: DRIVER_NAME, Tag.CLASS: "thin"})

    def floor_create(self, name: str) -> None:
        """The driver's lvcreate for ``name``, sent to a warm lvm shell."""
        lv = lv_name_for(Kind.VOLUME, name)
        self.lvm.create_thin_volume(self.vg.name, self.vg.pool, lv, SIZE, self.tags())

    def process_create(self, name: str) -> None:
        """The same lvcreate, one lvm process for it."""
        lv = lv_name_for(Kind.VOLUME, name)
        self.process_lvm.create_thin_volume(self.vg.name, self.vg.pool, lv, SIZE, self.tags())

    def fill(
        self,
        volumes: int,
        snapshots: int,
        lvm: Lvm | None = None,
        group: LoopVolumeGroup | None = None,
    ) -> int:
        """Make ``volumes`` inactive thin volumes with the driver's tags and a
        snapshot of each of the first ``snapshots``, four commands at a time;
        returns how many volumes were made (fewer when the metadata area
        filled)."""
        lvm, group = lvm or self.lvm, group or self.vg
        made = 0
        lock = threading.Lock()
        full = threading.Event()

        def one(number: int) -> None:
            nonlocal made
            if full.is_set():
                return
            csi_name = self.name(f"fill{number}")
            lv = lv_name_for(Kind.VOLUME, csi_name)
            try:
                tag_args = [arg for tag in self.tags() for arg in ("--addtag", tag)]
                lvm.change(["lvcreate", "--yes", "--name", lv, "--virtualsize", f"{SIZE}b",
                            "--thinpool", group.pool, "--activate", "n", *tag_args,
                            group.name])  # fmt: skip
                with lock:
                    made += 1
                if number < snapshots:
                    snap = lv_name_for(Kind.SNAPSHOT, f"snapshot-{csi_name}")
                    tags = [*self.tags(), *encode_tags({Tag.SOURCE: lv})]
                    lvm.create_thin_snapshot(group.name, lv, snap, tags, active=False)
            except LvmMetadataFull:
                full.set()

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(volumes)))
        return made

    def volume_count(self) -> int:
        listed = self.client.controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=300)
        return len(listed.entries)

    # ---- the figures at one size

    def measure(self, size: int, samples: int, stats_calls: int) -> None:
        client, figures = self.client, {}
        created, creates, deletes, floors, processes = [], [], [], [], []
        for _ in range(samples):
            name = self.name("lat")
            started = time.monotonic()
            created.append(self.create(name).volume_id)
            creates.append(time.monotonic() - started)
            floors.append(timed(lambda: self.floor_create(self.name("floor"))))
        for _ in range(max(2, samples // 3)):
            processes.append(timed(lambda: self.process_create(self.name("proc"))))
        for volume_id in created:
            deletes.append(timed(lambda: self.delete(volume_id)))  # noqa: B023
        figures["create"] = percentile(creates, 0.5)
        figures["floor"] = percentile(floors, 0.5)
        figures["process"] = percentile(processes, 0.5)
        figures["delete"] = percentile(deletes, 0.5)
        # Four volumes staged and published, as pods would have them.
        stages = []
        for number in range(4):
            volume = self.create(self.name(f"pod{size}-{number}"))
            staging, target = self.work / f"s-{self.counter}", self.work / f"t-{self.counter}"
            staging.mkdir()
            stages.append(timed(lambda: client.node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=volume.volume_id, staging_target_path=str(staging),  # noqa: B023
                    volume_capability=mount_cap()), timeout=300)))  # fmt: skip
            client.node.NodePublishVolume(
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=volume.volume_id, staging_target_path=str(staging),
                    target_path=str(target), volume_capability=mount_cap()),
                timeout=300)  # fmt: skip
            self.published.append(csi_pb2.NodeGetVolumeStatsRequest(
                volume_id=volume.volume_id, volume_path=str(target)))  # fmt: skip
        figures["stage"] = percentile(stages, 0.5)
        # The kubelet's steady state: each volume asked about before (a
        # staged volume's LV is read again once after the staging changed it).
        for request in self.published:
            client.node.NodeGetVolumeStats(request, timeout=30)
        time.sleep(1)
        stats = [timed(lambda: client.node.NodeGetVolumeStats(
            self.published[n % len(self.published)], timeout=30))  # noqa: B023
            for n in range(stats_calls)]  # fmt: skip
        figures["stats p50"], figures["stats p99"] = percentile(stats, 0.5), percentile(stats, 0.99)
        probes = [timed(lambda: client.identity.Probe(csi_pb2.ProbeRequest(), timeout=30))
                  for _ in range(stats_calls)]  # fmt: skip
        figures["probe p99"] = percentile(probes, 0.99)
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        scrapes = [timed(lambda: urllib.request.urlopen(url, timeout=60).read())
                   for _ in range(10)]  # fmt: skip
        figures["scrape"] = percentile(scrapes, 0.5)
        figures["list"] = statistics.median(timed(self.volume_count) for _ in range(3))
        assert self.driver is not None and self.driver.process is not None
        figures["rss"] = rss_mib(self.driver.process.pid)
        figures["volumes"] = self.volume_count()
        figures["metadata free"] = self.lvm.list_vgs([self.vg.name])[0].metadata_free_bytes
        self.at[size] = figures

    # ---- the steady load

    def steady_load(self, creates_each: int) -> None:
        """16 creators, each making ``creates_each`` volumes one after the
        other, while stats are asked for as a kubelet does for 1000 mounted
        volumes (one each a minute: 1000/60 a second) and Probe every 0.5 s."""
        client = self.client
        done = threading.Event()
        probes: list[float] = []
        stats: list[float] = []

        def prober() -> None:
            while not done.is_set():
                probes.append(timed(lambda: client.identity.Probe(csi_pb2.ProbeRequest(),
                                                                  timeout=30)))  # fmt: skip
                done.wait(0.5)

        def kubelet() -> None:
            number = 0
            while not done.is_set():
                request = self.published[number % len(self.published)]
                stats.append(timed(lambda: client.node.NodeGetVolumeStats(request, timeout=30)))  # noqa: B023
                number += 1
                done.wait(60 / 1000)

        made: list[str] = []

        def creator(_: int) -> None:
            for _ in range(creates_each):
                made.append(self.create(self.name("load")).volume_id)

        threads = [threading.Thread(target=prober), threading.Thread(target=kubelet)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(creator, range(16)))
        seconds = time.monotonic() - started
        done.set()
        for thread in threads:
            thread.join()
        for volume_id in made:
            self.delete(volume_id)
        worst = max(probes)
        self.add(Row(f"Probe, worst, under load at 1000 volumes ({len(made)} creates by 16, "
                     f"stats of 1000 volumes/min)", worst * 1000, None, None, "<= 1000",
                     worst <= 1.0, "ms", f"{len(probes)} Probes in {seconds:.0f} s"))  # fmt: skip
        self.add(Row("  NodeGetVolumeStats p99 under that load", percentile(stats, 0.99) * 1000,
                     None, None, "-", None, "ms", f"{len(stats)} calls"))  # fmt: skip

    # ---- how many volumes a default VG holds

    def default_vg_capacity(self, fill: bool) -> None:
        """How many volumes a VG made with LVM's defaults holds: its metadata
        area's room divided by what each volume took in the scale VG, and,
        with ``fill``, counted by filling one until LVM refuses."""
        group = LoopVolumeGroup(self.work, "defaults", "4G", pool_size="1G").create()
        overrides = config_overrides_from(self.overrides.read_text())
        lvm = Lvm(Runner(shell=True, config_overrides=overrides))  # noqa: S604 - LVM's own shell
        try:
            room = lvm.list_vgs([group.name])[0].metadata_free_bytes
            per_volume = self.metadata_per_volume
            if per_volume:
                self.add(Row("Volumes a VG made with LVM's defaults holds (estimate)",
                             room // per_volume, None, None, "-", None, "volumes",
                             f"{room} bytes of metadata room / {per_volume:.0f} bytes a "
                             "volume (half with a snapshot) took"))  # fmt: skip
            if fill:
                made = self.fill(5000, 0, lvm, group)
                self.add(Row("Volumes a VG made with LVM's defaults holds (filled)", made,
                             None, None, "-", None, "volumes",
                             "thin, no snapshots, the driver tags; then LVM refuses"))  # fmt: skip
        finally:
            lvm.close()
            group.destroy()

    # ---- the whole run

    def run(
        self,
        big: int,
        samples: int,
        stats_calls: int,
        creates_each: int,
        scale: bool = True,
        default_vg: bool = True,
        log_copy: Path | None = None,
        fill_default_vg: bool = False,
    ) -> None:
        if scale:
            self.vg.create()
            try:
                self.serve_and_measure(big, samples, stats_calls, creates_each)
            finally:
                self.lvm.close()
                if self.driver is not None:
                    self.driver.stop()
                for path in self.work.glob("[st]-*"):  # the pods' mounts
                    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
                self.vg.destroy()
                if log_copy is not None and (self.work / "driver.log").exists():
                    shutil.copy(self.work / "driver.log", log_copy)
        if default_vg:
            self.default_vg_capacity(fill=fill_default_vg)

    def serve_and_measure(
        self, big: int, samples: int, stats_calls: int, creates_each: int
    ) -> None:
        config = write_config(self.work / "config.yaml", self.vg.name, self.vg.pool, ratio=20)
        self.driver = Driver(
            self.work, config, "--metrics-address", f"127.0.0.1:{METRICS_PORT}",
            "--lvm-config-overrides", str(self.overrides),
        )  # fmt: skip
        self.csi = self.driver.start(timeout=120)
        self.fill(10, 5)
        self.measure(10, samples, stats_calls)
        started = time.monotonic()
        self.fill(big - int(self.at[10]["volumes"]), big // 2)
        print(f"   filled to {big} volumes in {time.monotonic() - started:.0f} s", flush=True)
        self.measure(big, samples, stats_calls)
        self.report(big)
        self.steady_load(creates_each)

    def report(self, big: int) -> None:
        small_at, big_at = self.at[10], self.at[big]
        sizes = f"{small_at['volumes']:.0f} and {big_at['volumes']:.0f} volumes"

        def against_small(
            label: str,
            key: str,
            unit: str,
            scale: float,
            target: float | None,
            limit: float | None = None,
        ) -> None:
            value, base = big_at[key] * scale, small_at[key] * scale
            ratio = value / base
            passed = None if target is None else ratio <= target
            if limit is not None:
                passed = bool(passed is not False and value <= limit)
            wanted = "-" if target is None else f"<= {target}"
            if limit is not None:
                wanted += f", <= {limit:g} {unit}"
            self.add(Row(f"{label} at {big} vs at 10 volumes", value, base, ratio, wanted,
                         passed, unit, sizes))  # fmt: skip

        for size, figures in ((10, small_at), (big, big_at)):
            ratio = figures["create"] / figures["floor"]
            self.add(Row(f"CreateVolume p50 at {size} volumes vs the same lvcreate in a warm "
                         "lvm shell", figures["create"], figures["floor"], ratio, "<= 1.1",
                         ratio <= 1.1, "s",
                         f"one lvm process per command: {figures['process']:.3f} s"))  # fmt: skip
        against_small("DeleteVolume p50", "delete", "s", 1, None)
        against_small("NodeStageVolume p50 (ext4)", "stage", "s", 1, None)
        against_small("NodeGetVolumeStats p50", "stats p50", "ms", 1000, 1.1)
        against_small("NodeGetVolumeStats p99", "stats p99", "ms", 1000, 1.1, limit=20)
        against_small("Probe p99", "probe p99", "ms", 1000, 1.1)
        against_small("Metrics scrape p50", "scrape", "ms", 1000, 1.1)
        against_small("ListVolumes of all", "list", "s", 1, None)
        used = small_at["metadata free"] - big_at["metadata free"]
        added = big_at["volumes"] - small_at["volumes"]
        self.metadata_per_volume = used / added if added else 0.0
        self.add(Row("Metadata area taken per volume (half with a snapshot)",
                     self.metadata_per_volume, None, None, "-", None, "bytes",
                     f"{used:.0f} bytes for {added:.0f} volumes and their snapshots"))  # fmt: skip
        rss = big_at["rss"]
        self.add(Row(f"Driver RSS at {big} volumes", rss, small_at["rss"],
                     rss / small_at["rss"], "<= 80 MiB", rss <= 80, "MiB", sizes))  # fmt: skip
