"""The etcd layout's schema version: written once, newer refused, older migrated by the leader.

Version 1 is the only layout so far, so the migration tests give `migrate` a step 1 -> 2 of
their own (an additive one, as the rule in migrations.py asks) and check how it is run.
"""

from __future__ import annotations

import asyncio

import pytest

from fleetd.engine.engine import Engine
from fleetd.model import Machine
from fleetd.registry.fake import FakeKV
from fleetd.registry.keys import SCHEMA_VERSION
from fleetd.registry.kv import KeyValue, Put
from fleetd.registry.migrations import SchemaTooNew, blocking_machines, migrate, version_key
from fleetd.registry.registry import Registry

NEXT = SCHEMA_VERSION + 1


async def _registry_with(machines: dict[str, str]) -> Registry:
    registry = Registry(FakeKV())
    await registry.ensure_schema()
    lease = await registry.kv.grant(60)
    for machine_id, version in machines.items():
        assert await registry.register_machine(Machine.make(machine_id, version=version), lease)
    return registry


async def _schema_key(registry: Registry) -> KeyValue:
    """The schema version's key, which must be there."""
    stored = await registry.kv.get(registry.keys.schema)
    assert stored is not None
    return stored


async def test_a_fresh_keyspace_gets_this_releases_version_once() -> None:
    registry = Registry(FakeKV())
    assert await registry.ensure_schema() == SCHEMA_VERSION
    first = await registry.kv.get(registry.keys.schema)
    assert await registry.ensure_schema() == SCHEMA_VERSION
    again = await registry.kv.get(registry.keys.schema)
    assert first is not None
    assert again is not None
    assert (again.value, again.mod_revision) == (str(SCHEMA_VERSION), first.mod_revision)


@pytest.mark.parametrize(
    ("written", "message"),
    [
        (str(NEXT), f"schema version {NEXT}, newer than"),
        ("7", "schema version 7, newer than"),
        ("two", "unreadable schema version 'two'"),
        ("²", "unreadable schema version '²'"),
    ],
)
async def test_a_newer_or_unreadable_layout_is_refused(written: str, message: str) -> None:
    registry = Registry(FakeKV())
    await registry.kv.txn([], [Put(registry.keys.schema, written)])
    with pytest.raises(SchemaTooNew, match=message):
        await registry.ensure_schema()
    stored = await _schema_key(registry)
    assert stored.value == written  # nothing rewritten


class Step:
    """A 1 -> 2 step that adds one key (idempotent: a put of the same value)."""

    def __init__(self) -> None:
        self.runs = 0

    async def __call__(self, registry: Registry) -> None:
        self.runs += 1
        await registry.kv.txn([], [Put(f"{registry.keys.prefix}added-by-2", "yes")])


async def _migrate_to_next(registry: Registry, step: Step) -> int:
    """migrate() from this release's version to NEXT with `step`, NEXT known since 0.3.0."""
    return await migrate(
        registry, SCHEMA_VERSION, target=NEXT, steps={SCHEMA_VERSION: step}, since={NEXT: "0.3.0"}
    )


async def test_an_older_layout_is_migrated_once_when_every_machine_knows_the_new_one() -> None:
    registry = await _registry_with({"aaaa1111": "0.3.0", "bbbb2222": "0.3.1"})
    await registry.kv.txn([], [Put(registry.keys.schema, str(SCHEMA_VERSION))])
    step = Step()
    reached = await _migrate_to_next(registry, step)
    assert (reached, step.runs) == (NEXT, 1)
    stored = await _schema_key(registry)
    assert stored.value == str(NEXT)
    assert await registry.kv.get(f"{registry.keys.prefix}added-by-2") is not None
    # Run again from the version now stored: nothing to do, nothing written.
    revision = await registry.kv.current_revision()
    assert await migrate(registry, NEXT, target=NEXT, steps={SCHEMA_VERSION: step}) == NEXT
    assert step.runs == 1
    assert await registry.kv.current_revision() == revision


async def test_migration_waits_while_a_machine_runs_an_older_release() -> None:
    registry = await _registry_with({"aaaa1111": "0.3.0", "bbbb2222": "0.2.0"})
    step = Step()
    reached = await _migrate_to_next(registry, step)
    assert (reached, step.runs) == (SCHEMA_VERSION, 0)
    stored = await _schema_key(registry)
    assert stored.value == str(SCHEMA_VERSION)


async def test_two_leaders_racing_bump_the_version_once() -> None:
    registry = await _registry_with({"aaaa1111": "0.3.0"})
    step = Step()
    # A deposed leader and its successor both run the (idempotent) step; the version key's
    # compare-and-swap on the old value lets exactly one of them move it.
    results = await asyncio.gather(*(_migrate_to_next(registry, step) for _ in range(2)))
    assert results == [NEXT, NEXT]
    stored = await _schema_key(registry)
    assert (stored.value, stored.version) == (str(NEXT), 2)  # created, then bumped once


async def test_a_missing_step_leaves_the_layout_as_it_is() -> None:
    registry = await _registry_with({"aaaa1111": "0.3.0"})
    revision = await registry.kv.current_revision()
    # No step from 1: the leader leads on the old layout (logged) instead of crashing.
    assert await migrate(registry, 1, target=2, steps={}) == 1
    assert await registry.kv.current_revision() == revision


async def test_a_leader_that_finds_a_newer_layout_gives_the_lead_up() -> None:
    registry = await _registry_with({})
    lease = await registry.kv.grant(60)
    await registry.kv.txn([], [Put(registry.keys.schema, str(NEXT))])

    async def current_lease() -> int:
        return lease

    engine = Engine(registry, "m1", current_lease)
    with pytest.raises(SchemaTooNew):
        await asyncio.wait_for(engine.run(asyncio.Event()), timeout=10)
    assert await registry.kv.get(registry.keys.leader) is None  # resigned, not held


def test_which_machines_block_a_step() -> None:
    versions = {"a": "0.3.0", "b": "0.2.9", "c": "v0.4.0-rc1", "d": "dev"}
    assert blocking_machines(2, versions, {2: "0.3.0"}) == ["b", "d"]
    assert version_key("v1.2.3-rc1+x") == (1, 2, 3)
    assert version_key("dev") is None
