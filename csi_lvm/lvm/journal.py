"""The journal of the changes the driver sends to LVM: which LVs each one
named, and when it started and ended, counted. A report taken while the
count stood still shows every change; one taken before a change may show the
LVs it named wrong, and only those need reading again.

In memory and per process: the verbs (``commands``) write it, the kept view
above this package reads it. No I/O.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence

# How many touched LVs the journal keeps (a reader of an older report
# rereads everything).
_TOUCHED_KEPT = 4096


class ChangeJournal:
    def __init__(self) -> None:
        self._changes = 0
        self._lock = threading.Lock()
        # The LVs each recent change named, with the count at its start and
        # at its end (and whether it ended by removing them): what a report
        # older than those counts may show wrong.
        self._touched: collections.deque[tuple[int, str, str, bool]] = collections.deque()
        self._forgotten = 0  # the highest count whose entries were dropped

    @property
    def changes(self) -> int:
        """Counts the starts and ends of changes: a report taken while the
        count stood still shows all of them."""
        return self._changes

    def changed(self, touches: Sequence[tuple[str, str]], removed: bool = False) -> None:
        """A change that names ``touches`` (volume group, name) starts, or
        ends (``removed``: by removing them)."""
        with self._lock:
            self._changes += 1
            for volume_group, name in touches:
                self._touched.append((self._changes, volume_group, name, removed))
            while len(self._touched) > _TOUCHED_KEPT:
                self._forgotten = self._touched.popleft()[0]

    def touched_since(self, count: int) -> dict[tuple[str, str], tuple[int, bool]] | None:
        """The LVs (volume group, name) that changes named since ``changes``
        stood at ``count`` (a change under way then is included), each with
        the count of the latest of them and whether it removed the LV; None
        when the journal no longer reaches back that far."""
        with self._lock:
            if count < self._forgotten:
                return None
            # Newest first, and only back to ``count``: every stats call asks,
            # and the journal holds thousands of the driver's older changes.
            touched: dict[tuple[str, str], tuple[int, bool]] = {}
            for seen, volume_group, name, removed in reversed(self._touched):
                if seen <= count:
                    break
                touched.setdefault((volume_group, name), (seen, removed))
            return touched
