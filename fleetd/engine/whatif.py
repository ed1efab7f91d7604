"""What-if: the engine's own planner on a copy of the cluster's state with a change applied.

`fleetctl plan` and `POST /fleet/v1/plan` ask `predict`: what would the engine do if these units
were started (or replaced), or if these machines went away? `fleetctl why` and
`GET /fleet/v1/why/<unit>` ask `explain`: why is this unit not placed (or placed where it is),
machine by machine and constraint by constraint, and what is the smallest change that would
place it?

The prediction is not a model of the engine: it is `fleetd.engine.plan.plan` (which calls
`scheduler.plan_schedule`) run on an `EngineView` built from the registry records the engine
reads (fleetd/whatif_load.py builds it), copied and changed. First the copy is settled (planned
and applied once, so a change the engine has not made yet is not blamed on the hypothesis), then
the change is applied and planned again; what differs between the two settled states is the
prediction. Killing a machine is removing it from the view, exactly as the engine sees a machine
whose lease expired (without the grace after an etcd-side fault: a machine that really goes
away while etcd is healthy is not held).

`explain` evaluates each of the unit's constraints on each machine of the settled state, in the
scheduler's terms (feasibility.py's shared rules), and derives from the failures the cheapest
set of changes that would make some machine fit. The per-machine table is an explanation; the
scheduler's own reason (in the placement record) stays the authority on what it decided.

Pure functions of their input: no I/O, no clock (tests/unit/test_layout.py holds it to it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fleetd.engine.plan import EngineView, budget_template, plan
from fleetd.errors import InvalidInput, NotFound
from fleetd.feasibility import (
    conflict_between,
    describe_metadata,
    global_units_for,
    matches_any,
    metadata_misses,
)
from fleetd.model import Cordon, Machine, Requirements, TargetState, Unit
from fleetd.omitempty import omit_empty
from fleetd.unit.file import UnitFile
from fleetd.unit.names import UnitNameInfo
from fleetd.unit.xfleet import requirements as parse_requirements

__all__ = [
    "CONSTRAINTS",
    "Action",
    "Check",
    "Explanation",
    "Fix",
    "GlobalOutcome",
    "Hypothesis",
    "MachineFit",
    "Prediction",
    "Result",
    "Start",
    "UnitOutcome",
    "copy_view",
    "explain",
    "explanation_from_api",
    "explanation_to_api",
    "hypothesis",
    "predict",
    "prediction_from_api",
    "prediction_to_api",
    "resolve_machines",
    "settle",
]

_NO_REQUIREMENTS = Requirements()
# The [X-Fleet] constraints `explain` evaluates, in the order its table shows them.
CONSTRAINTS = ("MachineID", "MachineMetadata", "MachineOf", "Conflicts", "Replaces")
MAX_FIXES = 5


# ---- the view -------------------------------------------------------------------------------


def copy_view(view: EngineView) -> EngineView:
    """A copy of `view` whose collections can change without touching it (their values are
    frozen). Field by field, so whatever the engine's view gains is carried along."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(view):
        value = getattr(view, f.name)
        if isinstance(value, dict):
            changes[f.name] = dict(value)
        elif isinstance(value, set):
            changes[f.name] = set(value)
    return dataclasses.replace(view, **changes)


def settle(view: EngineView) -> tuple[EngineView, int]:
    """A copy of `view` with the engine's next plan applied, and how many writes it took
    (0 when the engine has done everything the view asks). One plan reaches the fixpoint:
    planning the applied result again yields nothing (plan.py)."""
    settled = copy_view(view)
    writes, _ = plan(settled)
    settled.apply(writes)
    return settled, len(writes)


def _is_global(view: EngineView, name: str) -> bool:
    req = view.requirements.get(name)
    return req is not None and req.is_global


def _global_hosts(view: EngineView) -> dict[str, list[str]]:
    """Global unit -> the machines (by id, sorted) that run it, as the scheduler places them."""
    active = {
        name: req
        for name, unit in view.units.items()
        if (req := view.requirements.get(name)) is not None
        and req.is_global
        and unit.target_state != TargetState.INACTIVE
    }
    hosts: dict[str, list[str]] = {name: [] for name in active}
    if not active:
        return hosts
    for machine_id in sorted(view.machines):
        for name in global_units_for(view.machines[machine_id], active):
            hosts[name].append(machine_id)
    return hosts


