"""The partition fence: PartitionPolicy=stop units stop before the engine may move them.

`PartitionPolicy=stop` (beyond fleet) is the only place a timer acts without etcd. When the
machine's lease has not been renewed for FENCE_FRACTION (2/3) of agent_ttl, the engine may soon
move the unit (it can only after the lease expires, at 1 x TTL), so the fence loop stops this
machine's copies of STOP-policy units first: at most one copy runs, ever. The decision is the
pure `plan.units_to_fence`; the loop re-checks every `fence_tick`, so a unit started
concurrently is stopped again.

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
from collections.abc import Callable

import structlog

from fleetd.agent.lease import MachineLease
from fleetd.agent.plan import FENCE_FRACTION, CurrentUnit, lease_at_risk, units_to_fence
from fleetd.agent.record import AgentRecord
from fleetd.errors import FleetError
from fleetd.model import TargetState
from fleetd.systemd.manager import UnitManager
from fleetd.watching import StopWaiter, grid_delay

log = structlog.get_logger("fleetd.agent")  # one logger name for all of the agent's events


class PartitionFence:
    """Stops the STOP-policy units of `record` while `lease` is at risk, and holds them."""

    def __init__(
        self,
        manager: UnitManager,
        lease: MachineLease,
        record: AgentRecord,
        clock: Callable[[], float],
        *,
        mark_dirty: Callable[[str], None],
        resync: asyncio.Event,
    ) -> None:
        """`mark_dirty` is told each unit fenced (its state changed); `resync` is set when
        renewals resume with units held, for the watch loop to read the schedule afresh."""
        self.manager = manager
        self._lease = lease
        self.record = record
        self.clock = clock
        self._mark_dirty = mark_dirty
        self._resync = resync
        self.ttl = lease.ttl
        self._started = clock()
        self.fence_tick = min(1.0, self.ttl / 30) if self.ttl > 0 else 1.0
        self.held: set[str] = set()  # stopped by the fence, not restarted yet

    def lease_at_risk(self) -> bool:
        """Whether the lease has gone unrenewed for the fence fraction of the TTL (False when
        fencing is disabled)."""
        if self.ttl <= 0:
            return False
        return lease_at_risk(self.clock(), self._renewed_at(), self.ttl)

    def _renewed_at(self) -> float:
        return max(self._lease.last_renewed, self._started)

    def start_blocked(self, name: str) -> bool:
        """Whether a START of `name` must be dropped: held, or STOP-policy with the lease at
        risk."""
        if name in self.held:
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
            self.held.add(name)
            self._mark_dirty(name)
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

    async def run(self, stop: asyncio.Event) -> None:
        """The fence loop, from the agent's start until `stop`."""
        if self.ttl <= 0:
            return
        waiter = StopWaiter(stop)
        try:
            while not stop.is_set():
                await self.fence()
                at_risk = self.lease_at_risk()
                if self.held and not at_risk:
                    # Renewals resumed: have the watch loop read the schedule afresh (lifting
                    # the hold) rather than restart units from a copy that may be stale.
                    self._resync.set()
                await waiter.sleep(self._wait(at_risk))
        finally:
            waiter.close()

    def _wait(self, at_risk: bool) -> float:
        """How long the fence loop may sleep.

        While the lease is at risk or units are held, every fence_tick (a START racing the
        fence is undone at the next tick). Otherwise nothing can need fencing before the lease
        has gone unrenewed for the fence fraction of the TTL: sleep until then. A renewal
        meanwhile moves that point, so the loop then just sleeps again; an idle agent wakes
        about once per renewal instead of every fence_tick (3,000 wakeups/s at 1,000
        simulated machines with agent_ttl 10s), and no START can slip in unfenced, because
        the agent starts no STOP-policy unit while the lease is at risk.
        """
        if at_risk or self.held:
            return self.fence_tick
        at = self._renewed_at() + FENCE_FRACTION * self.ttl
        # The last grid point before the deadline: shared wakeups, and never late.
        return max(self.fence_tick, grid_delay(self.clock(), at, early=True))
