"""Signals: Ctrl-C and SIGTERM must lead to a teardown, and must not cut one short."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    del signum, frame
    raise KeyboardInterrupt


def terminate_as_interrupt() -> None:
    """Make SIGTERM raise KeyboardInterrupt like Ctrl-C, so `up` tears down what it built
    when a test runner or a supervisor stops it (Python's default for SIGTERM is to die on
    the spot, leaving mounts, a bridge and containers behind)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done (then raise KeyboardInterrupt):
    half a teardown is worse than a slow one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        del frame
        received.append(signum)

    previous = {sig: signal.signal(sig, remember) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            raise KeyboardInterrupt
