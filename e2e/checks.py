"""The cluster tier's checks, each reported as one PASS or FAIL line.

The workloads are busybox pods (image imported, never pulled)
on PVCs of the StorageClasses that deploy/kubernetes ships. A check that
fails is reported and the next one runs, unless it needs what failed.
"""

from __future__ import annotations

import json
import shlex
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from csi_lvm.cli import build_parser
from e2e.attributes import attribute_checks
from e2e.cluster import (
    BUSYBOX_IMAGE,
    KUBELET_DIR,
    NODES,
    RACK_KEY,
    ZONE_KEY,
    Cluster,
    Node,
)
from e2e.encryption import encryption_checks
from e2e.groups import group_checks
from e2e.plugin import TLS_SCRIPT, Rendered, containers, render
from e2e.procs import Failed, run, wait_for
from tests.testbed import LoopVolumeGroup

NAMESPACE = "default"
# A node object without a kubelet (check 10).
PHANTOM_NODE = "e2e-node-phantom"
NODE_A, NODE_B = NODES
# Each node's volume group and thin pool (the config's classes, an entry per
# node). Sizes differ, so that capacity decides where a large volume goes
# (check 18); each pool (x4 overprovisioned) holds what the checks may place on
# one node: "thin" with its snapshot, restore and clone (pinned to its node) and
# its growth to 2 GiB (check 6), whichever node the scheduler picked.
VOLUME_GROUPS = {NODE_A.name: ("vg0", "12G", "4G"), NODE_B.name: ("vg1", "6G", "2G")}
SNAPSHOT_CONTROLLER_ARGS = (
    "--enable-distributed-snapshotting",
    "--feature-gates=CSIVolumeGroupSnapshot=true",
    "--leader-election=false",
)
POD_TIMEOUT = 300
GiB = 1024**3
SELECTED_NODE = "volume.kubernetes.io/selected-node"
DEFAULT_CLASS = "storageclass.kubernetes.io/is-default-class"
BLOCK_WRITE = "echo block-data | dd of=/dev/e2e-block conv=fsync 2>/dev/null"
CBT_CRD = "crds/cbt/cbt.storage.k8s.io_snapshotmetadataservices.yaml"
LISTER = "snapshot-metadata-lister"
BACKUP_ACCOUNT = "e2e-backup"
MiB = 1024**2