# ---- the hypothesis -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """One unit `plan` tries: the body it would have (None: the one stored) and the desired
    state it would be given (`fleetctl start` gives `launched`)."""

    name: str
    body: UnitFile | None = None
    state: TargetState = TargetState.LAUNCHED


@dataclass(frozen=True)
class Hypothesis:
    """A change to try on a copy of the cluster: units added or changed, machines gone."""

    # unit name -> the unit as it would be stored, and its requirements
    units: Mapping[str, tuple[Unit, Requirements]] = field(default_factory=dict)
    kill: frozenset[str] = frozenset()  # machine ids, as if their leases expired
    # machine ids, as if drained: their non-global units leave, they stay registered
    drain: frozenset[str] = frozenset()


def resolve_machines(prefixes: Iterable[str], machine_ids: Iterable[str]) -> frozenset[str]:
    """The machines the arguments name: each a full machine id or a prefix of exactly one
    (as fleetctl resolves machine arguments). InvalidInput names an unknown or ambiguous one."""
    known = sorted(set(machine_ids))
    chosen = set()
    for prefix in prefixes:
        if not prefix:
            raise InvalidInput("empty machine ID")
        if prefix in known:
            chosen.add(prefix)
            continue
        matches = [m for m in known if m.startswith(prefix)]
        if not matches:
            raise InvalidInput(f'no machine matches ID prefix "{prefix}"')
        if len(matches) > 1:
            listed = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
            raise InvalidInput(
                f'machine ID prefix "{prefix}" is ambiguous: it matches {len(matches)}'
                f" machines ({listed})"
            )
        chosen.add(matches[0])
    return frozenset(chosen)


def hypothesis(
    view: EngineView,
    starts: Sequence[Start],
    kill: Iterable[str] = (),
    drain: Iterable[str] = (),
) -> Hypothesis:
    """The hypothesis of starting `starts`, killing the machines `kill` names and draining
    those `drain` names (ids or unique prefixes); InvalidInput for a unit given twice, a
    template to activate, a unit without a body that does not exist, bad [X-Fleet] options,
    an unknown machine, or one both killed and drained."""
    units: dict[str, tuple[Unit, Requirements]] = {}
    for start in starts:
        name = start.name
        if name in units:
            raise InvalidInput(f"unit {name} is given twice")
        info = UnitNameInfo.parse(name)
        if start.state is not TargetState.INACTIVE and info is not None and info.is_template:
            raise InvalidInput(f'cannot activate template "{name}"')
        if start.body is None:
            existing = view.units.get(name)
            if existing is None:
                raise InvalidInput(f"unit {name} does not exist and no unit file was given")
            reqs = view.requirements.get(name, _NO_REQUIREMENTS)
            units[name] = (dataclasses.replace(existing, target_state=start.state), reqs)
        else:
            reqs = parse_requirements(start.body, name)
            units[name] = (Unit(name, start.body.hash, start.state), reqs)
    killed = resolve_machines(kill, view.machines)
    drained = resolve_machines(drain, view.machines)
    both = sorted(killed & drained)
    if both:
        raise InvalidInput(f"machine {both[0]} is both killed and drained: choose one")
    return Hypothesis(units, killed, drained)


# ---- predict --------------------------------------------------------------------------------


class Action(StrEnum):
    """What would happen to a unit."""

    STAY = "stay"  # on the machine it is on now (listed only for the units the plan names)
    MOVE = "move"  # from one machine to another
    PLACE = "place"  # placed on a machine, not being on one now
    UNPLACED = "unplaced"  # on no machine: the scheduler cannot place it (reason says why)
    UNSCHEDULE = "unschedule"  # taken off its machine for another reason (e.g. inactive)
    STUCK = "stuck"  # cannot leave a draining machine: it stays there (reason says why)
    GLOBAL = "global"  # a global unit the plan names (its machines: the global outcomes)


@dataclass(frozen=True, slots=True)
class UnitOutcome:
    name: str
    action: Action
    before: str | None = None  # the machine it is scheduled on now
    after: str | None = None  # the machine it would be scheduled on
    reason: str = ""  # why it leaves its machine, or why it cannot be placed


@dataclass(frozen=True, slots=True)
class GlobalOutcome:
    """A global unit that would start or stop on one machine."""

    name: str
    machine_id: str
    action: str  # "start" | "stop"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Prediction:
    kill: tuple[str, ...] = ()  # the machines removed, by id
    drain: tuple[str, ...] = ()  # the machines drained, by id
    units: tuple[UnitOutcome, ...] = ()  # by name
    globals: tuple[GlobalOutcome, ...] = ()  # by (name, machine)
    # Writes the engine still had to make before any change (0: it had done everything; more:
    # it is behind, or no engine leads). The prediction starts from the state it converges to.
    pending: int = 0
    revision: int = 0  # the registry revision the state was read at (0: not from a registry)
    unplanned: tuple[str, ...] = ()  # units the engine leaves out (their body does not read)

    def count(self, action: Action) -> int:
        return sum(1 for u in self.units if u.action is action)

    @property
    def unplaced(self) -> list[UnitOutcome]:
        """The outcomes of units that would run nowhere, or could not leave a machine being
        drained: what makes a plan unsafe."""
        return [u for u in self.units if u.action in (Action.UNPLACED, Action.STUCK)]


def predict(view: EngineView, change: Hypothesis, *, revision: int = 0) -> Prediction:
    """What the engine would do to the cluster `view` describes if `change` happened."""
    missing = sorted(change.kill - view.machines.keys())
    if missing:
        raise InvalidInput(f"machine {missing[0]} does not exist")
    base, pending = settle(view)
    after = copy_view(base)
    for name, (unit, reqs) in change.units.items():
        after.units[name] = unit
        after.requirements[name] = reqs
    for machine_id in change.kill:
        del after.machines[machine_id]
    for machine_id in change.drain:
        after.cordons[machine_id] = Cordon(machine_id, drain=True)
    if change.drain:
        # A disruption budget only paces a drain (each stop waits for the instances moved
        # before it to be active); the prediction is where the units end up.
        after.active_instances = {
            template: len(after.units)
            for name in after.units
            if (template := budget_template(after, name)) is not None
        }
    writes, reasons = plan(after)
    after.apply(writes)
    return Prediction(
        kill=tuple(sorted(change.kill)),
        drain=tuple(sorted(change.drain)),
        units=tuple(_unit_outcomes(base, after, reasons, change)),
        globals=tuple(_global_outcomes(base, after, change.kill)),
        pending=pending,
        revision=revision,
    )


def _unit_outcomes(
    base: EngineView, after: EngineView, reasons: Mapping[str, str], change: Hypothesis
) -> list[UnitOutcome]:
    before = {n: s.machine_id for n, s in base.schedule.items()}
    now = {n: s.machine_id for n, s in after.schedule.items()}
    unplaced = {n: p.reason for n, p in after.placements.items() if p.machine_id is None}
    hosts = _global_hosts(after) if any(_is_global(after, n) for n in change.units) else {}
    out = []
    stuck = {
        n: p.reason
        for n, p in after.placements.items()
        if p.machine_id is not None and p.machine_id in change.drain and p.reason
    }
    for name in sorted(before.keys() | now.keys() | change.units.keys()):
        old, new = before.get(name), now.get(name)
        named = name in change.units
        if name in stuck and new is not None and new == old:
            out.append(UnitOutcome(name, Action.STUCK, old, new, stuck[name]))
            continue
        if old == new and not named:
            continue
        if named and _is_global(after, name) and old is None:
            out.append(_global_unit_outcome(after, name, hosts.get(name, [])))
        elif old is not None and new is not None:
            action = Action.STAY if old == new else Action.MOVE
            out.append(UnitOutcome(name, action, old, new, reasons.get(name, "")))
        elif new is not None:
            out.append(UnitOutcome(name, Action.PLACE, None, new))
        elif name in unplaced:
            left = reasons.get(name, "") if old is not None else ""
            why = f"{left}; {unplaced[name]}" if left else unplaced[name]
            out.append(UnitOutcome(name, Action.UNPLACED, old, None, why))
        elif old is not None:
            out.append(UnitOutcome(name, Action.UNSCHEDULE, old, None, reasons.get(name, "")))
        else:
            unit = after.units.get(name)
            why = "desired state inactive" if unit is not None else "no such unit"
            out.append(UnitOutcome(name, Action.STAY, None, None, why))
    return out


def _global_unit_outcome(view: EngineView, name: str, hosts: Sequence[str]) -> UnitOutcome:
    if view.units[name].target_state == TargetState.INACTIVE:
        return UnitOutcome(name, Action.GLOBAL, reason="global unit, desired state inactive")
    if hosts:
        on = f"global unit: on {len(hosts)} of {len(view.machines)} machines"
        return UnitOutcome(name, Action.GLOBAL, reason=on)
    return UnitOutcome(name, Action.UNPLACED, reason=_why_no_global_host(view, name))


def _why_no_global_host(view: EngineView, name: str) -> str:
    if not view.machines:
        return "no machines registered"
    req = view.requirements[name]
    matching = [
        m for m in view.machines.values() if not metadata_misses(req.metadata, m.metadata_dict)
    ]
    if not matching:
        described = describe_metadata(req.metadata)
        return f"no machine has metadata {described} (machines: {len(view.machines)})"
    return "every machine it matches runs a conflicting global unit that comes first by name"


def _global_outcomes(
    base: EngineView, after: EngineView, killed: frozenset[str]
) -> list[GlobalOutcome]:
    old = {(n, m) for n, ms in _global_hosts(base).items() for m in ms}
    new = {(n, m) for n, ms in _global_hosts(after).items() for m in ms}
    out = []
    for name, machine_id in sorted(old | new):
        if (name, machine_id) in old and (name, machine_id) in new:
            continue
        if (name, machine_id) in new:
            out.append(GlobalOutcome(name, machine_id, "start"))
            continue
        if machine_id in killed:
            why = "its machine goes away"
        elif name not in after.units:
            why = "unit destroyed"
        elif after.units[name].target_state == TargetState.INACTIVE:
            why = "desired state inactive"
        elif not _is_global(after, name):
            why = "no longer global"
        elif metadata_misses(
            after.requirements[name].metadata, after.machines[machine_id].metadata_dict
        ):
            why = f"fails MachineMetadata {describe_metadata(after.requirements[name].metadata)}"
        else:
            why = "a conflicting global unit comes first by name"
        out.append(GlobalOutcome(name, machine_id, "stop", why))
    return out


# ---- explain --------------------------------------------------------------------------------


class Result(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    NONE = "none"  # the unit has no such constraint


@dataclass(frozen=True, slots=True)
class Check:
    constraint: str  # one of CONSTRAINTS
    result: Result
    detail: str = ""


@dataclass(frozen=True, slots=True)
class MachineFit:
    """One machine against each of the unit's constraints."""

    machine_id: str
    load: int  # units it runs, the unit explained aside (global units included)
    checks: tuple[Check, ...]
    here: bool = False  # the unit runs (or would run, once the engine settles) there

    @property
    def fits(self) -> bool:
        return all(c.result is not Result.FAIL for c in self.checks)


