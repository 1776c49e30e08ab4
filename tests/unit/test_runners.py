"""The runners (bench, sanity, e2e, the demo) import the driver and the test
bed as packages: `make setup` puts the checkout on the venv's path, so none
edits sys.path and each starts from any directory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATH_EDIT = re.compile(r"sys\.path\.(insert|append|extend)\(")
RUNNERS = (
    "bench/run.py",
    "bench/profile_scale.py",
    "sanity/run.py",
    "e2e/run.py",
    "tools/plugin_image.py",
)


def test_no_runner_edits_sys_path() -> None:
    editing = [
        str(path.relative_to(ROOT))
        for folder in ("bench", "sanity", "e2e", "scripts", "tests", "tools")
        for path in (ROOT / folder).rglob("*.py")
        if PATH_EDIT.search(path.read_text())
    ]
    assert not editing, editing


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_runner_starts_from_another_directory(runner: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / runner), "--help"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")
