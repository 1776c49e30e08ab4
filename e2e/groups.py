"""Check 21: a VolumeGroupSnapshot of two PVCs, taken while a pod writes to
both, restored, and read at one instant.

The writer appends 1, 2, 3, ... to ``/data/seq`` and then the same number to
``/wal/seq``, one after the other, without pause between the two. A group
cut at one instant holds, in the WAL, the data's last number or the one
before it (the data file is always written first). Two snapshots taken one
after the other would drift apart by as many numbers as the writer wrote
between them. The group goes the way an admin's does: the snapshot-controller,
the sidecar for groups, csi-lvm's forwarder (which labels the group content
for that sidecar), and the plugin of the volumes' node.
"""

from __future__ import annotations

from typing import Any

from e2e.procs import Failed, wait_for

GROUP_API = "groupsnapshot.storage.k8s.io/v1"
MANAGED_BY = "snapshot.storage.kubernetes.io/managed-by"
GROUP_SIDECAR = "csi-lvm-group-snapshots"
GROUP_CLASS = "csi-lvm-group"
LABELS = {"e2e-group": "db"}
CLAIMS = {"db-data": "/data", "db-wal": "/wal"}
WRITER = (
    "i=0; while true; do i=$((i+1)); echo $i >> /data/seq; echo $i >> /wal/seq; sleep 0.02; done"
)
LAST = "tail -n 1 /data/seq; tail -n 1 /wal/seq"
TIMEOUT = 300


def two_volume_pod(
    namespace: str, image: str, name: str, claims: dict[str, str], script: str, node: str = ""
) -> dict[str, Any]:
    """A busybox pod with each claim mounted at its path."""
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": 2,
        "containers": [{
            "name": "app", "image": image, "imagePullPolicy": "Never",
            "command": ["/bin/sh", "-c", script],
            "volumeMounts": [{"name": c, "mountPath": p} for c, p in claims.items()],
        }],
        "volumes": [{"name": c, "persistentVolumeClaim": {"claimName": c}} for c in claims],
    }  # fmt: skip
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}  # fmt: skip


def last_numbers(text: str) -> tuple[int, int]:
    """The data's and the WAL's last numbers, as ``LAST`` prints them."""
    words = text.split()
    if len(words) != 2 or not all(w.isdigit() for w in words):
        raise Failed(f"the files' last lines are {text!r}")
    return int(words[0]), int(words[1])


def one_instant(data: int, wal: int) -> bool:
    """Whether the two last numbers can be one instant of the writer."""
    return data > 0 and wal in (data, data - 1)


