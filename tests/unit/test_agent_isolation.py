"""One bad unit never stalls a machine (issue 16, point 4).

A unit whose task fails (a name systemd refuses, a full /run, a start job that outlives the
D-Bus job timeout, a broken symlink: all a UnitManagerError from the unit manager) fails alone:
every other task of the pass runs, its published state says what failed, and it is retried
with backoff on the agent's clock (injected here: no real waits of seconds).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fleetd.agent import plan as agentplan
from fleetd.agent.agent import Agent
from fleetd.agent.plan import RETRY_CEILING, TaskKind, failure_after, holds_back, retry_delay
from fleetd.errors import RegistryUnavailable
from fleetd.model import Machine, TargetState, UnitState
from fleetd.registry import codec
from fleetd.registry.fake import FakeKV
from fleetd.registry.kv import Put
from fleetd.registry.registry import Registry
from fleetd.systemd.fake import RUNNING, FakeUnitManager
from fleetd.unit.file import parse_unit
from tests.unit.fixed_lease import FixedLease

M1 = "113f16a7f2c54d35b3cde2e2ad5c2f10"
BODY = "[Unit]\nDescription=unit {i}\n\n[Service]\nExecStart=/bin/sleep 1000\n"
BAD = "u005.service"
GOOD = [f"u{i:03d}.service" for i in range(11) if i != 5]


def scheduled(registry: Registry, name: str, hash_: str, state: TargetState) -> Put:
    return Put(registry.keys.scheduled(M1, name), codec.encode_desired(hash_, state))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Machine1:
    """An agent on M1 with a fake systemd and etcd, and helpers to change its schedule."""

    def __init__(
        self, tmp_path: Path, manager: type[FakeUnitManager] = FakeUnitManager, **faults: Any
    ) -> None:
        self.kv = FakeKV()
        self.registry = Registry(self.kv)
        self.manager = manager(tmp_path / "units", record=True, **faults)
        self.clock = Clock()
        self.lease = FixedLease(0)  # granted by the first schedule()
        self.agent = Agent(
            self.registry,
            self.manager,
            lambda: Machine.make(M1, "10.0.0.1"),
            self.lease,
            clock=self.clock,
        )

    async def schedule(self, names: list[str], state: TargetState = TargetState.LAUNCHED) -> None:
        if not self.lease.lease:
            self.lease.lease = await self.kv.grant(60)
        ops = []
        for name in names:
            body = parse_unit(BODY.format(i=name))
            await self.registry.create_unit(name, body, state, replace=True)
            ops.append(scheduled(self.registry, name, body.hash, state))
        await self.kv.txn([], ops)
        self.agent.scheduled = {s.name: s for s in (await self.registry.machine_schedule(M1))[0]}

    def calls_for(self, name: str) -> list[str]:
        return [method for method, unit in self.manager.calls if unit == name]

    async def published(self) -> dict[str, UnitState]:
        """Publish what is dirty, as the publish loop does, and read the states back."""
        publisher = self.agent.publisher
        dirty, publisher._dirty_states = publisher._dirty_states, set()
        await publisher._publish(dirty)
        return {s.name: s for s in await self.registry.list_states()}


async def test_a_unit_whose_load_fails_does_not_hold_back_ten_others(tmp_path: Path) -> None:
    m = Machine1(tmp_path, fail_load={BAD})
    await m.schedule([*GOOD, BAD])

    ran = await m.agent.reconcile()

    assert ran == 10 + 1 + 10  # ten loads, the daemon-reload, ten starts: all in one pass
    assert await m.manager.states(GOOD) == dict.fromkeys(GOOD, RUNNING)
    assert m.calls_for(BAD) == ["load"]  # and not started: its load failed
    assert BAD not in m.agent.record.units
    states = await m.published()
    assert states[BAD].failed_task == "load"
    assert "cannot write unit file" in states[BAD].error
    assert "injected" in states[BAD].error
    assert states[BAD].agent_state == TargetState.INACTIVE  # nothing loaded
    assert states[BAD].hash == m.agent.scheduled[BAD].hash  # the file it tried to load
    assert (states[BAD].load_state, states[BAD].active_state) == ("", "")
    assert all(states[n].error == "" and states[n].failed_task == "" for n in GOOD)


async def test_a_start_job_that_times_out_fails_its_unit_alone(tmp_path: Path) -> None:
    m = Machine1(tmp_path, hang_start={BAD})
    await m.schedule([*GOOD, BAD])

    ran = await m.agent.reconcile()

    assert ran == 11 + 1 + 10
    assert await m.manager.states(GOOD) == dict.fromkeys(GOOD, RUNNING)
    assert m.agent.record.units[BAD].state == TargetState.LOADED  # loaded, not launched
    m.agent.publisher._observed.clear()  # no observe loop here: read systemd's state afresh
    states = await m.published()
    assert states[BAD].failed_task == "start"
    assert "did not finish" in states[BAD].error
    assert (states[BAD].active_state, states[BAD].sub_state) == ("activating", "start")
    assert states[BAD].agent_state == TargetState.LOADED


async def test_an_unexpected_exception_fails_its_unit_alone_too(tmp_path: Path) -> None:
    class Buggy(FakeUnitManager):
        async def load(self, name: str, text: str, *, has_install: bool) -> None:
            if name == BAD:
                raise KeyError("a bug")
            await super().load(name, text, has_install=has_install)

    m = Machine1(tmp_path, Buggy)
    await m.schedule([*GOOD, BAD])
    assert await m.agent.reconcile() == 10 + 1 + 10
    assert m.agent.executor.failures.by_unit[BAD].error == "KeyError: 'a bug'"


async def test_failed_unit_is_retried_with_backoff_and_success_clears_the_error(
    tmp_path: Path,
) -> None:
    m = Machine1(tmp_path, fail_load={BAD})
    await m.schedule([*GOOD, BAD])
    start = m.clock.now
    await m.agent.reconcile()
    assert m.agent.next_retry() == start + 1.0

    # In backoff: passes (events, the safety timer) cost it no systemd call at all.
    m.clock.now = start + 0.9
    assert await m.agent.reconcile() == 0
    assert m.calls_for(BAD) == ["load"]

    # Each retry that fails doubles the wait: 1, 2, 4, 8 s...
    waits = []
    for attempt in range(2, 6):
        m.clock.now = m.agent.next_retry() or 0.0
        before = m.clock.now
        assert await m.agent.reconcile() == 0
        assert m.calls_for(BAD) == ["load"] * attempt
        waits.append((m.agent.next_retry() or 0.0) - before)
    assert waits == [2.0, 4.0, 8.0, 16.0]

    # systemd recovers: the next retry loads and starts it, and its error goes.
    m.manager.fail_load.clear()
    m.clock.now = m.agent.next_retry() or 0.0
    assert await m.agent.reconcile() == 3  # load, daemon-reload, start
    assert await m.manager.states([BAD]) == {BAD: RUNNING}
    assert m.agent.next_retry() is None
    m.agent.publisher._observed.clear()
    state = (await m.published())[BAD]
    assert (state.failed_task, state.error) == ("", "")
    assert state.agent_state == TargetState.LAUNCHED


async def test_a_changed_desire_retries_at_once(tmp_path: Path) -> None:
    m = Machine1(tmp_path, fail_load={BAD})
    await m.schedule([BAD])
    await m.agent.reconcile()
    await m.agent.reconcile()
    assert m.calls_for(BAD) == ["load"]  # held back

    await m.schedule([BAD], TargetState.LOADED)  # the user changed its target state
    await m.agent.reconcile()
    assert m.calls_for(BAD) == ["load", "load"]
    failure = m.agent.executor.failures.by_unit[BAD]
    assert failure.attempts == 1  # a new desire starts the backoff afresh
    assert failure.retry_at == m.clock.now + 1.0


async def test_a_failed_unit_no_longer_scheduled_loses_its_error_state(tmp_path: Path) -> None:
    m = Machine1(tmp_path, fail_load={BAD})
    await m.schedule([GOOD[0], BAD])
    await m.agent.reconcile()
    assert BAD in await m.published()

    del m.agent.scheduled[BAD]
    await m.agent.reconcile()
    assert set(await m.published()) == {GOOD[0]}
    assert m.agent.next_retry() is None


async def test_a_failed_unload_skips_the_units_later_tasks_only(tmp_path: Path) -> None:
    m = Machine1(tmp_path)
    await m.schedule(["a.service", "b.service"])
    await m.agent.reconcile()
    m.manager.fail_stop.add("a.service")  # so its unload fails
    m.manager.calls.clear()

    # Both get a new unit file: unload, load, reload, start each.
    for name in ("a.service", "b.service"):
        body = parse_unit(BODY.format(i=name) + "Environment=V=2\n")
        await m.registry.create_unit(name, body, TargetState.LAUNCHED, replace=True)
        await m.kv.txn([], [scheduled(m.registry, name, body.hash, TargetState.LAUNCHED)])
    m.agent.scheduled = {s.name: s for s in (await m.registry.machine_schedule(M1))[0]}
    await m.agent.reconcile()

    assert m.calls_for("a.service") == ["unload"]  # no load, no start after the failure
    assert m.calls_for("b.service") == ["unload", "load", "start"]
    assert m.agent.executor.failures.by_unit["a.service"].task == TaskKind.UNLOAD
    state = (await m.published())["a.service"]
    assert state.failed_task == "unload"
    assert "could not stop" in state.error
    assert state.agent_state == TargetState.LAUNCHED  # the old file still runs


async def test_a_failed_daemon_reload_holds_the_new_units_starts_only(tmp_path: Path) -> None:
    m = Machine1(tmp_path)
    await m.schedule(["old.service", "stays.service"])
    await m.agent.reconcile()
    m.manager.fail_reload = True
    m.manager.calls.clear()
    reloads = m.manager.reloads

    await m.schedule(["new.service"])
    await m.schedule(["old.service"], TargetState.LOADED)  # a stop, which needs no reload
    await m.agent.reconcile()

    assert m.calls_for("new.service") == ["load"]  # written, but not started
    assert m.calls_for("old.service") == ["stop"]  # the other units go on
    assert m.calls_for("stays.service") == []
    assert m.agent.record.units["new.service"].state == TargetState.LOADED
    states = await m.published()
    assert states["new.service"].failed_task == "reload"
    assert "Reload() failed" in states["new.service"].error
    assert states["old.service"].failed_task == ""

    # In backoff: no reload, no start.
    assert await m.agent.reconcile() == 0
    assert m.calls_for("").count("reload") == 1  # the one that failed
    assert m.calls_for("new.service") == ["load"]

    # Its retry comes although no file is to be written now, and the start follows it.
    m.manager.fail_reload = False
    m.clock.now = m.agent.next_retry() or 0.0
    assert await m.agent.reconcile() == 2  # the daemon-reload, then the start
    assert m.manager.reloads == reloads + 1
    assert await m.manager.states(["new.service"]) == {"new.service": RUNNING}
    m.agent.publisher._observed.clear()
    state = (await m.published())["new.service"]
    assert (state.failed_task, state.error) == ("", "")


async def test_the_retry_timer_wakes_reconcile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No event, no safety pass (an hour away): the retry comes from the retry timer."""
    monkeypatch.setattr(agentplan, "RETRY_INITIAL", 0.02)
    kv = FakeKV()
    registry = Registry(kv)
    manager = FakeUnitManager(tmp_path / "units", fail_load={BAD}, record=True)
    lease = await kv.grant(60)
    body = parse_unit(BODY.format(i=BAD))
    await registry.create_unit(BAD, body, TargetState.LAUNCHED)
    await kv.txn([], [scheduled(registry, BAD, body.hash, TargetState.LAUNCHED)])
    agent = Agent(
        registry, manager, lambda: Machine.make(M1, "10.0.0.1"), FixedLease(lease),
        safety_interval=3600.0,
    )  # fmt: skip
    stop = asyncio.Event()
    runner = asyncio.ensure_future(agent.run(stop))
    try:
        await until(lambda: len(loads(manager)) >= 3)  # the first try and two retries
        manager.fail_load.clear()
        await until(lambda: manager._states.get(BAD) == RUNNING)
        await until(lambda: agent.publisher.published.get(BAD) is not None)
        await until(lambda: agent.publisher.published[BAD].error == "")
        settled = len(loads(manager))
        await asyncio.sleep(0.2)  # ten times the first wait: nothing is retried any more
        assert len(loads(manager)) == settled
    finally:
        stop.set()
        await asyncio.wait_for(runner, 5)