@dataclass(frozen=True, slots=True)
class Fix:
    """A change that would let the scheduler place the unit, on one of `machines` (none: a
    change to the unit itself or to another unit)."""

    change: str
    machines: tuple[str, ...] = ()
    changes: int = 1  # how many edits it takes


@dataclass(frozen=True, slots=True)
class Explanation:
    name: str
    desired_state: str
    is_global: bool
    machine_id: str | None  # where it is scheduled now (None: nowhere, or global)
    predicted: str | None  # where it is once the engine settles (as if started, if inactive)
    reason: str  # the scheduler's reason, when it cannot place it
    machines: tuple[MachineFit, ...] = ()
    fixes: tuple[Fix, ...] = ()  # smallest first
    notes: tuple[str, ...] = ()
    pending: int = 0  # as Prediction.pending
    revision: int = 0


@dataclass
class _Evaluation:
    """One machine against the unit, with what the checks' texts and the fixes are made of."""

    machine: Machine
    here: list[str]  # other units on it
    machine_id_ok: bool | None = None  # None: no MachineID
    misses: list[tuple[str, frozenset[str], str | None]] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)  # why each failing peer fails
    conflicts: list[tuple[str, str, str | None]] = field(default_factory=list)  # (unit, why, own)
    replacers: list[str] = field(default_factory=list)
    victims: list[str] = field(default_factory=list)


