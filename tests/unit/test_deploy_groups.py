"""components/group-snapshots: the sidecar for groups, csi-lvm's group
forwarder and the certificate that lets it (and only it) cut group snapshots
on the plugins' port; checked on the rendered manifests, the forwarder's
real command line, tls.sh's real certificates and real TLS handshakes."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
import pytest

from csi_lvm.cli import DEFAULT_DRIVER_NAME, build_parser
from csi_lvm.csi import csi_pb2, csi_pb2_grpc
from csi_lvm.errors import FailedPrecondition
from csi_lvm.forwarding import GroupForwardingService, GroupSidecarController
from csi_lvm.group_controller import ForwardedGroupController
from csi_lvm.group_labels import GROUP_HANDLE, GROUP_SIDECAR_NAME, KINDS, MANAGED_BY, needs_label
from csi_lvm.ids import GroupId, Kind, ObjectId, lv_name_for
from csi_lvm.peers import StaticPeers
from csi_lvm.server import CallInterceptor, socket_path
from csi_lvm.tls import (
    GROUP_FORWARDER_NAME,
    TlsFiles,
    server_credentials,
)
from tests.unit import kustomize
from tests.unit.test_deploy import (
    KUBERNETES,
    NAMESPACE,
    PEER_PORT,
    PLUGIN_SECRET,
    REGISTRY_IMAGE,
    SIDECARS,
    documents,
    flags,
    grants,
    keyed,
    mount,
    mounted,
    names_in,
    plugin_args,
    render,
    rendered_daemonset,
    run_tls_script,
    secret_of,
    verifies,
)

COMPONENT = "components/group-snapshots"
GROUP_SECRET = "csi-lvm-group-snapshots-tls"
DEPLOYMENT = ("Deployment", NAMESPACE, "csi-lvm-group-snapshots")


def volume(node: str, name: str) -> str:
    return str(ObjectId.build(node, "thin", lv_name_for(Kind.VOLUME, name)))


GROUP = str(GroupId.build("node-a", "thin", "g"))
# external-snapshotter v8.6.0, deploy/kubernetes/csi-snapshotter/rbac-csi-snapshotter.yaml:
# what the sidecar calls with group snapshots on (leases aside: --node-deployment
# refuses leader election).
SNAPSHOTTER_API_CALLS = {
    # events: what client-go's recorder does (upstream's example adds list, watch)
    *(("", "events", v) for v in ("create", "update", "patch")),
    *(("snapshot.storage.k8s.io", "volumesnapshotclasses", v) for v in ("get", "list", "watch")),
    *(("snapshot.storage.k8s.io", "volumesnapshotcontents", v)
      for v in ("get", "list", "watch", "update", "patch")),
    *(("snapshot.storage.k8s.io", "volumesnapshotcontents/status", v) for v in ("update", "patch")),
    *(("groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses", v)
      for v in ("get", "list", "watch")),
    *(("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents", v)
      for v in ("get", "list", "watch", "update", "patch")),
    *(("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents/status", v)
      for v in ("update", "patch")),
}  # fmt: skip
# The forwarder's own: the label on group classes and contents.
LABELER_API_CALLS = {
    ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses", "patch"),
    ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents", "patch"),
}


def groups_render(**settings: Any) -> list[dict[str, Any]]:
    return render(components=(COMPONENT,), **settings)


def pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(keyed(objs)[DEPLOYMENT]["spec"]["template"])


def by_name(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod(objs)["spec"]["containers"]}


def forwarder_args(forwarder: dict[str, Any]) -> Any:
    """The forwarder's command line as the csi-lvm CLI parses it, with the
    kubelet's $(VAR) substitution and the container's environment."""
    env = {e["name"]: e.get("value", "") for e in forwarder.get("env", [])}
    env["POD_NAMESPACE"] = NAMESPACE
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in forwarder["args"]]
    return build_parser().parse_args(forwarder["command"][1:] + args)


def test_the_component_adds_its_objects_and_changes_nothing_else() -> None:
    assert set(kustomize.load(KUBERNETES / COMPONENT)) == {"apiVersion", "kind", "resources"}
    before, after = keyed(render()), keyed(groups_render())
    assert {k: v for k, v in after.items() if k in before} == before
    component = [d for o, d in documents() if o.startswith(f"kubernetes/{COMPONENT}/")]
    assert {k: v for k, v in after.items() if k not in before} == keyed(component)


def test_the_sidecar_watches_its_own_name_with_group_snapshots_on() -> None:
    sidecar = by_name(groups_render())["csi-snapshotter"]
    image, tag, known = SIDECARS["csi-snapshotter"]
    assert sidecar["image"] == f"{image}:{tag}"  # the node sidecars' release
    given = flags(sidecar)
    assert not set(given) - known
    assert "node-deployment" in given and "leader-election" not in given
    assert given["feature-gates"] == "CSIVolumeGroupSnapshot=true"
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert env == {"NODE_NAME": GROUP_SIDECAR_NAME}


def test_the_forwarder_labels_with_the_sidecar_s_name_and_shares_only_its_socket() -> None:
    objs = groups_render()
    containers = by_name(objs)
    assert set(containers) == {"csi-snapshotter", "forwarder"}
    sidecar, forwarder = containers["csi-snapshotter"], containers["forwarder"]
    args = forwarder_args(forwarder)
    assert forwarder["command"] == ["csi-lvm"] and args.command == "forward-group-snapshots"
    assert args.sidecar_name == GROUP_SIDECAR_NAME and args.driver_name == DEFAULT_DRIVER_NAME
    socket = PurePosixPath(socket_path(args.endpoint))
    assert flags(sidecar)["csi-address"] == str(socket)
    shared = mount(forwarder, str(socket.parent))["name"]
    assert mount(sidecar, str(socket.parent))["name"] == shared
    (volume,) = [v for v in pod(objs)["spec"]["volumes"] if v["name"] == shared]
    assert volume == {"name": shared, "emptyDir": {}}
    # The plugins: their pods' label, their TLS port.
    selector = dict(term.split("=", 1) for term in args.plugin_selector.split(","))
    plugin_labels = rendered_daemonset(objs)["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= plugin_labels.items()
    listen = build_parser().parse_args(plugin_args(objs)).peer_listen
    assert args.plugin_port == int(listen.rpartition(":")[2]) == PEER_PORT
    assert args.namespace == NAMESPACE and args.peers_file == ""
    assert secret_of(pod(objs), forwarder, args.tls_dir)["secretName"] == GROUP_SECRET
    assert GROUP_SECRET != PLUGIN_SECRET
    # One at a time (leader election is refused with --node-deployment).
    deployment = keyed(objs)[DEPLOYMENT]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    moved = groups_render(image=REGISTRY_IMAGE)
    assert by_name(moved)["forwarder"]["image"] == "registry.example.com/csi-lvm:9.9.9"


def test_the_class_is_the_driver_s_and_seen_by_the_sidecar() -> None:
    (group_class,) = [o for o in groups_render() if o["kind"] == "VolumeGroupSnapshotClass"]
    assert group_class["driver"] == DEFAULT_DRIVER_NAME
    assert group_class["metadata"]["labels"] == {MANAGED_BY: GROUP_SIDECAR_NAME}
    assert group_class["deletionPolicy"] == "Delete"


def test_the_service_account_may_do_what_the_sidecar_and_the_forwarder_call() -> None:
    objs = keyed(groups_render())
    role = objs[("ClusterRole", "", "csi-lvm-group-snapshots")]
    assert grants(role) == SNAPSHOTTER_API_CALLS | LABELER_API_CALLS  # no more
    assert grants(objs[("Role", NAMESPACE, "csi-lvm-group-snapshots")]) == {("", "pods", "list")}
    account = pod(list(objs.values()))["spec"]["serviceAccountName"]
    for binding in ("ClusterRoleBinding", "RoleBinding"):
        bound = objs[(binding, NAMESPACE if binding == "RoleBinding" else "",
                      "csi-lvm-group-snapshots")]  # fmt: skip
        assert bound["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
        ]


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tls.sh --group-snapshots's Secrets, mounted as the pods mount them."""
    root = tmp_path_factory.mktemp("tls")
    made = keyed(run_tls_script(root / "authority", "--group-snapshots"))
    assert set(made) == {("Secret", NAMESPACE, s) for s in (PLUGIN_SECRET, GROUP_SECRET)}
    return {key[2]: mounted(secret, root / key[2]) for key, secret in made.items()}


