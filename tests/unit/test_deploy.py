"""The deployment under deploy/: schema-valid manifests that agree with the driver.

Every manifest is checked against the Kubernetes OpenAPI schemas bundled by
kubernetes-validate (strict: unknown fields fail). The VolumeSnapshot CRDs are
not in those schemas; their required fields are checked by hand, after the
CRDs of external-snapshotter v8.6.0 (client/config/crd). Then the cross-checks:
the driver name, socket path, topology key, device classes and StorageClass
parameters in the manifests are the ones the driver accepts, and every sidecar
flag exists in the pinned release (flag lists below, read from each release's
source; see deploy/kubernetes/SIDECARS.md). What a cluster sets in
kustomization.yaml (the plugin image, the kubelet directory, the storage-node
component) is rendered with the part of kustomize in tests/unit/kustomize.py,
itself checked against a real kustomize where one is installed.
"""

from __future__ import annotations

import base64
import copy
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml

from csi_lvm import __version__, fs
from csi_lvm.cli import DEFAULT_DRIVER_NAME, ServeOptions, build_parser
from csi_lvm.config import parse_config
from csi_lvm.controller import CAPABILITIES as CONTROLLER_CAPABILITIES
from csi_lvm.csi import csi_pb2
from csi_lvm.fs import SUPPORTED_FILESYSTEMS
from csi_lvm.identity import IdentityService
from csi_lvm.ids import ObjectId
from csi_lvm.node import CAPABILITIES as NODE_CAPABILITIES
from csi_lvm.peer_source import caller_is_plugin
from csi_lvm.peers import _label_selector
from csi_lvm.server import socket_path
from csi_lvm.tls import PLUGIN_SERVER_NAME, TlsFiles, channel_credentials, server_credentials
from csi_lvm.validation import DEVICE_CLASS_PARAMETER, SIDECAR_PARAMETER_PREFIX
from tests.unit import kustomize

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
EXAMPLES = DEPLOY / "examples"

# The oldest Kubernetes minor still supported upstream and the newest one
# kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.35.0", "1.37.0")
NAMESPACE = "csi-lvm"
PLUGIN = "csi-lvm"
TOPOLOGY_KEY = f"topology.{DEFAULT_DRIVER_NAME}/node"
SNAPSHOT_API = "snapshot.storage.k8s.io/v1"
GROUP_SNAPSHOT_API = "groupsnapshot.storage.k8s.io/v1"
NO_PROVISIONER = "kubernetes.io/no-provisioner"
# The kubelet directory: the default and the ones of distributions that move it.
KUBELET_DIR_SETTING = "kubeletDir"
DEFAULT_KUBELET_DIR = "/var/lib/kubelet"
OTHER_KUBELET_DIRS = ("/var/lib/k0s/kubelet", "/var/snap/microk8s/common/var/lib/kubelet")
STORAGE_NODE_LABEL = "lvm.csi-lvm.io/storage-node"
METRICS_PORT = 9810
# The plugins' mutual-TLS port (copies across nodes, the forwarder's calls),
# its Secret, and the script that makes every certificate of the driver.
PEER_PORT = 9811
PLUGIN_SECRET = "csi-lvm-plugin-tls"
TLS_SCRIPT = KUBERNETES / "tls.sh"
PEERS_ROLE = "csi-lvm-peers"
SNAPSHOT_METADATA_COMPONENT = "components/snapshot-metadata"
SNAPSHOT_METADATA = KUBERNETES / SNAPSHOT_METADATA_COMPONENT
SNAPSHOT_METADATA_CLIENT_ROLE = "csi-lvm-snapshot-metadata-client"
FORWARDING_SECRET = "csi-lvm-forwarding-tls"  # the forwarder's own certificate
FORWARDER_NAME = "csi-lvm-forwarder"
SIDECAR_SECRET = "csi-lvm-snapshot-metadata-tls"
CBT_API = "cbt.storage.k8s.io/v1beta1"

# The plugin's command line is a contract with the image and the docs.
PLUGIN_COMMAND = [
    "csi-lvm",
    "serve",
    "--endpoint",
    "unix:///csi/csi.sock",
    "--config",
    "/etc/csi-lvm/config.yaml",
    "--node-id",
    "$(NODE_NAME)",
    "--log-level",
    "info",
    "--topology-labels=",
    "--metrics-address",
    "0.0.0.0:9810",
    "--lvm-config-overrides",
    "$(LVM_CONFIG_OVERRIDES)",
    "--lvm-prefix",
    "$(LVM_PREFIX)",
    "--peer-listen",
    "0.0.0.0:9811",
    "--tls-dir",
    "/etc/csi-lvm-tls",
    "--cgroup-root",
    "/host/sys/fs/cgroup",
]

# ---------------------------------------------------------------- sidecars
#
# Flags each pinned release defines, read from its source at the tag (commit
# in SIDECARS.md). LOGGING: k8s.io/component-base logs/api/v1 AddGoFlags /
# AddFlags, vendored in every sidecar. COMMON: csi-lib-utils v0.24.0
# standardflags.RegisterCommonFlags (provisioner, snapshotter, resizer).
LOGGING = {
    "v",
    "vmodule",
    "logging-format",
    "log-flush-frequency",
    "log-text-split-stream",
    "log-text-info-buffer-size",
    "log-json-split-stream",
    "log-json-info-buffer-size",
}
COMMON = {
    "version",
    "kubeconfig",
    "csi-address",
    "leader-election",
    "leader-election-namespace",
    "leader-election-lease-duration",
    "leader-election-renew-deadline",
    "leader-election-retry-period",
    "leader-election-labels",
    "kube-api-qps",
    "kube-api-burst",
    "http-endpoint",
    "metrics-address",
    "metrics-path",
}
SIG_STORAGE = "registry.k8s.io/sig-storage/"
SIDECARS: dict[str, tuple[str, str, set[str]]] = {
    # container name: (image, tag, flags)
    "node-driver-registrar": (
        SIG_STORAGE + "csi-node-driver-registrar",
        "v2.17.0",  # cmd/csi-node-driver-registrar/main.go
        LOGGING
        | {
            "connection-timeout",
            "timeout",
            "csi-address",
            "plugin-registration-path",
            "kubelet-registration-path",
            "health-port",
            "http-endpoint",
            "version",
            "mode",
            "enable-pprof",
        },
    ),
    "csi-provisioner": (
        SIG_STORAGE + "csi-provisioner",
        "v6.3.0",  # cmd/csi-provisioner/csi-provisioner.go
        LOGGING
        | COMMON
        | {
            "master",
            "volume-name-prefix",
            "volume-name-uuid-length",
            "retry-interval-start",
            "retry-interval-max",
            "worker-threads",
            "cloning-protection-threads",
            "snapshot-orphan-sweep-interval",
            "capacity-threads",
            "timeout",
            "strict-topology",
            "immediate-topology",
            "extra-create-metadata",
            "enable-pprof",
            "default-fstype",
            "kube-api-capacity-qps",
            "kube-api-capacity-burst",
            "enable-capacity",
            "capacity-for-immediate-binding",
            "capacity-poll-interval",
            "capacity-ownerref-level",
            "node-deployment",
            "node-deployment-immediate-binding",
            "node-deployment-base-delay",
            "node-deployment-max-delay",
            "controller-publish-readonly",
            "prevent-volume-mode-conversion",
            "feature-gates",
        },
    ),
    "csi-snapshotter": (
        SIG_STORAGE + "csi-snapshotter",
        "v8.6.0",  # cmd/csi-snapshotter/main.go
        LOGGING
        | COMMON
        | {
            "resync-period",
            "snapshot-name-prefix",
            "snapshot-name-uuid-length",
            "worker-threads",
            "timeout",
            "extra-create-metadata",
            "retry-interval-start",
            "retry-interval-max",
            "node-deployment",
            "groupsnapshot-name-prefix",
            "groupsnapshot-name-uuid-length",
            "feature-gates",
        },
    ),
    "csi-resizer": (
        SIG_STORAGE + "csi-resizer",
        "v2.3.0",  # cmd/csi-resizer/main.go
        LOGGING
        | COMMON
        | {
            "master",
            "resync-period",
            "workers",
            "extra-modify-metadata",
            "timeout",
            "resize-timeout",
            "modify-timeout",
            "retry-interval-start",
            "retry-interval-max",
            "handle-volume-inuse-error",
            "feature-gates",
        },
    ),
    "liveness-probe": (
        SIG_STORAGE + "livenessprobe",
        "v2.19.0",  # cmd/livenessprobe/main.go (no common flags)
        LOGGING
        | {
            "probe-timeout",
            "csi-address",
            "health-port",
            "metrics-address",
            "http-endpoint",
            "metrics-path",
        },
    ),
}
# Environment each sidecar needs from the downward API in this deployment.
DOWNWARD_API = {
    "NODE_NAME": "spec.nodeName",
    "NAMESPACE": "metadata.namespace",
    "POD_NAMESPACE": "metadata.namespace",
    "POD_NAME": "metadata.name",
}
NEEDS_ENV = {
    PLUGIN: {"NODE_NAME", "POD_NAMESPACE"},  # the default of --namespace reads the second
    "node-driver-registrar": set(),
    "csi-provisioner": {"NODE_NAME", "NAMESPACE", "POD_NAME"},
    "csi-snapshotter": {"NODE_NAME"},
    "csi-resizer": {"NAMESPACE"},
}


