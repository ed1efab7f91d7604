"""Unit names with path tricks in the registry, the engine and the agent.

Clients and the API refuse bad names (tests/unit/test_fleetctl_units.py, test_api_units.py),
and so does `Registry.create_unit`; only a direct etcd write (or a bug) puts a key like
`schedule/<machine>/../../etc/passwd` there. The engine must not schedule such a unit and the
agent must log and skip it: never write outside its units directory, and go on running every
other unit. (The unit managers' own refusal: test_systemd_fake.py, test_systemd_dbus_logic.py.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from fleetd.agent.agent import Agent
from fleetd.errors import InvalidUnitName
from fleetd.model import Machine, TargetState
from fleetd.registry import codec
from fleetd.registry.fake import FakeKV
from fleetd.registry.kv import Put
from fleetd.registry.registry import Registry
from fleetd.sim import SimCluster
from fleetd.systemd.fake import FakeUnitManager
from fleetd.systemd.manager import unit_path
from fleetd.unit.file import parse_unit
from tests.unit.fixed_lease import FixedLease

M1 = "113f16a7f2c54d35b3cde2e2ad5c2f10"
HELLO = "[Unit]\nDescription=Hello\n\n[Service]\nExecStart=/bin/sleep 1000\n"
BAD_NAMES = [
    "../../etc/passwd",
    "../escape.service",
    "sub/dir.service",
    "/abs.service",
    "nul\x00.service",
    "a..b.service",
    ".hidden.service",
    "x" * 300 + ".service",
]


class DiskUnitManager(FakeUnitManager):
    """The fake systemd, also writing each loaded unit's file where the real one would."""

    async def load(self, name: str, text: str, *, has_install: bool) -> None:
        await super().load(name, text, has_install=has_install)  # refuses unsafe names
        path = unit_path(self.units_dir, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


async def wait_for(cond: Callable[[], bool], what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


async def schedule(
    kv: FakeKV, registry: Registry, bad: Iterable[str], hash_: str, good: str = ""
) -> None:
    """Write schedule keys as the engine would, for this machine and as global units."""
    value = codec.encode_desired(hash_, TargetState.LAUNCHED)
    ops = [Put(registry.keys.scheduled(M1, good), value)] if good else []
    for name in bad:
        ops.append(Put(registry.keys.scheduled(M1, name), value))
        ops.append(Put(registry.keys.global_unit(name), value))
    await kv.txn([], ops)


def running(manager: FakeUnitManager, name: str) -> bool:
    state = manager._states.get(name)
    return state is not None and state.active_state == "active"


async def test_bad_scheduled_names_are_skipped_and_the_rest_runs(tmp_path: Path) -> None:
    kv = FakeKV()
    registry = Registry(kv)
    body = parse_unit(HELLO)
    await registry.create_unit("good.service", body, TargetState.LAUNCHED)
    root = tmp_path / "root"
    units_dir = root / "run" / "fleet" / "units"
    manager = DiskUnitManager(units_dir)
    lease = await kv.grant(60)
    agent = Agent(registry, manager, lambda: Machine.make(M1, "10.0.0.1"), FixedLease(lease))
    # Present before the agent's first read of its schedule...
    await schedule(kv, registry, BAD_NAMES[:4], body.hash, good="good.service")
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.ensure_future(agent.run(stop))
        try:
            await wait_for(lambda: running(manager, "good.service"), "good.service to run")
            # ... and arriving through the watch, beside a second good unit.
            await schedule(kv, registry, BAD_NAMES[4:], body.hash, good="later.service")
            await wait_for(lambda: running(manager, "later.service"), "later.service to run")
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

    assert set(manager.files) == {"good.service", "later.service"}
    assert set(agent.record.units) == {"good.service", "later.service"}
    assert files_under(root) == {
        "run/fleet/units/good.service",
        "run/fleet/units/later.service",
    }
    assert not any(e["event"] == "agent_task_failed" for e in logs)
    refused = {e["key"] for e in logs if e["event"] == "unit_name_refused"}
    for name in BAD_NAMES:
        assert registry.keys.scheduled(M1, name) in refused
        assert registry.keys.global_unit(name) in refused


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_registry_refuses_bad_names_before_writing(name: str) -> None:
    kv = FakeKV()
    registry = Registry(kv)
    for replace in (False, True):
        with pytest.raises(InvalidUnitName):
            await registry.create_unit(name, parse_unit(HELLO), replace=replace)
    assert kv.dump("/") == {}


async def test_engine_does_not_schedule_a_unit_with_a_bad_name(tmp_path: Path) -> None:
    kv = FakeKV()
    sim = SimCluster(kv, agent_ttl=1.0, safety_interval=0.5, state_dir=tmp_path)
    machine = sim.add(M1, public_ip="10.0.0.1")
    body = parse_unit(HELLO)
    await sim.client.create_unit("good.service", body)  # stores the body
    value = codec.encode_desired(body.hash, TargetState.LAUNCHED)
    keys = sim.client.keys
    with capture_logs() as logs:
        # One bad unit record before the engine's first read, one arriving as an event.
        await kv.txn([], [Put(keys.unit("../early.service"), value)])
        await sim.start_all()
        try:
            await wait_for(lambda: sim.leader() is not None, "an engine leader")
            await kv.txn([], [Put(keys.unit("late/x.service"), value)])
            await sim.client.set_target_state("good.service", TargetState.LAUNCHED)
            await wait_for(lambda: running(machine.manager, "good.service"), "good.service")
        finally:
            await sim.close()
    assert set(machine.manager.files) == {"good.service"}
    for prefix in ("placements/", "schedule/", "global/"):
        stored = kv.dump(keys.prefix + prefix)
        assert not any("early" in k or "late" in k for k in stored), stored
    refused = {e["key"] for e in logs if e["event"] == "unit_name_refused"}
    assert {keys.unit("../early.service"), keys.unit("late/x.service")} <= refused