def test_tls_sh_gives_the_forwarder_a_client_certificate_of_its_own_name(
    secrets: dict[str, Path],
) -> None:
    forwarder, plugin = secrets[GROUP_SECRET], secrets[PLUGIN_SECRET]
    assert verifies(forwarder, plugin / "ca.crt")  # the plugins' authority
    common_name, dns, usage = names_in((forwarder / "tls.crt").read_bytes())
    assert (common_name, dns) == (GROUP_FORWARDER_NAME, [GROUP_FORWARDER_NAME])
    assert usage == "TLS Web Client Authentication"


class ReachedThePlugin(FailedPrecondition):
    """Raised by the plugin's side: proof a call got past the port's check."""


class AnswersNothing:
    """The plugin's group snapshots, reduced to one answer: the check in
    front of them is what these tests are about (the cuts are tested on real
    LVM in tests/lvm/test_group_snapshots.py)."""

    def create(self, *args: object) -> None:
        raise ReachedThePlugin("reached the plugin")

    get = delete = create


def plugin_port(plugin_tls: Path) -> tuple[grpc.Server, int]:
    """A plugin's TLS port as the plugin serves it: the forwarded
    GroupController, with the plugin's certificate."""
    server = grpc.server(ThreadPoolExecutor(max_workers=4), interceptors=[CallInterceptor()])
    controller = ForwardedGroupController(AnswersNothing())  # type: ignore[arg-type]
    csi_pb2_grpc.add_GroupControllerServicer_to_server(controller, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(TlsFiles(plugin_tls)))
    server.start()
    return server, port


