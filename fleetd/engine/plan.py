"""The engine's pure planner: (desired units, machines, what is written now) -> writes.

The scheduler decides where non-global units go; this module turns that decision, plus the
global units, into the smallest set of engine-owned writes (schedule, placement and global keys)
that makes etcd say it. Planning again on the applied result yields nothing.

A unit leaving a draining machine is moved make-before-break: it is scheduled on its new
machine while its old schedule entry stays (a *handoff*), and the old entry is deleted only once
the new machine publishes the unit `active`. The two entries are all there is to it in etcd,
so a new engine leader finds the handoff again (`EngineView.adopt_schedule`). A
PartitionPolicy=stop unit is never run twice: it leaves its old machine first, and the engine
places it again only once no machine shows a running copy (engine.py holds that write back).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fleetd.engine.scheduler import plan_schedule
from fleetd.model import (
    Cordon,
    Machine,
    PartitionPolicy,
    Placement,
    Requirements,
    ScheduledUnit,
    TargetState,
    Unit,
    UnitState,
)
from fleetd.unit.names import UnitNameInfo


@dataclass(frozen=True, slots=True)
class SetSchedule:
    unit: Unit
    machine_id: str


@dataclass(frozen=True, slots=True)
class DeleteSchedule:
    name: str
    machine_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class SetPlacement:
    name: str
    machine_id: str | None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DeletePlacement:
    name: str


@dataclass(frozen=True, slots=True)
class SetGlobal:
    unit: Unit


@dataclass(frozen=True, slots=True)
class DeleteGlobal:
    name: str


@dataclass(frozen=True, slots=True)
class BeginHandoff:
    """No etcd write: the unit's entry on `old` stays until its new copy is active."""

    name: str
    old: str


@dataclass(frozen=True, slots=True)
class EndHandoff:
    """No etcd write by itself: goes with the DeleteSchedule of the old entry (if any)."""

    name: str


Write = (
    SetSchedule
    | DeleteSchedule
    | SetPlacement
    | DeletePlacement
    | SetGlobal
    | DeleteGlobal
    | BeginHandoff
    | EndHandoff
)

# systemd active states of a copy that may still be running (for PartitionPolicy=stop units).
RUNNING_STATES = frozenset({"active", "activating", "deactivating", "reloading"})


@dataclass
class EngineView:
    """What the engine knows: desired state, machines, and its own writes as stored now."""

    units: dict[str, Unit] = field(default_factory=dict)
    requirements: dict[str, Requirements] = field(default_factory=dict)
    machines: dict[str, Machine] = field(default_factory=dict)
    schedule: dict[str, ScheduledUnit] = field(default_factory=dict)  # non-global units
    globals: dict[str, Unit] = field(default_factory=dict)  # as written under global/
    placements: dict[str, Placement] = field(default_factory=dict)
    cordons: dict[str, Cordon] = field(default_factory=dict)
    # unit -> the draining machine whose copy still runs until the new one is active
    handoffs: dict[str, str] = field(default_factory=dict)
    # published states the engine read for this plan: the new copies of handoffs
    states: dict[tuple[str, str], UnitState] = field(default_factory=dict)
    # template -> its instances active now, read when a drain must stop one (MinAvailable)
    active_instances: dict[str, int] = field(default_factory=dict)

    @property
    def cordoned(self) -> frozenset[str]:
        return frozenset(self.cordons)

    @property
    def draining(self) -> frozenset[str]:
        return frozenset(m for m, c in self.cordons.items() if c.drain)

    def adopt_schedule(self, entries: Iterable[ScheduledUnit]) -> list[ScheduledUnit]:
        """Take the stored schedule (a new leader's read); return entries to delete.

        A unit scheduled on two machines is a handoff: the copy its placement names is the
        new one, the other the old (normally on a draining machine). An entry beyond two
        (no engine writes that) is returned for deletion.
        """
        by_unit: dict[str, list[ScheduledUnit]] = {}
        for entry in entries:
            by_unit.setdefault(entry.name, []).append(entry)
        self.schedule, self.handoffs = {}, {}
        extra: list[ScheduledUnit] = []
        for name, found in by_unit.items():
            if len(found) == 1:
                self.schedule[name] = found[0]
                continue
            # The engine only adds a second entry off a draining machine, so that one is new;
            # the placement breaks a tie (its write may not have landed with the schedule's).
            placed = self.placements.get(name)
            off_drain = [e for e in found if e.machine_id not in self.draining]
            candidates = off_drain or found
            new = next(
                (e for e in candidates if placed and e.machine_id == placed.machine_id),
                candidates[0],
            )
            others = [e for e in found if e is not new]
            self.schedule[name] = new
            self.handoffs[name] = others[0].machine_id
            extra.extend(others[1:])
        return extra

    def apply(self, writes: list[Write]) -> None:
        """Record writes that etcd accepted, so the next plan starts from them."""
        for w in writes:
            match w:
                case SetSchedule(unit, machine_id):
                    self.schedule[unit.name] = ScheduledUnit(
                        unit.name, machine_id, unit.hash, unit.target_state
                    )
                case DeleteSchedule(name, machine_id, _):
                    current = self.schedule.get(name)
                    if current is not None and current.machine_id == machine_id:
                        del self.schedule[name]
                case SetPlacement(name, machine_id, reason):
                    self.placements[name] = Placement(name, machine_id, reason)
                case DeletePlacement(name):
                    self.placements.pop(name, None)
                case SetGlobal(unit):
                    self.globals[unit.name] = unit
                case DeleteGlobal(name):
                    self.globals.pop(name, None)
                case BeginHandoff(name, old):
                    self.handoffs[name] = old
                case EndHandoff(name):
                    self.handoffs.pop(name, None)


