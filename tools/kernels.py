"""A newer Linux for the VM: Debian's backports kernel, unpacked into a cache.

    python -m tools.kernels        # prints the kernel image's path

The test VMs boot this machine's own kernel (Debian 12's 6.1). Some of the
driver's behaviour depends on the kernel: a group snapshot freezes mounted
filesystems, and LVM may snapshot a frozen filesystem only on kernels that
let a freeze nest (6.1 refuses with EBUSY, 6.12 does not). So those tests
also run on ``<release>-backports``' ``linux-image-amd64``, fetched with apt
from the mirror the machine's sources name (the package is never installed:
it is unpacked into ~/.cache/csi-lvm/kernels/<version>/ and booted from
there; virtme-ng links its modules into the VM).
"""

from __future__ import annotations

import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from tools.install import cache_root
from tools.plugin_image import debian_mirror

PACKAGE = "linux-image-amd64"


def release() -> str:
    """The machine's Debian release name (bookworm)."""
    for line in Path("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME":
            return value.strip('"')
    raise SystemExit("kernels: /etc/os-release names no VERSION_CODENAME")


def apt(args: list[str], lists: Path, sources: Path, cwd: Path | None = None) -> str:
    options = [
        "-o", f"Dir::Etc::sourcelist={sources}", "-o", "Dir::Etc::sourceparts=-",
        "-o", f"Dir::State::Lists={lists}", "-o", "APT::Get::List-Cleanup=0",
        # The download lands in a scratch directory of root's.
        "-o", "APT::Sandbox::User=root",
    ]  # fmt: skip
    done = subprocess.run([*args[:1], *options, *args[1:]], capture_output=True, text=True,
                          check=False, timeout=900, cwd=cwd)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"kernels: {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def newer_kernel(root: Path | None = None) -> Path:
    """The backports kernel's image, fetched and unpacked on first use."""
    base = (root or cache_root()).parent / "kernels"
    found = sorted(base.glob("*/boot/vmlinuz-*"))
    if found:
        return found[-1]
    suite = f"{release()}-backports"
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        sources = work / "sources.list"
        sources.write_text(f"deb {debian_mirror(release())} {suite} main\n")
        lists = work / "lists"
        (lists / "partial").mkdir(parents=True)
        apt(["apt-get", "update"], lists, sources)
        # linux-image-amd64 is a metapackage: the image is what it depends on.
        depends = apt(["apt-cache", "depends", f"{PACKAGE}/{suite}"], lists, sources)
        image = next((line.split()[-1] for line in depends.splitlines()
                      if "Depends: linux-image-" in line), None)  # fmt: skip
        if image is None:
            raise SystemExit(f"kernels: {PACKAGE} in {suite} depends on no linux-image")
        apt(["apt-get", "download", image], lists, sources, cwd=work)
        deb = next(work.glob("*.deb"))
        version = image.removeprefix("linux-image-")
        target = base / version
        unpacking = base / f".{version}.partial"
        subprocess.run(["rm", "-rf", str(unpacking)], check=True)
        unpacking.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacking)], check=True, timeout=900)
        subprocess.run(["depmod", "-a", "-b", str(unpacking), version], check=True, timeout=900)
        unpacking.rename(target)
    return next(target.glob("boot/vmlinuz-*"))


def main() -> int:
    if platform.machine() != "x86_64":
        print(f"kernels: only amd64 is fetched, not {platform.machine()}", file=sys.stderr)
        return 2
    print(newer_kernel())
    return 0


if __name__ == "__main__":
    sys.exit(main())
