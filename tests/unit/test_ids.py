from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_lvm.errors import InvalidArgument
from csi_lvm.ids import (
    MAX_ID_BYTES,
    Kind,
    ObjectId,
    Tag,
    check_csi_name,
    decode_tags,
    encode_tags,
    escape_tag_value,
    kind_of_lv,
    lv_name_for,
    node_component,
    unescape_tag_value,
)
from csi_lvm.lvm.names import NAME_RE, TAG_RE


def test_readable_names_keep_their_shape() -> None:
    assert lv_name_for(Kind.VOLUME, "pvc-0b7c4d1e") == "csi-pvc-0b7c4d1e"
    assert lv_name_for(Kind.SNAPSHOT, "snapshot-1") == "snap-snapshot-1"


def test_unusual_names_are_hashed_and_cannot_collide_with_readable_ones() -> None:
    hashed = lv_name_for(Kind.VOLUME, "../../etc/passwd")
    assert hashed.startswith("csi_") and len(hashed) == 44
    assert lv_name_for(Kind.VOLUME, "A") != lv_name_for(Kind.VOLUME, "a")


@given(st.text(min_size=1, max_size=128))
def test_every_name_gives_a_valid_lv_name_of_its_kind(name: str) -> None:
    for kind in Kind:
        lv_name = lv_name_for(kind, name)
        assert NAME_RE.fullmatch(lv_name)
        assert kind_of_lv(lv_name) is kind


@given(st.text(min_size=1, max_size=200), st.sampled_from(["thin", "thick", "a" * 32]))
def test_ids_round_trip_and_fit_128_bytes(node: str, device_class: str) -> None:
    lv_name = lv_name_for(Kind.VOLUME, "x" * 48)
    object_id = ObjectId.build(node, device_class, lv_name)
    text = str(object_id)
    assert len(text.encode()) <= MAX_ID_BYTES
    assert ObjectId.parse(text) == object_id
    assert object_id.node == node_component(node)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "fake-vol-id",
        "node:thin:root",  # a hand-made LV name
        "node:thin:csi-",
        "node:Thin:csi-pvc-1",
        "node:thin:csi-pvc-1:extra",
        "no de:thin:csi-pvc-1",
        "node:thin:csi_" + "0" * 39,
        "node:thin:csi-" + "a" * 49,
        "node:thin:../csi-x",
    ],
)
def test_malformed_ids_are_rejected(text: str) -> None:
    assert ObjectId.parse(text) is None


def test_long_node_names_are_hashed() -> None:
    assert node_component("n1") == "n1"
    long = "node-" + "x" * 60 + ".example.com"
    assert node_component(long).startswith("=") and len(node_component(long)) == 17


# 80 characters escape to at most 80 x 4 bytes x 3 = 960 tag characters, within
# LVM's 1024 (CSI names are at most 128 bytes; longer values are refused).
@given(st.text(max_size=80))
def test_tag_values_round_trip_with_only_lvm_tag_characters(value: str) -> None:
    escaped = escape_tag_value(value)
    assert unescape_tag_value(escaped) == value
    tags = encode_tags({Tag.NAME: value or "x"})
    assert all(TAG_RE.fullmatch(tag) for tag in tags)
    assert decode_tags(tags)[Tag.NAME] == (value or "x")


def test_foreign_and_malformed_tags_are_ignored() -> None:
    decoded = decode_tags(
        ["owner=bob", "csi-lvm/unknown=1", "csi-lvm/name=+ZZ", "csi-lvm/class=thin"]
    )
    assert decoded == {Tag.CLASS: "thin"}


def test_name_checks() -> None:
    check_csi_name("x" * 128)
    with pytest.raises(InvalidArgument, match="required"):
        check_csi_name("")
    with pytest.raises(InvalidArgument, match="128 bytes"):
        check_csi_name("é" * 65)
