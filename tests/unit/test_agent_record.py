"""The agent's record of what it did (units, hashes, loaded/launched, PartitionPolicy=stop),
kept on disk so a restarted fleetd neither restarts healthy units nor forgets what to fence.

It holds every unit, so it is written once per group of tasks of one kind, not once per task:
a write per task made starting 1,000 units quadratic. These tests pin what must hold anyway:
the file matches what was done after each reconcile, the PartitionPolicy of loaded units is on
disk before any of them starts, and a restarted agent reads it back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fleetd.agent import tasks as tasks_module
from fleetd.agent.agent import Agent
from fleetd.agent.record import AgentRecord
from fleetd.model import Machine, PartitionPolicy, TargetState
from fleetd.registry import codec
from fleetd.registry.fake import FakeKV
from fleetd.registry.kv import Put
from fleetd.registry.registry import Registry
from fleetd.systemd.fake import FakeUnitManager
from fleetd.unit.file import parse_unit
from tests.unit.fixed_lease import FixedLease

M1 = "113f16a7f2c54d35b3cde2e2ad5c2f10"
PLAIN = "[Unit]\nDescription=plain {i}\n\n[Service]\nExecStart=/bin/sleep 1000\n"
STOPPED = (
    "[Unit]\nDescription=fenced {i}\n\n[Service]\nExecStart=/bin/sleep 1000\n\n"
    "[X-Fleet]\nPartitionPolicy=stop\n"
)


class CheckedUnitManager(FakeUnitManager):
    """The fake systemd, calling `on_start` before each start."""

    def __init__(self, units_dir: Path, **kw: Any) -> None:
        super().__init__(units_dir, **kw)
        self.on_start: Callable[[str], None] = lambda name: None

    async def start(self, name: str) -> str:
        self.on_start(name)
        return await super().start(name)


async def scheduled_agent(
    tmp_path: Path, count: int, **faults: Any
) -> tuple[Agent, CheckedUnitManager, Path]:
    """An agent with `count` launched units on its schedule, every third PartitionPolicy=stop."""
    kv = FakeKV()
    registry = Registry(kv)
    ops = []
    for i in range(count):
        name = f"u{i:03d}.service"
        body = parse_unit((STOPPED if i % 3 == 0 else PLAIN).format(i=i))
        await registry.create_unit(name, body, TargetState.LAUNCHED)
        value = codec.encode_desired(body.hash, TargetState.LAUNCHED)
        ops.append(Put(registry.keys.scheduled(M1, name), value))
    await kv.txn([], ops)
    manager = CheckedUnitManager(tmp_path / "units", **faults)
    lease = await kv.grant(60)
    path = tmp_path / "state" / "agent.json"
    agent = Agent(
        registry,
        manager,
        lambda: Machine.make(M1, "10.0.0.1"),
        FixedLease(lease),
        record_path=path,
    )
    agent.scheduled = {s.name: s for s in (await registry.machine_schedule(M1))[0]}
    return agent, manager, path


def on_disk(path: Path) -> dict[str, dict[str, str]]:
    data: dict[str, dict[str, str]] = json.loads(path.read_text())
    return data


async def test_record_is_written_per_group_and_matches_what_was_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, manager, path = await scheduled_agent(tmp_path, 40)
    saves: list[dict[str, dict[str, str]]] = []
    started_before_policy_saved: list[str] = []
    save = AgentRecord.save

    def counting_save(record: AgentRecord) -> None:
        save(record)
        saves.append(on_disk(path))

    def check_start(name: str) -> None:
        # Every PartitionPolicy=stop unit that starts has its policy on disk already.
        on_file = saves[-1].get(name, {}) if saves else {}
        if int(name[1:4]) % 3 == 0 and on_file.get("partition") != PartitionPolicy.STOP.value:
            started_before_policy_saved.append(name)

    monkeypatch.setattr(AgentRecord, "save", counting_save)
    manager.on_start = check_start

    ran = await agent.reconcile()

    assert ran == 40 + 1 + 40  # loads, the daemon-reload, starts
    assert len(saves) == 3  # one write per group, not one per task
    assert started_before_policy_saved == []
    final = on_disk(path)
    assert set(final) == {f"u{i:03d}.service" for i in range(40)}
    assert {e["state"] for e in final.values()} == {TargetState.LAUNCHED.value}
    assert {n for n, e in final.items() if e.get("partition") == "stop"} == {
        f"u{i:03d}.service" for i in range(0, 40, 3)
    }
    assert await agent.reconcile() == 0  # planning again on the result: nothing to do

    # A restarted agent reads the record back: nothing to load or start again.
    again = Agent(
        agent.registry,
        manager,
        lambda: Machine.make(M1, "10.0.0.1"),
        FixedLease(1),
        record_path=path,
    )
    again.scheduled = agent.scheduled
    assert again.record.units == agent.record.units
    assert again.record.stop_policy == agent.record.stop_policy
    assert await again.reconcile() == 0


async def test_a_failed_task_still_records_the_ones_that_succeeded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent, _manager, path = await scheduled_agent(tmp_path, 6, fail_load=["u003.service"])
    monkeypatch.setattr(tasks_module, "TASK_CONCURRENCY", 1)  # tasks in order: u003 fails 4th
    await agent.reconcile()
    # The tasks after the failed one still ran (and were recorded); u003 alone is missing.
    final = on_disk(path)
    assert set(final) == {f"u{i:03d}.service" for i in range(6)} - {"u003.service"}
    assert {e["state"] for e in final.values()} == {TargetState.LAUNCHED.value}
