"""The agent's view of its machine's lease, which presence keeps.

Presence is the lease in fleetd and in the simulator; unit tests hand in a fixed one
(tests/unit/fixed_lease.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol


class MachineLease(Protocol):
    """What the agent needs of its machine's lease (fleetd.presence.Presence is one).

    The agent only reads it: presence keeps the lease; the agent publishes its unit states on
    it, fences PartitionPolicy=stop units when it goes unrenewed, and follows the schedule
    only while the machine is registered.
    """

    @property
    def lease(self) -> int:
        """The live lease id; 0 while there is none (not registered yet, or lost)."""
        ...

    @property
    def last_renewed(self) -> float:
        """Clock time (the agent's clock) of the lease's last renewal; 0 if never."""
        ...

    @property
    def ttl(self) -> float:
        """The lease's TTL in seconds, fixed for the holder's life; 0 turns fencing off."""
        ...

    @property
    def registered(self) -> asyncio.Event:
        """Set while this machine is registered on the lease."""
        ...

    def on_lease_changed(self, callback: Callable[[int], None]) -> None:
        """Call `callback` with the new lease id whenever the machine registers on another."""
        ...
