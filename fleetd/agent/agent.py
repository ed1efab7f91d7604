"""The agent's loop: runs what the engine scheduled to this machine, through systemd.

It watches only `schedule/<this machine>/`, `global/`, its own dynamic metadata and its own
cordon (a drain with --include-global stops its global units), so a
placement elsewhere costs it nothing. Each change: reconcile, i.e. compute what this machine
should run and have the task executor (fleetd.agent.tasks) plan and run the tasks against
what the agent did so far. The agent composes its parts on one record
(fleetd.agent.record): the executor, the state publisher (fleetd.agent.publisher) and the
partition fence (fleetd.agent.fence); it also reconciles when a failed task's retry time comes.

Never does it stop a unit with the default PartitionPolicy=keep because etcd is slow or
unreachable: registry errors only delay reconciliation, and such units stop only when the
schedule, read from etcd, says so. The one exception, PartitionPolicy=stop, is the fence's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from fleetd.agent.fence import PartitionFence
from fleetd.agent.lease import MachineLease
from fleetd.agent.plan import DesiredUnit, desired_for_machine
from fleetd.agent.publisher import BATCH_WINDOW, StatePublisher
from fleetd.agent.record import AgentRecord
from fleetd.agent.tasks import TaskExecutor, TaskFailures
from fleetd.errors import Compacted, FleetError, RegistryUnavailable
from fleetd.model import Machine, Requirements, ScheduledUnit, Unit
from fleetd.registry.mirror import Change, Topic
from fleetd.registry.registry import Registry
from fleetd.systemd.manager import UnitManager
from fleetd.watching import Backoff, sleep_or_stop

log = structlog.get_logger("fleetd.agent")


class Agent:
    def __init__(
        self,
        registry: Registry,
        manager: UnitManager,
        machine: Callable[[], Machine],
        lease: MachineLease,
        *,
        record_path: Path | None = None,
        safety_interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`lease` is the machine's (its presence). A TTL above 0 enables PartitionPolicy=stop
        fencing against its last renewal, read on `clock` (presence's); with 0 no unit is
        ever fenced.

        The agent follows the schedule only once `lease.registered` is set. A clone claiming
        a machine id that a live fleetd holds is refused registration, and so never runs
        that machine's units. A new lease (the old one expired with our unit states on it)
        republishes every state.
        """
        self.registry = registry
        self.manager = manager
        self._machine = machine
        self._lease = lease
        self.machine_id = machine().id
        # This machine's schedule, the global units and this machine's dynamic metadata: a
        # placement elsewhere costs this agent nothing.
        self.mirror = registry.mirror(
            [Topic.SCHEDULE, Topic.GLOBALS, Topic.META, Topic.CORDONS],
            machine_id=self.machine_id,
            check_names=True,
        )
        self.record = AgentRecord.load(record_path)
        self.safety_interval = safety_interval
        # The mirror's, after each load (which the mirror's watch then keeps current).
        self.scheduled: dict[str, ScheduledUnit] = {}
        self.globals: dict[str, ScheduledUnit] = {}
        self._wake = asyncio.Event()
        self._reconcile_lock = asyncio.Lock()
        self.tasks_run = 0
        self.synced = False  # True once the first reconcile against etcd has run
        self.clock = clock
        self._resync = asyncio.Event()
        self._backoff = Backoff()
        # The parts, on the one record; the executor's failures show in the published states.
        failures = TaskFailures()
        self.publisher = StatePublisher(
            registry, manager, self.machine_id, lease, self.record, failures
        )
        lease.on_lease_changed(lambda _lease: self.publisher.republish_all())
        mark_dirty = self.publisher.mark_dirty
        self.fence = PartitionFence(
            manager, lease, self.record, clock, mark_dirty=mark_dirty, resync=self._resync
        )
        self.executor = TaskExecutor(
            registry, manager, self.record, failures, self.fence, clock, mark_dirty=mark_dirty
        )

    @property
    def fenced(self) -> set[str]:
        """The units the fence holds: stopped by it, not restarted yet."""
        return self.fence.held

    def lease_at_risk(self) -> bool:
        """Whether the lease has gone unrenewed long enough for the fence to act."""
        return self.fence.lease_at_risk()

    # ---- main loop ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        publisher = asyncio.ensure_future(self.publisher.publish_loop(stop))
        observer = asyncio.ensure_future(self.publisher.observe_loop(stop))
        fencer = asyncio.ensure_future(self.fence.run(stop))
        retrier = asyncio.ensure_future(self._retry_loop(stop))
        try:
            # The fence loop runs from the start (a fleetd restarted in an outage still
            # fences what it inherited); following the schedule waits for registration.
            registered = self._lease.registered
            if not registered.is_set():
                log.info("agent_waiting_for_registration", machine=self.machine_id)
                while not (stop.is_set() or registered.is_set()):
                    await sleep_or_stop(stop, 3600.0, wake=registered)
            while not stop.is_set():
                try:
                    await self._sync(stop)
                except Compacted as e:
                    log.info("agent_resync_after_compaction", error=str(e))
                except RegistryUnavailable as e:
                    wait = self._backoff.next()
                    log.warning("agent_registry_unavailable", error=str(e), retry_in=wait)
                    # A resync asked by the fence loop (renewals resumed) cuts the wait short.
                    await sleep_or_stop(stop, wait, wake=self._resync)
        finally:
            publisher.cancel()
            observer.cancel()
            fencer.cancel()
            retrier.cancel()
            await asyncio.gather(publisher, observer, fencer, retrier, return_exceptions=True)

    async def _sync(self, stop: asyncio.Event) -> None:
        """Load the schedule, reconcile, then follow watches until an error, stop or resync."""
        self._resync.clear()
        healthy = not self.lease_at_risk()
        revision = await self._load_desired()
        self._backoff.reset()  # etcd answered
        if healthy and self.fenced:
            # A schedule read begun with the lease renewed again: the plan from it is the truth.
            log.info("partition_fence_lifted", units=sorted(self.fenced))
            self.fenced.clear()
        await self.reconcile()
        self.synced = True

        async def reconcile() -> None:
            await self.reconcile()

        await self.mirror.follow(
            revision + 1,
            stop,
            on_change=_ignore,  # each pass plans from the whole mirrored schedule
            act=reconcile,
            idle_interval=self.safety_interval,
            batch_window=lambda: BATCH_WINDOW,
            interrupt=self._resync,
        )

    async def _load_desired(self) -> int:
        revision = await self.mirror.load()
        self.scheduled, self.globals = self.mirror.scheduled, self.mirror.globals
        return revision

    # ---- reconciliation --------------------------------------------------------------------

    def machine(self) -> Machine:
        return self._machine().with_dynamic_metadata(self.mirror.meta_of(self.machine_id))

    async def desired(self) -> dict[str, DesiredUnit]:
        requirements: dict[str, Requirements] = {}
        global_units: dict[str, tuple[Unit, Requirements]] = {}
        wanted = [*self.scheduled.values(), *self.globals.values()]
        # New units' bodies in one batched read rather than a round trip each.
        await self.registry.prefetch_bodies(
            s.hash for s in wanted if self.registry.cached_requirements(s.name, s.hash) is None
        )
        for s in wanted:
            reqs = await self.registry.requirements(s.name, s.hash)
            if reqs is None:
                continue
            requirements[s.name] = reqs
            if not s.machine_id:
                global_units[s.name] = (Unit(s.name, s.hash, s.target_state), reqs)
        scheduled = [s for s in self.scheduled.values() if s.name in requirements]
        cordon = self.mirror.cordons.get(self.machine_id)
        if cordon is not None and cordon.drain and cordon.include_global:
            global_units = {}  # `fleetctl drain --include-global`: its global units stop too
        return desired_for_machine(self.machine(), scheduled, global_units, requirements)

    async def reconcile(self) -> int:
        """Plan and run tasks until the machine matches its schedule; returns tasks run.

        How the tasks run, and what a failed one does, is the executor's
        (fleetd.agent.tasks.TaskExecutor.run); a failure wakes the retry loop.
        """
        async with self._reconcile_lock:
            ran, failed = await self.executor.run(await self.desired())
            self.tasks_run += ran
            if failed:
                self._wake.set()  # the retry loop: a new retry time to wait for
            return ran

    def next_retry(self, after: float | None = None) -> float | None:
        """The earliest retry time (agent clock) of a failed task, later than `after` if
        given; None if there is none."""
        return self.executor.failures.next_retry(after)

    async def _retry_loop(self, stop: asyncio.Event) -> None:
        """Reconcile when a failed task's retry time comes.

        Watch events and the idle safety pass reconcile too; this only makes sure a retry
        is not left for the safety pass (30 s) or the next event. `_wake` (set when a task
        fails) makes it look again at the earliest retry time. It fires once per retry time:
        a pass that could not retry (etcd unreachable, a start still fenced) leaves the unit
        to the next event or safety pass instead of spinning. The pass plans from the last
        schedule read, as the safety pass does.
        """
        fired: float | None = None  # the retry time last acted on
        while not stop.is_set():
            self._wake.clear()
            due = self.next_retry(after=fired)
            now = self.clock()
            if due is None or due > now:
                # Woken early by a new failure (or a success) to look again.
                await sleep_or_stop(stop, 3600.0 if due is None else due - now, wake=self._wake)
                continue
            fired = due
            if not self.synced:
                continue  # the first pass against etcd runs it
            try:
                await self.reconcile()
            except FleetError as e:
                log.warning("agent_retry_failed", error=str(e))
            except Exception:
                # Keep retrying later ones: the watch loop's own pass would hit this too.
                log.exception("agent_retry_crashed")

    # ---- shutdown ------------------------------------------------------------------------

    async def purge(self) -> None:
        """Graceful stop: stop and unload every unit this agent runs, and drop their states."""
        async with self._reconcile_lock:
            await self.executor.purge()
            await self.publisher.withdraw()


def _ignore(_change: Change) -> None:
    pass
