"""`python -m benchmarks drain`: drain a machine running 100 units (issue 18's figure).

Four simulated machines (the real presence, engine and agent code, fake systemd) on the
benchmark's real etcd; `--drain-units` units are started on one machine (the others cordoned
meanwhile), then that machine is drained and fleetctl's own wait (fleetctl/maintenance.py)
times it until the machine is empty. Every 10 ms each unit's active copies are counted, so the
figures also say whether any unit was ever down (make-before-break) during the drain.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from benchmarks.etcd import BenchEtcd
from benchmarks.report import ScenarioResult, say
from benchmarks.sim import quiet_logging, wait
from fleetctl.client import RegistryClient
from fleetctl.maintenance import wait_for_drain
from fleetd.etcd.client import EtcdConfig, EtcdKV
from fleetd.model import Cordon, TargetState
from fleetd.sim import SimCluster
from fleetd.unit.file import parse_unit

MACHINES = 4
UNIT = "[Unit]\nDescription=drain bench {i}\n\n[Service]\nExecStart=/bin/sleep infinity\n"


def _active_copies(sim: SimCluster, names: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(names, 0)
    for m in sim.machines.values():
        if not m.running:
            continue
        for name, state in m.manager._states.items():
            if name in counts and state.active_state == "active":
                counts[name] += 1
    return counts


async def drain_scenario(etcd: BenchEtcd, units: int) -> ScenarioResult:
    quiet_logging()
    result = ScenarioResult("drain")
    kv = EtcdKV(EtcdConfig(endpoints=[etcd.endpoint], request_timeout=30.0))
    sim = SimCluster(kv, agent_ttl=10.0, safety_interval=30.0)
    ids = [f"{i + 1:032x}" for i in range(MACHINES)]
    for machine_id in ids:
        sim.add(machine_id)
    try:
        await sim.start_all()
        await wait(lambda: sim.leader() is not None, 60, "an engine leader")
        home, others = ids[0], ids[1:]
        registry = sim.client
        for other in others:
            await registry.cordon(Cordon(other))
        names = [f"drain-{i:03d}.service" for i in range(units)]
        await registry.create_units(
            [(n, parse_unit(UNIT.format(i=i)), TargetState.LAUNCHED) for i, n in enumerate(names)]
        )
        await wait(
            lambda: all(c == 1 for c in _active_copies(sim, names).values()),
            120,
            f"{units} units running",
        )
        for other in others:
            await registry.uncordon(other)
        say(f"drain: {units} units run on {home[:8]}; draining it")
        lowest = dict.fromkeys(names, 1)
        sampling = True

        async def sample() -> None:
            while sampling:
                for name, count in _active_copies(sim, names).items():
                    lowest[name] = min(lowest[name], count)
                await asyncio.sleep(0.01)

        sampler = asyncio.ensure_future(sample())
        started = time.monotonic()
        await registry.cordon(Cordon(home, drain=True, since=time.time()))
        status = await wait_for_drain(
            RegistryClient(registry), home, started + 120, lambda _: None, poll=0.05
        )
        elapsed = time.monotonic() - started
        sampling = False
        await sampler
        down = sorted(n for n, low in lowest.items() if low < 1)
        result.add("units drained", units - len(status.left))
        result.add("drain to machine empty", round(elapsed, 2), "s")
        result.add("units moved per second", round(units / elapsed, 1), "units/s")
        result.add("units ever without an active copy", len(down), target="0", met=not down)
        details: dict[str, Any] = {"left": status.left, "down": down}
        result.details.update(details)
    finally:
        await sim.close()
        await kv.close()
    return result
