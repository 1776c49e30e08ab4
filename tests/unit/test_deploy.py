"""The deployment under deploy/: schema-valid manifests that agree with the driver.

Every manifest is checked against the Kubernetes OpenAPI schemas bundled by
kubernetes-validate (strict: unknown fields fail). The VolumeSnapshot CRDs are
not in those schemas; their required fields are checked by hand, after the
CRDs of external-snapshotter v8.6.0 (client/config/crd). Then the cross-checks:
the driver name, socket path, topology key, device classes and StorageClass
parameters in the manifests are the ones the driver accepts, and every sidecar
flag exists in the pinned release (flag lists below, read from each release's
source; see deploy/kubernetes/SIDECARS.md).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from csi_lvm import __version__
from csi_lvm.cli import DEFAULT_DRIVER_NAME, build_parser
from csi_lvm.config import parse_config
from csi_lvm.controller import CAPABILITIES as CONTROLLER_CAPABILITIES
from csi_lvm.csi import csi_pb2
from csi_lvm.fs import SUPPORTED_FILESYSTEMS
from csi_lvm.identity import IdentityService
from csi_lvm.node import CAPABILITIES as NODE_CAPABILITIES
from csi_lvm.server import socket_path
from csi_lvm.validation import DEVICE_CLASS_PARAMETER, SIDECAR_PARAMETER_PREFIX

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
NO_PROVISIONER = "kubernetes.io/no-provisioner"

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
        "v2.2.1",  # cmd/csi-resizer/main.go
        LOGGING
        | COMMON
        | {
            "master",
            "resync-period",
            "workers",
            "extra-modify-metadata",
            "timeout",
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
    "POD_NAME": "metadata.name",
}
NEEDS_ENV = {
    PLUGIN: {"NODE_NAME"},
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


def objects(kind: str, where: Path | None = None) -> list[dict[str, Any]]:
    prefix = "" if where is None else str(where.relative_to(DEPLOY)) + "/"
    return [d for origin, d in documents() if d["kind"] == kind and origin.startswith(prefix)]


def the(kind: str, name: str, where: Path = KUBERNETES) -> dict[str, Any]:
    matches = [d for d in objects(kind, where) if d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name} under {where}, found {len(matches)}"
    return matches[0]


def daemonset() -> dict[str, Any]:
    return the("DaemonSet", "csi-lvm")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = daemonset()["spec"]["template"]["spec"]
    return spec


def containers() -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod_spec()["containers"]}


def volumes() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec()["volumes"]}


def mount(container: dict[str, Any], path: str) -> dict[str, Any]:
    matches = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    assert matches, f"container {container['name']} mounts nothing at {path}"
    return matches[0]


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


def sanitize_lease_name(name: str) -> str:
    """external-resizer's util.SanitizeName: what the lease name is made of."""
    name = re.sub(r"[^a-zA-Z0-9-]", "-", name)
    return name + "X" if name.endswith("-") else name


# ---------------------------------------------------------------- schemas


def _ids() -> Iterator[str]:
    for origin, doc in documents():
        yield f"{origin}:{doc['kind']}/{doc['metadata']['name']}"


def check_snapshot_crd(doc: dict[str, Any]) -> None:
    """Required fields and allowed keys of the two snapshot CRDs used here."""
    assert doc["apiVersion"] == SNAPSHOT_API
    name = doc.get("metadata", {}).get("name", "")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", name), f"bad name {name!r}"
    if doc["kind"] == "VolumeSnapshotClass":
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
    else:
        pytest.fail(f"no hand check for {doc['kind']}")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("doc", [d for _, d in documents()], ids=list(_ids()))
def test_manifest_matches_the_kubernetes_schema(doc: dict[str, Any], version: str) -> None:
    if doc["apiVersion"] == SNAPSHOT_API:
        check_snapshot_crd(doc)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


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


def test_plugin_command_line_is_the_contract() -> None:
    plugin = containers()[PLUGIN]
    assert plugin["command"] + plugin["args"] == PLUGIN_COMMAND
    args = build_parser().parse_args([a.replace("$(NODE_NAME)", "node-a") for a in plugin["args"]])
    assert args.command == "serve"
    assert args.node_id == "node-a"
    assert args.topology_key is None  # so the default topology.<driver>/node applies
    config_mount = mount(plugin, str(PurePosixPath(args.config).parent))
    assert volumes()[config_mount["name"]]["configMap"]["name"] == "csi-lvm-config"
    assert "config.yaml" in the("ConfigMap", "csi-lvm-config")["data"]


