"""Waiting on an async condition with a deadline, for tests that run fleetd in-process."""

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
