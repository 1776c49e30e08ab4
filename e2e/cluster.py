"""A one-node Kubernetes cluster on loopback: its PKI, etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, containerd and a kubelet.

Every file lives in one scratch directory; the kubelet keeps its usual root
(/var/lib/kubelet), which ``writable_var_lib`` makes writable first (the VM's
root filesystem is the host's, read-only). The apiserver listens on 127.0.0.1
and advertises NODE_IP, an address on ``lo``: an address of the node that is
not loopback, which the kubelet (node IP) and the endpoints of the
``kubernetes`` Service both need. No network device is involved.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from e2e.images import busybox_image
from e2e.procs import Failed, Processes, run, wait_for

NODE_NAME = "e2e-node"
NODE_IP = "10.200.0.1"
# The lecture's topology domains, wider than the node: the kubelet labels its
# node with them when it registers, and the plugin reports them (--topology-labels).
ZONE_KEY, RACK_KEY = "topology.kubernetes.io/zone", "example.com/rack"
NODE_LABELS = {ZONE_KEY: "cn-hangzhou-b", RACK_KEY: "rack1"}
SERVICE_CIDR = "10.96.0.0/24"
SERVICE_IP = "10.96.0.1"
POD_CIDR = "10.244.0.0/24"
APISERVER = "https://127.0.0.1:6443"
KUBELET_DIR = Path("/var/lib/kubelet")
CNI_BIN = Path("/usr/lib/cni")
# The binaries of one Kubernetes release that the cluster runs.
KUBE_BINARIES = (
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kubectl",
)
# Debian's programs the cluster runs, with their packages.
DEBIAN_PROGRAMS = {
    "etcd": "etcd-server",
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "openssl": "openssl",
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


def cgroup_controllers() -> None:
    """On cgroup v2 (the VM), the controllers the kubelet's cgroups need."""
    control = Path("/sys/fs/cgroup/cgroup.subtree_control")
    if not control.exists():
        return
    available = Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
    wanted = [c for c in ("cpu", "cpuset", "memory", "pids", "io", "hugetlb") if c in available]
    control.write_text(" ".join(f"+{c}" for c in wanted))