def explain(view: EngineView, name: str, *, revision: int = 0) -> Explanation:
    """Why unit `name` is (not) placed where it is, in the state the engine converges to. An
    inactive unit is explained as if it were started. NotFound if there is no such unit."""
    unit = view.units.get(name)
    if unit is None:
        raise NotFound(f"unit {name} does not exist")
    req = view.requirements.get(name, _NO_REQUIREMENTS)
    scheduled = view.schedule.get(name)
    work = copy_view(view)
    if unit.target_state == TargetState.INACTIVE:
        work.units[name] = dataclasses.replace(unit, target_state=TargetState.LAUNCHED)
    settled, pending = settle(work)
    hosts = _global_hosts(settled)
    on: dict[str, list[str]] = {m: [] for m in sorted(settled.machines)}
    for other, entry in settled.schedule.items():
        if other != name and entry.machine_id in on:
            on[entry.machine_id].append(other)
    for other, machines in hosts.items():
        if other != name:
            for machine_id in machines:
                on[machine_id].append(other)
    for units in on.values():
        units.sort()
    if req.is_global:
        return _explain_global(settled, unit, req, on, hosts.get(name, []), pending, revision)
    placed = settled.schedule.get(name)
    predicted = placed.machine_id if placed is not None else None
    placement = settled.placements.get(name)
    reason = placement.reason if placement is not None and placement.machine_id is None else ""
    evaluations = {
        m: _evaluate(name, req, settled, on[m], m, hosts) for m in sorted(settled.machines)
    }
    fits = tuple(
        MachineFit(m, len(on[m]), _checks(name, req, e), here=m == predicted)
        for m, e in evaluations.items()
    )
    fixes = () if predicted is not None else _fixes(name, req, settled, evaluations, on, hosts)
    now = scheduled.machine_id if scheduled is not None else None
    notes = _notes(unit, now, predicted, reason, fits, pending)
    return Explanation(
        name=name,
        desired_state=unit.target_state.value,
        is_global=False,
        machine_id=now,
        predicted=predicted,
        reason=reason,
        machines=fits,
        fixes=fixes,
        notes=notes,
        pending=pending,
        revision=revision,
    )


