"""Per-key try-locks: a second call for a key already in flight is ABORTED.

CSI sidecars retry ABORTED calls, so refusing (rather than queueing) keeps a
slow LVM command from piling up duplicate work behind it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from csi_lvm.errors import Aborted


class KeyedLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held: set[str] = set()

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        """Hold every key at once, or raise Aborted naming the busy one."""
        wanted = self._take(keys)
        try:
            yield
        finally:
            self._let_go(wanted)

    @contextmanager
    def hold_within(self, seconds: float, *keys: str) -> Iterator[None]:
        """As ``hold``, trying again for up to ``seconds`` while a key is
        busy (its holder has been asked to stop)."""
        give_up = time.monotonic() + seconds
        while True:
            try:
                wanted = self._take(keys)
                break
            except Aborted:
                if time.monotonic() > give_up:
                    raise
                time.sleep(0.05)
        try:
            yield
        finally:
            self._let_go(wanted)

    def _take(self, keys: tuple[str, ...]) -> list[str]:
        wanted = sorted(set(keys))
        with self._guard:
            for key in wanted:
                if key in self._held:
                    raise Aborted(
                        f"an operation on {key} is already in progress; retry when it has finished"
                    )
            self._held.update(wanted)
        return wanted

    def _let_go(self, wanted: list[str]) -> None:
        with self._guard:
            self._held.difference_update(wanted)
