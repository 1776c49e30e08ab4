"""What every figure of the benchmark measures with: capabilities, timers,
percentiles, a process's memory, a command run plainly, and a figure's row."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csi_lvm.csi import csi_pb2

MiB = 1 << 20
GiB = 1 << 30
Mode = csi_pb2.VolumeCapability.AccessMode
ENV = {**os.environ, "LC_ALL": "C", "LVM_SUPPRESS_FD_WARNINGS": "1"}


def mount_cap(fs_type: str = "ext4") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER),
    )


BLOCK = csi_pb2.VolumeCapability(
    block=csi_pb2.VolumeCapability.BlockVolume(),
    access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER),
)


def run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, env=ENV, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed ({done.returncode}): {done.stderr}")
    return done.stdout


def timed(call: Callable[[], Any]) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


@contextmanager
def clock(times: list[float]) -> Iterator[None]:
    started = time.monotonic()
    yield
    times.append(time.monotonic() - started)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (p50 of an even count is the upper middle)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def private_mib(pid: int) -> float:
    """Memory only this process holds (its shared libraries' pages not counted)."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total / 1024


# The driver's default --lvm-shell-idle-exit (seconds).
IDLE_EXIT = 60.0


@dataclass
class Row:
    figure: str
    value: float
    baseline: float | None
    ratio: float | None
    target: str
    passed: bool | None  # None: informational, no target
    unit: str
    samples: str
