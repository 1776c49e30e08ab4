"""When a thin pool is too full for new volumes: pure logic on LVM records."""

from __future__ import annotations

import pytest

from csi_lvm.config import DeviceClass
from csi_lvm.lvm import LogicalVolume, LvAttr
from csi_lvm.volumes import pool_fullness

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
