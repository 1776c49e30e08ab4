"""The checks of issue 17, each reported as one PASS or FAIL line.

The workloads are busybox pods (host network, image imported, never pulled)
on PVCs of the StorageClasses that deploy/kubernetes ships. A check that
fails is reported and the next one runs, unless it needs what failed.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from csi_lvm.cli import build_parser
from e2e.cluster import (
    APISERVER,
    BUSYBOX_IMAGE,
    KUBELET_DIR,
    NODE_IP,
    NODE_LABELS,
    NODE_NAME,
    RACK_KEY,
    ZONE_KEY,
    Cluster,
    kubeconfig,
)
from e2e.plugin import SNAPSHOT_METADATA_COMPONENT, NodeProcesses, Rendered, containers, render
from e2e.procs import Failed, run, wait_for
from tests.testbed import LoopVolumeGroup

NAMESPACE = "default"
PHANTOM_NODE = "e2e-node-2"
SNAPSHOT_CONTROLLER_ARGS = ("--enable-distributed-snapshotting", "--leader-election=false")
POD_TIMEOUT = 300
GiB = 1024**3
SELECTED_NODE = "volume.kubernetes.io/selected-node"
DEFAULT_CLASS = "storageclass.kubernetes.io/is-default-class"
BLOCK_WRITE = "echo block-data | dd of=/dev/e2e-block conv=fsync 2>/dev/null"
CBT_CRD = "crds/cbt/cbt.storage.k8s.io_snapshotmetadataservices.yaml"
LISTER = "snapshot-metadata-lister"
# The path where the kubelet mounts a pod's ServiceAccount token.
IN_POD_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
STAND_IN = "e2e-plugin-stand-in"
BACKUP_ACCOUNT = "e2e-backup"
MiB = 1024**2


class Lvm:
    """The node's volume group as LVM reports it (not the driver)."""

    def __init__(self, vg: str) -> None:
        self.vg = vg

    def lvs(self) -> dict[str, str]:
        out = run(["lvs", "--noheadings", "--units", "b", "--nosuffix",
                   "-o", "lv_name,lv_size", self.vg])  # fmt: skip
        return dict(line.split() for line in out.splitlines() if line.strip())

    def chunk_size(self) -> int:
        """The chunk size of the VG's thin pool, in bytes."""
        out = run(["lvs", "--noheadings", "--units", "b", "--nosuffix", "-S", "lv_layout=pool",
                   "-o", "chunk_size", self.vg])  # fmt: skip
        return int(out.split()[0])


def kubelet_mounts() -> list[str]:
    """Mount points under the kubelet's directory, from this namespace's mountinfo."""
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if p.startswith(f"{KUBELET_DIR}/")]


def pvc(name: str, size: str, storage_class: str | None = None, *, block: bool = False,
        source: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": size}},
        "volumeMode": "Block" if block else "Filesystem",
    }
    if storage_class:
        spec["storageClassName"] = storage_class
    if source:
        spec["dataSource"] = source
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}  # fmt: skip


