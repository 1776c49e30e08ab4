"""Where the other nodes' csi-lvm plugins are, and the mutual-TLS channels to
them: the forwarder relays SnapshotMetadata calls to the node a snapshot id
names (``csi_lvm.forwarding``); a plugin reads a snapshot or volume that
another node holds (``csi_lvm.peer_copy``).

A plugin is found by the node component of an id (the node's name, or a
hash of a long one): from a file of ``<node> <host:port>`` lines, or from the
Kubernetes API (the running pods of the plugin's DaemonSet, each serving the
node it runs on at its pod IP).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Protocol

import grpc
import httpx2
from lightkube.core.client import LabelSelector
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Pod

from csi_lvm import kube
from csi_lvm.errors import ConfigError, Unavailable
from csi_lvm.ids import node_component
from csi_lvm.tls import PLUGIN_SERVER_NAME, TlsFiles, channel_credentials

# How long a list of the plugins' addresses is trusted before it is read again
# (a node unknown to it is looked up at once).
PEERS_SECONDS = 30.0
# A client pings its plugin this often while a call waits (a long copy), so
# that a peer gone without a word (a node's power, a partition) ends the call.
PING_MS = 30_000
PING_TIMEOUT_MS = 20_000


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
        try:
            pods = kube.client().list(
                Pod,
                namespace=self.namespace,
                labels=_label_selector(self.selector),
                fields={"status.phase": "Running"},
            )
            return {"items": [pod.to_dict() for pod in pods]}
        except ApiError as error:
            raise Unavailable(
                f"the Kubernetes API refused to list the plugin's pods in namespace "
                f"{self.namespace} ({error}): its service account needs list on pods there"
            ) from None
        except (httpx2.HTTPError, ConfigError) as error:
            raise Unavailable(
                f"cannot reach the Kubernetes API to find the plugins: {error}"
            ) from None


def _label_selector(selector: str) -> LabelSelector:
    """``key=value,...`` as lightkube's label filter."""
    labels: LabelSelector = {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, equals, value = term.partition("=")
        if not equals:
            raise ConfigError(f"plugin selector {selector!r}: each term must be key=value")
        labels[key.strip()] = value.strip()
    return labels


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


class PeerChannels:
    """One mutual-TLS channel per plugin, made again when the certificates
    rotate. A plugin answers to the name every plugin's certificate carries."""

    def __init__(self, peers: Peers, tls: TlsFiles) -> None:
        self.peers = peers
        self.tls = tls
        self._channels: dict[str, tuple[tuple[float, ...], grpc.Channel]] = {}
        self._lock = threading.Lock()

    def channel(self, node: str, holding: str) -> grpc.Channel:
        """The channel to ``node``'s plugin; UNAVAILABLE naming what it holds
        when no plugin is known there."""
        address = self.peers.address(node)
        if address is None:
            raise Unavailable(
                f"no csi-lvm plugin is known on node {node}, which holds the {holding}; is "
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
                    options=[
                        ("grpc.ssl_target_name_override", PLUGIN_SERVER_NAME),
                        ("grpc.max_receive_message_length", 16 << 20),
                        ("grpc.keepalive_time_ms", PING_MS),
                        ("grpc.keepalive_timeout_ms", PING_TIMEOUT_MS),
                    ],
                )
                kept = self._channels[address] = (stamp, channel)
        return kept[1]

    def close(self) -> None:
        with self._lock:
            for _, channel in self._channels.values():
                channel.close()
            self._channels.clear()
