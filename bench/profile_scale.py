"""Where the time of issue 18's figures goes: a shorter run than the scale
bench, with the driver sampled by py-spy (installed by hand; the bench
itself never needs it) and every call timed with its wall-clock start, to
lay beside the driver's debug log (each LVM command and refresh is a line).

    python scripts/vmrun.py --memory 5G -- python bench/profile_scale.py --volumes 400

Phases, each written to ``build/vm/profile/``: the idle figures (stats,
Probe, scrape) with the driver's usual refresh interval, the same with
refreshes too rare to happen, and the steady load (16 creators, stats
polled as a kubelet does, Probe every 0.1 s). Not part of ``make bench``:
it prints no PASS or FAIL, only the times and where they went.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.measure import mount_cap, percentile
from bench.scale import METRICS_PORT, ScaleBench
from csi_lvm.csi import csi_pb2
from tests.testbed import Driver, write_config

ROOT = Path(__file__).resolve().parent.parent

OUT = ROOT / "build" / "vm" / "profile"


def timeline(call: Callable[[], Any]) -> tuple[float, float]:
    """(wall-clock start, seconds) of one call."""
    started, clock = time.time(), time.monotonic()
    call()
    return started, time.monotonic() - clock


def summary(name: str, samples: list[tuple[float, float]]) -> dict[str, float]:
    durations = [seconds for _, seconds in samples]
    figures = {
        "count": len(durations),
        "p50 ms": percentile(durations, 0.5) * 1000,
        "p99 ms": percentile(durations, 0.99) * 1000,
        "max ms": max(durations) * 1000,
    }
    print(f"   {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()), flush=True)
    return figures


@contextmanager
def sampled(pid: int, name: str, gil: bool) -> Iterator[None]:
    """py-spy samples the driver while the block runs (without pausing it),
    as collapsed stacks; only the thread holding the GIL with ``gil``."""
    spy = shutil.which("py-spy")
    if spy is None:
        yield
        return
    flags = ["--gil"] if gil else []
    process = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--nonblocking", "--rate", "50", "--threads",
         "--format", "raw", "--output", str(OUT / f"{name}.txt"), *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(1)  # attached
        yield
    finally:
        process.send_signal(2)  # py-spy writes its file on SIGINT
        process.wait(60)


class Profile:
    def __init__(self, volumes: int, creates_each: int) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="csi-lvm-profile-"))
        self.bench = ScaleBench(self.work, lambda row: None)
        self.volumes = volumes
        self.creates_each = creates_each
        self.results: dict[str, Any] = {"volumes": volumes}

    def start_driver(self, interval: float) -> Driver:
        bench = self.bench
        config = write_config(bench.work / "config.yaml", bench.vg.name, bench.vg.pool, ratio=20)
        driver = Driver(
            bench.work, config, "--metrics-address", f"127.0.0.1:{METRICS_PORT}",
            "--lvm-config-overrides", str(bench.overrides), "--log-level", "debug",
            "--refresh-interval", str(interval),
        )  # fmt: skip
        bench.csi = driver.start(timeout=120)
        bench.driver = driver
        return driver

    def stop_driver(self) -> None:
        if self.bench.driver is not None:
            self.bench.driver.stop()
            self.bench.driver = None

    def idle(self, name: str, pid: int) -> None:
        """Stats, Probe and scrapes one after the other, as the scale bench
        measures them."""
        client, published = self.bench.client, self.bench.published
        for request in published:  # the kubelet's steady state
            client.node.NodeGetVolumeStats(request, timeout=30)
        time.sleep(1)
        with sampled(pid, name, gil=True):
            stats = [
                timeline(lambda n=n: client.node.NodeGetVolumeStats(  # type: ignore[misc]
                    published[n % len(published)], timeout=30))
                for n in range(300)
            ]  # fmt: skip
            probes = [
                timeline(lambda: client.identity.Probe(csi_pb2.ProbeRequest(), timeout=30))
                for _ in range(300)
            ]
            url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
            scrapes = [
                timeline(lambda: urllib.request.urlopen(url, timeout=60).read()) for _ in range(20)
            ]
        self.results[name] = {
            "stats": summary(f"{name} stats", stats),
            "probe": summary(f"{name} probe", probes),
            "scrape": summary(f"{name} scrape", scrapes),
            "timeline": {"stats": stats, "probe": probes, "scrape": scrapes},
        }

    def load(self, pid: int) -> None:
        """16 creators while stats are polled as for 1000 volumes and Probe
        every 0.1 s."""
        bench, client = self.bench, self.bench.client
        done = threading.Event()
        probes: list[tuple[float, float]] = []
        stats: list[tuple[float, float]] = []
        creates: list[tuple[float, float]] = []
        made: list[str] = []

        def prober() -> None:
            while not done.is_set():
                probes.append(timeline(
                    lambda: client.identity.Probe(csi_pb2.ProbeRequest(), timeout=30)))  # fmt: skip
                done.wait(0.1)

        def kubelet() -> None:
            number = 0
            while not done.is_set():
                request = bench.published[number % len(bench.published)]
                stats.append(timeline(
                    lambda: client.node.NodeGetVolumeStats(request, timeout=30)))  # noqa: B023  # fmt: skip
                number += 1
                done.wait(60 / 1000)

        def creator(_: int) -> None:
            for _ in range(self.creates_each):
                holder: list[str] = []
                creates.append(timeline(
                    lambda: holder.append(bench.create(bench.name("load")).volume_id)))  # noqa: B023  # fmt: skip
                made.extend(holder)

        threads = [threading.Thread(target=prober), threading.Thread(target=kubelet)]
        with sampled(pid, "load", gil=True):
            for thread in threads:
                thread.start()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(creator, range(16)))
            done.set()
            for thread in threads:
                thread.join()
        for volume_id in made:
            bench.delete(volume_id)
        self.results["load"] = {
            "probe": summary("load probe", probes),
            "stats": summary("load stats", stats),
            "create": summary("load create", creates),
            "timeline": {"probe": probes, "stats": stats, "create": creates},
        }

    def publish(self, count: int) -> None:
        bench, client = self.bench, self.bench.client
        for number in range(count):
            volume = bench.create(bench.name(f"pod-{number}"))
            staging, target = bench.work / f"s-{number}", bench.work / f"t-{number}"
            staging.mkdir()
            client.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                volume_id=volume.volume_id, staging_target_path=str(staging),
                volume_capability=mount_cap()), timeout=300)  # fmt: skip
            client.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
                volume_id=volume.volume_id, staging_target_path=str(staging),
                target_path=str(target), volume_capability=mount_cap()), timeout=300)  # fmt: skip
            bench.published.append(csi_pb2.NodeGetVolumeStatsRequest(
                volume_id=volume.volume_id, volume_path=str(target)))  # fmt: skip

    def run(self) -> None:
        OUT.mkdir(parents=True, exist_ok=True)
        bench = self.bench
        bench.vg.create()
        try:
            started = time.monotonic()
            bench.fill(self.volumes, self.volumes // 2)
            self.results["fill seconds"] = time.monotonic() - started
            print(f"   filled {self.volumes} in {self.results['fill seconds']:.0f} s", flush=True)
            driver = self.start_driver(10)
            assert driver.process is not None
            self.publish(4)
            time.sleep(12)  # a refresh after the driver's own changes
            self.idle("idle", driver.process.pid)
            self.load(driver.process.pid)
            self.stop_driver()
            shutil.copy(bench.work / "driver.log", OUT / "driver.log")
            # The same calls where no refresh happens while they run.
            driver = self.start_driver(3600)
            assert driver.process is not None
            time.sleep(2)
            self.idle("no-refresh", driver.process.pid)
        finally:
            bench.lvm.close()
            self.stop_driver()
            for path in bench.work.glob("[st]-*"):
                subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
            bench.vg.destroy()
            (OUT / "timings.json").write_text(json.dumps(self.results, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=400)
    parser.add_argument("--creates-each", type=int, default=2, help="per creator, of 16")
    args = parser.parse_args()
    Profile(args.volumes, args.creates_each).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
