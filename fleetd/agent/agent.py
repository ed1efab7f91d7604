"""The agent: runs what the engine scheduled to this machine, through systemd.

It watches only `schedule/<this machine>/`, `global/` and its own dynamic metadata, so a
placement elsewhere costs it nothing. Each change: plan tasks with the pure planner
(fleetd.agent.plan) from (desired, what this agent did so far), run them in order, record.

What the agent did is recorded in a file under /run (unit -> hash and loaded/launched), so a
restarted fleetd plans against the truth and leaves healthy units alone: no restart, same PID.

Never does it stop a unit with the default PartitionPolicy=keep because etcd is slow or
unreachable: registry errors only delay reconciliation, and such units stop only when the
schedule, read from etcd, says so.

The one exception is `PartitionPolicy=stop` (beyond fleet), the only place a timer acts without
etcd. When the machine's lease has not been renewed for FENCE_FRACTION (2/3) of agent_ttl, the
engine may soon move the unit (it can only after the lease expires, at 1 x TTL), so the fence
loop stops this machine's copies of STOP-policy units first: at most one copy runs, ever. The
decision is the pure `plan.units_to_fence`; the loop re-checks every `fence_tick`, so a
unit started concurrently is stopped again.

A fenced unit is recorded as what it now is, LOADED (file in place, not started), and is also
*held* in memory: while held (or while the lease is at risk) the planner's START for it is
dropped, because the agent's copy of the schedule is stale. The hold is lifted only by a fresh
read of the schedule begun while the lease is healthy again (the fence loop asks the watch loop
to resync when renewals resume). Then the ordinary plan applies: if the lease survived, the
schedule still says launched and the unit is started again (LOADED -> LAUNCHED); if it expired,
the engine has unscheduled it here and it is unloaded. The hold needs no persisting: a fleetd
restarted while fenced has LOADED on record and starts nothing before its first read of etcd,
which is exactly the lifted hold. The record does persist each unit's policy, so a fleetd
restarted during an outage still fences what it inherited. The reference for "last renewed" is
never earlier than the agent's start (a lease adopted across a restart during an outage may
have less left than that assumes; documented limitation).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from fleetd.agent.plan import (
    FENCE_FRACTION,
    REASON_FILES_CHANGED,
    CurrentUnit,
    DesiredUnit,
    Task,
    TaskFailure,
    TaskKind,
    desired_for_machine,
    failure_after,
    holds_back,
    lease_at_risk,
    plan_tasks,
    units_to_fence,
)
from fleetd.errors import Compacted, FleetError, RegistryUnavailable
from fleetd.model import (
    Machine,
    PartitionPolicy,
    Requirements,
    ScheduledUnit,
    TargetState,
    Unit,
    UnitState,
)
from fleetd.registry.mirror import Change, Topic
from fleetd.registry.registry import Registry
from fleetd.systemd.manager import SystemdState, UnitManager
from fleetd.unit.file import UnitFile
from fleetd.watching import Backoff, StopWaiter, grid_delay, sleep_or_stop

log = structlog.get_logger("fleetd.agent")

BATCH_WINDOW = 0.005
# Tasks in flight at once within one kind of task (all the starts, all the loads...): starting
# 1,000 units one job after another left systemd idle between round trips. 64 jobs waited on
# (the D-Bus adapter still caps calls outstanding at 32) started 1,000 units on one machine in
# 8.3 s against 10.3 s with 16, with systemd busier but not saturated.
TASK_CONCURRENCY = 64


@dataclass
class AgentRecord:
    """What this agent has done: unit -> (hash, loaded|launched). Persisted across restarts.

    `stop_policy` names the recorded units whose file says PartitionPolicy=stop, so a fleetd
    restarted while etcd is unreachable still knows which units to fence.
    """

    units: dict[str, CurrentUnit] = field(default_factory=dict)
    path: Path | None = None
    stop_policy: set[str] = field(default_factory=set)

    def policies(self) -> dict[str, PartitionPolicy]:
        return {n: PartitionPolicy.STOP for n in self.stop_policy if n in self.units}

    @classmethod
    def load(cls, path: Path | None) -> AgentRecord:
        record = cls(path=path)
        if path is None or not path.exists():
            return record
        try:
            raw = json.loads(path.read_text())
            for name, entry in raw.items():
                record.units[name] = CurrentUnit(
                    name, str(entry["hash"]), TargetState(entry["state"])
                )
                if entry.get("partition") == PartitionPolicy.STOP.value:
                    record.stop_policy.add(name)
        except (OSError, ValueError, KeyError, TypeError) as e:
            # A damaged record only costs a re-load of the units; say so and go on.
            log.warning("agent_record_unreadable", path=str(path), error=str(e))
        return record

    def save(self) -> None:
        if self.path is None:
            return
        data: dict[str, dict[str, str]] = {}
        for n, u in sorted(self.units.items()):
            data[n] = {"hash": u.hash, "state": u.state.value}
            if n in self.stop_policy:
                data[n]["partition"] = PartitionPolicy.STOP.value
        tmp = self.path.with_suffix(".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, separators=(",", ":")))
        os.replace(tmp, self.path)


class MachineLease(Protocol):
    """What the agent needs of its machine's lease (fleetd.presence.Presence is one).

    The agent only reads it: presence keeps the lease; the agent publishes its unit states on
    it, fences PartitionPolicy=stop units when it goes unrenewed, and follows the schedule
    only while the machine is registered.
    """

    @property
    def lease(self) -> int:
        """The live lease id; 0 while there is none (not registered yet, or lost)."""
        ...

    @property
    def last_renewed(self) -> float:
        """Clock time (the agent's clock) of the lease's last renewal; 0 if never."""
        ...

    @property
    def ttl(self) -> float:
        """The lease's TTL in seconds, fixed for the holder's life; 0 turns fencing off."""
        ...

    @property
    def registered(self) -> asyncio.Event:
        """Set while this machine is registered on the lease."""
        ...

    def on_lease_changed(self, callback: Callable[[int], None]) -> None:
        """Call `callback` with the new lease id whenever the machine registers on another."""
        ...


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
        lease.on_lease_changed(lambda _lease: self.republish_all())
        self.machine_id = machine().id
        # This machine's schedule, the global units and this machine's dynamic metadata: a
        # placement elsewhere costs this agent nothing.
        self.mirror = registry.mirror(
            [Topic.SCHEDULE, Topic.GLOBALS, Topic.META],
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
        self._published: dict[str, UnitState] = {}
        self._observed: dict[str, SystemdState] = {}
        self._dirty_states: set[str] = set()
        self._states_changed = asyncio.Event()
        self.tasks_run = 0
        self.synced = False  # True once the first reconcile against etcd has run
        self.ttl = lease.ttl
        self.clock = clock
        self._started = clock()
        self.fence_tick = min(1.0, self.ttl / 30) if self.ttl > 0 else 1.0
        self.fenced: set[str] = set()  # held: stopped by the fence, not restarted yet
        self._resync = asyncio.Event()
        self._backoff = Backoff()
        # unit -> its last failed task, until one succeeds; "" is the shared daemon-reload.
        self._failures: dict[str, TaskFailure] = {}
        # Units loaded or unloaded since the last daemon-reload that succeeded: a start of
        # one of them waits for the next reload (systemd would start the file it had before).
        self._unreloaded: set[str] = set()

    # ---- main loop ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        publisher = asyncio.ensure_future(self._publish_loop(stop))
        observer = asyncio.ensure_future(self._observe_loop(stop))
        fencer = asyncio.ensure_future(self._fence_loop(stop))
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
        return desired_for_machine(self.machine(), scheduled, global_units, requirements)

    async def reconcile(self) -> int:
        """Plan and run tasks until the machine matches its schedule; returns tasks run.

        Tasks run kind by kind in the planner's order (unloads, loads, the daemon-reload,
        stops, starts); the tasks of one kind, which concern different units, run up to
        TASK_CONCURRENCY at a time.

        A failed task fails its unit alone (fleet stopped the whole pass at the first
        failure, so one unit that could not load kept every other unit of the machine from
        starting): the unit's later tasks in this pass are skipped (a unit whose load failed is
        not started), every other task runs, and the unit is retried with backoff
        (`plan.retry_delay`). Until its retry time its tasks are left out of the plan, so a
        unit in backoff costs no systemd call, unless what is desired of it changes. Its state
        carries the error meanwhile, and a task of it that succeeds clears it.

        The daemon-reload is shared: if it fails, the units loaded since the last reload that
        succeeded are not started (systemd would run the file it read before, or none), while
        the units whose files did not change start and stop as planned. The reload itself is
        then retried with backoff, before any start of those units, even in a pass with no
        file to write.
        """
        async with self._reconcile_lock:
            desired = await self.desired()
            now = self.clock()
            self._expire_failures(desired)
            tasks = [
                t
                for t in plan_tasks(desired, self.record.units)
                if t.kind != TaskKind.RELOAD  # decided below, on what is left
                and not (t.kind == TaskKind.START and self._start_blocked(t.unit))
                and not holds_back(self._failures.get(t.unit), now, desired.get(t.unit))
            ]
            # The daemon-reload: after this pass's loads and unloads, or still owed for
            # earlier ones (it failed); never for a load held back in backoff.
            files_change = any(t.kind in (TaskKind.LOAD, TaskKind.UNLOAD) for t in tasks)
            if (files_change or self._unreloaded) and not holds_back(
                self._failures.get(""), now, None
            ):
                tasks.append(Task(TaskKind.RELOAD, "", REASON_FILES_CHANGED))
                tasks.sort(key=lambda task: (task.kind, task.unit))
            failed: set[str] = set()  # units (or "" for the reload) that failed in this pass
            ran = 0
            for group in _by_kind(tasks):
                if group[0].kind == TaskKind.RELOAD and not self._unreloaded:
                    continue  # every load and unload of the pass failed: no file changed
                ran += await self._run_group(group, desired, failed)
            self.tasks_run += ran
            if failed:
                self._wake.set()  # the retry loop: a new retry time to wait for
            return ran

    async def _run_group(
        self, group: list[Task], desired: Mapping[str, DesiredUnit], failed: set[str]
    ) -> int:
        """Run tasks of one kind; returns how many succeeded. Adds the units whose task failed
        to `failed`, and skips the tasks of units already in it (an earlier task failed)."""
        sem = asyncio.Semaphore(TASK_CONCURRENCY)

        async def one(task: Task) -> bool:
            if task.unit in failed:
                _skipped(task, "an earlier task of the unit failed in this pass")
                return False
            if task.kind == TaskKind.START and task.unit in self._unreloaded:
                # Loaded since the last daemon-reload that worked (this pass's failed, or it
                # is in backoff): the reload's retry comes first. Its state shows that error.
                _skipped(task, "waiting for a daemon-reload that failed")
                return False
            async with sem:
                try:
                    await self._run_task(task, desired)
                except (FleetError, OSError) as e:
                    self._task_failed(task, str(e) or type(e).__name__, desired, failed)
                    return False
                except Exception as e:
                    # A bug, not systemd: still this unit's alone, but worth its traceback.
                    log.exception("agent_task_crashed", task=task.kind.name, unit=task.unit)
                    self._task_failed(task, f"{type(e).__name__}: {e}", desired, failed)
                    return False
                self._task_succeeded(task)
                log.info(
                    "agent_task_completed", task=task.kind.name, unit=task.unit, reason=task.reason
                )
                return True

        # The record is written once per group, not per task: it holds every unit, so a write
        # per task made starting 1,000 units quadratic (45 % of fleetd's busy time). A crash
        # before the write is safe: every task is idempotent and is planned again, and a
        # LOAD group's write (with the units' PartitionPolicy) still lands before any START.
        try:
            if len(group) == 1:
                return int(await one(group[0]))
            return sum(await asyncio.gather(*(one(t) for t in group)))
        finally:
            self.record.save()

    def _task_failed(
        self, task: Task, error: str, desired: Mapping[str, DesiredUnit], failed: set[str]
    ) -> None:
        failed.add(task.unit)
        wanted = desired.get(task.unit) if task.unit else None
        failure = failure_after(
            self._failures.get(task.unit), task.kind, error, self.clock(), wanted
        )
        self._failures[task.unit] = failure
        log.error(
            "agent_task_failed",
            task=task.kind.name,
            unit=task.unit,
            error=failure.error,
            attempts=failure.attempts,
            retry_in=round(failure.retry_at - self.clock(), 3),
        )
        for name in self._units_shown_failed(task.unit):
            self._mark_state_dirty(name)

    def _task_succeeded(self, task: Task) -> None:
        name = task.unit
        if task.kind == TaskKind.RELOAD:
            waited, self._unreloaded = self._unreloaded, set()
            if self._failures.pop("", None) is not None:
                for unit in waited:
                    self._mark_state_dirty(unit)  # the reload's error goes from their state
            return
        if task.kind in (TaskKind.LOAD, TaskKind.UNLOAD):
            self._unreloaded.add(name)
        if self._failures.pop(name, None) is not None:
            log.info("agent_task_recovered", task=task.kind.name, unit=name)
            self._mark_state_dirty(name)

    def _expire_failures(self, desired: Mapping[str, DesiredUnit]) -> None:
        """Forget the failures of units whose desire changed since: their new plan runs now,
        and a unit no longer desired and not loaded loses its published error state."""
        for name, failure in list(self._failures.items()):
            if name and failure.wanted != desired.get(name):
                del self._failures[name]
                self._mark_state_dirty(name)

    def _failure_shown(self, name: str) -> TaskFailure | None:
        """The failure a unit's state shows: its own, else the daemon-reload's it waits for."""
        own = self._failures.get(name)
        if own is not None:
            return own
        if name in self._unreloaded:
            return self._failures.get("")
        return None

    def _units_shown_failed(self, key: str) -> Iterable[str]:
        return self._unreloaded if key == "" else (key,)

    def next_retry(self, after: float | None = None) -> float | None:
        """The earliest retry time (agent clock) of a failed task, later than `after` if
        given; None if there is none."""
        return min(
            (f.retry_at for f in self._failures.values() if after is None or f.retry_at > after),
            default=None,
        )

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

    async def _run_task(self, task: Task, desired: Mapping[str, DesiredUnit]) -> None:
        name = task.unit
        record = self.record
        match task.kind:
            case TaskKind.RELOAD:
                await self.manager.reload()
                return
            case TaskKind.LOAD:
                want = desired[name]
                body = await self._body(want.hash)
                await self.manager.load(
                    name, body.serialize(), has_install=body.has_install_section
                )
                record.units[name] = CurrentUnit(name, want.hash, TargetState.LOADED)
                reqs = self.registry.cached_requirements(name, want.hash)
                if reqs is not None and reqs.partition_policy == PartitionPolicy.STOP:
                    record.stop_policy.add(name)
                else:
                    record.stop_policy.discard(name)
            case TaskKind.START:
                if self._start_blocked(name):
                    # The lease became at risk since the plan: the fence loop owns this unit.
                    log.info("unit_start_fenced", unit=name)
                    return
                result = await self.manager.start(name)
                if result != "done":
                    # The unit's own failure, not ours: systemd's Restart= governs it, and the
                    # published state shows it. Retrying here would fight systemd.
                    log.warning("unit_start_job_result", unit=name, result=result)
                record.units[name] = CurrentUnit(
                    name, record.units[name].hash, TargetState.LAUNCHED
                )
            case TaskKind.STOP:
                await self.manager.stop(name)
                record.units[name] = CurrentUnit(name, record.units[name].hash, TargetState.LOADED)
            case TaskKind.UNLOAD:
                await self.manager.unload(name)
                record.units.pop(name, None)
                record.stop_policy.discard(name)
                self.fenced.discard(name)
        self._mark_state_dirty(name)

    async def _body(self, hash_: str) -> UnitFile:
        body = await self.registry.get_body(hash_)
        if body is None:
            raise FleetError(f"unit body {hash_} missing from the registry")
        return body

    # ---- partition policy --------------------------------------------------------------

    def lease_at_risk(self) -> bool:
        """Whether the lease has gone unrenewed for the fence fraction of the TTL (False when
        fencing is disabled)."""
        if self.ttl <= 0:
            return False
        return lease_at_risk(self.clock(), self._renewed_at(), self.ttl)

    def _renewed_at(self) -> float:
        return max(self._lease.last_renewed, self._started)

    def _start_blocked(self, name: str) -> bool:
        if name in self.fenced:
            return True
        return name in self.record.stop_policy and self.lease_at_risk()

    async def fence(self) -> list[str]:
        """Stop the STOP-policy units if the lease is at risk; returns the units stopped.

        Deliberately outside the reconcile lock: a reconcile may be stuck on an unreachable
        etcd, and the fence must not wait for it. A START racing with this is undone at the
        next tick (the decision is level-triggered on the record).
        """
        if self.ttl <= 0:
            return []
        record = self.record
        now = self.clock()
        names = units_to_fence(now, self._renewed_at(), self.ttl, record.units, record.policies())

        async def one(name: str) -> str | None:
            try:
                await self.manager.stop(name)
            except (FleetError, OSError) as e:
                log.error("unit_fence_failed", unit=name, error=str(e))
                return None
            current = record.units.get(name)
            if current is not None:
                record.units[name] = CurrentUnit(name, current.hash, TargetState.LOADED)
            self.fenced.add(name)
            self._mark_state_dirty(name)
            log.warning(
                "unit_fenced",
                unit=name,
                unrenewed_for=round(now - self._renewed_at(), 3),
                ttl=self.ttl,
                reason="lease at risk; PartitionPolicy=stop",
            )
            return name

        stopped = [n for n in await asyncio.gather(*(one(n) for n in names)) if n is not None]
        if stopped:
            record.save()
        return stopped

    async def _fence_loop(self, stop: asyncio.Event) -> None:
        if self.ttl <= 0:
            return
        waiter = StopWaiter(stop)
        try:
            while not stop.is_set():
                await self.fence()
                at_risk = self.lease_at_risk()
                if self.fenced and not at_risk:
                    # Renewals resumed: have the watch loop read the schedule afresh (lifting
                    # the hold) rather than restart units from a copy that may be stale.
                    self._resync.set()
                await waiter.sleep(self._fence_wait(at_risk))
        finally:
            waiter.close()

    def _fence_wait(self, at_risk: bool) -> float:
        """How long the fence loop may sleep.

        While the lease is at risk or units are held, every fence_tick (a START racing the
        fence is undone at the next tick). Otherwise nothing can need fencing before the lease
        has gone unrenewed for the fence fraction of the TTL: sleep until then. A renewal
        meanwhile moves that point, so the loop then just sleeps again; an idle agent wakes
        about once per renewal instead of every fence_tick (3,000 wakeups/s at 1,000
        simulated machines with agent_ttl 10s), and no START can slip in unfenced, because
        the agent starts no STOP-policy unit while the lease is at risk.
        """
        if at_risk or self.fenced:
            return self.fence_tick
        at = self._renewed_at() + FENCE_FRACTION * self.ttl
        # The last grid point before the deadline: shared wakeups, and never late.
        return max(self.fence_tick, grid_delay(self.clock(), at, early=True))

    # ---- state publishing --------------------------------------------------------------

    def _mark_state_dirty(self, name: str) -> None:
        self._dirty_states.add(name)
        self._states_changed.set()

    def republish_all(self) -> None:
        """After a new lease (the old one expired with our states on it), publish everything."""
        self._published.clear()
        for name in [*self.record.units, *self._failures]:
            if name:
                self._mark_state_dirty(name)

    async def _observe_loop(self, stop: asyncio.Event) -> None:
        """Follow systemd's state of the units we manage (the watch starts with a snapshot)."""
        while not stop.is_set():
            try:
                async for name, state in self.manager.watch():
                    self._observed[name] = state
                    if name in self.record.units:
                        self._mark_state_dirty(name)
            except FleetError as e:
                # The bus connection broke; the next watch reconnects.
                log.warning("systemd_watch_broken", error=str(e))
            await sleep_or_stop(stop, 1.0)

    async def _publish_loop(self, stop: asyncio.Event) -> None:
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
                self._published.pop(name, None)
                removals.append(name)
                continue
            if self._published.get(name) != state:
                puts.append(state)
        if puts:
            await self.registry.publish_states(puts, lease)
            for s in puts:
                self._published[s.name] = s
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
            failure = self._failures.get(name)
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
        failure = self._failure_shown(name)
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

    # ---- shutdown ------------------------------------------------------------------------

    async def purge(self) -> None:
        """Graceful stop: stop and unload every unit this agent runs, and drop their states."""
        async with self._reconcile_lock:
            tasks = plan_tasks({}, self.record.units)
            try:
                for task in tasks:
                    try:
                        await self._run_task(task, {})
                    except (FleetError, OSError) as e:
                        log.error("agent_purge_failed", unit=task.unit, error=str(e))
            finally:
                self.record.save()
            with contextlib.suppress(FleetError):
                for name in list(self._published):
                    await self.registry.remove_state(name, self.machine_id)
            self._published.clear()


def _ignore(_change: Change) -> None:
    pass


def _skipped(task: Task, reason: str) -> None:
    log.info("agent_task_skipped", task=task.kind.name, unit=task.unit, reason=reason)


def _by_kind(tasks: list[Task]) -> list[list[Task]]:
    """Consecutive runs of tasks of one kind (the planner sorts tasks by kind)."""
    groups: list[list[Task]] = []
    for task in tasks:
        if groups and groups[-1][0].kind == task.kind:
            groups[-1].append(task)
        else:
            groups.append([task])
    return groups
