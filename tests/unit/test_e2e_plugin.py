"""e2e/plugin.py: deploy/kubernetes as the cluster tier applies it (rendered
with the snapshot-metadata and group-snapshots components, as the tier
renders it) and the images
its pods run. Host only; needs no Kubernetes binary."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from csi_lvm.config import parse_config
from e2e.plugin import (
    COMPONENTS,
    DEPLOY,
    TLS_SCRIPT,
    Rendered,
    per_node_config,
    sidecar_images,
)
from tests.unit import kustomize


def rendered() -> Rendered:
    with_component = {
        **kustomize.load(DEPLOY),
        "components": [str(c.relative_to(DEPLOY)) for c in COMPONENTS],
    }
    return Rendered(kustomize.build(DEPLOY, with_component))


def test_sidecar_images_run_the_binary_the_image_is_named_after() -> None:
    images = sidecar_images()
    assert sorted(images.values()) == [
        "csi-node-driver-registrar", "csi-provisioner", "csi-resizer", "csi-snapshot-metadata",
        "csi-snapshotter", "livenessprobe",
    ]  # fmt: skip
    for image, binary in images.items():
        assert image.startswith("registry.k8s.io/sig-storage/")
        assert image.split("/")[-1].split(":")[0] == binary


def test_each_node_sees_every_class_on_its_own_volume_group() -> None:
    """The tier's ConfigMap, read by the driver's own config code as each node
    resolves it."""
    manifests = rendered()
    shipped = [c["name"] for c in manifests.device_classes]
    per_node_config(manifests, {"node-a": "vg0", "node-b": "vg1"})
    text = manifests.the("ConfigMap", "csi-lvm-config")["data"]["config.yaml"]
    config = parse_config(text, "tier-config")
    for node, vg in (("node-a", "vg0"), ("node-b", "vg1")):
        seen = config.for_node(node)
        assert [c.name for c in seen.device_classes] == shipped
        assert {c.volume_group for c in seen.device_classes} == {vg}
        assert all(c.on_node(node) for c in seen.device_classes)
        assert seen.default_class is not None
    assert not any(c.on_node("node-c") for c in config.for_node("node-c").device_classes)


def test_the_tier_applies_every_secret_its_workloads_mount_and_the_cr(tmp_path: Path) -> None:
    """What set_up_plugin applies beside the rendered objects: the output of
    TLS_SCRIPT --snapshot-metadata."""
    done = subprocess.run(
        [str(TLS_SCRIPT), "--snapshot-metadata", str(tmp_path / "tls")],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    made = [o for o in yaml.safe_load_all(done.stdout) if o]
    secrets = {o["metadata"]["name"] for o in made if o["kind"] == "Secret"}
    manifests = rendered()
    workloads = [manifests.daemonset, manifests.the("Deployment", "csi-lvm-snapshot-metadata")]
    mounted = {
        volume["secret"]["secretName"]
        for workload in workloads
        for volume in workload["spec"]["template"]["spec"]["volumes"]
        if "secret" in volume
    }
    assert mounted == secrets  # every one, optional or not, and no other
    (cr,) = [o for o in made if o["kind"] == "SnapshotMetadataService"]
    assert cr["metadata"]["name"] == manifests.driver_name
