"""Listings kept current by a watch, so a listing right after a write costs no rebuild.

`SnapshotCache` (snapshots.py) rebuilt a whole collection from full range reads whenever the
store's revision had moved, and on a live cluster it always has: every `fleetctl start` is
followed by a listing, and that listing paid ~0.5 s of reads and decoding at 10,000 units.
Here the API mirrors the records its listings join (units, bodies, placements, states,
machines and their metadata), loaded once with range reads and then followed with one watch
on the registry prefix. Each event marks the items it can change as dirty; a listing
re-encodes only those, so its cost is the number of changed items plus assembling the list,
not a rebuild.

Read-your-writes, the guarantee snapshots.py documents, is kept: a listing first asks etcd
for its current revision (one cheap request) and is served only once the mirror has applied
every event up to that revision, so a write completed before the request is in it. If the
watch does not get there within `CATCH_UP_SECONDS` (the write was outside the registry
prefix, so no event will ever come for it, or the watch is stuck), or the watch broke
(compaction, etcd errors), the mirror is reloaded from range reads: the old cost, never a
stale answer.

Memory: one mirror (fleetd/registry/mirror.py) and one list of encoded items per collection
(units, states, machines); the bodies are the registry's one cache (bodies.py), of which a unit
destroyed drops the bodies no unit names any more. Filtered state listings are left to the
snapshot cache.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import structlog

from fleetd.api.errors import json_bytes
from fleetd.registry.mirror import (
    BodyChange,
    Change,
    CordonChange,
    MachineChange,
    MetaChange,
    PlacementChange,
    StateChange,
    Topic,
    UnitChange,
)
from fleetd.registry.registry import Registry
from fleetd.views import (
    build_unit_view,
    machine_to_api,
    machine_view,
    state_to_api,
    state_view,
    unit_to_api,
)

log = structlog.get_logger("fleetd.api.live")

# How long a listing waits for the watch to deliver the writes before its request. Events
# arrive within milliseconds of a write; past this the mirror is reloaded instead.
CATCH_UP_SECONDS = 0.25
# A refresh touching more than this share of a collection re-sorts it instead of inserting
# each key (each insert moves the list's tail).
_RESORT_SHARE = 8

Encoder = Callable[[Sequence[object]], list[bytes]]


class SortedItems:
    """Encoded items by key, kept in key order; `dirty` keys are re-encoded by the owner.

    Keys are unit names, machine ids or (unit, machine) pairs: anything that sorts."""

    def __init__(self) -> None:
        self.keys: list[Any] = []
        self.items: dict[Any, bytes] = {}
        self.dirty: set[Any] = set()
        self._listing: list[bytes] = []

    def reset(self) -> None:
        self.keys, self.items, self.dirty, self._listing = [], {}, set(), []

    def take_dirty(self) -> set[Any]:
        dirty, self.dirty = self.dirty, set()
        return dirty

    def apply(self, encoded: Iterable[tuple[Any, bytes | None]]) -> None:
        """New items (None: the key is gone) for keys taken with `take_dirty`."""
        changes = list(encoded)
        if not changes:
            return
        resort = len(changes) * _RESORT_SHARE > len(self.keys)
        for key, item in changes:
            present = key in self.items
            if item is None:
                if present:
                    del self.items[key]
                    if not resort:
                        del self.keys[bisect.bisect_left(self.keys, key)]
                continue
            if not present and not resort:
                bisect.insort(self.keys, key)
            self.items[key] = item
        if resort:
            self.keys = sorted(self.items)
        # A new list each time: pages being served keep slicing the one they were given.
        self._listing = [self.items[k] for k in self.keys]

    @property
    def listing(self) -> Sequence[bytes]:
        return self._listing


def _encode_all(objs: Sequence[object]) -> list[bytes]:
    return [json_bytes(o) for o in objs]


class LiveListings:
    """The API's mirror of the registry and its three listings (see the module docstring)."""

    def __init__(
        self,
        registry: Registry,
        offload: Callable[[Encoder, Sequence[object]], Awaitable[list[bytes]]],
        catch_up_seconds: float = CATCH_UP_SECONDS,
    ) -> None:
        self.registry = registry
        self.mirror = registry.mirror(
            [
                Topic.UNITS,
                Topic.BODIES,
                Topic.PLACEMENTS,
                Topic.STATES,
                Topic.MACHINES,
                Topic.META,
                Topic.CORDONS,
            ],
            one_watch=True,  # one revision tells how far every collection has got
        )
        self._offload = offload
        self.catch_up_seconds = catch_up_seconds
        self.applied = 0  # every event up to this revision is in the mirror
        self.loads = 0  # full loads from range reads (tests, logs)
        self.listings: dict[str, SortedItems] = {
            "units": SortedItems(),
            "states": SortedItems(),
            "machines": SortedItems(),
        }
        self._waiting_bodies: dict[str, set[str]] = {}  # hash -> units shown once it comes
        self._advanced = asyncio.Condition()
        self._lock = asyncio.Lock()
        self._follower: asyncio.Task[None] | None = None

    # ---- serving -----------------------------------------------------------------------

    async def items(
        self, collection: str, revision: Callable[[], Awaitable[int]]
    ) -> Sequence[bytes]:
        """The encoded items of `collection` with every write before this call in them."""
        async with self._lock:
            current = await revision()
            if not await self._caught_up(current):
                await self._load()
            return await self._refresh(collection)

    async def _caught_up(self, current: int) -> bool:
        if self._follower is None or self._follower.done():
            return False
        if self.applied >= current:
            return True
        deadline = time.monotonic() + self.catch_up_seconds
        async with self._advanced:
            while self.applied < current and not self._follower.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    log.info("listing_watch_behind", applied=self.applied, current=current)
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._advanced.wait(), left)
        return self.applied >= current

    async def _refresh(self, collection: str) -> Sequence[bytes]:
        listing = self.listings[collection]
        dirty = listing.take_dirty()
        units = self.mirror.units
        if collection == "units" and dirty:
            # A body can be stored and yet not cached: dropped when its last unit went, then
            # a unit created again with it writes no body, so no event brings it back.
            bodies = self.registry.bodies
            missing = {u.hash for u in (units.get(n) for n in dirty) if u and u.hash not in bodies}
            if missing:
                await self.registry.fetch_bodies(missing)
        if dirty:
            # The objects are built here, on the loop (the mirror may change while the
            # executor runs); only the JSON encoding, the costly part, is offloaded.
            keys, objs = self._objects(collection, dirty)
            encoded = await self._offload(_encode_all, objs)
            gone = [(k, None) for k in dirty.difference(keys)]
            listing.apply([*zip(keys, encoded, strict=True), *gone])
            if collection == "units" and any(k not in units for k, _ in gone):
                self._drop_unused_bodies()
        return listing.listing

    def _drop_unused_bodies(self) -> None:
        """A unit went: drop the bodies it may have been the last to name (bodies.py)."""
        used = {u.hash for u in self.mirror.units.values()}
        self.registry.bodies.retain(used)

    def _objects(self, collection: str, dirty: set[object]) -> tuple[list[object], list[object]]:
        keys: list[object] = []
        objs: list[object] = []
        for key in dirty:
            obj = self._object(collection, key)
            if obj is not None:
                keys.append(key)
                objs.append(obj)
        return keys, objs

    def _object(self, collection: str, key: object) -> object | None:
        mirror = self.mirror
        if collection == "units":
            assert isinstance(key, str)
            unit = mirror.units.get(key)
            if unit is None:
                return None
            body = self.registry.bodies.get(unit.hash)
            if body is None:  # left out, as fleet does, until its body comes
                self._waiting_bodies.setdefault(unit.hash, set()).add(key)
                return None
            placement = mirror.placements.get(key)
            return unit_to_api(build_unit_view(unit, body, placement, mirror.states))
        if collection == "states":
            state = mirror.states.get(key)  # type: ignore[call-overload]
            return None if state is None else state_to_api(state_view(state))
        assert isinstance(key, str)
        machine = mirror.machine(key)
        if machine is None:
            return None
        return machine_to_api(machine_view(machine, mirror.cordons.get(key)))

    # ---- loading -----------------------------------------------------------------------

    async def _load(self) -> None:
        """Read every topic afresh and follow the registry from there."""
        await self._stop_follower()
        # Bodies are not ranged here: the units' are fetched below, through the cache.
        start = await self.mirror.load(skip=[Topic.BODIES])
        self._waiting_bodies = {}
        self._drop_unused_bodies()
        await self.registry.fetch_bodies({u.hash for u in self.mirror.units.values()})
        for name, listing in self.listings.items():
            listing.reset()
            listing.dirty.update(self._all_keys(name))
        # Requests are served once the watch passes their revision, which is at least the
        # newest read; the watch starts after the oldest (Mirror.load).
        self.applied = start
        self.loads += 1
        self._follower = asyncio.create_task(self._follow(start + 1))

    def _all_keys(self, collection: str) -> Iterable[object]:
        if collection == "units":
            return self.mirror.units.keys()
        if collection == "states":
            return self.mirror.states.keys()
        return self.mirror.machines.keys()

    async def _follow(self, start: int) -> None:
        try:
            async with contextlib.aclosing(self.mirror.changes(start)) as batches:
                async for changes, revision in batches:
                    for change in changes:
                        self._mark(change)
                    async with self._advanced:
                        self.applied = max(self.applied, revision)
                        self._advanced.notify_all()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # Compacted, RegistryUnavailable: the next listing reloads
            log.warning("listing_watch_ended", error=str(e), applied=self.applied)
        finally:
            async with self._advanced:
                self._advanced.notify_all()  # waiters see the watch is gone

    async def _stop_follower(self) -> None:
        task, self._follower = self._follower, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close(self) -> None:
        await self._stop_follower()

    # ---- marking what changed ----------------------------------------------------------

    def _mark(self, change: Change) -> None:
        """Mark the listing items a change (already in the mirror) can alter."""
        listings = self.listings
        if isinstance(change, UnitChange | PlacementChange):
            listings["units"].dirty.add(change.name)
        elif isinstance(change, StateChange):
            listings["states"].dirty.add((change.unit, change.machine_id))
            listings["units"].dirty.add(change.unit)
        elif isinstance(change, MachineChange | MetaChange | CordonChange):
            listings["machines"].dirty.add(change.machine_id)
        elif isinstance(change, BodyChange) and change.present:
            # A new unit's body is written in the same transaction as its record, just
            # before it, so the unit's item finds it in the cache; units listed before
            # their body came are shown now.
            for name in self._waiting_bodies.pop(change.hash, ()):
                listings["units"].dirty.add(name)
