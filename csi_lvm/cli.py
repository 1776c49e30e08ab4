"""The ``csi-lvm`` command: ``serve`` runs the driver; ``status`` and ``doctor``
are for admins."""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from csi_lvm import __version__, kube
from csi_lvm.admin import (
    Check,
    compared_label_keys,
    node_status,
    status_json,
    status_text,
    topology_checks,
)
from csi_lvm.admin import doctor as run_doctor
from csi_lvm.config import load_config
from csi_lvm.csi import csi_pb2, csi_pb2_grpc
from csi_lvm.errors import ConfigError
from csi_lvm.forwarders import (
    add_forwarder_parsers,
    add_peer_lookup,
    add_tls_dir,
    forward_group_snapshots,
    forward_snapshot_metadata,
    peer_lookup,
)
from csi_lvm.lvm.commands import Lvm
from csi_lvm.lvm.runner import Runner, config_overrides_from
from csi_lvm.metrics import serve_metrics
from csi_lvm.release import add_release_node_parser, release_node
from csi_lvm.server import Server, socket_path
from csi_lvm.tls import TlsFiles, server_credentials
from csi_lvm.topology import missing_labels
from csi_lvm.volumes import REFRESH_SECONDS
from csi_lvm.wiring import DEFAULT_DRIVER_NAME, Options, build

DEFAULT_ENDPOINT = "unix:///csi/csi.sock"
DEFAULT_CONFIG = "/etc/csi-lvm/config.yaml"


def configure_logging(level: str) -> None:
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=level.upper())
    # The Kubernetes client's HTTP library logs each request at INFO, as plain
    # text among the JSON lines: only its warnings are worth a line.
    for library in ("httpx", "httpx2", "httpcore"):
        logging.getLogger(library).setLevel(max(logging.WARNING, logging.getLogger().level))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def default_node_id() -> str:
    return os.environ.get("NODE_NAME") or socket.gethostname()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csi-lvm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"csi-lvm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the CSI services on a unix socket")
    serve.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="unix:///path/to/csi.sock")
    serve.add_argument("--config", default=DEFAULT_CONFIG, help="device class config (YAML)")
    serve.add_argument("--node-id", default=None, help="this node's id ($NODE_NAME, else hostname)")
    serve.add_argument("--driver-name", default=DEFAULT_DRIVER_NAME)
    serve.add_argument(
        "--topology-key",
        default=None,
        help="topology segment key (default topology.<driver-name>/node)",
    )
    _add_shared(serve, "--topology-labels")
    serve.add_argument("--max-volumes-per-node", type=int, default=0)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--grace-period", type=float, default=30.0, help="seconds for calls to end")
    serve.add_argument("--lvm-prefix", default="", help="command to run LVM through, e.g. nsenter")
    _add_shared(serve, "--lvm-config-overrides")
    serve.add_argument(
        "--no-lvm-shell",
        action="store_true",
        help="run one lvm process per command instead of one long-lived lvm shell",
    )
    serve.add_argument(
        "--lvm-shell-idle-exit",
        type=float,
        default=60.0,
        help="seconds without LVM work after which the lvm shell ends (0: never)",
    )
    serve.add_argument(
        "--refresh-interval",
        type=float,
        default=REFRESH_SECONDS,
        help="seconds between reads of the volume groups for changes made by others than "
        "the driver (its own show at once); stats, capacity and metrics answer from them",
    )
    serve.add_argument(
        "--metrics-address", default="", help="host:port for Prometheus /metrics (off when empty)"
    )
    serve.add_argument(
        "--state-dir",
        default=None,
        help="a directory on the host for the driver's records of the thin pools' metadata "
        "snapshots it holds (default: the socket's directory)",
    )
    serve.add_argument(
        "--peer-listen",
        "--snapshot-metadata-listen",
        dest="peer_listen",
        default="",
        metavar="HOST:PORT",
        help="the port, over mutual TLS (--tls-dir), where the other nodes' plugins read "
        "this node's snapshots and volumes to make volumes from them, and the cluster's "
        "forwarder asks for SnapshotMetadata (off when empty; the second name is the "
        "earlier one)",
    )
    serve.add_argument(
        "--copies-across-nodes",
        choices=["on", "off"],
        default="on",
        help="make a volume from a snapshot or volume another node holds by copying it "
        "from that node's plugin (needs --peer-listen and the TLS files); off: such a "
        "volume is refused, naming the node that holds its source",
    )
    serve.add_argument(
        "--copy-checkpoint-mib",
        type=int,
        default=256,
        help="MiB a copy from another node writes between records of its progress: what a "
        "copy resumed after an interruption may write again",
    )
    serve.add_argument(
        "--cgroup-root",
        default="/sys/fs/cgroup",
        help="where the host's cgroup v2 hierarchy is mounted in the plugin's container: "
        "volumes' IO limits go into the io.max of the pods' cgroups there",
    )
    add_tls_dir(serve)
    add_peer_lookup(serve, plugin_port=None)
    add_forwarder_parsers(commands, DEFAULT_ENDPOINT, DEFAULT_DRIVER_NAME)
    status = commands.add_parser("status", help="device classes, volumes and snapshots here")
    status.add_argument("--config", default=DEFAULT_CONFIG)
    status.add_argument("--driver-name", default=DEFAULT_DRIVER_NAME)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _add_shared(status, "--lvm-config-overrides")
    doctor = commands.add_parser("doctor", help="check what this node needs to run csi-lvm")
    doctor.add_argument("--config", default=DEFAULT_CONFIG)
    doctor.add_argument(
        "--node-id", default=None, help="this node's id ($NODE_NAME, else hostname)"
    )
    doctor.add_argument("--endpoint", default=DEFAULT_ENDPOINT)
    doctor.add_argument("--driver-name", default=DEFAULT_DRIVER_NAME)
    _add_shared(doctor, "--topology-labels", "--lvm-config-overrides")
    add_release_node_parser(commands, DEFAULT_DRIVER_NAME)
    return parser


