"""``csi-lvm release-node``: the kubectl commands that let go of the
PersistentVolumes of a node that is gone for good.

A csi-lvm volume lives on one node, and only that node's external-provisioner
(``--node-deployment``) deletes its PVs: each carries the provisioner's
finalizer, and nothing else ever takes it off. With the node gone, its PVs
stay forever. This reads ``kubectl get pv -o json``, picks the PVs of this
driver on that node and prints the commands that delete them and remove the
finalizer, for an admin to read and run. It never runs kubectl, and never
touches LVM: the volumes went with the node. Pure: text in, text out.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from csi_lvm.ids import node_component

PROVISIONER_FINALIZER = "external-provisioner.volume.kubernetes.io/finalizer"


class ReleaseInputError(ValueError):
    """The input is not ``kubectl get pv -o json`` output."""


@dataclass(frozen=True)
class NodeVolume:
    """A PV of the gone node, and what its release needs."""

    pv_name: str
    # The provisioner's finalizer's position in metadata.finalizers (a JSON
    # patch removes by position), or None when the PV does not carry it.
    finalizer_index: int | None
    claim_namespace: str | None
    claim_name: str | None


def persistent_volumes(text: str) -> list[dict[str, Any]]:
    """The PV objects of ``kubectl get pv -o json`` (a list) or of one PV."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReleaseInputError(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ReleaseInputError("expected a JSON object")
    if document.get("kind") == "PersistentVolume":
        return [document]
    items = document.get("items")
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ReleaseInputError("expected a PersistentVolume or a list of them (items)")
    return [item for item in items if item.get("kind", "PersistentVolume") == "PersistentVolume"]


def affinity_nodes(pv: dict[str, Any], topology_key: str) -> set[str]:
    """The nodes a PV's required node affinity names on the topology key."""
    required = ((pv.get("spec") or {}).get("nodeAffinity") or {}).get("required") or {}
    return {
        value
        for term in required.get("nodeSelectorTerms") or []
        for expression in term.get("matchExpressions") or []
        if expression.get("key") == topology_key and expression.get("operator") == "In"
        for value in expression.get("values") or []
    }


def is_on_node(pv: dict[str, Any], node: str, driver_name: str, topology_key: str) -> bool:
    """Whether ``pv`` is a volume of this driver on ``node``: its volume id
    names the node (a long or unusual node name appears hashed there), or its
    node affinity does."""
    csi = (pv.get("spec") or {}).get("csi") or {}
    if csi.get("driver") != driver_name:
        return False
    handle = csi.get("volumeHandle")
    named_by_id = (
        isinstance(handle, str)
        and ":" in handle
        and handle.partition(":")[0] in {node, node_component(node)}
    )
    return named_by_id or node in affinity_nodes(pv, topology_key)


def volumes_on_node(
    pvs: Iterable[dict[str, Any]], node: str, driver_name: str, topology_key: str
) -> list[NodeVolume]:
    found = []
    for pv in pvs:
        if not is_on_node(pv, node, driver_name, topology_key):
            continue
        metadata = pv.get("metadata") or {}
        finalizers = metadata.get("finalizers") or []
        claim = (pv.get("spec") or {}).get("claimRef") or {}
        found.append(
            NodeVolume(
                pv_name=str(metadata.get("name", "")),
                finalizer_index=(
                    finalizers.index(PROVISIONER_FINALIZER)
                    if PROVISIONER_FINALIZER in finalizers
                    else None
                ),
                claim_namespace=claim.get("namespace"),
                claim_name=claim.get("name"),
            )
        )
    return sorted(found, key=lambda v: v.pv_name)


def release_commands(volumes: Iterable[NodeVolume]) -> Iterator[str]:
    """Per PV: ask for its deletion, then take the provisioner's finalizer off.
    The patch tests that the finalizer is still at that position, so it
    removes nothing else if the list changed since it was read."""
    for volume in volumes:
        name = shlex.quote(volume.pv_name)
        yield f"kubectl delete pv {name} --wait=false"
        if volume.finalizer_index is not None:
            path = f"/metadata/finalizers/{volume.finalizer_index}"
            patch = json.dumps(
                [
                    {"op": "test", "path": path, "value": PROVISIONER_FINALIZER},
                    {"op": "remove", "path": path},
                ],
                separators=(",", ":"),
            )
            yield f"kubectl patch pv {name} --type=json -p {shlex.quote(patch)}"


def claim_notes(volumes: Iterable[NodeVolume]) -> Iterator[str]:
    """What becomes of the PVCs bound to these PVs: the data is gone either way."""
    for volume in volumes:
        if volume.claim_name is None:
            continue
        namespace = volume.claim_namespace or "default"
        yield (
            f"PVC {namespace}/{volume.claim_name} is bound to PV {volume.pv_name}: delete it "
            f"(kubectl -n {shlex.quote(namespace)} delete pvc "
            f"{shlex.quote(volume.claim_name)}), or it is Lost once the PV is gone"
        )


def add_release_node_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], default_driver_name: str
) -> None:
    parser = commands.add_parser(
        "release-node",
        help="print the kubectl commands that release the PVs of a node gone for good",
        description=__doc__,
    )
    parser.add_argument("node", help="the node's name, as `kubectl get nodes` showed it")
    parser.add_argument(
        "--pv-json", default="-", help="`kubectl get pv -o json` output (default: stdin)"
    )
    parser.add_argument("--driver-name", default=default_driver_name)
    parser.add_argument("--topology-key", default=None, help="default topology.<driver-name>/node")


def release_node(
    args: argparse.Namespace,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Commands on stdout (so they can be piped to a shell), notes on stderr."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    topology_key = args.topology_key or f"topology.{args.driver_name}/node"
    try:
        if args.pv_json == "-":
            text = stdin.read()
        else:
            with open(args.pv_json, encoding="utf-8") as source:
                text = source.read()
        volumes = volumes_on_node(
            persistent_volumes(text), args.node, args.driver_name, topology_key
        )
    except (OSError, ReleaseInputError) as exc:
        print(f"csi-lvm: {args.pv_json}: {exc}", file=stderr)
        return 2
    if not volumes:
        print(
            f"csi-lvm: no PersistentVolume of driver {args.driver_name} is on node {args.node}",
            file=stderr,
        )
        return 1
    for command in release_commands(volumes):
        print(command, file=stdout)
    for note in claim_notes(volumes):
        print(f"csi-lvm: {note}", file=stderr)
    return 0
