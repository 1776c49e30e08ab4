from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from csi_lvm.errors import status_for
from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.errors import (
    LvmAlreadyExists,
    LvmBadName,
    LvmError,
    LvmInUse,
    LvmNoSpace,
    LvmNotFound,
    LvmPoolCheckFailed,
    LvmPoolNeedsRepair,
    LvmTimeout,
    LvmToolMissing,
    classify_failure,
)
from csi_lvm.lvm.records import LvAttr, parse_lv_report, parse_vg_report
from csi_lvm.lvm.runner import Runner, config_overrides_from

ROOT = Path(__file__).resolve().parents[2]

LVS = json.loads("""
{"report": [{"lv": [
  {"lv_name":"pool0", "vg_name":"vg0", "lv_uuid":"u1", "lv_size":"536870912", "lv_attr":"twi-aotz--",
   "pool_lv":"", "origin":"", "lv_tags":"", "data_percent":"12.50", "metadata_percent":"10.94",
   "lv_path":"", "lv_dm_path":"/dev/mapper/vg0-pool0", "lv_time":"2026-11-25 22:50:01 +0000"},
  {"lv_name":"csi-pvc-1", "vg_name":"vg0", "lv_uuid":"u2", "lv_size":"1073741824", "lv_attr":"Vwi-aotz--",
   "pool_lv":"pool0", "origin":"", "lv_tags":"csi-lvm/driver=d,csi-lvm/name=pvc-1",
   "data_percent":"0.00", "metadata_percent":"", "lv_path":"/dev/vg0/csi-pvc-1",
   "lv_dm_path":"/dev/mapper/vg0-csi--pvc--1", "lv_time":"2026-11-25 22:51:02 +0000"}
]}]}
""")


def test_lv_report_decodes_into_typed_records() -> None:
    pool, volume = parse_lv_report(LVS)
    assert pool.attr.is_thin_pool and pool.data_percent == 12.5 and pool.size_bytes == 512 << 20
    assert volume.attr.is_thin_volume and volume.attr.active and volume.attr.device_open
    assert volume.tags == ("csi-lvm/driver=d", "csi-lvm/name=pvc-1")
    assert volume.metadata_percent is None
    assert volume.full_name == "vg0/csi-pvc-1"
    assert volume.device == "/dev/mapper/vg0-csi--pvc--1"
    assert volume.created_at is not None and volume.created_at.minute == 51


def test_vg_report() -> None:
    (vg,) = parse_vg_report(
        {
            "report": [
                {
                    "vg": [
                        {
                            "vg_name": "vg0",
                            "vg_size": "8589934592",
                            "vg_free": "4194304",
                            "vg_extent_size": "4194304",
                            "vg_attr": "wz--n-",
                            "pv_count": "1",
                            "vg_missing_pv_count": "0",
                        }
                    ]
                }
            ]
        }
    )
    assert (vg.size_bytes, vg.free_bytes, vg.extent_bytes, vg.partial) == (
        8 << 30,
        4 << 20,
        4 << 20,
        False,
    )


@pytest.mark.parametrize(
    ("attr", "problem"),
    [
        ("Vwi-aotz--", None),
        ("Vwi---tz-k", None),
        ("twi-aotzD-", "out of data space"),
        ("twi-aotzM-", "metadata is read-only"),
        ("Vwi-aotzF-", "failed"),
        ("-wi-a---p-", "missing (partial)"),
        ("-wi-d-----", "without a table"),
    ],
)
def test_lv_attr_health(attr: str, problem: str | None) -> None:
    found = LvAttr(attr).problem
    assert found == problem if problem is None else (found is not None and problem in found)


def test_cow_snapshot_states() -> None:
    assert LvAttr("swi-a-s---").is_cow_snapshot and not LvAttr("swi-a-s---").snapshot_invalid
    assert LvAttr("swi-I-s---").snapshot_invalid
    assert LvAttr("Swi-a-s---").snapshot_invalid
    assert not LvAttr("-wi-a-----").is_cow_snapshot


