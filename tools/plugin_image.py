"""The plugin image, built from this checkout's Dockerfile in Docker on this
host: for the image test (tests/image) and for the Kubernetes tier, which
saves it as a tarball its VM imports with ``ctr images import``.

    python tools/plugin_image.py                     # build csi-lvm:<the DaemonSet's tag>
    python tools/plugin_image.py --save build/vm/e2e-images/csi-lvm.tar

Nothing is pulled from an image registry. When no daemon answers, Debian's
dockerd is started with --bridge=none --iptables=false (no network set-up on
the host) and stopped again afterwards. When the Dockerfile's base image is
missing, it is made from a debootstrap of the same Debian release, from the
mirror the machine's apt sources name, and imported under the name the
Dockerfile's FROM uses. The image is built with the network of the host, so RUN steps reach the
package registries; local CA certificates are passed as EXTRA_CA_CERTS.
Failures raise ImageError, whose message says what failed with the tail of
its log. The command prints how long each step took; exit code 4: no image.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from tools.install import NOT_INSTALLED

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
# The plugin image as the Kubernetes tier's VM imports it (build/vm: the VM sees it).
PLUGIN_IMAGE_TAR = ROOT / "build" / "vm" / "e2e-images" / "csi-lvm.tar"
# dockerd's, debootstrap's and docker build's logs of the command and the tier.
LOG_DIR = ROOT / "build" / "plugin-image"
# On the images the command and the tier build, so that a new build can remove
# the older ones it untagged.
PLUGIN_LABELS = {"io.csi-lvm.plugin-image": "true"}
DEFAULT_SOCKET = "/var/run/docker.sock"
DAEMON_START_SECONDS = 90
DAEMON_STOP_SECONDS = 60
BUILD_SECONDS = 1800
SAVE_SECONDS = 600
# Debian's place for locally added CA certificates. A TLS-inspecting proxy
# between this machine and PyPI signs with one of these; pip in the image's
# build stage must trust it too (see EXTRA_CA_CERTS in the Dockerfile).
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


class ImageError(Exception):
    """The daemon, the base image, the build or the save failed; the message says which."""


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def docker_cli() -> str:
    cli = shutil.which("docker")
    if cli is None:
        raise ImageError("the docker command is not installed (Debian package docker.io)")
    return cli


def docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """One docker command, its output captured; the daemon is DOCKER_HOST's or the default."""
    try:
        return subprocess.run(
            [docker_cli(), *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise ImageError(f"docker {' '.join(args[:2])} took over {timeout:.0f} s") from error


def answers(host: str) -> bool:
    try:
        return docker("--host", host, "version", "--format", "{{.Server.Version}}",
                      timeout=15).returncode == 0  # fmt: skip
    except ImageError:
        return False


def _quiet(message: str) -> None:
    pass


@contextmanager
def docker_daemon(log_dir: Path, say: Callable[[str], None] = _quiet) -> Iterator[str]:
    """The DOCKER_HOST of a daemon that answers. When none does (and DOCKER_HOST
    is not set), Debian's dockerd is started, logging to log_dir/dockerd.log,
    DOCKER_HOST names it for the block's duration, and it is stopped at the end
    (``say`` hears when it answered and when it stopped)."""
    configured = os.environ.get("DOCKER_HOST")
    host = configured or f"unix://{DEFAULT_SOCKET}"
    if answers(host):
        say(f"a docker daemon answers at {host}")
        yield host
        return
    if configured:
        raise ImageError(f"DOCKER_HOST={configured} does not answer; unset it to start dockerd")
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise ImageError(
            "no Docker daemon answers and dockerd is not installed: the plugin image needs "
            "Debian's docker.io (and debootstrap), installed by scripts/setup.sh"
        )
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "dockerd.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            [dockerd, "--bridge=none", "--iptables=false", f"--host={host}"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    launched = time.monotonic()
    try:
        deadline = launched + DAEMON_START_SECONDS
        while not answers(host):
            if daemon.poll() is not None:
                raise ImageError(f"dockerd exited with {daemon.returncode}:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise ImageError(
                    f"dockerd did not answer within {DAEMON_START_SECONDS} s:\n{tail(log)}"
                )
            time.sleep(0.5)
        say(f"started dockerd at {host}, answering in {time.monotonic() - launched:.1f} s")
        os.environ["DOCKER_HOST"] = host
        yield host
    finally:
        os.environ.pop("DOCKER_HOST", None)
        stopping = time.monotonic()
        daemon.terminate()
        try:
            daemon.wait(timeout=DAEMON_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        say(f"stopped dockerd in {time.monotonic() - stopping:.1f} s")


def image_exists(name: str) -> bool:
    return docker("image", "inspect", "--format", "{{.Id}}", name).returncode == 0


def dockerfile_base(dockerfile: Path) -> str:
    bases: set[str] = set(re.findall(r"^FROM\s+(\S+)", dockerfile.read_text(), re.MULTILINE))
    if len(bases) != 1:
        raise ImageError(f"the Dockerfile should build on one base image, it names {sorted(bases)}")
    return bases.pop()


def debian_mirror(suite: str) -> str:
    """The first mirror in the machine's apt sources that serves ``suite``."""
    files: list[Path] = []
    for place in APT_SOURCES:
        if place.is_dir():
            files += sorted(p for p in place.iterdir() if p.suffix in {".list", ".sources"})
        elif place.is_file():
            files.append(place)
    for path in files:
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":  # deb822 stanzas
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = dict(
                    re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE)
                )
                if fields.get("Enabled", "yes").lower() == "no":
                    continue
                if (
                    "deb" in fields.get("Types", "").split()
                    and suite in fields.get("Suites", "").split()
                ):
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                    return words[1]
    raise ImageError(f"no apt source of this machine serves Debian {suite}")


# What a Debian "slim" image leaves out (documentation, manuals, translations).
SLIM_DPKG_EXCLUDES = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
"""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def make_base_image(name: str, workdir: Path) -> None:
    """debootstrap the Debian release ``name`` stands for into workdir/rootfs
    (log: workdir/debootstrap.log) and docker-import it as ``name``."""
    match = re.fullmatch(r"debian:([a-z]+)(-slim)?", name)
    if match is None:
        raise ImageError(f"cannot make base image {name} offline: not a debian:<release> image")
    suite = match[1]
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise ImageError(f"base image {name} is missing and debootstrap is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    rootfs = workdir / "rootfs"
    log = workdir / "debootstrap.log"
    try:
        with log.open("wb") as out:
            done = subprocess.run(
                [debootstrap, "--variant=minbase", suite, str(rootfs), debian_mirror(suite)],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if done.returncode != 0:
            raise ImageError(f"debootstrap {suite} failed ({done.returncode}):\n{tail(log)}")
        if match[2]:  # -slim: drop what the slim images drop, and keep it out
            (rootfs / "etc/dpkg/dpkg.cfg.d/docker-slim").write_text(SLIM_DPKG_EXCLUDES)
            for pattern in ("usr/share/man/*", "usr/share/info/*", "usr/share/locale/*"):
                for path in rootfs.glob(pattern):
                    _remove(path)
            for path in (rootfs / "usr/share/doc").glob("*/*"):
                if path.name != "copyright":
                    _remove(path)
        for pattern in (
            "var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*"
        ):  # fmt: skip
            for path in rootfs.glob(pattern):
                path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            [docker_cli(), "import", "-", name],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            check=False,
        )
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait()
        if tar.returncode != 0 or imported.returncode != 0:
            raise ImageError(f"docker import of {name} failed: {imported.stderr.strip()}")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def ensure_base_image(dockerfile: Path, workdir: Path) -> str:
    """The Dockerfile's base image, made offline in workdir when the daemon lacks it."""
    name = dockerfile_base(dockerfile)
    if not image_exists(name):
        make_base_image(name, workdir)
    return name


def extra_ca_certs() -> str:
    certificates = sorted(LOCAL_CA_DIR.rglob("*.crt")) if LOCAL_CA_DIR.is_dir() else []
    return "\n".join(p.read_text().strip() for p in certificates)


def build_image(
    tag: str, log_path: Path, labels: Mapping[str, str] | None = None, context: Path = ROOT
) -> None:
    """`docker build --network host -t tag` of context's Dockerfile, logging to
    log_path. With labels, earlier builds carrying them that this one untagged
    are removed (the build cache stays)."""
    label_args = [f"{key}={value}" for key, value in (labels or {}).items()]
    command = [docker_cli(), "build", "--network", "host", "-t", tag]
    for label in label_args:
        command += ["--label", label]
    if certificates := extra_ca_certs():
        command += ["--build-arg", f"EXTRA_CA_CERTS={certificates}"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as out:
        try:
            done = subprocess.run(
                [*command, str(context)],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=BUILD_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise ImageError(
                f"docker build took over {BUILD_SECONDS} s:\n{tail(log_path)}"
            ) from error
    if done.returncode != 0:
        raise ImageError(f"docker build failed ({done.returncode}):\n{tail(log_path)}")
    if label_args:  # prune removes only dangling images, and only those with every label
        filters = [arg for label in label_args for arg in ("--filter", f"label={label}")]
        docker("image", "prune", "--force", *filters)


def save_image(tag: str, path: Path) -> None:
    """`docker save` of tag to path (written whole or not at all)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    done = docker("save", "--output", str(partial), tag, timeout=SAVE_SECONDS)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ImageError(f"docker save {tag} failed: {done.stderr.strip()}")
    partial.replace(path)


def deployed_tag() -> str:
    """The image deploy/kubernetes/daemonset.yaml runs the plugin from (csi-lvm:<version>)."""
    # The e2e tier's reader of deploy/ knows which container is the plugin's.
    from e2e.plugin import containers, raw_daemonset, runs_the_plugin_image

    images = {c["image"] for c in containers(raw_daemonset()) if runs_the_plugin_image(c)}
    if len(images) != 1:
        raise ImageError(f"the DaemonSet should run one plugin image, it names {sorted(images)}")
    image: str = images.pop()
    return image


def build_and_save(
    tag: str, tarball: Path | None, log_dir: Path, say: Callable[[str], None]
) -> None:
    """With a daemon (started and stopped here if none answers): the base image,
    the build of tag and, given a tarball, its save there; ``say`` hears each
    step and its time."""
    with docker_daemon(log_dir, say):
        step = time.monotonic()
        base = ensure_base_image(DOCKERFILE, log_dir / "base-image")
        say(f"base image {base} in {time.monotonic() - step:.1f} s")
        step = time.monotonic()
        build_image(tag, log_dir / "build.log", labels=PLUGIN_LABELS)
        say(f"built {tag} in {time.monotonic() - step:.1f} s (log {log_dir / 'build.log'})")
        if tarball is not None:
            step = time.monotonic()
            save_image(tag, tarball)
            size = tarball.stat().st_size / 1e6
            say(f"saved {tarball} ({size:.0f} MB) in {time.monotonic() - step:.1f} s")


def say(message: str) -> None:
    print(f"plugin-image: {message}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tag", help="the image's tag (default: the one the DaemonSet runs)")
    parser.add_argument("--save", type=Path, metavar="TAR", help="docker save the image here")
    parser.add_argument("--log-dir", type=Path, default=LOG_DIR, help=f"default {LOG_DIR}")
    args = parser.parse_args()
    started = time.monotonic()
    try:
        build_and_save(args.tag or deployed_tag(), args.save, args.log_dir, say)
    except ImageError as error:
        say(str(error))
        return NOT_INSTALLED
    say(f"done in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
