"""Check 22: an encrypted PVC as deploy/examples/11-encrypted.yaml makes it.

The admin's key-encryption key goes into the Secret the StorageClass names
as the node-stage secret; a pod writes a marker on the PVC. Then: the pod
reads it back, the volume's LV is a LUKS2 volume opened as a dm-crypt
mapping, and the LV's raw blocks hold no copy of the marker. A snapshot of
the PVC restores, with the same class and Secret, into a PVC a second pod
reads. Check 22b deletes them: their LVs go, the plugin's log records that
each one's keys were destroyed first, and the key is nowhere in that log.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable
from typing import Any

from csi_lvm import crypt
from e2e.procs import Failed, run, wait_for
from tests.testbed import raw_holds

SECRET = "csi-lvm-encryption-key"  # noqa: S105 - the Secret's name, not a key
CLASS = "csi-lvm-encrypted"
CLAIM, RESTORED, SNAPSHOT = "sealed-data", "sealed-restored", "sealed-snapshot"
MARKER = "csi-lvm-e2e-plaintext-marker-7f3a"
WRITE = f"i=0; while [ $i -lt 200 ]; do echo {MARKER}; i=$((i+1)); done > /data/m; sync"
READ = "head -n 1 /data/m; wc -l < /data/m"
TIMEOUT = 240


def open_mappings() -> set[str]:
    out = run(["dmsetup", "info", "-c", "--noheadings", "-o", "name"])
    return {line.strip() for line in out.splitlines() if line.strip()}


def encryption_checks(
    checks: Any,
    pvc: Callable[..., dict[str, Any]],
    pod: Callable[..., dict[str, Any]],
    example: Callable[[str], list[dict[str, Any]]],
    namespace: str,
) -> None:
    cluster = checks.cluster
    key = secrets.token_urlsafe(48)

    def lv_of(claim: str) -> tuple[str, str, str]:
        """The claim's device class, LV name and vg/lv."""
        handle = checks.pv_of(claim)["spec"]["csi"]["volumeHandle"]
        device_class, lv_name = handle.split(":")[1:]
        found = [name for name in checks.lvs() if name.endswith(f"/{lv_name}")]
        if len(found) != 1:
            raise Failed(f"the LV of {claim} ({lv_name}) is not found once: {found}")
        return device_class, lv_name, found[0]

    def sealed() -> str:
        storage_class = next(o for o in example("11-encrypted.yaml") if o["kind"] == "StorageClass")
        storage_class["provisioner"] = checks.rendered.driver_name
        parameters = storage_class["parameters"]
        parameters["csi.storage.k8s.io/node-stage-secret-namespace"] = checks.plugin_namespace
        cluster.apply([
            {"apiVersion": "v1", "kind": "Secret",
             "metadata": {"name": SECRET, "namespace": checks.plugin_namespace},
             "stringData": {crypt.KEY_FIELD: key}},
            storage_class,
            pvc(CLAIM, "64Mi", CLASS),
            pod("sealed-writer", CLAIM, WRITE),
        ])  # fmt: skip
        checks.wait_running("sealed-writer")
        wait_for("the marker written", lambda: checks.exec("sealed-writer", READ).split()[-1:]
                 == ["200"], 60, interval=2)  # fmt: skip
        device_class, lv_name, vg_lv = lv_of(CLAIM)
        device = f"/dev/{vg_lv}"
        kind = run(["blkid", "-p", "-o", "value", "-s", "TYPE", device]).strip()
        if kind != "crypto_LUKS":
            raise Failed(f"the LV {vg_lv} holds {kind!r}, not a LUKS2 header")
        mapping = crypt.mapping_name(device_class, lv_name)
        if mapping not in open_mappings():
            raise Failed(f"no dm-crypt mapping {mapping} is open for the staged volume")
        if raw_holds(device, MARKER.encode()):
            raise Failed(f"the marker the pod wrote is in the clear on {vg_lv}")
        took = checks.take_snapshot(SNAPSHOT, CLAIM, TIMEOUT)
        node = checks.pv_node(CLAIM)
        cluster.apply([
            pvc(RESTORED, "96Mi", CLASS, source={"apiGroup": "snapshot.storage.k8s.io",
                                                 "kind": "VolumeSnapshot", "name": SNAPSHOT}),
            pod("sealed-reader", RESTORED, "true", node=node),
        ])  # fmt: skip
        checks.wait_running("sealed-reader")
        first, lines = checks.exec("sealed-reader", READ).split()
        if (first, lines) != (MARKER, "200"):
            raise Failed(f"the restore reads {first!r} and {lines} lines")
        return (
            f"{vg_lv} on {node} is LUKS2, opened as {mapping}; the pod's marker is not on "
            f"the raw LV; the snapshot (ready after {took:.0f} s) restores into a PVC that "
            "opens with the same Secret and reads the marker"
        )

    def erased() -> str:
        before = set(checks.lvs())
        lvs = {lv_of(claim)[2] for claim in (CLAIM, RESTORED)}
        cluster.delete("pod", "sealed-writer", "sealed-reader", namespace=namespace, timeout=120)
        # Both at once: what is waited for is the LVs.
        cluster.delete("volumesnapshot", SNAPSHOT, namespace=namespace, wait=False)
        cluster.delete("pvc", CLAIM, RESTORED, namespace=namespace, wait=False)
        wait_for("the encrypted LVs gone", lambda: not lvs & set(checks.lvs()), TIMEOUT,
                 interval=3)  # fmt: skip
        gone = before - set(checks.lvs())
        logs = plugin_logs(checks)
        destroyed = logs.count('"keys destroyed"')
        if destroyed < len(gone):
            raise Failed(f"{len(gone)} LVs removed, but only {destroyed} keys-destroyed lines")
        if key in logs:
            raise Failed("the key-encryption key is in the plugin's log")
        cluster.delete("storageclass", CLASS, timeout=60)
        cluster.delete("secret", SECRET, namespace=checks.plugin_namespace, timeout=60)
        return (
            f"{len(gone)} LVs (the volume, its snapshot, the restore) removed, each after its "
            "keys were destroyed; the key is not in the plugin's log"
        )

    taken = "22 an encrypted PVC: only ciphertext on its LV; its snapshot restores with the key"
    checks.check(taken, sealed)
    checks.check("22b deleting encrypted volumes destroys their keys first", erased,
                 needs=(taken,))  # fmt: skip


def plugin_logs(checks: Any) -> str:
    """The csi-lvm containers' logs of every plugin pod."""
    texts = []
    for pod in checks.plugin_pods().values():
        done = subprocess.run(
            [str(checks.cluster.bin / "kubectl"), f"--kubeconfig={checks.cluster.admin}", "logs",
             "-n", checks.plugin_namespace, pod["metadata"]["name"], "-c", "csi-lvm"],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        texts.append(done.stdout)
    return "\n".join(texts)
