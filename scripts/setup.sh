#!/bin/sh
# Installs what csi-lvm's tests, demo and benchmarks need on a fresh Debian
# machine: LVM and filesystem tools, and (for kernels without device-mapper)
# QEMU and a Debian kernel for the VM, openssl for the certificates the
# TLS tests make; then the project's virtualenv.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
packages="lvm2 thin-provisioning-tools xfsprogs e2fsprogs btrfs-progs util-linux kmod udev
    qemu-system-x86 linux-image-amd64 busybox-static docker.io debootstrap
    etcd-server containerd runc containernetworking-plugins iptables openssl
    cryptsetup-bin"
missing=""
for package in $packages; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" \
        || missing="$missing $package"
done
if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
fi
if [ ! -x "$root/.venv/bin/python" ]; then
    python3 -m venv "$root/.venv"
fi
stamp="$root/.venv/.installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$root/.venv/bin/pip" install -q --upgrade pip
    "$root/.venv/bin/pip" install -q -e "$root[test]"
    touch "$stamp"
fi
# The checkout's own top-level packages (tests, bench, sanity, e2e, tools) are
# importable by the venv's python from anywhere, as csi_lvm is: the runners
# and the benchmark import tests.testbed without editing sys.path.
site=$("$root/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
echo "$root" > "$site/csi_lvm_checkout.pth"
echo "setup: ready"
