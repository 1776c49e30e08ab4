"""Run the upstream csi-sanity suite against csi-lvm, once per device class.

    python sanity/run.py            # on the host: installs the binary, boots the VM
    python sanity/run.py --inside BINARY   # what runs inside the VM

csi-sanity is built at the version tools/versions.toml pins (tools/install.py,
cached). Exit codes: 0 every spec passed, 1 some spec failed, 4 csi-sanity
could not be installed (the message names the module).
"""

from __future__ import annotations

import argparse
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.testbed import Driver, LoopVolumeGroup, write_config
from tools.install import NOT_INSTALLED, ToolError, ensure

ROOT = Path(__file__).resolve().parent.parent

# The last is the thin class with encryption: every stage opens LUKS2 with
# the node-stage secret csi-sanity passes.
CLASSES = ("thin", "thick", "vault")
ENCRYPTED_CLASS = (
    "  - name: vault\n    volumeGroup: {vg}\n    thinPool: {pool}\n"
    "    overprovisionRatio: 20\n    encryption: luks2\n"
)
# csi-sanity's default test volume is 10 GiB, and a thick snapshot or restore
# copies every byte of it: under TCG that made the thick run ten times the thin
# one. 64 MiB exercises the same specs (growth doubles it).
TEST_VOLUME_BYTES = 64 * 1024 * 1024
SUMMARY = re.compile(r"^(Ran \d+ of \d+ Specs.*|(SUCCESS|FAIL)! -- .*)$")


def host_main() -> int:
    try:
        binary = str(ensure(["csi-sanity"]) / "csi-sanity")
    except ToolError as error:
        print(f"sanity: {error}", file=sys.stderr)
        return NOT_INSTALLED
    vmrun = [sys.executable, str(ROOT / "scripts" / "vmrun.py"), "--memory", "4G"]
    return subprocess.call([*vmrun, "--", "python", "sanity/run.py", "--inside", binary])


def inside_main(binary: str, focus: str | None) -> int:
    work = Path(tempfile.mkdtemp(prefix="csi-sanity-", dir="/tmp"))
    vg = LoopVolumeGroup(work, name="sanityvg", size="16G", pool_size="4G").create()
    config = write_config(work / "config.yaml", vg.name, vg.pool, ratio=20)
    with config.open("a") as classes:
        classes.write(ENCRYPTED_CLASS.format(vg=vg.name, pool=vg.pool))
    # A random key-encryption key, as csi-sanity's node-stage secret.
    keys = work / "secrets.yaml"
    keys.write_text(f"NodeStageVolumeSecret:\n  key: {secrets.token_hex(32)}\n")
    driver = Driver(work, config)
    failed = False
    try:
        driver.start()
        for device_class in CLASSES:
            parameters = work / f"{device_class}.yaml"
            parameters.write_text(f"deviceClass: {device_class}\n")
            # A VolumeAttributesClass's parameters, for the ModifyVolume specs.
            mutable = work / f"{device_class}-mutable.yaml"
            mutable.write_text('readIOPS: "2000"\nwriteBytesPerSecond: "64Mi"\n')
            command = [
                binary,
                f"-csi.endpoint=unix://{driver.socket}",
                f"-csi.testvolumeparameters={parameters}",
                f"-csi.testvolumemutableparameters={mutable}",
                f"-csi.testvolumesize={TEST_VOLUME_BYTES}",
                f"-csi.stagingdir={work}/staging-{device_class}",
                f"-csi.mountdir={work}/mount-{device_class}",
                f"-csi.junitfile={ROOT}/build/vm/sanity-{device_class}.xml",
                "-ginkgo.no-color",
                f"-csi.secrets={keys}",
            ]
            if focus:
                command.append(f"-ginkgo.focus={focus}")
            log_path = ROOT / "build" / "vm" / f"sanity-{device_class}.log"
            with open(log_path, "w") as log:
                code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
            failed |= code != 0
            print(f"== csi-sanity, device class {device_class} (exit {code}, log {log_path})")
            for line in log_path.read_text().splitlines():
                if SUMMARY.match(line.strip()):
                    print("   " + line.strip())
    finally:
        driver.stop()
        vg.destroy()
        shutil.copy(driver.log_path, ROOT / "build" / "vm" / "sanity-driver.log")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inside", metavar="BINARY", help="run in this VM with BINARY")
    parser.add_argument("--focus", help="only specs matching this regular expression")
    args = parser.parse_args()
    if args.inside:
        return inside_main(args.inside, args.focus)
    return host_main()


if __name__ == "__main__":
    sys.exit(main())
