"""The timers of fleetd's long-running loops: retry backoff, sleeps cut short by stop, and the
grid that lets timers falling due together share one wakeup.

Following the registry's watches is the registry's own job (fleetd/registry/mirror.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import math

from fleetd.registry.kv import WatchEvent

Item = list[WatchEvent] | BaseException

# The etcd channel retries its connection at least every 2 s (fleetd/etcd/client.py), so
# waiting longer between attempts only delays the resume after an outage.
RETRY_CEILING = 2.0

# Periodic timers (lease renewals, the fence check) end on multiples of this many seconds of
# the monotonic clock, so timers that fall due close together share one wakeup of the event
# loop. Spread out, each timer costs a wakeup of its own, which on this 2-core box is about
# 0.13 ms of CPU: 1,000 simulated machines renewing every 3.3 s then spent 4 % of a core on
# wakeups alone. A quarter second is small beside any TTL fleet accepts (>= 1 s).
TIMER_GRID = 0.25


def grid_delay(now: float, at: float, *, early: bool = False, grid: float = TIMER_GRID) -> float:
    """Seconds from `now` to `at` moved onto the timer grid: the first grid point at or after
    `at`, or with `early` the last one at or before it (for a deadline that must not be
    missed); never less than 0."""
    steps = at / grid
    point = (math.floor(steps) if early else math.ceil(steps)) * grid
    return max(0.0, point - now)


class Backoff:
    """Waits between retries of a loop whose attempts can each run for hours (a watch).

    The wait doubles from `initial` to `ceiling` while etcd fails, and goes back to `initial`
    as soon as an attempt got through (`reset`): resetting only when a whole attempt ended
    well would never happen for a watch, and a fleetd that waited out one long outage would
    then wait the longest after every later blip.
    """

    def __init__(self, initial: float = 0.5, ceiling: float = RETRY_CEILING) -> None:
        self.initial = initial
        self.ceiling = ceiling
        self.current = initial

    def next(self) -> float:
        wait = self.current
        self.current = min(self.current * 2, self.ceiling)
        return wait

    def reset(self) -> None:
        self.current = self.initial


class StopWaiter:
    """Sleeps cut short by `stop`, for a loop that sleeps often (a lease renewal, the fence
    check: each once per TTL/3 per machine, forever).

    `stop` is awaited by one task for the waiter's whole life, and each sleep is a timer and
    a future. `asyncio.wait_for(stop.wait(), t)` instead creates a task per sleep and, when
    the time is up, cancels it and waits a loop iteration for the cancellation: at 1,000
    simulated machines that was a third of an idle simulator's CPU.
    """

    def __init__(self, stop: asyncio.Event) -> None:
        self._stopped = asyncio.ensure_future(stop.wait())

    async def sleep(self, seconds: float) -> None:
        stopped = self._stopped
        if stopped.done():
            return
        waiter = stopped.get_loop().create_future()

        def wake(_: object = None) -> None:
            if not waiter.done():
                waiter.set_result(None)

        timer = stopped.get_loop().call_later(seconds, wake)
        stopped.add_done_callback(wake)
        try:
            await waiter
        finally:
            timer.cancel()
            stopped.remove_done_callback(wake)

    def close(self) -> None:
        self._stopped.cancel()


async def sleep_or_stop(
    stop: asyncio.Event, seconds: float, wake: asyncio.Event | None = None
) -> None:
    """Sleep `seconds`, or less if `stop` (or `wake`, when given) is set meanwhile."""
    if wake is None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
        return
    waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())}
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
