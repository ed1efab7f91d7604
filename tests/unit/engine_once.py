"""The real engine, run once over a registry: load, plan, write (for tests that need the state
an engine leader would have written, e.g. the what-if tests). Not a test module."""

from __future__ import annotations

from fleetd.engine.engine import Engine
from fleetd.registry.registry import Registry

ENGINE_MACHINE = "e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0"


async def run_engine_once(registry: Registry) -> int:
    """Campaign, load everything, plan and apply once, resign. Returns the writes made."""
    await registry.ensure_schema()
    lease = await registry.grant_lease(3600)
    token = await registry.campaign(ENGINE_MACHINE, lease)
    assert token is not None, "another engine leads"

    async def current_lease() -> int:
        return lease

    engine = Engine(registry, ENGINE_MACHINE, current_lease)
    try:
        await engine._load()
        await engine._plan_and_apply(token)
    finally:
        await registry.resign(token)
        await registry.revoke_lease(lease)
    return engine.stats.writes
