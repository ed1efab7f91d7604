"""fleetctl's poll schedule while blocking (fleetctl/waiting.py): fleet's windows, early polls."""

from __future__ import annotations

import itertools

import pytest

from fleetctl.waiting import ATTEMPT_SECONDS, POLL_INTERVAL, _delays


@pytest.mark.parametrize("attempts", [1, 2, 10])
def test_the_last_poll_falls_where_fleets_does(attempts: int) -> None:
    delays = list(_delays(attempts))
    fleet_polls = round(attempts * ATTEMPT_SECONDS / POLL_INTERVAL)
    assert sum(delays) == pytest.approx((fleet_polls - 1) * POLL_INTERVAL)
    assert len(delays) == fleet_polls + 2  # two more polls, both in the first interval


def test_first_interval_is_split_then_fleets_period() -> None:
    delays = list(itertools.islice(_delays(0), 8))  # 0: wait forever
    assert delays[0] == 0.0
    assert delays[1:4] == pytest.approx([0.05, 0.1, 0.1])
    assert sum(delays[1:4]) == pytest.approx(POLL_INTERVAL)
    assert delays[4:] == [POLL_INTERVAL] * 4