def loads(manager: FakeUnitManager) -> list[tuple[str, str]]:
    return [c for c in manager.calls if c == ("load", BAD)]


async def until(condition: Callable[[], bool]) -> None:
    """Poll `condition` (state of fakes, nothing to wait on) with a deadline of 5 s."""
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def test_the_retry_loop_does_not_spin_when_a_pass_cannot_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A due retry whose pass fails (etcd unreachable for a body) is tried once, not in a loop."""
    m = Machine1(tmp_path, fail_load={BAD})
    await m.schedule([BAD])
    await m.agent.reconcile()
    m.agent.synced = True
    passes = 0

    async def unreachable() -> int:
        nonlocal passes
        passes += 1
        raise RegistryUnavailable("fake etcd is unavailable")

    monkeypatch.setattr(m.agent, "reconcile", unreachable)
    m.clock.now = m.agent.next_retry() or 0.0
    stop = asyncio.Event()
    loop = asyncio.ensure_future(m.agent._retry_loop(stop))
    try:
        await until(lambda: passes == 1)
        await asyncio.sleep(0.05)
        assert passes == 1
        # A new failure (a new retry time) makes it look again.
        await _fail_again(m)
        m.clock.now = m.agent.next_retry() or 0.0
        m.agent._wake.set()
        await until(lambda: passes == 2)
    finally:
        stop.set()
        await asyncio.wait_for(loop, 5)


async def _fail_again(m: Machine1) -> None:
    previous = m.agent.executor.failures.by_unit[BAD]
    m.agent.executor.failures.by_unit[BAD] = failure_after(
        previous, previous.task, previous.error, m.clock.now, previous.wanted
    )


# ---- the pure parts ------------------------------------------------------------------------


def test_retry_delay_doubles_to_the_ceiling() -> None:
    assert [retry_delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert retry_delay(9) == 256.0
    assert retry_delay(10) == retry_delay(1000) == RETRY_CEILING == 300.0


def test_failure_after_counts_attempts_per_desire_and_cuts_long_errors() -> None:
    want = agentplan.DesiredUnit("a.service", "h1", TargetState.LAUNCHED)
    first = failure_after(None, TaskKind.LOAD, "x" * 1000, 10.0, want)
    assert (first.attempts, first.retry_at, len(first.error)) == (1, 11.0, agentplan.ERROR_MAX)
    assert first.error.endswith("...")
    second = failure_after(first, TaskKind.LOAD, "e", 11.0, want)
    assert (second.attempts, second.retry_at) == (2, 13.0)
    other = agentplan.DesiredUnit("a.service", "h2", TargetState.LAUNCHED)
    assert failure_after(second, TaskKind.LOAD, "e", 11.0, other).attempts == 1
    assert holds_back(second, 12.9, want)
    assert not holds_back(second, 13.0, want)  # due
    assert not holds_back(second, 12.0, other)  # desire changed
    assert not holds_back(None, 12.0, want)


def test_state_encoding_is_unchanged_for_healthy_units_and_round_trips_errors() -> None:
    healthy = UnitState("a.service", M1, "loaded", "active", "running", "h", TargetState.LAUNCHED)
    text = codec.encode_state(healthy)
    # Byte for byte what earlier releases wrote (and read: they ignore fields they lack).
    assert text == (
        '{"active":"active","agent_state":"launched","hash":"h","load":"loaded","sub":"running"}'
    )
    assert codec.decode_state("a.service", M1, text) == healthy
    failed = UnitState(
        "a.service", M1, "", "", "", "h", TargetState.INACTIVE, "load", "No space left on device"
    )
    assert codec.decode_state("a.service", M1, codec.encode_state(failed)) == failed
