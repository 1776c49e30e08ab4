"""The cluster's API through lightkube, the client the driver itself uses.

A kubectl run costs seconds under TCG (a large Go binary starting, then a
TLS handshake) and the checks poll, so reads, applies, patches and deletes go
through one kept-alive client; kubectl keeps what needs its own protocols or
logic (exec, kustomize, waiting for CRDs). Objects come back as the API's
JSON (dicts), as ``kubectl get -o json`` prints them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from lightkube import ALL_NS, Client, KubeConfig
from lightkube.core.exceptions import ApiError, LoadResourceError
from lightkube.core.resource import NamespacedResource
from lightkube.core.resource_registry import resource_registry
from lightkube.generic_resource import load_in_cluster_generic_resources
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
    (SNAPSHOT_API, "VolumeSnapshot"), (SNAPSHOT_API, "VolumeSnapshotContent"),
    (GROUP_SNAPSHOT_API, "VolumeGroupSnapshot"),
    (GROUP_SNAPSHOT_API, "VolumeGroupSnapshotContent"),
)  # fmt: skip
SHORT_NAMES = {"pvc": "persistentvolumeclaim", "pv": "persistentvolume", "po": "pod",
               "sc": "storageclass", "sa": "serviceaccount", "sts": "statefulset"}  # fmt: skip
T = TypeVar("T")


def selector(text: str | None) -> dict[str, Any] | None:
    """``key=value,...`` (the only selector form the checks use) as lightkube's."""
    if not text:
        return None
    pairs = [term.split("=", 1) for term in text.split(",")]
    if any(len(pair) != 2 or pair[0].endswith("!") for pair in pairs):
        raise ValueError(f"selector {text!r}: only key=value terms are supported")
    return {key: value for key, value in pairs}


class Api:
    def __init__(self, kubeconfig: Path) -> None:
        self.client = Client(config=KubeConfig.from_file(kubeconfig), field_manager=FIELD_MANAGER)
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
        """lightkube's class for the kind; the cluster's CRDs are read again
        when it is one of theirs not yet known (the checks install CRDs)."""
        try:
            return resource_registry.load(api_version, kind)
        except LoadResourceError:
            self._timed(lambda: load_in_cluster_generic_resources(self.client))
            found = resource_registry.get(api_version, kind)
            if found is None:
                raise
            return found

    def named(self, name: str) -> Any:
        """The class of the kind kubectl would take ``name`` to mean (kind,
        plural or short name, any case)."""
        wanted = SHORT_NAMES.get(name.lower(), name.lower())
        for api_version, kind in KINDS:
            if wanted in (kind.lower(), f"{kind.lower()}s", f"{kind.lower()}es"):
                return self.resource(api_version, kind)
            if wanted == "csistoragecapacities" and kind == "CSIStorageCapacity":
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

    def exists(self, kind: str, name: str, namespace: str = DEFAULT_NAMESPACE) -> bool:
        try:
            self.get(kind, name, namespace=namespace)
        except ApiError as error:
            if error.status.code == 404:
                return False
            raise
        return True

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