def held_machines(view: EngineView) -> frozenset[str]:
    """Machines the schedule names that are not registered now: the ones a grace holds."""
    return frozenset(
        s.machine_id for s in view.schedule.values() if s.machine_id not in view.machines
    )


def plan(
    view: EngineView, held: frozenset[str] = frozenset()
) -> tuple[list[Write], dict[str, str]]:
    """The writes that bring etcd in line with the desired state, and a reason per move.

    `held` names absent machines whose units are left exactly as they are (schedule and
    placement), during the engine's grace after an etcd-side fault: the machine is expected
    back, so its units are neither moved nor re-planned. Nothing new can land on a held
    machine, since the scheduler only places on registered ones.

    Returned writes are ordered deletes-before-puts per unit, so an agent never sees a unit
    scheduled on two machines by the same engine.
    """
    writes: list[Write] = []
    requirements = view.requirements
    is_global = {n: (r := requirements.get(n)) is not None and r.is_global for n in view.units}
    _plan_globals(view, is_global, writes)

    frozen = {n for n, s in view.schedule.items() if s.machine_id in held} if held else set()
    local = {n: u for n, u in view.units.items() if not is_global[n] and n not in frozen}
    current = {n: s.machine_id for n, s in view.schedule.items() if n not in frozen}
    draining = view.draining
    decided = plan_schedule(
        local,
        view.requirements,
        view.machines,
        current,
        cordoned=view.cordoned,
        draining=draining,
    )
    _end_handoffs(view, local, decided.assignments, writes)

    reasons: dict[str, str] = {}
    budgets = dict(view.active_instances)  # stops each template's budget still allows
    kept_for_budget: dict[str, str] = {}
    # In name order while a budget is spent, so which instance stops first is deterministic.
    scheduled_units = sorted(view.schedule.items()) if budgets else view.schedule.items()
    for name, scheduled in scheduled_units:
        if name in frozen:
            continue
        target = decided.assignments.get(name)
        if target != scheduled.machine_id:
            why = decided.reasons.get(name, "") or _why_gone(name, view, target)
            leaving_drain = (
                target is not None
                and scheduled.machine_id in draining
                and scheduled.machine_id in view.machines
            )
            running = (
                unit := local.get(name)
            ) is not None and unit.target_state == TargetState.LAUNCHED
            if (
                leaving_drain
                and running
                and name not in view.handoffs
                and not _stop_policy(view, name)
            ):
                # Make-before-break: the old copy runs until the new one is active.
                reasons[name] = why
                writes.append(BeginHandoff(name, scheduled.machine_id))
                continue
            if leaving_drain and _stop_policy(view, name):
                wait = _budget_wait(view, name, budgets)
                if wait:  # stopping it now would break its template's MinAvailable
                    kept_for_budget[name] = wait
                    continue
            reasons[name] = why
            writes.append(DeleteSchedule(name, scheduled.machine_id, why))

    for name, wait in kept_for_budget.items():
        machine_id = view.schedule[name].machine_id
        placed = view.placements.get(name)
        if placed is None or placed.machine_id != machine_id or placed.reason != wait:
            writes.append(SetPlacement(name, machine_id, wait))
    for name, machine_id in sorted(decided.assignments.items()):
        if name in kept_for_budget:
            continue
        unit = local[name]
        now = view.schedule.get(name)
        if (
            now is None
            or now.machine_id != machine_id
            or now.hash != unit.hash
            or now.target_state != unit.target_state
        ):
            writes.append(SetSchedule(unit, machine_id))
        placed = view.placements.get(name)
        # A unit that cannot leave a draining machine says why on its placement (fleetctl
        # drain shows it); any other placed unit carries no reason.
        stuck = decided.stuck.get(name, "")
        # Field by field: the same as comparing with Placement(name, machine_id, stuck),
        # without building 10,000 objects per plan.
        if placed is None or placed.machine_id != machine_id or placed.reason != stuck:
            writes.append(SetPlacement(name, machine_id, stuck))

    for name, reason in sorted(decided.unplaced.items()):
        if view.placements.get(name) != Placement(name, None, reason):
            writes.append(SetPlacement(name, None, reason))

    placed_or_explained = decided.assignments.keys() | decided.unplaced.keys()
    for name in sorted(view.placements):
        if name not in placed_or_explained and name not in frozen:
            writes.append(DeletePlacement(name))
    return writes, reasons


