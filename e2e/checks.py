"""The checks of issue 17, each reported as one PASS or FAIL line."""

from __future__ import annotations

from typing import Any


def run_checks(cluster: Any, report: Any, stage: str) -> None:
    pass
