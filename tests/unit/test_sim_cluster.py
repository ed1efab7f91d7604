"""End to end in one process: real presence, engine and agent code over FakeKV, with fake
systemd per machine. Fast checks of the cluster's behaviour; the same scenarios run on real
etcd and real systemd in tests/functional."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from fleetd.model import TargetState
from fleetd.registry.fake import FakeKV
from fleetd.sim import SimCluster, SimMachine
from fleetd.unit.file import parse_unit
from tests.integration.waits import wait_until

HELLO = "[Unit]\nDescription=Hello\n\n[Service]\nExecStart=/bin/sleep 1000\n"
TTL = 1.0


async def wait_for(cond: Callable[[], bool], within: float = 5.0, what: str = "") -> float:
    return await wait_until(cond, within, what)


@contextlib.asynccontextmanager
async def three_machines(kv: FakeKV, state_dir: Path) -> AsyncIterator[SimCluster]:
    """Machines 1 to 3 over `kv` (metadata idx=N, IP 10.0.0.N), started and with an engine
    leader; closed on the way out."""
    sim = SimCluster(kv, agent_ttl=TTL, safety_interval=0.5, state_dir=state_dir)
    for i in range(3):
        sim.add(f"{i + 1:032x}", metadata={"idx": str(i + 1)}, public_ip=f"10.0.0.{i + 1}")
    await sim.start_all()
    await wait_for(lambda: sim.leader() is not None, what="an engine leader")
    try:
        yield sim
    finally:
        await sim.close()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[SimCluster]:
    async with three_machines(FakeKV(), tmp_path) as sim:
        yield sim


def running_on(sim: SimCluster, name: str) -> list[SimMachine]:
    out = []
    for m in sim.machines.values():
        if not m.running:
            continue
        state = m.manager._states.get(name)
        if state is not None and state.active_state == "active":
            out.append(m)
    return out


async def start_unit(sim: SimCluster, name: str, text: str = HELLO) -> None:
    await sim.client.create_unit(name, parse_unit(text), TargetState.LAUNCHED)


async def test_unit_starts_on_exactly_one_machine(cluster: SimCluster) -> None:
    await start_unit(cluster, "hello.service")
    await wait_for(lambda: len(running_on(cluster, "hello.service")) == 1, what="hello running")
    placement = await cluster.client.placement("hello.service")
    assert placement is not None
    assert placement.machine_id == running_on(cluster, "hello.service")[0].id

    async def published() -> bool:
        states = await cluster.client.list_states("hello.service")
        return any(
            s.active_state == "active" and s.agent_state == TargetState.LAUNCHED for s in states
        )

    deadline = time.monotonic() + 5
    while not await published():
        assert time.monotonic() < deadline, "state never published"
        await asyncio.sleep(0.01)


async def test_units_spread_least_loaded(cluster: SimCluster) -> None:
    for i in range(6):
        await start_unit(cluster, f"hello@{i}.service")
    names = [f"hello@{i}.service" for i in range(6)]
    await wait_for(lambda: all(len(running_on(cluster, n)) == 1 for n in names), what="all running")
    per_machine = [len(m.manager.files) for m in cluster.machines.values()]
    assert per_machine == [2, 2, 2]


async def test_stop_then_destroy(cluster: SimCluster) -> None:
    await start_unit(cluster, "hello.service")
    await wait_for(lambda: len(running_on(cluster, "hello.service")) == 1)
    host = running_on(cluster, "hello.service")[0]
    await cluster.client.set_target_state("hello.service", TargetState.LOADED)
    await wait_for(lambda: not running_on(cluster, "hello.service"), what="stopped")
    assert "hello.service" in host.manager.files  # still loaded
    await cluster.client.destroy_unit("hello.service")
    await wait_for(lambda: "hello.service" not in host.manager.files, what="unloaded")

    async def forgotten() -> bool:
        placement = await cluster.client.placement("hello.service")
        states = await cluster.client.list_states("hello.service")
        return placement is None and not states

    deadline = time.monotonic() + 5
    while not await forgotten():
        assert time.monotonic() < deadline, "placement or state left behind after destroy"
        await asyncio.sleep(0.01)


async def test_crashed_machine_units_move(cluster: SimCluster) -> None:
    await start_unit(cluster, "hello.service")
    await wait_for(lambda: len(running_on(cluster, "hello.service")) == 1)
    victim = running_on(cluster, "hello.service")[0]
    await cluster.crash(victim)
    took = await wait_for(
        lambda: any(m.id != victim.id for m in running_on(cluster, "hello.service")),
        within=TTL + 5,
        what="hello rescheduled",
    )
    assert took < TTL + 3


async def test_graceful_stop_hands_over_without_waiting_for_ttl(cluster: SimCluster) -> None:
    await start_unit(cluster, "hello.service")
    await wait_for(lambda: len(running_on(cluster, "hello.service")) == 1)
    victim = running_on(cluster, "hello.service")[0]
    await cluster.graceful_stop(victim)
    assert "hello.service" not in victim.manager.files
    took = await wait_for(
        lambda: len(running_on(cluster, "hello.service")) == 1, within=TTL + 5, what="moved"
    )
    assert took < TTL  # no lease expiry involved


async def test_restarted_agent_leaves_running_units_alone(cluster: SimCluster) -> None:
    await start_unit(cluster, "hello.service")
    await wait_for(lambda: len(running_on(cluster, "hello.service")) == 1)
    host = running_on(cluster, "hello.service")[0]
    pid = await host.manager.main_pid("hello.service")
    await cluster.crash(host)
    cluster.restart(host)  # a new Agent, reading the record the old one left
    await wait_for(lambda: host.agent.synced, what="restarted agent synced")
    assert host.agent.tasks_run == 0  # nothing to do: no restart of the unit
    assert await host.manager.main_pid("hello.service") == pid
    assert [m.id for m in running_on(cluster, "hello.service")] == [host.id]


async def test_unplaceable_unit_gets_reason(cluster: SimCluster) -> None:
    text = HELLO + "\n[X-Fleet]\nMachineMetadata=idx=9\n"
    await start_unit(cluster, "picky.service", text)

    async def reason() -> str:
        p = await cluster.client.placement("picky.service")
        return p.reason if p and p.machine_id is None else ""

    deadline = time.monotonic() + 5
    while not await reason():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert "idx=9" in await reason()


async def test_global_unit_runs_everywhere(cluster: SimCluster) -> None:
    await start_unit(cluster, "g.service", HELLO + "\n[X-Fleet]\nGlobal=true\n")
    await wait_for(lambda: len(running_on(cluster, "g.service")) == 3, what="global everywhere")


async def test_clone_with_a_machine_id_in_use_runs_nothing(
    cluster: SimCluster, tmp_path: Path
) -> None:
    """A second fleetd claiming a live machine's id (a cloned image) is refused registration,
    and its agent never follows that machine's schedule: no unit runs twice."""
    for i in range(3):
        await start_unit(cluster, f"u{i}.service")
    for i in range(3):
        await wait_for(lambda i=i: len(running_on(cluster, f"u{i}.service")) == 1, what=f"u{i}")
    original = next(iter(cluster.machines.values()))
    clones = SimCluster(cluster.kv, agent_ttl=TTL, engines=0, state_dir=tmp_path / "clone")
    clone = clones.add(original.id)
    clones.start(clone)
    try:
        await wait_for(lambda: clone.presence.refused_duplicate, what="the clone to be refused")
        # An invariant over more than a TTL: the clone's systemd never gets a unit.
        deadline = time.monotonic() + 2 * TTL
        while time.monotonic() < deadline:
            assert clone.manager._states == {}, sorted(clone.manager._states)
            assert not clone.presence.registered.is_set()
            await asyncio.sleep(0.02)
        assert original.presence.registered.is_set()
    finally:
        await clones.close()


async def test_idle_engine_does_not_replan_an_unchanged_view(tmp_path: Path) -> None:
    """The idle safety pass would re-plan every unit for nothing: it plans only on change."""
    sim = SimCluster(FakeKV(), agent_ttl=TTL, safety_interval=0.02, state_dir=tmp_path)
    sim.add("1" * 32)
    await sim.start_all()
    try:
        await wait_for(lambda: sim.leader() is not None, what="an engine leader")
        leader = sim.leader()
        assert leader is not None
        assert leader.engine is not None
        engine = leader.engine
        await start_unit(sim, "hello.service")
        await wait_for(lambda: len(running_on(sim, "hello.service")) == 1, what="hello running")
        plans = engine.stats.plans
        # Many idle intervals (invariant over time, not a wait for something to happen).
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            assert engine.stats.plans == plans
            await asyncio.sleep(0.02)
        await start_unit(sim, "again.service")
        await wait_for(lambda: engine.stats.plans > plans, what="a plan for the new unit")
    finally:
        await sim.close()
