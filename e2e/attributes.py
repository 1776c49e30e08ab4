"""Check 23: a running pod's PVC moves to another VolumeAttributesClass, as
deploy/examples/12-io-limits.yaml shows it.

The PVC is made in the steady class; its pod runs. The PVC is patched to the
throttled class: the resizer's modify controller calls ControllerModifyVolume
(through whichever plugin leads, passed on to the volume's node), the PVC's
status names the new class, and the pod's cgroup io.max holds the new
limits for the volume's device. A timed write of the pod's, before and
after, is reported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from csi_lvm.io_limits import PodCgroups
from e2e.procs import Failed, wait_for

CLAIM, WRITER = "limited-data", "limited-writer"
STEADY, THROTTLED = "csi-lvm-io-steady", "csi-lvm-io-throttled"
WRITE_MIB = 4
# The pod writes WRITE_MIB MiB past the page cache, timed in whole seconds.
TIMED_WRITE = (
    f"s=$(date +%s); dd if=/dev/zero of=/data/timed bs=1048576 count={WRITE_MIB} conv=fsync "
    "2>/dev/null; echo $(( $(date +%s) - s ))"
)
TIMEOUT = 240


def attribute_checks(
    checks: Any,
    pod: Callable[..., dict[str, Any]],
    example: Callable[[str], list[dict[str, Any]]],
    namespace: str,
) -> None:
    cluster = checks.cluster

    def changed_on_a_running_pod() -> str:
        # The example's classes and PVC; the tier's own pod (its local image).
        objects = [o for o in example("12-io-limits.yaml") if o["kind"] != "Pod"]
        for made in objects:
            if made["kind"] == "VolumeAttributesClass":
                made["driverName"] = checks.rendered.driver_name
            else:
                made["metadata"]["namespace"] = namespace
        cluster.apply([*objects, pod(WRITER, CLAIM, "true")])
        checks.wait_running(WRITER)
        uid = cluster.get("pod", WRITER, "-n", namespace)["metadata"]["uid"]
        cgroup = PodCgroups("/sys/fs/cgroup").find(uid)
        if cgroup is None:
            raise Failed(f"pod {WRITER}'s cgroup (pod{uid}) is not under /sys/fs/cgroup")
        before = io_max(cgroup)
        if not any("wbps=67108864" in line for line in before):
            raise Failed(f"the steady class's limit is not in {cgroup}/io.max: {before}")
        free = int(checks.exec(WRITER, TIMED_WRITE).split()[-1])
        moved = {"spec": {"volumeAttributesClassName": THROTTLED}}
        cluster.merge("pvc", CLAIM, moved, namespace=namespace)

        def current() -> str:
            claim = cluster.get("pvc", CLAIM, "-n", namespace)
            return str(claim.get("status", {}).get("currentVolumeAttributesClassName", ""))

        try:
            took = wait_for("the PVC in the throttled class", lambda: current() == THROTTLED,
                            TIMEOUT, interval=3)  # fmt: skip
        except Failed as late:
            said = "; ".join(checks.events_of(CLAIM)) or "no event on the PVC"
            raise Failed(f"{late} (class now {current()!r}; {said})") from None
        after = io_max(cgroup)
        if not any("wbps=1048576" in line and "riops=200" in line for line in after):
            raise Failed(f"the throttled limits are not in {cgroup}/io.max: {after}")
        # Reported, not judged: a buffered write's writeback is charged to
        # the pod only where the kernel's cgroup writeback follows it
        # (tests/lvm/test_modify.py measures direct writes).
        limited = int(checks.exec(WRITER, TIMED_WRITE).split()[-1])
        return (
            f"{STEADY} -> {THROTTLED} in {took:.0f} s with the pod running; io.max "
            f"{after[0]!r}; {WRITE_MIB} MiB written in {free} s before, {limited} s after"
        )

    def cleaned_up() -> str:
        cluster.delete("pod", WRITER, namespace=namespace, timeout=120)
        cluster.delete("pvc", CLAIM, namespace=namespace, timeout=120)
        cluster.delete("volumeattributesclass", STEADY, THROTTLED, timeout=60)
        return "pod, PVC and classes deleted"

    changed = "23 a VolumeAttributesClass change reaches a running pod's io.max"
    checks.check(changed, changed_on_a_running_pod)
    checks.check("23b the IO-limited PVC deleted", cleaned_up, needs=(changed,))


def io_max(cgroup: Path) -> list[str]:
    return (cgroup / "io.max").read_text().splitlines()
