"""What one machine's agent must do: fleet's agent reconciler as pure functions.

`desired_for_machine` says which units this machine should run (its schedule plus the matching
global units, conflicts resolved by name as fleet's agent does). `plan_tasks` compares that with
what the agent last did (`current`: the unit files it wrote and whether it started them) and
returns the systemd tasks to run, in fleet's order (agent/reconcile.go calculateTasksForUnit).
The executor runs them in order and stops at the first failure; the next pass plans again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

from fleetd.model import (
    Machine,
    PartitionPolicy,
    Requirements,
    ScheduledUnit,
    TargetState,
    Unit,
)
from fleetd.scheduler import conflict_between

__all__ = [
    "FENCE_FRACTION",
    "CurrentUnit",
    "DesiredUnit",
    "Task",
    "TaskKind",
    "apply_tasks",
    "desired_for_machine",
    "lease_at_risk",
    "plan_tasks",
    "units_to_fence",
]

_NO_REQUIREMENTS = Requirements()

# PartitionPolicy=stop: the share of agent_ttl without a successful lease renewal after which
# the agent stops its STOP-policy units. The engine can move them only once the lease has
# expired (1 x TTL after the last renewal), so this leaves a third of the TTL for the stops.
# Presence renews every TTL/3, so being past 2/3 means at least one renewal has failed.
FENCE_FRACTION = 2 / 3


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
    candidates: dict[str, tuple[DesiredUnit, tuple[str, ...]]] = {}
    for entry in scheduled:
        if entry.machine_id == machine.id and entry.target_state != TargetState.INACTIVE:
            conflicts = requirements.get(entry.name, _NO_REQUIREMENTS).conflicts
            wanted = DesiredUnit(entry.name, entry.hash, entry.target_state)
            candidates[entry.name] = (wanted, conflicts)
    for name, (unit, req) in global_units.items():
        if unit.target_state != TargetState.INACTIVE and req.metadata_matches(machine):
            candidates[name] = (DesiredUnit(name, unit.hash, unit.target_state), req.conflicts)

    chosen: dict[str, DesiredUnit] = {}
    taken: list[tuple[str, tuple[str, ...]]] = []
    for name in sorted(candidates):
        wanted, conflicts = candidates[name]
        if any(conflict_between(name, conflicts, other, theirs) for other, theirs in taken):
            continue
        chosen[name] = wanted
        taken.append((name, conflicts))
    return chosen


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
