"""The plugin image, run the way the DaemonSet runs it, as far as this machine allows.

The container gets no network, every capability but CAP_SYS_RESOURCE (this
machine cannot grant that one, so --privileged fails) and a socket directory
bind-mounted from the host. It runs the DaemonSet's own command line for the
plugin container.

The plugin refuses to start unless the volume group of its config exists,
and this kernel has no device-mapper, so no LV can be activated. A VG does
not need device-mapper: LVM only writes metadata to the PV. So the container
first attaches a sparse file in its own filesystem to a free loop device
(/dev/loop-control is passed in, the loop block devices are allowed by a
device-cgroup rule, and the node is made with mknod in the container's
private /dev), then runs pvcreate and vgcreate on it, and starts the plugin
with a config whose one thick device class names that VG. When the plugin
exits, the same shell removes the VG and detaches the loop device. Nothing
is written to the host's filesystem but the socket and config directories
below pytest's temporary directory; the loop device is a kernel object,
attached only for the test's duration (and detached by the fixture if a
crash left one behind).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import grpc
import pytest
import yaml
from testcontainers.core.config import testcontainers_config
from testcontainers.core.container import DockerContainer

from csi_lvm import __version__
from csi_lvm.cli import DEFAULT_DRIVER_NAME
from csi_lvm.csi import csi_pb2, csi_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
NODE_NAME = "image-test-node"
VOLUME_GROUP = f"csiimagetest{os.getpid()}"
# Inside the container. The prefix lets the fixture find loop devices a
# crashed run left attached.
BACKING_PREFIX = "/var/tmp/csi-lvm-image-test-"
BACKING_FILE = f"{BACKING_PREFIX}{os.getpid()}.img"
START_SECONDS = 60

testcontainers_config.ryuk_disabled = True

# PID 1 of the container: make the VG on a loop device, run the plugin
# ("$@"), pass SIGTERM on to it, then remove the VG and free the loop device.
START = r"""
set -u
img=$TEST_BACKING_FILE
vg=$TEST_VOLUME_GROUP
dev=""
cleanup() {
    if [ -n "$dev" ]; then
        vgremove -qq -f "$vg" >/dev/null 2>&1
        pvremove -qq -y "$dev" >/dev/null 2>&1
        losetup -d "$dev" || echo "start: could not detach $dev" >&2
    fi
    rm -f "$img"
}
truncate -s 64M "$img" || exit 10
for attempt in 1 2 3 4 5; do
    candidate=$(losetup --find) || break
    [ -b "$candidate" ] || mknod "$candidate" b 7 "${candidate#/dev/loop}" || break
    if losetup "$candidate" "$img"; then dev=$candidate; break; fi
    sleep 1
done
if [ -z "$dev" ]; then
    echo "start: no loop device could be attached" >&2
    cleanup
    exit 11
fi
if ! pvcreate -qq -y "$dev" || ! vgcreate -qq "$vg" "$dev"; then
    echo "start: pvcreate/vgcreate on $dev failed" >&2
    cleanup
    exit 12
fi
echo "start: volume group $vg on $dev ($img)" >&2
"$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
wait "$child"
status=$?
while kill -0 "$child" 2>/dev/null; do
    wait "$child"
    status=$?
