"""The CSI Node service: format, mount and inspect this node's volumes.

Paths are checked before any mount or unmount, and a mount is only removed
when it is of the volume the call names: a path holding anything else is
reported, never touched.
"""

from __future__ import annotations

import contextlib
import os
import stat

import grpc
import structlog

from csi_lvm import crypt, fs, lifecycle
from csi_lvm.backends import Backends
from csi_lvm.backends.asks import Contents
from csi_lvm.config import DeviceClass
from csi_lvm.csi import csi_pb2, csi_pb2_grpc
from csi_lvm.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from csi_lvm.ids import Kind, ObjectId
from csi_lvm.locks import KeyedLocks
from csi_lvm.modifications import Modifier
from csi_lvm.node_health import NodeHealth
from csi_lvm.rpc import budget
from csi_lvm.topology import NodeTopology
from csi_lvm.validation import (
    READ_ONLY_MODES,
    AccessMode,
    check_capability,
    check_path,
    filesystem_of,
    size_range,
)
from csi_lvm.volumes import Inventory, Owned

log = structlog.get_logger("csi_lvm.node")

NodeCap = csi_pb2.NodeServiceCapability.RPC.Type
CAPABILITIES = (
    NodeCap.STAGE_UNSTAGE_VOLUME,
    NodeCap.GET_VOLUME_STATS,
    NodeCap.VOLUME_CONDITION,
    NodeCap.SINGLE_NODE_MULTI_WRITER,
    NodeCap.EXPAND_VOLUME,
    NodeCap.GET_VOLUME_HEALTH,
    NodeCap.GET_STORAGE_HEALTH,
)
DEFAULT_TIMEOUT = 300.0
Context = grpc.ServicerContext


