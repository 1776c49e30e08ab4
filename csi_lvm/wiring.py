"""The driver's object graph, built in one place: the LVM runner and verbs,
the inventory and its kept view, the backends, the locks and the servicers,
from the config and the options (checked here, once, with messages that name
the flag). ``serve``, ``status``, ``doctor``, the tests and the benchmarks all
build it with ``build``; none assembles it by hand. The cluster's forwarder of
SnapshotMetadata calls, a graph of its own, comes from ``build_forwarder``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from csi_lvm.backends import Backends
from csi_lvm.block_maps import BlockMaps, PoolReservations
from csi_lvm.config import Config
from csi_lvm.controller import ControllerService
from csi_lvm.errors import ConfigError
from csi_lvm.forwarding import (
    ForwardingService,
    GroupForwardingService,
    GroupSidecarController,
    ModifyForwarder,
    PeerModifications,
)
from csi_lvm.group_controller import ForwardedGroupController, GroupControllerService
from csi_lvm.group_labels import GroupLabeler
from csi_lvm.group_snapshots import GroupSnapshots
from csi_lvm.identity import IdentityService, Service
from csi_lvm.io_limits import PodCgroups
from csi_lvm.kept_view import REFRESH_SECONDS
from csi_lvm.locks import KeyedLocks
from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.runner import Runner
from csi_lvm.lvm.thin_metadata import ThinMetadata
from csi_lvm.modifications import Modifier
from csi_lvm.node import NodeService
from csi_lvm.peer_copy import CHECKPOINT_BYTES, PeerCopies
from csi_lvm.peer_source import Leases, VolumeSourceService
from csi_lvm.peers import PeerChannels, Peers
from csi_lvm.snapshot_metadata import SnapshotMetadataService
from csi_lvm.tls import TlsFiles
from csi_lvm.topology import NodeTopology
from csi_lvm.volumes import Inventory

DEFAULT_DRIVER_NAME = "lvm.csi-lvm.io"
# A CSI driver name: a domain-style name of at most 63 characters.
DRIVER_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?")
# Node labels the kubelet owns: a plugin that published one with another value
# would conflict with it.
KUBELET_OWNED_LABELS = frozenset(
    {"kubernetes.io/hostname", "kubernetes.io/os", "kubernetes.io/arch"}
)
TOPOLOGY_KEY_RE = re.compile(
    r"([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?"
)


@dataclass(frozen=True)
class Options:
    """Everything beside the config that the graph is built from; a value
    that cannot work is refused when the options are made, naming its flag."""

    node_id: str
    driver_name: str = DEFAULT_DRIVER_NAME
    topology_key: str = ""  # "": topology.<driver name>/node
    # Node-label keys reported beside the node key (a zone, a rack), and the
    # values this node's labels have (read from its Node object at start).
    topology_labels: Sequence[str] = ()
    node_labels: Mapping[str, str] = field(default_factory=dict)
    lvm_prefix: Sequence[str] = ()
    lvm_shell: bool = False
    lvm_shell_idle_exit: float = 0.0
    lvm_config_overrides: str = ""
    refresh_seconds: float = REFRESH_SECONDS
    max_volumes_per_node: int = 0
    # Where held metadata snapshots are recorded; "" builds no SnapshotMetadata service.
    state_dir: str = ""
    # What a copy from another node writes between records of its progress.
    copy_checkpoint_bytes: int = CHECKPOINT_BYTES
    # Where the host's cgroup v2 hierarchy is mounted (the pods' IO limits).
    cgroup_root: str = "/sys/fs/cgroup"

    def __post_init__(self) -> None:
        if not DRIVER_NAME_RE.fullmatch(self.driver_name):
            raise ConfigError(f"--driver-name {self.driver_name!r} is not a domain-style name")
        key = self.node_topology_key
        if not TOPOLOGY_KEY_RE.fullmatch(key):
            raise ConfigError(f"--topology-key {key!r} is not a valid label key")
        if key in KUBELET_OWNED_LABELS:
            raise ConfigError(
                f"--topology-key {key} is a label the kubelet sets itself, to a value the "
                "plugin cannot read (the hostname label often differs from the node name the "
                "plugin publishes, and the kubelet then refuses to register the driver): use "
                "the default, or a key of the driver's own"
            )
        for label in self.topology_labels:
            if not TOPOLOGY_KEY_RE.fullmatch(label):
                raise ConfigError(f"--topology-labels: {label!r} is not a valid label key")
        if key in self.topology_labels:
            raise ConfigError(
                f"--topology-labels: {key} is the driver's node key already; list only "
                "labels of wider domains (a zone, a region, a rack)"
            )
        if len(set(self.topology_labels)) != len(self.topology_labels):
            raise ConfigError("--topology-labels names a label more than once")
        unlisted = sorted(set(self.node_labels) - set(self.topology_labels))
        if unlisted:
            raise ConfigError(f"node labels {', '.join(unlisted)} are not in --topology-labels")
        if self.max_volumes_per_node < 0:
            raise ConfigError("--max-volumes-per-node must not be negative")
        if self.lvm_shell_idle_exit < 0:
            raise ConfigError("--lvm-shell-idle-exit must not be negative")
        if self.copy_checkpoint_bytes < 1 << 20:
            raise ConfigError("--copy-checkpoint-mib must be at least 1")
        if not 0.5 <= self.refresh_seconds <= 3600:
            raise ConfigError("--refresh-interval must be between 0.5 and 3600 seconds")

    @property
    def node_topology_key(self) -> str:
        return self.topology_key or f"topology.{self.driver_name}/node"

    @property
    def topology(self) -> NodeTopology:
        return NodeTopology(self.node_topology_key, self.node_id, dict(self.node_labels))


@dataclass(frozen=True)
class Graph:
    """The driver's parts, wired."""

    config: Config  # as this node sees it: one entry per class name
    options: Options
    lvm: Lvm
    inventory: Inventory
    backends: Backends
    locks: KeyedLocks
    identity: IdentityService
    controller: ControllerService
    group_controller: GroupControllerService
    # The same, on the TLS port, for the cluster's group forwarder only.
    forwarded_group_controller: ForwardedGroupController
    groups: GroupSnapshots
    node: NodeService
    snapshot_metadata: SnapshotMetadataService | None
    reservations: PoolReservations | None
    # This node's objects read by the other nodes' plugins, and the copies
    # from theirs (None: copies across nodes are off).
    volume_source: VolumeSourceService | None = None
    peer_copies: PeerCopies | None = None
    # ControllerModifyVolume of this node's volumes, for the other plugins.
    peer_modifications: PeerModifications | None = None

    def repair(self) -> None:
        """Before serving, what a crash left behind: filesystems a group
        snapshot froze are thawed, objects left MAKING removed (a group's
        snapshots cut short among them), the pools' stale metadata snapshots
        let go."""
        self.groups.thaw_left_frozen()
        self.backends.states.remove_unfinished(self.inventory, self.locks)
        if self.reservations is not None:
            self.reservations.release_stale(BlockMaps.thin_pools(self.config))

    def close(self) -> None:
        """Wait for LVM commands still running, end the lvm shell, close the
        channels to the other plugins."""
        self.lvm.close()
        if self.peer_copies is not None:
            self.peer_copies.channels.close()


