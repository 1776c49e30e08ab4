"""What encryption costs: I/O through the dm-crypt mapping against the raw
LV, the time a first and a later stage add, and a crypto-erase delete
against zeroing the same LV, all in one run.

Thick volumes of one size, one plain and one encrypted, are published as
raw block devices: the plain one's device is the LV, the encrypted one's is
its mapping. Sequential I/O is 1 MiB direct reads and writes over the
whole volume; random I/O is 4 KiB direct reads and writes at random
aligned offsets. Stages are of thin ext4 volumes (first: format; later:
open and mount). The delete baseline writes zeros over the LV, which is what
a driver without a per-volume key must do to leave nothing behind.
"""

from __future__ import annotations

import mmap
import os
import random
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING

from bench.measure import BLOCK, MiB, Row, mount_cap, run, timed
from csi_lvm.crypt import HEADER_BYTES
from csi_lvm.csi import csi_pb2

if TYPE_CHECKING:
    from bench.figures import Bench

KEY = "bench-key-encryption-key-0123456789abcdef"
SECRETS = {"key": KEY}
PLAIN_CLASS, ENCRYPTED_CLASS, ENCRYPTED_THIN_CLASS = "thick", "vault-thick", "vault"
CLASSES = (
    "  - name: vault\n    volumeGroup: {vg}\n    thinPool: {pool}\n    overprovisionRatio: 20\n"
    "    encryption: luks2\n"
    "  - name: vault-thick\n    volumeGroup: {vg}\n    encryption: luks2\n"
)
SIZE = 256 * MiB
RANDOM_OPS = 2000


def _direct(device: str, write: bool, offsets: list[int], block: int) -> float:
    """Seconds for direct I/O of ``block`` bytes at each offset."""
    buffer = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    buffer.write(os.urandom(block))
    fd = os.open(device, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)
    try:

        def go() -> None:
            for offset in offsets:
                if write:
                    os.pwritev(fd, [buffer], offset)
                else:
                    os.preadv(fd, [buffer], offset)
            if write:
                os.fsync(fd)

        return timed(go)
    finally:
        os.close(fd)
        buffer.close()


def _io(device: str, size: int) -> dict[str, float]:
    """MiB/s of sequential and IOPS of random reads and writes on ``device``."""
    sequential = list(range(0, size, MiB))
    rng = random.Random(7)  # noqa: S311 - offsets, the same in every run
    scattered = [rng.randrange(size // 4096) * 4096 for _ in range(RANDOM_OPS)]
    mib = size / MiB
    return {
        "sequential write (MiB/s)": mib / _direct(device, True, sequential, MiB),
        "sequential read (MiB/s)": mib / _direct(device, False, sequential, MiB),
        "random 4 KiB write (IOPS)": RANDOM_OPS / _direct(device, True, scattered, 4096),
        "random 4 KiB read (IOPS)": RANDOM_OPS / _direct(device, False, scattered, 4096),
    }


class _Published:
    """A volume staged and published as a block device at a path of its own."""

    def __init__(self, bench: Bench, volume_id: str, secrets: dict[str, str]) -> None:
        self.bench, self.volume_id = bench, volume_id
        lv = volume_id.rsplit(":", 1)[-1]
        self.staging = bench.work / f"staging-{lv}"
        self.target = bench.work / f"target-{lv}"
        self.staging.mkdir()
        bench.csi.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(self.staging),
            volume_capability=BLOCK, secrets=secrets,
        ), timeout=300)  # fmt: skip
        bench.csi.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=str(self.staging),
            target_path=str(self.target), volume_capability=BLOCK,
        ), timeout=300)  # fmt: skip

    def close(self) -> None:
        node, volume_id = self.bench.csi.node, self.volume_id
        unpublish = csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=str(self.target)
        )
        node.NodeUnpublishVolume(unpublish, timeout=300)
        unstage = csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(self.staging)
        )
        node.NodeUnstageVolume(unstage, timeout=300)


def _ratio_row(bench: Bench, figure: str, value: float, base: float, unit: str, note: str) -> None:
    bench.add(Row(figure, value, base, value / base, "", None, unit, note))


