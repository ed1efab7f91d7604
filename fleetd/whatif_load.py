"""The registry read into the engine's view, for what-if questions (`plan`, `why`).

The I/O half of fleetd/engine/whatif.py: one snapshot of what the engine plans from, read as the
engine reads it when it takes the lead (engine.py `_load` and `_refresh`): units, machines and
their dynamic metadata through a `Mirror` that skips names fleet refuses, the schedule, the
global units and the placements as written, and each unit's requirements through the
registry's body cache. As in the engine, a unit whose body is missing or whose [X-Fleet] section
does not parse is left out of planning (listed as `unplanned`).

Used by fleetctl's etcd driver (RegistryClient) and by the API (fleetd/api/whatif.py), so the
two drivers answer from the same code. Nothing here writes: a plan changes nothing stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from fleetd.engine import whatif
from fleetd.engine.plan import EngineView
from fleetd.errors import InvalidInput
from fleetd.model import Unit
from fleetd.registry.mirror import Topic
from fleetd.registry.registry import Registry

T = TypeVar("T")
# Runs a pure, CPU-bound call; the API passes its executor (ApiContext.offload) so a plan of
# 10,000 units does not hold the event loop its agent and engine share.
Offload = Callable[..., Awaitable[Any]]


@dataclass
class Snapshot:
    view: EngineView  # what the engine plans from: units whose requirements read
    revision: int  # the oldest revision of the reads (every write before it is in the view)
    unplanned: dict[str, Unit] = field(default_factory=dict)  # left out: body unreadable


async def load_snapshot(registry: Registry) -> Snapshot:
    """Read the engine's view of the cluster, once (a handful of range reads)."""
    # What the engine follows (engine.py): units, machines and their metadata, names checked.
    mirror = registry.mirror(
        [Topic.UNITS, Topic.MACHINES, Topic.META, Topic.CORDONS], check_names=True
    )
    revision, schedule, (global_units, _), placements = await asyncio.gather(
        mirror.load(), registry.full_schedule(), registry.global_units(), registry.placements()
    )
    units = mirror.units
    await registry.fetch_bodies({u.hash for u in units.values()})
    requirements = {}
    unplanned = {}
    for name in sorted(units):
        unit = units[name]
        reqs = registry.cached_requirements(name, unit.hash)
        if reqs is None:
            reqs = await registry.requirements(name, unit.hash)
        if reqs is None:
            unplanned[name] = unit
        else:
            requirements[name] = reqs
    view = EngineView(
        units={n: u for n, u in units.items() if n in requirements},
        requirements=requirements,
        machines=mirror.machines_with_metadata(),
        globals={s.name: Unit(s.name, s.hash, s.target_state) for s in global_units},
        placements=placements,
        cordons=dict(mirror.cordons),
    )
    view.adopt_schedule(schedule)  # a drain in progress: its handoffs, as the engine reads them
    return Snapshot(view, revision, unplanned)


async def _inline(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


async def predict(
    registry: Registry,
    starts: Sequence[whatif.Start],
    kill: Sequence[str],
    *,
    drain: Sequence[str] = (),
    offload: Offload = _inline,
) -> whatif.Prediction:
    """What the engine would do if `starts` were started, the machines `kill` names (ids
    or unique prefixes) went away and those `drain` names were drained. InvalidInput for a
    bad unit or an unknown machine."""
    snapshot = await load_snapshot(registry)
    for start in starts:
        if start.body is None and start.name in snapshot.unplanned:
            raise InvalidInput(
                f"unit {start.name}: its stored unit file cannot be read; give the file"
            )
    change = whatif.hypothesis(snapshot.view, starts, kill, drain)
    prediction: whatif.Prediction = await offload(
        _predict, snapshot.view, change, snapshot.revision
    )
    if snapshot.unplanned:
        prediction = replace(prediction, unplanned=tuple(sorted(snapshot.unplanned)))
    return prediction


def _predict(view: EngineView, change: whatif.Hypothesis, revision: int) -> whatif.Prediction:
    return whatif.predict(view, change, revision=revision)


async def explain(
    registry: Registry, name: str, *, offload: Offload = _inline
) -> whatif.Explanation | None:
    """Why unit `name` is placed where it is, or not at all; None if there is no such unit."""
    snapshot = await load_snapshot(registry)
    unit = snapshot.unplanned.get(name)
    if unit is not None:
        return whatif.Explanation(
            name=name,
            desired_state=unit.target_state.value,
            is_global=False,
            machine_id=None,
            predicted=None,
            reason="its unit file is missing or its [X-Fleet] section does not parse",
            notes=("the engine leaves it out of planning: fleetctl cat shows what is stored",),
            revision=snapshot.revision,
        )
    if name not in snapshot.view.units:
        return None
    explanation: whatif.Explanation = await offload(
        _explain, snapshot.view, name, snapshot.revision
    )
    return explanation


def _explain(view: EngineView, name: str, revision: int) -> whatif.Explanation:
    return whatif.explain(view, name, revision=revision)
