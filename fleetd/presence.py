"""Machine presence: the machine's etcd lease, kept alive, with the machine key on it.

Everything ephemeral this machine writes (its machine key, its unit states, the engine leader
key when it leads) hangs on this one lease, so when the machine dies all of it vanishes after
agent_ttl and the engine reschedules at once.

The lease id is kept in a file under /run so that a restarted fleetd adopts its old lease while
it is alive: the restart then looks like nothing happened (no reschedule, no state churn). A
second machine claiming the same id has no such file, so it is refused loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from fleetd.errors import FleetError, RegistryUnavailable
from fleetd.model import Machine
from fleetd.registry.registry import Registry
from fleetd.watching import StopWaiter, grid_delay

log = structlog.get_logger("fleetd.presence")


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
        self.ttl = max(1, round(ttl))
        self.lease_file = lease_file
        self.clock = clock
        self.lease = 0
        self.registered = asyncio.Event()
        self.last_renewed = 0.0  # clock time of the last successful keepalive
        self._lease_changed: list[Callable[[int], None]] = []
        self.refused_duplicate = False
        self._registered_as: Machine | None = None

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
        try:
            await self._run(stop, waiter)
        finally:
            waiter.close()

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
            except RegistryUnavailable as e:
                # Keep trying; never touch units because etcd is unreachable.
                log.warning("presence_registry_unavailable", error=str(e))
                # Retry at least ten times a TTL: with PartitionPolicy=stop the agent fences at
                # 2/3 TTL, and a renewal landing before 1 TTL still saves the lease.
                wait = min(backoff, self.renew_interval, self.ttl / 10)
                backoff = min(backoff * 2, 60.0)
            await waiter.sleep(wait)

    async def _register(self) -> None:
        lease, adopted = await self._adopt_or_grant()
        machine = self._machine()
        if not await self.registry.register_machine(machine, lease):
            if not adopted:
                with contextlib.suppress(FleetError):
                    await self.registry.kv.revoke(lease)
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
        self.registered.set()
        log.info("machine_registered", machine=machine.id, lease=lease, ttl=self.ttl)

    async def _adopt_or_grant(self) -> tuple[int, bool]:
        """A lease to register on, and whether it is one adopted from before a restart."""
        old = self._read_lease_file()
        if old and await self.registry.kv.keepalive(old) > 0:
            log.info("lease_adopted", lease=old)
            return old, True
        return await self.registry.kv.grant(self.ttl), False

    async def _renew(self) -> None:
        remaining = await self.registry.kv.keepalive(self.lease)
        if remaining > 0:
            self.last_renewed = self.clock()
            machine = self._machine()
            if machine != self._registered_as:
                # Its content changed (SIGHUP reloaded metadata or public_ip): re-put it.
                # Otherwise an idle machine costs etcd exactly one keepalive per interval.
                await self.registry.register_machine(machine, self.lease)
                self._registered_as = machine
            return
        log.warning("lease_expired", lease=self.lease)
        self.lease = 0
        self.registered.clear()
        await self._register()

    def _set_lease(self, lease: int) -> None:
        changed = lease != self.lease
        self.lease = lease
        self._write_lease_file(lease)
        if changed:
            for callback in self._lease_changed:
                callback(lease)

    def _read_lease_file(self) -> int:
        if self.lease_file is None:
            return 0
        try:
            return int(self.lease_file.read_text().strip())
        except (OSError, ValueError):
            return 0

    def _write_lease_file(self, lease: int) -> None:
        if self.lease_file is None:
            return
        with contextlib.suppress(OSError):
            self.lease_file.parent.mkdir(parents=True, exist_ok=True)
            self.lease_file.write_text(f"{lease}\n")

    async def release(self) -> None:
        """Graceful stop: end the lease now so the engine reschedules without waiting."""
        if self.lease:
            with contextlib.suppress(FleetError):
                await self.registry.kv.revoke(self.lease)
            log.info("lease_revoked", lease=self.lease)
        self.lease = 0
        self.registered.clear()
        if self.lease_file is not None:
            with contextlib.suppress(OSError):
                self.lease_file.unlink()
