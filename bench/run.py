"""The csi-lvm benchmark (issue 7): the driver against raw LVM, in one run.

Makes a loop-backed volume group with a thin pool, starts ``csi-lvm serve``
on it and measures every figure against a baseline taken in the same run:

1. CreateVolume latency (p50, p95) against a raw ``lvs`` + ``lvcreate`` (the
   same fields and tags the driver uses), run by hand: the overhead ratio.
2. 64 CreateVolume calls at concurrency 1, 4 and 16 against a sequential
   loop of raw ``lvcreate``: the throughput ratio.
3. Restore (CreateVolume from a snapshot) of a 4 GiB volume with 1 GiB
   written against a 64 MiB one: the size ratio.
4. The first NodeStageVolume of a 4 GiB thin volume (ext4, xfs) against a
   plain ``mkfs`` with its defaults: the stage ratio.
5. The driver's RSS idle and after 1,000 mixed RPCs.
6. Round trips of Probe and NodeGetInfo (p50, p99).
7. GetMetadataDelta of a 4 GiB thin volume with 1 % changed against reading
   both snapshots whole and comparing them (``bench/cbt.py``).
8. A restore across nodes (two plugins, loopback, mutual TLS) of a 4 GiB
   thin snapshot with 1 GiB written against moving the same bytes locally,
   and what mutual TLS costs the plugins' stream (``bench/across.py``).
9. Not by default (it needs a kernel that lets LVM snapshot a frozen
   filesystem: ``--only groups`` in the VM of ``python -m tools.kernels``):
   how long a group snapshot of 1, 2, 4 and 8 mounted volumes holds their
   writes, against one ordinary snapshot (``bench/groups.py``).
10. Encrypted volumes: sequential and random I/O through the dm-crypt
   mapping against the raw LV, the stage time it adds, and a crypto-erase
   delete against zeroing the LV (``bench/encryption.py``).

Prints one table and writes the same as JSON (``--json``, default
build/vm/bench.json; ``make bench`` copies it to bench/results.json).
Run it with ``make bench`` (inside the VM where this kernel lacks
device-mapper).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from bench.across import restore_across_nodes
from bench.cbt import changed_blocks
from bench.encryption import CLASSES as ENCRYPTED_CLASSES
from bench.encryption import encryption_costs
from bench.figures import Bench
from bench.groups import group_pauses
from bench.measure import Row, run
from bench.scale import ScaleBench
from tests.testbed import (
    Driver,
    LoopVolumeGroup,
    write_config,
)

ROOT = Path(__file__).resolve().parent.parent


def table(rows: list[Row]) -> str:
    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"

    header = ("figure", "value", "baseline", "ratio", "target", "result")
    lines = [
        (
            r.figure,
            f"{num(r.value)} {r.unit}",
            "-"
            if r.baseline is None
            else f"{num(r.baseline)} {r.unit if r.unit != '%' else 'MiB'}",
            num(r.ratio),
            r.target,
            "info" if r.passed is None else "PASS" if r.passed else "FAIL",
        )
        for r in rows
    ]
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]

    def fmt(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [fmt(line) for line in lines])


def machine() -> str:
    cpus = os.cpu_count()
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    kind = models[0] if models else "unknown CPU"
    if not Path("/dev/kvm").exists() or "QEMU" in kind:
        kind += " (QEMU TCG: software emulation)"
    os_name = "unknown"
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("PRETTY_NAME="):
            os_name = line.split("=", 1)[1].strip('"')
    return f"{cpus} vCPU, {kind}, {os_name}, kernel {platform.release()}"


@contextmanager
def phase(title: str) -> Iterator[None]:
    print(f"== {title}", flush=True)
    started = time.monotonic()
    yield
    print(f"   ({time.monotonic() - started:.0f}s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=str(ROOT / "build" / "vm" / "bench.json"))
    parser.add_argument("--latency-samples", type=int, default=12)
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--restore-samples", type=int, default=5)
    parser.add_argument("--stage-samples", type=int, default=4)
    parser.add_argument("--rpcs", type=int, default=1000)
    parser.add_argument("--zeroing-samples", type=int, default=3)
    parser.add_argument("--mounted-seconds", type=int, default=60)
    parser.add_argument("--cbt-samples", type=int, default=3)
    parser.add_argument("--across-samples", type=int, default=3)
    parser.add_argument("--group-samples", type=int, default=3)
    parser.add_argument("--encryption-samples", type=int, default=3)
    parser.add_argument("--scale-volumes", type=int, default=1000)
    parser.add_argument("--scale-samples", type=int, default=8)
    parser.add_argument("--scale-calls", type=int, default=300)
    parser.add_argument("--scale-load-creates", type=int, default=3, help="per creator, of 16")
    parser.add_argument(
        "--only",
        default="memory,latency,throughput,restore,stage,zeroing,ext4-mapped,cbt,across,"
        "encryption,scale,default-vg",
        help="phases; default-vg-fill also fills a default VG until LVM refuses (slow); groups "
        "(not by default) needs a newer kernel",
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="csi-lvm-bench-", dir="/tmp"))
    with phase("volume group (12 GiB loop file, 4 GiB thin pool)"):
        vg = LoopVolumeGroup(work, "bench", "12G", pool_size="4G").create()
    config = write_config(work / "config.yaml", vg.name, vg.pool, ratio=20)
    with config.open("a") as classes:
        classes.write(ENCRYPTED_CLASSES.format(vg=vg.name, pool=vg.pool))
    driver = Driver(work, config)
    rows: list[Row] = []
    try:
        with phase("csi-lvm serve"):
            csi = driver.start(timeout=120)
        bench = Bench(csi, vg, driver, work)
        if "memory" in only:
            with phase(f"memory ({args.rpcs} mixed RPCs) and round trips"):
                bench.memory_and_round_trips(args.rpcs, probes=30, infos=200)
        if "latency" in only:
            with phase("CreateVolume latency"):
                bench.latency(args.latency_samples)
        if "throughput" in only:
            with phase("throughput"):
                bench.throughput(args.calls, (1, 4, 16))
        if "restore" in only:
            with phase("restore"):
                bench.restore(args.restore_samples)
        if "stage" in only:
            with phase("first stage"):
                bench.stage(args.stage_samples)
        if "zeroing" in only:
            with phase("zeroing new thick volumes"):
                bench.zeroing(args.zeroing_samples)
        if "ext4-mapped" in only:
            with phase("pool space an ext4 first stage maps"):
                bench.ext4_mapped(args.mounted_seconds)
        if "cbt" in only:
            with phase("changed block tracking: GetMetadataDelta against reading whole"):
                changed_blocks(bench, args.cbt_samples)
        if "across" in only:
            with phase("a restore across nodes against moving its bytes locally"):
                restore_across_nodes(bench, args.across_samples)
        if "encryption" in only:
            with phase("encryption: I/O through the mapping, stage, crypto-erase"):
                encryption_costs(bench, args.encryption_samples)
        if "groups" in only:
            for device_class in ("thin", "thick"):
                with phase(f"writes held by group snapshots, {device_class}"):
                    group_pauses(bench, args.group_samples, device_class)
        if "scale" in only or "default-vg" in only:
            with phase(f"a node with 10 and with {args.scale_volumes} volumes"):
                ScaleBench(work, bench.add).run(
                    args.scale_volumes, args.scale_samples, args.scale_calls,
                    args.scale_load_creates, scale="scale" in only,
                    default_vg="default-vg" in only,
                    log_copy=Path(args.json).with_suffix(".scale-driver.log"),
                    fill_default_vg="default-vg-fill" in only,
                )  # fmt: skip
        rows = bench.rows
    finally:
        driver.stop()
        vg.destroy()
        shutil.copy(driver.log_path, Path(args.json).with_suffix(".driver.log"))
    lvm_version = run("lvm", "version").splitlines()[0].split(":", 1)[1].strip()
    text = table(rows)
    print()
    print(text)
    result = {
        "machine": machine(),
        "lvm": lvm_version,
        "python": platform.python_version(),
        "seconds": round(time.monotonic() - started),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": [asdict(r) for r in rows],
        "table": text,
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['machine']}; LVM {lvm_version}; {result['seconds']}s in all")
    failed = [r.figure for r in rows if r.passed is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
