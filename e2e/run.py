"""The Kubernetes end-to-end tier: a cluster of two nodes with the real
kubelets, scheduler, controllers, and csi-lvm's DaemonSet as pods, in the test VM.

    python e2e/run.py              # on the host: installs the binaries, boots the VM
    python e2e/run.py --inside DIR # what runs inside the VM (DIR: the binaries)

The Kubernetes and sidecar binaries are built at the versions
tools/versions.toml pins (tools/install.py, cached); the plugin image is built
with Docker on the host and saved for the VM (tools/plugin_image.py). Exit
codes: 0 every check passed, 1 some check failed, 4 a binary or the plugin
image could not be had, or a Debian program is missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from e2e.checks import CBT_CRD, LISTER, run_checks
from e2e.cluster import (
    KUBE_BINARIES,
    Cluster,
    cgroup_controllers,
    loopback_addresses,
    missing_debian_programs,
    writable_var_lib,
)
from e2e.images import binary_image
from e2e.plugin import sidecar_binaries, sidecar_images
from e2e.procs import Failed, Processes
from tools.install import NOT_INSTALLED, ToolError, ensure
from tools.plugin_image import LOG_DIR, PLUGIN_IMAGE_TAR, ImageError, build_and_save, deployed_tag

ROOT = Path(__file__).resolve().parent.parent

# Besides the DaemonSet's sidecars (read from deploy/kubernetes/daemonset.yaml).
CLUSTER_BINARIES = (*KUBE_BINARIES, "snapshot-controller")
RESULTS = ROOT / "build" / "vm" / "e2e"
STAGES = ("cluster", "plugin", "groups", "encryption", "all")


class Report:
    """One PASS or FAIL line per check, flushed as it happens."""

    def __init__(self) -> None:
        self.failures = 0
        self.start = time.monotonic()

    def _line(self, verdict: str, check: str, detail: str) -> None:
        clock = time.monotonic() - self.start
        suffix = f" ({detail})" if detail else ""
        print(f"[{clock:6.0f}s] {verdict} {check}{suffix}", flush=True)

    def passed(self, check: str, detail: str = "") -> None:
        self._line("PASS", check, detail)

    def failed(self, check: str, detail: str) -> None:
        self.failures += 1
        self._line("FAIL", check, detail)


def required_binaries() -> list[str]:
    return [*CLUSTER_BINARIES, *sidecar_binaries(), LISTER]


def find_missing(directory: Path) -> list[str]:
    missing = [name for name in required_binaries() if not os.access(directory / name, os.X_OK)]
    if not (directory / "crds" / "kustomization.yaml").exists():
        missing.append("crds/ (the VolumeSnapshot CRDs with their kustomization.yaml)")
    if not (directory / CBT_CRD).exists():
        missing.append(f"{CBT_CRD} (the SnapshotMetadataService CRD)")
    return missing


def host_main(stage: str, kernel: str | None = None) -> int:
    programs = missing_debian_programs()
    if programs:
        print(f"e2e: missing Debian programs: {', '.join(programs)}; run `make setup`.",
              file=sys.stderr)  # fmt: skip
        return NOT_INSTALLED
    try:
        directory = ensure(required_binaries())
    except ToolError as error:
        print(f"e2e: {error}", file=sys.stderr)
        return NOT_INSTALLED
    missing = find_missing(directory)
    if missing:
        print(f"e2e: tools/versions.toml gives no {', '.join(missing)}", file=sys.stderr)
        return NOT_INSTALLED
    start = time.monotonic()
    try:
        tag = deployed_tag()
        build_and_save(
            tag, PLUGIN_IMAGE_TAR, LOG_DIR, lambda line: print(f"e2e: {line}", flush=True)
        )
    except ImageError as error:
        print(f"e2e: the plugin image could not be built: {error}", file=sys.stderr)
        return NOT_INSTALLED
    print(f"e2e: plugin image {tag} in {PLUGIN_IMAGE_TAR} after "
          f"{time.monotonic() - start:.0f} s", flush=True)  # fmt: skip
    vmrun = [sys.executable, str(ROOT / "scripts" / "vmrun.py"), "--force-vm", "--memory", "8G"]
    if kernel:
        vmrun += ["--kernel", kernel]
    # This checkout's modules, whichever checkout the virtualenv was made from.
    command = ["env", f"PYTHONPATH={ROOT}", "python", "e2e/run.py", "--inside", str(directory),
               "--stage", stage]  # fmt: skip
    start = time.monotonic()
    code = subprocess_call([*vmrun, "--", "timeout", "3600", *command])
    print(f"e2e: VM wall time {time.monotonic() - start:.0f} s, exit {code}", flush=True)
    return code


def subprocess_call(command: list[str]) -> int:
    return subprocess.call(command)


def pod_images(directory: Path, made: Path) -> list[Path]:
    """The tarballs of the workloads' images: the plugin's (built on the
    host) and one per upstream sidecar, made from its binary."""
    if not PLUGIN_IMAGE_TAR.exists():
        raise Failed(f"no plugin image at {PLUGIN_IMAGE_TAR}: the host side builds it")
    # Read over the host's share once, not by both nodes' imports at once.
    start = time.monotonic()
    made.mkdir(parents=True, exist_ok=True)
    plugin = Path(shutil.copyfile(PLUGIN_IMAGE_TAR, made / PLUGIN_IMAGE_TAR.name))
    print(f"         the plugin image copied into the VM's memory in "
          f"{time.monotonic() - start:.0f} s", flush=True)  # fmt: skip
    return [plugin] + [
        binary_image(made / f"{binary}.tar", image, directory / binary)
        for image, binary in sidecar_images().items()
    ]


def inside_main(directory: Path, stage: str, keep: bool) -> int:
    report = Report()
    scratch = Path(tempfile.mkdtemp(prefix="csi-lvm-e2e-", dir="/tmp"))
    # A tmpfs of its own: the VM's /tmp is an overlay, and overlayfs (containerd's
    # snapshots, the /var/lib overlay) refuses an upper directory on an overlay.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700", "e2e-scratch", str(scratch)],
                   check=True)  # fmt: skip
    # The logs go straight to build/vm/e2e, which the host sees while the VM runs.
    shutil.rmtree(RESULTS, ignore_errors=True)
    RESULTS.mkdir(parents=True)
    procs = Processes(RESULTS)
    cluster = Cluster(directory, scratch, procs)
    try:
        loopback_addresses()
        cgroup_controllers()
        writable_var_lib(scratch)
        cluster.start(report, pod_images(directory, scratch / "images"))
        if stage == "cluster":
            cluster.wait_ready(report)
            cluster.wait_images()
        else:
            run_checks(cluster, report, stage)
    except Failed as error:
        report.failed("the tier stopped", str(error))
    finally:
        cpu_summary(RESULTS / "cpu.txt")
        if hasattr(cluster, "api"):
            print(f"         {cluster.api_summary()}", flush=True)
        if keep:
            print(f"e2e: kept running; scratch {scratch}", flush=True)
        else:
            procs.stop_all()
            cluster.kill_shims()
    total = time.monotonic() - report.start
    verdict = "PASS" if report.failures == 0 else f"FAIL ({report.failures} failed)"
    print(f"e2e: {verdict} in {total:.0f} s; logs in {RESULTS}", flush=True)
    return 0 if report.failures == 0 else 1


def cpu_summary(path: Path, shown: int = 12) -> None:
    """The CPU time each program has used in the VM, most first: the tier runs
    on two emulated cores, and this says what its time went to."""
    listing = subprocess.run(["ps", "-eo", "cputimes=,comm="], capture_output=True, text=True)
    used: dict[str, int] = {}
    for line in listing.stdout.splitlines():
        seconds, _, program = line.strip().partition(" ")
        if seconds.isdigit():
            used[program.strip()] = used.get(program.strip(), 0) + int(seconds)
    ranked = sorted(used.items(), key=lambda item: -item[1])
    path.write_text("".join(f"{seconds:8d} s  {program}\n" for program, seconds in ranked))
    top = ", ".join(f"{program} {seconds} s" for program, seconds in ranked[:shown])
    print(f"         CPU time by program (live processes; all in {path.name}): {top}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--inside", metavar="DIR", help="run here, binaries from DIR")
    parser.add_argument(
        "--stage",
        choices=STAGES,
        default="all",
        help="stop after this stage (groups, encryption: the plugin, then check 21 or 22 alone)",
    )
    parser.add_argument("--keep", action="store_true", help="leave the cluster running")
    parser.add_argument("--kernel", metavar="IMAGE", help="boot the VM with this kernel image")
    args = parser.parse_args()
    if args.inside:
        return inside_main(Path(args.inside), args.stage, args.keep)
    return host_main(args.stage, args.kernel)


if __name__ == "__main__":
    sys.exit(main())