class Lvm:
    """The nodes' volume groups as LVM reports them (not the driver): every
    node's, as the nodes share one kernel."""

    def __init__(self, vgs: list[str]) -> None:
        self.vgs = vgs

    def lvs(self) -> dict[str, str]:
        """Every LV of the volume groups, as vg/lv, with its size."""
        out = run(["lvs", "--noheadings", "--units", "b", "--nosuffix",
                   "-o", "vg_name,lv_name,lv_size", *self.vgs])  # fmt: skip
        rows = [line.split() for line in out.splitlines() if line.strip()]
        return {f"{vg}/{lv}": size for vg, lv, size in rows}

    def chunk_size(self) -> int:
        """The chunk size of the thin pools (made alike), in bytes."""
        out = run(["lvs", "--noheadings", "--units", "b", "--nosuffix", "-S", "lv_layout=pool",
                   "-o", "chunk_size", self.vgs[0]])  # fmt: skip
        return int(out.split()[0])

    def by_device(self, major_minor: str) -> str:
        """The vg/lv whose kernel device is ``major_minor`` ("" if none)."""
        out = run(["lvs", "--noheadings", "-o", "vg_name,lv_name,lv_kernel_major,"
                   "lv_kernel_minor", *self.vgs])  # fmt: skip
        for line in out.splitlines():
            vg, lv, major, minor = line.split()
            if f"{major}:{minor}" == major_minor:
                return f"{vg}/{lv}"
        return ""


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
    def __init__(self, cluster: Cluster, report: Any, lvm: Lvm | None, rendered: Rendered) -> None:
        self.cluster = cluster
        self.report = report
        self.lvm = lvm
        self.rendered = rendered
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
        """The script's output in the pod; Failed if it exits non-zero."""
        code, out, err = self.cluster.api.exec(NAMESPACE, name, ["/bin/sh", "-c", script])
        if code:
            raise Failed(f"in pod {name}, {script!r} exited {code}: {err.strip()}")
        return out

    def events_of(self, name: str) -> list[str]:
        """The warnings recorded about object ``name`` (a PVC, a pod), oldest first."""
        selector = f"--field-selector=involvedObject.name={name},type=Warning"
        events = self.cluster.get("events", "-n", NAMESPACE, selector)["items"]
        return [f"{e['reason']}: {e['message']}" for e in events]

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

    def node_of(self, claim: str) -> Node:
        """The node the claim's volume lives on."""
        return self.cluster.node(self.pv_node(claim))

    def pod_node(self, name: str) -> str:
        node: str = self.cluster.get("pod", name, "-n", NAMESPACE)["spec"].get("nodeName", "")
        return node

    def lvs(self) -> dict[str, str]:
        return self.lvm.lvs() if self.lvm else {}

    def take_snapshot(self, name: str, claim: str, timeout: float = 180) -> float:
        """A VolumeSnapshot of the claim (the default class): seconds to readyToUse."""
        self.cluster.apply([{
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"source": {"persistentVolumeClaimName": claim}},
        }])  # fmt: skip

        def ready() -> bool:
            status = self.cluster.get("volumesnapshot", name, "-n", NAMESPACE).get("status", {})
            if status.get("error"):
                raise Failed(f"VolumeSnapshot error: {status['error']}")
            return bool(status.get("readyToUse"))

        return wait_for(f"VolumeSnapshot {name} readyToUse", ready, timeout, interval=2)

    # ---- the plugin's pods ---------------------------------------------------
    @property
    def plugin_namespace(self) -> str:
        namespace: str = self.rendered.daemonset["metadata"]["namespace"]
        return namespace

    def plugin_pods(self) -> dict[str, dict[str, Any]]:
        """The DaemonSet's pods by node."""
        labels = self.rendered.daemonset["spec"]["selector"]["matchLabels"]
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        pods = self.cluster.get("pods", "-n", self.plugin_namespace, "-l", selector)["items"]
        return {p["spec"].get("nodeName", ""): p for p in pods
                if not p["metadata"].get("deletionTimestamp")}  # fmt: skip

    def plugin_ready(self, node: str) -> str:
        """The name of the plugin's pod on ``node`` once all its containers are
        ready; "" before."""
        found = self.plugin_pods().get(node)
        if not found:
            return ""
        statuses = found.get("status", {}).get("containerStatuses") or []
        expected = len(found["spec"]["containers"])
        ready = len(statuses) == expected and all(c.get("ready") for c in statuses)
        return str(found["metadata"]["name"]) if ready else ""

    def wait_plugin_ready(self, node: str, timeout: float = POD_TIMEOUT) -> float:
        return wait_for(f"the plugin's pod on {node} ready",
                        lambda: bool(self.plugin_ready(node)), timeout, interval=3)  # fmt: skip

    def admin(self, node: str, command: str, *extra: str, api: bool = True) -> str:
        """``csi-lvm <command>`` as an admin runs it in the plugin's container
        on ``node``: the plugin's socket, config, LVM settings and topology
        labels; its service account's API access unless ``api`` is False."""
        plugin = next(c for c in containers(self.rendered.daemonset) if c["name"] == "csi-lvm")
        serve = build_parser().parse_args(plugin["args"])
        given = {
            "doctor": ["--endpoint", serve.endpoint,
                       f"--topology-labels={serve.topology_labels}"],
            "status": [],
        }[command]  # fmt: skip
        words = ["csi-lvm", command, "--config", serve.config, *given, *extra]
        script = f'exec {shlex.join(words)} --lvm-config-overrides "$LVM_CONFIG_OVERRIDES"'
        if not api:
            script = f"unset KUBERNETES_SERVICE_HOST KUBECONFIG; HOME=/tmp {script}"
        pod = self.plugin_ready(node)
        if not pod:
            raise Failed(f"no ready plugin pod on {node}")
        _, out, err = self.cluster.api.exec(self.plugin_namespace, pod, ["sh", "-c", script],
                                            container="csi-lvm")  # fmt: skip
        return out + err


def service_hosts(cluster: Cluster, rendered: Rendered) -> None:
    """The snapshot-metadata Service's name resolves here, as cluster DNS
    would resolve it in a pod: to the Service's cluster IP (kube-proxy takes
    it from there)."""
    service = rendered.the("Service", "csi-lvm-snapshot-metadata")["metadata"]
    address = cluster.get("service", service["name"], "-n", service["namespace"])["spec"][
        "clusterIP"
    ]
    name = f"{service['name']}.{service['namespace']}"
    hosts = Path("/etc/hosts")
    ours = Path(tempfile.mkdtemp()) / "hosts"
    ours.write_text(f"{hosts.read_text() if hosts.exists() else ''}\n{address} {name}\n")
    run(["mount", "--bind", str(ours), str(hosts)])


