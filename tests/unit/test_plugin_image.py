"""tools/plugin_image.py without a daemon: what it builds and where the
Kubernetes tier's VM finds it, and how it reads the machine's apt sources."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from csi_lvm import __version__
from tools import plugin_image
from tools.plugin_image import (
    DOCKERFILE,
    PLUGIN_IMAGE_TAR,
    ROOT,
    ImageError,
    debian_mirror,
    deployed_tag,
    docker_daemon,
    dockerfile_base,
)


def test_the_tier_builds_the_image_the_daemonset_runs() -> None:
    assert deployed_tag() == f"csi-lvm:{__version__}"


def test_the_tarball_is_where_the_vm_sees_it() -> None:
    assert PLUGIN_IMAGE_TAR.is_relative_to(ROOT / "build" / "vm")  # scripts/vmrun.py's --rwdir


def test_the_base_image_is_one_that_can_be_made_offline() -> None:
    assert re.fullmatch(r"debian:[a-z]+(-slim)?", dockerfile_base(DOCKERFILE))


def test_the_mirror_comes_from_either_format_of_apt_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = tmp_path / "sources.list.d"
    sources.mkdir()
    (sources / "a.sources").write_text(
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb deb-src\nURIs: http://one.example/debian\nSuites: trixie bookworm-updates\n"
    )
    (sources / "b.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://two.example/debian bookworm main\n"
    )
    monkeypatch.setattr(plugin_image, "APT_SOURCES", (tmp_path / "sources.list", sources))
    assert debian_mirror("trixie") == "http://one.example/debian"
    assert debian_mirror("bookworm") == "http://two.example/debian"
    with pytest.raises(ImageError, match="serves Debian sid"):
        debian_mirror("sid")


@pytest.mark.skipif(shutil.which("docker") is None, reason="needs the docker command")
def test_a_docker_host_that_does_not_answer_is_an_error_not_a_new_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/none.sock")
    with pytest.raises(ImageError, match="does not answer"), docker_daemon(tmp_path):
        pass
    assert not (tmp_path / "dockerd.log").exists()
