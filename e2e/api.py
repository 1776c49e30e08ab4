"""The cluster's API through lightkube, the client the driver itself uses.

A kubectl run costs seconds under TCG (a large Go binary starting, then a
TLS handshake) and the checks poll, so reads, applies, patches and deletes go
through one kept-alive client; kubectl keeps what needs its own protocols or
logic (kustomize, waiting for CRDs). Objects come back as the API's JSON
(dicts), as ``kubectl get -o json`` prints them: each kind is read through an
untyped twin of lightkube's model, since the models refuse JSON the API
serves (a new node's CSINode has ``"drivers": null``, and the model wants a
list). lightkube has no exec: that one is a WebSocket of the API's own
(websocket-client).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

import websocket
from lightkube import ALL_NS, Client, KubeConfig
from lightkube.core.exceptions import ApiError, LoadResourceError
from lightkube.core.resource import NamespacedResource
from lightkube.core.resource_registry import resource_registry
from lightkube.generic_resource import (
    GenericGlobalResource,
    GenericNamespacedResource,
    load_in_cluster_generic_resources,
)
from lightkube.types import PatchType

DEFAULT_NAMESPACE = "default"
FIELD_MANAGER = "e2e"
SNAPSHOT_API = "snapshot.storage.k8s.io/v1"
GROUP_SNAPSHOT_API = "groupsnapshot.storage.k8s.io/v1"
# The kinds the checks name, by their API version.
KINDS = (
    ("v1", "Pod"), ("v1", "PersistentVolumeClaim"), ("v1", "PersistentVolume"),
    ("v1", "Event"), ("v1", "Service"), ("v1", "Node"), ("v1", "ServiceAccount"),
    ("v1", "Secret"), ("apps/v1", "StatefulSet"), ("storage.k8s.io/v1", "StorageClass"),
    ("storage.k8s.io/v1", "CSINode"), ("storage.k8s.io/v1", "CSIStorageCapacity"),
    ("storage.k8s.io/v1", "VolumeAttributesClass"),
    (SNAPSHOT_API, "VolumeSnapshot"), (SNAPSHOT_API, "VolumeSnapshotContent"),
    (GROUP_SNAPSHOT_API, "VolumeGroupSnapshot"),
    (GROUP_SNAPSHOT_API, "VolumeGroupSnapshotContent"),
)  # fmt: skip
# Names kubectl knows that are not a kind's name plus "s" or "es".
OTHER_NAMES = {"pvc": "persistentvolumeclaim", "pv": "persistentvolume", "po": "pod",
               "sc": "storageclass", "sa": "serviceaccount", "sts": "statefulset",
               "csistoragecapacities": "csistoragecapacity"}  # fmt: skip
T = TypeVar("T")
# The API's exec protocol: each binary frame starts with a byte naming its
# stream; stream 3 carries the command's final status.
EXEC_PROTOCOL = "v4.channel.k8s.io"
STDOUT, STDERR, STATUS = 1, 2, 3


def selector(text: str | None) -> dict[str, Any] | None:
    """``key=value,...`` (the only selector form the checks use) as lightkube's."""
    if not text:
        return None
    pairs = [term.split("=", 1) for term in text.split(",")]
    if any(len(pair) != 2 or pair[0].endswith("!") for pair in pairs):
        raise ValueError(f"selector {text!r}: only key=value terms are supported")
    return {key: value for key, value in pairs}


@functools.cache
def untyped(model: Any) -> Any:
    """A class for the same API path as ``model`` whose objects are the
    API's JSON as it came (dicts), unchecked against the model's types."""
    namespaced = issubclass(model, NamespacedResource)
    base = GenericNamespacedResource if namespaced else GenericGlobalResource
    return type(model.__name__, (base,), {"_api_info": model._api_info})