def pod(name: str, claim: str, script: str, *, block: bool = False, fs_group: int | None = None,
        node: str | None = None) -> dict[str, Any]:  # fmt: skip
    container: dict[str, Any] = {
        "name": "app",
        "image": BUSYBOX_IMAGE,
        "imagePullPolicy": "Never",
        "command": ["/bin/sh", "-c", f"{script}\nexec sleep 1000000"],
    }
    if block:
        container["volumeDevices"] = [{"name": "data", "devicePath": "/dev/e2e-block"}]
    else:
        container["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
    spec: dict[str, Any] = {
        "hostNetwork": True,
        "terminationGracePeriodSeconds": 2,
        "containers": [container],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
    }
    if fs_group is not None:
        spec["securityContext"] = {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": fs_group}
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
        spec["tolerations"] = [{"operator": "Exists"}]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}  # fmt: skip


class Checks:
    def __init__(self, cluster: Cluster, report: Any, lvm: Lvm | None) -> None:
        self.cluster = cluster
        self.report = report
        self.lvm = lvm
        self.kubectl = cluster.kubectl
        self.broken: set[str] = set()

    # ---- helpers -----------------------------------------------------------
    def check(self, name: str, body: Callable[[], str], needs: tuple[str, ...] = ()) -> bool:
        missing = [n for n in needs if n in self.broken]
        if missing:
            self.broken.add(name)
            self.report.failed(name, f"not run: needs {', '.join(missing)}")
            return False
        try:
            detail = body()
        except Exception as error:  # a check that breaks is a check that failed
            self.broken.add(name)
            text = str(error) if isinstance(error, Failed) else f"{type(error).__name__}: {error}"
            self.report.failed(name, text.replace("\n", "\n    "))
            return False
        self.report.passed(name, detail)
        return True

    def phase(self, name: str) -> str:
        phase: str = self.cluster.get("pod", name, "-n", NAMESPACE)["status"].get("phase", "")
        return phase

    def wait_running(self, *names: str, timeout: float = POD_TIMEOUT) -> None:
        for name in names:

            def running(name: str = name) -> bool:
                return self.phase(name) == "Running"

            try:
                wait_for(f"pod {name} Running", running, timeout, interval=2)
            except Failed as error:
                raise Failed(f"{error}; {self.why(name)}") from None

    def why(self, name: str) -> str:
        events = self.cluster.get("events", "-n", NAMESPACE,
                                  f"--field-selector=involvedObject.name={name}")  # fmt: skip
        last = [f"{e['reason']}: {e['message']}" for e in events["items"][-3:]]
        return "events: " + (" | ".join(last) or "none")

    def exec(self, name: str, script: str) -> str:
        return self.kubectl("exec", "-n", NAMESPACE, name, "--", "/bin/sh", "-c", script)

    def scheduling_event(self, name: str) -> str:
        """The scheduler's latest FailedScheduling message for pod ``name``."""
        selector = f"--field-selector=involvedObject.name={name}"
        events = self.cluster.get("events", "-n", NAMESPACE, selector)["items"]
        messages = [e["message"] for e in events if e["reason"] == "FailedScheduling"]
        return messages[-1] if messages else ""

    def pv_of(self, claim: str) -> dict[str, Any]:
        volume = self.cluster.get("pvc", claim, "-n", NAMESPACE)["spec"].get("volumeName")
        if not volume:
            raise Failed(f"PVC {claim} is not bound")
        result: dict[str, Any] = self.cluster.get("pv", volume)
        return result

    def pv_node(self, claim: str) -> str:
        terms = self.pv_of(claim)["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
        values = {v for t in terms for e in t["matchExpressions"] for v in e["values"]}
        return ",".join(sorted(values))

    def lvs(self) -> dict[str, str]:
        return self.lvm.lvs() if self.lvm else {}


def secret_data(cluster: Cluster) -> Callable[[str, str], dict[str, bytes] | None]:
    def read(namespace: str, name: str) -> dict[str, bytes] | None:
        text = cluster.kubectl("get", "secret", name, "-n", namespace, "-o", "json", check=False)
        if not text:
            return None
        data = json.loads(text).get("data") or {}
        return {key: base64.b64decode(value) for key, value in data.items()}

    return read


def in_cluster(cluster: Cluster, namespace: str, token: str) -> dict[str, str]:
    """What the kubelet gives a pod's containers for the API: the address of
    the API (the apiserver's own here: no Service routing) and, at the fixed
    in-pod path, the ServiceAccount's token, the cluster's CA and the namespace."""
    IN_POD_ACCOUNT.mkdir(parents=True, exist_ok=True)
    (IN_POD_ACCOUNT / "token").write_text(token)
    (IN_POD_ACCOUNT / "ca.crt").write_bytes(cluster.pki.ca.read_bytes())
    (IN_POD_ACCOUNT / "namespace").write_text(namespace)
    host, _, port = APISERVER.removeprefix("https://").rpartition(":")
    return {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}


def plugin_pod_stand_in(cluster: Cluster, daemonset: dict[str, Any]) -> None:
    """A running pod with the plugin's labels on this node, at the node's
    address (host network), where the plugin processes listen: what the
    forwarder looks up (running pods of the plugin's selector, by node). The
    DaemonSet leaves it alone: another object is its controller."""
    namespace = daemonset["metadata"]["namespace"]
    cluster.apply([{"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": STAND_IN, "namespace": namespace}}])  # fmt: skip
    owner = cluster.get("configmap", STAND_IN, "-n", namespace)["metadata"]
    cluster.apply([{
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": STAND_IN, "namespace": namespace,
            "labels": daemonset["spec"]["template"]["metadata"]["labels"],
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": STAND_IN,
                                 "uid": owner["uid"], "controller": True}],
        },
        "spec": {
            "nodeName": NODE_NAME, "hostNetwork": True, "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 1, "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "stand-in", "image": BUSYBOX_IMAGE,
                            "imagePullPolicy": "Never", "command": ["sleep", "1000000"]}],
        },
    }])  # fmt: skip

    def running() -> bool:
        status = cluster.get("pod", STAND_IN, "-n", namespace).get("status", {})
        return bool(status.get("phase") == "Running" and status.get("podIP") == NODE_IP)

    wait_for(f"pod {STAND_IN} Running at {NODE_IP}", running, POD_TIMEOUT, interval=2)


def service_hosts(rendered: Rendered) -> None:
    """The snapshot-metadata Service's name resolves here, as cluster DNS
    would resolve it in a pod: to the address its sidecar process listens on."""
    service = rendered.the("Service", "csi-lvm-snapshot-metadata")["metadata"]
    name = f"{service['name']}.{service['namespace']}"
    hosts = Path("/etc/hosts")
    ours = Path(tempfile.mkdtemp()) / "hosts"
    ours.write_text(f"{hosts.read_text() if hosts.exists() else ''}\n127.0.0.1 {name}\n")
    run(["mount", "--bind", str(ours), str(hosts)])


