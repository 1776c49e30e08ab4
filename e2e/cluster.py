"""A Kubernetes cluster of two nodes in one VM: its PKI, etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, and per node a containerd, a kubelet
and a kube-proxy.

Every file lives in one scratch directory. The first node is the VM itself:
its kubelet keeps the usual root (/var/lib/kubelet), which ``writable_var_lib``
makes writable first (the VM's root filesystem is the host's, read-only), and
its node IP, NODE_IP, is an address on ``lo``. The second node has a network
namespace and a mount namespace of its own: a veth pair joins it to the
first (both ends inside the VM; no device leaves it), its /var/lib/kubelet
and /run/containerd are its own, and its processes run through nsenter. Both
nodes share the kernel, hence /dev, device-mapper and LVM's view of every
volume group: each node's device classes name a volume group of its own.
Pods get addresses on a CNI bridge per node, routed between the nodes; each
node's kube-proxy makes the ``kubernetes`` Service (and the others) reach
their endpoints, as in any cluster.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import textwrap
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml
from lightkube.core.exceptions import ApiError

from e2e.api import DEFAULT_NAMESPACE, Api
from e2e.images import busybox_image
from e2e.procs import Failed, Processes, run, wait_for

# The lecture's topology domains, wider than the node: each kubelet labels its
# node with them when it registers, and the plugin reports them (--topology-labels).
ZONE_KEY, RACK_KEY = "topology.kubernetes.io/zone", "example.com/rack"
SERVICE_CIDR = "10.96.0.0/24"
SERVICE_IP = "10.96.0.1"
CLUSTER_CIDR = "10.244.0.0/16"
APISERVER = "https://127.0.0.1:6443"
KUBELET_PORT = 10250
KUBELET_DIR = Path("/var/lib/kubelet")
CNI_BIN = Path("/usr/lib/cni")
# The first node's end of the link to the second.
LINK_IP = "10.201.0.1"
UPLINK = "e2e-uplink"


@dataclass(frozen=True)
class NodeSpec:
    name: str
    ip: str
    labels: dict[str, str]
    pod_cidr: str
    # Network and mount namespaces of its own (the first node is the VM's).
    isolated: bool


NODES = (
    NodeSpec("e2e-node", "10.200.0.1",
             {ZONE_KEY: "cn-hangzhou-b", RACK_KEY: "rack1"}, "10.244.0.0/24", False),
    NodeSpec("e2e-node2", "10.201.0.2",
             {ZONE_KEY: "cn-hangzhou-c", RACK_KEY: "rack2"}, "10.244.1.0/24", True),
)  # fmt: skip
NODE_NAME, NODE_IP, NODE_LABELS = NODES[0].name, NODES[0].ip, NODES[0].labels
# Where components that run in a node's namespaces reach the apiserver.
API_ON_NODES = f"https://{NODE_IP}:6443"
# The binaries of one Kubernetes release that the cluster runs.
KUBE_BINARIES = (
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kubectl",
    "kube-proxy",
)
# Debian's programs the cluster runs, with their packages.
DEBIAN_PROGRAMS = {
    "etcd": "etcd-server",
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "openssl": "openssl",
    "iptables": "iptables",
    "nsenter": "util-linux",
}


def missing_debian_programs() -> list[str]:
    missing = [
        f"{program} ({package})"
        for program, package in DEBIAN_PROGRAMS.items()
        if shutil.which(program) is None
    ]
    if not (CNI_BIN / "bridge").exists():
        missing.append(f"{CNI_BIN}/bridge (containernetworking-plugins)")
    return missing


def writable_var_lib(scratch: Path) -> None:
    """An overlay over /var/lib whose changes land in ``scratch`` (this mount
    namespace only: the VM's, or the one the host-side trial runs in)."""
    upper, work = scratch / "var-lib" / "upper", scratch / "var-lib" / "work"
    upper.mkdir(parents=True)
    work.mkdir(parents=True)
    options = f"lowerdir=/var/lib,upperdir={upper},workdir={work}"
    # xino=off: the VM's root is 9p, whose inode numbers overlayfs cannot extend.
    for extra in ("xino=off,", ""):
        mount = ["mount", "-t", "overlay", "e2e-var-lib", "-o", extra + options, "/var/lib"]
        done = subprocess.run(mount, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            break
    else:
        # Nothing under the host's /var/lib is needed here: an empty tmpfs will do.
        run(["mount", "-t", "tmpfs", "-o", "mode=0755", "e2e-var-lib", "/var/lib"])
    KUBELET_DIR.mkdir(exist_ok=True)


CGROUP = Path("/sys/fs/cgroup")
CGROUP_CONTROLLERS = ("cpu", "cpuset", "memory", "pids", "io", "hugetlb")


def cgroup_controllers(group: Path = CGROUP) -> None:
    """On cgroup v2 (the VM), the controllers the kubelet's cgroups need, for
    the children of ``group``."""
    control = group / "cgroup.subtree_control"
    if not control.exists():
        return
    available = (group / "cgroup.controllers").read_text().split()
    wanted = [c for c in CGROUP_CONTROLLERS if c in available]
    control.write_text(" ".join(f"+{c}" for c in wanted))


def loopback_addresses() -> None:
    run(["ip", "link", "set", "lo", "up"])
    addresses = run(["ip", "-o", "addr", "show", "dev", "lo"])
    if f" {NODE_IP}/" not in addresses:
        run(["ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo"])
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    # A route for the Services' addresses, as a node's default route gives
    # them: the node's own clients reach a Service through kube-proxy's
    # rules, which rewrite the address only after the route is chosen. A
    # dummy device: nothing sent to it leaves the VM.
    if UPLINK not in run(["ip", "-o", "link", "show"]):
        run(["ip", "link", "add", UPLINK, "type", "dummy"])
        run(["ip", "link", "set", UPLINK, "up"])
        run(["ip", "route", "add", SERVICE_CIDR, "dev", UPLINK])
    # What kube-proxy's iptables rules use; loaded before it starts.
    for module in ("nf_conntrack", "veth", "bridge"):
        run(["modprobe", module], check=False)


class Pki:
    """A CA and the certificates the components use, EC P-256 (fast under TCG)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = self.dir / "ca.crt"
        self.ca_key = self.dir / "ca.key"

    def _key(self, path: Path) -> None:
        run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", str(path)])  # fmt: skip

    def create_ca(self) -> None:
        self._key(self.ca_key)
        run(["openssl", "req", "-x509", "-new", "-key", str(self.ca_key), "-out", str(self.ca),
             "-days", "2", "-subj", "/CN=csi-lvm-e2e-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"])  # fmt: skip

    def issue(self, name: str, subject: str, sans: list[str] | None = None) -> tuple[Path, Path]:
        key, csr, crt = (self.dir / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
        ext = self.dir / f"{name}.ext"
        lines = [
            "basicConstraints=CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "extendedKeyUsage=serverAuth,clientAuth",
        ]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        self._key(key)
        run(["openssl", "req", "-new", "-key", str(key), "-out", str(csr), "-subj", subject])
        run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(self.ca),
             "-CAkey", str(self.ca_key), "-CAcreateserial", "-out", str(crt), "-days", "2",
             "-extfile", str(ext)])  # fmt: skip
        return crt, key

    def service_account_key(self) -> tuple[Path, Path]:
        """The signing key (SEC1, what every component reads) and its public half."""
        key, public = self.dir / "service-account.key", self.dir / "service-account.pub"
        run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
             "-out", str(key)])  # fmt: skip
        run(["openssl", "ec", "-in", str(key), "-pubout", "-out", str(public)])
        return key, public


def kubeconfig(path: Path, ca: Path, *, cert: Path | None = None, key: Path | None = None,
               token: str | None = None, server: str = APISERVER) -> Path:  # fmt: skip
    user: dict[str, str] = {}
    if cert and key:
        user = {"client-certificate": str(cert), "client-key": str(key)}
    if token:
        user = {"token": token}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": server,
                                                  "certificate-authority": str(ca)}}],
        "users": [{"name": "e2e", "user": user}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e"}}],
        "current-context": "e2e",
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


def accepts(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port is accepted."""
    with socket.create_connection((host, port), timeout=2):
        return True


@dataclass
class Node:
    """One node: its namespaces, containerd, kubelet and kube-proxy."""

    spec: NodeSpec
    bin: Path
    scratch: Path
    procs: Processes
    kubeconfigs: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dir = self.scratch / "nodes" / self.spec.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.containerd_socket = self.dir / "containerd" / "containerd.sock"
        self.netns = Path("/run/netns") / self.spec.name
        self.mntns = self.scratch / "namespaces" / f"{self.spec.name}.mnt"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def enter(self) -> list[str]:
        """The prefix that runs a command in this node's namespaces."""
        if not self.spec.isolated:
            return []
        return ["nsenter", f"--net={self.netns}", f"--mount={self.mntns}", "--"]

    def run(self, args: list[str], **kwargs: Any) -> str:
        return run([*self.enter, *args], **kwargs)

    def process(self, component: str) -> str:
        """The name of this node's ``component`` among the tier's processes."""
        return f"{component}-{self.name}"

    # ---- namespaces ----------------------------------------------------------
    def make_namespaces(self) -> None:
        """The second node's network (a veth to the first, routes to its pods)
        and its mount namespace (private, with its own kubelet directory)."""
        if not self.spec.isolated:
            return
        name, peer = self.spec.name, f"veth-{self.spec.name}"[:15]
        run(["ip", "netns", "add", name])
        run(["ip", "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", name])
        run(["ip", "addr", "add", f"{LINK_IP}/24", "dev", peer])
        run(["ip", "link", "set", peer, "up"])
        inside = ["ip", "-n", name]
        run([*inside, "link", "set", "lo", "up"])
        run([*inside, "addr", "add", f"{self.spec.ip}/24", "dev", "eth0"])
        run([*inside, "link", "set", "eth0", "up"])
        run([*inside, "route", "add", "default", "via", LINK_IP])
        run(["ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        run(["ip", "route", "add", self.spec.pod_cidr, "via", self.spec.ip])
        # A mount namespace kept by a bind mount, which must sit on a private mount.
        holder = self.mntns.parent
        holder.mkdir(parents=True, exist_ok=True)
        if not any(line.split()[4] == str(holder)
                   for line in Path("/proc/self/mountinfo").read_text().splitlines()):  # fmt: skip
            run(["mount", "--bind", str(holder), str(holder)])
            run(["mount", "--make-private", str(holder)])
        self.mntns.touch()
        run(["unshare", f"--mount={self.mntns}", "--propagation", "private", "true"])
        kubelet_dir = self.dir / "kubelet"
        kubelet_dir.mkdir()
        Path("/run/containerd").mkdir(exist_ok=True)
        self.run(["mount", "--bind", str(kubelet_dir), str(KUBELET_DIR)])
        # Shared within this namespace (a peer group of its own), as a node's
        # kubelet directory must be for Bidirectional mount propagation.
        self.run(["mount", "--make-rshared", str(KUBELET_DIR)])
        self.run(["mount", "-t", "tmpfs", "-o", "mode=0711", "e2e-run-containerd",
                  "/run/containerd"])  # fmt: skip
        # Its pods' cgroups under a group of their own (the kubelet's cgroupRoot).
        group = CGROUP / self.spec.name
        if (CGROUP / "cgroup.subtree_control").exists():
            group.mkdir(exist_ok=True)
            cgroup_controllers(group)

    def mountpoints(self) -> list[str]:
        """Mount points under the kubelet's directory, as this node sees them
        (the mountinfo of its containerd, which lives in its mount namespace)."""
        containerd = self.procs.get(self.process("containerd")).popen
        source = f"/proc/{containerd.pid}/mountinfo" if containerd else "/proc/self/mountinfo"
        points = [line.split()[4] for line in Path(source).read_text().splitlines()]
        return [p for p in points if p.startswith(f"{KUBELET_DIR}/")]

    # ---- containerd ----------------------------------------------------------
    def start_containerd(self) -> None:
        base = self.dir / "containerd"
        cni_conf = self.dir / "cni" / "net.d"
        cni_conf.mkdir(parents=True)
        # A bridge per node for its pods; host-local's leases per node.
        network = f"e2e-{self.spec.name}"
        (cni_conf / "10-e2e.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": network,
            "plugins": [
                {"type": "bridge", "bridge": "e2e0", "isGateway": True, "ipMasq": False,
                 "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": self.spec.pod_cidr}]],
                          "routes": [{"dst": "0.0.0.0/0"}],
                          "dataDir": str(self.dir / "cni" / "leases")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
                {"type": "loopback"},
            ],
        }, indent=1))  # fmt: skip
        config = base / "config.toml"
        base.mkdir(exist_ok=True)
        config.write_text(textwrap.dedent(f"""\
            version = 2
            root = "{base}/root"
            state = "{base}/state"
            disabled_plugins = ["io.containerd.snapshotter.v1.btrfs",
              "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
              "io.containerd.snapshotter.v1.aufs", "io.containerd.internal.v1.tracing"]
            [grpc]
              address = "{self.containerd_socket}"
            [ttrpc]
              address = "{base}/containerd.sock.ttrpc"
            [plugins."io.containerd.grpc.v1.cri"]
              sandbox_image = "{PAUSE_IMAGE}"
              enable_unprivileged_ports = false
              # Where this process may not lower oom_score_adj (the host-side
              # trial), pods keep containerd's own instead of failing.
              restrict_oom_score_adj = true
              [plugins."io.containerd.grpc.v1.cri".containerd]
                snapshotter = "overlayfs"
                default_runtime_name = "runc"
                [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
                  runtime_type = "io.containerd.runc.v2"
                  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
                    SystemdCgroup = false
              [plugins."io.containerd.grpc.v1.cri".cni]
                bin_dir = "{CNI_BIN}"
                conf_dir = "{cni_conf}"
            """))  # fmt: skip
        self.procs.start(self.process("containerd"),
                         [*self.enter, "containerd", "--config", str(config)])  # fmt: skip
        wait_for(f"containerd of {self.name}", self.containerd_socket.exists, 60, interval=0.5)

    def kill_shims(self) -> None:
        """containerd's shims outlive it (they run in sessions of their own):
        end them and the pod processes under them."""
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            if str(self.containerd_socket) not in cmdline:
                continue
            with contextlib.suppress(psutil.Error):
                for child in process.children(recursive=True):
                    child.kill()
                process.kill()

    def ctr(self, *args: str, timeout: float = 600) -> str:
        return run(["ctr", "--address", str(self.containerd_socket), "-n", "k8s.io", *args],
                   timeout=timeout)  # fmt: skip

    def import_images(self, tarballs: list[Path]) -> dict[str, float]:
        """Seconds each tarball took, by its name."""
        took = {}
        for tarball in tarballs:
            start = time.monotonic()
            self.ctr("images", "import", str(tarball))
            took[tarball.name] = time.monotonic() - start
        return took

    # ---- kubelet and kube-proxy ------------------------------------------------
    def start_kubelet(self, ca: Path, again: bool = False) -> None:
        config = self.dir / "kubelet.yaml"
        # Beside the tier's own logs, where the host sees them during the run.
        logs = self.procs.logs / f"pods-{self.name}"
        logs.mkdir(parents=True, exist_ok=again)
        zero = "0%"
        settings: dict[str, Any] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(ca)}},
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "failSwapOn": False,
            "failCgroupV1": False,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "podLogsDir": str(logs),
            "resolvConf": "",
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": zero,
                             "imagefs.available": zero, "nodefs.inodesFree": zero,
                             "imagefs.inodesFree": zero},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "syncFrequency": "10s",
            "fileCheckFrequency": "10s",
            "nodeStatusReportFrequency": "20s",
            "maxPods": 50,
        }  # fmt: skip
        if self.spec.isolated:
            settings["cgroupRoot"] = f"/{self.spec.name}"
        config.write_text(yaml.safe_dump(settings))
        self.procs.start(self.process("kubelet"), [
            *self.enter, str(self.bin / "kubelet"),
            f"--config={config}",
            f"--kubeconfig={self.kubeconfigs['kubelet']}",
            f"--hostname-override={self.name}",
            f"--node-ip={self.spec.ip}",
            "--node-labels=" + ",".join(f"{k}={v}" for k, v in self.spec.labels.items()),
            "--v=2",
        ])  # fmt: skip

    def start_kube_proxy(self) -> None:
        config = self.dir / "kube-proxy.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.kubeconfigs["kube-proxy"])},
            "hostnameOverride": self.name,
            "mode": "iptables",
            "clusterCIDR": CLUSTER_CIDR,
            # No conntrack sysctls (0: leave as is): the VM's defaults do.
            "conntrack": {"maxPerCore": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s"},
            "metricsBindAddress": "127.0.0.1:10249",
            "healthzBindAddress": "127.0.0.1:10256",
        }))  # fmt: skip
        self.procs.start(self.process("kube-proxy"), [
            *self.enter, str(self.bin / "kube-proxy"), f"--config={config}", "--v=1",
        ])  # fmt: skip