# ---------------------------------------------------------------- loading


@cache
def documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    """Every object in deploy/**/*.yaml but the kustomization, with its origin."""
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                found.append((str(path.relative_to(DEPLOY)), doc))
    return tuple(found)


def base_documents() -> list[dict[str, Any]]:
    """The objects deploy/kubernetes renders without components."""
    return [
        doc
        for origin, doc in documents()
        if origin.startswith("kubernetes/") and not origin.startswith("kubernetes/components/")
    ]


def objects(kind: str, where: Path | None = None) -> list[dict[str, Any]]:
    prefix = "" if where is None else str(where.relative_to(DEPLOY)) + "/"
    return [d for origin, d in documents() if d["kind"] == kind and origin.startswith(prefix)]


def the(kind: str, name: str, where: Path = KUBERNETES) -> dict[str, Any]:
    matches = [d for d in objects(kind, where) if d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name} under {where}, found {len(matches)}"
    return matches[0]


def daemonset() -> dict[str, Any]:
    return the("DaemonSet", "csi-lvm")


def pod_spec(ds: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = (ds or daemonset())["spec"]["template"]["spec"]
    return spec


def containers(ds: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod_spec(ds)["containers"]}


def volumes(ds: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec(ds)["volumes"]}


def expand(container: dict[str, Any], text: str) -> str:
    """``text`` with each $(VAR) replaced by the container's literal env value,
    as kubelet expands arguments."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], text)


def mount(container: dict[str, Any], path: str) -> dict[str, Any]:
    matches = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    assert matches, f"container {container['name']} mounts nothing at {path}"
    return matches[0]


def secret_of(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The Secret volume mounted at ``path`` in ``container`` (a directory, never a subPath)."""
    found = mount(container, path)
    assert "subPath" not in found, "a subPath mount never sees a rotated Secret"
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == found["name"]]
    secret: dict[str, Any] = volume["secret"]
    return secret


def flags(container: dict[str, Any]) -> dict[str, str | None]:
    """A sidecar's --name[=value] arguments; anything else is an error."""
    parsed: dict[str, str | None] = {}
    for arg in container.get("args", []):
        match = re.fullmatch(r"--([a-z0-9-]+)(?:=(.*))?", arg)
        assert match, f"{container['name']}: argument {arg!r} is not --flag or --flag=value"
        parsed[match[1]] = match[2]
    return parsed


def csi_lvm_storage_classes() -> list[dict[str, Any]]:
    classes = [sc for sc in objects("StorageClass") if sc["provisioner"] != NO_PROVISIONER]
    assert classes
    return classes


def device_config() -> Any:
    config_map = the("ConfigMap", "csi-lvm-config")
    return parse_config(config_map["data"]["config.yaml"], "configmap.yaml config.yaml")


def plugin_socket() -> PurePosixPath:
    args = build_parser().parse_args(containers()[PLUGIN]["args"])
    return PurePosixPath(socket_path(args.endpoint))


def kustomization(
    *,
    kubelet_dir: str | None = None,
    image: dict[str, str] | None = None,
    components: tuple[str, ...] = (),
) -> dict[str, Any]:
    """deploy/kubernetes/kustomization.yaml changed the way a cluster admin
    would: its kubeletDir, the plugin's images entry, components."""
    changed = kustomize.load(KUBERNETES)
    if kubelet_dir is not None:
        (generator,) = changed["configMapGenerator"]
        assert [g.partition("=")[0] for g in generator["literals"]] == [KUBELET_DIR_SETTING]
        generator["literals"] = [f"{KUBELET_DIR_SETTING}={kubelet_dir}"]
    if image is not None:
        (entry,) = changed["images"]
        entry.update(image)
    if components:
        changed["components"] = list(components)
    return changed


def render(**settings: Any) -> list[dict[str, Any]]:
    """deploy/kubernetes as kustomize renders it, with ``kustomization(**settings)``."""
    return kustomize.build(KUBERNETES, kustomization(**settings))