def set_up_plugin(
    cluster: Cluster, scratch: Path, report: Any
) -> tuple[Rendered, NodeProcesses, NodeProcesses]:
    """The CRDs, the snapshot-controller, deploy/kubernetes (with the
    snapshot-metadata component and tls.sh's Secrets and CR) applied, and the
    containers of the DaemonSet and of the snapshot-metadata Deployment
    started on the node (see plugin.py)."""
    kubectl = cluster.kubectl
    kubectl("apply", "--server-side", "-k", str(cluster.bin / "crds"))
    kubectl("apply", "--server-side", "-f", str(cluster.bin / CBT_CRD))
    kubectl("wait", "--for=condition=Established", "--timeout=120s", "crd", "--all")
    cluster.apply([{
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": PHANTOM_NODE, "labels": {"kubernetes.io/hostname": PHANTOM_NODE}},
    }])  # fmt: skip
    rendered = render(kubectl)
    daemonset = rendered.daemonset
    deployment = rendered.the("Deployment", "csi-lvm-snapshot-metadata")
    # The plugin image is not built in the VM: the pods go to the node without
    # a kubelet, and the containers run on the real node as processes.
    for workload in (daemonset, deployment):
        workload["spec"]["template"]["spec"]["nodeSelector"] = {
            "kubernetes.io/hostname": PHANTOM_NODE
        }
    made = run([str(SNAPSHOT_METADATA_COMPONENT / "tls.sh"), str(scratch / "csi-lvm-tls")])
    cluster.apply(rendered.objects + [o for o in yaml.safe_load_all(made) if o])
    cluster.procs.start("snapshot-controller", [
        str(cluster.bin / "snapshot-controller"), f"--kubeconfig={cluster.admin}",
        *SNAPSHOT_CONTROLLER_ARGS,
    ])  # fmt: skip
    started = []
    for workload in (daemonset, deployment):
        namespace = workload["metadata"]["namespace"]
        selector = ",".join(
            f"{k}={v}" for k, v in workload["spec"]["selector"]["matchLabels"].items()
        )

        def pod_name(namespace: str = namespace, selector: str = selector) -> str:
            pods = cluster.get("pods", "-n", namespace, "-l", selector)["items"]
            names: list[str] = [
                p["metadata"]["name"] for p in pods if p["metadata"]["name"] != STAND_IN
            ]
            return names[0] if names else ""

        wait_for(f"the {workload['kind']}'s pod object", lambda: bool(pod_name()), 120)
        account = workload["spec"]["template"]["spec"]["serviceAccountName"]
        token = kubectl("create", "token", account, "-n", namespace, "--duration=3h").strip()
        sa_config = kubeconfig(scratch / f"{account}-sa.kubeconfig", cluster.pki.ca, token=token)
        started.append(NodeProcesses(
            rendered, NODE_NAME, pod_name(), cluster.bin, scratch, sa_config, cluster.procs,
            workload=workload, secrets=secret_data(cluster),
            in_cluster=in_cluster(cluster, namespace, token) if workload is deployment else None,
        ))  # fmt: skip
    node, snapshot_metadata = started
    for line in node.start():
        print(f"         {line}", flush=True)
    plugin_pod_stand_in(cluster, daemonset)
    service_hosts(rendered)
    for line in snapshot_metadata.start():
        print(f"         {line}", flush=True)
    return rendered, node, snapshot_metadata


def run_checks(cluster: Cluster, report: Any, stage: str) -> None:
    scratch = cluster.scratch
    lvm: Lvm | None = None
    vg = None
    have_dm = Path("/sys/module/dm_thin_pool").exists()
    config = yaml.safe_load(
        render(cluster.kubectl).the("ConfigMap", "csi-lvm-config")["data"]["config.yaml"]
    )
    thin = next(c for c in config["deviceClasses"] if c.get("thinPool"))
    if have_dm:
        vg = LoopVolumeGroup(scratch, name=thin["volumeGroup"], size="8G",
                             pool=thin["thinPool"], pool_size="2G").create()  # fmt: skip
        lvm = Lvm(vg.name)
    else:
        print(
            "         no device-mapper here: the plugin runs with its classes missing", flush=True
        )
    try:
        # While the kubelet comes up (minutes under TCG).
        rendered, node, _ = set_up_plugin(cluster, scratch, report)
        cluster.wait_ready(report)
        checks = Checks(cluster, report, lvm)
        registered = check_registered(checks, rendered)
        if stage == "all" and have_dm and registered:
            workload_checks(checks, rendered, node)
    finally:
        if vg is not None:
            # The tier's own clean-up, after the checks have judged the driver's.
            for name in list(checks_pods(cluster)):
                cluster.kubectl("delete", "pod", "-n", NAMESPACE, name, "--wait=false", check=False)
            vg_cleanup(vg)


def checks_pods(cluster: Cluster) -> list[str]:
    try:
        return [p["metadata"]["name"] for p in cluster.get("pods", "-n", NAMESPACE)["items"]]
    except Failed:
        return []


def vg_cleanup(vg: Any) -> None:
    for point in reversed(kubelet_mounts()):
        run(["umount", "-l", point], check=False)
    vg.destroy()


def check_registered(checks: Checks, rendered: Rendered) -> bool:
    cluster = checks.cluster
    driver = rendered.driver_name
    key = f"topology.{driver}/node"
    classes = [sc["metadata"]["name"] for sc in rendered.all("StorageClass")
               if sc["provisioner"] == driver]  # fmt: skip

    def registered() -> str:
        def entry() -> dict[str, Any] | None:
            drivers = cluster.get("csinode", NODE_NAME)["spec"].get("drivers") or []
            return next((d for d in drivers if d["name"] == driver), None)

        took = wait_for(f"CSINode {NODE_NAME} lists {driver}", lambda: entry() is not None, 300)
        found = entry() or {}
        expected = sorted([key, *NODE_LABELS])
        if sorted(found.get("topologyKeys") or []) != expected:
            raise Failed(f"CSINode topology keys {found.get('topologyKeys')}, expected {expected}")
        return f"topology keys {', '.join(expected)}, after {took:.0f} s"

    def capacity() -> str:
        def objects() -> dict[str, str]:
            items = cluster.get("csistoragecapacities", "-A")["items"]
            found = {}
            for item in items:
                labels = item.get("nodeTopology", {}).get("matchLabels", {})
                if labels.get(key) == NODE_NAME:
                    found[item["storageClassName"]] = item.get("capacity", "0")
            return found

        wait_for("CSIStorageCapacity for every class", lambda: set(classes) <= set(objects()), 180)
        found = objects()
        return ", ".join(f"{sc} {found[sc]}" for sc in classes)

    first = "1a node Ready, plugin registered: CSINode"
    return checks.check(first, registered) & checks.check(
        "1b CSIStorageCapacity per StorageClass", capacity, needs=(first,)
    )