def set_up_plugin(cluster: Cluster, scratch: Path, rendered: Rendered) -> None:
    """The CRDs, the snapshot-controller, and deploy/kubernetes as
    ``rendered`` (with the Secrets and CR of tls.sh --snapshot-metadata
    --group-snapshots: the plugins', the forwarders' and the sidecar's
    certificates) applied: its DaemonSet and Deployments run as pods."""
    kubectl = cluster.kubectl
    kubectl("apply", "--server-side", "-k", str(cluster.bin / "crds"))
    kubectl("apply", "--server-side", "-f", str(cluster.bin / CBT_CRD))
    kubectl("wait", "--for=condition=Established", "--timeout=120s", "crd", "--all")
    made = run([str(TLS_SCRIPT), "--snapshot-metadata", "--group-snapshots",
                str(scratch / "csi-lvm-tls")])  # fmt: skip
    cluster.wait_images()
    cluster.apply(rendered.objects + [o for o in yaml.safe_load_all(made) if o])
    cluster.procs.start("snapshot-controller", [
        str(cluster.bin / "snapshot-controller"), f"--kubeconfig={cluster.admin}",
        *SNAPSHOT_CONTROLLER_ARGS,
    ])  # fmt: skip
    service_hosts(cluster, rendered)


def run_checks(cluster: Cluster, report: Any, stage: str) -> None:
    scratch = cluster.scratch
    lvm: Lvm | None = None
    vgs: list[LoopVolumeGroup] = []
    have_dm = Path("/sys/module/dm_thin_pool").exists()
    rendered = render(cluster.kubectl, {node: vg for node, (vg, _, _) in VOLUME_GROUPS.items()})
    pool = next(c for c in rendered.device_classes if c.get("thinPool"))["thinPool"]
    if have_dm:
        for name, size, pool_size in VOLUME_GROUPS.values():
            vgs.append(LoopVolumeGroup(scratch / "disks", name=name, size=size, pool=pool,
                                       pool_size=pool_size).create())  # fmt: skip
        lvm = Lvm([vg.name for vg in vgs])
    else:
        print(
            "         no device-mapper here: the plugin runs with its classes missing", flush=True
        )
    try:
        # While the kubelets come up (minutes under TCG).
        set_up_plugin(cluster, scratch, rendered)
        cluster.wait_ready(report)
        checks = Checks(cluster, report, lvm, rendered)
        registered = check_registered(checks)
        if stage == "all" and have_dm and registered:
            workload_checks(checks)
        if stage == "groups" and have_dm and registered:
            group_checks(checks, pvc, NAMESPACE, BUSYBOX_IMAGE)
        if stage == "encryption" and have_dm and registered:
            encryption_checks(checks, pvc, pod, example, NAMESPACE)
    finally:
        if vgs:
            # The tier's own clean-up, after the checks have judged the driver's.
            for name in list(checks_pods(cluster)):
                cluster.delete("pod", name, namespace=NAMESPACE, wait=False, missing_ok=True)
            for node in cluster.nodes:
                for point in reversed(node.mountpoints()):
                    node.run(["umount", "-l", point], check=False)
            for vg in vgs:
                vg.destroy()


def csi_mounts(node: Node) -> list[str]:
    """The node's mounts of CSI volumes: staging, publish and block device
    paths (the running pods' own tokens and Secrets are not the driver's)."""
    return [m for m in node.mountpoints()
            if "/kubernetes.io~csi/" in m or "/plugins/kubernetes.io/csi/" in m]  # fmt: skip


def checks_pods(cluster: Cluster) -> list[str]:
    try:
        return [p["metadata"]["name"] for p in cluster.get("pods", "-n", NAMESPACE)["items"]]
    except Failed:
        return []


