"""Shared harness of the fleetctl tests: a cluster in memory and a CliRunner wired to it.

There is no engine or agent here. `Cluster` writes what they would write (placements, states)
through the registry, either directly (`place`, `publish`) or, with `auto` on, in reaction to
the desired states fleetctl sets, a few milliseconds later inside fleetctl's own event loop,
so blocking commands really poll until the "agent" reports.

Imported by the other test_fleetctl_* modules; it holds no tests of its own except a check
that the harness itself reacts as the engine and agent would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner, Result

from fleetctl import client as client_module
from fleetctl import waiting
from fleetctl.cli import cli
from fleetctl.client import RegistryClient
from fleetctl.settings import Settings
from fleetd.model import Machine, TargetState, UnitState
from fleetd.registry import codec
from fleetd.registry.fake import FakeKV
from fleetd.registry.kv import Delete, Put
from fleetd.registry.registry import Registry
from fleetd.unit.file import UnitFile, parse_unit

T = TypeVar("T")

HELLO = """[Unit]
Description=Hello World

[Service]
ExecStart=/bin/bash -c "while true; do echo \\"Hello, world\\"; sleep 1; done"
"""
HELLO_TEMPLATE = """[Unit]
Description=Hello %i

[Service]
ExecStart=/bin/echo %i
"""
GLOBAL = """[Unit]
Description=Everywhere

[Service]
ExecStart=/bin/true

[X-Fleet]
Global=true
"""
M1 = "113f16a7f2c54d35b3cde2e2ad5c2f10"
M2 = "e793afb9e0ee4a2a9d6b8c3e5f6a7b8c"
GOLDEN = Path(__file__).parent / "golden"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@dataclass
class Reaction:
    """What the simulated engine + agent do when a unit's desired state changes."""

    machine: str = M1
    reason: str = ""  # non-empty: the engine cannot place the unit, for this reason
    placed_after: float | None = None  # with a reason: a machine frees up after this long
    active: str = "active"  # systemd ActiveState once launched
    delay: float = 0.01


