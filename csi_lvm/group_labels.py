"""The label that shows the driver's group snapshot objects to the cluster's
one snapshotter sidecar for groups.

A snapshotter sidecar started with ``--node-deployment`` watches only the
VolumeSnapshotContents, VolumeGroupSnapshotContents and
VolumeGroupSnapshotClasses labelled ``snapshot.storage.kubernetes.io/managed-by``
with its ``NODE_NAME``. The snapshot-controller labels a single snapshot's
content for its volume's node, and labels no group object at all: neither
the group's content and class, nor the contents of the group's members,
which it makes itself once the group is cut. The sidecar for groups runs
under a name no node has (``csi-lvm-group-snapshots``), and this loop, in
the group forwarder's process, labels all three kinds with it as they
appear (only the members among the driver's VolumeSnapshotContents: the
snapshot-controller marks them with the group's handle). The sidecar needs
the members' contents to let them go when the group is deleted (it removes
their finalizer; DeleteVolumeGroupSnapshot removed their snapshots). An
object that carries the label already (a single snapshot's content, an
admin's pre-provisioned group content) is left as it is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import httpx2
import structlog
from lightkube import Client
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_global_resource
from lightkube.types import PatchType

from csi_lvm import kube
from csi_lvm.errors import ConfigError

log = structlog.get_logger("csi_lvm.group_labels")

MANAGED_BY = "snapshot.storage.kubernetes.io/managed-by"
# What the snapshot-controller puts on the content of a group's member.
GROUP_HANDLE = "groupsnapshot.storage.k8s.io/volumeGroupSnapshotHandle"
GROUP_SIDECAR_NAME = "csi-lvm-group-snapshots"
# After the API refused or went away: how long before the watch starts again.
RETRY_SECONDS = 5.0

VolumeGroupSnapshotContent = create_global_resource(
    "groupsnapshot.storage.k8s.io",
    "v1",
    "VolumeGroupSnapshotContent",
    "volumegroupsnapshotcontents",
)
VolumeSnapshotContent = create_global_resource(
    "snapshot.storage.k8s.io", "v1", "VolumeSnapshotContent", "volumesnapshotcontents"
)
VolumeGroupSnapshotClass = create_global_resource(
    "groupsnapshot.storage.k8s.io",
    "v1",
    "VolumeGroupSnapshotClass",
    "volumegroupsnapshotclasses",
)

KINDS = {
    "VolumeGroupSnapshotClass": VolumeGroupSnapshotClass,
    "VolumeGroupSnapshotContent": VolumeGroupSnapshotContent,
    "VolumeSnapshotContent": VolumeSnapshotContent,
}


def needs_label(kind: str, obj: Mapping[str, Any], driver_name: str) -> bool:
    """Whether ``obj`` (of ``kind``, as the API gives it) is this driver's
    group object, or the content of a group's member, with no managed-by
    label yet."""
    metadata = obj.get("metadata") or {}
    if MANAGED_BY in (metadata.get("labels") or {}):
        return False
    if kind == "VolumeSnapshotContent" and GROUP_HANDLE not in (metadata.get("annotations") or {}):
        return False  # a single snapshot's: its node's sidecar takes it
    driver = obj.get("driver") or (obj.get("spec") or {}).get("driver")
    return bool(driver == driver_name)


class GroupLabeler:
    """One watch per kind of group object, on threads of their own, for as
    long as the process runs."""

    def __init__(
        self,
        driver_name: str,
        sidecar_name: str = GROUP_SIDECAR_NAME,
        api: Callable[[], Client] = kube.client,
    ) -> None:
        self.driver_name = driver_name
        self.sidecar_name = sidecar_name
        self.api = api
        self._stopping = threading.Event()

    def start(self) -> None:
        for kind, resource in KINDS.items():
            threading.Thread(
                target=self._watch_forever, args=(kind, resource), name=kind, daemon=True
            ).start()

    def stop(self) -> None:
        self._stopping.set()

    def _watch_forever(self, kind: str, resource: Any) -> None:
        while not self._stopping.is_set():
            try:
                api = self.api()
                # From resource version 0, as informers begin: every object
                # there is (ADDED) from the API server's cache, without
                # waiting for the cache to prove itself as new as the store
                # (for a kind rarely written, such as a class, that wait can
                # fail every time). It ends when the server closes it; the
                # loop then starts again.
                for _event, obj in api.watch(resource, resource_version="0"):
                    if self._stopping.is_set():
                        return
                    self.label(api, kind, resource, obj.to_dict())
            except (ApiError, httpx2.HTTPError, ConfigError) as error:
                log.warning(
                    "cannot watch group snapshot objects; retrying",
                    kind=kind,
                    error=str(error),
                    retry_seconds=RETRY_SECONDS,
                )
                self._stopping.wait(RETRY_SECONDS)

    def label(self, api: Client, kind: str, resource: Any, obj: Mapping[str, Any]) -> None:
        if not needs_label(kind, obj, self.driver_name):
            return
        name = obj["metadata"]["name"]
        patch = {"metadata": {"labels": {MANAGED_BY: self.sidecar_name}}}
        try:
            api.patch(resource, name, patch, patch_type=PatchType.MERGE)
        except ApiError as error:
            if error.status.code == 404:
                return  # deleted meanwhile
            raise
        log.info(
            "labelled for the group snapshot sidecar",
            kind=kind,
            name=name,
        )