def build(
    config: Config,
    options: Options,
    lvm: Lvm | None = None,
    peers: tuple[Peers, TlsFiles] | None = None,
) -> Graph:
    """The graph for ``config`` as this node sees it (``Config.for_node``:
    one entry per class name; a ConfigError when two entries of a name match
    the node) and ``options``; ``lvm`` (a test's, say) instead of one made
    from the options. Everything in the graph, ``Graph.config`` included,
    sees only the resolved config. With ``peers`` (where the other nodes'
    plugins are, and this one's certificate) volumes are made from other
    nodes' snapshots and volumes, and this node's are read by theirs."""
    config = config.for_node(options.node_id)
    lvm = lvm or Lvm(
        Runner(
            prefix=options.lvm_prefix,
            shell=options.lvm_shell,
            shell_idle_exit=options.lvm_shell_idle_exit,
            config_overrides=options.lvm_config_overrides,
        )
    )
    inventory = Inventory(
        config, lvm, options.node_id, options.driver_name, options.refresh_seconds
    )
    backends = Backends(inventory)
    locks = KeyedLocks()
    topology = options.topology
    reservations = None
    snapshot_metadata = None
    volume_source = None
    peer_copies = None
    leases = None
    modify_elsewhere = None
    if options.state_dir:
        reservations = PoolReservations(ThinMetadata(runner=lvm.runner), options.state_dir)
        maps = BlockMaps(lvm, reservations)
        snapshot_metadata = SnapshotMetadataService(inventory, maps)
        if peers is not None:
            leases = Leases()
            volume_source = VolumeSourceService(inventory, backends, maps, leases)
            peer_copies = PeerCopies(
                PeerChannels(*peers), inventory, backends, options.copy_checkpoint_bytes
            )
            modify_elsewhere = ModifyForwarder(peer_copies.channels)
    groups = GroupSnapshots(inventory, backends, locks, options.node_id)
    modifier = Modifier(inventory, backends, PodCgroups(options.cgroup_root))
    controller = ControllerService(
        inventory, backends, locks, topology, modifier, peer_copies, leases, modify_elsewhere
    )
    return Graph(
        config=config,
        options=options,
        lvm=lvm,
        inventory=inventory,
        backends=backends,
        locks=locks,
        identity=IdentityService(options.driver_name),
        controller=controller,
        peer_modifications=PeerModifications(controller) if modify_elsewhere else None,
        group_controller=GroupControllerService(groups),
        forwarded_group_controller=ForwardedGroupController(groups),
        groups=groups,
        node=NodeService(
            inventory, backends, locks, topology, modifier, options.max_volumes_per_node
        ),
        snapshot_metadata=snapshot_metadata,
        reservations=reservations,
        volume_source=volume_source,
        peer_copies=peer_copies,
    )