def forwarder_socket(
    tmp_path: Path, caller_tls: Path, port: int
) -> tuple[grpc.Server, grpc.Channel]:
    """The group forwarder on a socket, holding ``caller_tls``, finding the
    plugin of node ``node-a`` at ``port``."""
    peers = tmp_path / "peers"
    peers.write_text(f"node-a 127.0.0.1:{port}\n")
    server = grpc.server(ThreadPoolExecutor(max_workers=4), interceptors=[CallInterceptor()])
    csi_pb2_grpc.add_GroupControllerServicer_to_server(
        GroupForwardingService(StaticPeers(str(peers)), TlsFiles(caller_tls)), server
    )
    csi_pb2_grpc.add_ControllerServicer_to_server(GroupSidecarController(), server)
    path = tmp_path / "csi.sock"
    server.add_insecure_port(f"unix://{path}")
    server.start()
    return server, grpc.insecure_channel(f"unix://{path}")


@pytest.mark.parametrize("holder", [GROUP_SECRET, PLUGIN_SECRET])
def test_only_the_group_forwarder_s_certificate_reaches_the_plugin(
    holder: str, secrets: dict[str, Path], tmp_path: Path
) -> None:
    plugin, port = plugin_port(secrets[PLUGIN_SECRET])
    forwarder, channel = forwarder_socket(tmp_path, secrets[holder], port)
    stub = csi_pb2_grpc.GroupControllerStub(channel)
    volumes = [volume("node-a", "pvc-1"), volume("node-a", "pvc-2")]
    calls = {
        "create": lambda: stub.CreateVolumeGroupSnapshot(
            csi_pb2.CreateVolumeGroupSnapshotRequest(name="g", source_volume_ids=volumes),
            timeout=20,
        ),
        "get": lambda: stub.GetVolumeGroupSnapshot(
            csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=GROUP),
            timeout=20,
        ),
        "delete": lambda: stub.DeleteVolumeGroupSnapshot(
            csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=GROUP),
            timeout=20,
        ),
    }
    try:
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as raised:
                call()
            if holder == GROUP_SECRET:  # through, and the plugin's answer relayed
                assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION, name
                assert raised.value.details() == "reached the plugin"
            else:  # a plugin's certificate: the same authority, not the right name
                assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED, name
                assert GROUP_FORWARDER_NAME in (raised.value.details() or "")
    finally:
        channel.close()
        forwarder.stop(None)
        plugin.stop(None)


