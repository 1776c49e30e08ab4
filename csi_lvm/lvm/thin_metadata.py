"""A thin pool's own metadata: which chunks each thin device maps.

dm-thin keeps, for every thin device of a pool, the map from its chunks to
the pool's data blocks; a snapshot shares its origin's blocks until either
is written. This module reads those maps, read-only, with the tools of
thin-provisioning-tools from a *metadata snapshot*: a frozen copy of the
pool's metadata that the kernel keeps consistent while the pool goes on
changing. It sends the pool's device the only two messages that touch the
metadata, ``reserve_metadata_snap`` and ``release_metadata_snap``, and reads
the pool's status; nothing else here writes anything.

``thin_dump`` and ``thin_delta`` print XML, one element per mapping; it is
parsed as it arrives, so a map of any size passes in constant memory. These
tools only read, so unlike LVM they may be stopped mid-run.

The pool's device-mapper names are ``names``'; the status line is read by
``commands.read_pool_status``, which the verbs' live fill shares; every tool
runs through the runner that runs LVM.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, cast

from csi_lvm.lvm.commands import read_pool_status
from csi_lvm.lvm.errors import MetadataSnapshotHeld, PoolNotActive, ThinMetadataError
from csi_lvm.lvm.names import check_lv_names, dm_name, metadata_dm_name
from csi_lvm.lvm.records import PoolStatus
from csi_lvm.lvm.runner import Runner

SECTOR_BYTES = 512
_READ_BYTES = 1 << 16
# How a failed message names a pool that has a metadata snapshot already, and
# one that has none to release.
_BUSY = re.compile(r"resource busy", re.I)
_NOTHING_HELD = re.compile(r"invalid argument", re.I)


def kernel_node(blkdevname: str) -> str:
    """The node devtmpfs makes for a block device the kernel names
    ``blkdevname`` (``dm-7``): there for every device, unlike
    ``/dev/mapper/<name>``, which udev or the LVM that activated the device
    makes, and which a pool activated by an LVM whose udev never ran lacks
    (thin_dump: "Couldn't stat path")."""
    name = blkdevname.strip()
    if not re.fullmatch(r"dm-\d+", name):
        raise ThinMetadataError(f"dmsetup named the device {name!r}, not dm-<minor>")
    return f"/dev/{name}"


@dataclass(frozen=True)
class ThinDevice:
    """A thin device's details in the pool's metadata. ``creation_time`` is
    the pool's clock, which every snapshot creation advances: of two
    snapshots, the later one has the higher value."""

    dev_id: int
    mapped_blocks: int
    creation_time: int
    snap_time: int


Element = tuple[str, dict[str, str]]


def xml_elements(stream: IO[bytes]) -> Iterator[Element]:
    """Each element's tag and attributes as its start tag arrives, with the
    tree pruned as it goes: memory stays constant however long the document.
    The input is a thin-provisioning tool's own output."""
    parser: ElementTree.XMLPullParser[ElementTree.Element] = ElementTree.XMLPullParser(
        events=("start", "end")
    )
    open_elements: list[ElementTree.Element] = []
    while True:
        data = stream.read(_READ_BYTES)
        if data:
            parser.feed(data)
        else:
            parser.close()
        # Start and end events only: each is (event, element).
        events = cast(Iterator[tuple[str, ElementTree.Element]], parser.read_events())
        for event, element in events:
            if event == "start":
                open_elements.append(element)
                yield element.tag, dict(element.attrib)
            else:
                open_elements.pop()
                if open_elements:  # each element is read once: drop it
                    open_elements[-1].remove(element)
        if not data:
            return


def _number(attributes: dict[str, str], name: str) -> int:
    value = attributes.get(name, "")
    if not value.isdigit():
        raise ThinMetadataError(f"thin metadata element lacks a number {name!r}: {attributes}")
    return int(value)


class Listing:
    """A thin tool's document: the superblock's ``data_block_size`` (the
    pool's chunk, in sectors) first, then the elements after it."""

    def __init__(self, elements: Iterator[Element]) -> None:
        self._elements = elements
        self.devices_seen = 0  # the <device> elements ``mappings`` met
        for tag, attributes in elements:
            if tag == "superblock":
                self.chunk_bytes = _number(attributes, "data_block_size") * SECTOR_BYTES
                return
        raise ThinMetadataError("thin tool output has no superblock")

    def devices(self) -> Iterator[ThinDevice]:
        for tag, attributes in self._elements:
            if tag == "device":
                yield ThinDevice(
                    dev_id=_number(attributes, "dev_id"),
                    mapped_blocks=_number(attributes, "mapped_blocks"),
                    creation_time=_number(attributes, "creation_time"),
                    snap_time=_number(attributes, "snap_time"),
                )

    def mappings(self) -> Iterator[tuple[int, int]]:
        """A ``thin_dump`` of one device: its mapped chunks as (first chunk,
        count), in order of the device's address."""
        for tag, attributes in self._elements:
            if tag == "device":
                self.devices_seen += 1
            elif tag == "range_mapping":
                yield _number(attributes, "origin_begin"), _number(attributes, "length")
            elif tag == "single_mapping":
                yield _number(attributes, "origin_block"), 1

    def differences(self) -> Iterator[tuple[int, int]]:
        """A ``thin_delta``: the chunks the two devices do not share as
        (first chunk, count), in order. Chunks mapped to different blocks,
        mapped by the second only, and mapped by the first only (the second
        discarded them) all differ; only ``same`` chunks are left out."""
        for tag, attributes in self._elements:
            if tag in ("different", "left_only", "right_only"):
                yield _number(attributes, "begin"), _number(attributes, "length")
            elif tag not in ("same", "diff"):
                raise ThinMetadataError(f"unexpected element <{tag}> in thin_delta output")