def group_checks(checks: Any, pvc: Any, namespace: str, image: str) -> None:
    cluster = checks.cluster
    name = "db-group"

    def members() -> dict[str, dict[str, Any]]:
        """The group's VolumeSnapshots, by the claim each is of."""
        found = cluster.get("volumesnapshots", "-n", namespace)["items"]
        return {
            s["spec"]["source"].get("persistentVolumeClaimName", ""): s
            for s in found
            if any(o.get("kind") == "VolumeGroupSnapshot" and o.get("name") == name
                   for o in s["metadata"].get("ownerReferences", []))
        }  # fmt: skip

    def group() -> str:
        claims = []
        for claim in CLAIMS:
            made = pvc(claim, "256Mi")
            made["metadata"]["labels"] = dict(LABELS)
            claims.append(made)
        cluster.apply([*claims, two_volume_pod(namespace, image, "db-writer", CLAIMS, WRITER)])
        checks.wait_running("db-writer")
        node = checks.pod_node("db-writer")
        if {checks.pv_node(c) for c in CLAIMS} != {node}:
            raise Failed(f"the claims are not both on the writer's node {node}")
        before = set(checks.lvs())  # the claims' LVs among them

        def writer_at(number: int) -> bool:
            return last_numbers(checks.exec("db-writer", LAST))[1] > number

        wait_for("the writer's first numbers", lambda: writer_at(20), 120, interval=2)
        cluster.apply([{
            "apiVersion": GROUP_API, "kind": "VolumeGroupSnapshot",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"volumeGroupSnapshotClassName": GROUP_CLASS,
                     "source": {"selector": {"matchLabels": dict(LABELS)}}},
        }])  # fmt: skip
        seen: dict[str, str] = {}

        def ready() -> bool:
            status = cluster.get("volumegroupsnapshot", name, "-n", namespace).get("status", {})
            seen["error"] = str((status.get("error") or {}).get("message", ""))
            return bool(status.get("readyToUse")) and len(members()) == len(CLAIMS)

        try:
            took = wait_for(f"VolumeGroupSnapshot {name} ready", ready, TIMEOUT, interval=3)
        except Failed as error:
            raise Failed(f"{error}; its error: {seen.get('error') or 'none'}") from None
        status = cluster.get("volumegroupsnapshot", name, "-n", namespace)["status"]
        content = cluster.get("volumegroupsnapshotcontent",
                              status["boundVolumeGroupSnapshotContentName"])  # fmt: skip
        label = content["metadata"].get("labels", {}).get(MANAGED_BY)
        if label != GROUP_SIDECAR:
            raise Failed(f"the group's content is labelled managed-by={label!r}")
        cut = set(checks.lvs()) - before
        if len(cut) != len(CLAIMS):
            raise Failed(f"LVs made for the group: {sorted(cut)}")
        # The writer was held, not stopped.
        after = last_numbers(checks.exec("db-writer", LAST))
        by_claim = members()
        restored = {f"{claim}-restored": path for claim, path in CLAIMS.items()}
        cluster.apply([
            *(pvc(f"{claim}-restored", "256Mi",
                  source={"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                          "name": by_claim[claim]["metadata"]["name"]})
              for claim in CLAIMS),
            two_volume_pod(namespace, image, "db-reader", restored, "exec sleep 1000000",
                           node=node),
        ])  # fmt: skip
        checks.wait_running("db-reader")
        data, wal = last_numbers(checks.exec("db-reader", LAST))
        if not one_instant(data, wal):
            raise Failed(f"the restored data ends at {data}, the WAL at {wal}: not one instant")
        wait_for("the writer going on", lambda: writer_at(max(after)), 60, interval=2)
        return (
            f"ready after {took:.0f} s, content labelled for the sidecar for groups, "
            f"{len(cut)} snapshot LVs on {node}; restored: data ends at {data}, WAL at "
            f"{wal} (one instant); the writer went on"
        )

    def deleted() -> str:
        snapshot_contents = {
            s["status"]["boundVolumeSnapshotContentName"] for s in members().values()
        }
        status = cluster.get("volumegroupsnapshot", name, "-n", namespace)["status"]
        content = status["boundVolumeGroupSnapshotContentName"]
        before = set(checks.lvs())
        cluster.delete("pod", "db-reader", "db-writer", namespace=namespace, timeout=120)
        cluster.delete("volumegroupsnapshot", name, namespace=namespace, timeout=180)

        def gone() -> bool:
            left = cluster.get("volumesnapshotcontents")["items"]
            names = {c["metadata"]["name"] for c in left}
            groups = cluster.get("volumegroupsnapshotcontents")["items"]
            return not names & snapshot_contents and not any(
                g["metadata"]["name"] == content for g in groups
            )

        wait_for("the group's contents gone", gone, 180, interval=3)
        wait_for("the group's LVs gone", lambda: len(before - set(checks.lvs())) == len(CLAIMS),
                 60, interval=2)  # fmt: skip
        restored = (f"{c}-restored" for c in CLAIMS)
        cluster.delete("pvc", *CLAIMS, *restored, namespace=namespace, timeout=120)
        return (
            f"the group, its {len(snapshot_contents)} snapshots' contents and their LVs "
            "removed with the VolumeGroupSnapshot"
        )

    taken = "21 a VolumeGroupSnapshot of two PVCs while a pod writes: restored at one instant"
    checks.check(taken, group)
    checks.check("21b deleting the VolumeGroupSnapshot removes its snapshots", deleted,
                 needs=(taken,))  # fmt: skip
