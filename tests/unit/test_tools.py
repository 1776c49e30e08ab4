"""tools/: the versions the test tiers build agree with what deploy/ runs, and
the installer rewrites a module's own directories with the real go command."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from e2e.plugin import (
    containers,
    image_binary,
    raw_component_deployments,
    raw_daemonset,
    runs_the_plugin_image,
)
from e2e.run import required_binaries
from tools.install import Go, Program, ToolError, ensure, load, replacements

pytestmark = pytest.mark.skipif(shutil.which("go") is None, reason="needs the go command")


def sidecar_images() -> list[str]:
    workloads = (raw_daemonset(), *raw_component_deployments())
    return [c["image"] for w in workloads for c in containers(w) if not runs_the_plugin_image(c)]


def test_every_sidecar_the_deployment_runs_is_built_at_its_image_tag() -> None:
    versions = load()
    built = {name: program.version for program in versions.programs for name in program.names}
    for image in sidecar_images():
        binary, tag = image_binary(image), image.rsplit(":", 1)[1]
        if binary in versions.standins:
            continue
        assert built.get(binary) == tag, f"{image}: tools/versions.toml builds {built.get(binary)}"


def test_the_tiers_need_nothing_the_versions_do_not_give() -> None:
    versions = load()
    assert set(required_binaries()) <= set(versions.program_names())
    assert "csi-sanity" in versions.program_names()
    assert {m.target for m in versions.manifests} == {"crds", "crds/cbt"}


def test_a_modules_own_directories_become_the_published_modules(tmp_path: Path) -> None:
    (tmp_path / "go.mod").write_text(
        "module example.com/m\n\ngo 1.26\n\n"
        "replace example.com/m/client => ./client\n"
        "replace k8s.io/api => k8s.io/api v0.36.1\n"
        "replace k8s.io/apiserver => ./staging/src/k8s.io/apiserver\n"
    )
    program = Program("m", "example.com/m", "v1.0.0", ("cmd/x",),
                      {"example.com/m/client": "v1.2.0", "*": "v0.36.2"})  # fmt: skip
    lines = replacements(Go(tmp_path / "log"), program, tmp_path, tmp_path)
    assert lines == [
        "replace example.com/m/client => example.com/m/client v1.2.0",
        "replace k8s.io/api => k8s.io/api v0.36.1",
        "replace k8s.io/apiserver => k8s.io/apiserver v0.36.2",
    ]


def test_a_directory_without_a_published_version_is_refused_naming_the_setting(
    tmp_path: Path,
) -> None:
    (tmp_path / "go.mod").write_text("module example.com/m\n\nreplace example.com/m/c => ./c\n")
    program = Program("m", "example.com/m", "v1.0.0", ("cmd/x",))
    with pytest.raises(ToolError, match=r"example.com/m/c .*\[program.m\] local"):
        replacements(Go(tmp_path / "log"), program, tmp_path, tmp_path)


def test_a_module_that_cannot_be_had_is_named(tmp_path: Path) -> None:
    versions = tmp_path / "versions.toml"
    versions.write_text(
        '[program.nothing]\nmodule = "github.com/kubernetes-csi/no-such-module"\n'
        'version = "v1.0.0"\ncommands = ["cmd/nothing"]\n'
        "[standins]\ncommands = []\n[manifests]\n"
    )
    with pytest.raises(ToolError, match=r"github.com/kubernetes-csi/no-such-module@v1.0.0 could"):
        ensure(["nothing"], versions_file=versions, root=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*@*")), "a failed build leaves no slot behind"