def budget_template(view: EngineView, name: str) -> str | None:
    """The template whose MinAvailable governs `name`, if it has a budget."""
    reqs = view.requirements.get(name)
    if reqs is None or reqs.min_available <= 0:
        return None
    info = UnitNameInfo.parse(name)
    return info.template if info is not None and info.is_instance else None


def _budget_wait(view: EngineView, name: str, budgets: dict[str, int]) -> str:
    """ "" if stopping `name` keeps its template's MinAvailable (and counts the stop), else
    why it waits."""
    template = budget_template(view, name)
    if template is None:
        return ""
    need = view.requirements[name].min_available
    active = budgets.get(template, 0)
    if active - 1 >= need:
        budgets[template] = active - 1
        return ""
    return f"waiting for the disruption budget: MinAvailable={need} for {template}, {active} active"


def _stop_policy(view: EngineView, name: str) -> bool:
    reqs = view.requirements.get(name)
    return reqs is not None and reqs.partition_policy == PartitionPolicy.STOP


def _end_handoffs(
    view: EngineView,
    local: Mapping[str, Unit],
    assignments: Mapping[str, str],
    writes: list[Write],
) -> None:
    """Delete the old entry of each handoff whose new copy is active (or that is moot)."""
    for name, old in sorted(view.handoffs.items()):
        new = view.schedule.get(name)
        unit = local.get(name)
        target = assignments.get(name)
        if new is not None and new.machine_id == old:
            writes.append(EndHandoff(name))  # it came back: one entry, nothing to delete
            continue
        state = view.states.get((name, target)) if target is not None else None
        if unit is None or unit.target_state != TargetState.LAUNCHED:
            # Nothing to keep running (destroyed, or stopped meanwhile): the old copy goes.
            why = "unit destroyed" if unit is None else f"target state {unit.target_state.value}"
        elif state is not None and state.active_state == "active" and state.hash == unit.hash:
            why = f"drained: active on {target}"
        elif old not in view.machines:
            why = f"machine {old} went away"
        else:
            continue  # its new copy is not active yet: the old one keeps running
        writes.append(DeleteSchedule(name, old, why))
        writes.append(EndHandoff(name))


def handoff_pairs(view: EngineView) -> list[tuple[str, str]]:
    """(unit, machine) of each handoff's new copy: the states the next plan needs."""
    return [
        (name, scheduled.machine_id)
        for name in view.handoffs
        if (scheduled := view.schedule.get(name)) is not None
    ]


def _plan_globals(view: EngineView, is_global: Mapping[str, bool], writes: list[Write]) -> None:
    # Only the global units, in name order (sorting every unit per plan cost 10% of a plan).
    for name in sorted(n for n, g in is_global.items() if g):
        unit = view.units[name]
        if unit.target_state == TargetState.INACTIVE:
            if name in view.globals:
                writes.append(DeleteGlobal(name))
        elif view.globals.get(name) != unit:
            writes.append(SetGlobal(unit))
    for name in sorted(view.globals):
        if not is_global.get(name, False):
            writes.append(DeleteGlobal(name))


def _why_gone(name: str, view: EngineView, target: str | None) -> str:
    unit = view.units.get(name)
    if unit is None:
        return "unit destroyed"
    if unit.target_state == TargetState.INACTIVE:
        return "target state inactive"
    scheduled = view.schedule[name]
    if scheduled.machine_id not in view.machines:
        return f"machine {scheduled.machine_id} went away"
    if target is not None:
        return f"moved to {target}"
    return "constraints no longer hold"
