"""Device-class layouts: the config's named settings (what each layout
accepts, and every refusal at its line), the lvcreate options they become,
and how large a volume the PVs' free extents hold. The arithmetic is checked
against LVM itself in tests/lvm/test_layouts.py (capacity made exactly)."""

from __future__ import annotations

import pytest

from csi_lvm.config import parse_config
from csi_lvm.config_fields import parse_bytes
from csi_lvm.errors import ConfigError
from csi_lvm.lvm.commands import layout_args
from csi_lvm.lvm.layouts import Layout, MiB, integrity_metadata_bytes

EXTENT = 4 * MiB


def thick(settings: str) -> str:
    return f"deviceClasses:\n  - name: shaped\n    volumeGroup: vg0\n{settings}"


def only_class(settings: str) -> Layout:
    return parse_config(thick(settings)).device_classes[0].layout


@pytest.mark.parametrize(
    ("settings", "layout"),
    [
        ("", Layout()),
        ("    layout: striped\n", Layout("striped", stripes=2)),
        (
            "    layout: striped\n    stripes: 3\n    stripeSize: 128Ki\n",
            Layout("striped", 3, 128 << 10),
        ),
        ("    layout: raid1\n", Layout("raid1", mirrors=1)),
        (
            "    layout: raid1\n    mirrors: 2\n    integrity: true\n",
            Layout("raid1", 1, 0, 2, True),
        ),
        ("    layout: raid10\n    stripes: 3\n", Layout("raid10", stripes=3, mirrors=1)),
    ],
)
def test_each_layout_reads_its_named_settings(settings: str, layout: Layout) -> None:
    assert only_class(settings) == layout


@pytest.mark.parametrize(
    ("settings", "line", "fragment"),
    [
        ("    layout: raid5\n", 4, "use one of linear, striped, raid1, raid10"),
        ("    layout: raid1\n    stripes: 2\n", 5, "stripes applies to layout striped and raid10"),
        ("    stripeSize: 64Ki\n", 4, "this class's layout is linear"),
        ("    layout: striped\n    mirrors: 1\n", 5, "mirrors applies to layout raid1 and raid10"),
        ("    layout: striped\n    integrity: true\n", 5, "integrity applies to layout raid1"),
        ("    layout: striped\n    stripes: 1\n", 5, "whole number from 2 to 128"),
        ("    layout: striped\n    stripes: 2.5\n", 5, "whole number"),
        ("    layout: striped\n    stripeSize: 48Ki\n", 5, "power of two"),
        ("    layout: striped\n    stripeSize: 2Ki\n", 5, "power of two from 4Ki"),
        ("    layout: raid1\n    mirrors: 10\n", 5, "from 1 to 9"),
        ("    layout: raid10\n    mirrors: 2\n", 5, "use layout raid1"),
        ("    layout: raid1\n    integrity: maybe\n", 5, "true or false"),
        ("    spare: lots\n", 4, "spare must be a number of bytes"),
        ("    layout: '--type=raid0'\n", 4, "is not one csi-lvm makes"),
    ],
)
def test_a_setting_a_layout_does_not_take_is_refused_at_its_line(
    settings: str, line: int, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        only_class(settings)
    assert f"line {line}:" in str(caught.value)
    assert fragment in str(caught.value)


def test_a_thin_class_names_its_pools_layout_and_nothing_lvcreate_would_take() -> None:
    base = "deviceClasses:\n  - name: t\n    volumeGroup: vg0\n    thinPool: p\n"
    layout = parse_config(base + "    layout: raid1\n").device_classes[0].layout
    assert layout.kind == "raid1"
    for key in ("stripes: 2", "mirrors: 1", "integrity: true", "stripeSize: 64Ki"):
        with pytest.raises(ConfigError, match="applies to thick classes only"):
            parse_config(base + f"    layout: raid1\n    {key}\n")


def test_the_entries_of_a_class_agree_on_its_layout() -> None:
    text = (
        "deviceClasses:\n"
        "  - name: m\n    volumeGroup: vg0\n    layout: raid1\n    nodes: [a]\n"
        "  - name: m\n    volumeGroup: vg0\n    nodes: [b]\n"
    )
    with pytest.raises(ConfigError, match="line 6: .*same layout settings"):
        parse_config(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("4096", 4096), ("64Ki", 65536), ("10Gi", 10 << 30), ("1G", 10**9), ("1.5Gi", None),
     ("-1", None), ("Gi", None), ("10 GiB", None)],
)  # fmt: skip
def test_quantities_of_bytes(text: str, value: int | None) -> None:
    assert parse_bytes(text) == value


