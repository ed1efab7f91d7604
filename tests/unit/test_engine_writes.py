"""The engine's writes: sent many transactions at once, yet a moved unit is always gone from
its old machine before it appears on the new one (fleetd/engine/engine.py, Registry.fenced)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from fleetd.engine.engine import Engine
from fleetd.model import Machine, TargetState, Unit
from fleetd.registry.fake import FakeKV
from fleetd.registry.kv import KV, Delete, Put
from fleetd.registry.registry import Registry
from fleetd.unit.file import parse_unit

BODY = parse_unit("[Service]\nExecStart=/bin/sleep 1000\n")


class RecordingKV:
    """FakeKV, recording when each transaction starts and ends, and what it writes."""

    def __init__(self) -> None:
        self.inner = FakeKV()
        self.log: list[tuple[str, int, list[Any]]] = []
        self._next = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def txn(self, compares: Any, success: Any, failure: Any = ()) -> Any:
        n = self._next
        self._next += 1
        self.log.append(("start", n, list(success)))
        await asyncio.sleep(0)  # let the others start: concurrent ones overlap
        try:
            return await self.inner.txn(compares, success, failure)
        finally:
            self.log.append(("end", n, []))


async def test_unscheduling_lands_before_the_new_schedule_is_sent() -> None:
    kv = RecordingKV()
    registry = Registry(cast(KV, kv))
    await registry.ensure_schema()
    lease = await kv.inner.grant(60)
    assert await registry.register_machine(Machine.make("m2"), lease)
    token = await registry.campaign("m2", lease)
    assert token is not None
    # 300 units on m1, a machine that is gone: all must move to m2 (3 transactions of
    # deletes, 5 of new schedule and placement keys).
    ops = []
    for i in range(300):
        name = f"u{i:03d}.service"
        assert await registry.create_unit(name, BODY, TargetState.LAUNCHED)
        ops += registry.op_schedule(Unit(name, BODY.hash, TargetState.LAUNCHED), "m1")
    await registry.fenced(token, ops)

    async def current_lease() -> int:
        return lease

    engine = Engine(registry, "m2", current_lease)
    await engine._load()
    kv.log.clear()
    await engine._plan_and_apply(token)

    old_prefix = registry.keys.scheduled("m1", "")
    new_prefix = registry.keys.scheduled("m2", "")
    deletes = {
        n
        for kind, n, ops in kv.log
        if any(isinstance(op, Delete) and op.key.startswith(old_prefix) for op in ops)
    }
    puts = {
        n
        for kind, n, ops in kv.log
        if any(isinstance(op, Put) and op.key.startswith(new_prefix) for op in ops)
    }
    assert len(deletes) >= 2  # several transactions of each
    assert len(puts) >= 2
    order = [(kind, n) for kind, n, _ in kv.log]
    last_delete_end = max(order.index(("end", n)) for n in deletes)
    first_put_start = min(order.index(("start", n)) for n in puts)
    assert last_delete_end < first_put_start
    # ... and the transactions of each group went out together, not one by one.
    assert order.index(("start", max(deletes))) < order.index(("end", min(deletes)))
    scheduled, _ = await registry.machine_schedule("m2")
    assert len(scheduled) == 300
    gone, _ = await registry.machine_schedule("m1")
    assert gone == []