def check_registered(checks: Checks) -> bool:
    cluster, rendered = checks.cluster, checks.rendered
    driver = rendered.driver_name
    key = f"topology.{driver}/node"
    classes = [sc["metadata"]["name"] for sc in rendered.all("StorageClass")
               if sc["provisioner"] == driver]  # fmt: skip

    def registered() -> str:
        took = {node.name: checks.wait_plugin_ready(node.name) for node in NODES}

        def entry(node: str) -> dict[str, Any] | None:
            drivers = cluster.get("csinode", node)["spec"].get("drivers") or []
            return next((d for d in drivers if d["name"] == driver), None)

        expected = sorted([key, ZONE_KEY, RACK_KEY])
        for node in NODES:

            def listed(name: str = node.name) -> bool:
                return entry(name) is not None

            wait_for(f"CSINode {node.name} lists {driver}", listed, 300)
            found = entry(node.name) or {}
            if sorted(found.get("topologyKeys") or []) != expected:
                raise Failed(f"CSINode {node.name} topology keys {found.get('topologyKeys')}, "
                             f"expected {expected}")  # fmt: skip
        ready = ", ".join(f"{node} after {seconds:.0f} s" for node, seconds in took.items())
        return f"topology keys {', '.join(expected)}; plugin pods ready: {ready}"

    def capacity() -> str:
        def objects() -> dict[tuple[str, str], str]:
            items = cluster.get("csistoragecapacities", "-A")["items"]
            found = {}
            for item in items:
                node = item.get("nodeTopology", {}).get("matchLabels", {}).get(key, "")
                found[(item["storageClassName"], node)] = item.get("capacity", "0")
            return found

        wanted = {(sc, node.name) for sc in classes for node in NODES}
        wait_for("CSIStorageCapacity for every class and node",
                 lambda: wanted <= set(objects()), 180)  # fmt: skip
        found = objects()
        return "; ".join(
            f"{node.name}: " + ", ".join(f"{sc} {found[(sc, node.name)]}" for sc in classes)
            for node in NODES
        )

    first = "1a nodes Ready, the plugin's pods running from its image, registered: CSINode"
    return checks.check(first, registered) & checks.check(
        "1b CSIStorageCapacity per StorageClass and node", capacity, needs=(first,)
    )