def loopback_addresses() -> None:
    run(["ip", "link", "set", "lo", "up"])
    addresses = run(["ip", "-o", "addr", "show", "dev", "lo"])
    if f" {NODE_IP}/" not in addresses:
        run(["ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo"])


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
               token: str | None = None) -> Path:  # fmt: skip
    user: dict[str, str] = {}
    if cert and key:
        user = {"client-certificate": str(cert), "client-key": str(key)}
    if token:
        user = {"token": token}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": APISERVER,
                                                  "certificate-authority": str(ca)}}],
        "users": [{"name": "e2e", "user": user}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e"}}],
        "current-context": "e2e",
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Cluster:
    bin: Path
    scratch: Path
    procs: Processes

    def __post_init__(self) -> None:
        self.pki = Pki(self.scratch / "pki")
        self.admin = self.scratch / "admin.kubeconfig"
        self.containerd_socket = self.scratch / "containerd" / "containerd.sock"

    # ---- kubectl -------------------------------------------------------------
    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True,
                timeout: float = 120) -> str:  # fmt: skip
        done = subprocess.run(
            [str(self.bin / "kubectl"), f"--kubeconfig={self.admin}", *args],
            input=stdin, capture_output=True, text=True, check=False, timeout=timeout,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise Failed(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", "-o", "json", *args))

    def apply(self, objects: list[dict[str, Any]]) -> None:
        text = "\n---\n".join(yaml.safe_dump(o) for o in objects)
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=text)

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
            "kubelet": f"/O=system:nodes/CN=system:node:{NODE_NAME}",
        }
        self.kubeconfigs: dict[str, Path] = {}
        for name, subject in users.items():
            cert, key = pki.issue(name, subject)
            self.kubeconfigs[name] = kubeconfig(
                self.scratch / f"{name}.kubeconfig", pki.ca, cert=cert, key=key
            )
        self.admin = self.kubeconfigs["admin"]
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
            "--bind-address=127.0.0.1", "--secure-port=6443",
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

    def start_containerd(self) -> None:
        base = self.scratch / "containerd"
        cni_conf = self.scratch / "cni" / "net.d"
        cni_conf.mkdir(parents=True)
        # A bridge on the node for pods that are not host-network (the tier's
        # pods are); containerd reports the network ready once a config loads.
        (cni_conf / "10-e2e.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "e2e",
            "plugins": [
                {"type": "bridge", "bridge": "e2e0", "isGateway": True, "ipMasq": False,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]]}},
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
        self.procs.start("containerd", ["containerd", "--config", str(config)])
        wait_for("containerd socket", self.containerd_socket.exists, 60, interval=0.5)

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

    def ctr(self, *args: str, timeout: float = 300) -> str:
        return run(["ctr", "--address", str(self.containerd_socket), "-n", "k8s.io", *args],
                   timeout=timeout)  # fmt: skip

    def import_image(self, tarball: Path) -> None:
        self.ctr("images", "import", str(tarball))

    def start_kubelet(self, again: bool = False) -> None:
        config = self.scratch / "kubelet.yaml"
        logs = self.scratch / "pod-logs"
        logs.mkdir(exist_ok=again)
        zero = "0%"
        config.write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.pki.ca)}},
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
        }))  # fmt: skip
        self.procs.start("kubelet", [
            str(self.bin / "kubelet"),
            f"--config={config}",
            f"--kubeconfig={self.kubeconfigs['kubelet']}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}",
            "--node-labels=" + ",".join(f"{k}={v}" for k, v in NODE_LABELS.items()),
            "--v=2",
        ])  # fmt: skip

    def node_ready(self, name: str = NODE_NAME) -> bool:
        node = self.get("node", name)
        conditions = {c["type"]: c["status"] for c in node["status"].get("conditions", [])}
        return conditions.get("Ready") == "True"

    def wait_node_ready(self, timeout: float) -> float:
        def ready() -> bool:
            self.procs.get("kubelet").check_alive()
            return self.node_ready()

        return wait_for(f"node {NODE_NAME} Ready", ready, timeout, interval=2)

    def wait_service_account(self, namespace: str, timeout: float) -> None:
        """The namespace's default ServiceAccount: pods are refused before it."""
        wait_for(
            f"serviceaccount default in {namespace}",
            lambda: bool(self.kubectl("get", "serviceaccount", "default", "-n", namespace,
                                      "-o", "name", check=False)),
            timeout,
        )  # fmt: skip

    def start(self, report: Any, timeout: float = 600) -> None:
        """Everything up to a started kubelet; ``wait_ready`` waits for the node."""
        self.started_at = time.monotonic()
        self.make_pki()
        self.start_etcd()
        self.start_apiserver()
        self.start_containerd()
        images = self.scratch / "images"
        self.import_image(
            busybox_image(images / "pause.tar", PAUSE_IMAGE, ["/bin/sleep", "infinity"])
        )
        self.import_image(busybox_image(images / "busybox.tar", BUSYBOX_IMAGE, ["/bin/sh"]))
        took = self.wait_apiserver(timeout)
        report.passed("control plane: kube-apiserver ready", f"{took:.0f} s")
        self.start_controllers()
        self.start_kubelet()

    def wait_ready(self, report: Any, timeout: float = 600) -> None:
        self.wait_node_ready(timeout)
        took = time.monotonic() - self.started_at
        report.passed(f"node {NODE_NAME} Ready", f"{took:.0f} s from the start")
        self.wait_service_account("default", timeout)


PAUSE_IMAGE = "e2e.csi-lvm.io/pause:1"
BUSYBOX_IMAGE = "e2e.csi-lvm.io/busybox:1"
