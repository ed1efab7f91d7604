"""The event loop shape the engine and the agent share: follow several watched prefixes from
one revision, absorb each burst of events, then act once; act on a timer too when idle.

A watch that breaks (etcd unreachable, compaction) ends `follow` with its error, and the
caller resyncs from a fresh snapshot: events are never half-applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

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


async def follow(
    watch: Callable[[str, int], AsyncGenerator[list[WatchEvent], None]],
    prefixes: Sequence[str],
    start_revision: int,
    stop: asyncio.Event,
    *,
    on_event: Callable[[WatchEvent], None],
    act: Callable[[], Awaitable[None]],
    idle_interval: float | Callable[[], float],
    batch_window: Callable[[], float],
    interrupt: asyncio.Event | None = None,
) -> None:
    """Until `stop`: absorb events (waiting `batch_window()` for a burst to finish), then
    `act()`; with no event for `idle_interval` seconds, `act()` anyway (the safety pass).
    A callable `idle_interval` is asked before each wait (the engine shortens it to end a
    grace on time).

    When `interrupt` is set, clear it and return: the caller resyncs from a fresh snapshot."""
    queue: asyncio.Queue[Item] = asyncio.Queue()
    pumps = [asyncio.ensure_future(_pump(watch(p, start_revision), queue)) for p in prefixes]
    stop_task = asyncio.ensure_future(stop.wait())
    interrupt_task = asyncio.ensure_future(interrupt.wait()) if interrupt is not None else None
    waited: set[asyncio.Future[Any]] = {stop_task}
    if interrupt_task is not None:
        waited.add(interrupt_task)
    getter: asyncio.Future[Item] | None = None

    def absorb(item: Item) -> None:
        if isinstance(item, BaseException):
            raise item
        for event in item:
            on_event(event)

    try:
        while not stop.is_set():
            if interrupt is not None and interrupt.is_set():
                interrupt.clear()
                return
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait(
                {getter, *waited},
                timeout=idle_interval() if callable(idle_interval) else idle_interval,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if interrupt is not None and interrupt.is_set():
                getter.cancel()
                continue  # returns at the top of the loop
            if getter in done:
                absorb(getter.result())
                await asyncio.sleep(batch_window())
                while not queue.empty():
                    absorb(queue.get_nowait())
            else:
                getter.cancel()
            if not stop.is_set():
                await act()
    finally:
        stop_task.cancel()
        if interrupt_task is not None:
            interrupt_task.cancel()
        if getter is not None:
            getter.cancel()  # cancelled (a crash) while waiting: no task left pending
        for p in pumps:
            p.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _pump(events: AsyncGenerator[list[WatchEvent], None], queue: asyncio.Queue[Item]) -> None:
    try:
        async with contextlib.aclosing(events):
            async for batch in events:
                queue.put_nowait(batch)
    except asyncio.CancelledError:
        raise
    except BaseException as e:  # handed to the loop, which re-raises it
        queue.put_nowait(e)


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