def _peer_hosts(settled: EngineView, hosts: Mapping[str, list[str]], peer: str) -> set[str] | None:
    if peer in hosts:
        return set(hosts[peer])
    entry = settled.schedule.get(peer)
    return {entry.machine_id} if entry is not None else None


def _evaluate(
    name: str,
    req: Requirements,
    settled: EngineView,
    here: list[str],
    machine_id: str,
    hosts: Mapping[str, list[str]],
) -> _Evaluation:
    machine = settled.machines[machine_id]
    e = _Evaluation(machine, here)
    if req.machine_id:
        e.machine_id_ok = machine.matches_id(req.machine_id)
    if req.metadata:
        e.misses = metadata_misses(req.metadata, machine.metadata_dict)
    for peer in req.machine_of:
        if peer == name:
            continue  # MachineOf itself holds anywhere (the scheduler drops it too)
        where = _peer_hosts(settled, hosts, peer)
        if where is None:
            state = settled.units.get(peer)
            if state is None:
                e.peers.append(f"peer {peer} does not exist")
            else:
                e.peers.append(f"peer {peer} is not scheduled")
        elif machine_id not in where:
            if peer in hosts:
                e.peers.append(f"peer {peer} (global) does not run here")
            else:
                e.peers.append(f"peer {peer} is on {sorted(where)[0]}")
    requirements = settled.requirements
    for other in here:
        theirs = requirements.get(other, _NO_REQUIREMENTS)
        why = conflict_between(name, req.conflicts, other, theirs.conflicts)
        if why is not None:
            own = next((p for p in req.conflicts if why == f"{name} conflicts with {p}"), None)
            e.conflicts.append((other, why, own))
        if other in hosts:
            continue  # a global unit neither replaces nor is replaced
        if matches_any(theirs.replaces, name) and not matches_any(req.replaces, other):
            e.replacers.append(other)
        elif matches_any(req.replaces, other) and not matches_any(theirs.replaces, name):
            e.victims.append(other)
    return e


def _describe_misses(misses: Sequence[tuple[str, frozenset[str], str | None]]) -> str:
    return " ".join(f"{key}={'|'.join(sorted(values))}" for key, values, _ in misses)


def _metadata_check(
    req: Requirements, misses: Sequence[tuple[str, frozenset[str], str | None]]
) -> Check:
    if not req.metadata:
        return Check("MachineMetadata", Result.NONE)
    if not misses:
        return Check("MachineMetadata", Result.PASS)
    parts = [
        f"{key}={'|'.join(sorted(values))} wanted, "
        + (f"has {key}={value}" if value is not None else f"has no {key}")
        for key, values, value in misses
    ]
    return Check("MachineMetadata", Result.FAIL, "; ".join(parts))


def _checks(name: str, req: Requirements, e: _Evaluation) -> tuple[Check, ...]:
    checks = []
    if e.machine_id_ok is None:
        checks.append(Check("MachineID", Result.NONE))
    elif e.machine_id_ok:
        checks.append(Check("MachineID", Result.PASS))
    else:
        checks.append(Check("MachineID", Result.FAIL, f"is not MachineID={req.machine_id}"))
    checks.append(_metadata_check(req, e.misses))
    peers = [p for p in req.machine_of if p != name]
    if not peers:
        checks.append(Check("MachineOf", Result.NONE))
    elif not e.peers:
        checks.append(Check("MachineOf", Result.PASS))
    else:
        checks.append(Check("MachineOf", Result.FAIL, "; ".join(e.peers)))
    if e.conflicts:
        detail = "; ".join(f"runs {other} ({why})" for other, why, _ in e.conflicts)
        checks.append(Check("Conflicts", Result.FAIL, detail))
    elif req.conflicts:
        checks.append(Check("Conflicts", Result.PASS))
    else:
        # Without Conflicts of its own, another unit's may still match it: checked all the same.
        checks.append(Check("Conflicts", Result.NONE))
    if e.replacers:
        detail = "; ".join(f"runs {other}, which replaces it" for other in e.replacers)
        checks.append(Check("Replaces", Result.FAIL, detail))
    elif e.victims:
        moved = ", ".join(e.victims)
        checks.append(Check("Replaces", Result.PASS, f"{moved} would have to move away"))
    elif req.replaces:
        checks.append(Check("Replaces", Result.PASS))
    else:
        checks.append(Check("Replaces", Result.NONE))
    return tuple(checks)


