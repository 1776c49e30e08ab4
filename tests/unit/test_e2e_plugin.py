"""e2e/plugin.py: the DaemonSet's containers as node processes, read from the
shipped manifests. Host only; needs no Kubernetes binary."""

from __future__ import annotations

from pathlib import Path

import yaml

from e2e.plugin import DEPLOY, NodeProcesses, Rendered, containers, image_files, sidecar_binaries
from e2e.procs import Processes


def rendered() -> Rendered:
    objects = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            objects += [o for o in yaml.safe_load_all(path.read_text()) if o]
    return Rendered(objects)


def commands(tmp_path: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    manifests = rendered()
    node = NodeProcesses(manifests, "node-a", "csi-lvm-xyz", Path("/bin-dir"), tmp_path,
                         tmp_path / "sa.kubeconfig", Processes(tmp_path / "logs"))  # fmt: skip
    # hostPath volumes of type DirectoryOrCreate would be made: point them here.
    for volume in manifests.daemonset["spec"]["template"]["spec"]["volumes"]:
        if "hostPath" in volume:
            volume["hostPath"]["path"] = str(tmp_path / "host") + volume["hostPath"]["path"]
    return {c["name"]: node.command(c) for c in containers(manifests.daemonset)}


def test_sidecars_are_the_daemonsets_images() -> None:
    assert sidecar_binaries() == [
        "csi-node-driver-registrar", "csi-provisioner", "csi-snapshotter", "csi-resizer",
        "livenessprobe",
    ]  # fmt: skip


def test_paths_env_and_the_additions(tmp_path: Path) -> None:
    found = commands(tmp_path)
    host = f"{tmp_path}/host"
    socket = f"{host}/var/lib/kubelet/plugins/lvm.csi-lvm.io/csi.sock"
    plugin, plugin_env = found["csi-lvm"]
    assert plugin[1:3] == ["serve", "--endpoint"]
    assert plugin[3] == f"unix://{socket}"
    assert plugin[plugin.index("--config") + 1] == f"{tmp_path}/volumes/config/config.yaml"
    assert plugin[plugin.index("--node-id") + 1] == "node-a"
    overrides = plugin[plugin.index("--lvm-config-overrides") + 1]
    assert Path(overrides) == image_files()["/usr/share/csi-lvm/lvm-container.conf"]
    assert plugin_env == {
        "NODE_NAME": "node-a",
        "LVM_CONFIG_OVERRIDES": "/usr/share/csi-lvm/lvm-container.conf",
        "LVM_PREFIX": "",
    }
    assert "deviceClasses" in (tmp_path / "volumes" / "config" / "config.yaml").read_text()
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
