"""The stress suite (crashes, concurrency, hostile input) shares the real-LVM
suite's throwaway volume group; each test module starts its own driver."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from csi_lvm.ids import Tag, decode_tags
from tests.lvm.conftest import HANDMADE_LV, name, vg, workdir
from tests.testbed import DRIVER_NAME

__all__ = [
    "HANDMADE_LV",
    "RESULTS",
    "lv_report",
    "name",
    "owned_by_driver",
    "untouched_part",
    "vg",
    "workdir",
]

RESULTS = Path(__file__).resolve().parents[2] / "build" / "vm"


def lv_report(vg_name: str) -> list[dict[str, str]]:
    """Every visible LV of the group as LVM reports it (name, size, attr, tags)."""
    out = subprocess.run(
        ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix",
         "-o", "lv_name,lv_size,lv_attr,lv_tags", vg_name],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows: list[dict[str, str]] = json.loads(out)["report"][0]["lv"]
    return rows


def owned_by_driver(row: dict[str, str]) -> dict[Tag, str] | None:
    tags = decode_tags([t for t in row["lv_tags"].split(",") if t])
    return tags if tags.get(Tag.DRIVER) == DRIVER_NAME else None


def untouched_part(rows: list[dict[str, str]]) -> list[tuple[str, str, str, str]]:
    """What the driver must never change: every LV it does not own, exactly."""
    return sorted(
        (r["lv_name"], r["lv_size"], _settled_attr(r["lv_attr"]), r["lv_tags"])
        for r in rows
        if owned_by_driver(r) is None
    )


def _settled_attr(attr: str) -> str:
    """lv_attr without a thin pool's "open" flag: LVM keeps a pool open while
    any thin LV of it is active, whoever made that LV."""
    return attr[:5] + "-" + attr[6:] if attr.startswith("t") else attr
