"""One cluster-wide SnapshotMetadata endpoint for snapshots that live on
their nodes: each call goes to the csi-lvm plugin of the node its snapshot
id names, over mutual TLS.

Kubernetes' SnapshotMetadataService names one address for the whole driver,
where the upstream ``external-snapshot-metadata`` sidecar serves backup
tools and calls the driver's CSI socket. In csi-lvm that socket is this
forwarder's (``csi-lvm forward-snapshot-metadata``, in the sidecar's pod): it
reads the node from the snapshot id (``<node>:<class>:<lv>``), finds that
node's plugin (``Peers``), and relays the request and the answer's stream,
statuses included. The plugins listen for it on a TLS port that serves the
SnapshotMetadata service alone and takes only clients whose certificate
comes from the driver's own authority (``csi_lvm.tls``), which the forwarder
and the plugins alone hold.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import grpc

from csi_lvm.csi import csi_pb2, csi_pb2_grpc
from csi_lvm.errors import InvalidArgument, NotFound, Relayed, Unavailable
from csi_lvm.ids import Kind, ObjectId, node_component
from csi_lvm.rpc import budget
from csi_lvm.tls import PLUGIN_SERVER_NAME, TlsFiles, channel_credentials

Context = grpc.ServicerContext
# How long a list of the plugins' addresses is trusted before it is read again
# (a node unknown to it is looked up at once).
PEERS_SECONDS = 30.0
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class Peers(Protocol):
    def address(self, node: str) -> str | None:
        """``host:port`` of the plugin on the node an id names (its node
        component: the node's name, or a hash of a long one)."""


class StaticPeers:
    """Addresses from a file of ``<node> <host:port>`` lines (``#`` starts a
    comment), read again when it changes."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._stamp = -1.0
        self._addresses: dict[str, str] = {}
        self._lock = threading.Lock()

    def address(self, node: str) -> str | None:
        with self._lock:
            stamp = self.path.stat().st_mtime
            if stamp != self._stamp:
                self._addresses = parse_peers_file(self.path.read_text())
                self._stamp = stamp
            return self._addresses.get(node)


def parse_peers_file(text: str) -> dict[str, str]:
    addresses = {}
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) == 2:
            addresses[node_component(words[0])] = words[1]
    return addresses


class KubernetesPeers:
    """Addresses of the plugin's pods, from the Kubernetes API (the pod's
    service account may list pods in its namespace): each running pod of
    ``selector`` serves the node it runs on at its pod IP and ``port``."""

    def __init__(self, namespace: str, selector: str, port: int) -> None:
        self.namespace, self.selector, self.port = namespace, selector, port
        self._addresses: dict[str, str] = {}
        self._read_at = 0.0
        self._lock = threading.Lock()

    def address(self, node: str) -> str | None:
        with self._lock:
            stale = time.monotonic() - self._read_at > PEERS_SECONDS
            if stale or node not in self._addresses:
                self._addresses = peers_from_pod_list(self._list_pods(), self.port)
                self._read_at = time.monotonic()
            return self._addresses.get(node)

    def _list_pods(self) -> dict[str, Any]:
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        query = urllib.parse.urlencode(
            {"labelSelector": self.selector, "fieldSelector": "status.phase=Running"}
        )
        url = f"https://{host}:{port}/api/v1/namespaces/{self.namespace}/pods?{query}"
        token = (SERVICE_ACCOUNT / "token").read_text().strip()
        context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:  # noqa: S310 - https to the API server
            listed: dict[str, Any] = json.load(answer)
        return listed


def peers_from_pod_list(pods: dict[str, Any], port: int) -> dict[str, str]:
    """Node component to ``podIP:port`` for the running pods of a pod list."""
    addresses = {}
    for pod in pods.get("items", []):
        node = pod.get("spec", {}).get("nodeName")
        ip = pod.get("status", {}).get("podIP")
        if node and ip and pod.get("status", {}).get("phase") == "Running":
            host = f"[{ip}]" if ":" in ip else ip
            addresses[node_component(node)] = f"{host}:{port}"
    return addresses


class ForwardingService(csi_pb2_grpc.SnapshotMetadataServicer):
    def __init__(self, peers: Peers, tls: TlsFiles) -> None:
        self.peers = peers
        self.tls = tls
        self._channels: dict[str, tuple[tuple[float, ...], grpc.Channel]] = {}
        self._lock = threading.Lock()

    def GetMetadataAllocated(
        self, request: csi_pb2.GetMetadataAllocatedRequest, context: Context
    ) -> Iterator[csi_pb2.GetMetadataAllocatedResponse]:
        node = _node_of(request.snapshot_id, "snapshot_id")
        stub = self._stub(node)
        return _relayed(node, stub.GetMetadataAllocated(request, timeout=budget(context)))

    def GetMetadataDelta(
        self, request: csi_pb2.GetMetadataDeltaRequest, context: Context
    ) -> Iterator[csi_pb2.GetMetadataDeltaResponse]:
        base = _node_of(request.base_snapshot_id, "base_snapshot_id")
        target = _node_of(request.target_snapshot_id, "target_snapshot_id")
        if base != target:
            raise InvalidArgument(
                f"base snapshot {request.base_snapshot_id} is on node {base} and target "
                f"snapshot {request.target_snapshot_id} on node {target}: they are not "
                "snapshots of the same volume"
            )
        stub = self._stub(base)
        return _relayed(base, stub.GetMetadataDelta(request, timeout=budget(context)))

    def _stub(self, node: str) -> csi_pb2_grpc.SnapshotMetadataStub:
        address = self.peers.address(node)
        if address is None:
            raise Unavailable(
                f"no csi-lvm plugin is known on node {node}, which holds the snapshot; is "
                "the plugin running there?"
            )
        stamp = self.tls.stamp()
        with self._lock:
            kept = self._channels.get(address)
            if kept is None or kept[0] != stamp:  # new, or the certificates rotated
                if kept is not None:
                    kept[1].close()
                channel = grpc.secure_channel(
                    address,
                    channel_credentials(self.tls),
                    options=[("grpc.ssl_target_name_override", PLUGIN_SERVER_NAME)],
                )
                kept = self._channels[address] = (stamp, channel)
        return csi_pb2_grpc.SnapshotMetadataStub(kept[1])

    def close(self) -> None:
        with self._lock:
            for _, channel in self._channels.values():
                channel.close()
            self._channels.clear()


def _node_of(snapshot_id: str, field: str) -> str:
    if not snapshot_id:
        raise InvalidArgument(f"{field} is required")
    parsed = ObjectId.parse(snapshot_id)
    if parsed is None or parsed.kind is not Kind.SNAPSHOT:
        raise NotFound(f"snapshot {snapshot_id} does not exist: csi-lvm made no such id")
    return parsed.node


def _relayed(node: str, answers: Iterator[Any]) -> Iterator[Any]:
    """The node's messages, and its status when it fails."""
    try:
        yield from answers
    except grpc.RpcError as error:
        code = error.code()
        details = error.details() or ""
        if code is grpc.StatusCode.UNAVAILABLE:
            details = f"the csi-lvm plugin on node {node} cannot be reached: {details}"
        raise Relayed(code, details) from None
