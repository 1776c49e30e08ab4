"""Pod images made offline, as tarballs that ``ctr images import`` takes.

Each image is one layer written here: Debian's static busybox with a link per
applet (the test pods and the sandbox's pause process), or one static binary
(a sidecar) as its entrypoint. The format is the one ``docker save`` writes:
manifest.json, the image config and the layer, uncompressed.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
# The plugin's image as `docker save` writes it, built on the host (the VM sees build/vm).
PLUGIN_IMAGE_TAR = (
    Path(__file__).resolve().parent.parent / "build" / "vm" / "e2e-images" / "csi-lvm.tar"
)


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, 0
    tar.addfile(info)


def _add_link(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = tarfile.SYMTYPE, target, 0
    tar.addfile(info)


def _write_image(path: Path, ref: str, layer: bytes, entrypoint: list[str]) -> Path:
    layer_sha = hashlib.sha256(layer).hexdigest()
    config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_sha}"]},
        "history": [{"created_by": "csi-lvm e2e/images.py"}],
    }).encode()  # fmt: skip
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [ref], "Layers": [f"{layer_sha}/layer.tar"]}]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        _add_file(tar, config_name, config, 0o644)
        _add_dir(tar, layer_sha)
        _add_file(tar, f"{layer_sha}/layer.tar", layer, 0o644)
        _add_file(tar, "manifest.json", json.dumps(manifest).encode(), 0o644)
    return path


def busybox_image(path: Path, ref: str, entrypoint: list[str]) -> Path:
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("bin", "tmp", "etc", "proc", "sys", "dev", "data"):
            _add_dir(tar, directory, 0o1777 if directory == "tmp" else 0o755)
        _add_file(tar, "bin/busybox", BUSYBOX.read_bytes())
        for applet in applets:
            if applet != "busybox":
                _add_link(tar, f"bin/{applet}", "busybox")
        _add_file(tar, "etc/passwd", b"root:x:0:0:root:/:/bin/sh\n", 0o644)
        _add_file(tar, "etc/group", b"root:x:0:\n", 0o644)
    return _write_image(path, ref, buffer.getvalue(), entrypoint)


def binary_image(path: Path, ref: str, binary: Path) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        _add_dir(tar, "tmp", 0o1777)
        _add_file(tar, binary.name, binary.read_bytes())
    return _write_image(path, ref, buffer.getvalue(), [f"/{binary.name}"])