# Flags more than one command takes, with what they mean.
SHARED_FLAGS: dict[str, dict[str, str]] = {
    "--lvm-config-overrides": {
        "metavar": "FILE",
        "help": "LVM settings (lvm.conf syntax) given to every LVM command with --config, on "
        "top of the node's own LVM configuration",
    },
    "--topology-labels": {
        "metavar": "KEY,...",
        "help": "node-label keys (topology.kubernetes.io/zone, a rack's key) the plugin reads "
        "from its Node object at start and reports beside its node key, so StorageClasses' "
        "allowedTopologies may name them; a change of the labels needs a plugin restart",
    },
}


def _add_shared(command: argparse.ArgumentParser, *flags: str) -> None:
    for flag in flags:
        command.add_argument(flag, default="", **SHARED_FLAGS[flag])  # type: ignore[arg-type]


def topology_labels(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(key.strip() for key in args.topology_labels.split(",") if key.strip())


def lvm_overrides(args: argparse.Namespace) -> str:
    if not args.lvm_config_overrides:
        return ""
    try:
        text = Path(args.lvm_config_overrides).read_text()
    except OSError as exc:
        raise ConfigError(
            f"--lvm-config-overrides {args.lvm_config_overrides}: cannot read it: {exc.strerror}"
        ) from exc
    return config_overrides_from(text)


def status(args: argparse.Namespace) -> int:
    configure_logging("warning")
    options = Options(default_node_id(), args.driver_name, lvm_config_overrides=lvm_overrides(args))
    owners, no_api = None, ""
    try:
        owners = kube.owners(args.driver_name)
    except ConfigError as error:
        no_api = str(error)
    classes = node_status(build(load_config(args.config), options).backends, owners)
    if args.json:
        print(json.dumps(status_json(classes), indent=2))
    else:
        print(status_text(classes, no_api))
    return 0


def doctor(args: argparse.Namespace) -> int:
    configure_logging("warning")
    node_id = args.node_id or default_node_id()
    try:
        config = load_config(args.config).for_node(node_id)
    except ConfigError as error:
        print(f"FAIL config: {error}")
        config = None
    lvm = Lvm(Runner(config_overrides=lvm_overrides(args)))
    checks = run_doctor(config, lvm, os.path.dirname(socket_path(args.endpoint)), node_id)
    checks += doctor_topology(args, node_id)
    for check in checks:
        print(f"ok   {check.what}" if check.ok else f"FAIL {check.what}: {check.fix}")
    return 0 if config is not None and all(c.ok for c in checks) else 1


def doctor_topology(args: argparse.Namespace, node_id: str) -> list[Check]:
    """The running plugin's reported topology (NodeGetInfo on its socket)
    against the node's labels now, read from the API server."""
    reported = None
    path = socket_path(args.endpoint)
    if os.path.exists(path):
        with grpc.insecure_channel(f"unix://{path}") as channel:
            try:
                info = csi_pb2_grpc.NodeStub(channel).NodeGetInfo(
                    csi_pb2.NodeGetInfoRequest(), timeout=5
                )
                reported = dict(info.accessible_topology.segments)
            except grpc.RpcError:
                reported = None  # no plugin answers there
    listed = topology_labels(args)
    node_key = Options(node_id, args.driver_name).node_topology_key
    labels_now, problem = None, ""
    if compared_label_keys(reported, node_key, listed):
        try:
            labels_now = kube.node_labels(node_id, attempts=1)
        except ConfigError as error:
            problem = str(error)
    return topology_checks(reported, node_key, listed, labels_now, problem)


# glibc's mallopt parameter for the number of malloc arenas.
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Let the RPC threads share a few malloc arenas instead of one each
    (glibc's default is up to 8 per CPU), so the driver's memory does not grow
    with every thread the server starts. Must run before those threads."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False


@dataclass(frozen=True)
class ServeOptions:
    """The serve command's flags, checked once when made (each refusal names
    its flag): the graph's options and what the server itself takes."""

    graph: Options
    endpoint: str
    config_path: str
    grace_period: float
    metrics_address: str = ""  # "": no /metrics
    peer_listen: str = ""  # "": no port for the forwarder and the other plugins
    tls_dir: str = ""
    copies_across_nodes: bool = True

    @property
    def peer_port(self) -> int:
        return int(self.peer_listen.rpartition(":")[2])

    def __post_init__(self) -> None:
        socket_path(self.endpoint)  # refuses an endpoint that is no unix socket
        if self.metrics_address and not re.fullmatch(r".*:\d{1,5}", self.metrics_address):
            raise ConfigError(f"--metrics-address {self.metrics_address!r} must be host:port")
        if self.peer_listen and not re.fullmatch(r".*:\d{1,5}", self.peer_listen):
            raise ConfigError(f"--peer-listen {self.peer_listen!r} must be host:port")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeOptions:
        graph = Options(
            node_id=args.node_id or default_node_id(),
            driver_name=args.driver_name,
            topology_key=args.topology_key or "",
            topology_labels=topology_labels(args),
            lvm_prefix=args.lvm_prefix.split(),
            lvm_shell=not args.no_lvm_shell,
            lvm_shell_idle_exit=args.lvm_shell_idle_exit,
            lvm_config_overrides=lvm_overrides(args),
            refresh_seconds=args.refresh_interval,
            max_volumes_per_node=args.max_volumes_per_node,
            state_dir=args.state_dir or os.path.dirname(socket_path(args.endpoint)),
            copy_checkpoint_bytes=args.copy_checkpoint_mib << 20,
            cgroup_root=args.cgroup_root,
        )
        return cls(
            graph=graph,
            endpoint=args.endpoint,
            config_path=args.config,
            grace_period=args.grace_period,
            metrics_address=args.metrics_address,
            peer_listen=args.peer_listen,
            tls_dir=args.tls_dir,
            copies_across_nodes=args.copies_across_nodes == "on",
        )


def serve(args: argparse.Namespace) -> int:
    limit_malloc_arenas()
    configure_logging(args.log_level)
    log = structlog.get_logger("csi_lvm")
    flags = ServeOptions.from_args(args)
    options = flags.graph
    if options.topology_labels:
        options = with_node_labels(options, kube.node_labels(options.node_id), log)
    tls = TlsFiles(Path(flags.tls_dir))
    tls_listener = None
    if flags.peer_listen:
        try:
            tls_listener = (flags.peer_listen, server_credentials(tls))
        except ConfigError as error:
            # The Secret is optional in the DaemonSet: a cluster without it
            # runs the plugin without the port (restart it to add).
            log.warning("no TLS port for the forwarder and the other plugins: copies across "
                        "nodes are off", reason=str(error))  # fmt: skip
    peers = None
    if tls_listener is not None and flags.copies_across_nodes:
        port = args.plugin_port or flags.peer_port
        peers = (peer_lookup(args, port), tls)
    graph = build(load_config(flags.config_path), options, peers=peers)
    config = graph.config  # as this node sees it
    inventory, backends = graph.inventory, graph.backends
    scan = inventory.scan()
    for backend in backends:
        missing = backend.missing(scan)
        if missing is not None and backend.offered_here:
            # The rest of the node keeps working (unmounts above all); the
            # class answers no capacity and refuses creates until it is there.
            log.warning("device class unavailable", device_class=backend.name, reason=missing)
        elif missing is None and (warning := backend.warning(scan)) is not None:
            log.warning("device class at risk", device_class=backend.name, reason=warning)
    if flags.metrics_address:
        serve_metrics(flags.metrics_address, backends)
    graph.repair()
    server = Server(
        flags.endpoint,
        graph.identity,
        graph.controller,
        graph.node,
        graph.snapshot_metadata,
        tls_listener=tls_listener,
        volume_source=graph.volume_source,
        group_controller=graph.group_controller,
        tls_group_controller=graph.forwarded_group_controller,
        tls_controller=graph.peer_modifications,
    )
    log.info(
        "starting",
        version=__version__,
        driver=options.driver_name,
        node_id=options.node_id,
        topology=options.topology.segments,
        classes=[c.describe() for c in config.device_classes],
        copies_across_nodes=graph.peer_copies is not None,
    )
    stop_refreshing = threading.Event()
    threading.Thread(
        target=inventory.keep_fresh, args=(stop_refreshing,), name="refresh", daemon=True
    ).start()
    try:
        server.run_until_signalled(flags.grace_period)
    finally:
        stop_refreshing.set()
        graph.close()
    return 0


def with_node_labels(
    options: Options, node_labels: Mapping[str, str], log: structlog.typing.FilteringBoundLogger
) -> Options:
    """The options with this node's values of the listed topology labels
    (``node_labels``: its Node object's labels). A listed label the node lacks
    is left out: the node is in no domain of that key, so classes whose
    allowedTopologies name it never place a volume here. Said loudly, as the
    admin must label the node and restart the plugin (the kubelet reads
    NodeGetInfo when the plugin registers)."""
    labels = {key: node_labels[key] for key in options.topology_labels if key in node_labels}
    for key in missing_labels(options.topology_labels, labels):
        log.warning(
            "node lacks a topology label",
            label=key,
            node=options.node_id,
            fix=f"kubectl label node {options.node_id} {key}=<value>, then restart this "
            "plugin's pod; until then classes whose allowedTopologies name "
            f"{key} place no volume on this node",
        )
    return dataclasses.replace(options, node_labels=labels)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "status":
            return status(args)
        if args.command == "doctor":
            return doctor(args)
        if args.command == "release-node":
            return release_node(args)
        if args.command == "forward-snapshot-metadata":
            configure_logging(args.log_level)
            return forward_snapshot_metadata(args)
        if args.command == "forward-group-snapshots":
            configure_logging(args.log_level)
            return forward_group_snapshots(args)
    except ConfigError as exc:
        print(f"csi-lvm: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
