"""Calls that want an LVM report at the same time share one, and each gets a
report that started after it asked."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from csi_lvm.errors import DeadlineExceeded, Internal
from csi_lvm.kept_view import Scan, ScanBatcher


class SlowScans:
    def __init__(self, seconds: float = 0.2, fail: int = 0) -> None:
        self.seconds, self.fail = seconds, fail
        self.started: list[float] = []
        self.lock = threading.Lock()

    def __call__(self, timeout: float | None) -> Scan:
        with self.lock:
            self.started.append(time.monotonic())
            number = len(self.started)
        time.sleep(self.seconds)
        if number <= self.fail:
            raise Internal("lvs failed")
        return Scan((), {})


def test_concurrent_callers_share_reports_that_started_after_they_asked() -> None:
    scans = SlowScans()
    batcher = ScanBatcher(scans)

    def call(_: int) -> float:
        asked = time.monotonic()
        batcher.get(10)
        return asked

    with ThreadPoolExecutor(16) as pool:
        asked = list(pool.map(call, range(16)))
    assert len(scans.started) <= 3  # one running when most arrive, one after it
    assert all(any(s >= a for s in scans.started) for a in asked)


def test_a_sequential_caller_always_gets_a_new_report() -> None:
    scans = SlowScans(seconds=0)
    batcher = ScanBatcher(scans)
    for _ in range(3):
        batcher.get(None)
    assert len(scans.started) == 3


def test_a_failed_report_is_not_shared() -> None:
    scans = SlowScans(fail=1)
    batcher = ScanBatcher(scans)
    results: list[object] = []

    def call() -> None:
        try:
            results.append(batcher.get(10))
        except Internal as exc:
            results.append(exc)

    first = threading.Thread(target=call)
    first.start()
    time.sleep(0.05)
    second = threading.Thread(target=call)  # waits for the failing one, then runs its own
    second.start()
    first.join()
    second.join()
    assert isinstance(results[0], Internal) and isinstance(results[1], Scan)
    assert len(scans.started) == 2


def test_a_waiter_gives_up_at_its_deadline() -> None:
    batcher = ScanBatcher(SlowScans(seconds=1.0))
    runner = threading.Thread(target=batcher.get, args=(10,))
    runner.start()
    time.sleep(0.05)
    with pytest.raises(DeadlineExceeded):
        batcher.get(0.2)
    runner.join()


def test_a_recent_report_is_reused_until_it_is_old_or_the_driver_changed_something() -> None:
    scans, changes = SlowScans(seconds=0.0), [0]
    batcher = ScanBatcher(scans, lambda: changes[0])
    first = batcher.get(10)
    assert batcher.recent(60, 10) is first and len(scans.started) == 1
    changes[0] += 1  # the driver made or removed an LV: its effect must show at once
    second = batcher.recent(60, 10)
    assert second is not first and len(scans.started) == 2
    assert batcher.recent(60, 10) is second
    time.sleep(0.05)
    assert batcher.recent(0.01, 10) is not second and len(scans.started) == 3
