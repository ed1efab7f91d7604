"""Moving the etcd layout from one schema version to the next: once, by the engine leader.

The keyspace records its layout version in `schema` (keys.py). A fleetd that finds a newer
version than it knows refuses to act (server.py exits with `schema_too_new`, units untouched):
it cannot know what its writes would break. An older version is migrated forward, one step at
a time, by the engine leader only, and only once every registered machine runs a release that
knows the target version: during a rolling upgrade the older fleetds still read the keyspace,
so a step may only add (expand); removing what older releases read is a later step's job,
after they are gone (contract).

Every step is idempotent (a leader deposed half-way leaves a half-done step that the next
leader redoes), and the version key moves with a compare-and-swap on the version it migrated
from, so two leaders in quick succession cannot both bump it.

Version 1 is the first layout: there is no step yet. A release that changes the layout adds
its step to STEPS and its version to SINCE.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from fleetd.errors import FleetError
from fleetd.log import get_logger
from fleetd.registry.keys import SCHEMA_VERSION as SCHEMA_VERSION
from fleetd.registry.kv import Compare, Put

if TYPE_CHECKING:
    from fleetd.registry.registry import Registry

log = get_logger(__name__)

Step = Callable[["Registry"], Awaitable[None]]
# STEPS[n] migrates a keyspace at version n to n + 1.
STEPS: Mapping[int, Step] = {}
# The first fleet release that knows each schema version: a step to it waits for every
# registered machine to run that release or a later one.
SINCE: Mapping[int, str] = {1: "0.1.0"}


class SchemaTooNew(FleetError):
    """The keyspace was written by a newer release than this one."""


def version_key(version: str) -> tuple[int, ...] | None:
    """The numeric core of a release ("v1.2.3-rc1+x" -> (1, 2, 3)); None if not one."""
    core = version.lstrip("v").split("+", 1)[0].split("-", 1)[0]
    try:
        return tuple(int(part) for part in core.split("."))
    except ValueError:
        return None


def blocking_machines(
    target: int, versions: Mapping[str, str], since: Mapping[int, str]
) -> list[str]:
    """Machines (id -> fleet version) whose release does not know schema `target`."""
    needed = version_key(since.get(target, "0"))
    return sorted(
        machine
        for machine, version in versions.items()
        if (found := version_key(version)) is None or needed is None or found < needed
    )


async def migrate(
    registry: Registry,
    found: int,
    *,
    target: int = SCHEMA_VERSION,
    steps: Mapping[int, Step] = STEPS,
    since: Mapping[int, str] = SINCE,
) -> int:
    """Run the steps from `found` up to `target` that every machine can take; the version
    the keyspace is at afterwards (below `target` while an older release still runs)."""
    current = found
    while current < target:
        step = steps.get(current)
        if step is None:
            # A layout older than any this release can migrate (hand-edited, or a release
            # skipped): lead on as it is rather than crash every leader in turn.
            log.error("schema_migration_missing", frm=current, to=current + 1)
            return current
        machines = await registry.list_machines()
        versions = {m.id: m.version for m in machines}
        waiting = blocking_machines(current + 1, versions, since)
        if waiting:
            log.info(
                "schema_migration_waiting",
                to=current + 1,
                machines=_short(waiting),
                reason="machines run a release that does not know the new layout",
            )
            return current
        log.info("schema_migration_started", frm=current, to=current + 1)
        await step(registry)
        key = registry.keys.schema
        moved = await registry.kv.txn(
            [Compare(key, "value", "==", str(current))], [Put(key, str(current + 1))]
        )
        if moved.succeeded:
            log.info("schema_migrated", frm=current, to=current + 1)
            current += 1
            continue
        # Someone else moved it (a leader before us): go on from what is stored now.
        stored = await registry.kv.get(key)
        value = stored.value if stored else ""
        if not value.isdecimal() or int(value) > target:
            raise SchemaTooNew(f"etcd schema version {value or '?'} appeared while migrating")
        current = int(value)
    return current


def _short(machines: Iterable[str]) -> list[str]:
    return [m[:8] for m in machines]
