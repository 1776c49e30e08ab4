"""A call's time budget: none without a deadline, an answer before any work
when the deadline has passed."""

from __future__ import annotations

import pytest

from csi_lvm.errors import DeadlineExceeded
from csi_lvm.rpc import NO_DEADLINE_SECONDS, budget


class Deadline:
    """The one method of grpc.ServicerContext that ``budget`` reads."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


def test_no_deadline_is_no_budget() -> None:
    assert budget(None) is None
    assert budget(Deadline(None)) is None
    assert budget(Deadline(NO_DEADLINE_SECONDS + 1)) is None


def test_the_time_left_is_the_budget() -> None:
    assert budget(Deadline(7.5)) == 7.5


@pytest.mark.parametrize("remaining", [0.0, -3.0, 0.01])
def test_a_call_past_its_deadline_is_refused_before_any_work(remaining: float) -> None:
    with pytest.raises(DeadlineExceeded, match="nothing was done"):
        budget(Deadline(remaining))
