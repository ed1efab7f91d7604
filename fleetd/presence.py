"""Machine presence: the machine's etcd lease, kept alive, with the machine key on it.

Everything ephemeral this machine writes (its machine key, its unit states, the engine leader
key when it leads) hangs on this one lease, so when the machine dies all of it vanishes after
agent_ttl and the engine reschedules at once.

The lease id is kept in a file under /run so that a restarted fleetd adopts its old lease while
it is alive: the restart then looks like nothing happened (no reschedule, no state churn). A
second machine claiming the same id has no such file, so it is refused loudly. The file names
the machine id too: a fleetd restarted under a new id releases the old registration at once
instead of leaving it listed until its lease runs out.

Presence is also the machine's etcd health probe. A keepalive that fails, answers late, finds
the lease gone, or shows that etcd elected a new leader is *etcd trouble*; `settled_since`
says since when etcd has answered well again. The engine reads it to tell an etcd-side fault
(leases lost because etcd stalled: move nothing yet) from a machine that really died while
etcd was healthy (move its units at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from fleetd.errors import ConfigError, FleetError, LeaseNotFound, RegistryUnavailable
from fleetd.model import Machine
from fleetd.registry.registry import Registry
from fleetd.watching import StopWaiter, grid_delay

log = structlog.get_logger("fleetd.presence")

# The lease runs this fraction of agent_ttl, renewed three times per lease TTL. agent_ttl is
# the longest a dead machine goes unnoticed: fleet v1.0 granted agent_ttl and renewed every
# agent_ttl/2, so a machine silent for agent_ttl/2 at the wrong moment was dead, and a kill
# was noticed after 0.5-1 agent_ttl. This lease gives the same silence tolerance to within
# a few percent (0.7 x 2/3 = 0.47 agent_ttl) with three chances to renew instead of two, and
# notices a kill after 0.47-0.7 agent_ttl (measured: `python -m benchmarks kill`).
LEASE_FRACTION = 0.7
# The longest a mute etcd member keeps etcd unsettled after an election, in agent_ttls (5
# minutes at the default 10 s): a member silent that long is more likely dead than frozen, and
# the units of machines that die meanwhile must move some time.
MUTE_LIMIT = 30


def lease_ttl(agent_ttl: float) -> int:
    """The TTL fleetd grants its lease for `agent_ttl`: whole seconds (etcd's unit), rounded
    up, so that a short agent_ttl (the tests' 3 s) keeps all of it."""
    return max(1, math.ceil(agent_ttl * LEASE_FRACTION - 1e-9))


class Presence:
    def __init__(
        self,
        registry: Registry,
        machine: Callable[[], Machine],
        ttl: float,
        lease_file: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self._machine = machine
        self.agent_ttl = ttl
        self.ttl = lease_ttl(ttl)  # the lease's own TTL, in whole seconds as etcd grants
        self.lease_file = lease_file
        self.clock = clock
        self.lease = 0
        self.registered = asyncio.Event()
        self.last_renewed = 0.0  # clock time of the last successful keepalive
        self._lease_changed: list[Callable[[int], None]] = []
        self.refused_duplicate = False
        self._registered_as: Machine | None = None
        # etcd health as seen from here (see settled_since): None until the first answer.
        self.in_trouble = False
        self._settled_at: float | None = None
        self._term = 0  # etcd's raft term as last seen
        self._mute_watch: asyncio.Task[None] | None = None  # see _watch_mute_members
        self._mute_found = False  # it found a member mute, and still watches it

    @property
    def slow_answer(self) -> float:
        """A keepalive slower than this counts as etcd trouble.

        A stall that can expire the lease of a machine renewing on time lasts at least
        TTL - TTL/3; it then overlaps one of our own renewals (every TTL/3) by at least
        TTL/3, so half of that catches every such stall, and is far above any round trip
        a working etcd takes (milliseconds).
        """
        return self.ttl / 6

    def settled_since(self) -> float | None:
        """Clock time since which etcd has answered this machine well; None while it does not
        (or before the first answer), and while an etcd member is found mute after an
        election (_watch_mute_members). A fleetd that just started knows etcd only since its
        registration, so the engine's grace covers a cold start too."""
        if self.in_trouble or self._mute_found:
            return None
        return self._settled_at

    def _trouble(self, what: str, error: str) -> None:
        if not self.in_trouble:
            log.warning("etcd_trouble", what=what, error=error)
        self.in_trouble = True

    def _answered(self) -> None:
        now = self.clock()
        if self.in_trouble or self._settled_at is None:
            if self.in_trouble:
                log.info("etcd_recovered", machine=self._machine().id)
            self._settled_at = now
        self.in_trouble = False

    def on_lease_changed(self, callback: Callable[[int], None]) -> None:
        self._lease_changed.append(callback)

    async def current_lease(self) -> int:
        """The live lease, waiting for registration if there is none yet."""
        await self.registered.wait()
        return self.lease

    @property
    def renew_interval(self) -> float:
        # Three chances to renew within one TTL, so one slow round-trip does not cost the lease.
        return self.ttl / 3

    async def run(self, stop: asyncio.Event) -> None:
        waiter = StopWaiter(stop)
        if self.registered.is_set():
            self._start_mute_watch()  # restarted (supervise): the watch went with the old run
        try:
            await self._run(stop, waiter)
        finally:
            waiter.close()
            if self._mute_watch is not None:
                self._mute_watch.cancel()

    async def _run(self, stop: asyncio.Event, waiter: StopWaiter) -> None:
        backoff = 1.0
        while not stop.is_set():
            try:
                if not self.registered.is_set():
                    await self._register()
                    backoff = 1.0
                else:
                    await self._renew()
                wait = backoff
                if self.registered.is_set():
                    # On the timer grid: the renewals of many machines in one process (the
                    # simulator) share wakeups; at most TIMER_GRID later than TTL/3.
                    now = self.clock()
                    wait = grid_delay(now, now + self.renew_interval)
            except ConfigError:
                raise  # etcd refused our credentials: nothing a retry fixes
            except LeaseNotFound as e:
                # etcd expired the lease between our keepalive and a write on it: register
                # again at once on a new lease, same machine id.
                self._trouble("lease", str(e))
                self._lost_lease()
                wait = min(backoff, self.renew_interval)
                backoff = min(backoff * 2, 60.0)
            except FleetError as e:
                # Keep trying; never touch units because etcd is unreachable or answers
                # errors (a quota alarm, a refused request): fleetd stays up.
                if not self.refused_duplicate:
                    self._trouble("keepalive", str(e))
                log.warning("presence_registry_unavailable", error=str(e))
                # Retry at least ten times a TTL: with PartitionPolicy=stop the agent fences at
                # 2/3 TTL, and a renewal landing before 1 TTL still saves the lease.
                wait = min(backoff, self.renew_interval, self.ttl / 10)
                backoff = min(backoff * 2, 60.0)
            await waiter.sleep(wait)

    async def _register(self) -> None:
        machine = self._machine()
        old, old_id = self._read_lease_file()
        if old and old_id is not None and old_id != machine.id:
            await self._release_other_id(old, old_id, machine.id)
            old = 0
        lease, adopted = await self._adopt_or_grant(old)
        if not await self.registry.register_machine(machine, lease):
            if not adopted:
                with contextlib.suppress(FleetError):
                    await self.registry.revoke_lease(lease)
            if not self.refused_duplicate:
                log.error(
                    "machine_id_in_use",
                    machine=machine.id,
                    detail="another live fleetd holds this machine id; refusing to register",
                )
            self.refused_duplicate = True
            raise RegistryUnavailable(f"machine id {machine.id} is in use by another machine")
        self.refused_duplicate = False
        self._registered_as = machine
        self._set_lease(lease)
        self.last_renewed = self.clock()
        # The term baseline: an election before the first renewal counts too (a fleetd that
        # registered just before etcd's leader froze).
        first = self._term == 0
        self._check_term()
        self._answered()
        if first:
            # Started during a freeze, it saw no election: look once. Not at re-registering,
            # which follows the term already, and after a stall comes for every machine at
            # once: a probe each would be a connection storm on etcd as it recovers.
            self._start_mute_watch()
        self.registered.set()
        log.info("machine_registered", machine=machine.id, lease=lease, ttl=self.ttl)

    async def _adopt_or_grant(self, old: int) -> tuple[int, bool]:
        """A lease to register on (`old`, from the lease file, if it lives: a restart), and
        whether it is that adopted one."""
        if old and await self.registry.keepalive(old) > 0:
            log.info("lease_adopted", lease=old)
            return old, True
        return await self.registry.grant_lease(self.ttl), False

    async def _release_other_id(self, old: int, old_id: str, machine_id: str) -> None:
        """The lease file names another machine id (the machine id changed across a restart):
        revoke that lease now, so the old registration, its unit states and any engine lead
        on it go at once instead of after agent_ttl (or never, had we adopted the lease)."""
        await self.registry.revoke_lease(old)  # a lease already gone is fine (no error)
        log.info("old_registration_released", old_machine=old_id, lease=old, machine=machine_id)
        self._write_lease_file(0)

    def _check_term(self) -> None:
        """An etcd leader election seen in the answers' raft term is etcd trouble too: leases
        are least trustworthy then (kv.KV.raft_term)."""
        term = self.registry.raft_term
        if self._term and term > self._term:
            self._trouble(
                "election", f"etcd elected a new leader (raft term {self._term} -> {term})"
            )
            self._start_mute_watch()
        self._term = max(self._term, term)

    def _start_mute_watch(self) -> None:
        if self._mute_watch is None:
            self._mute_watch = asyncio.ensure_future(self._watch_mute_members())

    async def _watch_mute_members(self) -> None:
        """After an etcd election, etcd is not settled while one of its members is mute (at
        most MUTE_LIMIT x agent_ttl): a leader frozen past the lease TTL revokes, as it
        resumes and before it learns it was deposed, every lease it thinks expired, although
        the new leader kept them (etcd #15247; Debian 12's etcd 3.4.23 has it). That comes
        any time after the election, so the engine's grace must still be on then. Also run
        at the first registration and at a restart of presence: this fleetd may have missed
        the election (it started during the freeze), and its engine may lead when the revoke
        comes."""
        started = self.clock()
        warned = False
        try:
            while self.clock() - started < MUTE_LIMIT * self.agent_ttl:
                try:
                    mute = await self.registry.mute_members()
                except FleetError as e:
                    mute = [f"unknown: {e}"]
                except Exception:
                    # A bug in the probe must not hold units for good: stop watching.
                    log.exception("etcd_mute_probe_failed")
                    break
                if not mute:
                    break
                self._mute_found = True
                if not warned:
                    log.warning(
                        "etcd_member_mute",
                        members=mute,
                        detail="a frozen former etcd leader may revoke leases as it resumes:"
                        " absent machines keep their units until it answers again",
                    )
                    warned = True
                await asyncio.sleep(self.renew_interval)
            else:
                log.warning("etcd_member_mute_limit", seconds=MUTE_LIMIT * self.agent_ttl)
            if warned:
                log.info("etcd_members_answer")
        finally:
            self._mute_watch = None
            self._mute_found = False
            if warned:
                self._settled_at = self.clock()  # the grace starts over from here

    def _lost_lease(self) -> None:
        self.lease = 0
        self.registered.clear()

    async def _renew(self) -> None:
        sent = self.clock()
        remaining = await self.registry.keepalive(self.lease)
        took = self.clock() - sent
        if took > self.slow_answer:
            self._trouble("keepalive", f"etcd took {took:.1f}s to answer a keepalive")
        self._check_term()
        if remaining > 0:
            self.last_renewed = self.clock()
            self._answered()
            machine = self._machine()
            if machine != self._registered_as:
                # Its content changed (SIGHUP reloaded metadata or public_ip): re-put it.
                # Otherwise an idle machine costs etcd exactly one keepalive per interval.
                await self.registry.register_machine(machine, self.lease)
                self._registered_as = machine
            return
        # Gone: etcd expired it (a stall longer than the TTL does that to every machine at
        # once) or it was revoked. Register again under the same id; the units keep running.
        log.warning("lease_expired", lease=self.lease)
        self._trouble("lease", "the lease expired")
        self._lost_lease()
        await self._register()

    def _set_lease(self, lease: int) -> None:
        changed = lease != self.lease
        self.lease = lease
        self._write_lease_file(lease)
        if changed:
            for callback in self._lease_changed:
                callback(lease)

    def _read_lease_file(self) -> tuple[int, str | None]:
        """(lease, machine id it was registered for); the id is None in a file written by
        fleetd 0.1.x (the lease alone), which is adopted as before."""
        if self.lease_file is None:
            return 0, None
        try:
            fields = self.lease_file.read_text().split()
            return int(fields[0]), (fields[1] if len(fields) > 1 else None)
        except (OSError, ValueError, IndexError):
            return 0, None

    def _write_lease_file(self, lease: int) -> None:
        if self.lease_file is None:
            return
        with contextlib.suppress(OSError):
            self.lease_file.parent.mkdir(parents=True, exist_ok=True)
            self.lease_file.write_text(f"{lease} {self._machine().id}\n")

    async def release(self) -> None:
        """Graceful stop: end the lease now so the engine reschedules without waiting."""
        if self.lease:
            with contextlib.suppress(FleetError):
                await self.registry.revoke_lease(self.lease)
            log.info("lease_revoked", lease=self.lease)
        self.lease = 0
        self.registered.clear()
        if self.lease_file is not None:
            with contextlib.suppress(OSError):
                self.lease_file.unlink()
