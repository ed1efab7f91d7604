"""The retry waits of the engine and agent loops (fleetd.watching.Backoff)."""

from __future__ import annotations

from fleetd.watching import RETRY_CEILING, Backoff


def test_doubles_up_to_the_ceiling() -> None:
    backoff = Backoff(initial=0.5)
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 2.0, 2.0]
    assert RETRY_CEILING == 2.0


def test_reset_after_etcd_answered_starts_over() -> None:
    """A long outage must not leave the next blip waiting at the ceiling."""
    backoff = Backoff(initial=0.5, ceiling=8.0)
    for _ in range(10):
        backoff.next()
    assert backoff.next() == 8.0
    backoff.reset()
    assert backoff.next() == 0.5
