"""One machine's fleetd components, built and wired together: presence, agent, engine.

The one composition root of a node. fleetd (server.py) and the simulator (sim.py) both build
their machines here, so the simulator runs exactly what fleetd runs: the same objects, on the
same lease, with the same grace, by construction. What differs between them is only what
they hand in: the registry, the systemd (UnitManager), the machine, and NodeSettings.

The wiring: the agent and the engine live on presence's lease. The agent reads it as its
MachineLease (publishes states on it, fences PartitionPolicy=stop units when it goes
unrenewed, follows the schedule once registered, republishes on a new lease); the engine
campaigns on it once registered and holds absent machines' units for one agent_ttl after
etcd settles again, as presence sees etcd. All three keep one clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from fleetd.agent.agent import Agent
from fleetd.config import Config
from fleetd.engine.engine import Engine
from fleetd.model import Machine
from fleetd.presence import Presence
from fleetd.registry.registry import Registry
from fleetd.systemd.manager import UnitManager

log = structlog.get_logger("fleetd.node")


@dataclass(frozen=True)
class NodeSettings:
    """What a node is built with besides its registry, systemd and machine."""

    agent_ttl: float
    # Where the lease file and the agent record live (fleetd: under /run, so that a restarted
    # fleetd adopts both); None keeps them in memory only.
    state_dir: Path | None = None
    disable_engine: bool = False
    # The idle passes: how often the agent and the engine look again with nothing changed.
    agent_safety_interval: float = 30.0
    engine_safety_interval: float = 30.0

    @classmethod
    def from_config(cls, config: Config) -> NodeSettings:
        """fleetd's: the agent's idle pass at 30 s, the engine's at five reconcile intervals
        (at least 10 s)."""
        return cls(
            agent_ttl=config.agent_ttl,
            state_dir=Path(config.state_dir),
            disable_engine=config.disable_engine,
            engine_safety_interval=max(config.engine_reconcile_interval * 5, 10.0),
        )


@dataclass
class Node:
    """A machine's components (engine None with disable_engine)."""

    presence: Presence
    agent: Agent
    engine: Engine | None

    def components(self) -> list[tuple[str, Callable[[asyncio.Event], Awaitable[None]]]]:
        """What runs until stop, by name, in start order."""
        runs: list[tuple[str, Callable[[asyncio.Event], Awaitable[None]]]] = [
            ("presence", self.presence.run),
            ("agent", self.agent.run),
        ]
        if self.engine is not None:
            runs.append(("engine", self.engine.run))
        return runs


def build_node(
    registry: Registry,
    manager: UnitManager,
    machine: Callable[[], Machine],
    settings: NodeSettings,
    clock: Callable[[], float] = time.monotonic,
) -> Node:
    """Presence, agent and (unless disabled) engine for `machine`, wired to one another.

    `machine` is called again at every renewal (fleetd's rebuilds it from the config that
    SIGHUP reloads); its id must not change.
    """
    state_dir = settings.state_dir
    presence = Presence(
        registry,
        machine,
        settings.agent_ttl,
        lease_file=state_dir / "lease" if state_dir is not None else None,
        clock=clock,
    )
    agent = Agent(
        registry,
        manager,
        machine,
        presence,
        record_path=state_dir / "agent.json" if state_dir is not None else None,
        safety_interval=settings.agent_safety_interval,
        clock=presence.clock,
    )
    engine = None
    if settings.disable_engine:
        log.info("engine_disabled", reason="disable_engine is set")
    else:
        engine = Engine(
            registry,
            agent.machine_id,
            presence.current_lease,
            safety_interval=settings.engine_safety_interval,
            grace=presence.agent_ttl,
            settled_since=presence.settled_since,
            clock=presence.clock,
        )
    return Node(presence, agent, engine)
