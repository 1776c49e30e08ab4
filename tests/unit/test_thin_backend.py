"""A thin class's pure logic on LVM records: when its pool is too full for
new volumes, and which of its LVs hold nothing yet."""

from __future__ import annotations

import json

import pytest

from csi_lvm.backends.thin import ThinBackend, pool_fullness
from csi_lvm.config import Config, DeviceClass
from csi_lvm.lifecycle import Lifecycle
from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.records import LogicalVolume, LvAttr, parse_lv_report
from csi_lvm.lvm.runner import Runner
from csi_lvm.volumes import Inventory

THIN = DeviceClass("thin", "vg0", "pool0", overprovision_ratio=4, full_threshold_percent=90)


def pool(
    attr: str = "twi-aotz--", data: float | None = 10.0, meta: float | None = 5.0
) -> LogicalVolume:
    return LogicalVolume(
        name="pool0", vg_name="vg0", uuid="u", size_bytes=1 << 30, attr=LvAttr(attr),
        pool="", origin="", tags=(), data_percent=data, metadata_percent=meta,
        path="", dm_path="", created="",
    )  # fmt: skip


def test_a_pool_with_headroom_takes_new_volumes() -> None:
    assert pool_fullness(THIN, pool(data=89.99, meta=89.99)) is None
    assert pool_fullness(THIN, pool(data=None, meta=None)) is None


@pytest.mark.parametrize(
    ("data", "meta", "fragment"),
    [
        (90.0, 1.0, "vg0/pool0 is 90% full of data (device class thin stops at 90%)"),
        (1.0, 97.5, "is 97.5% full of metadata"),
    ],
)
def test_a_pool_at_the_threshold_is_full_and_says_what_to_do(
    data: float, meta: float, fragment: str
) -> None:
    message = pool_fullness(THIN, pool(data=data, meta=meta))
    assert message is not None and fragment in message
    assert "extend the pool (lvextend) or delete volumes" in message


def test_lvm_health_flags_count_as_full_whatever_the_percentages() -> None:
    message = pool_fullness(THIN, pool(attr="twi-aotzD-", data=50.0))
    assert message == "thin pool vg0/pool0: the thin pool is out of data space"
    meta = pool_fullness(THIN, pool(attr="twi-aotzM-", data=50.0))
    assert meta is not None and "metadata is read-only" in meta


LVS = json.loads("""
{"report": [{"lv": [
  {"lv_name":"pool0", "vg_name":"vg0", "lv_size":"536870912", "lv_attr":"twi-aotz--",
   "pool_lv":"", "data_percent":"12.50", "metadata_percent":"10.94"},
  {"lv_name":"csi-pvc-1", "vg_name":"vg0", "lv_size":"1073741824", "lv_attr":"Vwi-aotz--",
   "pool_lv":"pool0", "lv_tags":"csi-lvm/driver=d,csi-lvm/name=pvc-1", "data_percent":"0.00",
   "lv_dm_path":"/dev/mapper/vg0-csi--pvc--1"}
]}]}
""")
# Nothing runs LVM here: the backend only reads the records it is given.
_LVM = Lvm(Runner(binary="/nonexistent/lvm"))
BACKEND = ThinBackend(THIN, Inventory(Config((THIN,)), _LVM, "node-1", "d"), Lifecycle(_LVM))


def test_only_an_active_thin_lv_reported_at_0_00_percent_may_be_blank() -> None:
    pool, volume = parse_lv_report(LVS)
    assert ThinBackend.reported_unmapped(volume)
    assert not ThinBackend.reported_unmapped(pool)  # a pool is not a volume
    rows = LVS["report"][0]["lv"]
    written = {**rows[1], "data_percent": "0.01"}  # LVM's least non-zero share
    inactive = {**rows[1], "lv_attr": "Vwi---tz--", "data_percent": ""}
    thick = {**rows[1], "lv_attr": "-wi-ao----", "pool_lv": "", "data_percent": ""}
    for row in (written, inactive, thick):
        (lv,) = parse_lv_report({"report": [{"lv": [row]}]})
        assert not ThinBackend.reported_unmapped(lv), row
    # Whether it is: the device's own count, read in the VM's suite
    # (tests/lvm/test_node.py).