def keyed(objs: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    found = {
        (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o for o in objs
    }
    assert len(found) == len(objs), "two objects with one kind, namespace and name"
    return found


def rendered_daemonset(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return keyed(objs)[("DaemonSet", NAMESPACE, "csi-lvm")]


def scalars(found: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every scalar of a manifest with its path (list items by index)."""
    if isinstance(found, dict):
        for key, value in found.items():
            yield from scalars(value, f"{path}.{key}")
    elif isinstance(found, list):
        for index, value in enumerate(found):
            yield from scalars(value, f"{path}[{index}]")
    else:
        yield path, found


def changes(
    before: list[dict[str, Any]], after: list[dict[str, Any]]
) -> dict[str, tuple[Any, Any]]:
    """Where two renders differ: {object/path: (before, after)}; the same
    objects and shapes are required."""
    old, new = keyed(before), keyed(after)
    assert old.keys() == new.keys()
    found = {}
    for key in old:
        old_scalars, new_scalars = dict(scalars(old[key])), dict(scalars(new[key]))
        assert old_scalars.keys() == new_scalars.keys(), key
        for path, value in old_scalars.items():
            if new_scalars[path] != value:
                found[f"{key[0]}/{key[2]}{path}"] = (value, new_scalars[path])
    return found


def schedulable_on(spec: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Pod with ``spec`` may run on a node with ``labels`` by its
    nodeSelector and required node affinity (taints aside)."""
    if any(labels.get(k) != v for k, v in spec.get("nodeSelector", {}).items()):
        return False
    affinity = spec.get("affinity", {}).get("nodeAffinity", {})
    terms = affinity.get("requiredDuringSchedulingIgnoredDuringExecution", {}).get(
        "nodeSelectorTerms"
    )
    if not terms:
        return True
    operators = {
        "In": lambda key, values: labels.get(key) in values,
        "NotIn": lambda key, values: labels.get(key) not in values,
        "Exists": lambda key, values: key in labels,
        "DoesNotExist": lambda key, values: key not in labels,
    }
    return any(
        all(
            operators[e["operator"]](e["key"], e.get("values", []))
            for e in term.get("matchExpressions", [])
        )
        for term in terms
    )


def validate(doc: dict[str, Any], version: str) -> None:
    if doc["apiVersion"] in (SNAPSHOT_API, GROUP_SNAPSHOT_API):
        check_snapshot_crd(doc)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


def sanitize_lease_name(name: str) -> str:
    """external-resizer's util.SanitizeName: what the lease name is made of."""
    name = re.sub(r"[^a-zA-Z0-9-]", "-", name)
    return name + "X" if name.endswith("-") else name


# ---------------------------------------------------------------- schemas


def _ids() -> Iterator[str]:
    for origin, doc in documents():
        yield f"{origin}:{doc['kind']}/{doc['metadata']['name']}"


def check_snapshot_crd(doc: dict[str, Any]) -> None:
    """Required fields and allowed keys of the snapshot CRDs used here."""
    expected_api = GROUP_SNAPSHOT_API if "Group" in doc["kind"] else SNAPSHOT_API
    assert doc["apiVersion"] == expected_api
    name = doc.get("metadata", {}).get("name", "")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", name), f"bad name {name!r}"
    if doc["kind"] in ("VolumeSnapshotClass", "VolumeGroupSnapshotClass"):
        allowed = {"apiVersion", "kind", "metadata", "driver", "deletionPolicy", "parameters"}
        assert set(doc) <= allowed, f"unknown fields {set(doc) - allowed}"
        assert isinstance(doc.get("driver"), str) and doc["driver"], "driver is required"
        assert doc.get("deletionPolicy") in {"Delete", "Retain"}, "deletionPolicy is required"
        parameters = doc.get("parameters", {})
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in parameters.items())
    elif doc["kind"] == "VolumeSnapshot":
        assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
        spec = doc.get("spec")
        assert isinstance(spec, dict), "spec is required"
        assert set(spec) <= {"source", "volumeSnapshotClassName"}
        source = spec.get("source")
        assert isinstance(source, dict), "spec.source is required"
        names = {"persistentVolumeClaimName", "volumeSnapshotContentName"}
        assert set(source) <= names
        assert len(set(source) & names) == 1, "exactly one source must be set"
        assert all(isinstance(v, str) and v for v in source.values())
        if "volumeSnapshotClassName" in spec:
            assert isinstance(spec["volumeSnapshotClassName"], str)
            assert spec["volumeSnapshotClassName"], "must not be the empty string"
    elif doc["kind"] == "VolumeGroupSnapshot":
        assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
        spec = doc.get("spec")
        assert isinstance(spec, dict), "spec is required"
        assert set(spec) <= {"source", "volumeGroupSnapshotClassName"}
        source = spec.get("source")
        assert isinstance(source, dict), "spec.source is required"
        assert set(source) <= {"selector", "volumeGroupSnapshotContentName"}
        assert len(source) == 1, "exactly one source must be set"
        selector = source.get("selector", {})
        assert set(selector) <= {"matchLabels", "matchExpressions"}
        if "volumeGroupSnapshotClassName" in spec:
            assert isinstance(spec["volumeGroupSnapshotClassName"], str)
            assert spec["volumeGroupSnapshotClassName"], "must not be the empty string"
    else:
        pytest.fail(f"no hand check for {doc['kind']}")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("doc", [d for _, d in documents()], ids=list(_ids()))
def test_manifest_matches_the_kubernetes_schema(doc: dict[str, Any], version: str) -> None:
    validate(doc, version)


def test_the_schema_check_catches_a_misspelt_field() -> None:
    broken = copy.deepcopy(daemonset())
    mounts = broken["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    mounts[1]["mountPropogation"] = mounts[1].pop("mountPropagation")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest_and_sets_the_plugin_version() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert kustomization["images"] == [{"name": "csi-lvm", "newTag": __version__}]
    assert containers()[PLUGIN]["image"] == f"csi-lvm:{__version__}"


def test_namespaced_objects_live_in_the_driver_namespace() -> None:
    cluster_scoped = {
        "Namespace",
        "CSIDriver",
        "StorageClass",
        "ClusterRole",
        "ClusterRoleBinding",
        "VolumeSnapshotClass",
        "VolumeGroupSnapshotClass",
    }
    the("Namespace", NAMESPACE)
    for origin, doc in documents():
        if not origin.startswith("kubernetes/"):
            continue
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in doc["metadata"], f"{doc['kind']} is cluster-scoped"
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]["name"]


# ---------------------------------------------------------------- the driver


def test_csidriver_object() -> None:
    driver = the("CSIDriver", DEFAULT_DRIVER_NAME)
    assert driver["spec"] == {
        "attachRequired": False,
        "storageCapacity": True,
        "volumeLifecycleModes": ["Persistent"],
        "fsGroupPolicy": "File",
        "podInfoOnMount": False,
        "seLinuxMount": True,
    }


def test_driver_name_is_the_one_the_driver_reports() -> None:
    for storage_class in csi_lvm_storage_classes():
        assert storage_class["provisioner"] == DEFAULT_DRIVER_NAME
    snapshot_classes = objects("VolumeSnapshotClass")
    assert snapshot_classes
    for snapshot_class in snapshot_classes:
        assert snapshot_class["driver"] == DEFAULT_DRIVER_NAME
    args = build_parser().parse_args(containers()[PLUGIN]["args"])
    assert args.driver_name == DEFAULT_DRIVER_NAME


def environment(container: dict[str, Any], objs: list[dict[str, Any]]) -> dict[str, str]:
    """The container's env as the kubelet sets it, fieldRefs aside: literal
    values and keys of the rendered ConfigMaps."""
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "configMapKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = maps[ref["name"]][ref["key"]]
    return env


def plugin_args(objs: list[dict[str, Any]]) -> list[str]:
    """The plugin's arguments as the kubelet expands them, on node-a."""
    plugin = containers(rendered_daemonset(objs))[PLUGIN]
    env = {**environment(plugin, objs), "NODE_NAME": "node-a"}
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in plugin["args"]]


def test_plugin_command_line_is_the_contract() -> None:
    plugin = containers()[PLUGIN]
    assert plugin["command"] + plugin["args"] == PLUGIN_COMMAND
    args = build_parser().parse_args(plugin_args(render()))
    assert args.command == "serve"
    assert args.node_id == "node-a"
    assert args.topology_key is None  # so the default topology.<driver>/node applies
    assert args.topology_labels == ""  # the node key alone until the admin lists labels
    config_mount = mount(plugin, str(PurePosixPath(args.config).parent))
    assert volumes()[config_mount["name"]]["configMap"]["name"] == "csi-lvm-config"
    assert "config.yaml" in the("ConfigMap", "csi-lvm-config")["data"]
    # By default LVM runs in the container, with the image's overrides.
    assert args.lvm_prefix == ""
    assert args.lvm_config_overrides == "/usr/share/csi-lvm/lvm-container.conf"


def test_socket_path_is_shared_by_plugin_registrar_and_sidecars() -> None:
    socket = plugin_socket()
    assert socket == PurePosixPath("/csi/csi.sock")
    plugin = containers()[PLUGIN]
    socket_volume = mount(plugin, str(socket.parent))["name"]
    host_dir = PurePosixPath(volumes()[socket_volume]["hostPath"]["path"])
    assert host_dir == PurePosixPath(f"/var/lib/kubelet/plugins/{DEFAULT_DRIVER_NAME}")
    registrar_container = containers()["node-driver-registrar"]
    registration_path = expand(
        registrar_container, flags(registrar_container)["kubelet-registration-path"] or ""
    )
    assert PurePosixPath(registration_path) == host_dir / socket.name
    for name in SIDECARS:
        sidecar = containers()[name]
        assert flags(sidecar)["csi-address"] == str(socket), name
        assert mount(sidecar, str(socket.parent))["name"] == socket_volume, name
    registration = mount(containers()["node-driver-registrar"], "/registration")
    assert volumes()[registration["name"]]["hostPath"]["path"].rstrip("/") == (
        "/var/lib/kubelet/plugins_registry"
    )


def test_plugin_container_has_what_lvm_and_mounts_need() -> None:
    plugin = containers()[PLUGIN]
    assert plugin["securityContext"]["privileged"] is True
    kubelet = mount(plugin, "/var/lib/kubelet")
    assert kubelet["mountPropagation"] == "Bidirectional"
    assert volumes()[kubelet["name"]]["hostPath"]["path"] == "/var/lib/kubelet"
    for path in (
        "/dev",
        "/run/lvm",
        "/run/lock/lvm",
        "/etc/lvm",
        "/etc/lvm/backup",
        "/etc/lvm/archive",
    ):
        host = volumes()[mount(plugin, path)["name"]]["hostPath"]["path"]
        assert host.rstrip("/") == path, f"{path} must be the host's own {path}"
    # The host's LVM configuration, as it is (read-only); the container's own
    # settings reach every command on top of it, from a file of the image.
    assert mount(plugin, "/etc/lvm")["readOnly"] is True
    args = build_parser().parse_args(plugin_args(render()))
    assert args.lvm_config_overrides == "/usr/share/csi-lvm/lvm-container.conf"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY deploy/image/lvmlocal.conf /usr/share/csi-lvm/lvm-container.conf" in dockerfile


def test_liveness_probe_is_served_by_the_livenessprobe_sidecar() -> None:
    plugin = containers()[PLUGIN]
    probe = plugin["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in plugin["ports"]}
    port = ports.get(probe["port"], probe["port"])
    assert (probe["path"], port) == ("/healthz", 9808)
    assert flags(containers()["liveness-probe"])["http-endpoint"] == ":9808"
    timeout = flags(containers()["liveness-probe"])["probe-timeout"] or "1s"
    assert int(timeout.rstrip("s")) < plugin["livenessProbe"]["timeoutSeconds"]


def test_the_node_plugin_tolerates_every_taint() -> None:
    assert pod_spec()["tolerations"] == [{"operator": "Exists"}]
    assert "nodeSelector" not in pod_spec() and "affinity" not in pod_spec()


def test_metrics_are_served_and_the_service_selects_the_plugin_pods() -> None:
    plugin = containers()[PLUGIN]
    args = build_parser().parse_args(plugin["args"])
    host, _, port = args.metrics_address.rpartition(":")
    assert (host, int(port)) == ("0.0.0.0", METRICS_PORT)  # on the pod's own address
    ports = {p["name"]: p["containerPort"] for p in plugin["ports"]}
    assert ports["metrics"] == METRICS_PORT
    service = the("Service", "csi-lvm-metrics")
    template_labels = daemonset()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= template_labels.items()
    assert service["spec"]["clusterIP"] == "None"  # every pod scraped, not one of them
    (service_port,) = service["spec"]["ports"]
    assert ports[service_port["targetPort"]] == service_port["port"] == METRICS_PORT
    assert service["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(METRICS_PORT),
        "prometheus.io/path": "/metrics",
    }
    for name, container in containers().items():
        if name != PLUGIN:
            assert METRICS_PORT not in {p["containerPort"] for p in container.get("ports", [])}


def test_every_plugin_serves_its_tls_port_with_an_optional_secret() -> None:
    # In the base: copies across nodes are on by default, and the
    # snapshot-metadata component's forwarder calls the same port.
    plugin = containers()[PLUGIN]
    args = build_parser().parse_args(plugin_args(render()))
    host, _, port = args.peer_listen.rpartition(":")
    assert (host, int(port)) == ("0.0.0.0", PEER_PORT)  # on the pod's own address
    assert args.copies_across_nodes == "on"
    assert {"name": "peer", "containerPort": PEER_PORT, "protocol": "TCP"} in plugin["ports"]
    for name, container in containers().items():
        if name != PLUGIN:
            assert PEER_PORT not in {p["containerPort"] for p in container.get("ports", [])}
    # The Secret's directory, read-only; optional: a plugin starts without it
    # (no port, copies across nodes off, its log says why).
    assert mount(plugin, args.tls_dir)["readOnly"] is True
    secret = secret_of({"spec": pod_spec()}, plugin, args.tls_dir)
    assert secret == {"secretName": PLUGIN_SECRET, "defaultMode": 0o400, "optional": True}
    # Not inside the ConfigMap's mount (nor it inside the Secret's).
    (config_volume,) = [v for v in volumes().values() if "configMap" in v]
    (config_mount,) = [m for m in plugin["volumeMounts"] if m["name"] == config_volume["name"]]
    tls_dir, config_dir = PurePosixPath(args.tls_dir), PurePosixPath(config_mount["mountPath"])
    assert not tls_dir.is_relative_to(config_dir) and not config_dir.is_relative_to(tls_dir)
    assert PurePosixPath(args.config).is_relative_to(config_dir)


def test_the_plugin_finds_the_other_plugins_among_the_daemonset_s_pods(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objs = cbt_render()
    ds = rendered_daemonset(objs)
    plugin = containers(ds)[PLUGIN]
    # --namespace defaults to $POD_NAMESPACE: the pod's own, by the downward API.
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
           for e in plugin["env"] if "fieldRef" in e.get("valueFrom", {})}  # fmt: skip
    assert env["POD_NAMESPACE"] == "metadata.namespace"
    monkeypatch.setenv("POD_NAMESPACE", ds["metadata"]["namespace"])
    args = build_parser().parse_args(plugin_args(objs))
    assert args.namespace == NAMESPACE
    assert args.peers_file == ""  # from the Kubernetes API
    # The default selector: the DaemonSet's pods, not the forwarder's.
    selector = _label_selector(args.plugin_selector)
    assert selector.items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    forwarder_pod = snapshot_metadata_pod(objs)
    assert not selector.items() <= forwarder_pod["metadata"]["labels"].items()
    # At the port they listen on: no --plugin-port, so that of --peer-listen.
    assert args.plugin_port is None
    args.lvm_config_overrides = ""  # the image's file, not on this host
    assert ServeOptions.from_args(args).peer_port == PEER_PORT


def test_selinux_mount_context_reaches_the_kernel_at_stage() -> None:
    assert the("CSIDriver", DEFAULT_DRIVER_NAME)["spec"]["seLinuxMount"] is True
    # kubelet adds context="<label>" (quoted: an MCS label holds a comma) to
    # the mount flags; NodeStageVolume makes the one real mount of a volume
    # and hands the flags to mount(2) whole; publishing bind-mounts that.
    assert csi_pb2.NodeServiceCapability.RPC.STAGE_UNSTAGE_VOLUME in NODE_CAPABILITIES
    context = 'context="system_u:object_r:container_file_t:s0:c15,c25"'
    assert fs.kernel_mount_options([context]) == (0, context)
    assert fs.kernel_mount_options(["noatime", context, "nodev"]) == (
        fs.MS_NOATIME | fs.MS_NODEV,
        context,
    )


# ---------------------------------------------------------------- kustomize
#
# What an admin changes in kustomization.yaml, rendered: the kubelet directory
# of k0s and microk8s, the plugin image in another registry, and the
# storage-nodes component.

REGISTRY_IMAGE = {"newName": "registry.example.com/csi-lvm", "newTag": "9.9.9"}
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "k0s": {"kubelet_dir": OTHER_KUBELET_DIRS[0]},
    "microk8s": {"kubelet_dir": OTHER_KUBELET_DIRS[1]},
    "registry": {"image": REGISTRY_IMAGE},
    "storage-nodes": {"components": ("components/storage-nodes",)},
    "host-lvm": {"components": ("components/host-lvm",)},
    "snapshot-metadata": {"components": (SNAPSHOT_METADATA_COMPONENT,)},
    "group-snapshots": {"components": ("components/group-snapshots",)},
}


def test_with_its_defaults_the_kustomization_emits_the_manifests_as_written() -> None:
    written = base_documents()
    assert keyed(render()) == keyed(written)


@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - {"defaults"}))
def test_a_customised_render_matches_the_kubernetes_schema(variant: str) -> None:
    for doc in render(**VARIANTS[variant]):
        validate(doc, KUBERNETES_VERSIONS[-1])