def workload_checks(checks: Checks) -> None:
    cluster, rendered = checks.cluster, checks.rendered
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
        if node_of != checks.pod_node("thin"):
            raise Failed(f"PV pinned to {node_of}, the pod runs on {checks.pod_node('thin')}")
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

    take_snapshot = checks.take_snapshot

    def snapshot() -> str:
        took = take_snapshot("snap", "thin")
        checks.exec("thin", "echo after-snapshot >> /data/file && sync")
        cluster.apply([
            pvc("restore", "1Gi", source={"apiGroup": "snapshot.storage.k8s.io",
                                          "kind": "VolumeSnapshot", "name": "snap"}),
            # On the snapshot's own node: a thin restore is instant there
            # (check 20 restores it on the other node, by copy).
            pod("restore", "restore", "true", node=checks.pv_node("thin")),
        ])  # fmt: skip
        checks.wait_running("restore")
        text = checks.exec("restore", "cat /data/file")
        if text != "snapshot-time\n":
            raise Failed(f"the restored file holds {text!r}")
        return f"ready after {took:.0f} s; the restore holds exactly the data at snapshot time"

    def clone() -> str:
        cluster.apply([
            pvc("clone", "1Gi", source={"kind": "PersistentVolumeClaim", "name": "thin"}),
            pod("clone", "clone", "true", node=checks.pv_node("thin")),
        ])  # fmt: skip
        checks.wait_running("clone")
        text = checks.exec("clone", "cat /data/file")
        if not text.startswith("snapshot-time\n"):
            raise Failed(f"the clone's file holds {text!r}")
        return "the clone holds the source's file"

    def moved() -> str:
        # Draining a node: the volume's snapshot restored on another node,
        # where the new pod runs; the holder's plugin sends it to the target's.
        held_by = checks.pv_node("thin")
        other = next(node.name for node in cluster.nodes if node.name != held_by)
        cluster.apply([
            pvc("moved", "1Gi", source={"apiGroup": "snapshot.storage.k8s.io",
                                        "kind": "VolumeSnapshot", "name": "snap"}),
            pod("moved", "moved", "true", node=other),
        ])  # fmt: skip
        checks.wait_running("moved")
        text = checks.exec("moved", "cat /data/file")
        if text != "snapshot-time\n":
            raise Failed(f"the volume restored on {other} holds {text!r}")
        if checks.pv_node("moved") != other:
            raise Failed(f"the restored PV is on {checks.pv_node('moved')}, not {other}")
        return (f"the snapshot of a volume on {held_by} restored on {other} by copy: the pod "
                "there reads the data of snapshot time")  # fmt: skip

    checks.check("4 VolumeSnapshot ready; restore to a second pod", snapshot, needs=(two,))
    checks.check("5 clone (dataSource PVC)", clone, needs=(two,))
    checks.check("20 a snapshot restored on the other node (moving a volume off its node)",
                 moved, needs=("4 VolumeSnapshot ready; restore to a second pod",))  # fmt: skip

    def status() -> str:
        node = checks.pv_node("thin")
        out = checks.admin(node, "status")
        wanted = [f"pvc={NAMESPACE}/thin", f"volumeSnapshot={NAMESPACE}/snap"]
        missing = [w for w in wanted if w not in out]
        if missing:
            raise Failed(f"csi-lvm status lacks {missing}: {out}")
        without = checks.admin(node, "status", api=False)
        if "PVC and VolumeSnapshot names not shown" not in without:
            raise Failed(f"without API access csi-lvm status did not say so: {without}")
        return (f"names {', '.join(wanted)} (in the plugin's pod on {node}); without API "
                "access it says so")  # fmt: skip

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
        cluster.merge("pvc", "thin", grow, namespace=NAMESPACE)

        def grown() -> bool:
            return size_kib() * 1024 > 1.5 * GiB

        try:
            took = wait_for("the pod sees the grown filesystem", grown, 240, interval=3)
        except Failed as late:
            # The kubelet's and the resizer's reasons are events on the PVC.
            said = "; ".join(checks.events_of("thin")) or "no event on the PVC"
            raise Failed(f"{late} (on {checks.node_of('thin').name}: {said})") from None
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
    cluster.delete("pod", "huge", namespace=NAMESPACE, wait=False, missing_ok=True)
    cluster.delete("pvc", "huge", namespace=NAMESPACE, wait=False, missing_ok=True)

    def plugin_restart() -> str:
        node = checks.node_of("thin")
        old = checks.plugin_ready(node.name)
        mounts = csi_mounts(node)
        cluster.delete("pod", old, namespace=checks.plugin_namespace, timeout=120)
        took = checks.wait_plugin_ready(node.name)
        text = checks.exec("thin", "cat /data/file")
        lost = set(mounts) - set(csi_mounts(node))
        if lost:
            raise Failed(f"mounts gone: {sorted(lost)}")
        cluster.apply([pvc("after-restart", "64Mi"),
                       pod("after-restart", "after-restart", "true", node=node.name)])  # fmt: skip
        checks.wait_running("after-restart")
        return (f"pod {old} on {node.name} deleted, its successor ready in {took:.0f} s; "
                f"{len(mounts)} mounts kept, the pod reads {text.split()[0]!r}, "
                "a new PVC provisioned")  # fmt: skip

    def kubelet_restart() -> str:
        node = checks.node_of("thin")
        cluster.restart_kubelet(node)
        # Exec reaches the pod once the new kubelet has read its pods again.
        text = ""

        def readable() -> bool:
            nonlocal text
            text = checks.exec("thin", "cat /data/file")
            return True

        wait_for("the pod's file through the restarted kubelet", readable, 120, interval=2)
        volume = checks.pv_of("fsgroup")["metadata"]["name"]
        fsgroup_node = checks.node_of("fsgroup")
        cluster.delete("pod", "fsgroup", namespace=NAMESPACE, timeout=180)
        left = [m for m in fsgroup_node.mountpoints() if volume in m]
        if left:
            raise Failed(f"mounts of {volume} left after the pod went: {left}")
        return (f"{node.name}'s kubelet: the pod still reads {text.split()[0]!r}; a deleted pod "
                f"unstaged cleanly on {fsgroup_node.name}")  # fmt: skip

    checks.check(
        "8a plugin restarted: mounts stay, new PVCs provision", plugin_restart, needs=(two,)
    )
    checks.check("8b kubelet restarted: volumes kept, clean unstage", kubelet_restart, needs=(two,))

    def other_node() -> str:
        before = set(checks.lvs())
        cluster.apply([{
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": PHANTOM_NODE,
                         "labels": {"kubernetes.io/hostname": PHANTOM_NODE}},
        }])  # fmt: skip
        cluster.apply([pvc("elsewhere", "64Mi"),
                       pod("elsewhere", "elsewhere", "true", node=PHANTOM_NODE)])  # fmt: skip
        time.sleep(20)
        claim = cluster.get("pvc", "elsewhere", "-n", NAMESPACE)
        selected = claim["metadata"].get("annotations", {}).get(SELECTED_NODE)
        # As if the scheduler had picked that node: only its provisioner may act.
        chosen = {"metadata": {"annotations": {SELECTED_NODE: PHANTOM_NODE}}}
        cluster.merge("pvc", "elsewhere", chosen, namespace=NAMESPACE)
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
    cluster.delete("pod", "elsewhere", namespace=NAMESPACE, wait=False, missing_ok=True)
    cluster.delete("pvc", "elsewhere", namespace=NAMESPACE, wait=False, missing_ok=True)
    cluster.delete("node", PHANTOM_NODE, wait=False, missing_ok=True)
    zone_checks(checks)
    lecture_checks(checks)
    several_nodes_checks(checks)
    group_checks(checks, pvc, NAMESPACE, BUSYBOX_IMAGE)
    encryption_checks(checks, pvc, pod, example, NAMESPACE)
    attribute_checks(checks, pod, example, NAMESPACE)

    def cleanup() -> str:
        cluster.delete("pod", every=True, namespace=NAMESPACE, timeout=240)
        cluster.delete("volumesnapshot", every=True, namespace=NAMESPACE, timeout=120)
        cluster.delete("pvc", every=True, namespace=NAMESPACE, timeout=120)
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
        mounted = {n.name: found for n in cluster.nodes if (found := csi_mounts(n))}
        if mounted:
            raise Failed(f"CSI volume mounts left under {KUBELET_DIR}: {mounted}")
        return (f"LVs as before ({', '.join(sorted(initial_lvs))}), no CSI volume mount under "
                f"{KUBELET_DIR} on any node")  # fmt: skip

    checks.check("9 everything deleted: LVs as before, no mounts left", cleanup)


