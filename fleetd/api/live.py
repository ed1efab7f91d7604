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

Memory: one mirror and one list of encoded items per collection (units, states, machines).
Filtered state listings are left to the snapshot cache.
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
from fleetd.errors import UnitFileError
from fleetd.model import Machine, Placement, Unit, UnitState
from fleetd.registry import codec
from fleetd.registry.codec import CorruptValue
from fleetd.registry.kv import EventType, WatchEvent
from fleetd.registry.registry import Registry
from fleetd.unit.file import UnitFile, parse_unit
from fleetd.views import (
    _bodies,
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
        bodies: dict[str, UnitFile],
        offload: Callable[[Encoder, Sequence[object]], Awaitable[list[bytes]]],
        catch_up_seconds: float = CATCH_UP_SECONDS,
    ) -> None:
        self.registry = registry
        self.keys = registry.keys
        self.bodies = bodies  # shared with the API context: content-addressed, never stale
        self._offload = offload
        self.catch_up_seconds = catch_up_seconds
        self.units: dict[str, Unit] = {}
        self.placements: dict[str, Placement] = {}
        self.states: dict[tuple[str, str], UnitState] = {}
        self.machines: dict[str, Machine] = {}
        self.meta: dict[str, dict[str, str]] = {}
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
        if collection == "units" and dirty:
            # A body can be stored and yet not cached: pruned when its last unit went, then
            # a unit created again with it writes no body, so no event brings it back.
            missing = {
                u.hash
                for u in (self.units.get(n) for n in dirty)
                if u and u.hash not in self.bodies
            }
            if missing:
                await _bodies(self.registry, missing, self.bodies)
        if dirty:
            # The objects are built here, on the loop (the mirror may change while the
            # executor runs); only the JSON encoding, the costly part, is offloaded.
            keys, objs = self._objects(collection, dirty)
            encoded = await self._offload(_encode_all, objs)
            gone = [(k, None) for k in dirty.difference(keys)]
            listing.apply([*zip(keys, encoded, strict=True), *gone])
            if collection == "units" and any(k not in self.units for k, _ in gone):
                self._prune_bodies()
        return listing.listing

    def _prune_bodies(self) -> None:
        """Keep only the bodies of units that exist: the cache cannot grow without end."""
        used = {u.hash for u in self.units.values()}
        for stale in self.bodies.keys() - used:
            del self.bodies[stale]

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
        if collection == "units":
            assert isinstance(key, str)
            unit = self.units.get(key)
            if unit is None:
                return None
            body = self.bodies.get(unit.hash)
            if body is None:  # left out, as fleet does, until its body comes
                self._waiting_bodies.setdefault(unit.hash, set()).add(key)
                return None
            return unit_to_api(build_unit_view(unit, body, self.placements.get(key), self.states))
        if collection == "states":
            state = self.states.get(key)  # type: ignore[call-overload]
            return None if state is None else state_to_api(state_view(state))
        assert isinstance(key, str)
        machine = self.machines.get(key)
        if machine is None:
            return None
        machine = machine.with_dynamic_metadata(self.meta.get(key, {}))
        return machine_to_api(machine_view(machine))

    # ---- loading -----------------------------------------------------------------------

    async def _load(self) -> None:
        """Read every prefix afresh and follow the registry from there."""
        await self._stop_follower()
        keys = self.keys
        prefixes = (keys.units, keys.placements, keys.states, keys.machines, keys.machine_meta)
        reads = await self.registry.read_prefixes(prefixes)
        (unit_kvs, _), (placement_kvs, _), (state_kvs, _), (machine_kvs, _), (meta_kvs, _) = reads
        self.units, self.placements, self.states = {}, {}, {}
        self.machines, self.meta, self._waiting_bodies = {}, {}, {}
        for kvs in (unit_kvs, placement_kvs, state_kvs, machine_kvs, meta_kvs):
            for kv in kvs:
                self._put(kv.key, kv.value, kv.mod_revision)
        self._prune_bodies()
        await _bodies(self.registry, {u.hash for u in self.units.values()}, self.bodies)
        for name, listing in self.listings.items():
            listing.reset()
            listing.dirty.update(self._all_keys(name))
        # The reads ran at (possibly) different revisions: follow from the oldest, so no
        # event is missed; replaying one already read only rewrites the same value. Requests
        # are served once the watch passes their revision, which is at least the newest.
        start = min(revision for _, revision in reads)
        self.applied = start
        self.loads += 1
        self._follower = asyncio.create_task(self._follow(start + 1))

    def _all_keys(self, collection: str) -> Iterable[object]:
        if collection == "units":
            return self.units.keys()
        if collection == "states":
            return self.states.keys()
        return self.machines.keys()

    async def _follow(self, start: int) -> None:
        try:
            async with contextlib.aclosing(self.registry.watch(self.keys.prefix, start)) as w:
                async for batch in w:
                    for event in batch:
                        self.apply(event)
                    async with self._advanced:
                        self.applied = max(self.applied, batch[-1].mod_revision)
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

    # ---- applying events ---------------------------------------------------------------

    def apply(self, event: WatchEvent) -> None:
        """One event from the registry's watch, in revision order."""
        if event.type is EventType.PUT:
            self._put(event.key, event.value, event.mod_revision)
        else:
            self._delete(event.key)

    def _put(self, key: str, value: str, revision: int) -> None:
        keys = self.keys
        try:
            if key.startswith(keys.units):
                name = keys.tail(key, keys.units)
                hash_, state = codec.decode_desired(value)
                self.units[name] = Unit(name, hash_, state)
                self._dirty_unit(name)
            elif key.startswith(keys.placements):
                name = keys.tail(key, keys.placements)
                machine_id, reason = codec.decode_placement(value)
                self.placements[name] = Placement(name, machine_id, reason)
                self._dirty_unit(name)
            elif key.startswith(keys.states):
                unit, _, machine_id = keys.tail(key, keys.states).rpartition("/")
                self.states[(unit, machine_id)] = codec.decode_state(unit, machine_id, value)
                self.listings["states"].dirty.add((unit, machine_id))
                self._dirty_unit(unit)
            elif key.startswith(keys.machines):
                machine = codec.decode_machine(value)
                self.machines[keys.tail(key, keys.machines)] = machine
                self.listings["machines"].dirty.add(keys.tail(key, keys.machines))
            elif key.startswith(keys.machine_meta):
                machine_id, _, name = keys.tail(key, keys.machine_meta).partition("/")
                self.meta.setdefault(machine_id, {})[name] = value
                self.listings["machines"].dirty.add(machine_id)
            elif key.startswith(keys.bodies):
                self._body(keys.tail(key, keys.bodies), value)
        except (CorruptValue, UnitFileError) as e:
            # As the range reads do: the record is skipped (shown as absent), and logged once
            # per key and revision, so a reload (after a broken watch) does not repeat it.
            self.registry.skip_corrupt(key, revision, str(e))
            self._delete(key)

    def _delete(self, key: str) -> None:
        keys = self.keys
        if key.startswith(keys.units):
            name = keys.tail(key, keys.units)
            self.units.pop(name, None)
            self._dirty_unit(name)
        elif key.startswith(keys.placements):
            name = keys.tail(key, keys.placements)
            self.placements.pop(name, None)
            self._dirty_unit(name)
        elif key.startswith(keys.states):
            unit, _, machine_id = keys.tail(key, keys.states).rpartition("/")
            self.states.pop((unit, machine_id), None)
            self.listings["states"].dirty.add((unit, machine_id))
            self._dirty_unit(unit)
        elif key.startswith(keys.machines):
            self.machines.pop(keys.tail(key, keys.machines), None)
            self.listings["machines"].dirty.add(keys.tail(key, keys.machines))
        elif key.startswith(keys.machine_meta):
            machine_id, _, name = keys.tail(key, keys.machine_meta).partition("/")
            meta = self.meta.get(machine_id)
            if meta is not None:
                meta.pop(name, None)
                if not meta:
                    del self.meta[machine_id]
            self.listings["machines"].dirty.add(machine_id)

    def _dirty_unit(self, name: str) -> None:
        self.listings["units"].dirty.add(name)

    def _body(self, hash_: str, value: str) -> None:
        for name in self._waiting_bodies.pop(hash_, ()):
            self._dirty_unit(name)
        if hash_ not in self.bodies:
            # Parsed as it arrives: a new unit's body is written in the same transaction as
            # its record, just before it, so the unit's item finds it in the cache.
            self.bodies[hash_] = parse_unit(value)
