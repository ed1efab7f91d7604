"""PartitionPolicy= (beyond fleet): the pure fencing decision, and in the simulator an etcd
outage longer than agent_ttl, with units of both policies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fleetd.agent.agent import Agent
from fleetd.agent.plan import FENCE_FRACTION, CurrentUnit, lease_at_risk, units_to_fence
from fleetd.model import Machine, PartitionPolicy, TargetState
from fleetd.registry.fake import FakeKV
from fleetd.registry.registry import Registry
from fleetd.sim import SimCluster, SimMachine
from fleetd.systemd.fake import FakeUnitManager
from tests.unit.fixed_lease import FixedLease
from tests.unit.test_sim_cluster import (
    HELLO,
    TTL,
    running_on,
    start_unit,
    three_machines,
    wait_for,
)

KEEP, STOP = PartitionPolicy.KEEP, PartitionPolicy.STOP
LAUNCHED, LOADED = TargetState.LAUNCHED, TargetState.LOADED


def cur(name: str, state: TargetState = LAUNCHED) -> CurrentUnit:
    return CurrentUnit(name, "0" * 40, state)


# ---- the pure decision ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unrenewed", "expected"),
    [(0.0, False), (10.0, False), (20.0, False), (20.01, True), (29.9, True), (300.0, True)],
)
def test_lease_at_risk_past_two_thirds_of_ttl(unrenewed: float, expected: bool) -> None:
    assert pytest.approx(2 / 3) == FENCE_FRACTION
    assert lease_at_risk(1000.0 + unrenewed, 1000.0, 30.0) is expected


@pytest.mark.parametrize(
    ("now", "current", "policies", "expected"),
    [
        # lease healthy: nothing, whatever the policies
        (110.0, {"a": cur("a")}, {"a": STOP}, []),
        # at risk: only launched STOP units
        (125.0, {"a": cur("a")}, {"a": STOP}, ["a"]),
        (125.0, {"a": cur("a")}, {"a": KEEP}, []),
        (125.0, {"a": cur("a")}, {}, []),  # unknown policy is the default, KEEP
        (125.0, {"a": cur("a", LOADED)}, {"a": STOP}, []),  # not running: nothing to stop
        (125.0, {"a": cur("a", TargetState.INACTIVE)}, {"a": STOP}, []),
        (
            125.0,
            {"c": cur("c"), "a": cur("a"), "b": cur("b"), "d": cur("d", LOADED)},
            {"a": STOP, "b": KEEP, "c": STOP, "d": STOP},
            ["a", "c"],
        ),
        # a policy for a unit not on record changes nothing
        (125.0, {}, {"a": STOP}, []),
    ],
)
def test_units_to_fence(
    now: float,
    current: dict[str, CurrentUnit],
    policies: dict[str, PartitionPolicy],
    expected: list[str],
) -> None:
    assert units_to_fence(now, 100.0, 30.0, current, policies) == expected


def test_fence_point_precedes_lease_expiry() -> None:
    # At every instant where the engine could move the unit (lease expired), the agent has
    # already decided to stop it.
    ttl, renewed = 5.0, 50.0
    for step in range(0, 2000):
        now = renewed + step * 0.01
        if now - renewed >= ttl:
            assert units_to_fence(now, renewed, ttl, {"a": cur("a")}, {"a": STOP}) == ["a"]


# ---- in the simulator ------------------------------------------------------------------

STOPPY = HELLO + "\n[X-Fleet]\nPartitionPolicy=stop\n"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[SimCluster, FakeKV]]:
    kv = FakeKV()
    async with three_machines(kv, tmp_path) as sim:
        yield sim, kv


def active_pid(m: SimMachine, name: str) -> int:
    state = m.manager._states.get(name)
    if state is None or state.active_state != "active":
        return 0
    return m.manager._pids.get(name, 0)


async def test_outage_longer_than_ttl_fences_stop_units_only(
    cluster: tuple[SimCluster, FakeKV],
) -> None:
    sim, kv = cluster
    await start_unit(sim, "keep.service")
    await start_unit(sim, "stop.service", STOPPY)
    await wait_for(
        lambda: (
            len(running_on(sim, "keep.service")) == 1 and len(running_on(sim, "stop.service")) == 1
        ),
        what="both running",
    )
    keep_host = running_on(sim, "keep.service")[0]
    keep_pid = active_pid(keep_host, "keep.service")
    stop_host = running_on(sim, "stop.service")[0]
    assert keep_pid

    samples: list[tuple[float, int, int]] = []  # (time, keep pid on its host, stop copies)
    sampling = True

    async def sample() -> None:
        while sampling:
            copies = sum(1 for m in sim.machines.values() if active_pid(m, "stop.service"))
            samples.append((time.monotonic(), active_pid(keep_host, "keep.service"), copies))
            await asyncio.sleep(0.01)

    sampler = asyncio.ensure_future(sample())
    await asyncio.sleep(0.05)
    renewed_before = stop_host.presence.last_renewed
    kv.set_unavailable(True)
    outage_start = time.monotonic()
    fenced_at = 0.0
    while time.monotonic() - outage_start < 2 * TTL:
        if not fenced_at and not active_pid(stop_host, "stop.service"):
            fenced_at = time.monotonic()
        await asyncio.sleep(0.005)
    outage_end = time.monotonic()
    kv.set_unavailable(False)

    # The STOP unit was stopped after 2/3 of the TTL without renewal, before the lease expired.
    assert fenced_at, "the STOP unit was never fenced"
    assert renewed_before + FENCE_FRACTION * TTL < fenced_at < renewed_before + TTL
    assert "stop.service" in stop_host.agent.fenced
    assert stop_host.agent.record.units["stop.service"].state == LOADED  # honest record
    # The KEEP unit ran through the whole outage, same process.
    during = [s for s in samples if outage_start <= s[0] <= outage_end]
    assert len(during) > 50
    assert all(pid == keep_pid for _, pid, _ in during)

    # After recovery (the leases expired): exactly one copy of the STOP unit, and never two.
    await wait_for(lambda: len(running_on(sim, "stop.service")) == 1, within=10, what="stop back")
    await wait_for(lambda: len(running_on(sim, "keep.service")) == 1, within=10, what="keep")
    await asyncio.sleep(0.5)
    sampling = False
    await sampler
    assert max(copies for _, _, copies in samples) == 1
    assert len(running_on(sim, "stop.service")) == 1
    assert all(not m.agent.fenced for m in sim.machines.values())


async def test_short_outage_keeps_lease_and_restarts_fenced_unit(
    cluster: tuple[SimCluster, FakeKV],
) -> None:
    # Unavailable past the fence point but not past the TTL: the lease survives, the schedule
    # still says launched here, and the agent starts its fenced unit again on the same machine.
    sim, kv = cluster
    await start_unit(sim, "stop.service", STOPPY)
    await wait_for(lambda: len(running_on(sim, "stop.service")) == 1, what="running")
    host = running_on(sim, "stop.service")[0]
    lease = host.presence.lease
    old_pid = active_pid(host, "stop.service")
    renewed = host.presence.last_renewed
    kv.set_unavailable(True)
    await wait_for(lambda: not active_pid(host, "stop.service"), within=TTL, what="fenced")
    assert time.monotonic() - renewed < TTL
    kv.set_unavailable(False)
    await wait_for(lambda: active_pid(host, "stop.service") != 0, within=5, what="restarted")
    assert host.presence.lease == lease  # the lease survived: no reschedule
    assert active_pid(host, "stop.service") != old_pid
    assert [m.id for m in running_on(sim, "stop.service")] == [host.id]
    assert not host.agent.fenced
    assert host.agent.record.units["stop.service"].state == LAUNCHED


async def test_outage_of_two_ttls_stops_nothing_with_policy_keep(
    cluster: tuple[SimCluster, FakeKV],
) -> None:
    sim, kv = cluster
    names = [f"hello@{i}.service" for i in range(6)]
    for name in names:
        await start_unit(sim, name)
    await wait_for(lambda: all(len(running_on(sim, n)) == 1 for n in names), what="running")
    await asyncio.sleep(0.2)
    pids = {n: active_pid(running_on(sim, n)[0], n) for n in names}
    tasks_before = {m.id: m.agent.tasks_run for m in sim.machines.values()}

    kv.set_unavailable(True)
    start = time.monotonic()
    while time.monotonic() - start < 2 * TTL:
        assert all(len(running_on(sim, n)) == 1 for n in names)
        await asyncio.sleep(0.01)
    kv.set_unavailable(False)

    await wait_for(lambda: all(m.agent.synced for m in sim.machines.values()), what="synced")
    await asyncio.sleep(1.0)  # leases re-registered, engine and agents settled
    for name in names:
        hosts = running_on(sim, name)
        assert len(hosts) == 1
        assert active_pid(hosts[0], name) == pids[name]
    assert {m.id: m.agent.tasks_run for m in sim.machines.values()} == tasks_before
    assert all(not m.agent.fenced for m in sim.machines.values())


# ---- when the fence loop wakes -------------------------------------------------------------


def fence_timing_agent(now: list[float], lease: FixedLease) -> Agent:
    return Agent(
        Registry(FakeKV()),
        FakeUnitManager(),
        lambda: Machine.make("a" * 32),
        lease,
        clock=lambda: now[0],
    )


def test_idle_fence_loop_sleeps_until_the_lease_could_be_at_risk() -> None:
    """Not a tick per second per agent: one wake when fencing could first be needed."""
    now, lease = [100.0], FixedLease(1, last_renewed=100.0, ttl=9.0)
    agent = fence_timing_agent(now, lease)
    assert agent.fence._wait(at_risk=False) == pytest.approx(9.0 * FENCE_FRACTION)
    now[0] = 104.0  # renewed 4 s ago: the fence point is 2 s away
    assert agent.fence._wait(at_risk=False) == pytest.approx(2.0)
    lease.last_renewed = 103.5  # a renewal moves the fence point
    assert agent.fence._wait(at_risk=False) == pytest.approx(5.5)
    now[0] = 110.0  # the fence point (109.5) passed: never sleep less than a tick
    assert agent.fence._wait(at_risk=False) == agent.fence.fence_tick


def test_fence_loop_ticks_while_at_risk_or_holding_units() -> None:
    now, lease = [100.0], FixedLease(1, last_renewed=100.0, ttl=9.0)
    agent = fence_timing_agent(now, lease)
    assert agent.fence._wait(at_risk=True) == agent.fence.fence_tick
    agent.fenced.add("x.service")
    assert agent.fence._wait(at_risk=False) == agent.fence.fence_tick