def test_skip_activation_flag() -> None:
    assert LvAttr("Vwi---tz-k").skip_activation and not LvAttr("Vwi---tz-k").active


@pytest.mark.parametrize(
    ("stderr", "error"),
    [
        ('  Logical Volume "csi-x" already exists in volume group "vg0"', LvmAlreadyExists),
        (
            '  Volume group "vg0" has insufficient free space (10 extents): 256 required.',
            LvmNoSpace,
        ),
        (
            "  Cannot create new thin volume, free space in thin pool vg0/pool0 reached threshold.",
            LvmNoSpace,
        ),
        ('  Failed to find logical volume "vg0/csi-x"', LvmNotFound),
        ('  Volume group "vg9" not found', LvmNotFound),
        ("  Logical volume vg0/csi-x in use.", LvmInUse),
        ('  Can\'t remove open logical volume "snap-x"', LvmInUse),
        (  # the message an e2e run met on a pool's first activation
            "  Check of pool vg0/pool0 failed (status:1). Manual repair required!\n"
            "  Failed to activate thin pool vg0/pool0.",
            LvmPoolCheckFailed,
        ),
        ("  Something unexpected", LvmError),
    ],
)
def test_failures_are_classified(stderr: str, error: type[Exception]) -> None:
    found = classify_failure(["lvm", "lvcreate"], 5, stderr)
    assert type(found) is error


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (LvmNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (LvmAlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
        (LvmNoSpace("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (LvmInUse("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (LvmPoolNeedsRepair("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (LvmPoolCheckFailed("x"), grpc.StatusCode.UNAVAILABLE),
        (LvmToolMissing("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (LvmTimeout("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (LvmBadName("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (LvmError("lvm lvs failed: x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_lvm_errors_that_no_servicer_translated_get_their_status(
    error: LvmError, code: grpc.StatusCode
) -> None:
    assert status_for(error) == (code, str(error))


def test_names_are_checked_before_reaching_lvm() -> None:
    lvm = Lvm(Runner(binary="/nonexistent/lvm"))
    for bad in ("../x", "a b", "-rf", "", ".."):
        with pytest.raises(LvmBadName):
            lvm.find_lv("vg0", bad)
    with pytest.raises(LvmBadName):
        lvm.create_thin_volume("vg0", "pool0", "ok", 1 << 20, ["bad tag with space"])


def test_a_pool_transaction_mismatch_is_named_and_not_mistaken_for_no_space() -> None:
    # What lvcreate said in the crash test after a kill in the middle of a thin create.
    stderr = (
        "  WARNING: Thin pool vg0/pool0 has unexpected transaction id 25, expecting 26.\n"
        "  Cannot create new thin volume, free space in thin pool vg0/pool0 reached threshold.\n"
    )
    error = classify_failure(["lvm", "lvcreate"], 5, stderr)
    assert isinstance(error, LvmPoolNeedsRepair) and not isinstance(error, LvmNoSpace)
    assert "unexpected transaction id 25" in str(error) and "lvmthin(7)" in str(error)


def test_container_settings_reach_every_command_as_one_config_argument() -> None:
    text = (ROOT / "deploy" / "image" / "lvmlocal.conf").read_text()
    overrides = config_overrides_from(text)
    assert "#" not in overrides and "\n" not in overrides
    assert "udev_sync = 0" in overrides and overrides.startswith("activation {")
    lvm = Lvm(Runner(binary="/nonexistent/lvm", config_overrides=overrides))
    assert lvm.runner._with_overrides(["lvs", "-o", "lv_name", "vg0"]) == [
        "lvs", "--config", overrides, "-o", "lv_name", "vg0",
    ]  # fmt: skip
    assert Lvm().runner._with_overrides(["lvs", "vg0"]) == ["lvs", "vg0"]
