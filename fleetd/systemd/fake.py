"""`FakeUnitManager`: an in-memory systemd for unit tests and the many-machine simulator.

It follows what the real one was seen to do (tests/functional/test_systemd_dbus.py):

- load: the file is stored (and "linked"); the unit reads loaded/inactive/dead;
- start: loaded/active/running with a fresh main pid; result "done";
- stop: loaded/inactive/dead (a failed unit stays failed); result "done";
- unload: stop, then the unit is gone: not-found/inactive/dead (failed state reset), and
  watch() reports nothing more about it;
- start of a unit with no file: NoSuchUnitError; stop of a unit systemd does not have: too;
- watch: the current state of every unit file, then each change, coalesced per unit.

Failure knobs (plain sets, change them at any time):
  fail_start   start returns "failed" and the unit reads loaded/failed/failed
  hang_start   start raises UnitManagerError as the real one does when the job outlives its
               job_timeout; the unit reads loaded/activating/start (systemd still works on it)
  fail_stop    stop returns "failed" and the unit keeps running, so unload raises
  fail_enable  load with has_install raises "Failed to enable systemd unit ..." and
               leaves nothing behind
  fail_load    load raises before anything is written
  fail_reload  (bool) reload raises

Cheap on purpose: a few dicts per instance, no tasks, no timers; a thousand instances
with ten units each fit in a few megabytes and cost microseconds per call.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from fleetd.systemd.manager import (
    DEFAULT_UNITS_DIR,
    JOB_DONE,
    NOT_FOUND,
    NoSuchUnitError,
    StateFeed,
    SystemdState,
    UnitManagerError,
    check_unit_name,
    is_recognized,
    unit_path,
)

# Shared by all instances, so pids are unique across a simulated cluster, as in logs.
_pids = itertools.count(1000)

LOADED = SystemdState("loaded", "inactive", "dead")
RUNNING = SystemdState("loaded", "active", "running")
FAILED = SystemdState("loaded", "failed", "failed")
ACTIVATING = SystemdState("loaded", "activating", "start")


class FakeUnitManager:
    __slots__ = (
        "_closed",
        "_feeds",
        "_pids",
        "_states",
        "calls",
        "enabled",
        "fail_enable",
        "fail_load",
        "fail_reload",
        "fail_start",
        "fail_stop",
        "files",
        "hang_start",
        "jobs",
        "latency",
        "record",
        "reloads",
        "stop_latency",
        "units_dir",
    )

    def __init__(
        self,
        units_dir: Path = DEFAULT_UNITS_DIR,
        *,
        fail_start: Iterable[str] = (),
        fail_stop: Iterable[str] = (),
        fail_enable: Iterable[str] = (),
        fail_load: Iterable[str] = (),
        fail_reload: bool = False,
        hang_start: Iterable[str] = (),
        latency: float = 0.0,
        record: bool = False,
    ) -> None:
        self.units_dir = units_dir
        self.files: dict[str, str] = {}  # the units directory
        self.enabled: set[str] = set()  # units enabled through their [Install] section
        self.jobs: dict[str, str] = {}  # unit -> pending job type, for own_job_type
        self.fail_start = set(fail_start)
        self.fail_stop = set(fail_stop)
        self.fail_enable = set(fail_enable)
        self.fail_load = set(fail_load)
        self.fail_reload = fail_reload
        self.hang_start = set(hang_start)
        self.latency = latency  # seconds each call takes; 0 = does not yield at all
        # Extra seconds a stop takes, the unit still active meanwhile (a service's ExecStop):
        # a test of "never two copies" needs a stop that is not instant.
        self.stop_latency = 0.0
        self.record = record
        self.calls: list[tuple[str, str]] = []  # (method, unit name) when `record`
        self.reloads = 0
        self._states: dict[str, SystemdState] = {}  # units systemd holds (not not-found)
        self._pids: dict[str, int] = {}
        self._feeds: set[StateFeed] = set()
        self._closed = False

    # -- the protocol -----------------------------------------------------------------------

    def unit_path(self, name: str) -> Path:
        return unit_path(self.units_dir, name)

    async def load(self, name: str, text: str, *, has_install: bool) -> None:
        await self._enter("load", name)
        if name in self.fail_load:
            raise UnitManagerError(f"cannot write unit file {self.unit_path(name)}: injected")
        self.files[name] = text
        if has_install:
            if name in self.fail_enable:
                del self.files[name]
                raise UnitManagerError(f"Failed to enable systemd unit {name}: injected failure")
            self.enabled.add(name)
        if name not in self._states:
            self._set(name, LOADED)

    async def unload(self, name: str) -> None:
        await self._enter("unload", name)
        if name in self._states:
            if self.stop_latency:
                await asyncio.sleep(self.stop_latency)
            result = self._stop(name)
            if result != JOB_DONE:
                raise UnitManagerError(f"could not stop {name} (job {result}); it stays loaded")
        self.files.pop(name, None)
        self.enabled.discard(name)
        self._pids.pop(name, None)
        # Gone from the units directory, so out of watch() (as with the real one).
        self._states.pop(name, None)
        for feed in self._feeds:
            feed.forget(name)

    async def reload(self) -> None:
        await self._enter("reload", None)
        if self.fail_reload:
            raise UnitManagerError("systemd Reload() failed: injected failure")
        self.reloads += 1

    async def start(self, name: str) -> str:
        await self._enter("start", name)
        if name not in self.files:
            raise NoSuchUnitError(f"systemd StartUnit({name!r}): Unit {name} not found.")
        if name in self.fail_start:
            self._pids.pop(name, None)
            self._set(name, FAILED)
            return "failed"
        if name in self.hang_start:
            if self._states.get(name) != RUNNING:
                self._set(name, ACTIVATING)
            raise UnitManagerError(f"StartUnit {name}: job did not finish in time (injected)")
        if self._states.get(name) != RUNNING:
            self._pids[name] = next(_pids)
            self._set(name, RUNNING)
        return JOB_DONE

    async def stop(self, name: str) -> str:
        await self._enter("stop", name)
        if name in self._states and self.stop_latency:
            await asyncio.sleep(self.stop_latency)
        if name not in self._states:
            raise NoSuchUnitError(f"systemd StopUnit({name!r}): Unit {name} not loaded.")
        return self._stop(name)

    async def states(self, names: Iterable[str]) -> dict[str, SystemdState]:
        await self._enter("states", None)
        result = {}
        for name in names:
            check_unit_name(name)
            result[name] = self._states.get(name, NOT_FOUND)
        return result

    async def main_pid(self, name: str) -> int:
        await self._enter("main_pid", name)
        return self._pids.get(name, 0)

    async def unit_files(self) -> dict[str, str]:
        await self._enter("unit_files", None)
        return {name: text for name, text in self.files.items() if is_recognized(name)}

    async def watch(self) -> AsyncIterator[tuple[str, SystemdState]]:
        self._check_open()
        feed = StateFeed()
        self._feeds.add(feed)
        try:
            for name in self.files:
                if is_recognized(name):
                    feed.put(name, self._states.get(name, NOT_FOUND))
            async for item in feed.stream():
                yield item
        finally:
            self._feeds.discard(feed)

    async def own_job_type(self, unit: str) -> str | None:
        await self._enter("own_job_type", unit)
        return self.jobs.get(unit)

    async def close(self) -> None:
        self._closed = True
        for feed in self._feeds:
            feed.close()

    # -- simulation helpers -------------------------------------------------------------------

    def crash(self, name: str) -> None:
        """The unit's main process dies: loaded/failed/failed, as systemd reports it."""
        if name in self._states:
            self._pids.pop(name, None)
            self._set(name, FAILED)

    # -- internals --------------------------------------------------------------------------

    def _stop(self, name: str) -> str:
        if name in self.fail_stop:
            return "failed"
        self._pids.pop(name, None)
        if self._states[name] != FAILED:  # stopping does not clear a failure
            self._set(name, LOADED)
        return JOB_DONE

    async def _enter(self, method: str, name: str | None) -> None:
        self._check_open()
        if name is not None:
            check_unit_name(name)  # the same refusals as the real manager
        if self.record:
            self.calls.append((method, name or ""))
        if self.latency:
            await asyncio.sleep(self.latency)

    def _check_open(self) -> None:
        if self._closed:
            raise UnitManagerError("the systemd connection is closed")

    def _set(self, name: str, state: SystemdState) -> None:
        self._states[name] = state
        self._publish(name, state)

    def _publish(self, name: str, state: SystemdState) -> None:
        if is_recognized(name):
            for feed in self._feeds:
                feed.put(name, state)


if TYPE_CHECKING:
    from fleetd.systemd.manager import UnitManager

    _conforms: UnitManager = FakeUnitManager()
