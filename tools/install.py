"""Install the upstream programs and manifests the test tiers run, at the
versions tools/versions.toml pins, built with the Go toolchain from the Go
module proxy into a cache outside the checkout.

    python tools/install.py          # build what is missing; print the tool directory

Each module at its version is built once into ~/.cache/csi-lvm/tools/<module>@<version>/
and reused by every later run; the tiers get one directory (the last line
printed) holding every program and the manifests directories. Nothing is built
in the checkout. Exit code 4: a module could not be had or built, named.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSIONS = HERE / "versions.toml"
STANDINS = HERE / "standins"
NOT_INSTALLED = 4
# Kubernetes' binaries learn their own version from these packages' variables
# (its build sets them with -X); without them they say v0.0.0 and their
# compatibility version is wrong.
VERSION_PACKAGES = ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")


class ToolError(Exception):
    """A program or manifest could not be installed; the message names it."""


@dataclass(frozen=True)
class Program:
    """One module at one version and the commands it builds."""

    key: str
    module: str
    version: str
    commands: tuple[str, ...]
    local: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [command.rsplit("/", 1)[-1] for command in self.commands]

    @property
    def slot(self) -> str:
        return f"{self.module.replace('/', '_')}@{self.version}"


@dataclass(frozen=True)
class Manifests:
    """A directory of a published module, copied to `target` in the tool directory."""

    target: str
    module: str
    version: str
    directory: str


@dataclass(frozen=True)
class Versions:
    programs: tuple[Program, ...]
    standins: tuple[str, ...]
    manifests: tuple[Manifests, ...]

    def program_names(self) -> list[str]:
        return [name for p in self.programs for name in p.names] + list(self.standins)


def load(path: Path = VERSIONS) -> Versions:
    data = tomllib.loads(path.read_text())
    programs = tuple(
        Program(key, t["module"], t["version"], tuple(t["commands"]), dict(t.get("local", {})))
        for key, t in data["program"].items()
    )
    manifests = tuple(
        Manifests(target, t["module"], t["version"], t["directory"])
        for target, t in data["manifests"].items()
    )
    return Versions(programs, tuple(data["standins"]["commands"]), manifests)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "csi-lvm" / "tools"


class Go:
    """The go command, with its output kept in a log rather than on the terminal."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod", "GOWORK": "off"}

    def run(self, args: list[str], cwd: Path, what: str) -> str:
        with self.log.open("a") as log:
            log.write(f"$ (cd {cwd} && go {' '.join(args)})\n")
        done = subprocess.run(["go", *args], cwd=cwd, env=self.env, capture_output=True,
                              text=True, check=False)  # fmt: skip
        with self.log.open("a") as log:
            log.write(done.stdout + done.stderr)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
            raise ToolError(f"{what}: go {args[0]} failed (log {self.log}):\n{tail}")
        return done.stdout

    def module_dir(self, module: str, version: str, cwd: Path) -> Path:
        """The module's files in Go's module cache, downloaded if missing."""
        what = f"{module}@{version}"
        done = subprocess.run(["go", "mod", "download", "-json", what], cwd=cwd, env=self.env,
                              capture_output=True, text=True, check=False)  # fmt: skip
        try:
            info = json.loads(done.stdout)
        except json.JSONDecodeError:
            info = {"Error": done.stderr.strip()}
        if "Error" in info or "Dir" not in info:
            reason = str(info.get("Error", done.stderr)).strip().splitlines()[0]
            raise ToolError(f"{what} could not be had from the Go module proxy: {reason}. "
                            "Check that `go env GOPROXY` is reachable and that "
                            "tools/versions.toml names a version it serves.")  # fmt: skip
        return Path(info["Dir"])


def replacements(go: Go, program: Program, source: Path, scratch: Path) -> list[str]:
    """The module's own replace directives, each directory of its repository
    swapped for that module as published."""
    edits = json.loads(go.run(["mod", "edit", "-json", str(source / "go.mod")], scratch,
                              program.slot))  # fmt: skip
    lines = []
    for replace in edits.get("Replace") or []:
        old, new = replace["Old"]["Path"], replace["New"]
        if new.get("Version"):
            lines.append(f"replace {old} => {new['Path']} {new['Version']}")
            continue
        version = program.local.get(old) or program.local.get("*")
        if version is None:
            raise ToolError(f"{program.slot}: its go.mod replaces {old} with {new['Path']}; "
                            f"name the published version in tools/versions.toml "
                            f"([program.{program.key}] local)")  # fmt: skip
        lines.append(f"replace {old} => {old} {version}")
    return lines


def build_program(go: Go, program: Program, slot: Path) -> None:
    """Build every command of one module version in a scratch module of the cache:
    require the module, keep its replacements, let Go resolve the rest."""
    scratch = slot.with_name(slot.name + ".partial")
    with building(scratch):
        compile_program(go, program, scratch)
    shutil.rmtree(slot, ignore_errors=True)
    scratch.rename(slot)


