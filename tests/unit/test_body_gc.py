"""Garbage collection of unit bodies (fleetd/registry/gc.py) on the fake KV: what the pure
selection keeps, when the sweep holds back, and that releasing a body never fails the unit
write it follows. The race itself runs on both the fake and etcd in
tests/integration/test_registry_contract.py."""

from __future__ import annotations

from typing import Any

from fleetd.model import Machine
from fleetd.registry import gc
from fleetd.registry.fake import FakeKV
from fleetd.registry.kv import Put
from fleetd.registry.registry import Registry
from fleetd.unit.file import parse_unit

A = parse_unit("[Service]\nExecStart=/bin/sleep 1\n")
B = parse_unit("[Service]\nExecStart=/bin/sleep 2\n")


def bodies(fake: FakeKV, reg: Registry) -> set[str]:
    return {reg.keys.tail(k, reg.keys.bodies) for k in fake.dump(reg.keys.bodies)}


def test_orphans_are_the_unreferenced_fleet_hashes() -> None:
    found = {A.hash: 5, B.hash: 7, "README": 3, A.hash.upper(): 4}
    assert gc.orphaned_bodies(found, {A.hash}) == {B.hash: 7}
    assert gc.orphaned_bodies(found, {A.hash, B.hash}) == {}


def test_writers_older_than_0_2_hold_the_sweep_back() -> None:
    versions = {"m1": "0.2.0", "m2": "0.1.1", "m3": "v0.3.0-rc1", "m4": "garbage"}
    assert gc.blocking_writers(versions) == ["m2", "m4"]


async def test_sweep_waits_for_every_machine_to_run_0_2() -> None:
    fake = FakeKV()
    reg = Registry(fake)
    await fake.txn([], [Put(reg.keys.body(A.hash), A.serialize())])
    lease = await fake.grant(60)
    assert await reg.register_machine(Machine.make("m1", "", {}, version="0.1.1"), lease)
    assert await gc.sweep_orphaned_bodies(reg) == []
    assert bodies(fake, reg) == {A.hash}
    assert await reg.register_machine(Machine.make("m1", "", {}, version="0.2.0"), lease)
    assert await gc.sweep_orphaned_bodies(reg) == [A.hash]
    assert bodies(fake, reg) == set()


async def test_an_unreadable_unit_record_stops_the_sweep() -> None:
    fake = FakeKV()
    reg = Registry(fake)
    await fake.txn(
        [],
        [Put(reg.keys.body(A.hash), A.serialize()), Put(reg.keys.unit("x.service"), "{broken")],
    )
    assert await gc.sweep_orphaned_bodies(reg) == []  # it might name A
    assert bodies(fake, reg) == {A.hash}


async def test_one_reused_body_keeps_only_itself_in_a_batch() -> None:
    fake = FakeKV()
    reg = Registry(fake)
    many = [parse_unit(f"[Service]\nExecStart=/bin/sleep {i}\n") for i in range(200)]
    await fake.txn([], [Put(reg.keys.body(u.hash), u.serialize()) for u in many[:100]])
    await fake.txn([], [Put(reg.keys.body(u.hash), u.serialize()) for u in many[100:]])
    kvs, _ = await fake.range(reg.keys.bodies, keys_only=True)
    read = {reg.keys.tail(kv.key, reg.keys.bodies): kv.mod_revision for kv in kvs}
    reused = many[150]
    # Reused after the revisions were read: its mod_revision moved, its batch's guard fails.
    await fake.txn([], [Put(reg.keys.body(reused.hash), reused.serialize())])
    deleted = await reg.delete_orphaned_bodies(read)
    assert set(deleted) == {u.hash for u in many} - {reused.hash}
    assert bodies(fake, reg) == {reused.hash}


async def test_destroying_a_sound_unit_costs_one_read_and_one_txn() -> None:
    """As in fleet: no read of every unit record (that is the sweep's, once, after churn)."""
    fake = FakeKV()
    reg = Registry(fake)
    assert await reg.create_unit("u.service", A)
    before = dict(fake.stats)
    assert await reg.destroy_unit("u.service")
    spent = {k: v - before.get(k, 0) for k, v in fake.stats.items() if v != before.get(k, 0)}
    assert spent == {"get": 1, "txn": 1}


async def test_a_submit_rewrites_an_existing_body_with_the_record() -> None:
    """Invariant 1. of gc.py: every record write moves its body's mod_revision."""
    fake = FakeKV()
    reg = Registry(fake)
    assert await reg.create_unit("a@1.service", A)
    before = await fake.get(reg.keys.body(A.hash))
    assert await Registry(fake).create_unit("a@2.service", A)
    after = await fake.get(reg.keys.body(A.hash))
    unit = await fake.get(reg.keys.unit("a@2.service"))
    assert before is not None
    assert after is not None
    assert unit is not None
    assert after.mod_revision == unit.mod_revision > before.mod_revision


async def test_refused_create_writes_nothing() -> None:
    fake = FakeKV()
    reg = Registry(fake)
    assert await reg.create_unit("u.service", A)
    revision = fake.revision
    assert not await reg.create_unit("u.service", B)
    assert fake.revision == revision
    assert bodies(fake, reg) == {A.hash}


async def test_the_engine_leader_sweeps_soon_after_taking_the_lead(tmp_path: Any) -> None:
    import asyncio

    from fleetd.sim import SimCluster

    fake = FakeKV()
    reg = Registry(fake)
    await fake.txn([], [Put(reg.keys.body(B.hash), B.serialize())])  # an orphan from before
    sim = SimCluster(fake, agent_ttl=1.0, safety_interval=0.2, state_dir=tmp_path)
    sim.add("a" * 32)
    await sim.start_all()
    try:
        for _ in range(500):
            if B.hash not in bodies(fake, reg):
                break
            await asyncio.sleep(0.01)
        assert B.hash not in bodies(fake, reg), "the leader never swept the orphaned body"
    finally:
        await sim.close()


async def test_the_leader_sweeps_after_a_replace_once_units_are_quiet(
    tmp_path: Any, monkeypatch: Any
) -> None:
    import asyncio

    from fleetd.model import TargetState
    from fleetd.sim import SimCluster

    monkeypatch.setattr(gc, "SWEEP_QUIET", 0.2)
    fake = FakeKV()
    reg = Registry(fake)
    sim = SimCluster(fake, agent_ttl=1.0, safety_interval=5.0, state_dir=tmp_path)
    sim.add("a" * 32)
    await sim.start_all()
    try:
        await reg.create_unit("u.service", A, TargetState.LAUNCHED)
        await reg.create_unit("u.service", B, TargetState.LAUNCHED, replace=True)
        for _ in range(500):
            if bodies(fake, reg) == {B.hash}:
                break
            await asyncio.sleep(0.01)
        assert bodies(fake, reg) == {B.hash}, "the replaced body was never collected"
    finally:
        await sim.close()
