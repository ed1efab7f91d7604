"""The timer grid and StopWaiter (fleetd/watching.py): shared wakeups for periodic sleeps."""

from __future__ import annotations

import asyncio
import time

import pytest

from fleetd.watching import TIMER_GRID, StopWaiter, grid_delay


def test_grid_delay_ends_on_the_next_grid_point() -> None:
    assert grid_delay(10.0, 13.3) == pytest.approx(3.5)
    assert grid_delay(10.1, 13.5) == pytest.approx(3.4)  # on a point already: that point
    # Timers due anywhere within one grid step end together.
    assert {round(10.0 + grid_delay(10.0, at), 9) for at in (13.26, 13.3, 13.49)} == {13.5}


def test_grid_delay_early_never_passes_the_deadline() -> None:
    for at in (16.66, 16.5, 16.74, 16.75):
        delay = grid_delay(10.0, at, early=True)
        assert 10.0 + delay <= at
        assert at - (10.0 + delay) < TIMER_GRID
    assert grid_delay(10.0, 9.0, early=True) == 0.0  # past already: no negative sleep
    assert grid_delay(10.0, 9.0) == 0.0


async def test_stop_waiter_sleeps_then_returns() -> None:
    waiter = StopWaiter(asyncio.Event())
    started = time.monotonic()
    await waiter.sleep(0.05)
    assert time.monotonic() - started >= 0.04
    waiter.close()


async def test_stop_waiter_is_cut_short_by_stop_and_then_never_sleeps() -> None:
    stop = asyncio.Event()
    waiter = StopWaiter(stop)
    sleeping = asyncio.ensure_future(waiter.sleep(3600))
    await asyncio.sleep(0)
    stop.set()
    await asyncio.wait_for(sleeping, 2)
    await asyncio.wait_for(waiter.sleep(3600), 2)  # stopped: returns at once
    waiter.close()


async def test_cancelled_sleeps_then_stop_raise_nothing() -> None:
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    stop = asyncio.Event()
    waiter = StopWaiter(stop)
    for _ in range(3):
        sleeping = asyncio.ensure_future(waiter.sleep(3600))
        await asyncio.sleep(0)
        sleeping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeping
    stop.set()
    await asyncio.wait_for(waiter.sleep(3600), 2)
    for _ in range(3):
        await asyncio.sleep(0)
    assert errors == []
    waiter.close()
