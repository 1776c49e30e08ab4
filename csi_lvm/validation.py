"""Checks of request fields that need no I/O: capabilities, parameters,
sizes and paths. Each failure is an InvalidArgument (or OutOfRange) whose
message says what was wrong and what would be accepted."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from csi_lvm.config import Config, DeviceClass
from csi_lvm.csi import csi_pb2
from csi_lvm.errors import InvalidArgument, OutOfRange
from csi_lvm.filesystems import DEFAULT_FILESYSTEM, MINIMUM_BYTES, SUPPORTED_FILESYSTEMS
from csi_lvm.ids import Kind, ObjectId

AccessMode = csi_pb2.VolumeCapability.AccessMode

# Local volumes reach one node only; every single-node mode works.
SUPPORTED_ACCESS_MODES = {
    AccessMode.SINGLE_NODE_WRITER,
    AccessMode.SINGLE_NODE_READER_ONLY,
    AccessMode.SINGLE_NODE_SINGLE_WRITER,
    AccessMode.SINGLE_NODE_MULTI_WRITER,
}
READ_ONLY_MODES = {AccessMode.SINGLE_NODE_READER_ONLY}

DEVICE_CLASS_PARAMETER = "deviceClass"
SIDECAR_PARAMETER_PREFIX = "csi.storage.k8s.io/"
PVC_NAME = "csi.storage.k8s.io/pvc/name"
PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
PV_NAME = "csi.storage.k8s.io/pv/name"
SNAPSHOT_NAME = "csi.storage.k8s.io/volumesnapshot/name"
SNAPSHOT_NAMESPACE = "csi.storage.k8s.io/volumesnapshot/namespace"
SNAPSHOT_CONTENT_NAME = "csi.storage.k8s.io/volumesnapshotcontent/name"

DEFAULT_VOLUME_BYTES = 1 << 30
MAX_PATH_BYTES = 4096


def _mode_name(mode: int) -> str:
    try:
        return str(AccessMode.Mode.Name(mode))
    except ValueError:
        return f"unknown mode {mode}"


def capability_problem(capability: csi_pb2.VolumeCapability, any_mode: bool = False) -> str | None:
    """Why csi-lvm cannot serve this capability, or None when it can.
    ``any_mode``: an access mode left out or UNKNOWN stands for any (older
    provisioners ask GetCapacity so)."""
    access_type = capability.WhichOneof("access_type")
    if access_type is None:
        return "a volume capability must set either block or mount access"
    mode = capability.access_mode.mode
    if any_mode and mode == AccessMode.UNKNOWN:
        pass
    elif not capability.HasField("access_mode"):
        return "a volume capability must set an access mode"
    elif mode not in SUPPORTED_ACCESS_MODES:
        supported = ", ".join(sorted(_mode_name(m) for m in SUPPORTED_ACCESS_MODES))
        return (
            f"access mode {_mode_name(mode)} is not supported: csi-lvm volumes are local to "
            f"one node (supported: {supported})"
        )
    if access_type == "mount":
        fs_type = capability.mount.fs_type
        if fs_type and fs_type not in SUPPORTED_FILESYSTEMS:
            return (
                f"filesystem {fs_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_FILESYSTEMS)})"
            )
        for flag in capability.mount.mount_flags:
            if not flag or "\0" in flag:
                return "mount flags must be non-empty strings without NUL bytes"
    return None


def check_capabilities(capabilities: Iterable[csi_pb2.VolumeCapability]) -> None:
    capabilities = list(capabilities)
    if not capabilities:
        raise InvalidArgument("volume_capabilities is required: give at least one capability")
    for capability in capabilities:
        problem = capability_problem(capability)
        if problem:
            raise InvalidArgument(problem)


def check_capability(capability: csi_pb2.VolumeCapability, present: bool) -> None:
    if not present:
        raise InvalidArgument("volume_capability is required")
    problem = capability_problem(capability)
    if problem:
        raise InvalidArgument(problem)


def filesystem_of(capability: csi_pb2.VolumeCapability) -> str:
    return capability.mount.fs_type or DEFAULT_FILESYSTEM


def minimum_bytes(capabilities: Iterable[csi_pb2.VolumeCapability]) -> int:
    """The smallest volume every requested filesystem can be made on."""
    return max(
        (
            MINIMUM_BYTES[filesystem_of(c)]
            for c in capabilities
            if c.WhichOneof("access_type") == "mount"
        ),
        default=0,
    )


def check_sidecar_parameters(parameters: Mapping[str, str], what: str) -> None:
    """A snapshot's (or group snapshot's) parameters: the sidecars' keys only."""
    unknown = sorted(k for k in parameters if not k.startswith(SIDECAR_PARAMETER_PREFIX))
    if unknown:
        raise InvalidArgument(
            f"unknown {what} parameter(s) {', '.join(map(repr, unknown))}; csi-lvm "
            f"accepts only the sidecars' '{SIDECAR_PARAMETER_PREFIX}*' keys"
        )


