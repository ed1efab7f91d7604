"""The one way to follow the registry: read some of its records, then keep them current.

The engine, the agent and the API's live listings each keep a copy of part of the registry in
memory (the engine all units and machines, an agent its own schedule, the API everything its
listings join). A `Mirror` is that copy, for any of them: it reads the topics it is asked for
with range reads, then follows their watch from the oldest revision read, and turns every
record, read or watched, into a typed `Change` through one decoder. The owner applies nothing
itself: it reads the mirror's dictionaries and is told of each change (`on_change`), to mark
what it must redo.

Decoding, the same for a range read and for a watch event, so a copy never depends on how it
learned a record:
- a value that does not decode is read as absent (`Registry.skip_corrupt` logs it once per
  key and revision), as every range read of the registry does;
- with `check_names`, a unit name fleet refuses is skipped (and logged, `acceptable_name`):
  the engine does not schedule it and the agent does not run it;
- a unit body is parsed into the registry's one body cache (bodies.py) as it arrives.

Following: `follow` absorbs each burst of events (waiting `batch_window()` for it to end),
then acts once; with no event for `idle_interval` it acts anyway (the safety pass). A watch
that breaks (etcd unreachable, compaction) ends `follow` with its error and the owner loads
again: events are never half-applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from fleetd.errors import InvalidUnitName, UnitFileError
from fleetd.model import Cordon, Machine, Placement, ScheduledUnit, Unit, UnitState
from fleetd.registry import codec
from fleetd.registry.codec import CorruptValue
from fleetd.registry.kv import EventType, WatchEvent
from fleetd.unit.file import parse_unit
from fleetd.unit.names import validate_name

if TYPE_CHECKING:
    from fleetd.registry.registry import Registry

log = structlog.get_logger("fleetd.registry")


class Topic(enum.Enum):
    """The kinds of record a mirror can follow (keys.py has their layout)."""

    UNITS = "units"  # desired state, by unit name
    BODIES = "bodies"  # unit texts, into the body cache
    SCHEDULE = "schedule"  # engine-owned: one machine's (or every machine's) schedule
    GLOBALS = "globals"  # engine-owned: the global units
    PLACEMENTS = "placements"  # engine-owned: where each unit went, or why not
    MACHINES = "machines"  # presence records
    META = "meta"  # dynamic metadata (one machine's, or every machine's)
    STATES = "states"  # systemd states the agents publish
    LEADER = "leader"  # the engine leader key
    CORDONS = "cordons"  # cordoned and draining machines


# ---- changes: one record, decoded (None: the record is gone, or reads as gone) ------------


@dataclass(frozen=True, slots=True)
class UnitChange:
    name: str
    unit: Unit | None
    before: Unit | None  # the record it replaced (the engine's collector wants to know)


@dataclass(frozen=True, slots=True)
class BodyChange:
    hash: str
    present: bool  # False: deleted (collected), or unreadable


@dataclass(frozen=True, slots=True)
class ScheduleChange:
    """A schedule entry (`machine_id` set) or a global unit (`machine_id` "")."""

    name: str
    machine_id: str
    scheduled: ScheduledUnit | None


@dataclass(frozen=True, slots=True)
class PlacementChange:
    name: str
    placement: Placement | None


@dataclass(frozen=True, slots=True)
class MachineChange:
    machine_id: str
    machine: Machine | None  # as registered, without its dynamic metadata


@dataclass(frozen=True, slots=True)
class MetaChange:
    machine_id: str
    key: str
    value: str | None


@dataclass(frozen=True, slots=True)
class StateChange:
    unit: str
    machine_id: str
    state: UnitState | None


@dataclass(frozen=True, slots=True)
class LeaderChange:
    machine_id: str | None


@dataclass(frozen=True, slots=True)
class CordonChange:
    machine_id: str
    cordon: Cordon | None


Change = (
    UnitChange
    | BodyChange
    | ScheduleChange
    | PlacementChange
    | MachineChange
    | MetaChange
    | StateChange
    | LeaderChange
    | CordonChange
)


class Mirror:
    """A copy of some topics of the registry, kept current by a watch (module docstring).

    `machine_id` narrows SCHEDULE and META to one machine (an agent's view); without it they
    cover every machine. `one_watch` follows the whole registry prefix with a single watch
    (events outside the topics are ignored), so that one revision says how far the mirror
    has got in every topic at once (the API's read-your-writes needs that).
    """

    def __init__(
        self,
        registry: Registry,
        topics: Iterable[Topic],
        *,
        machine_id: str | None = None,
        check_names: bool = False,
        one_watch: bool = False,
    ) -> None:
        self.registry = registry
        self.topics = frozenset(topics)
        self.machine_id = machine_id
        self.check_names = check_names
        self.one_watch = one_watch
        self.units: dict[str, Unit] = {}
        self.scheduled: dict[str, ScheduledUnit] = {}  # by unit name (one machine's) ...
        self.schedule: dict[tuple[str, str], ScheduledUnit] = {}  # ... or (machine, unit)
        self.globals: dict[str, ScheduledUnit] = {}
        self.placements: dict[str, Placement] = {}
        self.machines: dict[str, Machine] = {}
        self.meta: dict[str, dict[str, str]] = {}
        self.states: dict[tuple[str, str], UnitState] = {}
        self.leader: str | None = None  # the engine leader's machine id
        self.cordons: dict[str, Cordon] = {}
        keys = registry.keys
        # (prefix, topic) in the order an event's key is matched against them.
        self._routes: list[tuple[str, Topic]] = []
        for topic in Topic:
            if topic in self.topics:
                self._routes.append((self._prefix(topic), topic))
        self._leader_key = keys.leader

    def _prefix(self, topic: Topic) -> str:
        keys = self.registry.keys
        mid = self.machine_id
        return {
            Topic.UNITS: keys.units,
            Topic.BODIES: keys.bodies,
            Topic.SCHEDULE: keys.schedule if mid is None else keys.machine_schedule(mid),
            Topic.GLOBALS: keys.globals,
            Topic.PLACEMENTS: keys.placements,
            Topic.MACHINES: keys.machines,
            Topic.META: keys.machine_meta if mid is None else keys.machine_meta_of(mid),
            Topic.STATES: keys.states,
            Topic.LEADER: keys.leader,
            Topic.CORDONS: keys.cordons if mid is None else keys.cordon(mid),
        }[topic]

    @property
    def prefixes(self) -> list[str]:
        """What `follow` watches."""
        if self.one_watch:
            return [self.registry.keys.prefix]
        return [prefix for prefix, _ in self._routes]

    def machine(self, machine_id: str) -> Machine | None:
        """A registered machine with its dynamic metadata merged in."""
        machine = self.machines.get(machine_id)
        if machine is None:
            return None
        return machine.with_dynamic_metadata(self.meta.get(machine_id, {}))

    def machines_with_metadata(self) -> dict[str, Machine]:
        meta = self.meta
        return {mid: m.with_dynamic_metadata(meta.get(mid, {})) for mid, m in self.machines.items()}

    def meta_of(self, machine_id: str) -> dict[str, str]:
        return self.meta.get(machine_id, {})

    # ---- loading ------------------------------------------------------------------------

    async def load(self, *, skip: Iterable[Topic] = ()) -> int:
        """Read every topic afresh (but those in `skip`, which keep what they hold); returns
        the revision to follow from: the oldest of the reads, so no event is missed
        (replaying one already read only rewrites the same value)."""
        skipped = frozenset(skip)
        routes = [(p, t) for p, t in self._routes if t not in skipped]
        reads = await self.registry.read_prefixes([p for p, _ in routes])
        for _, topic in routes:
            self._clear(topic)
        for (prefix, topic), (kvs, _) in zip(routes, reads, strict=True):
            for kv in kvs:
                self._put(topic, prefix, kv.key, kv.value, kv.mod_revision)
        return min((revision for _, revision in reads), default=0)

    def _clear(self, topic: Topic) -> None:
        if topic is Topic.UNITS:
            self.units = {}
        elif topic is Topic.SCHEDULE:
            self.scheduled, self.schedule = {}, {}
        elif topic is Topic.GLOBALS:
            self.globals = {}
        elif topic is Topic.PLACEMENTS:
            self.placements = {}
        elif topic is Topic.MACHINES:
            self.machines = {}
        elif topic is Topic.META:
            self.meta = {}
        elif topic is Topic.STATES:
            self.states = {}
        elif topic is Topic.LEADER:
            self.leader = None
        elif topic is Topic.CORDONS:
            self.cordons = {}

    # ---- applying -----------------------------------------------------------------------

    def apply(self, event: WatchEvent) -> Change | None:
        """One watch event, in revision order; the change it made (None: none, or skipped)."""
        key = event.key
        for prefix, topic in self._routes:
            if key.startswith(prefix):
                if topic is Topic.LEADER and key != self._leader_key:
                    continue
                if event.type is EventType.PUT:
                    return self._put(topic, prefix, key, event.value, event.mod_revision)
                return self._delete(topic, prefix, key)
        return None

    def _put(
        self,
        topic: Topic,
        prefix: str,
        key: str,
        value: str,
        revision: int,
    ) -> Change | None:
        registry = self.registry
        tail = key[len(prefix) :]
        try:
            if topic is Topic.UNITS:
                if self.check_names and not acceptable_name(tail, key):
                    return None
                hash_, state = codec.decode_desired(value)
                unit = Unit(tail, hash_, state)
                before = self.units.get(tail)
                self.units[tail] = unit
                return UnitChange(tail, unit, before)
            if topic is Topic.SCHEDULE or topic is Topic.GLOBALS:
                machine_id, name = self._scheduled_key(topic, tail)
                if self.check_names and not acceptable_name(name, key):
                    return None
                hash_, state = codec.decode_desired(value)
                scheduled = ScheduledUnit(name, machine_id, hash_, state)
                self._set_scheduled(machine_id, name, scheduled)
                return ScheduleChange(name, machine_id, scheduled)
            if topic is Topic.PLACEMENTS:
                machine, reason = codec.decode_placement(value)
                placement = Placement(tail, machine, reason)
                self.placements[tail] = placement
                return PlacementChange(tail, placement)
            if topic is Topic.MACHINES:
                decoded = codec.decode_machine(value)
                self.machines[tail] = decoded
                return MachineChange(tail, decoded)
            if topic is Topic.META:
                machine_id, meta_key = self._meta_key(tail)
                self.meta.setdefault(machine_id, {})[meta_key] = value
                return MetaChange(machine_id, meta_key, value)
            if topic is Topic.STATES:
                unit_name, _, machine_id = tail.rpartition("/")
                published = codec.decode_state(unit_name, machine_id, value)
                self.states[(unit_name, machine_id)] = published
                return StateChange(unit_name, machine_id, published)
            if topic is Topic.CORDONS:
                machine_id = self.machine_id if self.machine_id is not None else tail
                cordon = codec.decode_cordon(machine_id, value)
                self.cordons[machine_id] = cordon
                return CordonChange(machine_id, cordon)
            if topic is Topic.BODIES:
                if tail not in registry.bodies:
                    registry.bodies.put(tail, parse_unit(value))
                return BodyChange(tail, True)
            self.leader = value  # the leader key
            return LeaderChange(value)
        except (CorruptValue, UnitFileError) as e:
            # As a range read does: the record reads as absent, logged once per revision.
            registry.skip_corrupt(key, revision, str(e))
            return self._delete(topic, prefix, key)

    def _delete(self, topic: Topic, prefix: str, key: str) -> Change | None:
        tail = key[len(prefix) :]
        if topic is Topic.UNITS:
            return UnitChange(tail, None, self.units.pop(tail, None))
        if topic is Topic.SCHEDULE or topic is Topic.GLOBALS:
            machine_id, name = self._scheduled_key(topic, tail)
            self._set_scheduled(machine_id, name, None)
            return ScheduleChange(name, machine_id, None)
        if topic is Topic.PLACEMENTS:
            self.placements.pop(tail, None)
            return PlacementChange(tail, None)
        if topic is Topic.MACHINES:
            self.machines.pop(tail, None)
            return MachineChange(tail, None)
        if topic is Topic.META:
            machine_id, meta_key = self._meta_key(tail)
            meta = self.meta.get(machine_id)
            if meta is not None:
                meta.pop(meta_key, None)
                if not meta:
                    del self.meta[machine_id]
            return MetaChange(machine_id, meta_key, None)
        if topic is Topic.STATES:
            unit_name, _, machine_id = tail.rpartition("/")
            self.states.pop((unit_name, machine_id), None)
            return StateChange(unit_name, machine_id, None)
        if topic is Topic.CORDONS:
            machine_id = self.machine_id if self.machine_id is not None else tail
            self.cordons.pop(machine_id, None)
            return CordonChange(machine_id, None)
        if topic is Topic.BODIES:
            self.registry.bodies.discard([tail])
            return BodyChange(tail, False)
        self.leader = None
        return LeaderChange(None)

    def _scheduled_key(self, topic: Topic, tail: str) -> tuple[str, str]:
        """(machine id, unit name) of a schedule or global key; "" is the globals' machine."""
        if topic is Topic.GLOBALS:
            return "", tail
        if self.machine_id is not None:
            return self.machine_id, tail
        machine_id, _, name = tail.partition("/")
        return machine_id, name

    def _meta_key(self, tail: str) -> tuple[str, str]:
        if self.machine_id is not None:
            return self.machine_id, tail
        machine_id, _, meta_key = tail.partition("/")
        return machine_id, meta_key

    def _set_scheduled(self, machine_id: str, name: str, entry: ScheduledUnit | None) -> None:
        if not machine_id:
            target: dict[Any, ScheduledUnit] = self.globals
            index: Any = name
        elif self.machine_id is not None:
            target, index = self.scheduled, name
        else:
            target, index = self.schedule, (machine_id, name)
        if entry is None:
            target.pop(index, None)
        else:
            target[index] = entry

    # ---- following ----------------------------------------------------------------------

    async def follow(
        self,
        start_revision: int,
        stop: asyncio.Event,
        *,
        on_change: Callable[[Change], None],
        act: Callable[[], Awaitable[None]],
        idle_interval: float | Callable[[], float],
        batch_window: Callable[[], float],
        interrupt: asyncio.Event | None = None,
    ) -> None:
        """Until `stop`: apply events (waiting `batch_window()` for a burst to finish), telling
        `on_change` of each, then `act()`; with no event for `idle_interval` seconds, `act()`
        anyway (the safety pass). A callable `idle_interval` is asked before each wait (the
        engine shortens it to end a grace on time). A broken watch raises its error.

        When `interrupt` is set, clear it and return: the owner loads again."""

        def on_event(event: WatchEvent) -> None:
            change = self.apply(event)
            if change is not None:
                on_change(change)

        await _follow(
            self.registry.watch,
            self.prefixes,
            start_revision,
            stop,
            on_event=on_event,
            act=act,
            idle_interval=idle_interval,
            batch_window=batch_window,
            interrupt=interrupt,
        )

    async def changes(self, start_revision: int) -> AsyncGenerator[tuple[list[Change], int], None]:
        """For an owner that paces itself (the API): each batch of events from the one watch
        (`one_watch`), applied, as (its changes, the revision the mirror has now reached)."""
        assert self.one_watch, "changes() follows one watch"
        events = self.registry.watch(self.prefixes[0], start_revision)
        async with contextlib.aclosing(events):
            async for batch in events:
                changes = [c for c in map(self.apply, batch) if c is not None]
                yield changes, batch[-1].mod_revision


def acceptable_name(name: str, key: str) -> bool:
    """Whether a unit name read from etcd is one fleet accepts; if not, log it (naming the key).

    Clients, the API and `Registry.create_unit` refuse such names, so only a direct etcd write
    (or a bug) makes one. The engine does not schedule it and the agent skips it: the unit
    manager would refuse it anyway (the name becomes a file name in the units directory), but
    a unit kept in the agent's plan failed its task at every pass, and the first failure ends
    the pass, so one bad key kept every other unit on the machine from being started.
    """
    try:
        validate_name(name)
    except InvalidUnitName as e:
        log.error("unit_name_refused", key=key, error=str(e))
        return False
    return True


Item = list[WatchEvent] | BaseException


async def _follow(
    watch: Callable[[str, int], AsyncGenerator[list[WatchEvent], None]],
    prefixes: list[str],
    start_revision: int,
    stop: asyncio.Event,
    *,
    on_event: Callable[[WatchEvent], None],
    act: Callable[[], Awaitable[None]],
    idle_interval: float | Callable[[], float],
    batch_window: Callable[[], float],
    interrupt: asyncio.Event | None = None,
) -> None:
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
