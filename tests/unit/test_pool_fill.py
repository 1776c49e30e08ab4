"""A thin pool's live fill, read from the kernel's status line: the pure
parse, and where the verbs look for the pool's device, with a stand-in for
``dmsetup`` behind the runner's prefix (this kernel has no device-mapper)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.errors import LvmBadName, LvmToolMissing, PoolNotActive
from csi_lvm.lvm.names import pool_dm_names
from csi_lvm.lvm.records import PoolFill, parse_pool_status
from csi_lvm.lvm.runner import Runner
from csi_lvm.lvm.thin_metadata import ThinMetadata

# What ``dmsetup status -- NAME`` prints for each device the stand-in knows;
# any other name fails as dmsetup does ("Device does not exist").
STANDIN = """
import json, sys
devices = json.load(open(sys.argv[1]))
args = sys.argv[2:]
with open(sys.argv[1] + ".calls", "a") as calls:
    calls.write(" ".join(args) + "\\n")
assert args[:3] == ["dmsetup", "status", "--"], args
if args[3] not in devices:
    sys.stderr.write("Device does not exist.\\nCommand failed.\\n")
    sys.exit(1)
print(devices[args[3]])
"""

POOL_LINE = "0 65536 thin-pool 4 150/4096 410/512 - rw discard_passdown queue_if_no_space - 1024"


def standin(tmp_path: Path, devices: dict[str, str]) -> tuple[Lvm, Path]:
    table = tmp_path / "devices.json"
    table.write_text(json.dumps(devices))
    script = tmp_path / "dmsetup_standin.py"
    script.write_text(STANDIN)
    return Lvm(Runner(prefix=[sys.executable, str(script), str(table)])), Path(f"{table}.calls")


def test_the_status_line_gives_the_fill_as_the_kernel_counts_it() -> None:
    status = parse_pool_status("vg-p-tpool", POOL_LINE)
    assert status is not None
    assert status.fill == PoolFill(
        data_percent=100 * 410 / 512, metadata_percent=100 * 150 / 4096, mode="rw",
        needs_check=False,
    )  # fmt: skip
    full = parse_pool_status(
        "d", "0 65536 thin-pool 9 151/4096 512/512 - out_of_data_space no_discard_passdown "
        "error_if_no_space needs_check 1024",
    )  # fmt: skip
    assert full is not None and full.fill == PoolFill(
        100.0, 100 * 151 / 4096, "out_of_data_space", True
    )
    read_only = parse_pool_status("d", "0 65536 thin-pool 9 4096/4096 12/512 - ro discard_passdown")
    assert read_only is not None and read_only.fill.mode == "ro" and not read_only.fill.needs_check
    # The kernel's word for a failed pool, a linear device, and nonsense.
    for line in ("0 65536 thin-pool Fail", "0 65536 linear", "0 1 thin-pool 4 x/1 1/1 - rw", ""):
        assert parse_pool_status("d", line) is None, line


def test_the_pool_s_device_names_double_the_dashes() -> None:
    assert pool_dm_names("a-b", "p") == ("a--b-p-tpool", "a--b-p")
    assert pool_dm_names("vg0", "thin-pool") == ("vg0-thin--pool-tpool", "vg0-thin--pool")


def test_the_fill_is_read_from_the_tpool_layer_while_thin_volumes_use_the_pool(
    tmp_path: Path,
) -> None:
    # LVM's pool device over the tpool layer is linear: its status says nothing.
    lvm, calls = standin(tmp_path, {"a--b-p-tpool": POOL_LINE, "a--b-p": "0 65536 linear 253:4 0"})
    assert lvm.pool_fill("a-b", "p") == PoolFill(100 * 410 / 512, 100 * 150 / 4096, "rw", False)
    assert calls.read_text().splitlines() == ["dmsetup status -- a--b-p-tpool"]


def test_a_pool_without_a_tpool_layer_is_read_at_its_own_name(tmp_path: Path) -> None:
    lvm, calls = standin(tmp_path, {"a--b-p": POOL_LINE})
    fill = lvm.pool_fill("a-b", "p")
    assert fill is not None and fill.data_percent == 100 * 410 / 512
    assert calls.read_text().splitlines() == [
        "dmsetup status -- a--b-p-tpool", "dmsetup status -- a--b-p",
    ]  # fmt: skip


def test_an_inactive_pool_has_no_fill_and_the_metadata_verbs_say_so(tmp_path: Path) -> None:
    lvm, _ = standin(tmp_path, {"vg0-other-tpool": POOL_LINE})
    assert lvm.pool_fill("vg0", "p") is None
    # The thin-metadata verbs share the lookup, through the same runner.
    with pytest.raises(PoolNotActive, match="lvchange --activate y vg0/p"):
        ThinMetadata(runner=lvm.runner).pool_status("vg0", "p")


def test_names_are_checked_before_dmsetup_runs_and_a_missing_dmsetup_is_said(
    tmp_path: Path,
) -> None:
    lvm, calls = standin(tmp_path, {})
    with pytest.raises(LvmBadName):
        lvm.pool_fill("vg0", "--help")
    assert not calls.exists()
    with pytest.raises(LvmToolMissing, match="dmsetup"):
        Lvm(Runner(prefix=[str(tmp_path / "no-such-program")])).pool_fill("vg0", "p")