class ThinMetadata:
    """The verbs of a thin pool's own metadata: ``dmsetup`` messages and
    status, and the thin-provisioning tools' listings, run by the same runner
    as LVM (``runner``; one of its own, through ``prefix``, when none is
    given)."""

    def __init__(
        self, prefix: Sequence[str] = (), timeout: float = 120.0, runner: Runner | None = None
    ) -> None:
        self.runner = runner or Runner(prefix=prefix, timeout=timeout)

    def _dmsetup(self, args: Sequence[str], timeout: float | None) -> tuple[int, str, str]:
        done = self.runner.dmsetup(args, timeout)
        return done.returncode, done.stdout, " ".join(done.stderr.split())

    def pool_status(self, volume_group: str, pool: str, timeout: float | None = None) -> PoolStatus:
        """The status of the pool's thin-pool device."""
        status = read_pool_status(self.runner, volume_group, pool, timeout)
        if status is None:
            raise PoolNotActive(
                f"thin pool {volume_group}/{pool} is not active (no thin-pool device "
                f"{dm_name(volume_group, pool, 'tpool')}); activate it with "
                f"lvchange --activate y {volume_group}/{pool}"
            )
        return status

    def metadata_node(self, volume_group: str, pool: str, timeout: float | None = None) -> str:
        """Where the tools read the pool's metadata device: its kernel node.
        Looked up once per metadata snapshot held; the listings take it."""
        check_lv_names(volume_group, pool)
        device = metadata_dm_name(volume_group, pool)
        code, out, err = self._dmsetup(
            ["info", "-c", "--noheadings", "-o", "blkdevname", "--", device], timeout
        )
        if code != 0:
            raise PoolNotActive(
                f"thin pool {volume_group}/{pool} has no metadata device {device} ({err}); "
                f"activate it with lvchange --activate y {volume_group}/{pool}"
            )
        return kernel_node(out)

    def reserve(self, status: PoolStatus, timeout: float | None = None) -> None:
        """Take the pool's metadata snapshot (the kernel commits first)."""
        code, _, err = self._dmsetup(
            ["message", status.device, "0", "reserve_metadata_snap"], timeout
        )
        if code != 0 and _BUSY.search(err):
            raise MetadataSnapshotHeld(f"{status.device} has a metadata snapshot already: {err}")
        if code != 0:
            raise ThinMetadataError(f"reserving a metadata snapshot of {status.device}: {err}")

    def release(self, status: PoolStatus, timeout: float | None = None) -> bool:
        """Let the pool's metadata snapshot go; False when none was held."""
        code, _, err = self._dmsetup(
            ["message", status.device, "0", "release_metadata_snap"], timeout
        )
        if code != 0 and _NOTHING_HELD.search(err):
            return False
        if code != 0:
            raise ThinMetadataError(f"releasing the metadata snapshot of {status.device}: {err}")
        return True

    @contextmanager
    def _listing(self, args: Sequence[str], timeout: float | None) -> Iterator[Listing]:
        """A tool's output as a ``Listing``, read as the caller iterates; the
        tool is stopped if the caller leaves early (these tools only read),
        and its failure raised."""
        with self.runner.stream(args, timeout) as output:
            try:
                yield Listing(xml_elements(output))
            except ElementTree.ParseError as exc:
                raise ThinMetadataError(f"{args[0]} printed unreadable output: {exc}") from exc

    @contextmanager
    def device_details(self, metadata: str, timeout: float | None = None) -> Iterator[Listing]:
        """Every thin device's details, from the metadata snapshot of the
        pool whose metadata device is ``metadata`` (``metadata_node``)."""
        args = ["thin_dump", "--metadata-snap", "--skip-mappings", metadata]
        with self._listing(args, timeout) as listing:
            yield listing

    @contextmanager
    def mapped(self, metadata: str, dev_id: int, timeout: float | None = None) -> Iterator[Listing]:
        """One thin device's mappings, from the metadata snapshot."""
        args = ["thin_dump", "--metadata-snap", "--dev-id", str(dev_id), metadata]
        with self._listing(args, timeout) as listing:
            yield listing

    @contextmanager
    def delta(
        self, metadata: str, base_id: int, target_id: int, timeout: float | None = None
    ) -> Iterator[Listing]:
        """What differs between two thin devices, from the metadata snapshot."""
        args = [
            "thin_delta", "--metadata-snap", "--snap1", str(base_id), "--snap2", str(target_id),
            metadata,
        ]  # fmt: skip
        with self._listing(args, timeout) as listing:
            yield listing
