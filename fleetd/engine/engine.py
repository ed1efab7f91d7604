"""The engine: leader election, then a watch-driven loop around the pure planner.

Every fleetd runs one (unless disable_engine); one leads at a time. The leader key lives on the
machine's lease, so a dead leader is replaced as soon as its lease expires, and every write is
fenced on that key's create revision, so a deposed leader cannot place anything.

Loop shape: read a snapshot once, then keep it current from watches on units/, machines/ and
machine-meta/; after each burst of events, plan and apply. The idle timer plans only if the
view changed since the last plan (a pure planner on an unchanged, applied view writes
nothing), and reads nothing from etcd, so an idle cluster costs only keepalives, in etcd and
in CPU.

Grace: an etcd-side fault is not a machine failure. When etcd stalls past agent_ttl it expires
every lease at once as it resumes; every machine then re-registers within a second, units
still running. So for one `grace` (agent_ttl) after etcd answers well again (as this fleetd's
presence sees it, and after this fleetd's own start, when it cannot know), after an etcd leader
election (seen in the raft term of etcd's answers), and after losing more than half the
machines at once (Kubernetes' node controller stops evicting then too), the
engine holds the units of absent machines where they are (engineplan.plan's `held`). A
machine that dies while etcd is healthy is not held: its units move as soon as its lease ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from fleetd.engine import plan as engineplan
from fleetd.engine.plan import RUNNING_STATES, EngineView, Write
from fleetd.errors import (
    Compacted,
    ConfigError,
    FleetError,
    LeaseNotFound,
    NotLeader,
    RegistryUnavailable,
)
from fleetd.model import PartitionPolicy, Placement, ScheduledUnit, Unit, UnitState
from fleetd.registry import gc
from fleetd.registry.kv import EventType, Op, WatchEvent
from fleetd.registry.migrations import SCHEMA_VERSION, SchemaTooNew, migrate
from fleetd.registry.mirror import (
    Change,
    CordonChange,
    LeaderChange,
    MachineChange,
    MetaChange,
    Topic,
    UnitChange,
)
from fleetd.registry.registry import LeaderToken, Registry
from fleetd.watching import Backoff, sleep_or_stop

log = structlog.get_logger("fleetd.engine")

# How long to keep collecting watch events before planning: one plan per burst, not per event.
# The window grows to the time the last plan took (up to MAX_BATCH_WINDOW): every plan looks at
# every unit, so under a stream of submissions (10,000 units arriving over seconds) planning
# then costs at most about half the engine's time instead of one full plan per few events.
BATCH_WINDOW = 0.005
# While a drain moves units, how often the engine looks whether their new copies are active
# (it does not watch states/): the old copy stops about this long after the new one is up.
HANDOFF_POLL = 0.5
# Above this many PartitionPolicy=stop units to check before placing them elsewhere, one range
# of states/ replaces a read per unit.
STATE_READS_PER_UNIT = 8
MAX_BATCH_WINDOW = 0.25


@dataclass
class EngineStats:
    plans: int = 0
    writes: int = 0
    last_plan_seconds: float = 0.0
    grace_holds: int = 0  # plans that held absent machines' units (etcd-side fault)


class Engine:
    def __init__(
        self,
        registry: Registry,
        machine_id: str,
        lease: Callable[[], Awaitable[int]],
        *,
        safety_interval: float = 30.0,
        grace: float = 0.0,
        settled_since: Callable[[], float | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`grace` (agent_ttl) and `settled_since` (presence's view of etcd's health: since
        when etcd answers well, None while it does not) enable the grace after etcd-side
        faults; without them absent machines' units move at once, as in fleet."""
        self.registry = registry
        # What others write that the engine plans from: the units, the machines and their
        # metadata, and the leader key (to stop at once when the lead is lost). Its own
        # projections (schedule, globals, placements) it reads when it takes the lead.
        self.mirror = registry.mirror(
            [Topic.UNITS, Topic.MACHINES, Topic.META, Topic.CORDONS, Topic.LEADER],
            check_names=True,
        )
        self.machine_id = machine_id
        self._lease = lease  # waits for, then returns, the machine's current lease
        self.safety_interval = safety_interval
        self.view = EngineView()
        self.stats = EngineStats()
        # Told each plan's duration (the metrics' histogram), the engine knowing nothing of them.
        self.plan_observers: list[Callable[[float], None]] = []
        self.token: LeaderToken | None = None
        # Requirements depend on the body (by hash) and the name (specifiers).
        # Set by watch events, resolved (with etcd reads) just before the next plan.
        self._needs_body: set[str] = set()
        self._machines_dirty = False
        # Drains: PartitionPolicy=stop units waiting for their old copy to stop (engine/plan.py),
        # and schedule entries a new leader found beyond a handoff's two (deleted at once).
        self._stop_waits = False
        self._held_stop: set[str] = set()  # those units, by name
        self._drain_seen: object = None  # what a drain waited on at the last poll
        self._extra: list[ScheduledUnit] = []
        # Whether the view changed since the last plan. Planning is pure and idempotent on the
        # applied result, so re-planning an unchanged view can write nothing: the idle safety
        # pass skips it (a full plan of 10,000 units on 1,000 machines costs ~1 s of CPU).
        self._changed = True
        self.grace = grace
        self._settled_since = settled_since
        self.clock = clock
        self._grace_until = 0.0  # the engine's own reasons: etcd errors, mass machine loss
        self._holding: frozenset[str] = frozenset()  # machines the last plan held
        self._planned_machines: frozenset[str] = frozenset()
        self._raft_term = 0  # etcd's raft term when last planned
        # Body sweeps (gc.py): due since (None: not due), and the last unit destroy/replace.
        self._sweep_due_since: float | None = None
        self._last_churn = float("-inf")

    @property
    def is_leader(self) -> bool:
        return self.token is not None

    @property
    def holding(self) -> frozenset[str]:
        """Absent machines whose units the last plan held (the grace is on)."""
        return self._holding

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        while not stop.is_set():
            try:
                lease = await self._lease()
                token = await self.registry.campaign(self.machine_id, lease)
                backoff.reset()  # etcd answered
                if token is None:
                    await self._follow(stop)
                else:
                    self.token = token
                    log.info("engine_leadership_acquired", machine=self.machine_id)
                    await self._lead(token, stop)
            except SchemaTooNew as e:
                # A newer release's layout: give the lead up at once (another machine may run
                # that release) and let fleetd stop on it, rather than hold the key until the
                # lease expires.
                log.error("schema_too_new", error=str(e))
                if self.token is not None:
                    with contextlib.suppress(FleetError):
                        await self.registry.resign(self.token)
                raise
            except (NotLeader, LeaseNotFound) as e:
                # LeaseNotFound: etcd expired our lease (and with it the lead) before presence
                # noticed; campaign again once presence has registered a new one.
                log.warning("engine_leadership_lost", reason=str(e))
                await sleep_or_stop(stop, backoff.next())
            except ConfigError:
                raise  # etcd refused our credentials: fleetd stops with the reason
            except (RegistryUnavailable, Compacted) as e:
                if isinstance(e, RegistryUnavailable):
                    self._extend_grace()
                wait = backoff.next()
                log.warning("engine_registry_error", error=str(e), retry_in=wait)
                await sleep_or_stop(stop, wait)
            except FleetError as e:
                # Any other error etcd answered (a refused request, a value we cannot read):
                # never fatal to fleetd; retry from a fresh snapshot.
                wait = backoff.next()
                log.error("engine_error", error=str(e), retry_in=wait)
                await sleep_or_stop(stop, wait)
            finally:
                if self.token is not None and stop.is_set():
                    with contextlib.suppress(FleetError):
                        await self.registry.resign(self.token)
                        log.info("engine_leadership_released", machine=self.machine_id)
                self.token = None

    async def _follow(self, stop: asyncio.Event) -> None:
        """Wait until the leader key goes away (or stop), then campaign again."""
        kv = await self.registry.leader_record()
        if kv is None:
            return
        log.debug("engine_leader_is", leader=kv.value)
        events = self.registry.watch_leader(kv.mod_revision + 1)
        async with contextlib.aclosing(events):
            stop_task = asyncio.ensure_future(stop.wait())
            try:
                async for batch in _until(events, stop_task):
                    if any(e.type == EventType.DELETE for e in batch):
                        return
            finally:
                stop_task.cancel()

    async def _lead(self, token: LeaderToken, stop: asyncio.Event) -> None:
        # The leader, and only it, moves an older layout forward (migrations.py).
        # A step waits while a machine runs an older release; machine changes retry it.
        schema = await self.registry.ensure_schema()
        if schema < SCHEMA_VERSION:
            schema = await migrate(self.registry, schema)
        revision = await self._load()
        await self._plan_and_apply(token)

        async def plan() -> None:
            nonlocal schema
            if self._changed and schema < SCHEMA_VERSION:
                schema = await migrate(self.registry, schema)
            # While a drain waits (on states the engine does not watch), each poll plans only
            # when one of them changed since the last plan: a full plan of 10,000 units costs
            # about a second, and a drain may wait long (a new copy that fails to start).
            # The look is taken before the plan reads them, so a change after it shows.
            polled = False
            if self._drain_moving():
                seen = await self._drain_snapshot()
                polled, self._drain_seen = seen != self._drain_seen, seen
            if self._changed or polled or (self._holding and not self._in_grace()):
                await self._plan_and_apply(token)
            await self._sweep_bodies()

        await self.mirror.follow(
            revision + 1,
            stop,
            on_change=self._on_change,
            act=plan,
            idle_interval=self._idle_interval,  # the safety pass reads nothing from etcd
            batch_window=self._batch_window,
        )

    def _body_churn(self) -> None:
        """A unit was destroyed or given another body: a body may have lost its last user."""
        now = self.clock()
        if self._sweep_due_since is None:
            self._sweep_due_since = now
        self._last_churn = now

    def _sweep_at(self) -> float | None:
        """When the next body sweep is due (engine clock), None if none is."""
        if self._sweep_due_since is None:
            return None
        return min(self._last_churn + gc.SWEEP_QUIET, self._sweep_due_since + gc.SWEEP_INTERVAL)

    async def _sweep_bodies(self) -> None:
        """Delete the unit bodies no unit names any more, when a sweep is due (gc.py: at
        taking the lead, then after churn). Each delete is guarded on its own: no fence."""
        at = self._sweep_at()
        if at is None or self.clock() < at:
            return
        self._sweep_due_since = None
        try:
            await gc.sweep_orphaned_bodies(self.registry)
        except FleetError as e:  # the next sweep retries; planning must not wait on it
            log.warning("body_sweep_failed", error=str(e))
            self._body_churn()

    # ---- grace after etcd-side faults ---------------------------------------------------

    def _extend_grace(self) -> None:
        if self.grace > 0:
            self._grace_until = max(self._grace_until, self.clock() + self.grace)

    def grace_ends(self) -> float | None:
        """Clock time the current grace ends (0 with the grace off); None while etcd is in
        trouble as presence sees it: the grace then ends one agent_ttl after it recovers."""
        if self.grace <= 0:
            return 0.0
        settled = self._settled_since() if self._settled_since is not None else 0.0
        if settled is None:
            return None
        return max(self._grace_until, settled + self.grace)

    def _in_grace(self) -> bool:
        ends = self.grace_ends()
        return ends is None or self.clock() < ends

    def _idle_interval(self) -> float:
        """The safety pass's period; shorter to end a grace or run a body sweep on time."""
        wait = self.safety_interval
        if self._drain_moving():
            # A drain in progress: its new copies publish states the engine does not watch.
            wait = min(wait, HANDOFF_POLL)
        now = self.clock()
        sweep = self._sweep_at()
        if sweep is not None:
            wait = min(wait, max(0.05, sweep - now + 0.01))
        if self._holding:
            ends = self.grace_ends()
            wait = min(wait, 1.0 if ends is None else max(0.05, ends - now + 0.01))
        return wait

    def _held(self, view: EngineView) -> frozenset[str]:
        """Absent machines whose units stay put, because the grace is on."""
        if self.grace <= 0:
            return frozenset()
        term = self.registry.raft_term
        if self._raft_term and term > self._raft_term:
            # An etcd leader election: leases are least trustworthy around one (a leader
            # resuming from a stall may revoke leases the new one renewed: etcd #15247).
            # The revoke's DELETE arrives in a watch answer of the new term, so this check,
            # made when planning on that event, always comes first.
            log.warning("etcd_leader_changed", raft_term=term, was=self._raft_term)
            self._extend_grace()
        self._raft_term = max(self._raft_term, term)
        present = frozenset(view.machines)
        before = self._planned_machines
        self._planned_machines = present
        lost = before - present
        if len(lost) >= 2 and 2 * len(lost) > len(before):
            # Most machines gone at once: far likelier a fault between them and etcd than
            # that many machines dying together.
            log.warning("engine_mass_machine_loss", lost=len(lost), of=len(before))
            self._extend_grace()
        absent = engineplan.held_machines(view)
        if not absent or not self._in_grace():
            return frozenset()
        return absent

    def _batch_window(self) -> float:
        return min(max(BATCH_WINDOW, self.stats.last_plan_seconds), MAX_BATCH_WINDOW)

    def _on_change(self, change: Change) -> None:
        if isinstance(change, LeaderChange):
            if change.machine_id != self.machine_id:
                raise NotLeader("leader key changed")
            return
        self._changed = True
        if isinstance(change, UnitChange):
            unit, before = change.unit, change.before
            if unit is None or (before is not None and before.hash != unit.hash):
                self._body_churn()
            if unit is not None:
                self._needs_body.add(change.name)
        elif isinstance(change, CordonChange):
            pass  # the mirror's cordons are the view's
        elif isinstance(change, MachineChange | MetaChange):
            # Merged into the view's machines (with their metadata) before the next plan.
            self._machines_dirty = True

    async def _load(self) -> int:
        """Read everything the engine needs, once; returns the revision to watch from."""
        registry = self.registry
        revision = await self.mirror.load()
        units = self.mirror.units  # kept current by the mirror's watch from here on
        view = EngineView(units=units)
        view.machines = self.mirror.machines_with_metadata()
        view.cordons = self.mirror.cordons
        view.placements = await registry.placements()
        extra = view.adopt_schedule(await registry.full_schedule())
        if extra:
            log.warning(
                "engine_extra_schedule_entries", entries=[(e.name, e.machine_id) for e in extra]
            )
            self._extra = extra
        view.globals = {
            s.name: Unit(s.name, s.hash, s.target_state) for s in (await registry.global_units())[0]
        }
        self.view = view
        self._planned_machines = frozenset(view.machines)
        # A new leader sweeps at once: orphans left before it led (or by 0.1.x) are its too.
        self._sweep_due_since = self._last_churn = float("-inf")
        self._needs_body = set(units)
        self._machines_dirty = False
        log.info(
            "engine_state_loaded",
            revision=revision,
            units=len(units),
            machines=len(view.machines),
            scheduled=len(view.schedule),
        )
        return revision

    async def _refresh(self) -> None:
        """Bring in what events only flagged: new bodies' requirements, machine changes."""
        if self._machines_dirty:
            self.view.machines = self.mirror.machines_with_metadata()
            self._machines_dirty = False
        # One batched read for every body not cached yet (a burst of submissions brings
        # thousands), instead of a round trip per unit.
        await self.registry.prefetch_bodies(
            unit.hash
            for name in self._needs_body
            if (unit := self.view.units.get(name)) is not None
            and self.registry.cached_requirements(name, unit.hash) is None
        )
        for name in sorted(self._needs_body):
            unit = self.view.units.get(name)
            if unit is None:
                continue
            reqs = await self.registry.requirements(unit.name, unit.hash)
            if reqs is not None:
                self.view.requirements[name] = reqs
        self._needs_body.clear()
        for name in list(self.view.requirements):
            if name not in self.view.units:
                del self.view.requirements[name]

    async def _plan_and_apply(self, token: LeaderToken) -> None:
        self._changed = False
        await self._refresh()
        started = time.perf_counter()
        # Units whose body could not be read are left out of planning rather than guessed at.
        view = self.view
        plannable = EngineView(
            units={n: u for n, u in view.units.items() if n in view.requirements},
            requirements=view.requirements,
            machines=view.machines,
            schedule=view.schedule,
            globals=view.globals,
            placements=view.placements,
        )
        held = self._held(view)
        if held != self._holding:
            if held:
                log.warning(
                    "engine_grace_holding",
                    machines=sorted(held),
                    until_in=_seconds_left(self.grace_ends(), self.clock()),
                    reason="etcd-side fault: absent machines get a grace to re-register",
                )
            else:
                log.info("engine_grace_ended", released=sorted(self._holding - held))
            self._holding = held
        if held:
            self.stats.grace_holds += 1
        if view.handoffs:
            view.states = await self.registry.states_of(engineplan.handoff_pairs(view))
        view.active_instances = await self._budgets(view)
        plannable.handoffs, plannable.states, plannable.cordons = (
            view.handoffs,
            view.states,
            view.cordons,
        )
        plannable.active_instances = view.active_instances
        writes, reasons = engineplan.plan(plannable, held)
        writes = await self._hold_stop_policy_starts(plannable, writes)
        if self._extra:
            writes = [
                *(
                    engineplan.DeleteSchedule(e.name, e.machine_id, "extra entry")
                    for e in self._extra
                ),
                *writes,
            ]
            self._extra = []
        self.stats.plans += 1
        self.stats.last_plan_seconds = time.perf_counter() - started
        for observe in self.plan_observers:
            observe(self.stats.last_plan_seconds)
        if not writes:
            return
        # Unscheduling first, in a call of its own: `fenced` sends its chunks in no order, and
        # an agent must never see a unit moved before it is gone from where it was.
        first, then = self._ops(writes)
        if first:
            await self.registry.fenced(token, first)
        if then:
            await self.registry.fenced(token, then)
        view.apply(writes)
        self.stats.writes += len(writes)
        for w in writes:
            _log_write(w, reasons)

    async def _drain_snapshot(self) -> object:
        """What a drain in progress waits on, read cheaply: the handoffs' new copies, the
        budgeted templates' counts, the held stop-policy units' copies."""
        view = self.view
        pairs = engineplan.handoff_pairs(view)
        states = await self.registry.states_of(pairs) if pairs else {}
        held = []
        for name in sorted(self._held_stop):
            copies = await self.registry.list_states(unit=name)
            held.append((name, sorted((s.machine_id, s.active_state) for s in copies)))
        return (
            sorted((k, s.active_state, s.hash) for k, s in states.items()),
            sorted((await self._budgets(view)).items()),
            held,
        )

    def _drain_moving(self) -> bool:
        """A drain in progress waits on states the engine does not watch: new copies to be
        active, old copies of PartitionPolicy=stop units to stop, a budget to allow a stop."""
        view = self.view
        return bool(view.handoffs or view.active_instances) or self._stop_waits

    async def _budgets(self, view: EngineView) -> dict[str, int]:
        """Active instances of each template whose MinAvailable a drain must keep: read only
        while a draining machine runs a budgeted PartitionPolicy=stop instance (they stop
        before starting elsewhere; other units move make-before-break, so never lower it)."""
        draining = view.draining
        if not draining:
            return {}
        templates = {
            template
            for name, s in view.schedule.items()
            if s.machine_id in draining
            and (template := engineplan.budget_template(view, name)) is not None
            and (reqs := view.requirements.get(name)) is not None
            and reqs.partition_policy == PartitionPolicy.STOP
        }
        if not templates:
            return {}
        counts = dict.fromkeys(templates, 0)
        for state in await self.registry.list_states():
            template = engineplan.budget_template(view, state.name)
            entry = view.schedule.get(state.name)
            # A copy counts where its schedule entry is: one just unscheduled from the draining
            # machine may still be active there, but it is on its way down.
            if (
                template in counts
                and state.active_state == "active"
                and entry is not None
                and entry.machine_id == state.machine_id
            ):
                counts[template] += 1
        return counts

    async def _hold_stop_policy_starts(self, view: EngineView, writes: list[Write]) -> list[Write]:
        """Drop the new placement of a PartitionPolicy=stop unit while a copy of it still
        runs on another machine (a drain stops it first): at most one copy, ever."""
        starting = {
            w.unit.name: w.machine_id
            for w in writes
            if isinstance(w, engineplan.SetSchedule)
            and (reqs := view.requirements.get(w.unit.name)) is not None
            and reqs.partition_policy == PartitionPolicy.STOP
            and _may_run_elsewhere(view, w.unit.name, w.machine_id)
        }
        self._stop_waits = False
        self._held_stop = set()
        if not starting:
            return writes
        if len(starting) > STATE_READS_PER_UNIT:
            by_unit: dict[str, list[UnitState]] = {}
            for state in await self.registry.list_states():
                by_unit.setdefault(state.name, []).append(state)
        else:
            by_unit = {n: await self.registry.list_states(unit=n) for n in starting}
        held: dict[str, str] = {}
        for unit_name, target in starting.items():
            for state in by_unit.get(unit_name, ()):
                if state.machine_id != target and state.active_state in RUNNING_STATES:
                    held[unit_name] = state.machine_id
                    break
        if not held:
            return writes
        self._stop_waits = True
        self._held_stop = set(held)
        kept: list[Write] = []
        for write in writes:
            if isinstance(write, engineplan.SetSchedule):
                name: str | None = write.unit.name
            elif isinstance(write, engineplan.SetPlacement):
                name = write.name
            else:
                name = None
            if name not in held:
                kept.append(write)
        for name, machine_id in sorted(held.items()):
            why = f"waiting for its copy on {machine_id} to stop (PartitionPolicy=stop)"
            if view.placements.get(name) != Placement(name, None, why):
                kept.append(engineplan.SetPlacement(name, None, why))
        return kept

    def _ops(self, writes: list[Write]) -> tuple[list[Op], list[Op]]:
        """The writes' etcd ops in two groups: global units and unscheduling, which must land
        first (the planner orders them first too), then the rest."""
        r = self.registry
        first: list[Op] = []
        ops: list[Op] = []
        scheduled = {w.unit.name for w in writes if isinstance(w, engineplan.SetSchedule)}
        # A placement on a machine is written together with its schedule key, with its reason.
        stuck = {
            w.name: w.reason
            for w in writes
            if isinstance(w, engineplan.SetPlacement) and w.machine_id is not None and w.reason
        }
        for w in writes:
            match w:
                case engineplan.SetSchedule(unit, machine_id):
                    ops += r.op_schedule(unit, machine_id, stuck.get(unit.name, ""))
                case engineplan.DeleteSchedule(name, machine_id, _):
                    first += r.op_unschedule(name, machine_id)
                case engineplan.SetPlacement(name, machine_id, reason):
                    if machine_id is None:
                        ops += r.op_unplaced(name, reason)
                    elif name not in scheduled:
                        ops += r.op_placed(name, machine_id, reason)
                case engineplan.DeletePlacement(name):
                    ops += r.op_forget_placement(name)
                case engineplan.SetGlobal(unit):
                    first += r.op_global(unit)
                case engineplan.DeleteGlobal(name):
                    first += r.op_unglobal(name)
        return first, ops