def workload_checks(checks: Checks, rendered: Rendered, node: NodeProcesses) -> None:
    cluster = checks.cluster
    kubectl = checks.kubectl
    initial_lvs = checks.lvs()
    default_class = next(
        sc["metadata"]["name"] for sc in rendered.all("StorageClass")
        if sc["metadata"].get("annotations", {}).get(DEFAULT_CLASS) == "true"
    )  # fmt: skip
    # Checks 2 and 3 at once: their pods start in parallel.
    cluster.apply([
        pvc("thin", "1Gi"), pod("thin", "thin", "echo snapshot-time > /data/file && sync"),
        pvc("xfs", "1Gi", "csi-lvm-xfs"), pod("xfs", "xfs", "echo xfs > /data/file && sync"),
        pvc("block", "64Mi", block=True),
        pod("block", "block", BLOCK_WRITE, block=True),
        pvc("fsgroup", "64Mi"), pod("fsgroup", "fsgroup", "echo mine > /data/file", fs_group=4321),
    ])  # fmt: skip

    def first() -> str:
        checks.wait_running("thin")
        node_of = checks.pv_node("thin")
        if node_of != NODE_NAME:
            raise Failed(f"PV pinned to {node_of}")
        text = checks.exec("thin", "cat /data/file").strip()
        if text != "snapshot-time":
            raise Failed(f"the pod's file holds {text!r}")
        fs = checks.exec("thin", "stat -f -c %T /data").strip()
        return f"default class {default_class}, PV on {node_of}, {fs}, the pod wrote its file"

    def xfs() -> str:
        checks.wait_running("xfs")
        fs = checks.exec("xfs", "stat -f -c %T /data; cat /data/file").split()
        if fs != ["xfs", "xfs"]:
            raise Failed(f"filesystem and file: {fs}")
        return "mounted xfs, file written"

    def block() -> str:
        checks.wait_running("block")
        out = checks.exec("block", "test -b /dev/e2e-block && head -c 10 /dev/e2e-block; echo; "
                          "blockdev --getsize64 /dev/e2e-block").split()  # fmt: skip
        if out[:1] != ["block-data"]:
            raise Failed(f"the device reads {out}")
        return f"a block device of {out[1]} bytes, written and read"

    def fsgroup() -> str:
        checks.wait_running("fsgroup")
        out = checks.exec("fsgroup", "stat -c '%g %u' /data/file; stat -c %g /data; id -u").split()
        if out[0] != "4321" or out[2] != "4321":
            raise Failed(f"file group/owner, dir group, uid: {out}")
        return f"file group {out[0]}, owner {out[1]}, directory group {out[2]}"

    two = "2 PVC on the default class: scheduled, provisioned, staged, published"
    checks.check(two, first)
    checks.check("3a csi-lvm-xfs", xfs)
    checks.check("3b raw block PVC", block)
    checks.check("3c fsGroup", fsgroup)

    def take_snapshot(name: str, claim: str) -> float:
        cluster.apply([{
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"source": {"persistentVolumeClaimName": claim}},
        }])  # fmt: skip

        def ready() -> bool:
            status = cluster.get("volumesnapshot", name, "-n", NAMESPACE).get("status", {})
            if status.get("error"):
                raise Failed(f"VolumeSnapshot error: {status['error']}")
            return bool(status.get("readyToUse"))

        return wait_for(f"VolumeSnapshot {name} readyToUse", ready, 180, interval=2)

    def snapshot() -> str:
        took = take_snapshot("snap", "thin")
        checks.exec("thin", "echo after-snapshot >> /data/file && sync")
        cluster.apply([
            pvc("restore", "1Gi", source={"apiGroup": "snapshot.storage.k8s.io",
                                          "kind": "VolumeSnapshot", "name": "snap"}),
            pod("restore", "restore", "true"),
        ])  # fmt: skip
        checks.wait_running("restore")
        text = checks.exec("restore", "cat /data/file")
        if text != "snapshot-time\n":
            raise Failed(f"the restored file holds {text!r}")
        return f"ready after {took:.0f} s; the restore holds exactly the data at snapshot time"

    def clone() -> str:
        cluster.apply([
            pvc("clone", "1Gi", source={"kind": "PersistentVolumeClaim", "name": "thin"}),
            pod("clone", "clone", "true"),
        ])  # fmt: skip
        checks.wait_running("clone")
        text = checks.exec("clone", "cat /data/file")
        if not text.startswith("snapshot-time\n"):
            raise Failed(f"the clone's file holds {text!r}")
        return "the clone holds the source's file"

    checks.check("4 VolumeSnapshot ready; restore to a second pod", snapshot, needs=(two,))
    checks.check("5 clone (dataSource PVC)", clone, needs=(two,))

    def status() -> str:
        command, env = admin_command(rendered, node, "status")
        out = run(command, env=env)
        wanted = [f"pvc={NAMESPACE}/thin", f"volumeSnapshot={NAMESPACE}/snap"]
        missing = [w for w in wanted if w not in out]
        if missing:
            raise Failed(f"csi-lvm status lacks {missing}: {out}")
        bare = {k: v for k, v in env.items() if k != "KUBECONFIG"} | {"HOME": str(cluster.scratch)}
        without = run(command, env=bare)
        if "PVC and VolumeSnapshot names not shown" not in without:
            raise Failed(f"without API access csi-lvm status did not say so: {without}")
        return f"names {', '.join(wanted)}; without API access it says so"

    checks.check("14 csi-lvm status names the PVC and the VolumeSnapshot", status,
                 needs=("4 VolumeSnapshot ready; restore to a second pod",))  # fmt: skip

    def lister(account: str, *args: str) -> tuple[int, list[tuple[int, int]]]:
        """The ranges a client on the upstream client library lists, through the
        SnapshotMetadataService CR, the sidecar, the forwarder and the
        plugin's TLS port; and the volume's capacity."""
        out = run([str(cluster.bin / LISTER), "-kubeconfig", str(cluster.admin),
                   "-n", NAMESPACE, "-o", "json", "-service-account", account,
                   "-service-account-namespace", NAMESPACE, *args], timeout=180)  # fmt: skip
        records = json.loads(out)
        capacity = {r["volume_capacity_bytes"] for r in records} or {0}
        ranges = [(b.get("byte_offset", 0), b["size_bytes"])
                  for r in records for b in r.get("block_metadata") or []]  # fmt: skip
        return capacity.pop(), ranges

    def changed_blocks() -> str:
        # A tool's ServiceAccount, bound to the client role deploy/ ships.
        cluster.apply([
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": BACKUP_ACCOUNT, "namespace": NAMESPACE}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": BACKUP_ACCOUNT, "namespace": NAMESPACE},
             "subjects": [{"kind": "ServiceAccount", "name": BACKUP_ACCOUNT,
                           "namespace": NAMESPACE}],
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                         "name": "csi-lvm-snapshot-metadata-client"}},
        ])  # fmt: skip
        checks.wait_running("block")
        chunk = checks.lvm.chunk_size() if checks.lvm else 0
        # "block" holds 11 bytes at offset 0 (check 3b); then 128 KiB at 4 MiB.
        take_snapshot("cbt-base", "block")
        checks.exec("block", "dd if=/dev/urandom of=/dev/e2e-block bs=65536 count=2 seek=64 "
                             "conv=fsync 2>/dev/null")  # fmt: skip
        take_snapshot("cbt-target", "block")
        capacity, allocated = lister(BACKUP_ACCOUNT, "-s", "cbt-base")
        _, delta = lister(BACKUP_ACCOUNT, "-s", "cbt-target", "-p", "cbt-base")
        written = -(-128 * 1024 // chunk) * chunk
        if capacity != 64 * MiB or allocated != [(0, chunk)]:
            raise Failed(f"cbt-base: capacity {capacity}, allocated {allocated}; "
                         f"expected {64 * MiB} and {[(0, chunk)]}")  # fmt: skip
        if delta != [(4 * MiB, written)]:
            raise Failed(f"delta cbt-base -> cbt-target {delta}; expected {[(4 * MiB, written)]}")
        # The sidecar authorizes: an account without the role gets nothing.
        try:
            lister("default", "-s", "cbt-base")
        except Failed as refused:
            if "PermissionDenied" not in str(refused):
                raise
        else:
            raise Failed("the ServiceAccount default (no role) was given the ranges")
        return (f"allocated of cbt-base {allocated}, delta to cbt-target {delta} (chunk {chunk}; "
                "the lister through the sidecar, the forwarder and the plugin's "
                "TLS port); an account without the client role: PermissionDenied")  # fmt: skip

    checks.check("11 changed block tracking: a backup client gets exact ranges",
                 changed_blocks, needs=("3b raw block PVC",))  # fmt: skip

    def size_kib() -> int:
        return int(checks.exec("thin", "df -P -k /data | tail -1").split()[1])

    def expand() -> str:
        before = size_kib()
        grow = {"spec": {"resources": {"requests": {"storage": "2Gi"}}}}
        kubectl("patch", "pvc", "thin", "-n", NAMESPACE, "--type=merge", "-p", json.dumps(grow))

        def grown() -> bool:
            return size_kib() * 1024 > 1.5 * GiB

        took = wait_for("the pod sees the grown filesystem", grown, 240, interval=3)
        after = size_kib()
        status = cluster.get("pvc", "thin", "-n", NAMESPACE)["status"]["capacity"]["storage"]
        return f"df {before} -> {after} KiB in {took:.0f} s, PVC capacity {status}"

    checks.check("6 online expansion", expand, needs=(two,))

    def too_big() -> str:
        before = set(checks.lvs())
        cluster.apply([pvc("huge", "1Ti"), pod("huge", "huge", "true")])

        def reason() -> str:
            return checks.scheduling_event("huge")

        wait_for("a FailedScheduling event for pod huge", lambda: bool(reason()), 120, interval=2)
        time.sleep(5)
        if checks.phase("huge") != "Pending":
            raise Failed(f"pod huge is {checks.phase('huge')}")
        new = set(checks.lvs()) - before
        if new:
            raise Failed(f"LVs made: {sorted(new)}")
        return f"Pending: {reason()}"

    checks.check("7 a PVC larger than the node stays Pending", too_big)
    kubectl("delete", "pod", "huge", "-n", NAMESPACE, "--wait=false", check=False)
    kubectl("delete", "pvc", "huge", "-n", NAMESPACE, "--wait=false", check=False)

    def plugin_restart() -> str:
        mounts = kubelet_mounts()
        for container in reversed(containers(rendered.daemonset)):
            node.procs.get(container["name"]).stop()
        node.start()
        text = checks.exec("thin", "cat /data/file")
        lost = set(mounts) - set(kubelet_mounts())
        if lost:
            raise Failed(f"mounts gone: {sorted(lost)}")
        cluster.apply([pvc("after-restart", "64Mi"), pod("after-restart", "after-restart", "true")])
        checks.wait_running("after-restart")
        return (
            f"{len(mounts)} mounts kept, the pod reads {text.split()[0]!r}, a new PVC provisioned"
        )

    def kubelet_restart() -> str:
        kubelet = cluster.procs.get("kubelet")
        kubelet.stop()
        cluster.start_kubelet(again=True)
        cluster.wait_node_ready(180)
        text = checks.exec("thin", "cat /data/file")
        volume = checks.pv_of("fsgroup")["metadata"]["name"]
        kubectl("delete", "pod", "fsgroup", "-n", NAMESPACE, "--timeout=180s")
        left = [m for m in kubelet_mounts() if volume in m]
        if left:
            raise Failed(f"mounts of {volume} left after the pod went: {left}")
        return f"the pod still reads {text.split()[0]!r}; a deleted pod unstaged cleanly"

    checks.check(
        "8a plugin restarted: mounts stay, new PVCs provision", plugin_restart, needs=(two,)
    )
    checks.check("8b kubelet restarted: volumes kept, clean unstage", kubelet_restart, needs=(two,))

    def other_node() -> str:
        before = set(checks.lvs())
        cluster.apply([pvc("elsewhere", "64Mi"),
                       pod("elsewhere", "elsewhere", "true", node=PHANTOM_NODE)])  # fmt: skip
        time.sleep(20)
        claim = cluster.get("pvc", "elsewhere", "-n", NAMESPACE)
        selected = claim["metadata"].get("annotations", {}).get(SELECTED_NODE)
        # As if the scheduler had picked that node: only its provisioner may act.
        kubectl("annotate", "pvc", "elsewhere", "-n", NAMESPACE, "--overwrite",
                f"{SELECTED_NODE}={PHANTOM_NODE}")  # fmt: skip
        time.sleep(20)
        claim = cluster.get("pvc", "elsewhere", "-n", NAMESPACE)
        if claim["status"].get("phase") != "Pending":
            raise Failed(f"PVC elsewhere is {claim['status'].get('phase')}")
        new = set(checks.lvs()) - before
        if new:
            raise Failed(f"LVs made: {sorted(new)}")
        return (f"Pending, no LV, no PV (the scheduler selected {selected}; "
                f"then annotated for {PHANTOM_NODE}: still none)")  # fmt: skip

    checks.check("10 a PVC for a node without the plugin is not provisioned here", other_node)
    zone_checks(checks, rendered, node)
    lecture_checks(checks)

    def cleanup() -> str:
        kubectl("delete", "pod", "--all", "-n", NAMESPACE, "--timeout=240s")
        kubectl("delete", "volumesnapshot", "--all", "-n", NAMESPACE, "--timeout=120s")
        kubectl("delete", "pvc", "--all", "-n", NAMESPACE, "--timeout=120s")
        try:
            wait_for("every PV gone", lambda: not cluster.get("pv")["items"], 180, interval=3)
        except Failed as error:
            left = [
                f"{v['metadata']['name']} ({v.get('status', {}).get('phase')}, class "
                f"{v['spec'].get('storageClassName')})"
                for v in cluster.get("pv")["items"]
            ]
            raise Failed(f"{error}; left: {', '.join(left)}") from None
        wait_for(
            "every VolumeSnapshotContent gone",
            lambda: not cluster.get("volumesnapshotcontents")["items"],
            120,
            interval=3,
        )
        wait_for("LVs back to the start", lambda: checks.lvs() == initial_lvs, 60, interval=2)
        left = kubelet_mounts()
        if left:
            raise Failed(f"mounts left under {KUBELET_DIR}: {left}")
        return f"LVs as before ({', '.join(sorted(initial_lvs))}), no mount under {KUBELET_DIR}"

    checks.check("9 everything deleted: LVs as before, no mounts left", cleanup)


def admin_command(
    rendered: Rendered, node: NodeProcesses, command: str, *extra: str
) -> tuple[list[str], dict[str, str]]:
    """``csi-lvm <command>`` as an admin runs it in the plugin's container:
    the plugin's socket, config and topology labels, its environment (the
    service account's API access)."""
    plugin = next(c for c in containers(rendered.daemonset) if c["name"] == "csi-lvm")
    argv, env = node.command(plugin)
    serve = build_parser().parse_args(argv[1:])
    given = {
        "doctor": ["--endpoint", serve.endpoint, f"--topology-labels={serve.topology_labels}"],
        "status": [],
    }[command]
    return [argv[0], command, "--config", serve.config, *given, *extra], {**os.environ, **env}


def zoned_class(name: str, driver: str, key: str, value: str) -> dict[str, Any]:
    return {
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": name}, "provisioner": driver,
        "parameters": {"deviceClass": "thin"}, "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer",
        "allowedTopologies": [{"matchLabelExpressions": [{"key": key, "values": [value]}]}],
    }  # fmt: skip


def zone_checks(checks: Checks, rendered: Rendered, node: NodeProcesses) -> None:
    """The lecture's topology story on the node's zone and rack labels."""
    cluster, kubectl, driver = checks.cluster, checks.kubectl, rendered.driver_name
    node_key = f"topology.{driver}/node"

    def affinity_keys(claim: str) -> set[str]:
        terms = checks.pv_of(claim)["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
        return {e["key"] for t in terms for e in t["matchExpressions"]}

    def lecture() -> str:
        before = set(checks.lvs())
        cluster.apply([
            zoned_class("csi-lvm-zone", driver, ZONE_KEY, "cn-hangzhou-d"),
            pvc("zoned", "64Mi", "csi-lvm-zone"),
            pod("zoned", "zoned", "echo zoned > /data/file && sync"),
        ])  # fmt: skip
        wanted = "didn't find available persistent volumes to bind"
        wait_for("the scheduler's event for pod zoned",
                 lambda: wanted in checks.scheduling_event("zoned"), 120, interval=2)  # fmt: skip
        time.sleep(5)
        if checks.phase("zoned") != "Pending":
            raise Failed(f"pod zoned is {checks.phase('zoned')} in a zone without nodes")
        if set(checks.lvs()) - before:
            raise Failed(f"LVs made: {sorted(set(checks.lvs()) - before)}")
        # allowedTopologies cannot be edited: the class is made again, as the lecture does.
        kubectl("delete", "storageclass", "csi-lvm-zone")
        cluster.apply([zoned_class("csi-lvm-zone", driver, ZONE_KEY, NODE_LABELS[ZONE_KEY])])
        checks.wait_running("zoned")
        if checks.pv_node("zoned") != NODE_NAME or affinity_keys("zoned") != {node_key}:
            raise Failed(f"PV affinity {checks.pv_of('zoned')['spec']['nodeAffinity']}")
        return (f"cn-hangzhou-d: Pending, no LV, '{wanted}'; class changed to "
                f"{NODE_LABELS[ZONE_KEY]}: Running, PV on {node_key}={NODE_NAME}")  # fmt: skip

    def doctor_line(label: str) -> str:
        command, env = admin_command(rendered, node, "doctor", "--node-id", NODE_NAME)
        out = run(command, env=env, check=False)
        lines = [line for line in out.splitlines() if f"topology label {label}" in line]
        if len(lines) != 1:
            raise Failed(f"doctor said no single line of {label}: {out}")
        return lines[0]

    def rack() -> str:
        cluster.apply([
            zoned_class("csi-lvm-rack", driver, RACK_KEY, NODE_LABELS[RACK_KEY]),
            pvc("racked", "64Mi", "csi-lvm-rack"), pod("racked", "racked", "true"),
        ])  # fmt: skip
        checks.wait_running("racked")
        same = doctor_line(RACK_KEY)
        kubectl("label", "node", NODE_NAME, f"{RACK_KEY}=rack2", "--overwrite")
        try:
            moved = doctor_line(RACK_KEY)
        finally:
            kubectl("label", "node", NODE_NAME, f"{RACK_KEY}={NODE_LABELS[RACK_KEY]}",
                    "--overwrite")  # fmt: skip
        if not same.startswith("ok") or not moved.startswith("FAIL") or "restart" not in moved:
            raise Failed(f"doctor: {same!r}, then {moved!r}")
        return f"Running on {checks.pv_node('racked')}; doctor: {same!r}, relabelled: {moved!r}"

    checks.check("12 the lecture's zones: cn-hangzhou-d Pending, cn-hangzhou-b Running", lecture)
    checks.check("13 a rack class puts its volume on the rack's node; doctor sees a relabel", rack)
    for name in ("zoned", "racked"):
        kubectl("delete", "pod", name, "-n", NAMESPACE, "--wait=false", check=False)
    for name in ("csi-lvm-zone", "csi-lvm-rack"):
        kubectl("delete", "storageclass", name, "--wait=false", check=False)


EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"


def example(name: str) -> list[dict[str, Any]]:
    return [o for o in yaml.safe_load_all((EXAMPLES / name).read_text()) if o]


def lecture_checks(checks: Checks) -> None:
    """The lecture's static local PV beside csi-lvm, and a deleted snapshot."""
    cluster, kubectl = checks.cluster, checks.kubectl

    def static_beside_csi_lvm() -> str:
        # deploy/examples 05 and 06 as they are, but for this node, a scratch
        # directory as the disk, and small sizes (a thick volume is zeroed).
        disk = checks.cluster.scratch / "disks" / "disk1"
        disk.mkdir(parents=True, exist_ok=True)
        objects = [
            *example("05-static-local-pv.yaml"),
            *example("06-csi-lvm-replaces-local-pv.yaml"),
        ]
        for item in objects:
            if item["kind"] == "PersistentVolumeClaim":
                item["metadata"]["namespace"] = NAMESPACE
            if item["kind"] == "PersistentVolume":
                item["spec"]["local"]["path"] = str(disk)
                term = item["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]
                term["matchExpressions"][0]["values"] = [NODE_NAME]
            if item["kind"] == "PersistentVolumeClaim":
                item["spec"]["resources"]["requests"]["storage"] = "64Mi"
        claims = [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
        cluster.apply([o for o in objects if o["kind"] != "Pod"])
        time.sleep(10)
        early = {c["metadata"]["name"]: cluster.get("pvc", c["metadata"]["name"], "-n",
                                                    NAMESPACE)["status"].get("phase")
                 for c in claims}  # fmt: skip
        if set(early.values()) != {"Pending"}:
            raise Failed(f"before any pod: {early}")
        user = pod("both-ways", "old-way", "echo old > /data/file && echo new > /new/file")
        user["spec"]["volumes"].append(
            {"name": "new", "persistentVolumeClaim": {"claimName": "new-way"}}
        )
        user["spec"]["containers"][0]["volumeMounts"].append({"name": "new", "mountPath": "/new"})
        cluster.apply([user])
        checks.wait_running("both-ways")
        if (disk / "file").read_text().strip() != "old":
            raise Failed("the static PV's directory does not hold the pod's file")
        bound = checks.pv_of("old-way")["metadata"]["name"]
        new_node = checks.pv_node("new-way")
        return (f"both claims Pending until the pod; then old-way bound to {bound} "
                f"({NODE_NAME}'s directory), new-way to an LV on {new_node}")  # fmt: skip

    def snapshot_deleted() -> str:
        before = set(checks.lvs())
        cluster.apply([{
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": "short-lived", "namespace": NAMESPACE},
            "spec": {"volumeSnapshotClassName": "csi-lvm-snapshot",
                     "source": {"persistentVolumeClaimName": "thin"}},
        }])  # fmt: skip

        def content() -> str:
            status = cluster.get("volumesnapshot", "short-lived", "-n", NAMESPACE).get("status", {})
            return str(status.get("boundVolumeSnapshotContentName") or "") if status.get(
                "readyToUse") else ""  # fmt: skip

        wait_for("VolumeSnapshot short-lived readyToUse", lambda: bool(content()), 180, interval=2)
        name, made = content(), set(checks.lvs()) - before
        if len(made) != 1:
            raise Failed(f"LVs made for the snapshot: {sorted(made)}")
        kubectl("delete", "volumesnapshot", "short-lived", "-n", NAMESPACE, "--timeout=120s")
        wait_for(f"VolumeSnapshotContent {name} gone",
                 lambda: not cluster.kubectl("get", "volumesnapshotcontent", name, "-o", "name",
                                             check=False), 120, interval=2)  # fmt: skip
        wait_for("the snapshot's LV gone", lambda: not set(checks.lvs()) & made, 60, interval=2)
        return f"{name} and LV {made.pop()} removed with the VolumeSnapshot"

    checks.check(
        "15 the lecture's static local PV binds beside a csi-lvm class", static_beside_csi_lvm
    )
    checks.check("16 deleting a VolumeSnapshot removes its content and its LV", snapshot_deleted)

    def stateful_set() -> str:
        # The pods' spec (host network, busybox), its volume from the template.
        spec = pod("web", "unused", 'test -f /data/id || echo "$POD_NAME" > /data/id')["spec"]
        del spec["volumes"]
        spec["containers"][0]["env"] = [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
        ]
        cluster.apply([{
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "web", "namespace": NAMESPACE},
            "spec": {
                "serviceName": "web", "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": spec},
                "volumeClaimTemplates": [{
                    "metadata": {"name": "data"},
                    "spec": {"accessModes": ["ReadWriteOnce"],
                             "resources": {"requests": {"storage": "64Mi"}}},
                }],
            },
        }])  # fmt: skip
        checks.wait_running("web-0", "web-1")
        first = {name: checks.exec(name, "cat /data/id").strip() for name in ("web-0", "web-1")}
        volume = checks.pv_of("data-web-0")["metadata"]["name"]
        uid = cluster.get("pod", "web-0", "-n", NAMESPACE)["metadata"]["uid"]
        kubectl("delete", "pod", "web-0", "-n", NAMESPACE, "--timeout=120s")
        wait_for("web-0 made again",
                 lambda: cluster.get("pod", "web-0", "-n", NAMESPACE)["metadata"]["uid"] != uid,
                 120, interval=2)  # fmt: skip
        checks.wait_running("web-0")
        again = checks.exec("web-0", "cat /data/id").strip()
        if first != {"web-0": "web-0", "web-1": "web-1"} or again != "web-0":
            raise Failed(f"ids {first}, after the restart {again!r}")
        if checks.pv_of("data-web-0")["metadata"]["name"] != volume:
            raise Failed("web-0 came back to another volume")
        return (f"each replica on its own LV on {checks.pv_node('data-web-1')}; web-0 deleted, "
                f"made again on {checks.pv_node('data-web-0')} with its volume {volume} "
                "and its data")  # fmt: skip

    checks.check("17 a StatefulSet's replicas keep their volumes and data", stateful_set)
    kubectl("delete", "statefulset", "web", "-n", NAMESPACE, "--timeout=120s", check=False)
    # The static PV is Retain: nothing but its admin deletes it, after its claim.
    kubectl("delete", "pod", "both-ways", "-n", NAMESPACE, "--timeout=120s", check=False)
    kubectl("delete", "pvc", "old-way", "-n", NAMESPACE, "--timeout=120s", check=False)
    kubectl("delete", "pv", "local-pv-node-a-disk1", "--timeout=120s", check=False)
    kubectl("delete", "storageclass", "local-storage", "--wait=false", check=False)
