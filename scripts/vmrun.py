"""Run a command where device-mapper works: here when this kernel has it, else
inside one throwaway VM (virtme-ng, QEMU software emulation) that shares this
machine's root filesystem read-only.

    python scripts/vmrun.py [--memory 3G] [--kernel IMAGE] -- COMMAND [ARGS...]

The command runs from the checkout with the project's virtualenv first on
PATH; its exit code becomes ours. Output written to build/vm/ inside the VM
is visible here afterwards.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "build" / "vm"
# Two TCG guests on a 2-core machine starve each other: one VM at a time.
VM_LOCK = Path("/tmp/csi-lvm-vm.lock")


def host_has_device_mapper() -> bool:
    subprocess.run(["modprobe", "dm-thin-pool"], capture_output=True, check=False)
    try:
        misc = Path("/proc/misc").read_text()
    except OSError:
        return False
    return "device-mapper" in misc and Path("/sys/module/dm_thin_pool").exists()


def newest_kernel() -> str:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"), key=os.path.getmtime)
    if not kernels:
        sys.exit("vmrun: no kernel in /boot; run `make setup` (installs linux-image-amd64)")
    return kernels[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", default="3G")
    parser.add_argument("--cpus", default="2")
    parser.add_argument("--force-vm", action="store_true", help="use the VM even if not needed")
    parser.add_argument(
        "--kernel", default="", help="the kernel image to boot (the newest in /boot by default; "
        "one unpacked elsewhere brings its modules from beside it: tools/kernels.py)",
    )  # fmt: skip
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command after --")
    RESULTS.mkdir(parents=True, exist_ok=True)
    guest = ROOT / "scripts" / "guest.sh"
    if not args.force_vm and not args.kernel and host_has_device_mapper():
        return subprocess.call([str(guest), str(RESULTS), *command])
    search_path = f"{ROOT / '.venv' / 'bin'}:{os.environ.get('PATH', '')}"
    vng = shutil.which("vng", path=search_path)
    if vng is None:
        sys.exit("vmrun: virtme-ng (vng) is missing; run `make setup`")
    lock = VM_LOCK.open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("vmrun: another VM is running; waiting for it to end", file=sys.stderr, flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    rc_file = RESULTS / "rc"
    rc_file.unlink(missing_ok=True)
    inner = shlex.join([str(guest), str(RESULTS), *command])
    vm = [
        vng, "--run", args.kernel or newest_kernel(), "--disable-kvm", "--user", "root",
        "--memory", args.memory, "--cpus", args.cpus,
        "--rwdir", str(RESULTS), "--exec", inner,
    ]  # fmt: skip
    # /dev/kvm exists on these machines but guests hang on it: TCG it is.
    subprocess.call(vm, stdin=subprocess.DEVNULL, env={**os.environ, "PATH": search_path})
    if not rc_file.exists():
        print("vmrun: the VM ended without reporting an exit code", file=sys.stderr)
        return 3
    return int(rc_file.read_text().strip() or 3)


if __name__ == "__main__":
    sys.exit(main())
