"""The Registry's guarantees (fleetd/registry/registry.py), on FakeKV and on a real etcd.

What the engine and agents rely on: CAS on unit records, machine presence and states on a
lease (gone when it ends), one engine leader at a time with handover when its lease ends,
and fenced writes that a deposed leader cannot land.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import pytest

from fleetd.errors import NotFound, NotLeader
from fleetd.etcd.client import EtcdConfig, EtcdKV
from fleetd.model import Machine, TargetState, Unit, UnitState
from fleetd.registry import codec, gc
from fleetd.registry.fake import FakeKV
from fleetd.registry.keys import SCHEMA_VERSION
from fleetd.registry.kv import KV, Delete, Op, Put
from fleetd.registry.migrations import SchemaTooNew
from fleetd.registry.registry import Registry
from fleetd.unit.file import parse_unit
from tests.integration.etcd_fixture import EtcdServer

HELLO = parse_unit("[Unit]\nDescription=Hello\n\n[Service]\nExecStart=/bin/sleep 1000\n")
OTHER = parse_unit("[Service]\nExecStart=/bin/true\n")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    kv: KV
    fake: FakeKV | None
    clock: Clock | None

    async def expire(self, ttl: int, done: Callable[[], Awaitable[bool]]) -> None:
        """Let more than `ttl` seconds pass for leases, until `done()` holds."""
        if self.fake is not None and self.clock is not None:
            self.clock.now += ttl + 0.01
            self.fake.expire_leases()
            assert await done()
            return
        deadline = time.monotonic() + ttl + 10
        while not await done():
            assert time.monotonic() < deadline, "lease did not expire in time"
            await asyncio.sleep(0.05)


@pytest.fixture(params=["fake", "etcd", "etcd-3.5"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "fake":
        clock = Clock()
        fake = FakeKV(clock)
        yield Backend(fake, fake, clock)
        return
    server: EtcdServer = request.getfixturevalue(
        "etcd35_server" if request.param == "etcd-3.5" else "etcd_server"
    )
    kv = EtcdKV(EtcdConfig(endpoints=server.endpoints, request_timeout=2.0))
    try:
        yield Backend(kv, None, None)
    finally:
        await kv.close()


pytestmark = pytest.mark.integration


async def test_schema_version_created_once_and_newer_refused(backend: Backend) -> None:
    reg = Registry(backend.kv)
    await reg.ensure_schema()
    await reg.ensure_schema()  # idempotent
    kv = await backend.kv.get(reg.keys.schema)
    assert kv is not None
    assert kv.value == str(SCHEMA_VERSION)
    await backend.kv.txn([], [Put(reg.keys.schema, str(SCHEMA_VERSION + 1))])
    with pytest.raises(SchemaTooNew, match="schema version"):
        await reg.ensure_schema()
    # An older layout is reported for the leader to migrate, not refused nor rewritten.
    await backend.kv.txn([], [Put(reg.keys.schema, "0")])
    assert await reg.ensure_schema() == 0


async def test_units_are_content_addressed_and_create_is_cas(backend: Backend) -> None:
    reg = Registry(backend.kv)
    assert await reg.create_unit("a@1.service", HELLO)
    assert await reg.create_unit("a@2.service", HELLO)
    assert not await reg.create_unit("a@1.service", OTHER)  # exists: refused, unchanged
    bodies, _ = await backend.kv.range(reg.keys.bodies)
    assert [b.key for b in bodies] == [reg.keys.body(HELLO.hash)]  # one body, two units
    assert await reg.get_unit("a@1.service") == Unit("a@1.service", HELLO.hash)
    assert await reg.create_unit("a@1.service", OTHER, TargetState.LAUNCHED, replace=True)
    assert await reg.get_unit("a@1.service") == Unit(
        "a@1.service", OTHER.hash, TargetState.LAUNCHED
    )
    fresh = Registry(backend.kv)  # no cache: the body is really stored
    assert await fresh.get_body(OTHER.hash) == OTHER


async def test_target_state_and_destroy(backend: Backend) -> None:
    reg = Registry(backend.kv)
    await reg.create_unit("hello.service", HELLO)
    await reg.set_target_state("hello.service", TargetState.LAUNCHED)
    unit = await reg.get_unit("hello.service")
    assert unit is not None
    assert unit.target_state == TargetState.LAUNCHED
    assert await reg.destroy_unit("hello.service")
    assert not await reg.destroy_unit("hello.service")
    with pytest.raises(NotFound):
        await reg.set_target_state("hello.service", TargetState.LOADED)


async def test_destroy_removes_a_corrupt_record_and_its_corrupt_keys(backend: Backend) -> None:
    reg = Registry(backend.kv)
    keys = reg.keys
    lease = await backend.kv.grant(60)
    assert await reg.register_machine(Machine.make("m1"), lease)
    corrupt = [keys.unit("bad.service"), keys.state("bad.service", "m1")]
    corrupt.append(keys.scheduled("m1", "bad.service"))
    await backend.kv.txn([], [Put(k, "{not json") for k in corrupt])
    await reg.create_unit("ok.service", HELLO)
    assert [u.name for u in await reg.list_units()] == ["ok.service"]
    assert await reg.destroy_unit("bad.service")
    for key in corrupt:
        assert await backend.kv.get(key) is None, key
    assert await reg.get_unit("ok.service") is not None
    assert not await reg.destroy_unit("bad.service")


async def test_presence_and_states_vanish_with_the_lease(backend: Backend) -> None:
    reg = Registry(backend.kv)
    lease = await backend.kv.grant(1)
    machine = Machine.make("m1", "10.0.0.1", {"region": "east"})
    assert await reg.register_machine(machine, lease)
    assert await reg.register_machine(machine, lease)  # same lease: a restart, accepted
    await reg.publish_states(
        [UnitState("hello.service", "m1", "loaded", "active", "running", HELLO.hash)], lease
    )
    assert [m.id for m in await reg.list_machines()] == ["m1"]
    assert len(await reg.list_states()) == 1

    async def gone() -> bool:
        return not await reg.list_machines() and not await reg.list_states()

    await backend.expire(1, gone)


async def test_duplicate_machine_id_is_refused(backend: Backend) -> None:
    reg = Registry(backend.kv)
    first = await backend.kv.grant(30)
    second = await backend.kv.grant(30)
    assert await reg.register_machine(Machine.make("m1"), first)
    assert not await reg.register_machine(Machine.make("m1", "10.9.9.9"), second)
    (only,) = await reg.list_machines()
    assert only.public_ip == ""  # the first machine's record is untouched


async def test_dynamic_metadata_overrides_config_metadata(backend: Backend) -> None:
    reg = Registry(backend.kv)
    lease = await backend.kv.grant(30)
    await reg.register_machine(
        Machine.make("m1", metadata={"region": "east", "disk": "hdd"}), lease
    )
    await reg.set_machine_metadata("m1", "disk", "ssd")
    (m,) = await reg.list_machines()
    assert m.metadata_dict == {"region": "east", "disk": "ssd"}
    await reg.set_machine_metadata("m1", "disk", None)
    (m,) = await reg.list_machines()
    assert m.metadata_dict == {"region": "east", "disk": "hdd"}


async def test_one_leader_and_handover_when_its_lease_ends(backend: Backend) -> None:
    reg = Registry(backend.kv)
    lease_a = await backend.kv.grant(1)
    lease_b = await backend.kv.grant(60)
    token_a = await reg.campaign("a", lease_a)
    assert token_a is not None
    assert await reg.campaign("b", lease_b) is None
    assert await reg.campaign("a", lease_a) == token_a  # re-campaigning keeps the lead
    assert await reg.leader() == "a"

    async def a_gone() -> bool:
        return await reg.leader() is None

    await backend.expire(1, a_gone)
    token_b = await reg.campaign("b", lease_b)
    assert token_b is not None
    assert await reg.leader() == "b"

    # The deposed leader's fenced write is refused and lands nothing.
    with pytest.raises(NotLeader):
        await reg.fenced(token_a, reg.op_schedule(Unit("x.service", HELLO.hash), "a"))
    assert await reg.placement("x.service") is None
    await reg.fenced(token_b, reg.op_schedule(Unit("x.service", HELLO.hash), "b"))
    placement = await reg.placement("x.service")
    assert placement is not None
    assert placement.machine_id == "b"


async def test_resigned_leader_is_fenced_even_if_it_wins_again(backend: Backend) -> None:
    """Leadership is a term, not a name: a leader that resigned and re-campaigned has a new
    token, and writes under the old one are refused."""
    reg = Registry(backend.kv)
    lease = await backend.kv.grant(60)
    old = await reg.campaign("a", lease)
    assert old is not None
    await reg.resign(old)
    new = await reg.campaign("a", lease)
    assert new is not None
    assert new.create_revision != old.create_revision
    with pytest.raises(NotLeader):
        await reg.fenced(old, reg.op_unplaced("y.service", "why"))
    await reg.fenced(new, reg.op_unplaced("y.service", "why"))


async def test_fenced_writes_larger_than_one_transaction(backend: Backend) -> None:
    reg = Registry(backend.kv)
    token = await reg.campaign("a", await backend.kv.grant(60))
    assert token is not None
    ops = []
    for i in range(300):
        ops += reg.op_schedule(Unit(f"u{i}.service", HELLO.hash, TargetState.LAUNCHED), "a")
    await reg.fenced(token, ops)
    assert len(await reg.placements()) == 300
    scheduled, _ = await reg.machine_schedule("a")
    assert len(scheduled) == 300


class _CountingKV:
    """The backend's KV, counting transactions in flight at once (each yields to the loop
    before it starts, so concurrent ones overlap even on the in-memory KV)."""

    def __init__(self, kv: KV) -> None:
        self.inner = kv
        self.now = 0
        self.most = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def txn(self, *args: Any, **kwargs: Any) -> Any:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(0)
            return await self.inner.txn(*args, **kwargs)
        finally:
            self.now -= 1


async def test_fenced_chunks_are_sent_together(backend: Backend) -> None:
    counting = _CountingKV(backend.kv)
    reg = Registry(cast(KV, counting))
    token = await reg.campaign("a", await backend.kv.grant(60))
    assert token is not None
    ops = []
    for i in range(1000):  # 2,000 ops: 16 transactions
        ops += reg.op_schedule(Unit(f"u{i}.service", HELLO.hash, TargetState.LAUNCHED), "a")
    await reg.fenced(token, ops)
    assert counting.most > 1
    assert len(await reg.placements()) == 1000


async def test_deposed_leader_lands_no_chunk(backend: Backend) -> None:
    reg = Registry(backend.kv)
    old = await reg.campaign("a", await backend.kv.grant(60))
    assert old is not None
    await reg.resign(old)
    new = await reg.campaign("b", await backend.kv.grant(60))
    assert new is not None
    ops = []
    for i in range(500):
        ops += reg.op_schedule(Unit(f"u{i}.service", HELLO.hash, TargetState.LAUNCHED), "a")
    with pytest.raises(NotLeader):
        await reg.fenced(old, ops)
    assert await reg.placements() == {}


# ---- body garbage collection (fleetd/registry/gc.py) --------------------------------------

THIRD = parse_unit("[Service]\nExecStart=/bin/sleep 3\n")


async def stored_bodies(backend: Backend, reg: Registry) -> set[str]:
    kvs, _ = await backend.kv.range(reg.keys.bodies, keys_only=True)
    assert all(kv.value == "" for kv in kvs)  # keys_only sends no value
    return {reg.keys.tail(kv.key, reg.keys.bodies) for kv in kvs}


async def test_the_sweep_leaves_no_body_orphaned_by_replace_or_destroy(backend: Backend) -> None:
    reg = Registry(backend.kv)
    assert await reg.create_unit("a@1.service", HELLO)
    assert await reg.create_unit("a@2.service", HELLO)  # one shared body
    for body in (OTHER, THIRD, OTHER):  # three replaces
        assert await reg.create_unit("a@1.service", body, replace=True)
    assert await gc.sweep_orphaned_bodies(reg) == [THIRD.hash]
    assert await stored_bodies(backend, reg) == {HELLO.hash, OTHER.hash}  # a@2 keeps HELLO
    assert await reg.destroy_unit("a@2.service")
    assert await gc.sweep_orphaned_bodies(reg) == [HELLO.hash]
    assert await reg.create_unit("a@1.service", OTHER, replace=True)  # same body: kept
    assert await reg.destroy_unit("a@1.service")
    assert await gc.sweep_orphaned_bodies(reg) == [OTHER.hash]
    assert await stored_bodies(backend, reg) == set()


async def test_sweep_collects_orphans_and_keeps_referenced_bodies(backend: Backend) -> None:
    reg = Registry(backend.kv)
    assert await reg.create_unit("kept.service", HELLO)
    # Orphans as fleet 0.1.x left them (replace and destroy never touched bodies), and a key
    # fleet did not write.
    await backend.kv.txn(
        [],
        [
            Put(reg.keys.body(OTHER.hash), OTHER.serialize()),
            Put(reg.keys.body(THIRD.hash), THIRD.serialize()),
            Put(reg.keys.body("not-a-hash"), "x"),
        ],
    )
    assert await gc.sweep_orphaned_bodies(reg) == sorted([OTHER.hash, THIRD.hash])
    assert await stored_bodies(backend, reg) == {HELLO.hash, "not-a-hash"}
    assert await gc.sweep_orphaned_bodies(reg) == []  # idempotent


async def test_a_body_reused_during_the_sweep_is_kept(backend: Backend) -> None:
    """The race: a unit re-using an orphaned body is submitted after the collector read the
    body's revision (before or after it read the unit records): the body stays."""
    reg = Registry(backend.kv)
    submitter = Registry(backend.kv)  # another client, its own cache
    assert await reg.create_unit("old.service", HELLO)
    assert await reg.create_unit("old@x.service", OTHER)
    await backend.kv.txn([], [Delete(reg.keys.unit("old.service"))])  # orphan, as 0.1.x did
    await backend.kv.txn([], [Delete(reg.keys.unit("old@x.service"))])
    body_kvs, _ = await backend.kv.range(reg.keys.bodies, keys_only=True)
    read = {reg.keys.tail(kv.key, reg.keys.bodies): kv.mod_revision for kv in body_kvs}
    assert set(read) == {HELLO.hash, OTHER.hash}
    # Between the sweep's read of the bodies and its read of the unit records:
    assert await submitter.create_unit("new.service", HELLO)

    # ... and between its read of the unit records and its delete (a KV that lets the
    # submitter in just after the range of units/, before the guarded delete).
    class Interleaved:
        def __init__(self, inner: KV) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        async def range(self, prefix: str, *, keys_only: bool = False) -> Any:
            found = await self.inner.range(prefix, keys_only=keys_only)
            if prefix == reg.keys.units:
                assert await submitter.create_unit("new@x.service", OTHER)
            return found

    collector = Registry(cast(KV, Interleaved(backend.kv)))
    assert await collector.delete_orphaned_bodies(read) == []
    assert await stored_bodies(backend, reg) == {HELLO.hash, OTHER.hash}
    fresh = Registry(backend.kv)
    assert await fresh.get_body(HELLO.hash) == HELLO
    assert await fresh.get_body(OTHER.hash) == OTHER
    # Once nobody uses them, they go.
    assert await reg.destroy_unit("new.service")
    assert await reg.destroy_unit("new@x.service")
    assert sorted(await gc.sweep_orphaned_bodies(reg)) == sorted([HELLO.hash, OTHER.hash])
    assert await stored_bodies(backend, reg) == set()