@pytest.mark.parametrize("kubelet_dir", OTHER_KUBELET_DIRS)
def test_the_kubelet_dir_setting_moves_every_kubelet_path_and_nothing_else(
    kubelet_dir: str,
) -> None:
    default, moved = render(), render(kubelet_dir=kubelet_dir)
    naming_it = {
        f"{key[0]}/{key[2]}{path}": value
        for key, obj in keyed(default).items()
        for path, value in scalars(obj)
        if isinstance(value, str) and DEFAULT_KUBELET_DIR in value
    }
    assert len(naming_it) == 5, naming_it  # 3 hostPaths, the mount, the registrar's socket
    # Each is the directory or a path below it, so the one prefix moves all.
    for value in naming_it.values():
        assert value == DEFAULT_KUBELET_DIR or value.startswith(DEFAULT_KUBELET_DIR + "/"), value
    assert changes(default, moved) == {
        path: (value, kubelet_dir + value.removeprefix(DEFAULT_KUBELET_DIR))
        for path, value in naming_it.items()
    }
    # And they still fit together: the registrar registers the socket the
    # plugin serves, and the kubelet directory is mounted where it lies.
    ds = rendered_daemonset(moved)
    plugin, registrar = containers(ds)[PLUGIN], containers(ds)["node-driver-registrar"]
    socket = plugin_socket()
    socket_dir = volumes(ds)[mount(plugin, str(socket.parent))["name"]]["hostPath"]["path"]
    assert PurePosixPath(socket_dir) == PurePosixPath(kubelet_dir, "plugins", DEFAULT_DRIVER_NAME)
    registration = expand(registrar, flags(registrar)["kubelet-registration-path"] or "")
    assert PurePosixPath(registration) == PurePosixPath(socket_dir) / socket.name
    registry = volumes(ds)[mount(registrar, "/registration")["name"]]["hostPath"]["path"]
    assert PurePosixPath(registry) == PurePosixPath(kubelet_dir, "plugins_registry")
    kubelet = mount(plugin, kubelet_dir)
    assert kubelet["mountPropagation"] == "Bidirectional"
    assert volumes(ds)[kubelet["name"]]["hostPath"]["path"] == kubelet_dir


def test_the_images_entry_is_the_one_place_that_names_the_plugin_image() -> None:
    (entry,) = kustomize.load(KUBERNETES)["images"]
    sidecar_images = {f"{image}:{tag}" for image, tag, _ in SIDECARS.values()}
    written = base_documents()
    plugin_images = [
        c["image"] for c in kustomize.containers_of(written) if c["image"] not in sidecar_images
    ]
    assert f"csi-lvm:{__version__}" in plugin_images
    # Any other container image is the plugin's, under the entry's name...
    for image in plugin_images:
        assert kustomize.split_image(image)[0] == entry["name"], image
    # ... so the one entry moves every one of them, and nothing else.
    changed = changes(render(), render(image=REGISTRY_IMAGE))
    assert sorted(changed.values()) == sorted(
        (image, "registry.example.com/csi-lvm:9.9.9") for image in plugin_images
    )
    assert all(path.endswith(".image") for path in changed)


def test_the_storage_nodes_component_selects_only_labelled_nodes() -> None:
    default = rendered_daemonset(render())
    ds = rendered_daemonset(render(components=("components/storage-nodes",)))
    spec = pod_spec(ds)
    assert schedulable_on(spec, {STORAGE_NODE_LABEL: "true", "kubernetes.io/hostname": "s1"})
    assert not schedulable_on(spec, {"kubernetes.io/hostname": "w1"})
    assert not schedulable_on(spec, {STORAGE_NODE_LABEL: "false"})
    assert schedulable_on(pod_spec(default), {})  # without the component: everywhere
    assert spec["tolerations"] == [{"operator": "Exists"}]  # tainted storage nodes too
    with_selector = copy.deepcopy(default)
    with_selector["spec"]["template"]["spec"]["nodeSelector"] = {STORAGE_NODE_LABEL: "true"}
    assert ds == with_selector  # the selector and nothing else


def test_the_host_lvm_component_runs_lvm_outside_the_container_s_pid_namespace_and_cgroup() -> None:
    default = render()
    objs = render(components=("components/host-lvm",))
    ds = rendered_daemonset(objs)
    assert pod_spec(ds)["hostPID"] is True
    args = build_parser().parse_args(plugin_args(objs))
    prefix = args.lvm_prefix.split()
    # Into the host's mount namespace (its lvm2, /etc/lvm, systemd's socket);
    # not its PID namespace by nsenter: hostPID is that already.
    assert prefix[:3] == ["nsenter", "--target", "1"]
    assert {"--mount", "--uts", "--ipc", "--net"} <= set(prefix[3 : prefix.index("--")])
    # A transient scope: a cgroup of its own, outside the Pod's.
    runner = prefix[prefix.index("--") + 1 :]
    assert runner[0] == "systemd-run" and "--scope" in runner and runner[-1] == "--"
    assert args.lvm_config_overrides == ""  # the host's configuration alone
    # Nothing else of the deployment changes.
    expected = copy.deepcopy(default)
    rendered_daemonset(expected)["spec"]["template"]["spec"]["hostPID"] = True
    settings = keyed(expected)[("ConfigMap", NAMESPACE, "csi-lvm-lvm")]["data"]
    settings.update(prefix=args.lvm_prefix, configOverrides="")
    assert keyed(objs) == keyed(expected)


