"""Reading thin-provisioning-tools' XML as it streams in, the pool's status
line and device-mapper names. The documents are thin_dump's and thin_delta's
own output (0.9.0, the version Debian bookworm ships in the image and the
VM), recorded from a pool whose snapshots saw a write inside an
already-written chunk, a new chunk and a discard."""

from __future__ import annotations

import io
import sys
import time
import tracemalloc
from collections.abc import Iterator

import pytest

from csi_lvm.lvm.errors import (
    LvmNotFound,
    LvmTimeout,
    ThinDeviceMissing,
    ThinMetadataError,
    classify_tool_failure,
)
from csi_lvm.lvm.names import dm_name, metadata_dm_name
from csi_lvm.lvm.records import parse_pool_status
from csi_lvm.lvm.thin_metadata import (
    Listing,
    ThinMetadata,
    kernel_node,
    xml_elements,
)

DUMP_ONE_DEVICE = b"""<superblock uuid="" time="2" transaction="3" flags="0" version="2" data_block_size="128" nr_data_blocks="0">
  <device dev_id="3" mapped_blocks="4" transaction="2" creation_time="2" snap_time="2">
    <single_mapping origin_block="2" data_block="4" time="1"/>
    <range_mapping origin_begin="4" data_begin="2" length="2" time="0"/>
    <single_mapping origin_block="100" data_block="5" time="1"/>
  </device>
</superblock>
"""
DEVICE_DETAILS = b"""<superblock uuid="" time="2" transaction="3" flags="0" version="2" data_block_size="128" nr_data_blocks="0">
  <device dev_id="1" mapped_blocks="4" transaction="0" creation_time="0" snap_time="2">
  </device>
  <device dev_id="2" mapped_blocks="4" transaction="1" creation_time="1" snap_time="1">
  </device>
  <device dev_id="3" mapped_blocks="4" transaction="2" creation_time="2" snap_time="2">
  </device>
</superblock>
"""
DELTA = b"""<superblock uuid="" time="2" transaction="3" data_block_size="128" nr_data_blocks="0">
  <diff left="2" right="3">
    <different begin="2" length="1"/>
    <left_only begin="3" length="1"/>
    <same begin="4" length="2"/>
    <right_only begin="100" length="1"/>
  </diff>
</superblock>
"""


class Trickle(io.RawIOBase):
    """A pipe that hands out a few bytes per read, as a tool's output
    arrives: elements split across reads must still parse."""

    def __init__(self, data: bytes, step: int = 7) -> None:
        self.data, self.step, self.at = data, step, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        piece = self.data[self.at : self.at + self.step]
        self.at += len(piece)
        return piece


def listing(data: bytes, step: int = 7) -> Listing:
    return Listing(xml_elements(Trickle(data, step)))  # type: ignore[arg-type]


def test_one_device_s_mappings_in_chunks() -> None:
    dump = listing(DUMP_ONE_DEVICE)
    assert dump.chunk_bytes == 128 * 512
    assert list(dump.mappings()) == [(2, 1), (4, 2), (100, 1)]
    assert dump.devices_seen == 1


def test_a_dump_without_the_device_says_so() -> None:
    empty = listing(
        b'<superblock uuid="" time="0" transaction="1" data_block_size="256" nr_data_blocks="0">\n</superblock>\n'
    )
    assert empty.chunk_bytes == 128 * 1024
    assert list(empty.mappings()) == []
    assert empty.devices_seen == 0


def test_device_details_carry_the_pool_s_clock() -> None:
    devices = list(listing(DEVICE_DETAILS, 13).devices())
    assert [(d.dev_id, d.creation_time) for d in devices] == [(1, 0), (2, 1), (3, 2)]
    assert devices[0].snap_time == 2 and devices[2].mapped_blocks == 4


def test_the_delta_is_every_chunk_not_shared() -> None:
    """Rewritten (different), discarded in the target (left_only) and new in
    the target (right_only) all changed; shared chunks (same) did not."""
    assert list(listing(DELTA, 5).differences()) == [(2, 1), (3, 1), (100, 1)]


def test_output_without_a_superblock_or_with_strange_elements_is_refused() -> None:
    with pytest.raises(ThinMetadataError, match="no superblock"):
        listing(b"<nothing/>")
    strange = listing(DELTA.replace(b"left_only", b"mystery"))
    with pytest.raises(ThinMetadataError, match="mystery"):
        list(strange.differences())
    with pytest.raises(ThinMetadataError, match="origin_begin"):
        list(listing(DUMP_ONE_DEVICE.replace(b'origin_begin="4"', b"")).mappings())


class GeneratedDump(io.RawIOBase):
    """A thin_dump of ``count`` single mappings, made as it is read: the
    document itself is never in memory."""

    def __init__(self, count: int) -> None:
        self.parts = self._parts(count)
        self.pending = b""

    @staticmethod
    def _parts(count: int) -> Iterator[bytes]:
        yield b'<superblock uuid="" time="1" transaction="1" data_block_size="128" nr_data_blocks="0">\n'
        yield b'  <device dev_id="1" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0">\n'
        for block in range(count):
            yield f'    <single_mapping origin_block="{2 * block}" data_block="{block}" time="0"/>\n'.encode()
        yield b"  </device>\n</superblock>\n"

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while len(self.pending) < size:
            part = next(self.parts, None)
            if part is None:
                break
            self.pending += part
        piece, self.pending = self.pending[:size], self.pending[size:]
        return piece