class Cluster:
    def __init__(self) -> None:
        self.kv = FakeKV()
        self.registry = Registry(self.kv)
        self.runner = CliRunner()
        self.auto = False  # react to desired states like an engine and agent would
        self.reactions: dict[str, Reaction] = {}
        self.settings: list[Settings] = []  # what make_client was called with

    # ---- wiring ----------------------------------------------------------------------------

    def install(self, monkeypatch: pytest.MonkeyPatch) -> Cluster:
        monkeypatch.setattr(client_module, "make_client", self.make_client)
        # Blocking commands poll on fleet's cadence; tests run it 100x faster.
        monkeypatch.setattr(waiting, "POLL_INTERVAL", 0.0025)
        monkeypatch.setattr(waiting, "ATTEMPT_SECONDS", 0.02)
        return self

    @asynccontextmanager
    async def make_client(
        self, settings: Settings, *, warn: Callable[[str], None] | None = None
    ) -> AsyncIterator[RegistryClient]:
        # `warn` as the real factory takes it; this one has nothing to warn about.
        self.settings.append(settings)
        yield ReactingClient(Registry(self.kv), self)

    def invoke(self, *args: str, env: Mapping[str, str] | None = None, **kw: Any) -> Result:
        return self.runner.invoke(cli, list(args), env=dict(env or {}), **kw)

    # ---- what the engine and agents would write --------------------------------------------

    def add_machine(self, machine_id: str, ip: str = "", **metadata: str) -> None:
        async def go() -> None:
            lease = await self.kv.grant(3600)
            machine = Machine.make(machine_id, ip, metadata, version="0.1.0")
            assert await self.registry.register_machine(machine, lease)

        run(go())

    def add_unit(
        self, name: str, text: str = HELLO, state: TargetState = TargetState.INACTIVE
    ) -> UnitFile:
        body = parse_unit(text)
        run(self.registry.create_unit(name, body, state, replace=True))
        return body

    def place(self, name: str, machine: str | None, reason: str = "") -> None:
        run(self._place(name, machine, reason))

    async def _place(self, name: str, machine: str | None, reason: str = "") -> None:
        key = self.registry.keys.placement(name)
        await self.kv.txn([], [Put(key, codec.encode_placement(machine, reason))])

    def publish(
        self,
        name: str,
        machine: str,
        agent_state: TargetState = TargetState.LAUNCHED,
        active: str = "active",
        sub: str = "running",
        load: str = "loaded",
        hash_: str | None = None,
        failed_task: str = "",
        error: str = "",
    ) -> None:
        run(self._publish(name, machine, agent_state, active, sub, load, hash_, failed_task, error))

    async def _publish(
        self,
        name: str,
        machine: str,
        agent_state: TargetState,
        active: str,
        sub: str,
        load: str = "loaded",
        hash_: str | None = None,
        failed_task: str = "",
        error: str = "",
    ) -> None:
        if hash_ is None:
            unit = await self.registry.get_unit(name)
            hash_ = unit.hash if unit else ""
        state = UnitState(name, machine, load, active, sub, hash_, agent_state, failed_task, error)
        key = self.registry.keys.state(name, machine)
        await self.kv.txn([], [Put(key, codec.encode_state(state))])

    def run_unit(self, name: str, machine: str = M1, text: str = HELLO) -> None:
        """A launched unit, placed and running, as after a successful start."""
        self.add_unit(name, text, TargetState.LAUNCHED)
        self.place(name, machine)
        self.publish(name, machine)

    def dump(self, what: str) -> dict[str, str]:
        return self.kv.dump(self.registry.keys.prefix + what)

    def unit(self, name: str) -> Any:
        return run(self.registry.get_unit(name))

    # ---- the simulated engine + agent -------------------------------------------------------

    async def react(self, name: str, state: TargetState) -> None:
        reaction = self.reactions.get(name, Reaction())
        await asyncio.sleep(reaction.delay)
        keys = self.registry.keys
        if state is TargetState.INACTIVE:
            await self.kv.txn(
                [], [Delete(keys.placement(name)), Delete(keys.state(name, reaction.machine))]
            )
            return
        if reaction.reason:
            await self._place(name, None, reaction.reason)
            if reaction.placed_after is None:
                return
            await asyncio.sleep(reaction.placed_after)
        await self._place(name, reaction.machine)
        if state is TargetState.LAUNCHED:
            sub = "running" if reaction.active == "active" else reaction.active
            await self._publish(name, reaction.machine, state, reaction.active, sub)
        else:
            await self._publish(name, reaction.machine, state, "inactive", "dead")


class ReactingClient(RegistryClient):
    """The etcd driver, plus the simulated engine/agent reaction to each desired state."""

    def __init__(self, registry: Registry, cluster: Cluster) -> None:
        super().__init__(registry)
        self._cluster = cluster
        self._tasks: set[asyncio.Task[None]] = set()

    def _react(self, name: str, state: TargetState) -> None:
        if self._cluster.auto:
            task = asyncio.get_running_loop().create_task(self._cluster.react(name, state))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def set_target_state(self, name: str, state: TargetState) -> None:
        await super().set_target_state(name, state)
        self._react(name, state)

    async def create_unit(
        self, name: str, unit_file: UnitFile, desired_state: TargetState | None = None
    ) -> None:
        await super().create_unit(name, unit_file, desired_state)
        if desired_state not in (None, TargetState.INACTIVE):
            self._react(name, desired_state)

    async def create_units(self, units: Sequence[tuple[str, UnitFile, TargetState | None]]) -> None:
        await super().create_units(units)
        for name, _, desired_state in units:
            if desired_state not in (None, TargetState.INACTIVE):
                self._react(name, desired_state)


def golden(name: str) -> str:
    return (GOLDEN / name).read_text()


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Cluster:
    return Cluster().install(monkeypatch)


def test_harness_reacts_like_engine_and_agent(cluster: Cluster) -> None:
    cluster.auto = True
    cluster.add_unit("hello.service")

    async def go() -> tuple[Any, Any]:
        async with cluster.make_client(Settings()) as client:
            await client.set_target_state("hello.service", TargetState.LAUNCHED)
            await asyncio.sleep(0.05)
            return await client.unit("hello.service"), await client.unit_states()

    view, states = run(go())
    assert (view.current_state, view.machine_id) == ("launched", M1)
    assert [(s.machine_id, s.active, s.hash) for s in states] == [(M1, "active", view.hash)]
