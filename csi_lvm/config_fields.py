"""Typed reads of a YAML config's nodes: each value checked as it is read,
and each failure a ConfigError that names the file and line, so that an
admin can fix a config map without reading code."""

from __future__ import annotations

import re

import yaml

from csi_lvm.errors import ConfigError
from csi_lvm.lvm.layouts import GiB, MiB

_QUANTITY_RE = re.compile(r"(\d+)(Ki|Mi|Gi|Ti|K|M|G|T)?")
_UNITS = {
    None: 1, "Ki": 1 << 10, "Mi": MiB, "Gi": GiB, "Ti": 1 << 40,
    "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
}  # fmt: skip


def whole(node: yaml.Node, source: str, what: str, least: int, most: int) -> int:
    value = number(node, source, what)
    if value != int(value) or not least <= value <= most:
        raise ConfigError(
            f"{at(source, node)}: {what} must be a whole number from {least} to {most}"
        )
    return int(value)


def parse_bytes(text: str) -> int | None:
    """A Kubernetes-style quantity of bytes (``64Ki``, ``10Gi``, ``1000``),
    or None when ``text`` is not one."""
    match = _QUANTITY_RE.fullmatch(text.strip())
    if match is None:
        return None
    return int(match.group(1)) * _UNITS[match.group(2)]


def quantity(node: yaml.Node, source: str, what: str) -> int:
    value = parse_bytes(str(node.value)) if isinstance(node, yaml.ScalarNode) else None
    if value is None:
        raise ConfigError(
            f"{at(source, node)}: {what} must be a number of bytes, as a whole number or "
            "with a suffix Ki, Mi, Gi, Ti (or K, M, G, T): 64Ki, 10Gi"
        )
    return value


def at(source: str, node: yaml.Node) -> str:
    return f"{source} line {node.start_mark.line + 1}"


def mapping(node: yaml.Node, source: str, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{at(source, node)}: {what} must be a mapping of keys to values")
    fields: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value)
        if key in fields:
            raise ConfigError(f"{at(source, key_node)}: key {key!r} appears twice")
        fields[key] = (key_node, value_node)
    return fields


def reject_unknown(
    fields: dict[str, tuple[yaml.Node, yaml.Node]], allowed: set[str], source: str
) -> None:
    for key, (key_node, _) in fields.items():
        if key not in allowed:
            raise ConfigError(
                f"{at(source, key_node)}: unknown key {key!r}; "
                f"allowed here: {', '.join(sorted(allowed))}"
            )


def string(node: yaml.Node, source: str, what: str) -> str:
    if not isinstance(node, yaml.ScalarNode) or not str(node.value):
        raise ConfigError(f"{at(source, node)}: {what} must be a non-empty string")
    return str(node.value)


def boolean(fields: dict[str, tuple[yaml.Node, yaml.Node]], key: str, source: str) -> bool:
    if key not in fields:
        return False
    node = fields[key][1]
    value = yaml.safe_load(yaml.serialize(node))
    if not isinstance(value, bool):
        raise ConfigError(f"{at(source, node)}: {key} must be true or false")
    return value


def string_list(node: yaml.Node, source: str, what: str) -> tuple[str, ...]:
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise ConfigError(f"{at(source, node)}: {what} must be a non-empty list of strings")
    return tuple(string(item, source, f"each entry of {what}") for item in node.value)


def number(node: yaml.Node, source: str, what: str) -> float:
    value = yaml.safe_load(yaml.serialize(node)) if isinstance(node, yaml.ScalarNode) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{at(source, node)}: {what} must be a number")
    return float(value)
