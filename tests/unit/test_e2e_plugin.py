"""e2e/plugin.py: the workloads' containers as node processes, read from the
shipped manifests (rendered with the snapshot-metadata component, as the tier
renders them). Host only; needs no Kubernetes binary."""

from __future__ import annotations

from pathlib import Path

from e2e.plugin import (
    DEPLOY,
    SNAPSHOT_METADATA_COMPONENT,
    NodeProcesses,
    Rendered,
    containers,
    image_files,
    sidecar_binaries,
)
from e2e.procs import Processes
from tests.unit import kustomize


def rendered() -> Rendered:
    with_component = {
        **kustomize.load(DEPLOY),
        "components": [str(SNAPSHOT_METADATA_COMPONENT.relative_to(DEPLOY))],
    }
    return Rendered(kustomize.build(DEPLOY, with_component))


def commands(tmp_path: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The DaemonSet's command lines on node-a, in a cluster without Secrets."""
    manifests = rendered()
    node = NodeProcesses(manifests, "node-a", "csi-lvm-xyz", Path("/bin-dir"), tmp_path,
                         tmp_path / "sa.kubeconfig", Processes(tmp_path / "logs"),
                         secrets=lambda namespace, name: None)  # fmt: skip
    # hostPath volumes of type DirectoryOrCreate would be made: point them here.
    for volume in manifests.daemonset["spec"]["template"]["spec"]["volumes"]:
        if "hostPath" in volume:
            volume["hostPath"]["path"] = str(tmp_path / "host") + volume["hostPath"]["path"]
    return {c["name"]: node.command(c) for c in containers(manifests.daemonset)}


def test_sidecars_are_the_workloads_upstream_images() -> None:
    assert sidecar_binaries() == [
        "csi-node-driver-registrar", "csi-provisioner", "csi-snapshotter", "csi-resizer",
        "livenessprobe", "csi-snapshot-metadata",
    ]  # fmt: skip


def test_the_deployment_s_secrets_empty_dir_and_api_access(tmp_path: Path) -> None:
    manifests = rendered()
    deployment = manifests.the("Deployment", "csi-lvm-snapshot-metadata")
    secrets = {("csi-lvm", "csi-lvm-forwarding-tls"): {"ca.crt": b"CA", "tls.key": b"KEY"},
               ("csi-lvm", "csi-lvm-snapshot-metadata-tls"): {"tls.crt": b"CERT"}}  # fmt: skip
    api = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"}
    node = NodeProcesses(
        manifests, "node-a", "sm-xyz", Path("/bin-dir"), tmp_path, tmp_path / "sm.kubeconfig",
        Processes(tmp_path / "logs"), workload=deployment,
        secrets=lambda namespace, name: secrets.get((namespace, name)), in_cluster=api,
    )  # fmt: skip
    by_name = {c["name"]: node.command(c) for c in containers(deployment)}
    volumes = tmp_path / "volumes" / "sm-xyz"
    sidecar, _ = by_name["csi-snapshot-metadata"]
    assert sidecar[0] == "/bin-dir/csi-snapshot-metadata"
    assert f"--csi-address={volumes}/socket-dir/csi.sock" in sidecar
    assert f"--tls-cert={volumes}/sidecar-tls/tls.crt" in sidecar
    assert sidecar[-1] == f"--kubeconfig={tmp_path}/sm.kubeconfig"
    assert (volumes / "sidecar-tls" / "tls.crt").read_bytes() == b"CERT"
    forwarder, env = by_name["forwarder"]
    assert forwarder[1:4] == ["forward-snapshot-metadata", "--endpoint",
                              f"unix://{volumes}/socket-dir/csi.sock"]  # fmt: skip
    assert forwarder[forwarder.index("--tls-dir") + 1] == f"{volumes}/forwarding-tls"
    assert forwarder[forwarder.index("--namespace") + 1] == "csi-lvm"
    assert (volumes / "forwarding-tls" / "tls.key").read_bytes() == b"KEY"
    assert (volumes / "forwarding-tls" / "tls.key").stat().st_mode & 0o777 == 0o440
    assert env == {**api, "POD_NAMESPACE": "csi-lvm"}
    assert not any(a.startswith("--kubeconfig") for a in forwarder)  # in-cluster, as in a pod


def test_an_optional_secret_that_is_missing_is_an_empty_directory(tmp_path: Path) -> None:
    plugin, _ = commands(tmp_path)["csi-lvm"]  # no Secret exists there
    tls = Path(plugin[plugin.index("--tls-dir") + 1])
    assert tls == tmp_path / "volumes" / "csi-lvm-xyz" / "forwarding-tls"
    assert tls.is_dir() and not any(tls.iterdir())


def test_paths_env_and_the_additions(tmp_path: Path) -> None:
    found = commands(tmp_path)
    host = f"{tmp_path}/host"
    socket = f"{host}/var/lib/kubelet/plugins/lvm.csi-lvm.io/csi.sock"
    plugin, plugin_env = found["csi-lvm"]
    assert plugin[1:3] == ["serve", "--endpoint"]
    assert plugin[3] == f"unix://{socket}"
    assert (
        plugin[plugin.index("--config") + 1] == f"{tmp_path}/volumes/csi-lvm-xyz/config/config.yaml"
    )
    assert plugin[plugin.index("--node-id") + 1] == "node-a"
    overrides = plugin[plugin.index("--lvm-config-overrides") + 1]
    assert Path(overrides) == image_files()["/usr/share/csi-lvm/lvm-container.conf"]
    assert plugin_env == {
        "NODE_NAME": "node-a",
        "LVM_CONFIG_OVERRIDES": "/usr/share/csi-lvm/lvm-container.conf",
        "LVM_PREFIX": "",
        # Its own Node's topology labels, as the DaemonSet's service account.
        "KUBECONFIG": f"{tmp_path}/sa.kubeconfig",
    }
    assert (
        "deviceClasses"
        in (tmp_path / "volumes" / "csi-lvm-xyz" / "config" / "config.yaml").read_text()
    )
    provisioner, env = found["csi-provisioner"]
    assert provisioner[0] == "/bin-dir/csi-provisioner"
    assert f"--csi-address={socket}" in provisioner
    assert provisioner[-1] == f"--kubeconfig={tmp_path}/sa.kubeconfig"
    assert env == {"NODE_NAME": "node-a", "NAMESPACE": "csi-lvm", "POD_NAME": "csi-lvm-xyz"}
    registrar, _ = found["node-driver-registrar"]
    # The registration path is the kubelet's view: the env value, unchanged.
    assert (
        "--kubelet-registration-path=/var/lib/kubelet/plugins/lvm.csi-lvm.io/csi.sock" in registrar
    )
    assert registrar[-1] == f"--plugin-registration-path={host}/var/lib/kubelet/plugins_registry"
    resizer, _ = found["csi-resizer"]
    assert "--leader-election-namespace=csi-lvm" in resizer
    probe, _ = found["liveness-probe"]
    assert not any(a.startswith("--kubeconfig") for a in probe)