def test_the_forwarder_answers_what_it_can_without_a_plugin(
    secrets: dict[str, Path], tmp_path: Path
) -> None:
    # No plugin listens at port 1: every answer below is the forwarder's own.
    forwarder, channel = forwarder_socket(tmp_path, secrets[GROUP_SECRET], 1)
    groups = csi_pb2_grpc.GroupControllerStub(channel)
    controller = csi_pb2_grpc.ControllerStub(channel)
    create = csi_pb2.CreateVolumeGroupSnapshotRequest
    try:
        capabilities = groups.GroupControllerGetCapabilities(
            csi_pb2.GroupControllerGetCapabilitiesRequest(), timeout=20
        ).capabilities
        rpc = csi_pb2.GroupControllerServiceCapability.RPC
        assert [c.rpc.type for c in capabilities] == [rpc.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT]
        # The sidecar starts only beside CREATE_DELETE_SNAPSHOT...
        reported = controller.ControllerGetCapabilities(
            csi_pb2.ControllerGetCapabilitiesRequest(), timeout=20
        ).capabilities
        crpc = csi_pb2.ControllerServiceCapability.RPC
        assert [c.rpc.type for c in reported] == [crpc.CREATE_DELETE_SNAPSHOT]
        # ...which this endpoint never takes, and says where it is taken.
        with pytest.raises(grpc.RpcError) as raised:
            controller.CreateSnapshot(
                csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=volume("node-a", "pvc-1")),
                timeout=20,
            )
        assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert "beside the plugin of its volume's node" in (raised.value.details() or "")
        cases = [
            (create(name="g"), grpc.StatusCode.INVALID_ARGUMENT, "source_volume_ids is required"),
            (create(name="g", source_volume_ids=["nonsense"]), grpc.StatusCode.NOT_FOUND,
             "not a csi-lvm volume id"),
            (create(name="g", source_volume_ids=[volume("node-b", "pvc-1")]),
             grpc.StatusCode.UNAVAILABLE, "no csi-lvm plugin is known on node node-b"),
            (create(name="g", source_volume_ids=[volume("node-a", "pvc-1")]),
             grpc.StatusCode.UNAVAILABLE, "the csi-lvm plugin on node node-a cannot be reached"),
        ]  # fmt: skip
        for request, code, words in cases:
            with pytest.raises(grpc.RpcError) as raised:
                groups.CreateVolumeGroupSnapshot(request, timeout=20)
            assert raised.value.code() is code and words in (raised.value.details() or "")
        with pytest.raises(grpc.RpcError) as raised:
            groups.GetVolumeGroupSnapshot(
                csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id="nonsense"), timeout=20
            )
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND
        # Deleting what csi-lvm never made is done already.
        groups.DeleteVolumeGroupSnapshot(
            csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id="nonsense"), timeout=20
        )
    finally:
        channel.close()
        forwarder.stop(None)


GROUP_CLASS, GROUP_CONTENT, CONTENT = KINDS


@pytest.mark.parametrize(
    ("kind", "obj", "labelled"),
    [
        # A class of this driver, and a group content (the driver in its spec).
        (GROUP_CLASS, {"metadata": {"name": "c"}, "driver": DEFAULT_DRIVER_NAME}, True),
        (GROUP_CONTENT, {"metadata": {"name": "g"}, "spec": {"driver": DEFAULT_DRIVER_NAME}},
         True),
        (GROUP_CONTENT, {"metadata": {"name": "g", "labels": {"app": "db"}},
                         "spec": {"driver": DEFAULT_DRIVER_NAME}}, True),
        # A member's content: the snapshot-controller marks it with the group's handle.
        (CONTENT, {"metadata": {"name": "s", "annotations": {GROUP_HANDLE: "n:thin:group_x"}},
                   "spec": {"driver": DEFAULT_DRIVER_NAME}}, True),
        # A single snapshot's content (labelled for its node, or not yet): never.
        (CONTENT, {"metadata": {"name": "s"}, "spec": {"driver": DEFAULT_DRIVER_NAME}}, False),
        (CONTENT, {"metadata": {"name": "s", "labels": {MANAGED_BY: "node-a"}},
                   "spec": {"driver": DEFAULT_DRIVER_NAME}}, False),
        # Another driver's, or labelled already (for a node, by an admin: left alone).
        (GROUP_CLASS, {"metadata": {"name": "c"}, "driver": "hostpath.csi.k8s.io"}, False),
        (GROUP_CONTENT, {"metadata": {"name": "g"}, "spec": {"driver": "hostpath.csi.k8s.io"}},
         False),
        (CONTENT, {"metadata": {"name": "s", "annotations": {GROUP_HANDLE: "x"}},
                   "spec": {"driver": "hostpath.csi.k8s.io"}}, False),
        (GROUP_CONTENT, {"metadata": {"name": "g", "labels": {MANAGED_BY: "node-a"}},
                         "spec": {"driver": DEFAULT_DRIVER_NAME}}, False),
        (GROUP_CONTENT, {"metadata": {"name": "g"}}, False),
    ],
)  # fmt: skip
def test_the_forwarder_labels_the_driver_s_group_objects_and_members(
    kind: str, obj: dict[str, Any], labelled: bool
) -> None:
    assert needs_label(kind, obj, DEFAULT_DRIVER_NAME) is labelled