def test_a_long_dump_streams_in_constant_memory() -> None:
    count = 100_000  # about 7 MB of XML
    tracemalloc.start()
    try:
        dump = Listing(xml_elements(GeneratedDump(count)))  # type: ignore[arg-type]
        seen = 0
        last = -1
        for begin, length in dump.mappings():
            assert begin > last and length == 1
            last, seen = begin, seen + 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == count
    assert peak < 4 << 20, f"peak {peak} bytes: the parsed tree is kept"


def test_a_pool_s_status_line() -> None:
    free = parse_pool_status(
        "vg-pool0-tpool",
        "0 524288 thin-pool 3 113/1024 6/4096 - rw discard_passdown queue_if_no_space - 256",
    )
    assert free is not None and free.held_root is None and free.transaction_id == 3
    assert free.mode == "rw" and free.device == "vg-pool0-tpool"
    assert free.metadata_blocks == (113, 1024) and free.data_blocks == (6, 4096)
    assert free.data_percent == 100 * 6 / 4096 and free.metadata_percent == 100 * 113 / 1024
    assert not free.needs_check
    held = parse_pool_status("d", "0 524288 thin-pool 3 114/1024 6/4096 812 rw discard_passdown")
    assert held is not None and held.held_root == 812
    # A pool whose metadata the kernel wants checked says so after its options.
    checked = parse_pool_status(
        "d",
        "0 524288 thin-pool 3 114/1024 4096/4096 - out_of_data_space discard_passdown "
        "error_if_no_space needs_check 256",
    )
    assert checked is not None and checked.needs_check and checked.data_percent == 100.0
    assert checked.mode == "out_of_data_space"
    assert parse_pool_status("d", "0 524288 linear ") is None
    assert parse_pool_status("d", "") is None


def test_device_mapper_names_double_the_dashes_inside_names() -> None:
    assert dm_name("vg0", "pool0", "tpool") == "vg0-pool0-tpool"
    assert dm_name("my-vg", "thin-pool") == "my--vg-thin--pool"
    assert metadata_dm_name("my-vg", "pool0") == "my--vg-pool0_tmeta"


def test_the_tools_read_the_kernel_s_own_node_of_the_metadata_dm_name() -> None:
    assert kernel_node("dm-12\n") == "/dev/dm-12"
    for odd in ("", "sda", "../dm-1", "dm-1 dm-2"):
        with pytest.raises(ThinMetadataError):
            kernel_node(odd)


def test_tool_failures_are_classified() -> None:
    missing = classify_tool_failure(
        ["thin_delta"], 1, "Unable to find mapping tree for snap2 (99) Usage: thin_delta [options]"
    )
    assert isinstance(missing, ThinDeviceMissing) and isinstance(missing, LvmNotFound)
    assert "Usage" not in str(missing)
    gone = classify_tool_failure(["thin_dump"], 1, "no current metadata snap")
    assert isinstance(gone, ThinMetadataError) and "metadata snapshot is gone" in str(gone)
    other = classify_tool_failure(["thin_dump"], 2, "")
    assert "exit code 2" in str(other) and "no message" in str(other)


# The tool runner, with stand-ins for the thin tools (they need device-mapper):
# a process that prints a document, one that fails, one that hangs.
def printing(document: bytes, code: int = 0) -> list[str]:
    script = (
        f"import sys; sys.stdout.buffer.write({document!r}); sys.stdout.flush(); sys.exit({code})"
    )
    return [sys.executable, "-c", script]


def test_a_tool_s_document_is_read_and_its_exit_checked() -> None:
    tools = ThinMetadata()
    with tools._listing(printing(DELTA), timeout=30) as delta:
        assert list(delta.differences()) == [(2, 1), (3, 1), (100, 1)]
    with (
        pytest.raises(ThinDeviceMissing),
        tools._listing(
            [
                sys.executable,
                "-c",
                "import sys; sys.stderr.write('Unable to find mapping tree for snap2 (9)'); sys.exit(1)",
            ],
            timeout=30,
        ) as listing,
    ):
        list(listing.differences())
    failing = tools._listing(printing(DELTA, code=3), timeout=30)
    with pytest.raises(ThinMetadataError, match="exit code 3"), failing as delta:
        list(delta.differences())


ENDLESS_DUMP = (
    "import sys, itertools\n"
    "out = sys.stdout\n"
    'out.write(\'<superblock uuid="" time="1" transaction="1" data_block_size="128" nr_data_blocks="0">\\n\')\n'
    'out.write(\'<device dev_id="1" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0">\\n\')\n'
    "for block in itertools.count():\n"
    '    out.write(f\'<single_mapping origin_block="{block}" data_block="{block}" time="0"/>\\n\')\n'
)


def test_a_reader_that_stops_early_stops_the_tool() -> None:
    """A tool that would print forever: the reader takes one mapping and
    leaves; the tool is stopped, and that is no error."""
    started = time.monotonic()
    with ThinMetadata()._listing([sys.executable, "-c", ENDLESS_DUMP], timeout=30) as dump:
        first = next(dump.mappings())
    assert first == (0, 1)
    assert time.monotonic() - started < 20


def test_a_tool_past_the_call_s_time_is_stopped() -> None:
    started = time.monotonic()
    hanging = ThinMetadata()._listing(["sleep", "30"], timeout=0.5)
    with pytest.raises(LvmTimeout, match="did not finish within 0.5s"), hanging as listing:
        list(listing.mappings())
    assert time.monotonic() - started < 10
