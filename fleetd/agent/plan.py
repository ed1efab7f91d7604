"""What one machine's agent must do: fleet's agent reconciler as pure functions.

`desired_for_machine` says which units this machine should run (its schedule plus the matching
global units, conflicts resolved by name as fleet's agent does). `plan_tasks` compares that with
what the agent last did (`current`: the unit files it wrote and whether it started them) and
returns the systemd tasks to run, in fleet's order (agent/reconcile.go calculateTasksForUnit).

Unlike fleet, whose executor stops at the first failure, a failed task fails only its own unit
(`TaskFailure`): the unit's later tasks wait, every other unit's tasks run in the same pass, and
the unit is retried after `retry_delay` (`holds_back` says whether it is still waiting).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

from fleetd.feasibility import first_fit_by_name, matching_globals
from fleetd.model import (
    Machine,
    PartitionPolicy,
    Requirements,
    ScheduledUnit,
    TargetState,
    Unit,
)

__all__ = [
    "FENCE_FRACTION",
    "RETRY_CEILING",
    "RETRY_INITIAL",
    "CurrentUnit",
    "DesiredUnit",
    "Task",
    "TaskFailure",
    "TaskKind",
    "apply_tasks",
    "desired_for_machine",
    "failure_after",
    "holds_back",
    "lease_at_risk",
    "plan_tasks",
    "retry_delay",
    "units_to_fence",
]

_NO_REQUIREMENTS = Requirements()

# PartitionPolicy=stop: the share of agent_ttl without a successful lease renewal after which
# the agent stops its STOP-policy units. The engine can move them only once the lease has
# expired (1 x TTL after the last renewal), so this leaves a third of the TTL for the stops.
# Presence renews every TTL/3, so being past 2/3 means at least one renewal has failed.
FENCE_FRACTION = 2 / 3

# A unit whose task failed is retried after RETRY_INITIAL seconds, doubling per failure up to
# RETRY_CEILING. The first retry comes soon (a full /run or a slow systemd is often brief);
# the ceiling keeps a unit that can never load (a name systemd refuses) down to one attempt,
# and one error line in the log, every five minutes.
RETRY_INITIAL = 1.0
RETRY_CEILING = 300.0
# The published error is cut to this many characters: it is part of every state listing.
ERROR_MAX = 300


class TaskKind(IntEnum):
    """Agent tasks; the value is the order they run in (fleet's taskTypeSortOrder)."""

    UNLOAD = 1
    LOAD = 2
    RELOAD = 3  # systemd daemon-reload, once, after unit files were written or removed
    STOP = 4
    START = 5


# Task reasons, logged with every task (fleet's taskReason* constants, reworded).
REASON_NOT_DESIRED = "unit loaded but not scheduled here"
REASON_NOT_LOADED = "unit scheduled here but not loaded"
REASON_HASH_CHANGED = "unit file changed (hash differs)"
REASON_WANT_LAUNCHED = "unit loaded but desired state is launched"
REASON_WANT_LOADED = "unit launched but desired state is loaded"
REASON_FILES_CHANGED = "unit files were written or removed"


@dataclass(frozen=True, slots=True)
class DesiredUnit:
    """A unit this machine should run, and how far (loaded or launched)."""

    name: str
    hash: str
    target_state: TargetState


@dataclass(frozen=True, slots=True)
class CurrentUnit:
    """What the agent last did with a unit: the file it wrote (by hash), loaded or launched.

    INACTIVE is accepted too: a unit file is present but the agent does not know what it did
    (fleet's state after a restart); it is loaded again.
    """

    name: str
    hash: str
    state: TargetState


@dataclass(frozen=True, slots=True)
class Task:
    kind: TaskKind
    unit: str  # "" for RELOAD, which concerns no single unit
    reason: str


@dataclass(frozen=True, slots=True)
class TaskFailure:
    """A unit's last failed task, published with its state until a task of it succeeds.

    `wanted` is what was desired for the unit when it failed (None: not desired here); when
    that changes (a new hash, another target state, unscheduled) the failure no longer holds
    the unit back, since the new plan may well succeed.
    """

    task: TaskKind
    error: str
    attempts: int  # failures in a row with the same `wanted`
    retry_at: float  # on the agent's clock
    wanted: DesiredUnit | None

    @property
    def task_name(self) -> str:
        return self.task.name.lower()


def retry_delay(attempts: int) -> float:
    """Seconds to wait after the `attempts`-th failure in a row (1, 2, 4, ... 300)."""
    return min(RETRY_INITIAL * 2.0 ** max(attempts - 1, 0), RETRY_CEILING)


def failure_after(
    previous: TaskFailure | None,
    task: TaskKind,
    error: str,
    now: float,
    wanted: DesiredUnit | None,
) -> TaskFailure:
    """The failure to record for a task that failed at `now`: one more attempt if the unit
    failed before with the same desire, else the first (a changed desire starts afresh)."""
    attempts = previous.attempts + 1 if previous is not None and previous.wanted == wanted else 1
    if len(error) > ERROR_MAX:
        error = error[: ERROR_MAX - 3] + "..."
    return TaskFailure(task, error, attempts, now + retry_delay(attempts), wanted)


def holds_back(failure: TaskFailure | None, now: float, wanted: DesiredUnit | None) -> bool:
    """Whether a unit's tasks wait: it failed, its retry time has not come, and what is desired
    of it has not changed since."""
    return failure is not None and failure.wanted == wanted and now < failure.retry_at


def plan_tasks(
    desired: Mapping[str, DesiredUnit], current: Mapping[str, CurrentUnit]
) -> list[Task]:
    """The tasks that turn `current` into `desired`, sorted by kind, then unit name.

    One RELOAD follows the loads and unloads, and only if there are any: a daemon-reload is
    needed only when unit files changed.
    """
    tasks: list[Task] = []
    for name in sorted(desired.keys() | current.keys()):
        tasks.extend(_tasks_for_unit(name, desired.get(name), current.get(name)))
    if any(task.kind in (TaskKind.UNLOAD, TaskKind.LOAD) for task in tasks):
        tasks.append(Task(TaskKind.RELOAD, "", REASON_FILES_CHANGED))
    tasks.sort(key=lambda task: (task.kind, task.unit))
    return tasks


def _tasks_for_unit(
    name: str, desired: DesiredUnit | None, current: CurrentUnit | None
) -> list[Task]:
    if desired is None or desired.target_state == TargetState.INACTIVE:
        return [] if current is None else [Task(TaskKind.UNLOAD, name, REASON_NOT_DESIRED)]
    if current is None or current.state == TargetState.INACTIVE:
        return _load(desired, REASON_NOT_LOADED)
    if current.hash != desired.hash:
        # fleet's --replace path: the old file goes before the new one is written.
        return [
            Task(TaskKind.UNLOAD, name, REASON_HASH_CHANGED),
            *_load(desired, REASON_HASH_CHANGED),
        ]
    if desired.target_state == current.state:
        return []
    if desired.target_state == TargetState.LAUNCHED:
        return [Task(TaskKind.START, name, REASON_WANT_LAUNCHED)]
    return [Task(TaskKind.STOP, name, REASON_WANT_LOADED)]


def _load(desired: DesiredUnit, reason: str) -> list[Task]:
    tasks = [Task(TaskKind.LOAD, desired.name, reason)]
    if desired.target_state == TargetState.LAUNCHED:
        tasks.append(Task(TaskKind.START, desired.name, reason))
    return tasks


def apply_tasks(
    current: Mapping[str, CurrentUnit],
    desired: Mapping[str, DesiredUnit],
    tasks: Sequence[Task],
) -> dict[str, CurrentUnit]:
    """What the agent will have done after running every task successfully.

    A model of the executor, used by tests and the simulator: LOAD writes the desired file, STOP
    and START change only the state. Raises KeyError for a task that cannot apply.
    """
    result = dict(current)
    for task in tasks:
        if task.kind == TaskKind.UNLOAD:
            del result[task.unit]
        elif task.kind == TaskKind.LOAD:
            wanted = desired[task.unit]
            result[task.unit] = CurrentUnit(task.unit, wanted.hash, TargetState.LOADED)
        elif task.kind == TaskKind.STOP:
            result[task.unit] = dataclasses.replace(result[task.unit], state=TargetState.LOADED)
        elif task.kind == TaskKind.START:
            result[task.unit] = dataclasses.replace(result[task.unit], state=TargetState.LAUNCHED)
    return result


def desired_for_machine(
    machine: Machine,
    scheduled: Iterable[ScheduledUnit],
    global_units: Mapping[str, tuple[Unit, Requirements]],
    requirements: Mapping[str, Requirements],
) -> dict[str, DesiredUnit]:
    """The units `machine` should run, by name.

    Scheduled (non-global) units count when scheduled to this machine with a target state other
    than inactive; their metadata is not checked again (the engine did). Global units count
    when not inactive and their MachineMetadata matches. Walking all of them in name order, a
    unit that conflicts with one already taken is skipped, as fleet's agent does; the engine
    never schedules a unit next to a conflicting global one, so this only matters transiently.
    A name that is both scheduled and global is taken as global (the engine will unschedule it).
    """
    wanted: dict[str, DesiredUnit] = {}
    conflicts: dict[str, tuple[str, ...]] = {}
    for entry in scheduled:
        if entry.machine_id == machine.id and entry.target_state != TargetState.INACTIVE:
            wanted[entry.name] = DesiredUnit(entry.name, entry.hash, entry.target_state)
            conflicts[entry.name] = requirements.get(entry.name, _NO_REQUIREMENTS).conflicts
    active = {n: g for n, g in global_units.items() if g[0].target_state != TargetState.INACTIVE}
    for name in matching_globals(machine, ((n, req) for n, (_, req) in active.items())):
        unit, req = active[name]
        wanted[name] = DesiredUnit(name, unit.hash, unit.target_state)
        conflicts[name] = req.conflicts
    return {name: wanted[name] for name in first_fit_by_name(conflicts)}


def lease_at_risk(
    now: float, last_renewed: float, ttl: float, fraction: float = FENCE_FRACTION
) -> bool:
    """Whether the machine's lease may expire soon: not renewed for more than `fraction` x
    `ttl` seconds (all times on one clock). Past this point the engine may soon move units."""
    return now - last_renewed > fraction * ttl


def units_to_fence(
    now: float,
    last_renewed: float,
    ttl: float,
    current: Mapping[str, CurrentUnit],
    policies: Mapping[str, PartitionPolicy],
    fraction: float = FENCE_FRACTION,
) -> list[str]:
    """The units the agent must stop now, before its lease can expire, sorted by name.

    Only launched units whose policy is STOP, and only while the lease is at risk; units with
    the default KEEP (or no known policy) run through any registry outage, as in fleet.
    """
    if not lease_at_risk(now, last_renewed, ttl, fraction):
        return []
    return sorted(
        name
        for name, unit in current.items()
        if unit.state == TargetState.LAUNCHED
        and policies.get(name, PartitionPolicy.KEEP) == PartitionPolicy.STOP
    )
