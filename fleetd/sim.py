"""Many simulated machines in one process: the real presence, agent and engine code, each
machine with an in-memory systemd (FakeUnitManager), all on one KV (FakeKV or real etcd).

Used by the end-to-end unit tests (fast, deterministic) and by the scale benchmarks, where the
agents and engines are exactly the production code and only systemd is simulated. Each
machine is built by fleetd's own composition root (fleetd.node), so it is wired as fleetd
wires itself; what the simulator chooses is only the settings (TTL, idle passes, which
machines run an engine, where state files go) and the KV each machine talks through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fleetd import __version__
from fleetd.model import Machine
from fleetd.node import Node, NodeSettings, build_node
from fleetd.registry.kv import KV
from fleetd.registry.registry import Registry
from fleetd.systemd.fake import FakeUnitManager


@dataclass
class SimMachine(Node):
    """A node (its presence, agent and engine), the simulated systemd under it, and its run."""

    machine: Machine
    registry: Registry
    manager: FakeUnitManager
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
        # Both idle passes, the agent's and the engine's (fleetd's: 30 s and five
        # engine_reconcile_intervals, NodeSettings.from_config): the tests shorten them.
        self.safety_interval = safety_interval
        self.machines: dict[str, SimMachine] = {}
        self.client = Registry(kv, prefix)

    def add(
        self, machine_id: str, metadata: Mapping[str, str] | None = None, public_ip: str = ""
    ) -> SimMachine:
        with_engine = self.engines is None or len(self.machines) < self.engines
        # The simulated machines run this very code, so they announce its version, and, as
        # fleetd does, whether they run an engine.
        machine = Machine.make(
            machine_id,
            public_ip,
            metadata or {},
            version=__version__,
            disable_engine=not with_engine,
        )
        sim = self._build(machine, FakeUnitManager())
        self.machines[machine_id] = sim
        return sim

    def _build(self, machine: Machine, manager: FakeUnitManager) -> SimMachine:
        registry = Registry(self.machine_kv(machine.id), self.prefix)
        settings = NodeSettings(
            agent_ttl=self.agent_ttl,
            state_dir=self.state_dir / machine.id if self.state_dir else None,
            disable_engine=machine.disable_engine,
            agent_safety_interval=self.safety_interval,
            engine_safety_interval=self.safety_interval,
        )
        node = build_node(registry, manager, lambda: machine, settings)
        return SimMachine(
            presence=node.presence,
            agent=node.agent,
            engine=node.engine,
            machine=machine,
            registry=registry,
            manager=manager,
        )

    def restart(self, sim: SimMachine) -> None:
        """A new fleetd process on the same machine: fresh objects, same systemd and /run."""
        fresh = self._build(sim.machine, sim.manager)
        sim.registry, sim.presence, sim.agent, sim.engine = (
            fresh.registry,
            fresh.presence,
            fresh.agent,
            fresh.engine,
        )
        self.start(sim)

    def start(self, sim: SimMachine) -> None:
        sim.stop = asyncio.Event()
        sim.tasks = [asyncio.ensure_future(run(sim.stop)) for _name, run in sim.components()]

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
