"""The ``csi-lvm`` commands of the cluster's forwarders, which run beside
upstream sidecars of the whole cluster and send each call to the plugin of
the node it is about (``csi_lvm.forwarding``): ``forward-snapshot-metadata``
and ``forward-group-snapshots``; and the flags that find the plugins, which
``serve`` shares."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from csi_lvm.group_labels import GROUP_SIDECAR_NAME
from csi_lvm.peers import KubernetesPeers, Peers, StaticPeers
from csi_lvm.server import Server
from csi_lvm.tls import TlsFiles
from csi_lvm.wiring import build_forwarder, build_group_forwarder


def add_forwarder_parsers(commands: Any, endpoint: str, driver_name: str) -> None:
    def forwarder(name: str, what: str) -> argparse.ArgumentParser:
        command: argparse.ArgumentParser = commands.add_parser(name, help=what)
        command.add_argument("--endpoint", default=endpoint, help="unix:///path/to/csi.sock")
        command.add_argument("--driver-name", default=driver_name)
        command.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
        add_tls_dir(command)
        add_peer_lookup(command, plugin_port=9811)
        return command

    forwarder(
        "forward-snapshot-metadata",
        "serve SnapshotMetadata on a socket for the cluster's sidecar, forwarding each call to "
        "the plugin of the snapshot's node over mutual TLS",
    )
    groups = forwarder(
        "forward-group-snapshots",
        "serve the GroupController on a socket for the cluster's snapshotter sidecar for "
        "groups, forwarding each call to the plugin of the volumes' node over mutual TLS, and "
        "label the driver's group snapshot objects for that sidecar",
    )
    groups.add_argument(
        "--sidecar-name",
        default=os.environ.get("NODE_NAME") or GROUP_SIDECAR_NAME,
        help="the NODE_NAME of the sidecar for groups (a name no node has), put as the "
        "managed-by label on the driver's VolumeGroupSnapshotContents and "
        "VolumeGroupSnapshotClasses and on the contents of the groups' members",
    )


def add_tls_dir(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--tls-dir",
        default="/etc/csi-lvm-tls",
        help="ca.crt, tls.crt and tls.key (a kubernetes.io/tls Secret with the CA's certificate) "
        "for mutual TLS between the forwarder and the plugins",
    )


def add_peer_lookup(command: argparse.ArgumentParser, plugin_port: int | None) -> None:
    """How the node plugins are found: a file, or their pods."""
    command.add_argument(
        "--peers-file", default="", help="<node> <host:port> lines (else the Kubernetes API)"
    )
    command.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "csi-lvm"))
    command.add_argument(
        "--plugin-selector",
        default="app.kubernetes.io/name=csi-lvm",
        help="label selector of the plugin's pods",
    )
    command.add_argument(
        "--plugin-port",
        type=int,
        default=plugin_port,
        help="the plugins' TLS port"
        + ("" if plugin_port else " (default: the port of --peer-listen)"),
    )


def peer_lookup(args: argparse.Namespace, port: int) -> Peers:
    if args.peers_file:
        return StaticPeers(args.peers_file)
    return KubernetesPeers(args.namespace, args.plugin_selector, port)


def _plugins(args: argparse.Namespace) -> tuple[Peers, TlsFiles]:
    """Where the plugins are, and the forwarder's certificate to reach them."""
    tls = TlsFiles(Path(args.tls_dir))
    tls.read()  # missing files stop start-up, with their names
    return peer_lookup(args, args.plugin_port), tls


def forward_snapshot_metadata(args: argparse.Namespace) -> int:
    forwarder = build_forwarder(args.driver_name, *_plugins(args))
    server = Server(args.endpoint, forwarder.identity, None, None, forwarder.forwarding)
    try:
        server.run_until_signalled()
    finally:
        forwarder.close()
    return 0


def forward_group_snapshots(args: argparse.Namespace) -> int:
    forwarder = build_group_forwarder(args.driver_name, args.sidecar_name, *_plugins(args))
    server = Server(
        args.endpoint,
        forwarder.identity,
        forwarder.controller,
        None,
        group_controller=forwarder.group_controller,
    )
    forwarder.labeler.start()
    try:
        server.run_until_signalled()
    finally:
        forwarder.close()
    return 0