# Fix kinds, cheapest first at equal size. Adding a metadata key a machine lacks cannot break
# another unit's constraint; editing the unit touches only it; changing a machine's value may
# push out the units that need the old one; stopping a unit stops something that runs.
_ADD, _EDIT, _CHANGE, _STOP = 0, 1, 2, 3


@dataclass
class _Candidate:
    change: str
    changes: int
    kind: int
    machines: list[str] = field(default_factory=list)


def _fixes(
    name: str,
    req: Requirements,
    settled: EngineView,
    evaluations: Mapping[str, _Evaluation],
    on: Mapping[str, list[str]],
    hosts: Mapping[str, list[str]],
) -> tuple[Fix, ...]:
    """The changes that would make some machine pass every check, smallest first. A change
    named for machines applies to any one of them (fleetctl lists them after it)."""
    candidates: dict[tuple[str, int], _Candidate] = {}

    def offer(change: str, changes: int, kind: int, machine_id: str | None) -> None:
        found = candidates.setdefault((change, kind), _Candidate(change, changes, kind))
        if machine_id is not None:
            found.machines.append(machine_id)

    for machine_id, e in evaluations.items():
        if e.machine_id_ok is False or e.peers:
            continue  # pinned by the unit's own MachineID / MachineOf: no cluster change helps
        parts: list[str] = []
        kind = _ADD
        added = [m for m in e.misses if m[2] is None]
        changed = [m for m in e.misses if m[2] is not None]
        if added:
            parts.append(f"add metadata {_describe_misses(added)}")
        if changed:
            now = " ".join(f"{key}={value}" for key, _, value in changed)
            parts.append(f"change metadata to {_describe_misses(changed)} (now {now})")
            kind = _CHANGE
        blockers = list(dict.fromkeys([other for other, _, _ in e.conflicts] + e.replacers))
        if blockers:
            noun = "unit" if len(blockers) == 1 else "units"
            parts.append(f"destroy or stop the conflicting {noun} {', '.join(blockers)}")
            kind = _STOP
        if not parts:
            continue  # it fits: the scheduler's reason (a note) says what else held it back
        where = "one more machine" if not blockers else "its machine"
        change = " and ".join(parts)
        if e.misses:
            change += f" on {where}" if changed else f" to {where}"
        offer(change, len(e.misses) + len(blockers), kind, machine_id)
        own = {p for _, _, p in e.conflicts if p is not None}
        if own and not e.misses and not e.replacers and all(p for _, _, p in e.conflicts):
            patterns = " ".join(sorted(own))
            offer(f"remove Conflicts={patterns} from {name}", len(own), _EDIT, machine_id)
    if req.machine_id and not any(e.machine_id_ok for e in evaluations.values()):
        offer(
            f"MachineID={req.machine_id} names no registered machine: start fleetd there,"
            f" or change MachineID= in {name}",
            1,
            _EDIT,
            None,
        )
    for peer in req.machine_of:
        if peer == name or peer in settled.schedule or hosts.get(peer):
            continue
        if peer in settled.units:
            offer(f"get its MachineOf peer {peer} placed (fleetctl why {peer})", 1, _EDIT, None)
        else:
            offer(f"create and start its MachineOf peer {peer}", 1, _EDIT, None)

    def rank(c: _Candidate) -> tuple[int, int, int, int, str]:
        least = min((len(on[m]) for m in c.machines), default=0)
        first = min(c.machines, default="")
        return (c.changes, c.kind, -len(c.machines), least, first)

    ordered = sorted(candidates.values(), key=rank)[:MAX_FIXES]
    return tuple(
        Fix(c.change, tuple(sorted(c.machines, key=lambda m: (len(on[m]), m))), c.changes)
        for c in ordered
    )


def _global_names(view: EngineView) -> set[str]:
    return {n for n in view.units if _is_global(view, n)}


def _notes(
    unit: Unit,
    now: str | None,
    predicted: str | None,
    reason: str,
    fits: Sequence[MachineFit],
    pending: int,
) -> tuple[str, ...]:
    notes = []
    if unit.target_state == TargetState.INACTIVE:
        notes.append(
            f"its desired state is inactive: this is what `fleetctl start {unit.name}` would meet"
        )
    if pending:
        notes.append(
            f"the engine has {pending} writes still to make: this is the state it converges to"
        )
    if unit.target_state != TargetState.INACTIVE and now != predicted:
        if predicted is None:
            notes.append(f"the engine will take it off {now}")
        elif now is None:
            notes.append(f"the engine will place it on {predicted} (not done yet)")
        else:
            notes.append(f"the engine will move it from {now} to {predicted}")
    fitting = [f for f in fits if f.fits and not f.here]
    if predicted is not None:
        here = next((f for f in fits if f.here), None)
        lighter = [f for f in fitting if here is not None and f.load < here.load]
        if lighter:
            notes.append(
                f"{len(lighter)} other machines fit with fewer units: a placed unit stays"
                " where it is while its constraints hold (the engine does not rebalance)"
            )
    elif fitting:
        notes.append(
            f"{len(fitting)} machines pass every check, yet the scheduler did not place it: "
            + (reason or "see its reason")
        )
    return tuple(notes)