@contextmanager
def building(scratch: Path) -> Iterator[None]:
    """A fresh scratch directory, gone again if the build fails."""
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "bin").mkdir(parents=True)
    try:
        yield
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def compile_program(go: Go, program: Program, scratch: Path) -> None:
    (scratch / "go.mod").write_text("module csi-lvm.test/tools\n\ngo 1.26\n")
    source = go.module_dir(program.module, program.version, scratch)
    lines = replacements(go, program, source, scratch)
    with (scratch / "go.mod").open("a") as mod:
        mod.write("\n".join(lines) + "\n")
    packages = [f"{program.module}/{command}" for command in program.commands]
    go.run(["get", *(f"{package}@{program.version}" for package in packages)], scratch,
           program.slot)  # fmt: skip
    ldflags = "-s -w"
    if program.module == "k8s.io/kubernetes":
        major, minor = program.version.lstrip("v").split(".")[:2]
        for package in VERSION_PACKAGES:
            ldflags += (f" -X {package}.gitVersion={program.version}"
                        f" -X {package}.gitMajor={major} -X {package}.gitMinor={minor}"
                        f" -X {package}.gitTreeState=clean")  # fmt: skip
    for package, name in zip(packages, program.names, strict=True):
        go.run(["build", "-trimpath", f"-ldflags={ldflags}", "-o", f"bin/{name}", package],
               scratch, f"{program.slot} {name}")  # fmt: skip


def standins_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(STANDINS.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(STANDINS)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def build_standins(go: Go, names: tuple[str, ...], slot: Path) -> None:
    scratch = slot.with_name(slot.name + ".partial")
    with building(scratch):
        for name in names:
            go.run(["build", "-trimpath", "-ldflags=-s -w", "-o", str(scratch / "bin" / name),
                    f"./{name}"], STANDINS, f"stand-in {name}")  # fmt: skip
    shutil.rmtree(slot, ignore_errors=True)
    scratch.rename(slot)


@contextmanager
def locked(root: Path) -> Iterator[None]:
    """One installer at a time per cache (two tiers may start together)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def say(message: str) -> None:
    print(f"tools: {message}", file=sys.stderr, flush=True)


def ensure(
    names: Collection[str] | None = None, versions_file: Path = VERSIONS, root: Path | None = None
) -> Path:
    """The programs called `names` (default: all) and every manifest of
    versions_file, built where missing; the directory that holds them
    (programs at its top, manifests below)."""
    if shutil.which("go") is None:
        raise ToolError("the go command is missing: install Go 1.26 or newer")
    versions = load(versions_file)
    unknown = set(names or ()) - set(versions.program_names())
    if unknown:
        raise ToolError(f"tools/versions.toml names no program {', '.join(sorted(unknown))}")
    root = root or cache_root()
    with locked(root):
        go = Go(root / "install.log")
        slots: dict[str, Path] = {}
        for program in versions.programs:
            if names is not None and not set(program.names) & set(names):
                continue
            slot = root / program.slot
            if not all((slot / "bin" / name).is_file() for name in program.names):
                say(f"building {program.module}@{program.version} "
                    f"({', '.join(program.names)})")  # fmt: skip
                started = time.monotonic()
                build_program(go, program, slot)
                say(f"  built in {time.monotonic() - started:.0f} s")
            for name in program.names:
                slots[name] = slot / "bin" / name
        if names is None or set(versions.standins) & set(names):
            standins = root / f"standins@{standins_digest()}"
            if not all((standins / "bin" / name).is_file() for name in versions.standins):
                say(f"building the stand-ins ({', '.join(versions.standins)})")
                build_standins(go, versions.standins, standins)
            for name in versions.standins:
                slots[name] = standins / "bin" / name
        return assemble(go, versions, root, slots)


def assemble(go: Go, versions: Versions, root: Path, slots: dict[str, Path]) -> Path:
    """One directory for this set of versions: links to the programs, copies of
    the manifests."""
    key = hashlib.sha256(json.dumps({k: str(v) for k, v in slots.items()}, sort_keys=True)
                         .encode() + VERSIONS.read_bytes()).hexdigest()[:12]  # fmt: skip
    target = root / f"set-{key}"
    if (target / ".complete").exists():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for name, path in slots.items():
        (partial / name).symlink_to(path)
    for manifests in versions.manifests:
        source = go.module_dir(manifests.module, manifests.version, root)
        # copyfile: the module cache's files are read-only, the copies need not be.
        target_dir = partial / manifests.target
        shutil.copytree(source / manifests.directory, target_dir, copy_function=shutil.copyfile)
        for directory in [target_dir, *target_dir.rglob("*")]:
            if directory.is_dir():
                directory.chmod(0o755)
    (partial / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.parse_args()
    started = time.monotonic()
    try:
        directory = ensure()
    except ToolError as error:
        say(str(error))
        return NOT_INSTALLED
    say(f"ready in {time.monotonic() - started:.0f} s")
    print(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
