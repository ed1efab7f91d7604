"""A machine lease for an agent built without presence (fleetd.agent.lease.MachineLease).

Registered from the start, on a lease id the test sets; `ttl` 0 (the default) turns
PartitionPolicy=stop fencing off, `last_renewed` is what the test says.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field


def _registered() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


@dataclass
class FixedLease:
    lease: int = 1
    last_renewed: float = 0.0
    ttl: float = 0.0
    registered: asyncio.Event = field(default_factory=_registered)
    callbacks: list[Callable[[int], None]] = field(default_factory=list)

    def on_lease_changed(self, callback: Callable[[int], None]) -> None:
        self.callbacks.append(callback)
