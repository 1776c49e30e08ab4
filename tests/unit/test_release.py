"""``csi-lvm release-node``: the PVs of this driver on the gone node, and only
those, get exactly the commands that release them; nothing runs kubectl."""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from csi_lvm.cli import DEFAULT_DRIVER_NAME, build_parser
from csi_lvm.ids import node_component
from csi_lvm.release import PROVISIONER_FINALIZER, release_node

TOPOLOGY_KEY = f"topology.{DEFAULT_DRIVER_NAME}/node"
LONG_NODE = "ip-10-0-17-42.eu-central-1.compute.internal.example"  # > 40: hashed in ids
PV_PROTECTION = "kubernetes.io/pv-protection"


def pv(
    name: str,
    handle: str,
    *,
    driver: str = DEFAULT_DRIVER_NAME,
    affinity: str | None = None,
    finalizers: tuple[str, ...] = (PV_PROTECTION, PROVISIONER_FINALIZER),
    claim: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """A PersistentVolume as ``kubectl get pv -o json`` shows it."""
    spec: dict[str, Any] = {
        "capacity": {"storage": "1Gi"},
        "accessModes": ["ReadWriteOnce"],
        "persistentVolumeReclaimPolicy": "Delete",
        "storageClassName": "csi-lvm-thin",
        "csi": {"driver": driver, "volumeHandle": handle, "fsType": "ext4"},
    }
    if affinity is not None:
        spec["nodeAffinity"] = {
            "required": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": TOPOLOGY_KEY, "operator": "In", "values": [affinity]}
                        ]
                    }
                ]
            }
        }
    if claim is not None:
        spec["claimRef"] = {
            "kind": "PersistentVolumeClaim",
            "namespace": claim[0],
            "name": claim[1],
        }
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "finalizers": list(finalizers)},
        "spec": spec,
        "status": {"phase": "Bound" if claim else "Released"},
    }


