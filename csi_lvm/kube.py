"""The Kubernetes API, through lightkube (a maintained, typed client): the
labels of this plugin's Node object, and whose volumes and snapshots the
node's LVs are (a PV's claim, a VolumeSnapshotContent's VolumeSnapshot). In a
pod the client uses the service account's token and CA; elsewhere
``$KUBECONFIG`` or ``~/.kube/config``.

Failures become ConfigError with what to do: the plugin needs these labels
before it may answer NodeGetInfo (the kubelet reads it once, at registration).
"""

from __future__ import annotations

import os
import time

import httpx2
from lightkube import Client, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.core.exceptions import ConfigError as KubeConfigError
from lightkube.generic_resource import create_global_resource
from lightkube.resources.core_v1 import Node, PersistentVolume

from csi_lvm.errors import ConfigError

VolumeSnapshotContent = create_global_resource(
    "snapshot.storage.k8s.io", "v1", "VolumeSnapshotContent", "volumesnapshotcontents"
)

# The API server may be coming up with the node (a whole cluster restarting):
# a minute of retries before the plugin gives up and its pod restarts.
ATTEMPTS = 12
PAUSE_SECONDS = 5.0


def _config() -> KubeConfig:
    """``$KUBECONFIG`` when it is set (as kubectl), else the pod's service
    account when the kubelet gave the container the API's address, else
    ``~/.kube/config``. (lightkube's ``from_env`` would try the account's
    files first, and fail without the address where only they exist.)"""
    explicit = os.environ.get("KUBECONFIG")
    if explicit:
        return KubeConfig.from_file(explicit)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return KubeConfig.from_service_account()
    return KubeConfig.from_file(os.path.expanduser("~/.kube/config"))


def client() -> Client:
    try:
        return Client(config=_config(), timeout=httpx2.Timeout(10.0))
    except (KubeConfigError, OSError) as error:
        raise ConfigError(
            f"no Kubernetes API is configured here ({error}): run csi-lvm in its pod (its "
            "service account), or set KUBECONFIG"
        ) from None


def owners(driver_name: str) -> dict[str, str]:
    """``namespace/name`` of the PVC bound to each of the driver's PVs and of
    the VolumeSnapshot of each of its VolumeSnapshotContents, by volume or
    snapshot id (what the node's LVs are called in the cluster)."""
    api = client()
    found: dict[str, str] = {}
    try:
        for volume in api.list(PersistentVolume):
            csi = volume.spec.csi if volume.spec is not None else None
            claim = volume.spec.claimRef if volume.spec is not None else None
            if csi is not None and csi.driver == driver_name and claim is not None:
                found[csi.volumeHandle] = f"{claim.namespace}/{claim.name}"
        for content in api.list(VolumeSnapshotContent):
            spec, status = content.get("spec") or {}, content.get("status") or {}
            handle = status.get("snapshotHandle") or spec.get("source", {}).get("snapshotHandle")
            ref = spec.get("volumeSnapshotRef") or {}
            if spec.get("driver") == driver_name and handle and ref.get("name"):
                found[handle] = f"{ref.get('namespace')}/{ref['name']}"
    except ApiError as error:
        raise ConfigError(
            f"the Kubernetes API refused to list PVs and VolumeSnapshotContents: {error}"
        ) from None
    except httpx2.HTTPError as error:
        raise ConfigError(f"cannot reach the Kubernetes API: {error}") from None
    return found


def node_labels(
    node_name: str, attempts: int = ATTEMPTS, pause_seconds: float = PAUSE_SECONDS
) -> dict[str, str]:
    """The labels of Node ``node_name``."""
    api = client()
    for attempt in range(1, attempts + 1):
        try:
            metadata = api.get(Node, name=node_name).metadata
            return dict((metadata.labels if metadata is not None else None) or {})
        except ApiError as error:
            raise ConfigError(_api_refusal(node_name, error.status.code or 0, str(error))) from None
        except httpx2.HTTPError as error:
            if attempt == attempts:
                raise ConfigError(
                    f"cannot reach the Kubernetes API to read node {node_name}'s topology "
                    f"labels ({error}) after {attempts} attempts"
                ) from None
            time.sleep(pause_seconds)
    raise AssertionError("unreachable")


def _api_refusal(node_name: str, code: int, message: str) -> str:
    if code == 404:
        return (
            f"the Kubernetes API has no node {node_name}: --node-id must be the node's name "
            "(the DaemonSet passes spec.nodeName)"
        )
    if code in (401, 403):
        return (
            f"the plugin may not read node {node_name} ({message}): its service account "
            "needs get on nodes (deploy/kubernetes/rbac.yaml, ClusterRole csi-lvm-node)"
        )
    return f"the Kubernetes API refused to show node {node_name}: {message}"
