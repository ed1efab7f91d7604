"""Waiting on a condition with a deadline, for tests that run fleetd (or the simulator)
in-process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest


async def wait_for(cond: Callable[[], Awaitable[bool]], what: str, within: float = 20.0) -> None:
    """Poll `cond` until it is true; fail the test after `within` seconds."""
    deadline = time.monotonic() + within
    while not await cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_until(cond: Callable[[], bool], within: float = 5.0, what: str = "") -> float:
    """Poll a plain `cond` every 10 ms until true; returns the seconds it took. Fails the test
    at the deadline."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > within:
            pytest.fail(f"timed out after {within}s waiting for {what or cond}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start