def zoned_class(name: str, driver: str, key: str, value: str) -> dict[str, Any]:
    return {
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": name}, "provisioner": driver,
        "parameters": {"deviceClass": "thin"}, "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer",
        "allowedTopologies": [{"matchLabelExpressions": [{"key": key, "values": [value]}]}],
    }  # fmt: skip


def zone_checks(checks: Checks) -> None:
    """The lecture's topology story on the nodes' zone and rack labels: zone b
    is the first node's, c the second's; rack1 the first's, rack2 the second's."""
    cluster, driver = checks.cluster, checks.rendered.driver_name
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
        zones = sorted({n.labels[ZONE_KEY] for n in NODES})
        if set(checks.lvs()) - before:
            raise Failed(f"LVs made: {sorted(set(checks.lvs()) - before)}")
        # allowedTopologies cannot be edited: the class is made again, as the lecture does.
        cluster.delete("storageclass", "csi-lvm-zone")
        cluster.apply([zoned_class("csi-lvm-zone", driver, ZONE_KEY, NODE_A.labels[ZONE_KEY])])
        checks.wait_running("zoned")
        where = checks.pod_node("zoned")
        if where != NODE_A.name or checks.pv_node("zoned") != NODE_A.name:
            raise Failed(f"pod on {where}, PV on {checks.pv_node('zoned')}: not {NODE_A.name}")
        if affinity_keys("zoned") != {node_key}:
            raise Failed(f"PV affinity {checks.pv_of('zoned')['spec']['nodeAffinity']}")
        return (f"nodes in zones {', '.join(zones)}; cn-hangzhou-d: Pending, no LV, "
                f"'{wanted}'; class changed to {NODE_A.labels[ZONE_KEY]}: Running on "
                f"{where}, PV on {node_key}={NODE_A.name}")  # fmt: skip

    def doctor_line(node: str, label: str) -> str:
        out = checks.admin(node, "doctor", "--node-id", node)
        lines = [line for line in out.splitlines() if f"topology label {label}" in line]
        if len(lines) != 1:
            raise Failed(f"doctor said no single line of {label}: {out}")
        return lines[0]

    def rack() -> str:
        rack2 = NODE_B.labels[RACK_KEY]
        cluster.apply([
            zoned_class("csi-lvm-rack", driver, RACK_KEY, rack2),
            pvc("racked", "64Mi", "csi-lvm-rack"), pod("racked", "racked", "true"),
        ])  # fmt: skip
        checks.wait_running("racked")
        if checks.pv_node("racked") != NODE_B.name or checks.pod_node("racked") != NODE_B.name:
            raise Failed(f"PV on {checks.pv_node('racked')}, pod on "
                         f"{checks.pod_node('racked')}: not {NODE_B.name}")  # fmt: skip
        same = doctor_line(NODE_B.name, RACK_KEY)
        cluster.merge("node", NODE_B.name, {"metadata": {"labels": {RACK_KEY: "rack3"}}})
        try:
            moved = doctor_line(NODE_B.name, RACK_KEY)
        finally:
            cluster.merge("node", NODE_B.name, {"metadata": {"labels": {RACK_KEY: rack2}}})
        if not same.startswith("ok") or not moved.startswith("FAIL") or "restart" not in moved:
            raise Failed(f"doctor: {same!r}, then {moved!r}")
        return (f"{rack2}: Running on {NODE_B.name}, PV there; doctor in its plugin pod: "
                f"{same!r}, relabelled: {moved!r}")  # fmt: skip

    checks.check("12 the lecture's zones: cn-hangzhou-d Pending, cn-hangzhou-b Running on the "
                 "zone-b node", lecture)  # fmt: skip
    checks.check("13 a rack2 class puts its volume on the rack-2 node; doctor sees a relabel",
                 rack)  # fmt: skip
    for name in ("zoned", "racked"):
        cluster.delete("pod", name, namespace=NAMESPACE, wait=False, missing_ok=True)
    for name in ("csi-lvm-zone", "csi-lvm-rack"):
        cluster.delete("storageclass", name, wait=False, missing_ok=True)


EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"


def example(name: str) -> list[dict[str, Any]]:
    return [o for o in yaml.safe_load_all((EXAMPLES / name).read_text()) if o]


def lecture_checks(checks: Checks) -> None:
    """The lecture's static local PV beside csi-lvm, and a deleted snapshot."""
    cluster = checks.cluster

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
                term["matchExpressions"][0]["values"] = [NODE_A.name]
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
        if checks.pod_node("both-ways") != NODE_A.name or new_node != NODE_A.name:
            raise Failed(f"pod on {checks.pod_node('both-ways')}, new-way's LV on {new_node}")
        return (f"both claims Pending until the pod; the pod scheduled to {NODE_A.name} (the "
                f"static PV's node), old-way bound to {bound} ({NODE_A.name}'s directory), "
                f"new-way to an LV on {new_node}")  # fmt: skip

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
        cluster.delete("volumesnapshot", "short-lived", namespace=NAMESPACE, timeout=120)
        wait_for(f"VolumeSnapshotContent {name} gone",
                 lambda: not cluster.api.exists("volumesnapshotcontent", name), 120,
                 interval=2)  # fmt: skip
        wait_for("the snapshot's LV gone", lambda: not set(checks.lvs()) & made, 60, interval=2)
        return f"{name} and LV {made.pop()} removed with the VolumeSnapshot"

    checks.check(
        "15 the lecture's static local PV binds beside a csi-lvm class", static_beside_csi_lvm
    )
    checks.check("16 deleting a VolumeSnapshot removes its content and its LV", snapshot_deleted)

    def stateful_set() -> str:
        # The pods' spec (busybox), its volume from the template, one replica per node.
        spec = pod("web", "unused", 'test -f /data/id || echo "$POD_NAME" > /data/id')["spec"]
        del spec["volumes"]
        spec["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "web"}},
             "topologyKey": "kubernetes.io/hostname"}]}}  # fmt: skip
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
        placed = {name: (checks.pod_node(name), checks.pv_node(f"data-{name}"))
                  for name in ("web-0", "web-1")}  # fmt: skip
        if any(pod_on != pv_on for pod_on, pv_on in placed.values()) or len(
            {pod_on for pod_on, _ in placed.values()}
        ) != len(NODES):
            raise Failed(f"(pod node, PV node) per replica: {placed}")
        first = {name: checks.exec(name, "cat /data/id").strip() for name in ("web-0", "web-1")}
        volume = checks.pv_of("data-web-0")["metadata"]["name"]
        uid = cluster.get("pod", "web-0", "-n", NAMESPACE)["metadata"]["uid"]
        cluster.delete("pod", "web-0", namespace=NAMESPACE, timeout=120)
        wait_for("web-0 made again",
                 lambda: cluster.get("pod", "web-0", "-n", NAMESPACE)["metadata"]["uid"] != uid,
                 120, interval=2)  # fmt: skip
        checks.wait_running("web-0")
        again = checks.exec("web-0", "cat /data/id").strip()
        if first != {"web-0": "web-0", "web-1": "web-1"} or again != "web-0":
            raise Failed(f"ids {first}, after the restart {again!r}")
        if checks.pv_of("data-web-0")["metadata"]["name"] != volume:
            raise Failed("web-0 came back to another volume")
        if checks.pod_node("web-0") != placed["web-0"][0]:
            raise Failed(f"web-0 came back on {checks.pod_node('web-0')}, not {placed['web-0'][0]}")
        where = ", ".join(f"{name} on {on}" for name, (on, _) in placed.items())
        return (f"{where}, each with its LV on its node; web-0 deleted, made again on "
                f"{checks.pod_node('web-0')} with its volume {volume} and its data")  # fmt: skip

    checks.check("17 a StatefulSet's replicas keep their volumes and data", stateful_set)
    cluster.delete("statefulset", "web", namespace=NAMESPACE, timeout=120, missing_ok=True)
    # The static PV is Retain: nothing but its admin deletes it, after its claim.
    cluster.delete("pod", "both-ways", namespace=NAMESPACE, timeout=120, missing_ok=True)
    cluster.delete("pvc", "old-way", namespace=NAMESPACE, timeout=120, missing_ok=True)
    cluster.delete("pv", "local-pv-node-a-disk1", timeout=120, missing_ok=True)
    cluster.delete("storageclass", "local-storage", wait=False, missing_ok=True)


