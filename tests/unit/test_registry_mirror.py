"""The registry's one mirror (fleetd/registry/mirror.py) and its one body cache (bodies.py).

The engine, the agent and the API's live listings follow the registry through `Mirror`, so what
must hold for all three is pinned here: a record reads the same whether it came from a range
read or from a watch event (corrupt values absent, refused names skipped), a machine's narrowed
mirror sees only its own schedule and metadata, and the cache of bodies is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib

from fleetd.model import Machine, TargetState, UnitState
from fleetd.registry import codec
from fleetd.registry.bodies import BodyCache
from fleetd.registry.fake import FakeKV
from fleetd.registry.kv import Delete, EventType, Put, WatchEvent
from fleetd.registry.mirror import (
    MachineChange,
    MetaChange,
    ScheduleChange,
    StateChange,
    Topic,
    UnitChange,
)
from fleetd.registry.registry import Registry
from fleetd.unit.file import parse_unit
from fleetd.unit.xfleet import requirements

M1 = "113f16a7f2c54d35b3cde2e2ad5c2f10"
M2 = "22222222222222222222222222222222"
BODY = parse_unit("[Service]\nExecStart=/bin/true\n")


async def _write(kv: FakeKV, *ops: Put | Delete) -> None:
    await kv.txn([], list(ops))


def event(op: Put | Delete, revision: int = 1000) -> WatchEvent:
    """The watch event `op` would make."""
    if isinstance(op, Put):
        return WatchEvent(EventType.PUT, op.key, op.value, revision)
    return WatchEvent(EventType.DELETE, op.key, "", revision)


def _desired(state: TargetState = TargetState.LAUNCHED) -> str:
    return codec.encode_desired(BODY.hash, state)


async def _seeded() -> tuple[FakeKV, Registry]:
    kv = FakeKV()
    registry = Registry(kv)
    keys = registry.keys
    await _write(
        kv,
        Put(keys.unit("good.service"), _desired()),
        Put(keys.unit("broken.service"), "{not json"),
        Put(keys.unit("bad name"), _desired()),
        Put(keys.scheduled(M1, "good.service"), _desired()),
        Put(keys.scheduled(M2, "other.service"), _desired()),
        Put(keys.global_unit("g.service"), _desired()),
        Put(keys.machine_meta_key(M1, "disk"), "ssd"),
        Put(keys.machine_meta_key(M2, "disk"), "hdd"),
    )
    return kv, registry


async def test_a_record_reads_the_same_from_a_range_and_from_a_watch() -> None:
    _, registry = await _seeded()
    loaded = registry.mirror([Topic.UNITS], check_names=True)
    await loaded.load()
    watched = registry.mirror([Topic.UNITS], check_names=True)
    changes = []
    stop = asyncio.Event()

    async def act() -> None:
        if "broken.service" in {c.name for c in changes if isinstance(c, UnitChange)}:
            stop.set()

    follow = asyncio.ensure_future(
        watched.follow(
            1,
            stop,
            on_change=changes.append,
            act=act,
            idle_interval=5.0,
            batch_window=lambda: 0.0,
        )
    )
    await asyncio.wait_for(follow, 5)
    assert loaded.units.keys() == watched.units.keys() == {"good.service"}
    # The corrupt record reads as absent (a delete), the refused name is not seen at all.
    by_name = {c.name: c for c in changes if isinstance(c, UnitChange)}
    assert by_name["broken.service"].unit is None
    assert "bad name" not in by_name
    assert registry.keys.unit("broken.service") in registry.corrupt


async def test_a_machine_mirror_sees_only_its_own_schedule_and_metadata() -> None:
    _, registry = await _seeded()
    mirror = registry.mirror(
        [Topic.SCHEDULE, Topic.GLOBALS, Topic.META], machine_id=M1, check_names=True
    )
    await mirror.load()
    assert set(mirror.scheduled) == {"good.service"}
    assert mirror.scheduled["good.service"].machine_id == M1
    assert set(mirror.globals) == {"g.service"}
    assert mirror.globals["g.service"].machine_id == ""
    assert mirror.meta_of(M1) == {"disk": "ssd"}
    assert mirror.meta_of(M2) == {}
    keys = registry.keys
    assert mirror.apply(event(Put(keys.scheduled(M2, "x.service"), _desired()))) is None
    change = mirror.apply(event(Delete(keys.scheduled(M1, "good.service"))))
    assert change == ScheduleChange("good.service", M1, None)
    assert mirror.scheduled == {}


async def test_the_whole_cluster_mirror_merges_metadata_and_tracks_states() -> None:
    kv, registry = await _seeded()
    lease = await kv.grant(30)
    machine = Machine(id=M1, public_ip="10.0.0.1", metadata=(("role", "web"),))
    assert await registry.register_machine(machine, lease)
    mirror = registry.mirror([Topic.MACHINES, Topic.META, Topic.STATES, Topic.SCHEDULE])
    await mirror.load()
    merged = mirror.machine(M1)
    assert merged is not None
    assert merged.metadata_dict == {"role": "web", "disk": "ssd"}
    assert mirror.machine(M2) is None  # metadata alone is no machine
    assert set(mirror.schedule) == {(M1, "good.service"), (M2, "other.service")}
    keys = registry.keys
    state = codec.encode_state(
        UnitState("good.service", M1, "loaded", "active", "running", BODY.hash)
    )
    change = mirror.apply(event(Put(keys.state("good.service", M1), state)))
    assert isinstance(change, StateChange)
    assert change.state is not None
    assert mirror.states[("good.service", M1)].active_state == "active"
    assert mirror.apply(event(Delete(keys.machine_meta_key(M1, "disk")))) == MetaChange(
        M1, "disk", None
    )
    assert isinstance(mirror.apply(event(Delete(keys.machine(M1)))), MachineChange)
    assert mirror.machines == {}


async def test_a_changed_unit_names_the_record_it_replaced() -> None:
    _, registry = await _seeded()
    mirror = registry.mirror([Topic.UNITS])
    await mirror.load()
    before = mirror.units["good.service"]
    other = codec.encode_desired("f" * 40, TargetState.LOADED)
    change = mirror.apply(event(Put(registry.keys.unit("good.service"), other)))
    assert isinstance(change, UnitChange)
    assert change.before == before
    assert change.unit is not None
    assert change.unit.hash == "f" * 40


async def test_one_watch_reports_how_far_it_got() -> None:
    kv, registry = await _seeded()
    mirror = registry.mirror([Topic.UNITS, Topic.PLACEMENTS], one_watch=True)
    start = await mirror.load()
    assert mirror.prefixes == [registry.keys.prefix]
    await _write(kv, Put(registry.keys.placement("good.service"), codec.encode_placement(M1)))
    revision = await registry.current_revision()
    async with contextlib.aclosing(mirror.changes(start + 1)) as batches:
        async for _, reached in batches:
            if reached >= revision:
                break
    assert mirror.placements["good.service"].machine_id == M1


def test_the_body_cache_is_bounded_and_drops_requirements_with_bodies() -> None:
    cache = BodyCache(max_bodies=2)
    bodies = [parse_unit(f"[Service]\nExecStart=/bin/sleep {i}\n") for i in range(3)]
    for b in bodies[:2]:
        cache.put(b.hash, b)
    cache.put_requirements("a.service", bodies[0].hash, requirements(bodies[0], "a.service"))
    assert cache.get(bodies[0].hash) is bodies[0]  # now the most recently used
    cache.put(bodies[2].hash, bodies[2])
    assert bodies[1].hash not in cache
    assert bodies[0].hash in cache
    assert cache.evicted == 1
    assert cache.requirements("a.service", bodies[0].hash) is not None
    cache.discard([bodies[0].hash])
    assert cache.requirements("a.service", bodies[0].hash) is None
    cache.retain(set())
    assert len(cache) == 0


async def test_collected_bodies_leave_the_cache() -> None:
    kv = FakeKV()
    registry = Registry(kv)
    await registry.create_unit("a.service", BODY)
    assert BODY.hash in registry.bodies
    assert await registry.destroy_unit("a.service")
    bodies, _ = await registry.body_records()
    deleted = await registry.delete_orphaned_bodies({BODY.hash: bodies[0].mod_revision})
    assert deleted == [BODY.hash]
    assert BODY.hash not in registry.bodies