def device_class_for(config: Config, parameters: Mapping[str, str]) -> DeviceClass:
    """The device class a request's parameters select."""
    unknown = sorted(
        key
        for key in parameters
        if key != DEVICE_CLASS_PARAMETER and not key.startswith(SIDECAR_PARAMETER_PREFIX)
    )
    if unknown:
        raise InvalidArgument(
            f"unknown parameter(s) {', '.join(map(repr, unknown))}; csi-lvm accepts "
            f"{DEVICE_CLASS_PARAMETER!r} and the sidecars' '{SIDECAR_PARAMETER_PREFIX}*' keys"
        )
    names = ", ".join(c.name for c in config.device_classes)
    name = parameters.get(DEVICE_CLASS_PARAMETER)
    if name is None:
        default = config.default_class
        if default is None:
            raise InvalidArgument(
                f"parameter {DEVICE_CLASS_PARAMETER!r} is required: this node has no default "
                f"device class (classes: {names})"
            )
        return default
    device_class = config.find(name)
    if device_class is None:
        raise InvalidArgument(f"unknown device class {name!r}; this node offers: {names}")
    return device_class


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


@dataclass(frozen=True)
class SizeRange:
    required: int
    limit: int  # 0: no limit

    def allows(self, size: int) -> bool:
        return size >= self.required and (self.limit == 0 or size <= self.limit)

    def describe(self) -> str:
        limit = f"at most {self.limit}" if self.limit else "no upper limit"
        return f"at least {self.required} bytes, {limit}"


def size_range(required: int, limit: int) -> SizeRange:
    if required < 0 or limit < 0:
        raise InvalidArgument("capacity_range bytes must not be negative")
    if limit and required > limit:
        raise OutOfRange(f"required_bytes {required} exceeds limit_bytes {limit}")
    return SizeRange(required, limit)


def choose_size(wanted: SizeRange, extent_bytes: int, minimum: int = 0) -> int:
    """The LV size for a request: the required size (or a default) rounded up
    to whole extents, never above the limit."""
    base = wanted.required or DEFAULT_VOLUME_BYTES
    if wanted.limit and not wanted.required:
        base = min(base, wanted.limit)
    base = max(base, minimum, 1)
    size = round_up(base, extent_bytes)
    if wanted.limit and size > wanted.limit:
        size = (wanted.limit // extent_bytes) * extent_bytes
        if size < max(wanted.required, minimum, 1):
            raise OutOfRange(
                f"no size fits the range ({wanted.describe()}): volumes are whole "
                f"extents of {extent_bytes} bytes"
                + (f" and at least {minimum} bytes" if minimum else "")
            )
    return size


def check_path(path: str, what: str) -> str:
    """An absolute, normalised path without NUL bytes or '..' components."""
    if not path:
        raise InvalidArgument(f"{what} is required")
    if "\0" in path:
        raise InvalidArgument(f"{what} must not contain NUL bytes")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise InvalidArgument(f"{what} is longer than {MAX_PATH_BYTES} bytes")
    if not os.path.isabs(path):
        raise InvalidArgument(f"{what} {path!r} must be an absolute path")
    if ".." in path.split("/") or os.path.normpath(path) != path.rstrip("/") or path == "/":
        raise InvalidArgument(f"{what} {path!r} must be a normalised path with no '..'")
    return path.rstrip("/")


def source_reference(content: csi_pb2.VolumeContentSource) -> tuple[str, Kind, str] | None:
    """The id a content source names, its kind and what to call it in a
    message; None when it names neither a snapshot nor a volume."""
    which = content.WhichOneof("type")
    if which == "snapshot":
        return content.snapshot.snapshot_id, Kind.SNAPSHOT, "snapshot"
    if which == "volume":
        return content.volume.volume_id, Kind.VOLUME, "source volume"
    return None


def requested_source_id(content: csi_pb2.VolumeContentSource) -> str:
    """The id a request names as its content source, as csi-lvm writes it in
    a volume's tags ("" for none)."""
    reference = source_reference(content)
    if reference is None:
        return ""
    parsed = ObjectId.parse(reference[0])
    return str(parsed) if parsed is not None else reference[0]
