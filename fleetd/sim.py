"""Many simulated machines in one process: the real presence, agent and engine code, each
machine with an in-memory systemd (FakeUnitManager), all on one KV (FakeKV or real etcd).

Used by the end-to-end unit tests (fast, deterministic) and by the scale benchmarks, where the
agents and engines are exactly the production code and only systemd is simulated.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fleetd import __version__
from fleetd.agent.agent import Agent
from fleetd.engine.engine import Engine
from fleetd.model import Machine
from fleetd.presence import Presence
from fleetd.registry.kv import KV
from fleetd.registry.registry import Registry
from fleetd.systemd.fake import FakeUnitManager


@dataclass
class SimMachine:
    machine: Machine
    registry: Registry
    manager: FakeUnitManager
    presence: Presence
    agent: Agent
    engine: Engine | None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.machine.id

    @property
    def running(self) -> bool:
        return bool(self.tasks) and not self.stop.is_set()


class SimCluster:
    def __init__(
        self,
        kv: KV,
        *,
        prefix: str = "/fleet/",
        agent_ttl: float = 3.0,
        engines: int | None = None,
        safety_interval: float = 30.0,
        state_dir: Path | None = None,
        machine_kv: Callable[[str], KV] | None = None,
    ) -> None:
        self.kv = kv
        # The KV each machine talks through (by machine id); default: all share `kv`, as one
        # etcd connection. The benchmarks compare that with a connection per machine.
        self.machine_kv = machine_kv or (lambda _machine_id: kv)
        self.state_dir = state_dir  # where each machine keeps its lease and agent record
        self.prefix = prefix
        self.agent_ttl = agent_ttl
        self.engines = engines  # how many machines run an engine (None: all)
        self.safety_interval = safety_interval
        self.machines: dict[str, SimMachine] = {}
        self.client = Registry(kv, prefix)

    def add(
        self, machine_id: str, metadata: Mapping[str, str] | None = None, public_ip: str = ""
    ) -> SimMachine:
        # The simulated machines run this very code, so they announce its version.
        machine = Machine.make(machine_id, public_ip, metadata or {}, version=__version__)
        with_engine = self.engines is None or len(self.machines) < self.engines
        sim = self._build(machine, FakeUnitManager(), with_engine)
        self.machines[machine_id] = sim
        return sim

    def _build(self, machine: Machine, manager: FakeUnitManager, with_engine: bool) -> SimMachine:
        registry = Registry(self.machine_kv(machine.id), self.prefix)
        own_dir = self.state_dir / machine.id if self.state_dir else None
        presence = Presence(
            registry,
            lambda: machine,
            self.agent_ttl,
            lease_file=own_dir / "lease" if own_dir else None,
        )
        agent = Agent(
            registry,
            manager,
            lambda: machine,
            presence,
            record_path=own_dir / "agent.json" if own_dir else None,
            safety_interval=self.safety_interval,
            clock=presence.clock,
        )
        engine = (
            Engine(
                registry,
                machine.id,
                presence.current_lease,
                safety_interval=self.safety_interval,
                grace=presence.agent_ttl,
                settled_since=presence.settled_since,
                clock=presence.clock,
            )
            if with_engine
            else None
        )
        return SimMachine(machine, registry, manager, presence, agent, engine)

    def restart(self, sim: SimMachine) -> None:
        """A new fleetd process on the same machine: fresh objects, same systemd and /run."""
        fresh = self._build(sim.machine, sim.manager, sim.engine is not None)
        sim.registry, sim.presence, sim.agent, sim.engine = (
            fresh.registry,
            fresh.presence,
            fresh.agent,
            fresh.engine,
        )
        self.start(sim)

    def start(self, sim: SimMachine) -> None:
        sim.stop = asyncio.Event()
        sim.tasks = [
            asyncio.ensure_future(sim.presence.run(sim.stop)),
            asyncio.ensure_future(sim.agent.run(sim.stop)),
        ]
        if sim.engine is not None:
            sim.tasks.append(asyncio.ensure_future(sim.engine.run(sim.stop)))

    async def start_all(self) -> None:
        await self.client.ensure_schema()
        for sim in self.machines.values():
            self.start(sim)

    async def crash(self, sim: SimMachine) -> None:
        """Like SIGKILL: tasks vanish, nothing is cleaned up; the lease expires on its own."""
        for t in sim.tasks:
            t.cancel()
        await asyncio.gather(*sim.tasks, return_exceptions=True)
        sim.tasks = []

    async def graceful_stop(self, sim: SimMachine) -> None:
        sim.stop.set()
        await asyncio.gather(*sim.tasks, return_exceptions=True)
        sim.tasks = []
        await sim.agent.purge()
        if sim.engine is not None and sim.engine.token is not None:
            with contextlib.suppress(Exception):
                await sim.registry.resign(sim.engine.token)
        await sim.presence.release()

    async def close(self) -> None:
        for sim in self.machines.values():
            sim.stop.set()
        for sim in self.machines.values():
            await asyncio.gather(*sim.tasks, return_exceptions=True)
            sim.tasks = []

    def leader(self) -> SimMachine | None:
        for sim in self.machines.values():
            if sim.engine is not None and sim.engine.is_leader and sim.running:
                return sim
        return None