def _explain_global(
    settled: EngineView,
    unit: Unit,
    req: Requirements,
    on: Mapping[str, list[str]],
    hosts: Sequence[str],
    pending: int,
    revision: int,
) -> Explanation:
    """A global unit runs on every machine whose metadata it matches, unless a global unit
    that comes before it by name conflicts with it there (global units always win over
    non-global ones, which the scheduler moves away)."""
    name = unit.name
    globals_ = _global_names(settled)
    running = set(hosts)
    fits = []
    for machine_id, here in on.items():
        machine = settled.machines[machine_id]
        checks = [Check("MachineID", Result.NONE)]
        misses = metadata_misses(req.metadata, machine.metadata_dict)
        checks.append(_metadata_check(req, misses))
        checks.append(Check("MachineOf", Result.NONE))
        blocking = [
            (other, why)
            for other in here
            if other in globals_
            and other < name
            and (
                why := conflict_between(
                    name,
                    req.conflicts,
                    other,
                    settled.requirements.get(other, _NO_REQUIREMENTS).conflicts,
                )
            )
            is not None
        ]
        if blocking and not misses:
            detail = "; ".join(f"runs {other} ({why}), first by name" for other, why in blocking)
            checks.append(Check("Conflicts", Result.FAIL, detail))
        elif req.conflicts:
            checks.append(Check("Conflicts", Result.PASS))
        else:
            checks.append(Check("Conflicts", Result.NONE))
        checks.append(Check("Replaces", Result.NONE))
        fits.append(MachineFit(machine_id, len(here), tuple(checks), here=machine_id in running))
    notes = []
    if unit.target_state == TargetState.INACTIVE:
        notes.append(
            f"its desired state is inactive: this is what `fleetctl start {name}` would meet"
        )
    if pending:
        notes.append(
            f"the engine has {pending} writes still to make: this is the state it converges to"
        )
    fixes: tuple[Fix, ...] = ()
    reason = ""
    if not running:
        reason = _why_no_global_host(settled, name)
        if req.metadata and settled.machines:
            need = describe_metadata(req.metadata)
            candidates = sorted(on, key=lambda m: (len(on[m]), m))
            fixes = (Fix(f"add metadata {need} to one more machine", tuple(candidates), 1),)
    return Explanation(
        name=name,
        desired_state=unit.target_state.value,
        is_global=True,
        machine_id=None,
        predicted=None,
        reason=reason,
        machines=tuple(fits),
        fixes=fixes,
        notes=tuple(notes),
        pending=pending,
        revision=revision,
    )


# ---- JSON (the API's answers, fleetctl's -o json) -------------------------------------------


def prediction_to_api(p: Prediction) -> dict[str, Any]:
    return omit_empty(
        {
            "kill": list(p.kill),
            "drain": list(p.drain),
            "units": [
                omit_empty(
                    {
                        "name": u.name,
                        "action": u.action.value,
                        "from": u.before,
                        "to": u.after,
                        "reason": u.reason,
                    }
                )
                for u in p.units
            ],
            "globals": [
                omit_empty(
                    {
                        "name": g.name,
                        "machineID": g.machine_id,
                        "action": g.action,
                        "reason": g.reason,
                    }
                )
                for g in p.globals
            ],
            "summary": {
                **{a.value: p.count(a) for a in Action},
                "globalStart": sum(1 for g in p.globals if g.action == "start"),
                "globalStop": sum(1 for g in p.globals if g.action == "stop"),
            },
            "pending": p.pending,
            "revision": p.revision,
            "unplanned": list(p.unplanned),
        }
    )


def explanation_to_api(e: Explanation) -> dict[str, Any]:
    return omit_empty(
        {
            "name": e.name,
            "desiredState": e.desired_state,
            "global": e.is_global,
            "machineID": e.machine_id,
            "predictedMachineID": e.predicted,
            "reason": e.reason,
            "machines": [
                {
                    "id": m.machine_id,
                    "load": m.load,
                    "fits": m.fits,
                    "here": m.here,
                    "checks": [
                        omit_empty(
                            {
                                "constraint": c.constraint,
                                "result": c.result.value,
                                "detail": c.detail,
                            }
                        )
                        for c in m.checks
                    ],
                }
                for m in e.machines
            ],
            "fixes": [
                omit_empty({"change": f.change, "machines": list(f.machines), "changes": f.changes})
                for f in e.fixes
            ],
            "notes": list(e.notes),
            "pending": e.pending,
            "revision": e.revision,
        }
    )


