"""Garbage collection of unit bodies no unit refers to any more.

Bodies are content-addressed (`bodies/<sha1>`, keys.py) and shared: template instances, and any
two units with the same text, name one body. `fleetctl submit --replace`, `start --replace` and
`destroy` change or delete a unit record but, before this module, never its body, so every
replace left an orphan behind forever.

What counts as a reference: a `units/<name>` record naming the hash. The engine's projections
(`schedule/`, `global/`) copy the hash from the unit record and are rewritten or deleted by the
engine once the record changes, so a projection naming a body no record names is stale: the
agent running it holds the body in its cache (bodies never change, `Registry._bodies`), and an
agent without it leaves the unit out of its plan, which is what the engine's next write (the
replacement, or the removal) asks of it anyway.

Why it is race-free (the invariant the collector and every submitter keep together):

1. A submitter writes the body in the same transaction as the unit record, always, even when
   the body exists already (`Registry.create_unit`). So a body's mod_revision moves whenever
   any unit starts to refer to it, and no unit record ever names a body that was absent when
   the record was written.
2. The collector reads each candidate body's mod_revision FIRST (revision R1), and the unit
   records AFTER (R2 >= R1). A body no record names at R2 is deleted in a transaction guarded
   by `mod_revision == <what was read at R1>`.

Take any record that names the body when the delete applies. Either it was written before R2:
then the read at R2 saw it (a record that existed at R2 and still exists was not rewritten, or
was rewritten after R2), so the collector would not have tried; or it was written after R1:
then its transaction re-put the body (1.), so the body's mod_revision is no longer the one read
at R1 and the guard refuses the delete. (A record written between R1 and R2 is caught by both.)
Hence a delete that applies never leaves a record pointing at a missing body.

Who collects: the engine leader (`sweep_orphaned_bodies`), when it takes the lead and then
after churn: a unit destroyed or given a new body, once the units have been quiet for
SWEEP_QUIET seconds (or SWEEP_INTERVAL after the first change, under a stream that never
pauses). An idle cluster never sweeps, and a destroy or replace costs what it did in fleet:
releasing at once would cost each one a read of every unit record (10,000 destroys of a
10,000-unit cluster: 10^8 records read).

A writer of 0.1.x reuses an existing body without re-putting it, so against it (1.) fails: if
its reuse lands between the sweep's read of the records and the guarded delete (one round
trip), its unit names a missing body (`unit_body_missing` in the journal; `fleetctl submit
--replace` of the same file restores it). The sweep therefore waits until every registered
machine runs a release that keeps (1.), as schema migrations do; workstations' fleetctl should
be upgraded too (CHANGELOG).

An unreadable unit record might name any body: while one exists nothing is collected (logged
as `body_sweep_skipped`), rather than guess.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from fleetd.errors import FleetError
from fleetd.log import get_logger
from fleetd.registry import codec
from fleetd.registry.codec import CorruptValue
from fleetd.registry.kv import KeyValue
from fleetd.registry.migrations import version_key

if TYPE_CHECKING:
    from fleetd.registry.registry import Registry

log = get_logger(__name__)

# The first release whose submitters re-put the body with every unit record (invariant 1.).
KEEPS_BODIES_SINCE = "0.2.0"

# When the engine leader sweeps after units were destroyed or replaced (seconds): once they
# have been quiet this long, and at the latest this long after the first such change. A sweep
# reads every body key (without values) and every unit record.
SWEEP_QUIET = 10.0
SWEEP_INTERVAL = 600.0

_HASH = re.compile(r"[0-9a-f]{40}")


class UnreadableRecord(FleetError):
    """A unit record whose hash cannot be decoded: it may name any body."""


def referenced_hashes(unit_kvs: Iterable[KeyValue]) -> set[str]:
    """The body hashes the `units/` records name. Raises UnreadableRecord on a record that
    does not decode: the caller then collects nothing."""
    out = set()
    for kv in unit_kvs:
        try:
            hash_, _ = codec.decode_desired(kv.value)
        except CorruptValue as e:
            raise UnreadableRecord(f"unit record {kv.key} does not decode: {e}") from e
        out.add(hash_)
    return out


def orphaned_bodies(bodies: Mapping[str, int], referenced: set[str]) -> dict[str, int]:
    """Of `bodies` (hash -> mod_revision, read before `referenced`), those no record names,
    with the mod_revision their guarded delete must compare. Pure.

    Only keys that look like fleet's hashes (40 lowercase hex characters) are ever candidates:
    anything else under `bodies/` was not written by fleet, and is left alone.
    """
    return {
        hash_: mod
        for hash_, mod in bodies.items()
        if hash_ not in referenced and _HASH.fullmatch(hash_)
    }


def blocking_writers(versions: Mapping[str, str]) -> list[str]:
    """Machines (id -> fleet version) whose release reuses bodies without re-putting them."""
    needed = version_key(KEEPS_BODIES_SINCE)
    assert needed is not None
    return sorted(
        machine
        for machine, version in versions.items()
        if (found := version_key(version)) is None or found < needed
    )


async def sweep_orphaned_bodies(registry: Registry) -> list[str]:
    """Delete every body no unit record names; the hashes deleted, sorted.

    For the engine leader, every SWEEP_INTERVAL seconds (and it may run on any machine: each
    delete is guarded, so two sweeps at once, or a sweep beside a submit, stay correct).
    Nothing is deleted while a registered machine runs fleetd older than KEEPS_BODIES_SINCE or
    a unit record does not decode. Raises RegistryUnavailable like any registry call.
    """
    machines = await registry.list_machines()
    waiting = blocking_writers({m.id: m.version for m in machines})
    if waiting:
        log.info(
            "body_sweep_waiting",
            machines=[m[:8] for m in waiting],
            reason=f"machines run fleetd older than {KEEPS_BODIES_SINCE}",
        )
        return []
    keys = registry.keys
    # Order matters (module docstring): bodies' revisions first, unit records after.
    body_kvs, _ = await registry.kv.range(keys.bodies, keys_only=True)
    bodies = {keys.tail(kv.key, keys.bodies): kv.mod_revision for kv in body_kvs}
    if not bodies:
        return []
    deleted = await registry.delete_orphaned_bodies(bodies)
    if deleted:
        log.info("bodies_collected", count=len(deleted), hashes=[h[:7] for h in deleted])
    return deleted
