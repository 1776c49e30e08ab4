"""Session fixtures for the image test: a Docker daemon, the Dockerfile's base
image and the csi-lvm image built from this checkout.

Everything here works offline. When no daemon answers, Debian's dockerd is
started with --bridge=none --iptables=false (no network set-up on the host)
and stopped again at the end. When the base image is missing, it is made from
a debootstrap of the same Debian release, from the mirror the machine's apt
sources name, and imported under the name the Dockerfile's FROM uses. The
image is built with the network of the host, so RUN steps reach the package
registries. testcontainers' reaper is switched off (its image cannot be
pulled here): the tests remove what they start themselves.

Images stay in the daemon after the session (the base image and the build
cache make the next run fast), except earlier builds of this test that a new
build untagged; containers and temporary files do not.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"

import docker
import docker.errors

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
IMAGE = "csi-lvm:image-test"
# On the images this test builds, so that it can remove its own older builds.
BUILD_LABEL = "io.csi-lvm.image-test=true"
DEFAULT_SOCKET = "/var/run/docker.sock"
DAEMON_START_SECONDS = 90
BUILD_SECONDS = 1800
# Debian's place for locally added CA certificates. A TLS-inspecting proxy
# between this machine and PyPI signs with one of these; pip in the image's
# build stage must trust it too (see EXTRA_CA_CERTS in the Dockerfile).
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _client(host: str) -> docker.DockerClient | None:
    try:
        client = docker.DockerClient(base_url=host, timeout=10)
        client.ping()
    except docker.errors.DockerException:
        return None
    return client


def docker_cli() -> str:
    cli = shutil.which("docker")
    if cli is None:
        pytest.fail("the docker command is not installed (Debian package docker.io)")
    return cli


@pytest.fixture(scope="session")
def docker_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[docker.DockerClient]:
    """A client of a running daemon; starts Debian's dockerd when none answers."""
    configured = os.environ.get("DOCKER_HOST")
    host = configured or f"unix://{DEFAULT_SOCKET}"
    client = _client(host)
    if client is not None:
        yield client
        client.close()
        return
    if configured:
        pytest.fail(
            f"DOCKER_HOST={configured} does not answer; unset it to let the test start dockerd"
        )
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        pytest.fail(
            "no Docker daemon answers and dockerd is not installed: the image test needs "
            "Debian's docker.io (and debootstrap), installed by scripts/setup.sh"
        )
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            [dockerd, "--bridge=none", "--iptables=false", f"--host=unix://{DEFAULT_SOCKET}"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + DAEMON_START_SECONDS
        while (client := _client(host)) is None:
            if daemon.poll() is not None:
                pytest.fail(f"dockerd exited with {daemon.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"dockerd did not answer within {DAEMON_START_SECONDS}s:\n{_tail(log)}")
            time.sleep(0.5)
        os.environ["DOCKER_HOST"] = host
        yield client
        client.close()
    finally:
        os.environ.pop("DOCKER_HOST", None)
        daemon.terminate()
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def dockerfile_base() -> str:
    bases = set(re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE))
    if len(bases) != 1:
        pytest.fail(f"the Dockerfile should build on one base image, it names {sorted(bases)}")
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
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
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
    pytest.fail(f"no apt source of this machine serves Debian {suite}")


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


def make_base_image(name: str, workdir: Path) -> None:
    """debootstrap the Debian release ``name`` stands for and docker-import it as ``name``."""
    match = re.fullmatch(r"debian:([a-z]+)(-slim)?", name)
    if match is None:
        pytest.fail(f"cannot make base image {name} offline: not a debian:<release> image")
    suite = match[1]
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        pytest.fail(f"base image {name} is missing and debootstrap is not installed")
    rootfs = workdir / "rootfs"
    log = workdir / "debootstrap.log"
    with log.open("wb") as out:
        done = subprocess.run(
            [debootstrap, "--variant=minbase", suite, str(rootfs), debian_mirror(suite)],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode != 0:
        pytest.fail(f"debootstrap {suite} failed ({done.returncode}):\n{_tail(log)}")
    if match[2]:  # -slim: drop what the slim images drop, and keep it out
        (rootfs / "etc/dpkg/dpkg.cfg.d/docker-slim").write_text(SLIM_DPKG_EXCLUDES)
        for pattern in ("usr/share/man/*", "usr/share/info/*", "usr/share/locale/*"):
            for path in rootfs.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        for path in (rootfs / "usr/share/doc").glob("*/*"):
            if path.name != "copyright":
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*"):
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
    shutil.rmtree(rootfs, ignore_errors=True)
    if tar.returncode != 0 or imported.returncode != 0:
        pytest.fail(f"docker import of {name} failed: {imported.stderr.strip()}")


@pytest.fixture(scope="session")
def base_image(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> str:
    name = dockerfile_base()
    try:
        docker_client.images.get(name)
    except docker.errors.ImageNotFound:
        make_base_image(name, tmp_path_factory.mktemp("base-image"))
    return name


def extra_ca_certs() -> str:
    certificates = sorted(LOCAL_CA_DIR.rglob("*.crt")) if LOCAL_CA_DIR.is_dir() else []
    return "\n".join(p.read_text().strip() for p in certificates)


@pytest.fixture(scope="session")
def image(
    docker_client: docker.DockerClient, base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """The csi-lvm image, built from this checkout with `docker build --network host`."""
    command = [docker_cli(), "build", "--network", "host", "--label", BUILD_LABEL, "-t", IMAGE]
    if certificates := extra_ca_certs():
        command += ["--build-arg", f"EXTRA_CA_CERTS={certificates}"]
    log = tmp_path_factory.mktemp("build") / "build.log"
    with log.open("wb") as out:
        try:
            done = subprocess.run(
                [*command, str(ROOT)],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=BUILD_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"docker build took over {BUILD_SECONDS}s:\n{_tail(log)}")
    if done.returncode != 0:
        pytest.fail(f"docker build failed ({done.returncode}):\n{_tail(log)}")
    # Earlier builds of this test that the new one untagged.
    docker_client.images.prune(filters={"dangling": True, "label": BUILD_LABEL})
    return IMAGE
