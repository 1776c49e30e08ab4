"""The workloads of deploy/kubernetes, run on the node as processes.

The manifests are rendered with ``kubectl kustomize`` from deploy/kubernetes
with its snapshot-metadata component (an overlay in build/vm/, the way an admin
turns the component on) and applied, the DaemonSet and the Deployment
included, except that their pods are kept off the real node (a nodeSelector
on the second, kubelet-less node): the plugin image is not built in the VM.
Each container of a workload's pod template then runs here as a process with
the container's own command, args and env, read from the rendered workload:
$(VAR) references and fieldRefs are resolved as the kubelet would, and every
path under a volumeMount is replaced by what that volume is on the node (its
hostPath, a directory holding the ConfigMap's or the Secret's keys, or an
empty directory of its own for an emptyDir; files the Dockerfile copies into
the image come from the checkout). What a container needs beyond its
manifest, and only that, is added: a kubeconfig with the workload's
ServiceAccount token for the sidecars that talk to the API, and the
registration directory for node-driver-registrar (whose /registration is a
mount in the pod). A container that talks to the API as a pod does (the
forwarder) gets what the kubelet gives every container: KUBERNETES_SERVICE_*
and the ServiceAccount's token at the fixed in-pod path, which the caller
writes (``in_cluster``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster import RACK_KEY, ZONE_KEY
from e2e.procs import Failed, Processes

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
SNAPSHOT_METADATA_COMPONENT = DEPLOY / "components" / "snapshot-metadata"
# Sidecars that talk to the Kubernetes API (rbac.yaml and the
# snapshot-metadata component grant these).
API_CLIENTS = {"csi-provisioner", "csi-snapshotter", "csi-resizer", "csi-snapshot-metadata"}
REGISTRAR = "csi-node-driver-registrar"
TOPOLOGY_LABELS_FLAG = "--topology-labels"
TOPOLOGY_LABELS = (ZONE_KEY, RACK_KEY)
VARIABLE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def raw_daemonset() -> dict[str, Any]:
    result: dict[str, Any] = yaml.safe_load((DEPLOY / "daemonset.yaml").read_text())
    return result


def image_binary(image: str) -> str:
    """The program a sidecar image runs: its repository's last path part."""
    return image.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]