def pv_list(*items: dict[str, Any]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": list(items), "metadata": {}})


def run(node: str, text: str, *extra: str) -> tuple[int, str, str]:
    args = build_parser().parse_args(["release-node", node, *extra])
    out, err = io.StringIO(), io.StringIO()
    code = release_node(args, stdin=io.StringIO(text), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def patch_of(index: int) -> str:
    path = f"/metadata/finalizers/{index}"
    return shlex.quote(
        json.dumps(
            [
                {"op": "test", "path": path, "value": PROVISIONER_FINALIZER},
                {"op": "remove", "path": path},
            ],
            separators=(",", ":"),
        )
    )


def test_only_this_drivers_pvs_on_that_node_get_commands() -> None:
    text = pv_list(
        pv("pvc-b", "node-a:thin:csi-pvc-b", affinity="node-a", claim=("shop", "db")),
        pv("pvc-a", "node-a:thick:csi-pvc-a", affinity="node-a"),
        pv("pvc-other-node", "node-b:thin:csi-pvc-c", affinity="node-b", claim=("shop", "web")),
        pv("pvc-other-driver", "node-a:thin:csi-pvc-d", driver="other.csi.example.com"),
        pv("pvc-prefix", "node-ab:thin:csi-pvc-e", affinity="node-ab"),
    )
    code, out, err = run("node-a", text)
    assert code == 0
    assert out.splitlines() == [
        "kubectl delete pv pvc-a --wait=false",
        f"kubectl patch pv pvc-a --type=json -p {patch_of(1)}",
        "kubectl delete pv pvc-b --wait=false",
        f"kubectl patch pv pvc-b --type=json -p {patch_of(1)}",
    ]
    assert err.splitlines() == [
        "csi-lvm: PVC shop/db is bound to PV pvc-b: delete it "
        "(kubectl -n shop delete pvc db), or it is Lost once the PV is gone"
    ]


def test_the_patch_removes_the_provisioners_finalizer_and_nothing_else() -> None:
    _, out, _ = run("node-a", pv_list(pv("pvc-a", "node-a:thin:csi-pvc-a")))
    patch = json.loads(shlex.split(out.splitlines()[1])[-1])
    finalizers = [PV_PROTECTION, PROVISIONER_FINALIZER]
    for operation in patch:  # JSON patch, as the API server applies it
        index = int(operation["path"].rsplit("/", 1)[1])
        if operation["op"] == "test":
            assert finalizers[index] == operation["value"]
        else:
            assert operation["op"] == "remove"
            del finalizers[index]
    assert finalizers == [PV_PROTECTION]


def test_a_long_node_name_matches_its_hashed_form_in_volume_ids() -> None:
    hashed = node_component(LONG_NODE)
    assert hashed.startswith("=") and hashed != LONG_NODE
    text = pv_list(
        pv("pvc-hashed", f"{hashed}:thin:csi-pvc-h", finalizers=(PROVISIONER_FINALIZER,)),
        pv("pvc-other-hash", f"{node_component(LONG_NODE + 'x')}:thin:csi-pvc-i"),
    )
    code, out, _ = run(LONG_NODE, text)
    assert code == 0
    assert out.splitlines() == [
        "kubectl delete pv pvc-hashed --wait=false",
        f"kubectl patch pv pvc-hashed --type=json -p {patch_of(0)}",
    ]


def test_node_affinity_alone_selects_a_pv() -> None:
    # A handle this driver would not make, but the topology names the node.
    text = pv_list(pv("pvc-affine", "imported-volume", affinity="node-a", finalizers=()))
    code, out, err = run("node-a", text)
    assert (code, out, err) == (0, "kubectl delete pv pvc-affine --wait=false\n", "")


def test_driver_name_and_topology_key_are_the_ones_given() -> None:
    other = pv("pvc-x", "node-a:thin:csi-pvc-x", driver="lvm.example.org", finalizers=())
    assert run("node-a", pv_list(other))[0] == 1
    code, out, _ = run("node-a", pv_list(other), "--driver-name", "lvm.example.org")
    assert (code, out) == (0, "kubectl delete pv pvc-x --wait=false\n")
    by_hostname = pv("pvc-y", "imported", affinity="node-a", finalizers=())
    by_hostname["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0][
        "key"
    ] = "kubernetes.io/hostname"
    assert run("node-a", pv_list(by_hostname))[0] == 1
    code, out, _ = run("node-a", pv_list(by_hostname), "--topology-key", "kubernetes.io/hostname")
    assert (code, out) == (0, "kubectl delete pv pvc-y --wait=false\n")


def test_no_pv_on_the_node_prints_no_command() -> None:
    code, out, err = run("node-z", pv_list(pv("pvc-a", "node-a:thin:csi-pvc-a")))
    assert (code, out) == (1, "")
    assert "no PersistentVolume of driver lvm.csi-lvm.io is on node node-z" in err


@pytest.mark.parametrize(
    "text", ["not json", "[]", json.dumps({"kind": "List", "items": [1]}), "{}"]
)
def test_input_that_is_not_a_pv_list_is_refused(text: str) -> None:
    code, out, err = run("node-a", text)
    assert (code, out) == (2, "")
    assert err.startswith("csi-lvm: -: ")


def test_one_pv_object_and_a_file_are_read_too(tmp_path: Path) -> None:
    single = tmp_path / "pv.json"
    single.write_text(json.dumps(pv("pvc-a", "node-a:thin:csi-pvc-a", finalizers=())))
    code, out, _ = run("node-a", "", "--pv-json", str(single))
    assert (code, out) == (0, "kubectl delete pv pvc-a --wait=false\n")
    code, _, err = run("node-a", "", "--pv-json", str(tmp_path / "missing.json"))
    assert code == 2 and "missing.json" in err


def test_the_command_line_reads_standard_input_and_runs_no_kubectl(tmp_path: Path) -> None:
    # A kubectl on PATH that records any call: it must never be called.
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "kubectl"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    done = subprocess.run(
        [sys.executable, "-m", "csi_lvm.cli", "release-node", "node-a"],
        input=pv_list(pv("pvc-a", "node-a:thin:csi-pvc-a")),
        capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": f"{fake.parent}:/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "kubectl delete pv pvc-a --wait=false",
        f"kubectl patch pv pvc-a --type=json -p {patch_of(1)}",
    ]
    assert not calls.exists()