@dataclass(frozen=True)
class Forwarder:
    """The forwarder's parts: an Identity that offers SnapshotMetadata alone,
    and the service that forwards each call to the plugin of the snapshot's node."""

    identity: IdentityService
    forwarding: ForwardingService

    def close(self) -> None:
        """Close the channels to the plugins."""
        self.forwarding.close()


def build_forwarder(driver_name: str, peers: Peers, tls: TlsFiles) -> Forwarder:
    return Forwarder(
        identity=IdentityService(driver_name, forwarded=(Service.SNAPSHOT_METADATA_SERVICE,)),
        forwarding=ForwardingService(peers, tls),
    )


@dataclass(frozen=True)
class GroupForwarder:
    """The group forwarder's parts: an Identity that offers the Controller
    (for the sidecar's start) and the GroupController, the services, and the
    loop that labels the driver's group objects for the sidecar."""

    identity: IdentityService
    controller: GroupSidecarController
    group_controller: GroupForwardingService
    labeler: GroupLabeler

    def close(self) -> None:
        self.labeler.stop()
        self.group_controller.close()


def build_group_forwarder(
    driver_name: str, sidecar_name: str, peers: Peers, tls: TlsFiles
) -> GroupForwarder:
    return GroupForwarder(
        identity=IdentityService(
            driver_name,
            forwarded=(Service.CONTROLLER_SERVICE, Service.GROUP_CONTROLLER_SERVICE),
        ),
        controller=GroupSidecarController(),
        group_controller=GroupForwardingService(peers, tls),
        labeler=GroupLabeler(driver_name, sidecar_name),
    )
