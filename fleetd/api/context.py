"""What the API handlers share: the registry, limits, liveness callbacks and caches."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from fleetd import __version__
from fleetd.api.live import LiveListings
from fleetd.api.snapshots import SnapshotCache
from fleetd.registry.registry import Registry
from fleetd.unit.file import MAX_UNIT_BYTES

if TYPE_CHECKING:
    from fleetd.api.metrics import Metrics

T = TypeVar("T")


def _always() -> bool:
    return True


def _never() -> bool:
    return False


@dataclass
class ApiContext:
    registry: Registry
    machine_id: str = ""
    token_limit: int = 100
    max_unit_bytes: int = MAX_UNIT_BYTES
    version: str = __version__
    # fleet answers 503 until the machine is registered in etcd (presence.registered).
    registered: Callable[[], bool] = _always
    is_leader: Callable[[], bool] = _never
    metrics: Metrics | None = None
    # The latest listing of each collection, reused by the next pages while the store's
    # revision is unchanged (fleetd/api/snapshots.py).
    listings: SnapshotCache = field(default_factory=SnapshotCache)
    # Unfiltered listings, kept current by a watch (fleetd/api/live.py); made at the first
    # listing, so a fleetd whose API is never asked for one follows nothing.
    live: LiveListings | None = field(default=None, repr=False)

    async def live_items(self, collection: str) -> Sequence[bytes]:
        """The unfiltered listing of `collection` ("units", "states" or "machines"), with
        every write completed before this call in it."""
        if self.live is None:
            self.live = LiveListings(self.registry, self.offload)
        return await self.live.items(collection, self.revision)

    async def close(self) -> None:
        """Stop the listings' watch (the app's cleanup)."""
        if self.live is not None:
            await self.live.close()
            self.live = None

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-bound work (JSON of a large body, unit parsing and validation, serializing
        a page of units) off the event loop, so one big request does not stall the others
        (the agent and engine share this loop)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(fn, *args))

    async def revision(self) -> int:
        return await self.registry.current_revision()