def _may_run_elsewhere(view: EngineView, name: str, target: str) -> bool:
    """Whether a copy of `name` may still run off `target`: it is scheduled elsewhere, or its
    placement names another machine or a wait. A unit never scheduled has no copy."""
    now = view.schedule.get(name)
    if now is not None:
        return now.machine_id != target
    placed = view.placements.get(name)
    if placed is None:
        return False
    if placed.machine_id is not None:
        return placed.machine_id != target
    return placed.reason.startswith("waiting for its copy")


def _seconds_left(ends: float | None, now: float) -> float | None:
    return None if ends is None else round(max(0.0, ends - now), 3)


def _log_write(w: Write, reasons: dict[str, str]) -> None:
    match w:
        case engineplan.SetSchedule(unit, machine_id):
            log.info(
                "unit_scheduled", unit=unit.name, machine=machine_id, state=unit.target_state.value
            )
        case engineplan.DeleteSchedule(name, machine_id, reason):
            log.info("unit_unscheduled", unit=name, machine=machine_id, reason=reason)
        case engineplan.SetPlacement(name, None, reason):
            log.warning("unit_unplaceable", unit=name, reason=reason)
        case engineplan.BeginHandoff(name, old):
            log.info("unit_handoff_started", unit=name, old_machine=old)
        case engineplan.EndHandoff(name):
            log.info("unit_handoff_done", unit=name)
        case _:
            pass


async def _until(
    events: AsyncIterator[list[WatchEvent]], stop_task: asyncio.Future[Any]
) -> AsyncIterator[list[WatchEvent]]:
    """Iterate `events` until the stop future completes."""
    while True:
        nxt: asyncio.Future[Any] = asyncio.ensure_future(events.__anext__())
        done, _ = await asyncio.wait({nxt, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if nxt not in done:
            # Let the cancellation land before the caller closes the generator: aclose() on
            # a generator whose __anext__ is still running raises RuntimeError.
            nxt.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await nxt
            return
        try:
            yield nxt.result()
        except StopAsyncIteration:
            return
