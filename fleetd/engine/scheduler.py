"""Where each unit runs: fleet's engine placement as one pure, deterministic function.

`plan_schedule` takes a snapshot (units, their [X-Fleet] requirements, the live machines and the
current schedule) and returns the schedule the cluster should have, with a reason for every unit
it cannot place and for every unit it takes off a machine. It does no I/O and reads no clock; the
engine (engine/plan.py) writes the difference with fenced etcd transactions.

The rules are fleet's (engine/reconciler.go, agent/state.go AbleToRun), made deterministic and
safer where fleet could churn or break a constraint:

* Keep: a scheduled unit stays while its machine lives and its constraints hold. Nothing is ever
  rebalanced, so a joining machine moves nothing and a lost machine moves only its own units.
* Place: least-loaded first, ties to the lowest machine id; MachineOf peers are placed before
  the units that follow them, then units go by name. Load counts the global units a machine runs.
* Replaces: as in fleet, a machine running a unit that the new unit replaces is a candidate like
  any other, in least-loaded order (the replaced unit counts in its load); when it is chosen, the
  new unit takes it and the replaced unit moves away. Safer than fleet: the replaced unit moves
  only to a machine that can run it (fleet did not check), and a machine whose replaced unit
  cannot move is passed over. Planning again on the result changes nothing.
* Cordoned machines (beyond fleet) keep their units and take no new one; the reason a unit
  cannot be placed names them. The non-global units of a draining machine (cordoned, with
  drain) are placed again elsewhere; one that no other machine can take stays where it is,
  and its reason says why (`SchedulePlan.stuck`).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from fleetd.feasibility import (
    MetadataRequirement,
    describe_metadata,
    global_units_for,
    is_literal,
    matches_any,
    metadata_ok,
)
from fleetd.model import Machine, Requirements, TargetState, Unit
from fleetd.unit.glob import glob_match

__all__ = ["SchedulePlan", "plan_schedule"]

_NO_REQUIREMENTS = Requirements()

_HeapEntry = tuple[int, str]  # (load, machine id)
# (requirements, declared Conflicts patterns matching the name, declared Replaces patterns ditto)
_Signature = tuple[Requirements, frozenset[str], frozenset[str]]


@dataclass(frozen=True)
class SchedulePlan:
    """The schedule the cluster should have, and why it differs from the current one."""

    # non-global unit -> machine id, for every non-inactive unit that some machine can run
    assignments: dict[str, str] = field(default_factory=dict)
    # non-global non-inactive unit -> why no machine can run it (fleetctl shows it)
    unplaced: dict[str, str] = field(default_factory=dict)
    # unit -> (old machine, new machine), for units that change machine
    moves: dict[str, tuple[str, str]] = field(default_factory=dict)
    # unit -> why it leaves its current machine, for every unit the engine unschedules
    reasons: dict[str, str] = field(default_factory=dict)
    # unit on a draining machine that no other machine can take -> why (it stays there)
    stuck: dict[str, str] = field(default_factory=dict)


def plan_schedule(
    units: Mapping[str, Unit],
    requirements: Mapping[str, Requirements],
    machines: Mapping[str, Machine],
    current: Mapping[str, str],
    *,
    cordoned: frozenset[str] = frozenset(),
    draining: frozenset[str] = frozenset(),
) -> SchedulePlan:
    """Plan where every non-global unit runs.

    `units` are all units (global ones included); `requirements` their parsed [X-Fleet] sections
    (a missing entry means no constraint); `machines` the registered machines by id; `current`
    maps each scheduled non-global unit to the machine it is scheduled on now. `cordoned`
    machines take no new unit; the units of `draining` ones (a subset) move where they can.
    """
    return _Planner(units, requirements, machines, current, cordoned | draining, draining).run()


# --- why a machine cannot take a unit ---------------------------------------------------------

# Rejection kinds, in the order a summary lists them, with their singular and plural phrases.
_PHRASES: dict[str, tuple[str, str]] = {
    "machine_id": ("is not MachineID={}", "are not MachineID={}"),
    "metadata": ("fails MachineMetadata {}", "fail MachineMetadata {}"),
    "peer": ("lacks MachineOf peer {}", "lack MachineOf peer {}"),
    "conflict": ("runs a conflicting unit ({})", "run a conflicting unit ({})"),
    "replaced": ("runs a unit that replaces it ({})", "run a unit that replaces it ({})"),
    "displace": ("would have to move {}", "would have to move {}"),
    "cordoned": ("is cordoned", "are cordoned"),
}
_KIND_ORDER = list(_PHRASES)


@dataclass(frozen=True, slots=True)
class _Rejection:
    kind: str
    detail: str
    # The detail is about the unit being placed ("<unit> conflicts with b*"): it is rendered
    # with that unit's name, so one rejection can explain every unit with the same signature.
    own: bool = False

    def text(self, unit: str) -> str:
        return f"{unit} {self.detail}" if self.own else self.detail

    def phrase(self, unit: str, count: int = 1) -> str:
        singular, plural = _PHRASES[self.kind]
        return (singular if count == 1 else plural).format(self.text(unit))


class _Tally:
    """How many machines rejected a unit for each kind of reason, with the first example."""

    def __init__(self) -> None:
        self.kinds: dict[str, tuple[int, str, _Rejection]] = {}
        self.cordoned: list[str] = []  # named in the summary: the operator may uncordon one

    def add(self, machine_id: str, rejection: _Rejection, count: int = 1) -> None:
        seen, first_machine, first = self.kinds.get(rejection.kind, (0, machine_id, rejection))
        self.kinds[rejection.kind] = (seen + count, first_machine, first)
        if rejection.kind == "cordoned":
            self.cordoned.append(machine_id)

    def summary(self, unit: str) -> str:
        """One line for fleetctl, e.g. "3 machines: 2 fail MachineMetadata region=east, ..."."""
        kinds = sorted(self.kinds, key=_KIND_ORDER.index)
        if len(kinds) == 1:
            return self._single(unit, *self.kinds[kinds[0]])
        total = sum(count for count, _, _ in self.kinds.values())
        parts = []
        for kind in kinds:
            count, _, rejection = self.kinds[kind]
            parts.append(f"{count} {rejection.phrase(unit, count)}{self._cordoned_list(kind)}")
        return f"no machine can run it ({total} machines): {', '.join(parts)}"

    def _cordoned_list(self, kind: str) -> str:
        if kind != "cordoned" or len(self.cordoned) < 2:
            return ""
        shown = ", ".join(sorted(self.cordoned)[:5])
        more = f" and {len(self.cordoned) - 5} more" if len(self.cordoned) > 5 else ""
        return f" ({shown}{more})"

    def _single(self, unit: str, count: int, machine_id: str, rejection: _Rejection) -> str:
        if count == 1:
            return f"machine {machine_id} {rejection.phrase(unit)}"
        if rejection.kind == "cordoned":
            return f"all {count} candidate machines are cordoned{self._cordoned_list('cordoned')}"
        if rejection.kind == "metadata":
            return f"no machine has metadata {rejection.detail} (machines: {count})"
        if rejection.kind == "conflict":
            detail = rejection.text(unit)
            return f"every candidate machine runs a conflicting unit ({detail})"
        return f"all {count} candidate machines {rejection.phrase(unit, count)}"


# --- the planner ------------------------------------------------------------------------------


def _placement_order(jobs: Sequence[str], requirements: Mapping[str, Requirements]) -> list[str]:
    """Units in placement order: MachineOf peers before their followers, otherwise by name.

    Units on a MachineOf cycle (fleet documents that it deadlocks) come last, by name; they can
    only stay where they already are together.
    """
    job_set = set(jobs)
    waiting = dict.fromkeys(jobs, 0)
    followers: dict[str, list[str]] = {name: [] for name in jobs}
    for name in jobs:
        for peer in set(requirements[name].machine_of):
            if peer in job_set:
                waiting[name] += 1
                followers[peer].append(name)
    ready = [name for name in jobs if waiting[name] == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        name = heapq.heappop(ready)
        order.append(name)
        for follower in followers[name]:
            waiting[follower] -= 1
            if waiting[follower] == 0:
                heapq.heappush(ready, follower)
    emitted = set(order)
    order.extend(name for name in sorted(jobs) if name not in emitted)
    return order


def _without_self_peer(name: str, req: Requirements) -> Requirements:
    # MachineOf=<itself> is trivially true; dropping it keeps every peer check simple.
    if name not in req.machine_of:
        return req
    return dataclasses.replace(req, machine_of=tuple(p for p in req.machine_of if p != name))


class _Planner:
    """Mutable working state of one plan_schedule call; never outlives it."""

    def __init__(
        self,
        units: Mapping[str, Unit],
        requirements: Mapping[str, Requirements],
        machines: Mapping[str, Machine],
        current: Mapping[str, str],
        cordoned: frozenset[str] = frozenset(),
        draining: frozenset[str] = frozenset(),
    ) -> None:
        self.units = units
        self.current = current
        self.cordoned = cordoned
        self.draining = draining
        self.drained_from: dict[str, str] = {}  # unit -> the draining machine it is leaving
        self.stuck: dict[str, str] = {}
        self.machines = {machine_id: machines[machine_id] for machine_id in sorted(machines)}
        self.requirements = {
            name: _without_self_peer(name, requirements.get(name, _NO_REQUIREMENTS))
            for name in sorted(units)
        }
        self.metadata = {m: machine.metadata_dict for m, machine in self.machines.items()}
        self.short_ids: dict[str, list[str]] = {}
        for machine_id in self.machines:
            self.short_ids.setdefault(machine_id[:8], []).append(machine_id)
        active = [n for n in self.requirements if units[n].target_state != TargetState.INACTIVE]
        self.globals = [n for n in active if self.requirements[n].is_global]
        self.global_names = set(self.globals)
        self.jobs = [n for n in active if not self.requirements[n].is_global]
        self.job_set = set(self.jobs)
        # unit -> units that name it in MachineOf (they must stay on its machine)
        self.followers: dict[str, list[str]] = {}
        for name in self.jobs:
            for peer in self.requirements[name].machine_of:
                self.followers.setdefault(peer, []).append(name)

        # Live placement state, changed only through _assign/_unassign/_add_to_machine.
        self.assignment: dict[str, str] = {}
        # Dicts used as insertion-ordered sets, so reasons never depend on hash order.
        self.units_on: dict[str, dict[str, None]] = {m: {} for m in self.machines}
        self.conflictors_on: dict[str, dict[str, tuple[str, ...]]] = {m: {} for m in self.machines}
        self.replacers_on: dict[str, dict[str, tuple[str, ...]]] = {m: {} for m in self.machines}
        self.load = dict.fromkeys(self.machines, 0)
        self.global_hosts: dict[str, list[str]] = {name: [] for name in self.globals}
        # One least-loaded heap per MachineMetadata requirement, built on first use.
        self.members: dict[MetadataRequirement, list[str]] = {}
        self.heaps: dict[MetadataRequirement, list[_HeapEntry]] = {}
        self.heaps_of: dict[str, list[list[_HeapEntry]]] = {m: [] for m in self.machines}

        # Every pattern any active unit declares, to compute _signature.
        active_reqs = [self.requirements[n] for n in (*self.globals, *self.jobs)]
        self.conflict_patterns = sorted({p for r in active_reqs for p in r.conflicts})
        self.replace_patterns = sorted({p for r in active_reqs for p in r.replaces})
        # Bumped by every placement change; failed scans are valid while it stays the same.
        self.version = 0
        self.failures: dict[_Signature, _Tally] = {}
        self.failures_version = -1

        self.left: dict[str, str] = {}  # unit -> why it left the machine `current` names
        self.unplaced: dict[str, str] = {}
        self.displaced = False

    def run(self) -> SchedulePlan:
        self._place_globals()
        self._keep_current()
        self._place_pending()
        self._keep_the_stuck()
        return self._result()

    # -- phase 0: global units ------------------------------------------------------------------

    def _place_globals(self) -> None:
        active = {name: self.requirements[name] for name in self.globals}
        for machine_id, machine in self.machines.items():
            for name in global_units_for(machine, active):
                self._add_to_machine(name, machine_id)
                self.global_hosts[name].append(machine_id)
            self.load[machine_id] = len(self.units_on[machine_id])

    # -- phase 1: keep what is scheduled and still valid ----------------------------------------

    def _keep_current(self) -> None:
        for name in sorted(self.current):
            machine_id = self.current[name]
            reason = self._keep_failure(name, machine_id)
            if reason is None and machine_id in self.draining:
                self.drained_from[name] = machine_id
                self.left[name] = f"machine {machine_id} is draining"
            elif reason is None:
                self._assign(name, machine_id)
            else:
                self.left[name] = reason
        self._evict_replaced()
        # Drop units whose peers already left before resolving conflicts, so a unit that is
        # leaving anyway does not push out the unit it conflicts with.
        self._evict_missing_peers()
        self._evict_conflicts()
        self._evict_missing_peers()

    def _keep_failure(self, name: str, machine_id: str) -> str | None:
        unit = self.units.get(name)
        if unit is None:
            return "unit no longer exists"
        if unit.target_state == TargetState.INACTIVE:
            return "target state inactive"
        if self.requirements[name].is_global:
            return "unit is global"
        if machine_id not in self.machines:
            return f"machine {machine_id} went away"
        rejection = self._static_rejection(self.requirements[name], machine_id)
        if rejection is None:
            return None
        if rejection.kind == "machine_id":
            return f"constraint no longer holds: MachineID={rejection.detail}"
        return f"constraint no longer holds: MachineMetadata {rejection.detail}"

    def _evict_replaced(self) -> None:
        victims = {}
        for name, machine_id in self.assignment.items():
            replacer = self._replacer_on(name, self.requirements[name].replaces, machine_id)
            if replacer is not None:
                victims[name] = replacer
        for name in sorted(victims):
            self._unassign(name)
            self.left[name] = f"replaced by {victims[name]}"

    def _evict_missing_peers(self) -> None:
        queue = deque(sorted(n for n in self.assignment if self.requirements[n].machine_of))
        while queue:
            name = queue.popleft()
            machine_id = self.assignment.get(name)
            if machine_id is None:
                continue
            here = self.units_on[machine_id]
            missing = next((p for p in self.requirements[name].machine_of if p not in here), None)
            if missing is None:
                continue
            self._unassign(name)
            self.left[name] = (
                f"constraint no longer holds: MachineOf peer {missing} is not on machine "
                f"{machine_id}"
            )
            queue.extend(f for f in self.followers.get(name, ()) if f in self.assignment)

    def _evict_conflicts(self) -> None:
        for machine_id, conflictors in self.conflictors_on.items():
            # Every conflicting pair has a unit whose own patterns match the other, so checking
            # the units that declare Conflicts finds them all; usually there is none.
            if any(self._conflict_on(n, p, machine_id) for n, p in conflictors.items()):
                self._resolve_conflicts(machine_id)

    def _resolve_conflicts(self, machine_id: str) -> None:
        """Keep conflicting units by name (first wins); global units always win."""
        kept = sorted(n for n in self.units_on[machine_id] if n not in self.global_names)
        for name in kept:
            self._unassign(name)
        for name in kept:
            found = self._conflict_on(name, self.requirements[name].conflicts, machine_id)
            if found is None:
                self._assign(name, machine_id)
            else:
                other, rejection = found
                detail = rejection.text(name)
                self.left[name] = f"constraint no longer holds: conflicts with {other} ({detail})"

    # -- phase 3: a draining machine keeps what no other machine can take ------------------------

    def _keep_the_stuck(self) -> None:
        for name in sorted(self.drained_from):
            if name in self.assignment:
                continue
            origin = self.drained_from[name]
            why = self.unplaced.pop(name, "no other machine can run it")
            # It ran there until now, and a cordoned machine took no new unit meanwhile.
            self._assign(name, origin)
            self.left.pop(name, None)
            self.stuck[name] = why

    # -- phase 2: place everything else ---------------------------------------------------------

    def _place_pending(self) -> None:
        order = _placement_order(self.jobs, self.requirements)
        pending = [name for name in order if name not in self.assignment]
        while pending:
            self.displaced = False
            failed = []
            for name in pending:
                reason = self._place(name)
                if reason is None:
                    self.unplaced.pop(name, None)
                else:
                    self.unplaced[name] = reason
                    failed.append(name)
            # Moving a displaced unit frees room a unit that failed earlier may fit into; retry
            # so the plan is a fixpoint. Each round that moves something also places a unit.
            if not self.displaced:
                break
            pending = failed

    def _place(self, name: str) -> str | None:
        """Assign `name` to a machine; return None, or why no machine can run it."""
        if not self.machines:
            return "no machines registered"
        req = self.requirements[name]
        if req.machine_id:
            return self._place_by_machine_id(name, req)
        if req.machine_of:
            return self._place_with_peers(name, req)
        return self._place_least_loaded(name, req)

    def _place_by_machine_id(self, name: str, req: Requirements) -> str | None:
        wanted = req.machine_id or ""
        # Direct lookups: the full id, or (as fleet's MatchID allows) the 8-char short id.
        candidates = [wanted] if wanted in self.machines else []
        if len(wanted) == 8:
            candidates += [m for m in self.short_ids.get(wanted, ()) if m != wanted]
        if not candidates:
            return f"MachineID={wanted} is not a registered machine"
        tally = self._try_in_order(name, req, candidates)
        return None if tally is None else f"MachineID={wanted}: {tally.summary(name)}"

    def _place_with_peers(self, name: str, req: Requirements) -> str | None:
        hosts, why = self._peer_hosts(name, req)
        if why is not None:
            return why
        tally = self._try_in_order(name, req, hosts)
        return (
            None
            if tally is None
            else f"MachineOf {' '.join(req.machine_of)}: {tally.summary(name)}"
        )

    def _place_least_loaded(self, name: str, req: Requirements) -> str | None:
        members = self._members(req.metadata)
        if not members:
            described = describe_metadata(req.metadata)
            return f"no machine has metadata {described} (machines: {len(self.machines)})"
        # A unit that fails leaves the state as it was, so the next unit with the same
        # signature fails the same way: reuse the verdict instead of scanning every machine
        # again (1,000 unplaceable instances of a template would otherwise cost seconds).
        signature = self._signature(name, req) if self.version == self.failures_version else None
        tally = self.failures.get(signature) if signature is not None else None
        if tally is None:
            tally = self._scan_heap(name, req)
            if tally is None:
                return None
            self._count_metadata_failures(tally, req, members)
            if self.version != self.failures_version:
                self.failures = {}
                self.failures_version = self.version
            self.failures[signature or self._signature(name, req)] = tally
        return tally.summary(name)

    def _count_metadata_failures(
        self, tally: _Tally, req: Requirements, members: list[str]
    ) -> None:
        outside = len(self.machines) - len(members)
        if outside:
            inside = set(members)
            first = next(m for m in self.machines if m not in inside)
            tally.add(first, _Rejection("metadata", describe_metadata(req.metadata)), outside)

    def _signature(self, name: str, req: Requirements) -> _Signature:
        """What decides, on an unchanged state, whether a unit without MachineID or MachineOf
        fits a machine: its requirements, and which declared patterns match its name."""
        conflicts = frozenset(p for p in self.conflict_patterns if glob_match(p, name))
        replaces = frozenset(p for p in self.replace_patterns if glob_match(p, name))
        return req, conflicts, replaces

    def _try_in_order(
        self, name: str, req: Requirements, candidates: Iterable[str]
    ) -> _Tally | None:
        """Place on the least-loaded candidate that can run the unit; None once placed."""
        tally = _Tally()
        for machine_id in sorted(candidates, key=lambda m: (self.load[m], m)):
            rejection = self._able_to_take(name, req, machine_id)
            if rejection is not None:
                tally.add(machine_id, rejection)
            else:
                self._assign(name, machine_id)
                return None
        return tally

    def _scan_heap(self, name: str, req: Requirements) -> _Tally | None:
        """_try_in_order over the machines matching the unit's metadata, popped lazily.

        Entries are (load, machine id); an entry whose load is out of date is dropped (every load
        change pushes a fresh one), and the machines looked at are pushed back afterwards.
        """
        heap = self._heap(req.metadata)
        tally = _Tally()
        looked_at: list[_HeapEntry] = []
        seen: set[str] = set()
        chosen = None
        while heap:
            entry = heapq.heappop(heap)
            load, machine_id = entry
            if load != self.load[machine_id] or machine_id in seen:
                continue
            seen.add(machine_id)
            looked_at.append(entry)
            # A displacement changes loads mid-scan: it pushes fresh entries, and `seen` skips
            # the machines already looked at; a failed one is undone and leaves loads as they were.
            rejection = self._able_to_take(name, req, machine_id)
            if rejection is not None:
                tally.add(machine_id, rejection)
            else:
                chosen = machine_id
                break
        for entry in looked_at:
            heapq.heappush(heap, entry)
        if chosen is not None:
            self._assign(name, chosen)
            return None
        return tally

    def _able_to_take(self, name: str, req: Requirements, machine_id: str) -> _Rejection | None:
        """Why the machine cannot take the unit, or None once it can (its replaced units moved).

        fleet's AbleToRun answers "reschedule", not "unschedule", for a machine running a unit
        that the new one replaces, so its scheduler treats that machine as free, in load order,
        and its reconciler then moves the replaced unit away. Here the move is part of the plan,
        and happens only if every replaced unit there has another machine that can run it.
        """
        rejection = self._rejection(name, req, machine_id)
        if rejection is None and self._victims(name, req, machine_id):
            return self._displace(name, req, machine_id)
        return rejection

    def _displace(self, name: str, req: Requirements, machine_id: str) -> _Rejection | None:
        """Move the units `name` replaces off `machine_id`, all or none."""
        moved: list[str] = []
        for victim in self._victims(name, req, machine_id):
            why = self._pinned(name, req, victim, machine_id)
            home = None if why else self._new_home(victim, machine_id)
            if home is None:
                for done in reversed(moved):
                    self._unassign(done)
                    self._assign(done, machine_id)
                return _Rejection("displace", f"{victim} ({why or 'no other machine can run it'})")
            self._unassign(victim)
            self._assign(victim, home)
            moved.append(victim)
        for victim in moved:
            self.left.setdefault(victim, f"replaced by {name}")
        self.displaced = True
        return None

    def _pinned(self, name: str, req: Requirements, victim: str, machine_id: str) -> str | None:
        """Why `victim` cannot leave `machine_id`, if it cannot."""
        victim_req = self.requirements[victim]
        if victim in req.machine_of:
            return f"it is a MachineOf peer of {name}"
        if victim_req.machine_id:
            return f"it has MachineID={victim_req.machine_id}"
        if victim_req.machine_of:
            return f"it is MachineOf {' '.join(victim_req.machine_of)}"
        followers = [
            f for f in self.followers.get(victim, ()) if self.assignment.get(f) == machine_id
        ]
        if followers:
            return f"{followers[0]} is MachineOf it"
        return None

    def _new_home(self, victim: str, leaving: str) -> str | None:
        """The least-loaded other machine that can run `victim` without displacing anything."""
        req = self.requirements[victim]
        for machine_id in sorted(self._members(req.metadata), key=lambda m: (self.load[m], m)):
            if machine_id == leaving:
                continue
            if self._rejection(victim, req, machine_id) is None and not self._victims(
                victim, req, machine_id
            ):
                return machine_id
        return None

    # -- AbleToRun -------------------------------------------------------------------------------

    def _static_rejection(self, req: Requirements, machine_id: str) -> _Rejection | None:
        if req.machine_id and not self.machines[machine_id].matches_id(req.machine_id):
            return _Rejection("machine_id", req.machine_id)
        if req.metadata and not metadata_ok(req.metadata, self.metadata[machine_id]):
            return _Rejection("metadata", describe_metadata(req.metadata))
        return None

    def _rejection(self, name: str, req: Requirements, machine_id: str) -> _Rejection | None:
        """fleet's AbleToRun, minus Replaces (see _victims): why the machine cannot run it."""
        static = self._static_rejection(req, machine_id)
        if static is not None:
            return static
        if machine_id in self.cordoned:
            return _Rejection("cordoned", machine_id)
        here = self.units_on[machine_id]
        for peer in req.machine_of:
            if peer not in here:
                return _Rejection("peer", peer)
        found = self._conflict_on(name, req.conflicts, machine_id)
        if found is not None:
            return found[1]
        replacer = self._replacer_on(name, req.replaces, machine_id)
        if replacer is not None:
            return _Rejection("replaced", replacer)
        return None

    def _conflict_on(
        self, name: str, conflicts: Sequence[str], machine_id: str
    ) -> tuple[str, _Rejection] | None:
        """(unit on the machine, why) for the first unit there that conflicts with `name`."""
        here = self.units_on[machine_id]
        for pattern in conflicts:
            if is_literal(pattern):
                if pattern != name and pattern in here:
                    return pattern, _Rejection("conflict", f"conflicts with {pattern}", own=True)
                continue
            for other in here:
                if other != name and glob_match(pattern, other):
                    return other, _Rejection("conflict", f"conflicts with {pattern}", own=True)
        # Only units that declare Conflicts can match our name; they are indexed apart.
        for other, theirs in self.conflictors_on[machine_id].items():
            if other == name:
                continue
            for pattern in theirs:
                if glob_match(pattern, name):
                    return other, _Rejection("conflict", f"{other} conflicts with {pattern}")
        return None

    def _replacer_on(self, name: str, replaces: Sequence[str], machine_id: str) -> str | None:
        """A unit on the machine that replaces `name` (one direction only; a cycle is ignored)."""
        for other, theirs in self.replacers_on[machine_id].items():
            if other != name and matches_any(theirs, name) and not matches_any(replaces, other):
                return other
        return None

    def _victims(self, name: str, req: Requirements, machine_id: str) -> list[str]:
        """Non-global units on the machine that `name` replaces (one direction only)."""
        if not req.replaces:
            return []
        return [
            other
            for other in self.units_on[machine_id]
            if other != name
            and other not in self.global_names
            and matches_any(req.replaces, other)
            and not matches_any(self.requirements[other].replaces, name)
        ]

    # -- MachineOf -------------------------------------------------------------------------------

    def _peer_hosts(self, name: str, req: Requirements) -> tuple[list[str], str | None]:
        """Machines that run every MachineOf peer, or why there is none."""
        hosts: set[str] | None = None
        where = []
        for peer in req.machine_of:
            if peer in self.global_hosts:
                peer_hosts = set(self.global_hosts[peer])
                if not peer_hosts:
                    return [], f"MachineOf peer {peer} is not scheduled (global, on no machine)"
                where.append(f"{peer} on {len(peer_hosts)} machines (global)")
            elif peer in self.assignment:
                peer_hosts = {self.assignment[peer]}
                where.append(f"{peer} on {self.assignment[peer]}")
            else:
                return [], self._peer_missing(name, peer)
            hosts = peer_hosts if hosts is None else hosts & peer_hosts
        if not hosts:
            return [], f"MachineOf peers are not on one machine: {', '.join(where)}"
        return sorted(hosts), None

    def _peer_missing(self, name: str, peer: str) -> str:
        unit = self.units.get(peer)
        if unit is None:
            return f"MachineOf peer {peer} is not scheduled (no such unit)"
        if unit.target_state == TargetState.INACTIVE:
            return f"MachineOf peer {peer} is not scheduled (target state inactive)"
        cycle = self._cycle_through(name)
        if cycle is not None:
            return f"MachineOf cycle {' -> '.join(cycle)} cannot be scheduled"
        return f"MachineOf peer {peer} is not scheduled"

    def _cycle_through(self, name: str) -> list[str] | None:
        """A MachineOf path from `name` back to itself, if there is one."""
        parents: dict[str, str] = {}
        stack = [name]
        while stack:
            here = stack.pop()
            for peer in self.requirements[here].machine_of:
                if peer == name:
                    path = [here]
                    while path[-1] != name:
                        path.append(parents[path[-1]])
                    return [*reversed(path), name]
                if peer in self.job_set and peer not in parents:
                    parents[peer] = here
                    stack.append(peer)
        return None

    # -- state changes ---------------------------------------------------------------------------

    def _assign(self, name: str, machine_id: str) -> None:
        self.version += 1
        self.assignment[name] = machine_id
        self._add_to_machine(name, machine_id)
        self._set_load(machine_id, self.load[machine_id] + 1)

    def _unassign(self, name: str) -> None:
        self.version += 1
        machine_id = self.assignment.pop(name)
        del self.units_on[machine_id][name]
        self.conflictors_on[machine_id].pop(name, None)
        self.replacers_on[machine_id].pop(name, None)
        self._set_load(machine_id, self.load[machine_id] - 1)

    def _add_to_machine(self, name: str, machine_id: str) -> None:
        req = self.requirements[name]
        self.units_on[machine_id][name] = None
        if req.conflicts:
            self.conflictors_on[machine_id][name] = req.conflicts
        if req.replaces and not req.is_global:
            self.replacers_on[machine_id][name] = req.replaces

    def _set_load(self, machine_id: str, load: int) -> None:
        self.load[machine_id] = load
        for heap in self.heaps_of[machine_id]:
            heapq.heappush(heap, (load, machine_id))

    def _members(self, metadata: MetadataRequirement) -> list[str]:
        """Machines (by id) whose metadata satisfies a MachineMetadata requirement."""
        members = self.members.get(metadata)
        if members is None:
            members = [m for m in self.machines if metadata_ok(metadata, self.metadata[m])]
            self.members[metadata] = members
        return members

    def _heap(self, metadata: MetadataRequirement) -> list[_HeapEntry]:
        heap = self.heaps.get(metadata)
        if heap is None:
            members = self._members(metadata)
            heap = [(self.load[m], m) for m in members]
            heapq.heapify(heap)
            self.heaps[metadata] = heap
            for machine_id in members:
                self.heaps_of[machine_id].append(heap)
        return heap

    # -- result ----------------------------------------------------------------------------------

    def _result(self) -> SchedulePlan:
        moves: dict[str, tuple[str, str]] = {}
        reasons: dict[str, str] = {}
        for name, old in sorted(self.current.items()):
            new = self.assignment.get(name)
            if new == old:
                continue
            reasons[name] = self.left.get(name, "unscheduled")
            if new is not None:
                moves[name] = (old, new)
        return SchedulePlan(
            assignments=dict(sorted(self.assignment.items())),
            unplaced=dict(sorted(self.unplaced.items())),
            moves=moves,
            reasons=reasons,
            stuck=dict(sorted(self.stuck.items())),
        )