async def test_create_units_lands_a_command_in_one_transaction(backend: Backend) -> None:
    reg = Registry(backend.kv)
    before = await backend.kv.current_revision()
    await reg.create_units(
        [
            ("a@1.service", HELLO, TargetState.LAUNCHED),
            ("a@2.service", HELLO, TargetState.LAUNCHED),  # the same body, put once
            ("b.service", OTHER, TargetState.INACTIVE),
        ]
    )
    assert await backend.kv.current_revision() == before + 1  # one transaction
    assert {u.name: (u.hash, u.target_state) for u in await reg.list_units()} == {
        "a@1.service": (HELLO.hash, TargetState.LAUNCHED),
        "a@2.service": (HELLO.hash, TargetState.LAUNCHED),
        "b.service": (OTHER.hash, TargetState.INACTIVE),
    }
    assert await stored_bodies(backend, reg) == {HELLO.hash, OTHER.hash}


async def test_create_units_beyond_one_transaction_puts_each_body_with_its_records(
    backend: Backend,
) -> None:
    """Chunked past MAX_TXN_OPS: every chunk puts the body of every record it writes, so the
    body sweep can never catch a body between its put and its first record (gc.py, 1.)."""
    reg = Registry(backend.kv)
    shared = parse_unit("[Service]\nExecStart=/bin/sleep 7\n")
    units = [(f"s@{i}.service", shared, TargetState.INACTIVE) for i in range(70)]
    units += [
        (
            f"u{i}.service",
            parse_unit(f"[Service]\nExecStart=/bin/sleep {100 + i}\n"),
            TargetState.INACTIVE,
        )
        for i in range(70)
    ]
    seen: list[list[Op]] = []

    class Recording:
        def __getattr__(self, name: str) -> Any:
            return getattr(backend.kv, name)

        async def txn(self, compares: Any, success: Any, failure: Any = ()) -> Any:
            seen.append(list(success))
            return await backend.kv.txn(compares, success, failure)

    await Registry(cast(KV, Recording())).create_units(units)
    assert len(seen) > 1
    for chunk in seen:
        keys = [op.key for op in chunk]
        assert len(keys) == len(set(keys)), "a key twice in one transaction"
        bodies = {k for k in keys if k.startswith(reg.keys.bodies)}
        for op in chunk:
            if op.key.startswith(reg.keys.units):
                hash_, _ = codec.decode_desired(op.value)  # type: ignore[union-attr]
                assert reg.keys.body(hash_) in bodies
    assert len(await reg.list_units()) == 140
