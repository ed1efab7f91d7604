"""etcd-side faults in the simulator: real presence, engine and agent code over FakeKV.

A stalled etcd (FakeKV.pause: requests hang, no lease expires, then every expired lease goes
at once on resume) must not look like machine failures: every fleetd stays up, re-registers
under the same id, and keeps its units with the same PIDs. A machine that dies while etcd is
healthy is still moved at once. The same faults run against the real etcd and systemd in
tests/functional/test_etcd_stall.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from fleetd.errors import ConfigError, RegistryUnavailable
from fleetd.model import Machine, TargetState
from fleetd.presence import Presence
from fleetd.registry.fake import FakeKV
from fleetd.registry.registry import Registry
from fleetd.server import supervise
from fleetd.sim import SimCluster
from fleetd.unit.file import parse_unit
from fleetd.watching import Backoff
from tests.integration.waits import wait_until

TTL = 1.0
UNIT = "[Unit]\nDescription=work\n\n[Service]\nExecStart=/bin/sleep 1000\n"
STOP_UNIT = UNIT + "\n[X-Fleet]\nPartitionPolicy=stop\n"


async def wait_for(cond: Callable[[], bool], within: float = 10.0, what: str = "") -> float:
    return await wait_until(cond, within, what)


class Gate:
    """One machine's path to the shared FakeKV, which a test can hold shut: that machine's
    requests wait (as a machine whose etcd connection comes back last after a stall)."""

    def __init__(self, kv: FakeKV) -> None:
        self.kv = kv
        self.open = asyncio.Event()
        self.open.set()

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.kv, name)
        if name == "watch" or not asyncio.iscoroutinefunction(target):
            return target

        async def gated(*args: Any, **kwargs: Any) -> Any:
            await self.open.wait()
            return await target(*args, **kwargs)

        return gated


async def make_cluster(tmp_path: Path, n: int) -> SimCluster:
    kv = FakeKV()
    gates = {f"{i + 1:032x}": Gate(kv) for i in range(n)}
    sim = SimCluster(
        kv,
        agent_ttl=TTL,
        safety_interval=0.5,
        state_dir=tmp_path,
        machine_kv=lambda machine_id: gates[machine_id],  # type: ignore[arg-type,return-value]
    )
    sim.gates = gates  # type: ignore[attr-defined]
    for i in range(n):
        sim.add(f"{i + 1:032x}")
    await sim.start_all()
    await wait_for(lambda: sim.leader() is not None, what="an engine leader")
    return sim


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[SimCluster]:
    sim = await make_cluster(tmp_path, 3)
    yield sim
    await sim.close()


def fake_kv(sim: SimCluster) -> FakeKV:
    assert isinstance(sim.kv, FakeKV)
    return sim.kv


def where(sim: SimCluster, name: str) -> dict[str, int]:
    """machine id -> main PID, for every machine where `name` is active."""
    found = {}
    for m in sim.machines.values():
        state = m.manager._states.get(name)
        if m.running and state is not None and state.active_state == "active":
            found[m.id] = m.manager._pids[name]
    return found


async def start_units(sim: SimCluster, names: list[str], text: str = UNIT) -> None:
    for name in names:
        await sim.client.create_unit(name, parse_unit(text), TargetState.LAUNCHED)
    await wait_for(lambda: all(len(where(sim, n)) == 1 for n in names), what="units running")


def placement_revisions(sim: SimCluster, names: list[str]) -> dict[str, int]:
    kv = fake_kv(sim)
    keys = sim.client.keys
    out = {}
    for name in names:
        found = kv._data.get(keys.placement(name))
        assert found is not None, f"no placement for {name}"
        out[name] = found.mod_revision
    return out


def settled(sim: SimCluster) -> bool:
    """Every machine registered, a leader that holds nothing and whose grace is over."""
    leader = sim.leader()
    if leader is None or leader.engine is None:
        return False
    ends = leader.engine.grace_ends()
    return (
        all(m.presence.registered.is_set() for m in sim.machines.values() if m.running)
        and not leader.engine.holding
        and ends is not None
        and ends < leader.engine.clock()
    )


def all_tasks_alive(sim: SimCluster) -> None:
    for m in sim.machines.values():
        for task in m.tasks:
            assert not task.done(), f"a component of {m.id} ended: {task}"


@pytest.mark.parametrize("stall", [2.0, 5.0], ids=["2xTTL", "5xTTL"])
async def test_etcd_stall_past_ttl_moves_nothing(cluster: SimCluster, stall: float) -> None:
    names = [f"work-{i}.service" for i in range(6)]
    await start_units(cluster, names)
    await wait_for(lambda: settled(cluster), what="a settled cluster")
    pids = {n: where(cluster, n) for n in names}
    revisions = placement_revisions(cluster, names)
    leases = {m.id: m.presence.lease for m in cluster.machines.values()}
    leader_before = cluster.leader()
    kv = fake_kv(cluster)

    kv.pause()
    await asyncio.sleep(stall * TTL)  # the fault's length, not a wait for a result
    assert kv.lease_count == 3, "no lease may expire while etcd is stalled"
    # One machine (not the one leading before) gets through last, 0.6 TTL after the others:
    # without the grace, whoever leads now would move that machine's units meanwhile.
    late = next(m for m in cluster.machines.values() if m is not leader_before)
    gate = cluster.gates[late.id]  # type: ignore[attr-defined]
    gate.open.clear()
    kv.resume()
    await asyncio.sleep(0.6 * TTL)
    gate.open.set()

    # Every lease expired at once, so every machine registers again (new leases, same ids).
    await wait_for(
        lambda: all(m.presence.lease not in (0, leases[m.id]) for m in cluster.machines.values()),
        what="every machine re-registered on a new lease",
    )
    await wait_for(lambda: settled(cluster), what="the grace to end")
    all_tasks_alive(cluster)
    assert {n: where(cluster, n) for n in names} == pids, "a unit moved or restarted"
    assert placement_revisions(cluster, names) == revisions, "a placement was rewritten"
    leader = cluster.leader()
    assert leader is not None
    assert leader.engine is not None

    # And the cluster works: a unit started afterwards runs.
    await start_units(cluster, ["after.service"])


async def test_stop_policy_units_never_run_twice_and_come_back(cluster: SimCluster) -> None:
    names = [f"fenced-{i}.service" for i in range(3)]
    await start_units(cluster, names, STOP_UNIT)
    await wait_for(lambda: settled(cluster), what="a settled cluster")
    homes = {n: set(where(cluster, n)) for n in names}
    kv = fake_kv(cluster)
    worst = 0

    async def sample(until: float) -> None:
        nonlocal worst
        while time.monotonic() < until:
            worst = max(worst, *(len(where(cluster, n)) for n in names))
            await asyncio.sleep(0.005)

    kv.pause()
    await sample(time.monotonic() + 2.5 * TTL)
    # Fenced at 2/3 TTL without renewal: nothing runs while the lease is at risk.
    assert all(not where(cluster, n) for n in names), "a stop-policy unit ran through a stall"
    late = cluster.machines[next(iter(homes[names[0]]))]
    gate = cluster.gates[late.id]  # type: ignore[attr-defined]
    gate.open.clear()  # that machine gets through last (see the test above)
    kv.resume()
    sampler = asyncio.ensure_future(sample(time.monotonic() + 30))
    await asyncio.sleep(0.6 * TTL)
    gate.open.set()
    await wait_for(lambda: settled(cluster), what="the grace to end")
    await wait_for(
        lambda: all(set(where(cluster, n)) == homes[n] for n in names),
        what="stop-policy units running again on their own machines",
    )
    sampler.cancel()
    assert worst <= 1, "a PartitionPolicy=stop unit ran on two machines at once"
    all_tasks_alive(cluster)


async def test_a_lease_revoked_around_an_etcd_election_moves_nothing(cluster: SimCluster) -> None:
    """etcd 3.4 before 3.4.28: a leader resuming from a stall revokes leases the new leader
    kept renewing (etcd #15247). One machine loses its lease while etcd answers everyone
    well; only the election (the raft term in etcd's answers) tells it from a death."""
    names = [f"elect-{i}.service" for i in range(6)]
    await start_units(cluster, names)
    await wait_for(lambda: settled(cluster), what="a settled cluster")
    pids = {n: where(cluster, n) for n in names}
    leader = cluster.leader()
    victim = next(m for m in cluster.machines.values() if m is not leader)
    kv = fake_kv(cluster)
    gate = cluster.gates[victim.id]  # type: ignore[attr-defined]
    gate.open.clear()  # it gets through again 0.6 TTL later, as in the real case
    kv.elect()
    await kv.revoke(victim.presence.lease)
    await asyncio.sleep(0.6 * TTL)
    gate.open.set()
    await wait_for(lambda: settled(cluster), what="the grace to end")
    assert {n: where(cluster, n) for n in names} == pids, "a unit moved or restarted"
    all_tasks_alive(cluster)


async def test_a_revoke_long_after_an_election_while_a_member_was_mute_moves_nothing(
    cluster: SimCluster,
) -> None:
    """etcd's raft leader frozen for 3 TTL: the others elect a leader at once, and the frozen
    one, as it resumes, revokes the leases of two machines (the engine leader's one of them).
    The third machine's engine takes the lead long after the election's grace would have
    ended: the mute member kept etcd unsettled meanwhile, so it holds the two machines' units
    until they registered again."""
    names = [f"mute-{i}.service" for i in range(6)]
    await start_units(cluster, names)
    await wait_for(lambda: settled(cluster), what="a settled cluster")
    pids = {n: where(cluster, n) for n in names}
    kv = fake_kv(cluster)
    kv.mute = {"etcd-3:2379"}
    kv.elect()
    await asyncio.sleep(3 * TTL)
    leader = cluster.leader()
    assert leader is not None
    revoked = [leader, next(m for m in cluster.machines.values() if m is not leader)]
    kv.mute.clear()  # it resumes, and before it learns it was deposed:
    for m in revoked:
        await kv.revoke(m.presence.lease)
    await wait_for(lambda: cluster.leader() not in (None, leader), what="another engine leader")
    await wait_for(lambda: settled(cluster), what="the grace to end")
    assert {n: where(cluster, n) for n in names} == pids, "a unit moved or restarted"
    all_tasks_alive(cluster)


async def test_machine_dying_with_etcd_healthy_moves_at_once(cluster: SimCluster) -> None:
    await wait_for(lambda: settled(cluster), what="a settled cluster")
    leader = cluster.leader()
    assert leader is not None
    # The leader itself dies: its successor, healthy all along, must not hold its units.
    await cluster.client.create_unit(
        "hello.service",
        parse_unit(UNIT + f"\n[X-Fleet]\nMachineID={leader.id}\n"),
        TargetState.LAUNCHED,
    )
    await cluster.client.create_unit("roam.service", parse_unit(UNIT), TargetState.LAUNCHED)
    await wait_for(lambda: len(where(cluster, "hello.service")) == 1, what="hello running")
    await wait_for(lambda: len(where(cluster, "roam.service")) == 1, what="roam running")
    victim = cluster.machines[next(iter(where(cluster, "roam.service")))]
    await cluster.crash(victim)
    took = await wait_for(
        lambda: bool(where(cluster, "roam.service").keys() - {victim.id}),
        what="roam moved",
    )
    assert took < TTL + 3
    assert all(
        m.engine is not None and m.engine.stats.grace_holds == 0
        for m in cluster.machines.values()
        if m.running
    )


async def test_most_machines_lost_at_once_waits_a_grace(tmp_path: Path) -> None:
    sim = await make_cluster(tmp_path, 4)
    try:
        await wait_for(lambda: settled(sim), what="a settled cluster")
        names = [f"w-{i}.service" for i in range(8)]
        await start_units(sim, names)
        leader = sim.leader()
        assert leader is not None
        assert leader.engine is not None
        victims = [m for m in sim.machines.values() if m is not leader]
        lost_at = time.monotonic()
        for m in victims:
            await sim.crash(m)
        # Three of four machines gone at once: held for a grace, then moved all the same.
        await wait_for(lambda: bool(leader.engine.holding), what="the grace to hold")
        await wait_for(
            lambda: all(set(where(sim, n)) == {leader.id} for n in names),
            within=5 * TTL + 5,
            what="every unit on the survivor",
        )
        assert time.monotonic() - lost_at >= 2 * TTL * 0.9  # lease expiry, then one grace
    finally:
        await sim.close()


async def test_new_machine_id_releases_the_old_registration_at_once(tmp_path: Path) -> None:
    kv = FakeKV()
    registry = Registry(kv)
    lease_file = tmp_path / "lease"
    old = Presence(registry, lambda: Machine.make("old-id"), ttl=30, lease_file=lease_file)
    await old._register()
    assert {m.id for m in await registry.list_machines()} == {"old-id"}
    # The same machine, fleetd restarted with a new machine id: the old one goes now, not in
    # 30 s (and never, had the lease been adopted under the new id).
    new = Presence(registry, lambda: Machine.make("new-id"), ttl=30, lease_file=lease_file)
    await new._register()
    assert {m.id for m in await registry.list_machines()} == {"new-id"}
    assert new.lease != old.lease
    assert kv.lease_count == 1


async def test_a_lease_file_of_0_1_is_adopted(tmp_path: Path) -> None:
    kv = FakeKV()
    registry = Registry(kv)
    lease = await kv.grant(30)
    (tmp_path / "lease").write_text(f"{lease}\n")  # the old format: the lease alone
    presence = Presence(registry, lambda: Machine.make("m1"), ttl=30, lease_file=tmp_path / "lease")
    await presence._register()
    assert presence.lease == lease
    assert (tmp_path / "lease").read_text() == f"{lease} m1\n"


async def test_presence_survives_a_lease_lost_mid_registration() -> None:
    kv = FakeKV()
    registry = Registry(kv)
    presence = Presence(registry, lambda: Machine.make("m1"), ttl=2)
    stop = asyncio.Event()
    task = asyncio.ensure_future(presence.run(stop))
    try:
        await wait_for(presence.registered.is_set, what="registered")
        first = presence.lease
        await kv.revoke(first)  # as etcd does to every lease when a stall ends
        await wait_for(
            lambda: presence.lease not in (0, first) and presence.registered.is_set(),
            what="registered again on a new lease",
        )
        assert not task.done()
        assert {m.id for m in await registry.list_machines()} == {"m1"}
    finally:
        stop.set()
        await task


async def test_slow_keepalive_counts_as_etcd_trouble() -> None:
    kv = FakeKV()
    now = [100.0]
    presence = Presence(Registry(kv), lambda: Machine.make("m1"), ttl=6, clock=lambda: now[0])
    await presence._register()
    assert presence.settled_since() == 100.0
    real_keepalive = kv.keepalive

    async def slow(lease: int) -> int:
        now[0] += 2.0  # > TTL/6 = 1 s
        return await real_keepalive(lease)

    kv.keepalive = slow  # type: ignore[method-assign]
    await presence._renew()
    # It answered, late: etcd counts as settled only from now on, so the grace restarts.
    assert presence.settled_since() == 102.0
    kv.keepalive = real_keepalive  # type: ignore[method-assign]
    now[0] += 1.0
    await presence._renew()
    assert presence.settled_since() == 102.0
    kv.set_unavailable(True)
    with pytest.raises(RegistryUnavailable):
        await presence._renew()
    presence._trouble("keepalive", "unavailable")  # what run() does with the error
    assert presence.settled_since() is None


async def test_supervise_restarts_a_failed_component_and_stops_on_config_error() -> None:
    stop = asyncio.Event()
    runs = 0

    async def flaky(stop: asyncio.Event) -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError("a bug nobody foresaw")
        await stop.wait()

    task = asyncio.ensure_future(supervise("flaky", flaky, stop, Backoff(0.01, 0.02)))
    await wait_for(lambda: runs == 3, what="two restarts")
    assert not task.done()
    stop.set()
    await task

    async def refused(stop: asyncio.Event) -> None:
        raise ConfigError("etcd requires authentication")

    with pytest.raises(ConfigError):
        await supervise("refused", refused, asyncio.Event(), Backoff(0.01, 0.02))