@dataclass
class Cluster:
    bin: Path
    scratch: Path
    procs: Processes

    def __post_init__(self) -> None:
        self.pki = Pki(self.scratch / "pki")
        self.admin = self.scratch / "admin.kubeconfig"
        self.nodes = [Node(spec, self.bin, self.scratch, self.procs) for spec in NODES]
        self.importing: list[Future[dict[str, float]]] = []
        self.kubectl_runs, self.kubectl_seconds = 0, 0.0

    def node(self, name: str) -> Node:
        found = next((n for n in self.nodes if n.name == name), None)
        if found is None:
            raise Failed(f"no node {name} in the tier")
        return found

    # ---- the API ---------------------------------------------------------------
    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True,
                timeout: float = 120) -> str:  # fmt: skip
        """For what needs kubectl itself (kustomize, the CRDs' apply -k and
        wait, /readyz); the rest goes through ``api`` (seconds less per call
        under TCG)."""
        start = time.monotonic()
        done = subprocess.run(
            [str(self.bin / "kubectl"), f"--kubeconfig={self.admin}", *args],
            input=stdin, capture_output=True, text=True, check=False, timeout=timeout,
        )  # fmt: skip
        self.kubectl_runs += 1
        self.kubectl_seconds += time.monotonic() - start
        if check and done.returncode != 0:
            raise Failed(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def get(self, kind: str, *args: str) -> Any:
        """What ``kubectl get -o json KIND ARGS`` prints, for the arguments the
        checks use: a name, ``-n NAMESPACE``, ``-A``, ``-l SELECTOR`` and
        ``--field-selector=SELECTOR``."""
        name: str | None = None
        namespace: str | None = DEFAULT_NAMESPACE
        labels: str | None = None
        fields: str | None = None
        rest = list(args)
        while rest:
            arg = rest.pop(0)
            if arg == "-n":
                namespace = rest.pop(0)
            elif arg == "-A":
                namespace = None
            elif arg == "-l":
                labels = rest.pop(0)
            elif arg.startswith("--field-selector="):
                fields = arg.partition("=")[2]
            elif arg.startswith("-") or name is not None:
                raise ValueError(f"get {kind}: unexpected argument {arg!r}")
            else:
                name = arg
        try:
            return self.api.get(kind, name, namespace=namespace, labels=labels, fields=fields)
        except ApiError as error:
            raise Failed(str(error)) from None

    def apply(self, objects: list[dict[str, Any]]) -> None:
        for manifest in objects:
            try:
                self.api.apply(manifest)
            except ApiError as error:
                raise Failed(str(error)) from None

    def delete(self, kind: str, *names: str, namespace: str = DEFAULT_NAMESPACE,
               every: bool = False, wait: bool = True, timeout: float = 120,
               missing_ok: bool = False) -> None:  # fmt: skip
        """kubectl delete: the named objects (or ``every`` one of the kind in
        the namespace), then, with ``wait``, until each object asked for is
        gone: by its UID, as a controller may make one of the same name again
        at once (a StatefulSet's pod)."""
        try:
            if every:
                listed = self.api.get(kind, namespace=namespace)["items"]
                found = {o["metadata"]["name"]: o["metadata"]["uid"] for o in listed}
            else:
                found = {name: self.api.uid(kind, name, namespace) for name in names}
            deleted = {}
            for name, uid in found.items():
                if uid is None or not self.api.delete(kind, name, namespace):
                    if not missing_ok:
                        raise Failed(f"delete {kind} {name}: not found")
                    continue
                deleted[name] = uid
            if wait:
                wait_for(f"{kind} {', '.join(found)} deleted",
                         lambda: all(self.api.uid(kind, n, namespace) != uid
                                     for n, uid in deleted.items()),
                         timeout, interval=1)  # fmt: skip
        except ApiError as error:
            if not missing_ok:
                raise Failed(str(error)) from None

    def merge(self, kind: str, name: str, patch: dict[str, Any],
              namespace: str = DEFAULT_NAMESPACE) -> None:  # fmt: skip
        """A JSON merge patch (kubectl patch --type=merge, label, annotate)."""
        try:
            self.api.merge(kind, name, patch, namespace)
        except ApiError as error:
            raise Failed(str(error)) from None

    def api_summary(self) -> str:
        return (f"API calls {self.api.calls} in {self.api.seconds:.0f} s; "
                f"kubectl runs {self.kubectl_runs} in {self.kubectl_seconds:.0f} s")  # fmt: skip

    # ---- bring-up ------------------------------------------------------------
    def make_pki(self) -> None:
        pki = self.pki
        pki.create_ca()
        self.apiserver_cert = pki.issue(
            "apiserver", "/CN=kube-apiserver",
            ["IP:127.0.0.1", f"IP:{NODE_IP}", f"IP:{SERVICE_IP}", "DNS:localhost",
             "DNS:kubernetes", "DNS:kubernetes.default", "DNS:kubernetes.default.svc"],
        )  # fmt: skip
        self.sa_key, self.sa_public = pki.service_account_key()
        users = {
            "admin": "/O=system:masters/CN=e2e-admin",
            "controller-manager": "/CN=system:kube-controller-manager",
            "scheduler": "/CN=system:kube-scheduler",
        }
        self.kubeconfigs: dict[str, Path] = {}
        for name, subject in users.items():
            cert, key = pki.issue(name, subject)
            self.kubeconfigs[name] = kubeconfig(
                self.scratch / f"{name}.kubeconfig", pki.ca, cert=cert, key=key
            )
        self.admin = self.kubeconfigs["admin"]
        self.api = Api(self.admin, APISERVER,
                       (pki.ca, pki.dir / "admin.crt", pki.dir / "admin.key"))  # fmt: skip
        # kube-proxy's user is the one the default RBAC binds to system:node-proxier.
        proxy_cert, proxy_key = pki.issue("kube-proxy", "/CN=system:kube-proxy")
        for node in self.nodes:
            cert, key = pki.issue(f"kubelet-{node.name}",
                                  f"/O=system:nodes/CN=system:node:{node.name}")  # fmt: skip
            node.kubeconfigs = {
                "kubelet": kubeconfig(node.dir / "kubelet.kubeconfig", pki.ca, cert=cert,
                                      key=key, server=API_ON_NODES),
                "kube-proxy": kubeconfig(node.dir / "kube-proxy.kubeconfig", pki.ca,
                                         cert=proxy_cert, key=proxy_key, server=API_ON_NODES),
            }  # fmt: skip
        self.kubelet_client = pki.issue(
            "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client"
        )

    def start_etcd(self) -> None:
        data = self.scratch / "etcd"
        self.procs.start("etcd", [
            "etcd", "--name", "e2e", "--data-dir", str(data),
            "--listen-client-urls", "http://127.0.0.1:2379",
            "--advertise-client-urls", "http://127.0.0.1:2379",
            "--listen-peer-urls", "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
            "--initial-cluster", "e2e=http://127.0.0.1:2380",
            "--unsafe-no-fsync",
        ])  # fmt: skip

    def start_apiserver(self) -> None:
        cert, key = self.apiserver_cert
        kcert, kkey = self.kubelet_client
        self.procs.start("kube-apiserver", [
            str(self.bin / "kube-apiserver"),
            "--etcd-servers=http://127.0.0.1:2379",
            # Every address of the VM: loopback, the first node's, the link's.
            "--bind-address=0.0.0.0", "--secure-port=6443",
            f"--advertise-address={NODE_IP}",
            f"--tls-cert-file={cert}", f"--tls-private-key-file={key}",
            f"--client-ca-file={self.pki.ca}",
            f"--kubelet-client-certificate={kcert}", f"--kubelet-client-key={kkey}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--service-account-key-file={self.sa_public}",
            f"--service-account-signing-key-file={self.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ])  # fmt: skip

    def wait_apiserver(self, timeout: float) -> float:
        def ready() -> bool:
            self.procs.get("kube-apiserver").check_alive()
            return self.kubectl("get", "--raw", "/readyz", check=False, timeout=20) == "ok"

        return wait_for("kube-apiserver /readyz", ready, timeout, interval=2)

    def start_controllers(self) -> None:
        self.procs.start("kube-controller-manager", [
            str(self.bin / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfigs['controller-manager']}",
            f"--authentication-kubeconfig={self.kubeconfigs['controller-manager']}",
            f"--authorization-kubeconfig={self.kubeconfigs['controller-manager']}",
            "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=10257",
            f"--service-account-private-key-file={self.sa_key}",
            f"--root-ca-file={self.pki.ca}",
            "--use-service-account-credentials=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--v=1",
        ])  # fmt: skip
        self.procs.start("kube-scheduler", [
            str(self.bin / "kube-scheduler"),
            f"--kubeconfig={self.kubeconfigs['scheduler']}",
            f"--authentication-kubeconfig={self.kubeconfigs['scheduler']}",
            f"--authorization-kubeconfig={self.kubeconfigs['scheduler']}",
            "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=10259",
            "--v=1",
        ])  # fmt: skip

    def kill_shims(self) -> None:
        for node in self.nodes:
            node.kill_shims()

    def node_ready(self, name: str) -> bool:
        node = self.get("node", name)
        conditions = {c["type"]: c["status"] for c in node["status"].get("conditions", [])}
        return conditions.get("Ready") == "True"

    def wait_node_ready(self, node: Node, timeout: float) -> float:
        def ready() -> bool:
            self.procs.get(node.process("kubelet")).check_alive()
            self.procs.get(node.process("kube-proxy")).check_alive()
            return self.node_ready(node.name)

        return wait_for(f"node {node.name} Ready", ready, timeout, interval=2)

    def restart_kubelet(self, node: Node, timeout: float = 180) -> None:
        self.procs.get(node.process("kubelet")).stop()
        node.start_kubelet(self.pki.ca, again=True)
        # The node's Ready condition stays the old kubelet's until the node
        # controller's grace runs out: wait for the new kubelet's own server.
        wait_for(f"{node.name}'s new kubelet serving on port {KUBELET_PORT}",
                 lambda: accepts(node.spec.ip, KUBELET_PORT), timeout)  # fmt: skip
        self.wait_node_ready(node, timeout)

    def wait_service_account(self, namespace: str, timeout: float) -> None:
        """The namespace's default ServiceAccount: pods are refused before it."""
        wait_for(
            f"serviceaccount default in {namespace}",
            lambda: self.api.exists("serviceaccount", "default", namespace),
            timeout,
        )  # fmt: skip

    def start(self, report: Any, images: list[Path], timeout: float = 600) -> None:
        """Everything up to started kubelets; ``wait_ready`` waits for the
        nodes. ``images``: tarballs every node's containerd imports, in the
        background while the kubelets come up (``wait_images`` waits for them)."""
        self.started_at = time.monotonic()
        self.make_pki()
        self.start_etcd()
        self.start_apiserver()
        made = self.scratch / "images"
        # Every pod's sandbox needs the pause image: it is there before a kubelet.
        base = [
            busybox_image(made / "pause.tar", PAUSE_IMAGE, ["/bin/sleep", "infinity"]),
            busybox_image(made / "busybox.tar", BUSYBOX_IMAGE, ["/bin/sh"]),
        ]
        for node in self.nodes:
            node.make_namespaces()
            node.start_containerd()
        took = self.wait_apiserver(timeout)
        report.passed("control plane: kube-apiserver ready", f"{took:.0f} s")
        self.start_controllers()
        for node in self.nodes:
            node.import_images(base)
            node.start_kubelet(self.pki.ca)
            node.start_kube_proxy()
        # Both nodes at once: unpacking the plugin's image is most of it.
        self.import_started = time.monotonic()
        pool = ThreadPoolExecutor(len(self.nodes), thread_name_prefix="import")
        self.importing = [pool.submit(node.import_images, images) for node in self.nodes]
        pool.shutdown(wait=False)

    def wait_images(self) -> None:
        """The workloads' images in every node's containerd. Nothing may
        ask for them before: a kubelet would try to pull them, fail (no
        network), and back off for minutes."""
        took = [importing.result() for importing in self.importing]
        print(f"         the workloads' images imported into each node "
              f"{time.monotonic() - self.import_started:.0f} s after the kubelets started",
              flush=True)  # fmt: skip
        for node, seconds in zip(self.nodes, took, strict=True):
            each = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
            print(f"         {node.name}: {each}", flush=True)

    def wait_ready(self, report: Any, timeout: float = 600) -> None:
        for node in self.nodes:
            self.wait_node_ready(node, timeout)
            took = time.monotonic() - self.started_at
            report.passed(f"node {node.name} Ready", f"{took:.0f} s from the start")
        self.wait_service_account("default", timeout)


PAUSE_IMAGE = "e2e.csi-lvm.io/pause:1"
BUSYBOX_IMAGE = "e2e.csi-lvm.io/busybox:1"
