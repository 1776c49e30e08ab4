#!/bin/sh
# Runs a command inside the VM (or on a host with device-mapper): loads the
# kernel modules LVM needs, puts the project's virtualenv first on PATH, runs
# the command from the checkout and records its exit code in RESULTS/rc.
results=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
for module in loop dm-mod dm-thin-pool dm-snapshot dm-crypt dm-raid dm-integrity btrfs; do
    modprobe "$module" 2>/dev/null
done
# virtme-ng hides the host's /etc/lvm under an empty tmpfs; a real node has
# lvm2's files there (lvm.conf, and the command profile the driver's lvm shell
# needs), so show them. Writes go to the VM's overlay of /etc.
if [ ! -e /etc/lvm/lvm.conf ] && mountpoint -q /etc/lvm; then
    umount /etc/lvm
fi
export PATH="$root/.venv/bin:$PATH" PYTHONDONTWRITEBYTECODE=1 LVM_SUPPRESS_FD_WARNINGS=1
export TMPDIR=/tmp
cd "$root" || exit 3
"$@"
rc=$?
echo "$rc" > "$results/rc"
exit "$rc"
