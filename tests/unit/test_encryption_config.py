"""Encrypted classes in the config, and the node-stage secrets' keys: what
is accepted, and what is refused with a message that names the line or the
field but never a key."""

from __future__ import annotations

import pytest

from csi_lvm import crypt
from csi_lvm.config import parse_config
from csi_lvm.errors import ConfigError, InvalidArgument

KEY = "0123456789abcdef0123456789abcdef"


def config(encryption: str, second: str = "") -> str:
    return (
        "deviceClasses:\n"
        "  - name: vault\n    volumeGroup: vg0\n    thinPool: pool0\n"
        f"    nodes: [a-*]\n{encryption}"
        f"  - name: vault\n    volumeGroup: vg1\n    thinPool: pool0\n    nodes: [b-*]\n{second}"
    )


@pytest.mark.parametrize(
    ("line", "encrypted"),
    [("    encryption: luks2\n", True), ("    encryption: none\n", False), ("", False)],
)
def test_encryption_is_luks2_or_none(line: str, encrypted: bool) -> None:
    parsed = parse_config(config(line, line))
    assert [c.encrypted for c in parsed.device_classes] == [encrypted, encrypted]


def test_an_unknown_encryption_is_refused_at_its_line() -> None:
    with pytest.raises(ConfigError, match=r"line 6: encryption 'aes' .* luks2, none"):
        parse_config(config("    encryption: aes\n"))


def test_the_entries_of_a_class_agree_on_encryption() -> None:
    with pytest.raises(ConfigError, match="line 7: .* encrypted on every node or on none"):
        parse_config(config("    encryption: luks2\n"))


def test_the_keys_come_from_the_node_stage_secrets() -> None:
    keys = crypt.keys_from({"key": KEY, "previousKey": KEY[::-1]}, "volume v")
    assert (keys.key, keys.previous) == (KEY.encode(), KEY[::-1].encode())
    assert KEY not in repr(keys)
    assert crypt.keys_from({"key": KEY}, "volume v").previous is None


@pytest.mark.parametrize(
    ("secrets", "fragment"),
    [
        ({}, "no 'key' secret (fields given: none)"),
        ({"passphrase": KEY}, "fields given: passphrase"),
        ({"key": "hunter2"}, "'key' has 7 bytes"),
        ({"key": KEY, "previousKey": "old-secret"}, "'previousKey' has 10 bytes"),
    ],
)
def test_a_missing_or_short_key_is_invalid_and_never_quoted(
    secrets: dict[str, str], fragment: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        crypt.keys_from(secrets, "volume v")
    assert fragment in str(caught.value)
    for value in secrets.values():
        assert value not in str(caught.value)


def test_mapping_names_fit_device_mapper_and_stay_apart() -> None:
    short = crypt.mapping_name("vault", "csi-data")
    assert short == "csi-lvm-vault-csi-data"
    long_a = crypt.mapping_name("vault", "x" * 127)
    long_b = crypt.mapping_name("vault", "x" * 126 + "y")
    assert len(long_a) <= 127 and len(long_b) <= 127 and long_a != long_b