def test_spare_is_read_in_bytes() -> None:
    assert parse_config(thick("    spare: 512Mi\n")).device_classes[0].spare_bytes == 512 * MiB


@pytest.mark.parametrize(
    ("layout", "args"),
    [
        (Layout(), []),
        (Layout("striped", 2), ["--type", "striped", "--stripes", "2"]),
        (
            Layout("striped", 4, 256 << 10),
            ["--type", "striped", "--stripes", "4", "--stripesize", "256k"],
        ),
        (Layout("raid1", mirrors=2), ["--type", "raid1", "--mirrors", "2"]),
        (
            Layout("raid1", mirrors=1, integrity=True),
            ["--type", "raid1", "--mirrors", "1", "--raidintegrity", "y"],
        ),
        (
            Layout("raid10", stripes=2, mirrors=1),
            ["--type", "raid10", "--stripes", "2", "--mirrors", "1"],
        ),
    ],
)
def test_a_layout_becomes_lvcreates_options(layout: Layout, args: list[str]) -> None:
    assert layout_args(layout) == args


@pytest.mark.parametrize(
    ("layout", "free", "largest_extents"),
    [
        (Layout(), [10, 20, 5], 35),  # linear spans PVs
        (Layout("striped", 2), [100, 60, 7], 120),  # two stripes of the second-largest
        (Layout("striped", 3), [100, 60], 0),  # fewer PVs than stripes
        (Layout("raid1", mirrors=1), [100, 100], 99),  # one extent of RAID metadata per image
        (Layout("raid1", mirrors=1), [100, 50, 40], 49),
        (Layout("raid1", mirrors=2), [100, 100], 0),
        (Layout("raid10", 2, mirrors=1), [10, 10, 10, 10], 18),
        (Layout("raid10", 2, mirrors=1), [10, 10, 10, 3], 4),
        (Layout("raid1", mirrors=1, integrity=True), [100, 100], 97),  # 4 MiB + 4 MiB journal
    ],
)
def test_the_largest_volume_puts_each_image_on_a_pv_of_its_own(
    layout: Layout, free: list[int], largest_extents: int
) -> None:
    largest = layout.largest(free, EXTENT)
    assert largest == largest_extents * EXTENT
    if largest:
        assert layout.fits(largest, free, EXTENT)
    assert not layout.fits(largest + EXTENT * layout.stripes, free, EXTENT)


def test_integrity_metadata_grows_with_the_image() -> None:
    assert integrity_metadata_bytes(100 * MiB) == 8 * MiB
    assert integrity_metadata_bytes(600 * MiB) == 8 * MiB + 8 * MiB
    assert integrity_metadata_bytes(3 << 30) == 7 * 4 * MiB + 32 * MiB
    assert integrity_metadata_bytes(10 << 30) == 21 * 4 * MiB + 64 * MiB


def test_usable_shares_and_descriptions() -> None:
    mirror = Layout("raid1", mirrors=2, integrity=True)
    assert mirror.copies == 3 and mirror.images == 3
    assert mirror.usable_share(300) == 100
    assert mirror.describe() == "raid1, 3 copies, integrity"
    assert Layout("raid10", 2, 64 << 10, 1).describe() == "raid10, 2 stripes of 64 KiB, 2 copies"
    assert Layout("raid10", 2, mirrors=1).images == 4
