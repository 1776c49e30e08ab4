"""Session fixtures for the image test: a Docker daemon, the Dockerfile's base
image and the csi-lvm image built from this checkout.

The work is tools/plugin_image.py's (the Kubernetes tier builds the same
image with it); its ImageError fails the test here. Everything works offline:
when no daemon answers, Debian's dockerd is started with --bridge=none
--iptables=false and stopped again at the end; when the base image is missing
it is made with debootstrap from the mirror the machine's apt sources name;
the image is built with the network of the host, so RUN steps reach the
package registries. testcontainers' reaper is switched off (its image cannot
be pulled here): the tests remove what they start themselves.

Images stay in the daemon after the session (the base image and the build
cache make the next run fast), except earlier builds of this test that a new
build untagged; containers and temporary files do not.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"

import docker

from tools.plugin_image import (
    DOCKERFILE,
    ImageError,
    build_image,
    docker_daemon,
    ensure_base_image,
)

IMAGE = "csi-lvm:image-test"
# On the images this test builds, so that it can remove its own older builds.
BUILD_LABELS = {"io.csi-lvm.image-test": "true"}


@contextmanager
def failing_on_image_errors() -> Iterator[None]:
    try:
        yield
    except ImageError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def docker_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[docker.DockerClient]:
    """A client of a running daemon; starts Debian's dockerd when none answers."""
    with failing_on_image_errors(), docker_daemon(tmp_path_factory.mktemp("dockerd")) as host:
        client = docker.DockerClient(base_url=host, timeout=10)
        yield client
        client.close()


@pytest.fixture(scope="session")
def base_image(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> str:
    with failing_on_image_errors():
        return ensure_base_image(DOCKERFILE, tmp_path_factory.mktemp("base-image"))


@pytest.fixture(scope="session")
def image(
    docker_client: docker.DockerClient, base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """The csi-lvm image, built from this checkout with `docker build --network host`."""
    with failing_on_image_errors():
        build_image(IMAGE, tmp_path_factory.mktemp("build") / "build.log", labels=BUILD_LABELS)
    return IMAGE