def containers(daemonset: dict[str, Any]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = daemonset["spec"]["template"]["spec"]["containers"]
    return result


def runs_the_plugin_image(container: dict[str, Any]) -> bool:
    """Whether the container is of csi-lvm's own image (the plugin, the
    forwarder): its command is csi-lvm's; every other is an upstream sidecar."""
    return bool(container.get("command", [""])[0] == "csi-lvm")


def raw_snapshot_metadata_deployment() -> dict[str, Any]:
    documents = yaml.safe_load_all(
        (SNAPSHOT_METADATA_COMPONENT / "snapshot-metadata.yaml").read_text()
    )
    found: dict[str, Any] = next(d for d in documents if d and d["kind"] == "Deployment")
    return found


def sidecar_binaries() -> list[str]:
    """The upstream programs the workloads run: every container not of the plugin's image."""
    return [
        image_binary(c["image"])
        for workload in (raw_daemonset(), raw_snapshot_metadata_deployment())
        for c in containers(workload)
        if not runs_the_plugin_image(c)
    ]


def image_files() -> dict[str, Path]:
    """Paths in the plugin image that the Dockerfile copies from the checkout."""
    files: dict[str, Path] = {}
    for match in re.finditer(r"^COPY\s+(?!--)(\S+)\s+(\S+)\s*$", DOCKERFILE.read_text(), re.M):
        source, target = match.groups()
        if (ROOT / source).is_file():
            files[target] = ROOT / source
    return files


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


OVERLAY = ROOT / "build" / "vm" / "e2e-deploy"  # build/vm: writable in the VM


def render(kubectl: Any) -> Rendered:
    """deploy/kubernetes with the snapshot-metadata component, and the
    plugin told to report the node's zone and rack labels, as an admin would
    patch it (deploy/README.md)."""
    OVERLAY.mkdir(parents=True, exist_ok=True)
    (OVERLAY / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(DEPLOY, OVERLAY)],
        "components": [os.path.relpath(SNAPSHOT_METADATA_COMPONENT, OVERLAY)],
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
    return rendered


@dataclass
class NodeProcesses:
    """A workload's containers as processes of the node ``node``; by default
    the DaemonSet's. ``secrets`` reads a Secret's data (None: there is none);
    ``in_cluster`` is the environment a pod's containers get for the API."""

    rendered: Rendered
    node: str
    pod_name: str
    bin: Path
    scratch: Path
    kubeconfig: Path
    procs: Processes
    workload: dict[str, Any] | None = None
    secrets: Any = None
    in_cluster: dict[str, str] | None = None

    @property
    def template(self) -> dict[str, Any]:
        found: dict[str, Any] = (self.workload or self.rendered.daemonset)["spec"]["template"]
        return found

    @property
    def namespace(self) -> str:
        name: str = (self.workload or self.rendered.daemonset)["metadata"]["namespace"]
        return name

    def _volumes(self) -> dict[str, Path]:
        spec = self.template["spec"]
        directory_of = self.scratch / "volumes" / self.pod_name
        result: dict[str, Path] = {}
        for volume in spec["volumes"]:
            name = volume["name"]
            if "hostPath" in volume:
                path = Path(volume["hostPath"]["path"])
                if volume["hostPath"].get("type") == "DirectoryOrCreate":
                    path.mkdir(parents=True, exist_ok=True)
                result[name] = path
            elif "configMap" in volume:
                data = self.rendered.the("ConfigMap", volume["configMap"]["name"])["data"]
                directory = directory_of / name
                directory.mkdir(parents=True, exist_ok=True)
                for key, value in data.items():
                    (directory / key).write_text(value)
                result[name] = directory
            elif "secret" in volume:
                secret = volume["secret"]
                found = self.secrets(self.namespace, secret["secretName"]) if self.secrets else None
                if found is None and not secret.get("optional"):
                    raise Failed(f"volume {name}: no Secret {secret['secretName']}")
                directory = directory_of / name
                directory.mkdir(parents=True, exist_ok=True)
                for key, value in (found or {}).items():
                    (directory / key).write_bytes(value)
                    (directory / key).chmod(secret.get("defaultMode", 0o644))
                result[name] = directory
            elif "emptyDir" in volume:
                directory = directory_of / name
                directory.mkdir(parents=True, exist_ok=True)
                result[name] = directory
            else:
                raise Failed(f"volume {name} is of a kind the tier cannot map")
        return result

    def _env(self, container: dict[str, Any]) -> dict[str, str]:
        fields = {
            "spec.nodeName": self.node,
            "metadata.namespace": self.namespace,
            "metadata.name": self.pod_name,
        }
        env: dict[str, str] = dict(self.in_cluster or {})
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = VARIABLE.sub(lambda m: env.get(m[1], m[0]), item["value"])
            elif "configMapKeyRef" in item["valueFrom"]:
                ref = item["valueFrom"]["configMapKeyRef"]
                env[item["name"]] = self.rendered.the("ConfigMap", ref["name"])["data"][ref["key"]]
            else:
                env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        return env

    def command(self, container: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        """The container's command line on the node, and its environment."""
        env = self._env(container)
        volumes = self._volumes()
        mounts = {
            m["mountPath"].rstrip("/"): volumes[m["name"]]
            for m in container.get("volumeMounts", [])
        }
        if runs_the_plugin_image(container):
            mounts.update({k: v for k, v in image_files().items()})
            if self.in_cluster is None:
                # The API as the DaemonSet's pod reaches it: its service
                # account's token, so RBAC is what the cluster grants it.
                env["KUBECONFIG"] = str(self.kubeconfig)

        def on_node(word: str) -> str:
            word = VARIABLE.sub(lambda m: env.get(m[1], m[0]), word)
            prefix, _, value = word.rpartition("=") if word.startswith("--") else ("", "", word)
            for mount in sorted(mounts, key=len, reverse=True):
                if (
                    value == mount
                    or value.startswith(mount + "/")
                    or value.startswith(f"unix://{mount}/")
                ):
                    value = value.replace(mount, str(mounts[mount]).rstrip("/"), 1)
                    break
            return f"{prefix}={value}" if prefix else value

        if container.get("command"):
            # The image's venv is this checkout's (on PATH in the VM, scripts/guest.sh).
            search = f"{ROOT / '.venv' / 'bin'}:{os.environ.get('PATH', '')}"
            program = shutil.which(container["command"][0], path=search)
            if program is None:
                raise Failed(
                    f"{container['command'][0]} (container {container['name']}) is not on PATH"
                )
            argv = [program, *container["command"][1:]]
        else:
            argv = [str(self.bin / image_binary(container["image"]))]
        argv += [on_node(a) for a in container.get("args", [])]
        binary = image_binary(container["image"])
        if binary in API_CLIENTS:
            argv.append(f"--kubeconfig={self.kubeconfig}")
        if binary == REGISTRAR:
            registration = next(
                m for m in container["volumeMounts"] if m["mountPath"] == "/registration"
            )
            argv.append(f"--plugin-registration-path={volumes[registration['name']]}")
        return argv, env

    def start(self, only: set[str] | None = None) -> list[str]:
        lines = []
        for container in self.template["spec"]["containers"]:
            if only is not None and container["name"] not in only:
                continue
            argv, env = self.command(container)
            self.procs.start(container["name"], argv, env, restart=True)
            lines.append(f"{container['name']}: {shlex.join(argv)}")
        return lines