def test_socket_path_is_shared_by_plugin_registrar_and_sidecars() -> None:
    socket = plugin_socket()
    assert socket == PurePosixPath("/csi/csi.sock")
    plugin = containers()[PLUGIN]
    socket_volume = mount(plugin, str(socket.parent))["name"]
    host_dir = PurePosixPath(volumes()[socket_volume]["hostPath"]["path"])
    assert host_dir == PurePosixPath(f"/var/lib/kubelet/plugins/{DEFAULT_DRIVER_NAME}")
    registrar = flags(containers()["node-driver-registrar"])
    assert PurePosixPath(registrar["kubelet-registration-path"] or "") == host_dir / socket.name
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
    for path in ("/dev", "/run/lvm", "/run/lock/lvm", "/etc/lvm/backup", "/etc/lvm/archive"):
        host = volumes()[mount(plugin, path)["name"]]["hostPath"]["path"]
        assert host.rstrip("/") == path, f"{path} must be the host's own {path}"
    # The image's /etc/lvm/lvmlocal.conf (no udev) must not be hidden by the host's.
    etc_lvm = [
        m["mountPath"] for m in plugin["volumeMounts"] if m["mountPath"].startswith("/etc/lvm")
    ]
    assert sorted(etc_lvm) == ["/etc/lvm/archive", "/etc/lvm/backup"]


def test_liveness_probe_is_served_by_the_livenessprobe_sidecar() -> None:
    plugin = containers()[PLUGIN]
    probe = plugin["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in plugin["ports"]}
    port = ports.get(probe["port"], probe["port"])
    assert (probe["path"], port) == ("/healthz", 9808)
    assert flags(containers()["liveness-probe"])["http-endpoint"] == ":9808"
    timeout = flags(containers()["liveness-probe"])["probe-timeout"] or "1s"
    assert int(timeout.rstrip("s")) < plugin["livenessProbe"]["timeoutSeconds"]


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
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container.get("env", [])}
    for variable in NEEDS_ENV[name]:
        assert env.get(variable) == DOWNWARD_API[variable], f"{name} lacks {variable}"
    for arg in container.get("args", []):
        for variable in re.findall(r"\$\((\w+)\)", arg):
            assert variable in env, f"{name}: {arg} names {variable}, which is not set"


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


def test_rbac_binds_roles_of_this_deployment_to_its_one_service_account() -> None:
    account = pod_spec()["serviceAccountName"]
    the("ServiceAccount", account)
    assert len(objects("ServiceAccount")) == 1
    roles = {(r["kind"], r["metadata"]["name"]) for r in objects("ClusterRole") + objects("Role")}
    bindings = objects("ClusterRoleBinding") + objects("RoleBinding")
    assert bindings
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
        ]
        assert (binding["roleRef"]["kind"], binding["roleRef"]["name"]) in roles
    assert {r for b in bindings for r in [(b["roleRef"]["kind"], b["roleRef"]["name"])]} == roles


def test_rbac_grants_nothing_broad_and_no_secrets() -> None:
    for role in objects("ClusterRole") + objects("Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{role['metadata']['name']}: {field} has '*'"
            assert "secrets" not in rule["resources"]
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


def test_resizer_lease_rule_names_the_lease_the_resizer_uses() -> None:
    role = the("Role", "csi-lvm-resizer-leader-election")
    named = [r for r in role["rules"] if "resourceNames" in r]
    assert named[0]["resourceNames"] == [
        "external-resizer-" + sanitize_lease_name(DEFAULT_DRIVER_NAME)
    ]


# ---------------------------------------------------------------- classes


def test_config_map_holds_a_valid_driver_config() -> None:
    config = device_config()
    assert [c.name for c in config.device_classes] == ["thin", "thick"]
    assert config.default_class is not None and config.default_class.name == "thin"
    assert config.find("thin").is_thin and not config.find("thick").is_thin


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
    assert set(keys) == {TOPOLOGY_KEY}


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
