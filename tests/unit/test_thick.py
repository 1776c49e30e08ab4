from __future__ import annotations

from csi_lvm.backends.thick import VIEW_MINIMUM_BYTES, view_bytes

MiB = 1 << 20
EXTENT = 4 * MiB


def test_the_view_is_a_fifth_of_the_source_within_bounds() -> None:
    assert view_bytes(10 * 1024 * MiB, EXTENT) == 2048 * MiB
    assert view_bytes(100 * MiB, EXTENT) == VIEW_MINIMUM_BYTES  # at least 64 MiB
    assert view_bytes(8 * MiB, EXTENT) == 8 * MiB  # never more than the source
    assert view_bytes(1001 * MiB, EXTENT) % EXTENT == 0  # whole extents
