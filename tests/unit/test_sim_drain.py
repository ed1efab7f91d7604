"""Drain end to end in one process: the real engine, agents and presence over FakeKV, fake
systemd per machine, and fleetctl's own drain wait (fleetctl/maintenance.py).

Sampled every 10 ms while a machine drains: a singleton always has an active copy somewhere
(make-before-break), a PartitionPolicy=stop unit never has two, and a unit pinned to the
machine stays, named with its reason. An engine failover mid-drain still finishes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fleetctl.client import RegistryClient
from fleetctl.maintenance import wait_for_drain
from fleetd.model import Cordon, TargetState
from fleetd.registry.fake import FakeKV
from fleetd.sim import SimCluster
from fleetd.unit.file import parse_unit
from tests.unit.test_sim_cluster import running_on, three_machines, wait_for

HELLO = "[Unit]\nDescription=Hello\n\n[Service]\nExecStart=/bin/sleep 1000\n"
STOP = HELLO + "\n[X-Fleet]\nPartitionPolicy=stop\n"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[SimCluster]:
    async with three_machines(FakeKV(), tmp_path) as sim:
        yield sim


async def start(sim: SimCluster, name: str, text: str) -> None:
    await sim.client.create_unit(name, parse_unit(text), TargetState.LAUNCHED)


@contextlib.asynccontextmanager
async def sampling(sim: SimCluster, names: list[str]) -> AsyncIterator[dict[str, list[int]]]:
    """Active copies of each unit, sampled every 10 ms while the body runs."""
    samples: dict[str, list[int]] = {n: [] for n in names}
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            for name in names:
                samples[name].append(len(running_on(sim, name)))
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(sample())
    try:
        yield samples
    finally:
        done.set()
        await task


async def test_a_drain_moves_units_make_before_break(cluster: SimCluster) -> None:
    # Both units on one machine (the others cordoned while they start), so its drain moves both.
    home, *others = cluster.machines
    for machine in cluster.machines.values():
        machine.manager.stop_latency = 0.3  # a copy still runs 0.3 s after it is asked to stop
    for other in others:
        await cluster.client.cordon(Cordon(other))
    await start(cluster, "single.service", HELLO)
    await start(cluster, "fenced.service", STOP)
    await wait_for(lambda: len(running_on(cluster, "single.service")) == 1, what="single runs")
    await wait_for(lambda: len(running_on(cluster, "fenced.service")) == 1, what="fenced runs")
    for other in others:
        assert await cluster.client.uncordon(other)
    assert running_on(cluster, "single.service")[0].id == home
    assert running_on(cluster, "fenced.service")[0].id == home
    client = RegistryClient(cluster.client)
    async with sampling(cluster, ["single.service", "fenced.service"]) as samples:
        await cluster.client.cordon(Cordon(home, drain=True))
        shown: list[str] = []
        status = await wait_for_drain(client, home, time.monotonic() + 10, shown.append, 0.05)
        assert status.done, status.left
    assert samples["single.service"]
    assert min(samples["single.service"]) >= 1  # never down
    assert max(samples["fenced.service"]) == 1  # never two copies
    assert running_on(cluster, "single.service")[0].id != home
    assert running_on(cluster, "fenced.service")[0].id != home
    assert any("moved single.service" in line for line in shown)
    # Uncordoned, it takes new units again.
    assert await cluster.client.uncordon(home)
    machines = {m.id: m for m in await client.machines()}
    assert machines[home].schedulable


async def test_a_unit_that_cannot_leave_is_named(cluster: SimCluster) -> None:
    home = next(iter(cluster.machines))
    await start(cluster, "pinned.service", HELLO + f"\n[X-Fleet]\nMachineID={home}\n")
    await wait_for(lambda: len(running_on(cluster, "pinned.service")) == 1, what="pinned runs")
    await cluster.client.cordon(Cordon(home, drain=True))
    client = RegistryClient(cluster.client)
    status = await wait_for_drain(client, home, time.monotonic() + 1.5, lambda _: None, 0.05)
    assert not status.done
    assert "MachineID" in status.left["pinned.service"]
    assert running_on(cluster, "pinned.service")[0].id == home  # left running


async def test_a_drain_survives_an_engine_failover(cluster: SimCluster) -> None:
    for i in range(4):
        await start(cluster, f"u{i}.service", HELLO)
    await wait_for(
        lambda: all(len(running_on(cluster, f"u{i}.service")) == 1 for i in range(4)),
        what="units running",
    )
    leader = cluster.leader()
    assert leader is not None
    # Drain a machine that is not the leader, and stop the leader as the drain begins.
    target = next(m for m in cluster.machines.values() if m is not leader and m.agent.scheduled)
    await cluster.client.cordon(Cordon(target.id, drain=True))
    await cluster.crash(leader)
    client = RegistryClient(cluster.client)
    status = await wait_for_drain(client, target.id, time.monotonic() + 15, lambda _: None, 0.05)
    assert status.done, status.left
    for i in range(4):
        assert target not in running_on(cluster, f"u{i}.service")


async def test_include_global_stops_the_global_units_there_only(cluster: SimCluster) -> None:
    await start(cluster, "everywhere.service", HELLO + "\n[X-Fleet]\nGlobal=true\n")
    await wait_for(
        lambda: len(running_on(cluster, "everywhere.service")) == 3, what="global unit on 3"
    )
    home = next(iter(cluster.machines))
    client = RegistryClient(cluster.client)
    await cluster.client.cordon(Cordon(home, drain=True))
    status = await wait_for_drain(client, home, time.monotonic() + 5, lambda _: None, 0.05)
    assert status.done  # without the flag the global unit is not waited for ...
    assert cluster.machines[home] in running_on(cluster, "everywhere.service")  # ... and stays
    await cluster.client.cordon(Cordon(home, drain=True, include_global=True))
    status = await wait_for_drain(
        client, home, time.monotonic() + 10, lambda _: None, 0.05, include_global=True
    )
    assert status.done, status.left
    running = running_on(cluster, "everywhere.service")
    assert len(running) == 2
    assert cluster.machines[home] not in running
    assert await cluster.client.uncordon(home)
    await wait_for(
        lambda: len(running_on(cluster, "everywhere.service")) == 3, what="back on 3 machines"
    )
