"""The unit-state publisher: what systemd says of this agent's units, on the machine's lease.

It follows systemd's state of the units on record (a watch that starts with a snapshot) and
publishes `states/<unit>/<machine>` on the machine's lease, so the states vanish with the
machine. A unit whose state may have changed is marked dirty (by the watch, the task executor
and the fence); the publish loop writes the dirty ones in a batch, only those that changed
since last published, and retries what etcd refused. A new lease republishes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

import structlog

from fleetd.agent.lease import MachineLease
from fleetd.agent.record import AgentRecord
from fleetd.agent.tasks import TaskFailures
from fleetd.errors import FleetError, RegistryUnavailable
from fleetd.model import TargetState, UnitState
from fleetd.registry.registry import Registry
from fleetd.systemd.manager import SystemdState, UnitManager
from fleetd.watching import sleep_or_stop

log = structlog.get_logger("fleetd.agent")  # one logger name for all of the agent's events

# How long the agent gathers what changed before it acts: the watch loop its events
# (fleetd.agent.agent), the publisher its dirty states.
BATCH_WINDOW = 0.005


class StatePublisher:
    """Publishes the states of `record`'s units (and of `failures`' units) on `lease`."""

    def __init__(
        self,
        registry: Registry,
        manager: UnitManager,
        machine_id: str,
        lease: MachineLease,
        record: AgentRecord,
        failures: TaskFailures,
    ) -> None:
        self.registry = registry
        self.manager = manager
        self.machine_id = machine_id
        self._lease = lease
        self.record = record
        self.failures = failures
        self.published: dict[str, UnitState] = {}  # what we last put in etcd, by unit
        self._observed: dict[str, SystemdState] = {}
        self._dirty_states: set[str] = set()
        self._states_changed = asyncio.Event()

    def mark_dirty(self, name: str) -> None:
        """`name`'s state may have changed: publish it at the next batch."""
        self._dirty_states.add(name)
        self._states_changed.set()

    def republish_all(self) -> None:
        """After a new lease (the old one expired with our states on it), publish everything."""
        self.published.clear()
        for name in [*self.record.units, *self.failures.by_unit]:
            if name:
                self.mark_dirty(name)

    async def observe_loop(self, stop: asyncio.Event) -> None:
        """Follow systemd's state of the units we manage (the watch starts with a snapshot)."""
        while not stop.is_set():
            try:
                async for name, state in self.manager.watch():
                    self._observed[name] = state
                    if name in self.record.units:
                        self.mark_dirty(name)
            except FleetError as e:
                # The bus connection broke; the next watch reconnects.
                log.warning("systemd_watch_broken", error=str(e))
            await sleep_or_stop(stop, 1.0)

    async def publish_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._states_changed.wait()
            self._states_changed.clear()
            await asyncio.sleep(BATCH_WINDOW)
            dirty, self._dirty_states = self._dirty_states, set()
            try:
                await self._publish(dirty)
            except FleetError as e:
                # Unreachable etcd, or our lease just expired (a new one brings a republish).
                log.warning("state_publish_failed", error=str(e))
                self._dirty_states |= dirty
                await sleep_or_stop(stop, 1.0)
                self._states_changed.set()

    async def withdraw(self) -> None:
        """Remove every state we published (a graceful stop; etcd errors are let go)."""
        with contextlib.suppress(FleetError):
            for name in list(self.published):
                await self.registry.remove_state(name, self.machine_id)
        self.published.clear()

    async def _publish(self, names: Iterable[str]) -> None:
        lease = self._lease.lease
        if not lease:
            raise RegistryUnavailable("not registered yet")
        missing = [n for n in names if n in self.record.units and n not in self._observed]
        if missing:
            self._observed.update(await self.manager.states(missing))
        puts: list[UnitState] = []
        removals: list[str] = []
        for name in sorted(names):
            state = self._state_of(name)
            if state is None:
                # Unloaded: its state goes (a delete of a missing key is harmless).
                self.published.pop(name, None)
                removals.append(name)
                continue
            if self.published.get(name) != state:
                puts.append(state)
        if puts:
            await self.registry.publish_states(puts, lease)
            for s in puts:
                self.published[s.name] = s
        for name in removals:
            await self.registry.remove_state(name, self.machine_id)
            self._observed.pop(name, None)

    def _state_of(self, name: str) -> UnitState | None:
        """The state to publish for `name`; None if it has none (not loaded, nothing failed).

        A unit whose load failed has nothing loaded: it is published as `inactive` with empty
        systemd fields and the hash it tried to load, so the error is seen where its state
        would be. A unit that is loaded shows its own failure, else the daemon-reload's when
        its start waits for that.
        """
        current = self.record.units.get(name)
        if current is None:
            failure = self.failures.by_unit.get(name)
            if failure is None or not name:
                return None
            return UnitState(
                name=name,
                machine_id=self.machine_id,
                load_state="",
                active_state="",
                sub_state="",
                hash=failure.wanted.hash if failure.wanted else "",
                agent_state=TargetState.INACTIVE,
                failed_task=failure.task_name,
                error=failure.error,
            )
        failure = self.failures.shown(name)
        sd = self._observed.get(name)
        return UnitState(
            name=name,
            machine_id=self.machine_id,
            load_state=sd.load_state if sd else "",
            active_state=sd.active_state if sd else "",
            sub_state=sd.sub_state if sd else "",
            hash=current.hash,
            agent_state=current.state,
            failed_task=failure.task_name if failure else "",
            error=failure.error if failure else "",
        )
