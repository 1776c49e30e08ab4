"""Small helpers the servicers share: the call's time budget and the paging
of list answers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import grpc

from csi_lvm.errors import Aborted, DeadlineExceeded, InvalidArgument
from csi_lvm.ids import ObjectId

T = TypeVar("T")

# Calls without a deadline report an effectively infinite time remaining.
NO_DEADLINE_SECONDS = 24 * 3600
# Less than this left is no time at all: no LVM command or mount fits in it.
MINIMUM_BUDGET_SECONDS = 0.05


def budget(context: grpc.ServicerContext | None) -> float | None:
    """Seconds left before the caller's deadline, or None when it set none.

    Every servicer asks before its first side effect, so a call that arrives
    with its deadline passed (a sidecar's queue, a slow network) is answered
    DEADLINE_EXCEEDED having done nothing."""
    remaining = context.time_remaining() if context is not None else None
    if remaining is None or remaining > NO_DEADLINE_SECONDS:
        return None
    if remaining < MINIMUM_BUDGET_SECONDS:
        raise DeadlineExceeded(
            "the call's deadline had passed when csi-lvm took it up; nothing was done: retry "
            "with a longer deadline"
        )
    return float(remaining)


def paged(
    items: Sequence[T], key: Callable[[T], str], max_entries: int, token: str
) -> tuple[list[T], str]:
    """One page of ``items`` (sorted by ``key``, an object's id) after
    ``token``, and the next token.

    A token is the id of the last item of the previous page, so items deleted
    or added between pages never make a page skip or repeat a survivor."""
    if max_entries < 0:
        raise InvalidArgument("max_entries must not be negative")
    start = 0
    if token:
        if ObjectId.parse(token) is None:
            raise Aborted(f"starting_token {token!r} is not a token this driver issued")
        start = next((i for i, item in enumerate(items) if key(item) > token), len(items))
    end = len(items) if max_entries == 0 else start + max_entries
    chosen = list(items[start:end])
    next_token = key(chosen[-1]) if end < len(items) and chosen else ""
    return chosen, next_token