class NodeService(NodeHealth, csi_pb2_grpc.NodeServicer):
    def __init__(
        self,
        inventory: Inventory,
        backends: Backends,
        locks: KeyedLocks,
        topology: NodeTopology,
        modifier: Modifier,
        max_volumes_per_node: int = 0,
    ) -> None:
        self.inventory = inventory
        self.backends = backends
        self.locks = locks
        self.topology = topology
        self.modifier = modifier
        self.max_volumes_per_node = max_volumes_per_node

    @property
    def node_id(self) -> str:
        return self.inventory.node_id

    def _parsed(self, volume_id: str) -> tuple[ObjectId, DeviceClass]:
        if not volume_id:
            raise InvalidArgument("volume_id is required")
        parsed = self.inventory.parse_local_id(volume_id, Kind.VOLUME, "volume")
        if parsed is None:
            raise NotFound(f"volume {volume_id} does not exist on node {self.node_id}")
        return parsed

    def _find_volume(self, volume_id: str, timeout: float | None) -> Owned:
        """The owned LV a volume id names; NOT_FOUND when there is none."""
        owned = self.inventory.get(*self._parsed(volume_id), timeout=timeout)
        if owned is None:
            raise NotFound(f"volume {volume_id} does not exist on node {self.node_id}")
        return owned

    def _lock_name(self, volume_id: str) -> str:
        """The name a volume's calls serialise on, read from its id alone so
        the LV can be looked up once the lock is held."""
        return self._parsed(volume_id)[0].lv_name

    def _device(self, owned: Owned, timeout: float | None) -> str:
        """The volume's device node, activating the LV when it is not."""
        return self.inventory.activated(owned.lv, timeout).device

    def _data_device(self, owned: Owned, timeout: float | None) -> str:
        """The device the volume's data goes through: the LV, or an encrypted
        volume's mapping, which only NodeStageVolume opens (it has the key)."""
        device = self._device(owned, timeout)
        if not owned.encrypted:
            return device
        if not crypt.is_open(owned.mapping):
            raise FailedPrecondition(
                f"volume {owned.id} is encrypted and not open on this node: call "
                "NodeStageVolume first (it opens the volume with its key)"
            )
        return crypt.mapping_path(owned.mapping)

    def _unlocked(
        self, owned: Owned, device: str, known: Contents, secrets: dict[str, str]
    ) -> tuple[str, Contents]:
        """An encrypted volume's open mapping, and what it holds: nothing
        when its header was made just now (mkfs then needs no probe; its
        blocks decrypt to noise, so they do not read zeros)."""
        what = f"volume {owned.id}"
        keys = crypt.keys_from(secrets, what)
        mapping, made = crypt.unlock(device, owned.mapping, keys, blank=known.blank, what=what)
        if made:
            log.info("encrypted", volume_id=str(owned.id), mapping=owned.mapping)
        return mapping, Contents(blank=made, reads_zeros=False)

    # ------------------------------------------------------------- staging

    def NodeStageVolume(
        self, request: csi_pb2.NodeStageVolumeRequest, context: Context
    ) -> csi_pb2.NodeStageVolumeResponse:
        staging = check_path(request.staging_target_path, "staging_target_path")
        check_capability(request.volume_capability, request.HasField("volume_capability"))
        timeout = budget(context) or DEFAULT_TIMEOUT
        # Looked up under the lock: whether the LV was ever written decides
        # whether it is probed and how it is formatted, and a stage that held
        # the lock before may just have written it.
        with self.locks.hold(self._lock_name(request.volume_id)):
            owned = self._find_volume(request.volume_id, timeout)
            lifecycle.check_ready(owned, "volume")
            backend = self.backends.of(owned.device_class)
            device = self._device(owned, timeout)
            known = None
            if owned.encrypted:
                known = backend.contents(owned.lv)
                device, known = self._unlocked(owned, device, known, dict(request.secrets))
            if request.volume_capability.WhichOneof("access_type") == "block":
                return csi_pb2.NodeStageVolumeResponse()  # block volumes are used raw
            if known is None:  # a plain volume's, read only where it is formatted
                known = backend.contents(owned.lv)
            wanted_fs = filesystem_of(request.volume_capability)
            staged = fs.stage(
                fs.Staging(
                    what=f"volume {request.volume_id}",
                    device=device,
                    path=staging,
                    fs_type=wanted_fs,
                    flags=list(request.volume_capability.mount.mount_flags),
                    size_bytes=owned.size_bytes,
                    mkfs_options=owned.device_class.mkfs_options_for(wanted_fs),
                    blank=known.blank,
                    reads_zeros=known.reads_zeros,
                    new_uuid=lifecycle.needs_new_filesystem_uuid(owned.lv),
                ),
                timeout,
            )
            if staged is fs.Staged.FORMATTED:
                log.info("formatted", volume_id=request.volume_id, fs_type=wanted_fs)
            elif lifecycle.needs_new_filesystem_uuid(owned.lv):
                # A copy's first stage (or one cut short after its mount).
                self.backends.states.prepare_copied_filesystem(
                    owned.lv, device, staging, wanted_fs, timeout
                )
                log.info("copy prepared", volume_id=request.volume_id, fs_type=wanted_fs)
        return csi_pb2.NodeStageVolumeResponse()

    def NodeUnstageVolume(
        self, request: csi_pb2.NodeUnstageVolumeRequest, context: Context
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        staging = check_path(request.staging_target_path, "staging_target_path")
        self._tear_down(request.volume_id, staging, "staging path", budget(context))
        return csi_pb2.NodeUnstageVolumeResponse()

    def _tear_down(self, volume_id: str, path: str, what: str, timeout: float | None) -> None:
        """Unmount the volume at ``path``; a publication's target goes too.

        Teardown works from the path, not from the LV: the kubelet unstages
        after the PV (and LV) may be gone, after a class left the config or
        the node was renamed. Nothing mounted there is done; a mount of this
        volume, or of a device that no longer exists (a block volume whose LV
        was deleted under its bind mount), is unmounted; a mount of any other
        device is refused."""
        if not volume_id:
            raise InvalidArgument("volume_id is required")
        object_id = ObjectId.parse(volume_id)
        if object_id is None or object_id.kind is not Kind.VOLUME:
            raise NotFound(f"volume {volume_id} is not a csi-lvm volume id")
        timeout = timeout or DEFAULT_TIMEOUT
        with self.locks.hold(object_id.lv_name):
            owned = self.inventory.find_anywhere(object_id, timeout)
            unmounted = False
            while (current := fs.mounted_device(path)) is not None:
                ours = owned is not None and current == self._device_number(owned)
                if not ours and not fs.is_stale_device_node(path):
                    raise FailedPrecondition(
                        f"{what} {path} has a mount of another device ({current}); csi-lvm "
                        "leaves it alone: unmount it by hand if it is stale"
                    )
                fs.unmount(path, timeout)
                unmounted = True
                if ours and owned is not None and what == "target path":
                    self.modifier.on_unpublish(owned, path, current)
            # Unstaging closes an encrypted volume's mapping (found by name:
            # the LV may be gone); it stays open while a publication uses it.
            mapping = crypt.mapping_name(object_id.device_class, object_id.lv_name)
            if what == "staging path" and crypt.is_open(mapping):
                self._check_unpublished(volume_id, mapping)
                crypt.close_mapping(mapping)
            # The file or directory publishing made goes too, but only where
            # this call shows it was a publication of this volume.
            if what == "target path" and (owned is not None or unmounted):
                self._remove_target(path)

    @staticmethod
    def _check_unpublished(volume_id: str, mapping: str) -> None:
        """A block publication binds the mapping's device node, which holds
        nothing open: closing the mapping would leave the pod a dead device."""
        node = os.path.basename(os.path.realpath(crypt.mapping_path(mapping)))
        for entry in fs.mounts():
            if entry.root.endswith((f"/{mapping}", f"/{node}")):
                raise FailedPrecondition(
                    f"volume {volume_id} is still published at {entry.mount_point}: its "
                    "encrypted mapping stays open until it is unpublished; unpublish it first"
                )

    @staticmethod
    def _device_number(owned: Owned) -> str | None:
        device = owned.data_device()
        return fs.device_number(device) if os.path.exists(device) else None

    # ----------------------------------------------------------- publishing

    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: Context
    ) -> csi_pb2.NodePublishVolumeResponse:
        target = check_path(request.target_path, "target_path")
        check_capability(request.volume_capability, request.HasField("volume_capability"))
        block = request.volume_capability.WhichOneof("access_type") == "block"
        staging = (
            check_path(request.staging_target_path, "staging_target_path")
            if request.staging_target_path or not block
            else ""
        )
        timeout = budget(context) or DEFAULT_TIMEOUT
        read_only = (
            request.readonly or request.volume_capability.access_mode.mode in READ_ONLY_MODES
        )
        # The lock first, then the lookup, as every node call does.
        with self.locks.hold(self._lock_name(request.volume_id)):
            owned = self._find_volume(request.volume_id, timeout)
            lifecycle.check_ready(owned, "volume")
            device = self._data_device(owned, timeout)
            ours = fs.device_number(device)
            # Before the pod can use the volume, and on each retry.
            self.modifier.on_publish(owned, target, ours)
            current = fs.mounted_device(target)
            if current is not None:
                entry = fs.mount_at(target)
                if current == ours and entry is not None and entry.read_only == read_only:
                    return csi_pb2.NodePublishVolumeResponse()
                raise AlreadyExists(
                    f"target path {target} is already mounted "
                    + ("with other options" if current == ours else f"with device {current}")
                )
            mode = request.volume_capability.access_mode.mode
            if mode == AccessMode.SINGLE_NODE_SINGLE_WRITER:
                self._check_single_writer(ours, device, staging, target)
            if block:
                self._make_target_file(target)
                fs.bind_mount(device, target, read_only, timeout)
            else:
                if fs.mounted_device(staging) != ours:
                    raise FailedPrecondition(
                        f"volume {request.volume_id} is not staged at {staging}; "
                        "call NodeStageVolume first"
                    )
                self._make_target_dir(target)
                fs.bind_mount(staging, target, read_only, timeout)
        return csi_pb2.NodePublishVolumeResponse()

    def _check_single_writer(self, ours: str, device: str, staging: str, target: str) -> None:
        for entry in fs.mounts():
            if entry.mount_point in (staging, target):
                continue
            node_bound = entry.root.endswith("/" + os.path.basename(device))
            if fs.backing_device(entry) == ours or node_bound:
                raise FailedPrecondition(
                    f"the volume is already published at {entry.mount_point} and its access "
                    "mode SINGLE_NODE_SINGLE_WRITER allows one publication only"
                )

    @staticmethod
    def _make_target_dir(target: str) -> None:
        try:
            os.mkdir(target, 0o750)
        except FileExistsError:
            if not os.path.isdir(target) or os.path.islink(target):
                raise FailedPrecondition(
                    f"target path {target} exists and is not a directory"
                ) from None
        except FileNotFoundError:
            raise FailedPrecondition(
                f"the parent directory of target path {target} does not exist"
            ) from None

    @staticmethod
    def _make_target_file(target: str) -> None:
        try:
            fd = os.open(target, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
            os.close(fd)
        except FileNotFoundError:
            raise FailedPrecondition(
                f"the parent directory of target path {target} does not exist"
            ) from None
        except OSError as exc:
            raise FailedPrecondition(
                f"target path {target} cannot hold a block device: {exc.strerror}"
            ) from None

    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: Context
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        target = check_path(request.target_path, "target_path")
        self._tear_down(request.volume_id, target, "target path", budget(context))
        return csi_pb2.NodeUnpublishVolumeResponse()

    @staticmethod
    def _remove_target(target: str) -> None:
        """Remove the empty directory or file NodePublish made; leave anything else."""
        try:
            info = os.lstat(target)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            try:
                os.rmdir(target)
            except OSError as exc:
                raise FailedPrecondition(
                    f"target path {target} is not empty after unmount; csi-lvm leaves it: "
                    f"{exc.strerror}"
                ) from None
        elif stat.S_ISREG(info.st_mode) and info.st_size == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)

    # ---------------------------------------------------------- inspection

    def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: Context
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not request.volume_path:
            raise InvalidArgument("volume_path is required")
        timeout = budget(context) or DEFAULT_TIMEOUT
        # The kubelet asks this of every mounted volume every minute: the
        # kept view and the kernel answer it, never a report per call.
        scan = self.inventory.view(timeout)
        owned = self.inventory.require(request.volume_id, Kind.VOLUME, "volume", scan)
        try:
            path = check_path(request.volume_path, "volume_path")
        except InvalidArgument as exc:  # no such path can hold the volume
            raise NotFound(str(exc)) from None
        if not os.path.exists(path):
            raise NotFound(f"volume_path {path} does not exist")
        ours = self._device_number(owned)
        if ours is None or fs.device_at(path) != ours:
            raise NotFound(f"volume {request.volume_id} is not mounted at {path}")
        condition = self.backends.of(owned.device_class).condition(owned, scan)
        volume_condition = csi_pb2.VolumeCondition(
            abnormal=condition.abnormal, message=condition.message
        )
        Usage = csi_pb2.VolumeUsage
        if stat.S_ISBLK(os.stat(path).st_mode):
            usage = [Usage(unit=Usage.BYTES, total=fs.block_device_size(owned.data_device()))]
        else:
            space = fs.usage(path)
            usage = [
                Usage(
                    unit=Usage.BYTES,
                    total=space.total_bytes,
                    available=space.available_bytes,
                    used=space.used_bytes,
                ),
                Usage(
                    unit=Usage.INODES,
                    total=space.total_inodes,
                    available=space.free_inodes,
                    used=space.used_inodes,
                ),
            ]
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage, volume_condition=volume_condition)

    # ----------------------------------------------------------- expansion

    def NodeExpandVolume(
        self, request: csi_pb2.NodeExpandVolumeRequest, context: Context
    ) -> csi_pb2.NodeExpandVolumeResponse:
        """Grow the LV, then the mounted filesystem on it, while in use.

        csi-lvm has no ControllerExpandVolume: the external-resizer only records
        the new size, and the kubelet of the volume's own node calls this."""
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not request.volume_path:
            raise InvalidArgument("volume_path is required")
        wanted = size_range(
            request.capacity_range.required_bytes, request.capacity_range.limit_bytes
        )
        timeout = budget(context) or DEFAULT_TIMEOUT
        with self.locks.hold(self._lock_name(request.volume_id)):
            scan = self.inventory.view(timeout)
            owned = self.inventory.require(request.volume_id, Kind.VOLUME, "volume", scan)
            # NOT_FOUND comes first: csi-sanity asks for it with a relative path.
            volume_path = check_path(request.volume_path, "volume_path")
            backend = self.backends.of(owned.device_class)
            size = backend.grow(owned, wanted, scan, timeout)
            if size > owned.size_bytes:
                log.info("volume extended", volume_id=request.volume_id, bytes=size)
            if owned.encrypted and crypt.is_open(owned.mapping):
                crypt.resize(owned.mapping)
            device = self._device(owned, timeout)
            if owned.encrypted:  # grown above while open, or not mounted here
                device = owned.data_device()
            ours = fs.device_number(device)
            for path in (request.staging_target_path, volume_path):
                entry = fs.mount_at(path) if path else None
                if entry is not None and fs.mounted_device(path) == ours:
                    if entry.fs_type in fs.SUPPORTED_FILESYSTEMS:
                        fs.grow_filesystem(device, path, entry.fs_type)
                    break
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: Context
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[
                csi_pb2.NodeServiceCapability(rpc=csi_pb2.NodeServiceCapability.RPC(type=cap))
                for cap in CAPABILITIES
            ]
        )

    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: Context
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.node_id,
            max_volumes_per_node=self.max_volumes_per_node,
            accessible_topology=self.topology.node_info(),
        )
