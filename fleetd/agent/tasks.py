"""The task executor: runs the planner's tasks for a desired state through the unit manager.

Each pass plans tasks with the pure planner (fleetd.agent.plan) from (desired, the record),
runs them kind by kind, records what it did (fleetd.agent.record) and keeps the failed tasks
with their retry times. One failing unit never blocks the others on its machine: its tasks are
skipped and retried with backoff, and its published state carries the error meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping

import structlog

from fleetd.agent.fence import PartitionFence
from fleetd.agent.plan import (
    REASON_FILES_CHANGED,
    CurrentUnit,
    DesiredUnit,
    Task,
    TaskFailure,
    TaskKind,
    failure_after,
    holds_back,
    plan_tasks,
)
from fleetd.agent.record import AgentRecord
from fleetd.errors import FleetError
from fleetd.model import PartitionPolicy, TargetState
from fleetd.registry.registry import Registry
from fleetd.systemd.manager import UnitManager
from fleetd.unit.file import UnitFile

log = structlog.get_logger("fleetd.agent")  # one logger name for all of the agent's events

# Tasks in flight at once within one kind of task (all the starts, all the loads...): starting
# 1,000 units one job after another left systemd idle between round trips. 64 jobs waited on
# (the D-Bus adapter still caps calls outstanding at 32) started 1,000 units on one machine in
# 8.3 s against 10.3 s with 16, with systemd busier but not saturated.
TASK_CONCURRENCY = 64


class TaskFailures:
    """The failed tasks, until they succeed: what the retries wait for and the published
    states show (fleetd.agent.publisher reads them)."""

    def __init__(self) -> None:
        # unit -> its last failed task, until one succeeds; "" is the shared daemon-reload.
        self.by_unit: dict[str, TaskFailure] = {}
        # Units loaded or unloaded since the last daemon-reload that succeeded: a start of
        # one of them waits for the next reload (systemd would start the file it had before).
        self.unreloaded: set[str] = set()

    def shown(self, name: str) -> TaskFailure | None:
        """The failure a unit's state shows: its own, else the daemon-reload's it waits for."""
        own = self.by_unit.get(name)
        if own is not None:
            return own
        if name in self.unreloaded:
            return self.by_unit.get("")
        return None

    def units_shown_failed(self, key: str) -> Iterable[str]:
        return self.unreloaded if key == "" else (key,)

    def next_retry(self, after: float | None = None) -> float | None:
        """The earliest retry time (agent clock) of a failed task, later than `after` if
        given; None if there is none."""
        return min(
            (f.retry_at for f in self.by_unit.values() if after is None or f.retry_at > after),
            default=None,
        )


class TaskExecutor:
    """Runs tasks through `manager` into `record`, keeping `failures`; `mark_dirty` is told
    each unit whose published state may have changed."""

    def __init__(
        self,
        registry: Registry,
        manager: UnitManager,
        record: AgentRecord,
        failures: TaskFailures,
        fence: PartitionFence,
        clock: Callable[[], float],
        *,
        mark_dirty: Callable[[str], None],
    ) -> None:
        self.registry = registry
        self.manager = manager
        self.record = record
        self.failures = failures
        self.fence = fence
        self.clock = clock
        self._mark_dirty = mark_dirty

    async def run(self, desired: Mapping[str, DesiredUnit]) -> tuple[int, bool]:
        """Plan and run tasks until the machine matches `desired`; returns the tasks run and
        whether any failed. The caller holds the agent's reconcile lock.

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
        failures = self.failures
        now = self.clock()
        self._expire_failures(desired)
        tasks = [
            t
            for t in plan_tasks(desired, self.record.units)
            if t.kind != TaskKind.RELOAD  # decided below, on what is left
            and not (t.kind == TaskKind.START and self.fence.start_blocked(t.unit))
            and not holds_back(failures.by_unit.get(t.unit), now, desired.get(t.unit))
        ]
        # The daemon-reload: after this pass's loads and unloads, or still owed for
        # earlier ones (it failed); never for a load held back in backoff.
        files_change = any(t.kind in (TaskKind.LOAD, TaskKind.UNLOAD) for t in tasks)
        if (files_change or failures.unreloaded) and not holds_back(
            failures.by_unit.get(""), now, None
        ):
            tasks.append(Task(TaskKind.RELOAD, "", REASON_FILES_CHANGED))
            tasks.sort(key=lambda task: (task.kind, task.unit))
        failed: set[str] = set()  # units (or "" for the reload) that failed in this pass
        ran = 0
        for group in _by_kind(tasks):
            if group[0].kind == TaskKind.RELOAD and not failures.unreloaded:
                continue  # every load and unload of the pass failed: no file changed
            ran += await self._run_group(group, desired, failed)
        return ran, bool(failed)

    async def purge(self) -> None:
        """Stop and unload every unit on record (a graceful stop); the caller holds the
        agent's reconcile lock."""
        tasks = plan_tasks({}, self.record.units)
        try:
            for task in tasks:
                try:
                    await self._run_task(task, {})
                except (FleetError, OSError) as e:
                    log.error("agent_purge_failed", unit=task.unit, error=str(e))
        finally:
            self.record.save()

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
            if task.kind == TaskKind.START and task.unit in self.failures.unreloaded:
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
        failures = self.failures
        failure = failure_after(
            failures.by_unit.get(task.unit), task.kind, error, self.clock(), wanted
        )
        failures.by_unit[task.unit] = failure
        log.error(
            "agent_task_failed",
            task=task.kind.name,
            unit=task.unit,
            error=failure.error,
            attempts=failure.attempts,
            retry_in=round(failure.retry_at - self.clock(), 3),
        )
        for name in failures.units_shown_failed(task.unit):
            self._mark_dirty(name)

    def _task_succeeded(self, task: Task) -> None:
        name = task.unit
        failures = self.failures
        if task.kind == TaskKind.RELOAD:
            waited, failures.unreloaded = failures.unreloaded, set()
            if failures.by_unit.pop("", None) is not None:
                for unit in waited:
                    self._mark_dirty(unit)  # the reload's error goes from their state
            return
        if task.kind in (TaskKind.LOAD, TaskKind.UNLOAD):
            failures.unreloaded.add(name)
        if failures.by_unit.pop(name, None) is not None:
            log.info("agent_task_recovered", task=task.kind.name, unit=name)
            self._mark_dirty(name)

    def _expire_failures(self, desired: Mapping[str, DesiredUnit]) -> None:
        """Forget the failures of units whose desire changed since: their new plan runs now,
        and a unit no longer desired and not loaded loses its published error state."""
        by_unit = self.failures.by_unit
        for name, failure in list(by_unit.items()):
            if name and failure.wanted != desired.get(name):
                del by_unit[name]
                self._mark_dirty(name)

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
                if self.fence.start_blocked(name):
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
                self.fence.held.discard(name)
        self._mark_dirty(name)

    async def _body(self, hash_: str) -> UnitFile:
        body = await self.registry.get_body(hash_)
        if body is None:
            raise FleetError(f"unit body {hash_} missing from the registry")
        return body


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