def several_nodes_checks(checks: Checks) -> None:
    """What only a cluster of several nodes shows: capacity choosing the node,
    and the view of a volume through the plugin pod's mount propagation."""
    cluster = checks.cluster
    default_class = next(
        sc["metadata"]["name"] for sc in checks.rendered.all("StorageClass")
        if sc["metadata"].get("annotations", {}).get(DEFAULT_CLASS) == "true"
    )  # fmt: skip
    node_key = f"topology.{checks.rendered.driver_name}/node"

    def capacities() -> dict[str, int]:
        found = {}
        for item in cluster.get("csistoragecapacities", "-A")["items"]:
            node = item.get("nodeTopology", {}).get("matchLabels", {}).get(node_key, "")
            if item["storageClassName"] == default_class:
                found[node] = quantity(item.get("capacity", "0"))
        return found

    def capacity_decides() -> str:
        seen = capacities()
        small, large = sorted(seen, key=seen.__getitem__)
        if seen[large] - seen[small] < 256 * MiB:
            raise Failed(f"the nodes' capacities are too close to tell apart: {seen}")
        size = (seen[small] + seen[large]) // 2 // MiB
        cluster.apply([pvc("roomy", f"{size}Mi"), pod("roomy", "roomy", "true")])
        checks.wait_running("roomy")
        if checks.pv_node("roomy") != large or checks.pod_node("roomy") != large:
            raise Failed(f"a {size} MiB volume went to {checks.pv_node('roomy')}; "
                         f"capacities {seen}")  # fmt: skip
        return (f"{default_class}: {small} has {seen[small] // MiB} MiB, {large} "
                f"{seen[large] // MiB} MiB; a {size} MiB PVC landed on {large}")  # fmt: skip

    def seen_from_the_node() -> str:
        checks.wait_running("thin")
        text = f"written-in-the-pod-{time.monotonic_ns()}"
        checks.exec("thin", f"echo {text} > /data/view && sync")
        node = checks.node_of("thin")
        uid = cluster.get("pod", "thin", "-n", NAMESPACE)["metadata"]["uid"]
        volume = checks.pv_of("thin")["metadata"]["name"]
        path = f"{KUBELET_DIR}/pods/{uid}/volumes/kubernetes.io~csi/{volume}/mount"
        read = node.run(["cat", f"{path}/view"]).strip()
        device = node.run(["findmnt", "-n", "-o", "MAJ:MIN", "--mountpoint", path]).strip()
        lv = checks.lvm.by_device(device) if checks.lvm else ""
        vg = VOLUME_GROUPS[node.name][0]
        if read != text or not lv.startswith(f"{vg}/"):
            raise Failed(f"on {node.name}: {path} reads {read!r}, mounted from {device} "
                         f"({lv or 'no LV'}); the pod wrote {text!r}")  # fmt: skip
        return (f"on {node.name}, the publish path the plugin's pod mounted holds the pod's "
                f"file; its device {device} is LV {lv}")  # fmt: skip

    checks.check("18 capacity decides: a PVC too large for one node lands on the other",
                 capacity_decides)  # fmt: skip
    cluster.delete("pod", "roomy", namespace=NAMESPACE, wait=False, missing_ok=True)
    checks.check("19 a pod's volume seen on its node through the plugin pod's mount propagation",
                 seen_from_the_node)  # fmt: skip


def quantity(text: str) -> int:
    """A Kubernetes quantity in bytes (the binary and decimal suffixes)."""
    units = {"Ki": 1024, "Mi": MiB, "Gi": GiB, "Ti": 1024 * GiB,
             "k": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}  # fmt: skip
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)