done
cleanup
echo "start: plugin exited with $status; $dev detached" >&2
exit "$status"
"""


def plugin_command() -> list[str]:
    """The plugin container's command line from the DaemonSet, for this node,
    with the environment the kubelet would give it (lvm-runner.yaml's keys)."""
    manifest = yaml.safe_load((ROOT / "deploy/kubernetes/daemonset.yaml").read_text())
    containers = manifest["spec"]["template"]["spec"]["containers"]
    plugin = next(c for c in containers if c["name"] == "csi-lvm")
    settings = yaml.safe_load((ROOT / "deploy/kubernetes/lvm-runner.yaml").read_text())["data"]
    env = {"NODE_NAME": NODE_NAME}
    for item in plugin["env"]:
        ref = item.get("valueFrom", {}).get("configMapKeyRef")
        if ref is not None:
            env[item["name"]] = settings[ref["key"]]
    return [
        re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in plugin["command"] + plugin["args"]
    ]


def loop_devices_backed_by(prefix: str) -> list[str]:
    done = subprocess.run(
        ["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or not done.stdout.strip():
        return []
    devices = json.loads(done.stdout).get("loopdevices", [])
    return [d["name"] for d in devices if (d.get("back-file") or "").startswith(prefix)]


def detach_stale_loop_devices() -> None:
    for device in loop_devices_backed_by(BACKING_PREFIX):
        subprocess.run(["losetup", "-d", device], capture_output=True, check=False)


class Plugin:
    """The running container and a gRPC channel to its socket."""

    def __init__(self, container: DockerContainer, socket: Path) -> None:
        self.container = container
        self.socket = socket
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.exit_code: int | None = None

    @property
    def wrapped(self) -> Any:
        return self.container.get_wrapped_container()

    def logs(self) -> str:
        out: bytes = self.wrapped.logs()
        return out.decode(errors="replace")

    def exec(self, *command: str) -> tuple[int, str]:
        result = self.wrapped.exec_run(list(command))
        return result.exit_code, result.output.decode(errors="replace")

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while True:
            self.wrapped.reload()
            if self.wrapped.status != "running":
                pytest.fail(f"the container stopped ({self.wrapped.status}):\n{self.logs()}")
            if self.socket.exists():
                try:
                    self.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=5)
                    return
                except grpc.RpcError:
                    pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer on {self.socket} within {START_SECONDS}s:\n{self.logs()}")
            time.sleep(0.5)

    def stop(self) -> int:
        """SIGTERM, as kubelet does; the exit code of the container."""
        if self.exit_code is None:
            self.channel.close()
            self.wrapped.stop(timeout=45)
            self.exit_code = int(self.wrapped.wait(timeout=60)["StatusCode"])
        return self.exit_code


@pytest.fixture(scope="module")
def plugin(
    image: str, docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Plugin]:
    if not Path("/dev/loop-control").exists():
        pytest.fail("/dev/loop-control is missing: the test needs loop devices for its VG")
    detach_stale_loop_devices()
    workdir = tmp_path_factory.mktemp("plugin")
    socket_dir = workdir / "csi"
    config_dir = workdir / "config"
    socket_dir.mkdir()
    config_dir.mkdir()
    (config_dir / "config.yaml").write_text(
        f"deviceClasses:\n  - name: thick\n    volumeGroup: {VOLUME_GROUP}\n    default: true\n"
    )
    container = (
        DockerContainer(image)
        .with_command(plugin_command())
        .with_env("TEST_BACKING_FILE", BACKING_FILE)
        .with_env("TEST_VOLUME_GROUP", VOLUME_GROUP)
        .with_volume_mapping(str(socket_dir), "/csi", "rw")
        .with_volume_mapping(str(config_dir), "/etc/csi-lvm", "ro")
        .with_kwargs(
            entrypoint=["sh", "-c", START, "start"],
            network_mode="none",
            cap_add=["ALL"],
            cap_drop=["SYS_RESOURCE"],
            devices=["/dev/loop-control:/dev/loop-control:rwm"],
            device_cgroup_rules=["b 7:* rmw"],
        )
    )
    container.start()
    running = Plugin(container, socket_dir / "csi.sock")
    try:
        running.wait_until_serving()
        yield running
    finally:
        try:
            running.stop()
        finally:
            container.stop(force=True)
            detach_stale_loop_devices()


def test_identity_answers_over_the_bind_mounted_socket(plugin: Plugin) -> None:
    info = plugin.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
    assert info.name == DEFAULT_DRIVER_NAME
    assert info.vendor_version == __version__


def test_probe_is_ready(plugin: Plugin) -> None:
    probe = plugin.identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
    assert probe.HasField("ready") and probe.ready.value


def test_node_reports_its_topology(plugin: Plugin) -> None:
    node = csi_pb2_grpc.NodeStub(plugin.channel)
    info = node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
    assert info.node_id == NODE_NAME
    assert dict(info.accessible_topology.segments) == {
        f"topology.{DEFAULT_DRIVER_NAME}/node": NODE_NAME
    }


def test_lvm_runs_and_sees_the_volume_group(plugin: Plugin) -> None:
    code, output = plugin.exec("lvm", "version")
    assert code == 0, output
    assert "LVM version" in output
    code, output = plugin.exec("vgs", "--noheadings", "-o", "vg_name", VOLUME_GROUP)
    assert code == 0 and output.strip() == VOLUME_GROUP, output


def test_the_plugin_feeds_lvm_through_one_shell(plugin: Plugin) -> None:
    # The shell needs lvm2's lvmdbusd command profile, which the image must keep.
    logs = plugin.logs()
    assert '"event": "lvm shell started"' in logs, logs[-2000:]
    assert "lvm shell unavailable" not in logs


ZERO_RANGE_CHECK = """
import pathlib, subprocess
from csi_lvm.zero_range import call_with_zero_range_skipped
path = pathlib.Path("/tmp/zero-range-check")
path.write_bytes(b"\\xff" * 8192)
command = ["fallocate", "--zero-range", "--offset", "0", "--length", "4096", str(path)]
code, filtered = call_with_zero_range_skipped(lambda: subprocess.run(command).returncode)
print(filtered, code, path.read_bytes() == b"\\xff" * 8192)
"""


def test_the_mkfs_zeroing_filter_installs_under_the_runtime_seccomp_profile(
    plugin: Plugin,
) -> None:
    # The container runs under Docker's default seccomp profile; csi-lvm's own
    # filter (csi_lvm/zero_range.py) must stack on it, or every first stage of
    # a blank thin LV pays for zeroing mkfs.xfs's log.
    interpreter = 'head -n 1 "$(command -v csi-lvm)" | cut -c 3-'
    code, output = plugin.exec("sh", "-c", f'exec "$({interpreter})" -c "$0"', ZERO_RANGE_CHECK)
    assert code == 0, output
    assert output.split() == ["True", "0", "True"], output


XFS_WITHOUT_LOG_ZEROING = """
import os, subprocess
from csi_lvm import fs
path = "/tmp/xfs-check.img"
with open(path, "wb") as image:
    image.truncate(1 << 30)  # sparse: reads zeros, as a blank thin LV does
skipped = fs.make_filesystem(path, "xfs", reads_zeros=True)
check = subprocess.run(["xfs_repair", "-n", "-f", path], capture_output=True, text=True)
print(skipped, check.returncode, (check.stdout + check.stderr).replace(chr(10), " "))
"""


def test_xfs_made_without_zeroing_its_log_passes_the_image_s_own_xfs_repair(
    plugin: Plugin,
) -> None:
    # The guard on the zero-range interception: if a newer xfsprogs relied on
    # the zeroing in another way, the filesystem it makes would not check out.
    interpreter = 'head -n 1 "$(command -v csi-lvm)" | cut -c 3-'
    code, output = plugin.exec(
        "sh", "-c", f'exec "$({interpreter})" -c "$0"', XFS_WITHOUT_LOG_ZEROING
    )
    assert code == 0, output
    skipped, repair_code, _ = output.split(" ", 2)
    assert (skipped, repair_code) == ("True", "0"), output


HOST_CONFIG_CHECK = """
host=/tmp/host-lvm-$1
mkdir -p "$host"
printf '%s\\n' "$2" > "$host/lvm.conf"
LVM_SYSTEM_DIR=$host exec csi-lvm doctor --config /etc/csi-lvm/config.yaml --node-id n \\
    --lvm-config-overrides /usr/share/csi-lvm/lvm-container.conf
"""


@pytest.mark.parametrize(
    ("name", "host_lvm_conf", "seen"),
    [
        ("hides", 'devices { global_filter = [ "r|^/dev/loop|", "a|.*|" ] }', False),
        ("shows", "devices { }", True),
    ],
)
def test_the_driver_s_lvm_sees_only_what_the_host_s_lvm_configuration_lets_it(
    plugin: Plugin, name: str, host_lvm_conf: str, seen: bool
) -> None:
    # The DaemonSet mounts the host's /etc/lvm; LVM_SYSTEM_DIR stands for that
    # here. A PV the host's filter hides, the driver must not see either, with
    # the container's own settings (--lvm-config-overrides) on top.
    # (doctor's exit code also counts checks of this host, device-mapper among them)
    _, output = plugin.exec("sh", "-c", HOST_CONFIG_CHECK, "check", name, host_lvm_conf)
    line = next(text for text in output.splitlines() if "device class thick" in text)
    if seen:
        assert line.startswith("ok"), output
    else:
        assert line.startswith("FAIL") and f"'{VOLUME_GROUP}'" in line, output
        assert "does not exist on node" in line, output


def test_the_container_s_settings_reach_every_command_on_top_of_the_host_s(
    plugin: Plugin,
) -> None:
    script = (
        "mkdir -p /tmp/host-lvm-udev && printf 'activation { udev_sync = 1 }\\n' "
        "> /tmp/host-lvm-udev/lvm.conf && "
        'overrides=$(grep -v "^ *#" /usr/share/csi-lvm/lvm-container.conf | tr "\\n" " ") && '
        'LVM_SYSTEM_DIR=/tmp/host-lvm-udev lvmconfig --config "$overrides" '
        "activation/udev_sync global/use_lvmpolld"
    )
    code, output = plugin.exec("sh", "-c", script)
    assert code == 0, output
    assert output.split() == ["udev_sync=0", "use_lvmpolld=0"], output


def test_lvm_is_configured_for_a_container(plugin: Plugin) -> None:
    code, output = plugin.exec(
        "lvmconfig",
        "activation/udev_sync",
        "activation/udev_rules",
        "activation/monitoring",
        "devices/obtain_device_list_from_udev",
        "global/locking_dir",
        "global/use_lvmpolld",
    )
    assert code == 0, output
    assert dict(line.split("=", 1) for line in output.split()) == {
        "udev_sync": "0",
        "udev_rules": "0",
        "monitoring": "0",
        "obtain_device_list_from_udev": "0",
        "locking_dir": '"/run/lock/lvm"',
        "use_lvmpolld": "0",
    }


@pytest.mark.parametrize(
    "command",
    [
        ("mkfs.xfs", "-V"),
        ("mkfs.ext4", "-V"),
        ("xfs_growfs", "-V"),
        ("mkfs.btrfs", "--version"),
        ("btrfs", "--version"),  # filesystem resize, inspect-internal dump-super
        ("btrfstune", "--help"),  # a copy's new filesystem ID (exits 0 on --help)
        ("thin_check", "-V"),
        ("blkid", "-V"),
        ("mount", "-V"),
        ("nsenter", "-V"),  # the host-lvm component's way into the host
        ("cryptsetup", "--version"),  # encrypted classes
    ],
    ids=lambda command: command[0],
)
def test_filesystem_and_thin_tools_run(plugin: Plugin, command: tuple[str, ...]) -> None:
    code, output = plugin.exec(*command)
    assert code == 0, output


def test_image_is_small_and_has_no_build_tools(
    plugin: Plugin,
    image: str,
    docker_client: docker.DockerClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, output = plugin.exec("sh", "-c", "command -v pip pip3 gcc cc make apt-file || true")
    assert code == 0 and output.strip() == "", f"build tools in the image: {output}"
    size = docker_client.images.get(image).attrs["Size"]
    with capsys.disabled():
        print(f"\n{image}: {size / 1e6:.0f} MB")


def test_stops_on_sigterm_and_frees_its_loop_device(plugin: Plugin) -> None:
    assert plugin.stop() == 0, plugin.logs()
    logs = plugin.logs()
    assert '"event": "stopped"' in logs
    assert "plugin exited with 0" in logs
    assert loop_devices_backed_by(BACKING_FILE) == []


COMPONENT = ROOT / "deploy/kubernetes/components/snapshot-metadata"
TLS_SCRIPT = ROOT / "deploy/kubernetes/tls.sh"


def forwarder_container() -> dict[str, Any]:
    """The forwarder's container of the snapshot-metadata Deployment."""
    documents = yaml.safe_load_all((COMPONENT / "snapshot-metadata.yaml").read_text())
    deployment = next(d for d in documents if d and d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container: dict[str, Any] = next(c for c in pod["containers"] if c["name"] == "forwarder")
    container["securityContext"] = {**pod["securityContext"], **container["securityContext"]}
    return container


def test_the_forwarder_serves_as_the_deployment_runs_it(
    image: str, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    """Non-root, read-only root filesystem, no capabilities: the Deployment's
    securityContext. Its socket in a directory it shares, its TLS files from
    tls.sh --snapshot-metadata (the forwarder's own certificate) in a Secret's
    modes."""
    spec = forwarder_container()
    security = spec["securityContext"]
    user, group = security["runAsUser"], security["runAsGroup"]
    assert security["readOnlyRootFilesystem"] and security["capabilities"]["drop"] == ["ALL"]
    socket_dir = tmp_path / "csi"
    socket_dir.mkdir(mode=0o777)
    socket_dir.chmod(0o777)  # an emptyDir's mode
    made = tmp_path / "made"
    subprocess.run([str(TLS_SCRIPT), "--snapshot-metadata", str(made)], check=True,
                   capture_output=True)  # fmt: skip
    tls = tmp_path / "tls"
    tls.mkdir()
    for name, source in (("ca.crt", "forwarding-ca.crt"), ("tls.crt", "forwarder.crt"),
                         ("tls.key", "forwarder.key")):  # fmt: skip
        (tls / name).write_bytes((made / source).read_bytes())
        os.chown(tls / name, 0, group)  # fsGroup and the Secret's defaultMode 0440
        (tls / name).chmod(0o440)
    mounts = {m["name"]: m["mountPath"] for m in spec["volumeMounts"]}
    namespace = {"POD_NAMESPACE": "csi-lvm"}
    command = spec["command"] + [re.sub(r"\$\((\w+)\)", lambda m: namespace[m[1]], a)
                                 for a in spec["args"]]  # fmt: skip
    container = docker_client.containers.run(
        image,
        entrypoint=command[:1],
        command=command[1:],
        user=f"{user}:{group}",
        read_only=True,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        network_mode="none",
        volumes={
            str(socket_dir): {"bind": mounts["socket-dir"], "mode": "rw"},
            str(tls): {"bind": mounts["forwarding-tls"], "mode": "ro"},
        },
        detach=True,
    )
    try:
        channel = grpc.insecure_channel(f"unix://{socket_dir / 'csi.sock'}")
        identity = csi_pb2_grpc.IdentityStub(channel)
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=5)
                break
            except grpc.RpcError:
                container.reload()
                logs = container.logs().decode(errors="replace")
                assert container.status == "running", logs
                assert time.monotonic() < deadline, f"no answer within {START_SECONDS}s:\n{logs}"
                time.sleep(0.5)
        assert info.name == DEFAULT_DRIVER_NAME
        capabilities = identity.GetPluginCapabilities(
            csi_pb2.GetPluginCapabilitiesRequest(), timeout=5
        )
        services = [c.service.type for c in capabilities.capabilities]
        assert services == [csi_pb2.PluginCapability.Service.SNAPSHOT_METADATA_SERVICE]
        assert (socket_dir / "csi.sock").stat().st_uid == user
        channel.close()
    finally:
        container.stop(timeout=10)
        container.remove(force=True)