def io_through_the_mapping(bench: Bench, samples: int) -> None:
    plain_volume = bench.create(bench.name("plain-io"), SIZE, BLOCK, device_class=PLAIN_CLASS)
    sealed_volume = bench.create(bench.name("enc-io"), SIZE, BLOCK, device_class=ENCRYPTED_CLASS)
    plain = _Published(bench, plain_volume.volume_id, {})
    sealed = _Published(bench, sealed_volume.volume_id, SECRETS)
    try:
        raw: dict[str, list[float]] = {}
        mapped: dict[str, list[float]] = {}
        for _ in range(samples):  # interleaved, so drift hits both alike
            for into, published in ((raw, plain), (mapped, sealed)):
                # The same bytes on both: all of the mapping (the LV less its header).
                for figure, value in _io(str(published.target), SIZE - HEADER_BYTES).items():
                    into.setdefault(figure, []).append(value)
        for figure in raw:
            unit = figure.rsplit("(", 1)[1].rstrip(")")
            _ratio_row(
                bench, f"Encrypted {figure.rsplit(' (', 1)[0]} vs the raw LV",
                statistics.median(mapped[figure]), statistics.median(raw[figure]), unit,
                f"median of {samples}; {SIZE // MiB} MiB thick volumes, direct I/O",
            )  # fmt: skip
    finally:
        plain.close()
        sealed.close()
    bench.delete(plain_volume.volume_id)
    bench.delete(sealed_volume.volume_id)


def _stage_times(bench: Bench, device_class: str, secrets: dict[str, str]) -> tuple[float, float]:
    """A first stage (format) and a later one (mount only) of a thin ext4 volume."""
    volume = bench.create(bench.name("enc-stage"), SIZE, mount_cap(), device_class=device_class)
    staging = bench.work / f"enc-stage-{bench.counter}"
    staging.mkdir()
    stage = csi_pb2.NodeStageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=str(staging),
        volume_capability=mount_cap(), secrets=secrets,
    )  # fmt: skip
    unstage = csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=str(staging)
    )
    call: Callable[[], object] = lambda: bench.csi.node.NodeStageVolume(stage, timeout=300)  # noqa: E731
    first = timed(call)
    bench.csi.node.NodeUnstageVolume(unstage, timeout=300)
    later = timed(call)
    bench.csi.node.NodeUnstageVolume(unstage, timeout=300)
    bench.delete(volume.volume_id)
    return first, later


def stage_time(bench: Bench, samples: int) -> None:
    run("modprobe", "-a", "ext4", "dm-crypt")
    plain = [_stage_times(bench, "thin", {}) for _ in range(samples)]
    sealed = [_stage_times(bench, ENCRYPTED_THIN_CLASS, SECRETS) for _ in range(samples)]
    for index, which in ((0, "First"), (1, "Later")):
        _ratio_row(
            bench, f"{which} NodeStageVolume, encrypted vs plain (thin, ext4)",
            statistics.median(s[index] for s in sealed),
            statistics.median(p[index] for p in plain), "s",
            f"median of {samples}; {SIZE // MiB} MiB; the difference is opening the mapping"
            + (" and writing its header" if index == 0 else ""),
        )  # fmt: skip


def crypto_erase(bench: Bench, samples: int) -> None:
    erase, zeroing = [], []
    for _ in range(samples):
        volume = bench.create(bench.name("enc-erase"), SIZE, BLOCK, device_class=ENCRYPTED_CLASS)
        _Published(bench, volume.volume_id, SECRETS).close()  # its header is written
        erase.append(timed(lambda: bench.delete(volume.volume_id)))  # noqa: B023
        plain = bench.create(bench.name("plain-erase"), SIZE, BLOCK, device_class=PLAIN_CLASS)
        lv = plain.volume_id.rsplit(":", 1)[-1]
        zero = ("dd", "if=/dev/zero", f"of={bench.dm_path(lv)}", "bs=1M", "oflag=direct",
                f"count={SIZE // MiB}", "conv=fsync")  # fmt: skip
        zeroing.append(
            timed(lambda: run(*zero))  # noqa: B023
            + timed(lambda: bench.delete(plain.volume_id))  # noqa: B023
        )
    _ratio_row(
        bench, "DeleteVolume with crypto-erase vs zeroing the LV and deleting it",
        statistics.median(erase), statistics.median(zeroing), "s",
        f"median of {samples}; {SIZE // MiB} MiB thick; grows with the LV only for the baseline",
    )  # fmt: skip


def encryption_costs(bench: Bench, samples: int) -> None:
    io_through_the_mapping(bench, samples)
    stage_time(bench, samples)
    crypto_erase(bench, samples)