# ---------------------------------------------------------------- changed block tracking
#
# external-snapshot-metadata v1.1.0 (commit in SIDECARS.md): the sidecar's
# flags (pkg/sidecar/sidecar.go, klog.InitFlags on its own flag set) and API
# calls (pkg/internal/server/grpc/{auth,snapshot,snapshotter_secret}.go,
# pkg/internal/authn and authz).
KLOG = {
    "v", "vmodule", "log_dir", "log_file", "log_file_max_size", "logtostderr",
    "alsologtostderr", "stderrthreshold", "skip_headers", "skip_log_headers",
    "add_dir_header", "one_output", "log_backtrace_at",
}  # fmt: skip
SNAPSHOT_METADATA_SIDECAR = (
    SIG_STORAGE + "csi-snapshot-metadata",
    "v1.1.0",
    KLOG | {
        "kubeconfig", "csi-address", "version", "timeout", "port", "tls-cert", "tls-key",
        "audience", "max-streaming-duration-min", "kube-api-qps", "kube-api-burst",
        "http-endpoint", "metrics-path", "disable-metrics",
    },
)  # fmt: skip
SIDECAR_API_CALLS = {
    ("authentication.k8s.io", "tokenreviews", "create"),
    ("authorization.k8s.io", "subjectaccessreviews", "create"),
    ("snapshot.storage.k8s.io", "volumesnapshots", "get"),
    ("snapshot.storage.k8s.io", "volumesnapshotcontents", "get"),
    # grpc/snapshotter_secret.go: the class by name, or the list for the default
    ("snapshot.storage.k8s.io", "volumesnapshotclasses", "get"),
    ("snapshot.storage.k8s.io", "volumesnapshotclasses", "list"),
    ("cbt.storage.k8s.io", "snapshotmetadataservices", "get"),
}


def grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def cbt_render() -> list[dict[str, Any]]:
    return render(components=(SNAPSHOT_METADATA_COMPONENT,))


def snapshot_metadata_pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = keyed(objs)[("Deployment", NAMESPACE, "csi-lvm-snapshot-metadata")]
    return dict(deployment["spec"]["template"])


def test_the_snapshot_metadata_component_adds_its_objects_and_changes_nothing_else() -> None:
    # The plugins' TLS port is the base DaemonSet's: the component patches nothing.
    assert set(kustomize.load(SNAPSHOT_METADATA)) == {"apiVersion", "kind", "resources"}
    before, after = keyed(render()), keyed(cbt_render())
    assert {k: v for k, v in after.items() if k in before} == before
    component = [
        d for o, d in documents() if o.startswith(f"kubernetes/{SNAPSHOT_METADATA_COMPONENT}/")
    ]
    assert component
    assert {k: v for k, v in after.items() if k not in before} == keyed(component)