class _Reader:
    """Typed access to a decoded JSON answer; InvalidInput names what is malformed."""

    def __init__(self, what: str) -> None:
        self.what = what

    def obj(self, value: Any, where: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise InvalidInput(f"{self.what}: {where} is not an object")
        return value

    def array(self, obj: Mapping[str, Any], key: str) -> list[Any]:
        value = obj.get(key, [])
        if not isinstance(value, list):
            raise InvalidInput(f"{self.what}: {key!r} is not an array")
        return value

    def text(self, obj: Mapping[str, Any], key: str, *, required: bool = False) -> str:
        value = obj.get(key, "")
        if not isinstance(value, str) or (required and not value):
            raise InvalidInput(f"{self.what}: {key!r} must be a non-empty string")
        return value

    def integer(self, obj: Mapping[str, Any], key: str) -> int:
        value = obj.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidInput(f"{self.what}: {key!r} must be an integer")
        return value

    def boolean(self, obj: Mapping[str, Any], key: str) -> bool:
        value = obj.get(key, False)
        if not isinstance(value, bool):
            raise InvalidInput(f"{self.what}: {key!r} must be a boolean")
        return value

    def choice(self, obj: Mapping[str, Any], key: str, kind: type[StrEnum]) -> Any:
        value = self.text(obj, key, required=True)
        try:
            return kind(value)
        except ValueError:
            raise InvalidInput(f"{self.what}: {key!r} has an unknown value {value!r}") from None


def prediction_from_api(obj: Any) -> Prediction:
    """A Prediction from `POST /fleet/v1/plan`'s answer (fleetctl's API driver)."""
    r = _Reader("plan answer")
    top = r.obj(obj, "the answer")
    units = []
    for item in r.array(top, "units"):
        u = r.obj(item, "a unit")
        units.append(
            UnitOutcome(
                r.text(u, "name", required=True),
                r.choice(u, "action", Action),
                r.text(u, "from") or None,
                r.text(u, "to") or None,
                r.text(u, "reason"),
            )
        )
    globals_ = []
    for item in r.array(top, "globals"):
        g = r.obj(item, "a global unit")
        action = r.text(g, "action", required=True)
        if action not in ("start", "stop"):
            raise InvalidInput(f"plan answer: unknown global action {action!r}")
        globals_.append(
            GlobalOutcome(
                r.text(g, "name", required=True),
                r.text(g, "machineID", required=True),
                action,
                r.text(g, "reason"),
            )
        )
    kill = [k for k in r.array(top, "kill") if isinstance(k, str)]
    drain = [k for k in r.array(top, "drain") if isinstance(k, str)]
    unplanned = [n for n in r.array(top, "unplanned") if isinstance(n, str)]
    return Prediction(
        kill=tuple(kill),
        drain=tuple(drain),
        units=tuple(units),
        globals=tuple(globals_),
        pending=r.integer(top, "pending"),
        revision=r.integer(top, "revision"),
        unplanned=tuple(unplanned),
    )


def explanation_from_api(obj: Any) -> Explanation:
    """An Explanation from `GET /fleet/v1/why/<unit>`'s answer (fleetctl's API driver)."""
    r = _Reader("why answer")
    top = r.obj(obj, "the answer")
    machines = []
    for item in r.array(top, "machines"):
        m = r.obj(item, "a machine")
        checks = []
        for entry in r.array(m, "checks"):
            c = r.obj(entry, "a check")
            checks.append(
                Check(
                    r.text(c, "constraint", required=True),
                    r.choice(c, "result", Result),
                    r.text(c, "detail"),
                )
            )
        machines.append(
            MachineFit(
                r.text(m, "id", required=True),
                r.integer(m, "load"),
                tuple(checks),
                r.boolean(m, "here"),
            )
        )
    fixes = []
    for item in r.array(top, "fixes"):
        f = r.obj(item, "a fix")
        listed = tuple(x for x in r.array(f, "machines") if isinstance(x, str))
        fixes.append(Fix(r.text(f, "change", required=True), listed, r.integer(f, "changes")))
    notes = tuple(n for n in r.array(top, "notes") if isinstance(n, str))
    return Explanation(
        name=r.text(top, "name", required=True),
        desired_state=r.text(top, "desiredState"),
        is_global=r.boolean(top, "global"),
        machine_id=r.text(top, "machineID") or None,
        predicted=r.text(top, "predictedMachineID") or None,
        reason=r.text(top, "reason"),
        machines=tuple(machines),
        fixes=tuple(fixes),
        notes=notes,
        pending=r.integer(top, "pending"),
        revision=r.integer(top, "revision"),
    )