class Api:
    def __init__(self, kubeconfig: Path, server: str, tls: tuple[Path, Path, Path]) -> None:
        """``tls``: the CA, the client certificate and its key (for exec)."""
        self.client = Client(config=KubeConfig.from_file(kubeconfig), field_manager=FIELD_MANAGER)
        self.server = urlsplit(server).netloc
        ca, cert, key = tls
        self.ssl_options = {"ca_certs": str(ca), "certfile": str(cert), "keyfile": str(key)}
        self.calls = 0
        self.seconds = 0.0

    def _timed(self, call: Callable[[], T]) -> T:
        start = time.monotonic()
        try:
            return call()
        finally:
            self.calls += 1
            self.seconds += time.monotonic() - start

    def resource(self, api_version: str, kind: str) -> Any:
        """The untyped class for the kind; the cluster's CRDs are read again
        when it is one of theirs not yet known (the checks install CRDs)."""
        found: Any
        try:
            found = resource_registry.load(api_version, kind)
        except LoadResourceError:
            self._timed(lambda: load_in_cluster_generic_resources(self.client))
            found = resource_registry.get(api_version, kind)
            if found is None:
                raise
        return untyped(found)

    def named(self, name: str) -> Any:
        """The class of the kind kubectl would take ``name`` to mean (kind,
        plural or short name, any case)."""
        wanted = OTHER_NAMES.get(name.lower(), name.lower())
        for api_version, kind in KINDS:
            if wanted in (kind.lower(), f"{kind.lower()}s", f"{kind.lower()}es"):
                return self.resource(api_version, kind)
        raise ValueError(f"no kind {name!r} in e2e.api.KINDS")

    @staticmethod
    def _scope(res: Any, namespace: str | None) -> str | None:
        """The namespace to pass: none for a cluster-wide kind."""
        if not issubclass(res, NamespacedResource):
            return None
        return namespace if namespace is not None else ALL_NS

    @staticmethod
    def _json(found: Any) -> dict[str, Any]:
        return found.to_dict() if hasattr(found, "to_dict") else dict(found)

    def get(self, kind: str, name: str | None = None, *, namespace: str | None = DEFAULT_NAMESPACE,
            labels: str | None = None, fields: str | None = None) -> dict[str, Any]:  # fmt: skip
        """One object, or ``{"items": [...]}`` (``namespace=None``: all namespaces)."""
        res = self.named(kind)
        scope = self._scope(res, namespace)
        if name is not None:
            return self._json(self._timed(lambda: self.client.get(res, name, namespace=scope)))
        listed: Iterable[Any] = self._timed(lambda: list(self.client.list(
            res, namespace=scope, labels=selector(labels), fields=selector(fields))))  # fmt: skip
        return {"items": [self._json(item) for item in listed]}

    def uid(self, kind: str, name: str, namespace: str = DEFAULT_NAMESPACE) -> str | None:
        """The UID of the object of that name now; None if there is none."""
        try:
            found = self.get(kind, name, namespace=namespace)
        except ApiError as error:
            if error.status.code == 404:
                return None
            raise
        uid: str = found["metadata"]["uid"]
        return uid

    def exists(self, kind: str, name: str, namespace: str = DEFAULT_NAMESPACE) -> bool:
        return self.uid(kind, name, namespace) is not None

    def apply(self, manifest: dict[str, Any]) -> None:
        """Server-side apply, taking every field over (kubectl's --force-conflicts)."""
        res = self.resource(manifest["apiVersion"], manifest["kind"])
        # An object without a namespace goes to the client's, "default", as with kubectl.
        obj = res.from_dict(manifest)
        self._timed(lambda: self.client.apply(obj, force=True))

    def merge(self, kind: str, name: str, patch: dict[str, Any],
              namespace: str = DEFAULT_NAMESPACE) -> None:  # fmt: skip
        res = self.named(kind)
        scope = self._scope(res, namespace)
        self._timed(lambda: self.client.patch(res, name, patch, namespace=scope,
                                              patch_type=PatchType.MERGE))  # fmt: skip

    def delete(self, kind: str, name: str, namespace: str = DEFAULT_NAMESPACE) -> bool:
        """Ask for the object's deletion; False if it was not there."""
        res = self.named(kind)
        try:
            self._timed(
                lambda: self.client.delete(res, name, namespace=self._scope(res, namespace))
            )
        except ApiError as error:
            if error.status.code == 404:
                return False
            raise
        return True

    def exec(self, namespace: str, pod: str, command: list[str], container: str | None = None,
             timeout: float = 180) -> tuple[int, str, str]:  # fmt: skip
        """Run ``command`` in the pod's container (its first by default): its
        exit code, standard output and standard error."""
        named = [("container", container)] if container else []
        query = urlencode([("command", part) for part in command] + named
                          + [("stdout", "true"), ("stderr", "true")])  # fmt: skip
        url = f"wss://{self.server}/api/v1/namespaces/{namespace}/pods/{pod}/exec?{query}"
        streams = {STDOUT: bytearray(), STDERR: bytearray(), STATUS: bytearray()}
        start = time.monotonic()
        connection = websocket.create_connection(
            url, timeout=timeout, subprotocols=[EXEC_PROTOCOL], sslopt=self.ssl_options
        )
        try:
            while True:
                opcode, data = connection.recv_data()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
                if data and data[0] in streams:
                    streams[data[0]].extend(data[1:])
        except websocket.WebSocketConnectionClosedException:
            pass  # the end of the command's output
        finally:
            connection.close()
            self.calls += 1
            self.seconds += time.monotonic() - start
        status = json.loads(streams[STATUS] or b"{}")
        code = 0
        if status.get("status") == "Failure":
            causes = status.get("details", {}).get("causes", [])
            codes = [int(c["message"]) for c in causes if c.get("reason") == "ExitCode"]
            code = codes[0] if codes else -1
            if code == -1:
                streams[STDERR].extend(status.get("message", "").encode())
        return (
            code,
            streams[STDOUT].decode(errors="replace"),
            streams[STDERR].decode(errors="replace"),
        )