def test_the_forwarder_and_the_sidecar_share_a_socket_no_one_else_mounts() -> None:
    objs = cbt_render()
    pod = snapshot_metadata_pod(objs)
    by_name = {c["name"]: c for c in pod["spec"]["containers"]}
    assert set(by_name) == {"csi-snapshot-metadata", "forwarder"}
    sidecar, forwarder = by_name["csi-snapshot-metadata"], by_name["forwarder"]
    args = build_parser().parse_args(forwarder["command"][1:] + [
        re.sub(r"\$\((\w+)\)", lambda m: {"POD_NAMESPACE": NAMESPACE}[m[1]], a)
        for a in forwarder["args"]
    ])  # fmt: skip
    assert forwarder["command"] == ["csi-lvm"] and args.command == "forward-snapshot-metadata"
    socket = PurePosixPath(socket_path(args.endpoint))
    assert flags(sidecar)["csi-address"] == str(socket)
    shared = mount(forwarder, str(socket.parent))["name"]
    assert mount(sidecar, str(socket.parent))["name"] == shared
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == shared]
    assert volume == {"name": shared, "emptyDir": {}}  # this Pod's alone
    assert args.driver_name == DEFAULT_DRIVER_NAME
    # The forwarder finds the plugin's pods, in their namespace, at their port.
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in forwarder["env"]}
    assert env == {"POD_NAMESPACE": "metadata.namespace"} and args.namespace == NAMESPACE
    assert args.peers_file == ""
    selector = dict(term.split("=", 1) for term in args.plugin_selector.split(","))
    plugin_labels = rendered_daemonset(objs)["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= plugin_labels.items()
    assert not selector.items() <= pod["metadata"]["labels"].items()  # not its own pod
    listen = build_parser().parse_args(plugin_args(objs)).peer_listen
    assert args.plugin_port == int(listen.rpartition(":")[2]) == PEER_PORT
    # Its own certificate (from the plugins' authority, not naming a plugin:
    # the tls.sh tests), not the plugins' Secret; the plugin image's tool.
    assert secret_of(pod, forwarder, args.tls_dir)["secretName"] == FORWARDING_SECRET
    assert FORWARDING_SECRET != PLUGIN_SECRET
    assert kustomize.split_image(forwarder["image"])[0] == "csi-lvm"
    moved = render(image=REGISTRY_IMAGE, components=(SNAPSHOT_METADATA_COMPONENT,))
    (moved_forwarder,) = [
        c for c in snapshot_metadata_pod(moved)["spec"]["containers"] if c["name"] == "forwarder"
    ]
    assert moved_forwarder["image"] == "registry.example.com/csi-lvm:9.9.9"


def test_the_sidecar_is_pinned_serves_the_service_s_port_and_reads_the_cr_s_audience() -> None:
    objs = cbt_render()
    pod = snapshot_metadata_pod(objs)
    (sidecar,) = [c for c in pod["spec"]["containers"] if c["name"] == "csi-snapshot-metadata"]
    image, tag, known = SNAPSHOT_METADATA_SIDECAR
    assert sidecar["image"] == f"{image}:{tag}"
    found = flags(sidecar)
    assert not set(found) - known, sorted(set(found) - known)
    assert "audience" not in found  # the CR's is the one checked
    port = int(found["port"] or 0)
    (grpc_port,) = [p for p in sidecar["ports"] if p["containerPort"] == port]
    service = keyed(objs)[("Service", NAMESPACE, "csi-lvm-snapshot-metadata")]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == grpc_port["name"]
    for flag in ("tls-cert", "tls-key"):
        path = PurePosixPath(found[flag] or "")
        assert secret_of(pod, sidecar, str(path.parent))["secretName"] == SIDECAR_SECRET
    health = sidecar["readinessProbe"]["httpGet"]
    assert health["path"] == "/health"
    (health_port,) = [p for p in sidecar["ports"] if p["name"] == health["port"]]
    assert f":{health_port['containerPort']}" == found["http-endpoint"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_the_snapshot_metadata_rbac_grants_what_its_two_containers_call() -> None:
    roles = {r["metadata"]["name"]: r for r in objects("ClusterRole", SNAPSHOT_METADATA)}
    assert grants(roles["csi-lvm-snapshot-metadata"]) == SIDECAR_API_CALLS
    (forwarder_role,) = objects("Role", SNAPSHOT_METADATA)
    assert grants(forwarder_role) == {("", "pods", "list")}
    assert forwarder_role["metadata"]["namespace"] == NAMESPACE  # the plugin's pods only
    # What a backup tool needs: the snapshots, the CR, a token of its audience.
    client = grants(roles[SNAPSHOT_METADATA_CLIENT_ROLE])
    assert {("snapshot.storage.k8s.io", "volumesnapshots", "get"),
            ("cbt.storage.k8s.io", "snapshotmetadataservices", "get"),
            ("", "serviceaccounts/token", "create")} <= client  # fmt: skip


# ---------------------------------------------------------------- tls.sh
#
# deploy/kubernetes/tls.sh DIR: the plugins' Secret; with --snapshot-metadata
# also the forwarder's and the sidecar's and the SnapshotMetadataService CR.


def run_tls_script(directory: Path, *options: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [str(TLS_SCRIPT), *options, str(directory)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return [d for d in yaml.safe_load_all(done.stdout) if d is not None]


def certificate(pem: bytes) -> str:
    done = subprocess.run(
        ["openssl", "x509", "-noout", "-text", "-serial"],
        input=pem, capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    return done.stdout.decode()


def names_in(pem: bytes) -> tuple[str, list[str], str]:
    """A certificate's common name, its DNS subject alternative names and its
    extended key usage, as openssl prints them."""
    done = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-nameopt", "RFC2253",
         "-ext", "subjectAltName,extendedKeyUsage"],
        input=pem, capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    text = done.stdout.decode()
    subject = re.search(r"^subject=CN=(.*)$", text, re.MULTILINE)
    alternative = re.search(r"Subject Alternative Name:.*\n\s+(.*)", text)
    usage = re.search(r"Extended Key Usage:.*\n\s+(.*)", text)
    assert subject and alternative and usage, text
    dns = [n.removeprefix("DNS:") for n in alternative[1].split(", ")]
    assert all(not n.startswith(("IP", "URI", "email")) for n in dns), dns
    return subject[1].strip(), dns, usage[1].strip()


def mounted(secret: dict[str, Any], where: Path) -> Path:
    """The Secret checked and written out as the kubelet mounts it: a directory
    of its keys (what --tls-dir reads)."""
    validate(secret, KUBERNETES_VERSIONS[-1])
    assert secret["metadata"]["namespace"] == NAMESPACE
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    where.mkdir()
    for key, value in secret["data"].items():
        (where / key).write_bytes(base64.b64decode(value))
    return where


def verifies(directory: Path, ca: Path | None = None) -> bool:
    """Whether the directory's tls.crt comes from ``ca`` (its own ca.crt by default)."""
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca or directory / "ca.crt"),
         str(directory / "tls.crt")],
        capture_output=True, check=False, timeout=60,
    )  # fmt: skip
    return done.returncode == 0


class Caller:
    """What a server's handler sees of a caller: its certificate's names, as
    gRPC puts them in the auth context."""

    def __init__(self, common_name: str, dns: list[str]) -> None:
        self.properties = {
            "x509_common_name": [common_name.encode()],
            "x509_subject_alternative_name": [n.encode() for n in dns],
        }

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.properties


def admitted_as_plugin(server: Path, client: Path) -> bool:
    """A mutual-TLS call from a holder of ``client`` to a port served with
    ``server`` (both mounted Secrets), made the way a plugin or the forwarder
    calls a plugin: whether the server's handler takes the caller for a
    plugin (what VolumeSource requires). A refused handshake raises."""

    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"plugin" if caller_is_plugin(context) else b"other"  # type: ignore[arg-type]

    handler = grpc.method_handlers_generic_handler(
        "test.Who", {"Who": grpc.unary_unary_rpc_method_handler(who)}
    )
    port_server = grpc.server(ThreadPoolExecutor(max_workers=2))
    port_server.add_generic_rpc_handlers((handler,))
    port = port_server.add_secure_port("127.0.0.1:0", server_credentials(TlsFiles(server)))
    port_server.start()
    try:
        with grpc.secure_channel(
            f"127.0.0.1:{port}",
            channel_credentials(TlsFiles(client)),
            options=[("grpc.ssl_target_name_override", PLUGIN_SERVER_NAME)],
        ) as channel:
            answer = channel.unary_unary("/test.Who/Who")(b"", timeout=20)
    finally:
        port_server.stop(None)
    return bool(answer == b"plugin")


def test_tls_sh_makes_the_secret_every_plugin_mounts(tmp_path: Path) -> None:
    made = keyed(run_tls_script(tmp_path / "tls"))
    assert set(made) == {("Secret", NAMESPACE, PLUGIN_SECRET)}  # nothing more
    plugin_dir = mounted(made[("Secret", NAMESPACE, PLUGIN_SECRET)], tmp_path / "plugin")
    # The one the DaemonSet mounts at the plugin's --tls-dir.
    ds = rendered_daemonset(render())
    args = build_parser().parse_args(plugin_args(render()))
    mounted_secret = secret_of({"spec": pod_spec(ds)}, containers(ds)[PLUGIN], args.tls_dir)
    assert mounted_secret["secretName"] == PLUGIN_SECRET
    assert verifies(plugin_dir)
    # Server and client (it serves the port and calls other plugins), naming
    # the name both ends check: plugins are reached at pod IPs.
    common_name, dns, usage = names_in((plugin_dir / "tls.crt").read_bytes())
    assert (common_name, dns) == (PLUGIN_SERVER_NAME, [PLUGIN_SERVER_NAME])
    assert usage == "TLS Web Server Authentication, TLS Web Client Authentication"
    assert caller_is_plugin(Caller(common_name, dns))  # type: ignore[arg-type]
    # No authority of the snapshot-metadata option without it.
    assert not (tmp_path / "tls" / "service-ca.key").exists()


def test_tls_sh_for_snapshot_metadata_makes_the_secrets_both_workloads_mount_and_the_cr(
    tmp_path: Path,
) -> None:
    made = keyed(run_tls_script(tmp_path / "tls", "--snapshot-metadata"))
    cr = made.pop(("SnapshotMetadataService", "", DEFAULT_DRIVER_NAME))
    assert set(made) == {("Secret", NAMESPACE, s)
                         for s in (PLUGIN_SECRET, FORWARDING_SECRET, SIDECAR_SECRET)}  # fmt: skip
    dirs = {key[2]: mounted(secret, tmp_path / key[2]) for key, secret in made.items()}
    plugin, forwarder, sidecar = (dirs[s] for s in (PLUGIN_SECRET, FORWARDING_SECRET,
                                                    SIDECAR_SECRET))  # fmt: skip
    for directory in dirs.values():
        assert verifies(directory)
    # Each the one its container mounts (the plugin's: the test above).
    objs = cbt_render()
    pod = snapshot_metadata_pod(objs)
    by_name = {c["name"]: c for c in pod["spec"]["containers"]}
    forwarder_args = by_name["forwarder"]["args"]
    forwarder_tls = forwarder_args[forwarder_args.index("--tls-dir") + 1]
    assert secret_of(pod, by_name["forwarder"], forwarder_tls)["secretName"] == FORWARDING_SECRET
    sidecar_cert = PurePosixPath(flags(by_name["csi-snapshot-metadata"])["tls-cert"] or "")
    sidecar_tls = secret_of(pod, by_name["csi-snapshot-metadata"], str(sidecar_cert.parent))
    assert sidecar_tls["secretName"] == SIDECAR_SECRET
    # The forwarder's certificate: the plugins' authority, client only, and a
    # name of its own, so the plugins answer it SnapshotMetadata but refuse it
    # VolumeSource.
    assert (forwarder / "ca.crt").read_bytes() == (plugin / "ca.crt").read_bytes()
    assert verifies(forwarder, plugin / "ca.crt")
    common_name, dns, usage = names_in((forwarder / "tls.crt").read_bytes())
    assert (common_name, dns, usage) == (FORWARDER_NAME, [FORWARDER_NAME],
                                         "TLS Web Client Authentication")  # fmt: skip
    assert PLUGIN_SERVER_NAME not in certificate((forwarder / "tls.crt").read_bytes())
    assert not caller_is_plugin(Caller(common_name, dns))  # type: ignore[arg-type]
    # Through a real handshake on a port served with the plugins' Secret: a
    # plugin is a plugin, the forwarder gets in but is not one.
    assert admitted_as_plugin(plugin, plugin)
    assert not admitted_as_plugin(plugin, forwarder)
    # The sidecar's: another authority, naming its Service; the CR names the
    # Service's address and that authority.
    assert (sidecar / "ca.crt").read_bytes() != (plugin / "ca.crt").read_bytes()
    assert not verifies(sidecar, plugin / "ca.crt")
    assert not verifies(forwarder, sidecar / "ca.crt")
    assert set(cr) == {"apiVersion", "kind", "metadata", "spec"} and cr["apiVersion"] == CBT_API
    assert set(cr["spec"]) == {"address", "caCert", "audience"} and cr["spec"]["audience"]
    service = keyed(objs)[("Service", NAMESPACE, "csi-lvm-snapshot-metadata")]
    host, _, port = cr["spec"]["address"].rpartition(":")
    assert (host, int(port)) == (f"{service['metadata']['name']}.{NAMESPACE}",
                                 service["spec"]["ports"][0]["port"])  # fmt: skip
    _, sidecar_dns, sidecar_usage = names_in((sidecar / "tls.crt").read_bytes())
    assert host in sidecar_dns and sidecar_usage == "TLS Web Server Authentication"
    assert base64.b64decode(cr["spec"]["caCert"]) == (sidecar / "ca.crt").read_bytes()


def test_tls_sh_renews_under_the_same_authorities(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    first = keyed(run_tls_script(directory))
    # The option added later, then a renewal: the same authorities throughout.
    runs = [first] + [keyed(run_tls_script(directory, "--snapshot-metadata")) for _ in range(2)]
    plugin_key = ("Secret", NAMESPACE, PLUGIN_SECRET)
    plugins = [made[plugin_key]["data"] for made in runs]
    assert len({p["ca.crt"] for p in plugins}) == 1
    assert len({p["tls.crt"] for p in plugins}) == 3  # a new certificate each time
    for name in (FORWARDING_SECRET, SIDECAR_SECRET):
        before, after = (made[("Secret", NAMESPACE, name)]["data"] for made in runs[1:])
        assert before["ca.crt"] == after["ca.crt"] and before["tls.crt"] != after["tls.crt"]
    forwarding = runs[1][("Secret", NAMESPACE, FORWARDING_SECRET)]["data"]
    assert forwarding["ca.crt"] == plugins[0]["ca.crt"]
    cr_key = ("SnapshotMetadataService", "", DEFAULT_DRIVER_NAME)
    assert runs[1][cr_key] == runs[2][cr_key]
    # The authorities' files, where earlier versions of the script kept them.
    assert {p.name for p in directory.glob("*-ca.*")} >= {
        "forwarding-ca.crt", "forwarding-ca.key", "service-ca.crt", "service-ca.key",
    }  # fmt: skip
    assert base64.b64decode(plugins[0]["ca.crt"]) == (directory / "forwarding-ca.crt").read_bytes()
    # The private keys stay the user's own.
    assert directory.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("arguments", [[], ["--snapshot-metadata"], ["--other", "dir"],
                                       ["dir", "more"], ["--help"]])  # fmt: skip
def test_tls_sh_says_how_to_call_it(arguments: list[str], tmp_path: Path) -> None:
    done = subprocess.run([str(TLS_SCRIPT), *arguments], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert (
        done.stderr.startswith("usage: ")
        and "[--snapshot-metadata] [--group-snapshots] DIR" in done.stderr
    )
    assert list(tmp_path.iterdir()) == []  # nothing made


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_kustomize_subset_renders_what_kustomize_renders(variant: str, tmp_path: Path) -> None:
    command = kustomize.real_kustomize()
    if command is None:
        pytest.skip("no kustomize with replacements (kubectl kustomize) installed")
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    copied = tmp_path / "deploy" / "kubernetes"
    (copied / "kustomization.yaml").write_text(yaml.safe_dump(kustomization(**VARIANTS[variant])))
    assert keyed(kustomize.render_with(command, copied)) == keyed(render(**VARIANTS[variant]))


# ---------------------------------------------------------------- sidecars


@pytest.mark.parametrize("name", sorted(SIDECARS))
def test_sidecar_is_pinned_and_uses_only_flags_of_its_release(name: str) -> None:
    image, tag, known = SIDECARS[name]
    container = containers()[name]
    assert container["image"] == f"{image}:{tag}"
    unknown = set(flags(container)) - known
    assert not unknown, f"{name} {tag} has no flag(s) {sorted(unknown)}"


def test_every_container_is_the_plugin_or_a_known_sidecar() -> None:
    assert set(containers()) == {PLUGIN, *SIDECARS}


def test_sidecars_run_in_node_deployment_form() -> None:
    provisioner = flags(containers()["csi-provisioner"])
    for flag in ("node-deployment", "extra-create-metadata", "strict-topology", "enable-capacity"):
        assert flag in provisioner and provisioner[flag] in (None, "true"), flag
    assert provisioner["capacity-ownerref-level"] == "1"  # the DaemonSet owns them
    assert "feature-gates" not in provisioner  # Topology is GA in v6.3.0
    snapshotter = flags(containers()["csi-snapshotter"])
    assert "node-deployment" in snapshotter
    assert "leader-election" not in snapshotter  # refused with --node-deployment
    resizer = flags(containers()["csi-resizer"])
    assert "leader-election" in resizer


@pytest.mark.parametrize("name", sorted(NEEDS_ENV))
def test_downward_api_environment(name: str) -> None:
    container = containers()[name]
    env = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
        for e in container.get("env", [])
        if "fieldRef" in e.get("valueFrom", {})
    }
    for variable in NEEDS_ENV[name]:
        assert env.get(variable) == DOWNWARD_API[variable], f"{name} lacks {variable}"
    defined = {e["name"] for e in container.get("env", [])}
    for arg in container.get("args", []):
        for variable in re.findall(r"\$\((\w+)\)", arg):
            assert variable in defined, f"{name}: {arg} names {variable}, which is not set"


def test_driver_offers_the_node_side_expansion_the_resizer_relies_on() -> None:
    assert "csi-resizer" in containers()
    node = csi_pb2.NodeServiceCapability.RPC
    controller = csi_pb2.ControllerServiceCapability.RPC
    plugin = IdentityService(DEFAULT_DRIVER_NAME).GetPluginCapabilities(None, None)
    expansion = [c.volume_expansion.type for c in plugin.capabilities]
    assert controller.EXPAND_VOLUME not in CONTROLLER_CAPABILITIES
    assert node.EXPAND_VOLUME in NODE_CAPABILITIES
    assert csi_pb2.PluginCapability.VolumeExpansion.ONLINE in expansion


# ---------------------------------------------------------------- RBAC


def test_rbac_binds_each_role_to_the_service_account_of_one_workload() -> None:
    workloads = objects("DaemonSet") + objects("Deployment")
    accounts = {w["spec"]["template"]["spec"]["serviceAccountName"] for w in workloads}
    assert pod_spec()["serviceAccountName"] in accounts
    assert {a["metadata"]["name"] for a in objects("ServiceAccount")} == accounts
    roles = {(r["kind"], r["metadata"]["name"]) for r in objects("ClusterRole") + objects("Role")}
    bindings = objects("ClusterRoleBinding") + objects("RoleBinding")
    assert bindings
    for binding in bindings:
        (subject,) = binding["subjects"]
        assert subject["kind"] == "ServiceAccount" and subject["namespace"] == NAMESPACE
        assert subject["name"] in accounts
        assert (binding["roleRef"]["kind"], binding["roleRef"]["name"]) in roles
        # A binding of one workload's component grants to that workload only.
        origin = next(o for o, d in documents() if d is binding)
        own = [
            w for o, w in documents() if w in workloads and Path(o).parent == Path(origin).parent
        ]
        assert {w["spec"]["template"]["spec"]["serviceAccountName"] for w in own} == {
            subject["name"]
        }
    bound = {(b["roleRef"]["kind"], b["roleRef"]["name"]) for b in bindings}
    # The one role left unbound is for cluster admins to bind to backup tools.
    assert roles - bound == {("ClusterRole", SNAPSHOT_METADATA_CLIENT_ROLE)}


def test_rbac_grants_nothing_broad_and_no_secrets() -> None:
    for role in objects("ClusterRole") + objects("Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{role['metadata']['name']}: {field} has '*'"
            assert "secrets" not in rule["resources"]
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


def test_the_plugin_may_get_nodes_and_list_its_namespace_s_pods_and_nothing_more() -> None:
    account = {"kind": "ServiceAccount", "name": pod_spec()["serviceAccountName"],
               "namespace": daemonset()["metadata"]["namespace"]}  # fmt: skip
    # It reads its own Node's topology labels; RBAC cannot name a DaemonSet
    # pod's own node, so get on nodes, never list or watch.
    assert the("ClusterRole", "csi-lvm-node")["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}
    ]
    binding = the("ClusterRoleBinding", "csi-lvm-node")
    assert binding["subjects"] == [account]
    # It finds the other nodes' plugins among the pods of its own namespace
    # (copies across nodes): list there, no get, no watch, no other namespace.
    role = the("Role", PEERS_ROLE)
    assert role["metadata"]["namespace"] == account["namespace"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
    role_binding = the("RoleBinding", PEERS_ROLE)
    assert role_binding["metadata"]["namespace"] == account["namespace"]
    assert role_binding["subjects"] == [account]
    assert role_binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": PEERS_ROLE,
    }  # fmt: skip
    # No role of the cluster lists pods: a plugin sees its own namespace's only.
    for cluster_role in objects("ClusterRole"):
        assert ("", "pods", "list") not in grants(cluster_role), cluster_role["metadata"]["name"]


def test_resizer_lease_rule_names_the_lease_the_resizer_uses() -> None:
    role = the("Role", "csi-lvm-resizer-leader-election")
    named = [r for r in role["rules"] if "resourceNames" in r]
    assert named[0]["resourceNames"] == [
        "external-resizer-" + sanitize_lease_name(DEFAULT_DRIVER_NAME)
    ]


# ---------------------------------------------------------------- classes


def test_config_map_holds_a_valid_driver_config() -> None:
    config = device_config()
    assert [c.name for c in config.device_classes] == ["thin", "thick", "thin-encrypted"]
    assert config.default_class is not None and config.default_class.name == "thin"
    assert config.find("thin").is_thin and not config.find("thick").is_thin
    encrypted = config.find("thin-encrypted")
    assert encrypted is not None and encrypted.encrypted and encrypted.is_thin
    assert not any(c.encrypted for c in config.device_classes if c is not encrypted)


def test_storage_class_parameters_are_the_ones_the_driver_accepts() -> None:
    config = device_config()
    for storage_class in csi_lvm_storage_classes():
        name = storage_class["metadata"]["name"]
        parameters = storage_class.get("parameters", {})
        for key in parameters:
            assert key == DEVICE_CLASS_PARAMETER or key.startswith(SIDECAR_PARAMETER_PREFIX), (
                f"{name}: parameter {key!r} is refused by the driver"
            )
        device_class = parameters.get(DEVICE_CLASS_PARAMETER)
        assert device_class is not None, f"{name} must name its device class"
        assert config.find(device_class) is not None, f"{name}: no device class {device_class}"
        fs_type = parameters.get(f"{SIDECAR_PARAMETER_PREFIX}fstype")
        assert fs_type is None or fs_type in SUPPORTED_FILESYSTEMS
        assert storage_class["volumeBindingMode"] == "WaitForFirstConsumer", name


def test_the_three_installed_storage_classes() -> None:
    classes = {sc["metadata"]["name"]: sc for sc in objects("StorageClass", KUBERNETES)}
    assert set(classes) == {"csi-lvm-thin", "csi-lvm-thick", "csi-lvm-xfs"}
    expected = {
        "csi-lvm-thin": {"deviceClass": "thin"},
        "csi-lvm-thick": {"deviceClass": "thick"},
        "csi-lvm-xfs": {"deviceClass": "thin", "csi.storage.k8s.io/fstype": "xfs"},
    }
    for name, storage_class in classes.items():
        assert storage_class["parameters"] == expected[name]
        assert storage_class["allowVolumeExpansion"] is True
    default = "storageclass.kubernetes.io/is-default-class"
    defaults = [
        n for n, sc in classes.items() if sc["metadata"].get("annotations", {}).get(default)
    ]
    assert defaults == ["csi-lvm-thin"]
    snapshot_class = the("VolumeSnapshotClass", "csi-lvm-snapshot")
    assert snapshot_class["deletionPolicy"] == "Delete"


def test_topology_key_in_examples_is_the_driver_default() -> None:
    keys = [
        expression["key"]
        for storage_class in csi_lvm_storage_classes()
        for term in storage_class.get("allowedTopologies", [])
        for expression in term["matchLabelExpressions"]
    ]
    assert keys, "the examples must show allowedTopologies"
    # The driver's node key, and node labels the plugin can report beside it.
    assert set(keys) == {TOPOLOGY_KEY, "topology.kubernetes.io/zone", "example.com/rack"}


# ---------------------------------------------------------------- examples


def test_walkthrough_objects_refer_to_each_other() -> None:
    claims = {c["metadata"]["name"]: c for c in objects("PersistentVolumeClaim", EXAMPLES)}
    classes = {c["metadata"]["name"] for c in objects("StorageClass")}
    for claim in claims.values():
        assert claim["spec"]["storageClassName"] in classes
    for pod in objects("Pod", EXAMPLES):
        for volume in pod["spec"]["volumes"]:
            assert volume["persistentVolumeClaim"]["claimName"] in claims
    snapshot = the("VolumeSnapshot", "data-snapshot", EXAMPLES)
    source = claims[snapshot["spec"]["source"]["persistentVolumeClaimName"]]
    assert snapshot["spec"]["volumeSnapshotClassName"] == "csi-lvm-snapshot"
    restored = claims["data-restored"]
    assert restored["spec"]["dataSource"] == {
        "apiGroup": "snapshot.storage.k8s.io",
        "kind": "VolumeSnapshot",
        "name": "data-snapshot",
    }
    assert restored["spec"]["storageClassName"] == source["spec"]["storageClassName"]
    # A snapshot lives on its volume's node: the reader must land there too.
    writer = the("Pod", "writer", EXAMPLES)
    reader = the("Pod", "reader", EXAMPLES)
    affinity = reader["spec"]["affinity"]["podAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert (
        affinity[0]["labelSelector"]["matchLabels"].items() <= writer["metadata"]["labels"].items()
    )
    # The node the volume is on, as the driver names it (kubernetes.io/hostname
    # need not be the node's name, which the driver reports).
    assert affinity[0]["topologyKey"] == TOPOLOGY_KEY


def test_a_restore_without_its_writer_is_pinned_to_the_snapshots_node() -> None:
    claim = the("PersistentVolumeClaim", "data-restored-on-node", EXAMPLES)
    snapshot = the("VolumeSnapshot", "data-snapshot", EXAMPLES)
    source_name = snapshot["spec"]["source"]["persistentVolumeClaimName"]
    source = the("PersistentVolumeClaim", source_name, EXAMPLES)
    assert claim["spec"]["dataSource"] == {
        "apiGroup": "snapshot.storage.k8s.io",
        "kind": "VolumeSnapshot",
        "name": snapshot["metadata"]["name"],
    }
    # A snapshot restores into its own device class only: the same class.
    assert claim["spec"]["storageClassName"] == source["spec"]["storageClassName"]
    reader = the("Pod", "late-reader", EXAMPLES)
    claims = [v["persistentVolumeClaim"]["claimName"] for v in reader["spec"]["volumes"]]
    assert claims == [claim["metadata"]["name"]]
    affinity = reader["spec"]["affinity"]
    assert set(affinity) == {"nodeAffinity"}  # no Pod of the source needed
    (term,) = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    (expression,) = term["matchExpressions"]
    assert (expression["key"], expression["operator"]) == (TOPOLOGY_KEY, "In")
    (node,) = expression["values"]
    assert schedulable_on(reader["spec"], {TOPOLOGY_KEY: node})
    assert not schedulable_on(reader["spec"], {TOPOLOGY_KEY: "node-b"})
    # The walkthrough's sed puts the snapshot's node in; it must hit that value only.
    walkthrough = (EXAMPLES / "README.md").read_text()
    sed = re.search(r'sed "s/(.+?)/- \$node/" 07-restore-on-the-snapshot-node\.yaml', walkthrough)
    assert sed is not None
    text = (EXAMPLES / "07-restore-on-the-snapshot-node.yaml").read_text()
    edited, count = re.subn(sed[1], "- worker-9", text, flags=re.MULTILINE)
    assert count == 1
    pinned = next(d for d in yaml.safe_load_all(edited) if d["kind"] == "Pod")
    assert schedulable_on(pinned["spec"], {TOPOLOGY_KEY: "worker-9"})
    assert not schedulable_on(pinned["spec"], {TOPOLOGY_KEY: node})


@pytest.mark.parametrize(
    ("node", "readable"),
    [("node-a", True), ("worker-7.example.com", True), ("n" * 41, False), ("Node:1", False)],
)
def test_a_snapshot_handle_names_its_node_unless_the_name_is_hashed(
    node: str, readable: bool
) -> None:
    # Why 07-restore-on-the-snapshot-node.yaml reads the node from a label.
    handle = str(ObjectId.build(node, "thin", "snap-data"))
    assert (handle.partition(":")[0] == node) is readable


def test_side_by_side_static_local_pv_and_its_csi_lvm_replacement() -> None:
    old_class = the("StorageClass", "local-storage", EXAMPLES)
    assert old_class["provisioner"] == NO_PROVISIONER
    assert old_class["volumeBindingMode"] == "WaitForFirstConsumer"
    pv = the("PersistentVolume", "local-pv-node-a-disk1", EXAMPLES)
    assert pv["spec"]["storageClassName"] == "local-storage"
    assert pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    new_class = the("StorageClass", "csi-lvm-local", EXAMPLES)
    assert new_class["provisioner"] == DEFAULT_DRIVER_NAME


# ---------------------------------------------------------------- image


def test_dockerfile_runs_the_plugin_command() -> None:
    text = (ROOT / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert bases and set(bases) == {"debian:bookworm-slim"}
    entrypoint = re.search(r"^ENTRYPOINT\s+(\[.*\])$", text, re.MULTILINE)
    cmd = re.search(r"^CMD\s+(\[.*\])$", text, re.MULTILINE)
    assert entrypoint and yaml.safe_load(entrypoint[1]) == [PLUGIN_COMMAND[0]]
    assert cmd is not None
    args = build_parser().parse_args(yaml.safe_load(cmd[1]))
    assert socket_path(args.endpoint) == "/csi/csi.sock"
    assert args.config == "/etc/csi-lvm/config.yaml"


def test_container_lvm_settings() -> None:
    text = (DEPLOY / "image" / "lvmlocal.conf").read_text()
    settings = dict(re.findall(r"^\s*(\w+)\s*=\s*(\S+)", text, re.MULTILINE))
    assert settings == {
        "udev_sync": "0",
        "udev_rules": "0",
        "verify_udev_operations": "0",
        "monitoring": "0",
        "obtain_device_list_from_udev": "0",
        "external_device_info_source": '"none"',
        "locking_dir": '"/run/lock/lvm"',
        "use_lvmpolld": "0",
    }


def test_the_plugin_sees_the_host_s_pod_cgroups_where_its_flag_says() -> None:
    plugin = containers()[PLUGIN]
    args = plugin["args"]
    root = args[args.index("--cgroup-root") + 1]
    assert volumes()[mount(plugin, root)["name"]]["hostPath"]["path"] == "/sys/fs/cgroup"
    assert not mount(plugin, root).get("readOnly")  # io.max is written


def test_the_resizer_and_provisioner_read_volume_attributes_classes() -> None:
    assert csi_pb2.ControllerServiceCapability.RPC.MODIFY_VOLUME in CONTROLLER_CAPABILITIES
    for role in ("csi-lvm-resizer", "csi-lvm-provisioner"):
        rules = the("ClusterRole", role)["rules"]
        assert any(
            "volumeattributesclasses" in rule["resources"]
            and rule["apiGroups"] == ["storage.k8s.io"]
            and set(rule["verbs"]) == {"get", "list", "watch"}
            for rule in rules
        ), role
