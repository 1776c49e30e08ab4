"""deploy/kubernetes as the tier applies it, and the images its pods run.

The manifests are rendered with ``kubectl kustomize`` from deploy/kubernetes
with its snapshot-metadata and group-snapshots components (an overlay in
build/vm/, the way an admin turns the components on). Two changes an admin
of this cluster would make are made to the rendered objects: the plugin
reports the nodes' zone and rack labels (``--topology-labels``), and each
device class of the ConfigMap has an entry per node naming that node's
volume group (the nodes share one kernel, so their volume groups need names
of their own; deploy/kubernetes/configmap.yaml, "one class, a volume group
per node").

The DaemonSet and the components' Deployments then run as pods: the
plugin's image is the Dockerfile's (built on the host, imported into each
node's containerd), each upstream sidecar's image is its binary alone, under
the name the manifest gives (``sidecar_images``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster import RACK_KEY, ZONE_KEY
from e2e.procs import Failed

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
SNAPSHOT_METADATA_COMPONENT = DEPLOY / "components" / "snapshot-metadata"
GROUP_SNAPSHOTS_COMPONENT = DEPLOY / "components" / "group-snapshots"
COMPONENTS = (SNAPSHOT_METADATA_COMPONENT, GROUP_SNAPSHOTS_COMPONENT)
# The certificates, as Secrets (and the SnapshotMetadataService CR) to apply.
TLS_SCRIPT = DEPLOY / "tls.sh"
TOPOLOGY_LABELS_FLAG = "--topology-labels"
TOPOLOGY_LABELS = (ZONE_KEY, RACK_KEY)


def raw_daemonset() -> dict[str, Any]:
    result: dict[str, Any] = yaml.safe_load((DEPLOY / "daemonset.yaml").read_text())
    return result


def image_binary(image: str) -> str:
    """The program a sidecar image runs: its repository's last path part."""
    return image.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    return result


def runs_the_plugin_image(container: dict[str, Any]) -> bool:
    """Whether the container is of csi-lvm's own image (the plugin, the
    forwarder): its command is csi-lvm's; every other is an upstream sidecar."""
    return bool(container.get("command", [""])[0] == "csi-lvm")


def raw_component_deployments() -> list[dict[str, Any]]:
    """The Deployments of the components the tier turns on."""
    return [
        document
        for component in COMPONENTS
        for path in sorted(component.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for document in yaml.safe_load_all(path.read_text())
        if document and document["kind"] == "Deployment"
    ]


def sidecar_images() -> dict[str, str]:
    """The upstream images the workloads run (every container not of the
    plugin's image), each with the program it runs."""
    return {
        c["image"]: image_binary(c["image"])
        for workload in (raw_daemonset(), *raw_component_deployments())
        for c in containers(workload)
        if not runs_the_plugin_image(c)
    }


def sidecar_binaries() -> list[str]:
    return list(sidecar_images().values())


@dataclass
class Rendered:
    objects: list[dict[str, Any]]

    def the(self, kind: str, name: str | None = None) -> dict[str, Any]:
        for obj in self.objects:
            if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name):
                return obj
        raise Failed(f"deploy/kubernetes renders no {kind} {name or ''}")

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    @property
    def daemonset(self) -> dict[str, Any]:
        return self.the("DaemonSet")

    @property
    def driver_name(self) -> str:
        name: str = self.the("CSIDriver")["metadata"]["name"]
        return name

    @property
    def device_classes(self) -> list[dict[str, Any]]:
        config = yaml.safe_load(self.the("ConfigMap", "csi-lvm-config")["data"]["config.yaml"])
        classes: list[dict[str, Any]] = config["deviceClasses"]
        return classes


OVERLAY = ROOT / "build" / "vm" / "e2e-deploy"  # build/vm: writable in the VM


def render(kubectl: Any, volume_groups: dict[str, str] | None = None) -> Rendered:
    """deploy/kubernetes with the snapshot-metadata and group-snapshots components, the plugin
    told to report the nodes' zone and rack labels, and, for each node of
    ``volume_groups`` (node name: its volume group), the ConfigMap's classes
    on that node's volume group, as an admin would patch it (deploy/README.md)."""
    OVERLAY.mkdir(parents=True, exist_ok=True)
    (OVERLAY / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(DEPLOY, OVERLAY)],
        "components": [os.path.relpath(c, OVERLAY) for c in COMPONENTS],
    }))  # fmt: skip
    text: str = kubectl("kustomize", str(OVERLAY))
    rendered = Rendered([o for o in yaml.safe_load_all(text) if o])
    for container in containers(rendered.daemonset):
        if runs_the_plugin_image(container):
            container["args"] = [
                f"{TOPOLOGY_LABELS_FLAG}={','.join(TOPOLOGY_LABELS)}"
                if arg == f"{TOPOLOGY_LABELS_FLAG}="
                else arg
                for arg in container["args"]
            ]
    if volume_groups:
        per_node_config(rendered, volume_groups)
    return rendered


def per_node_config(rendered: Rendered, volume_groups: dict[str, str]) -> None:
    """Each device class of the ConfigMap once per node of ``volume_groups``
    (node name: its volume group), on that node's volume group."""
    entries = [
        {**device_class, "volumeGroup": vg, "nodes": [node]}
        for device_class in rendered.device_classes
        for node, vg in volume_groups.items()
    ]
    config = rendered.the("ConfigMap", "csi-lvm-config")
    config["data"]["config.yaml"] = yaml.safe_dump({"deviceClasses": entries}, sort_keys=False)
