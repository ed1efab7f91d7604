"""fleet API v1-shaped views of the cluster, shared by fleetctl and the HTTP API server.

fleet's clients see three entities (schema/v1-gen.go): Unit, UnitState and Machine. Our registry
stores something else (desired state, content-addressed bodies, engine placements, published
states), so this module joins those records into the entities once, for both consumers:

- `build_unit_views` etc. are pure: records in, views out (table-tested).
- `load_unit_views` etc. read the registry with one range request per key prefix, never one
  request per unit, so `list-unit-files` and the API's `GET /units` cost the same for 10 or
  1000 units.
- `*_to_api` / `*_from_api` convert to and from the API's JSON objects (omitempty, keys in
  alphabetical order, as fleet's generated schema code emits them).

currentState (fleet's registry/job_state.go, in our terms): a non-global unit is `inactive`
unless it is placed on a machine that publishes a state for it; then it is the `agent_state`
that machine reports (`loaded` or `launched`). Global units have no single machine, so their
views carry neither currentState nor machineID.

Beyond fleet: a unit the engine cannot place carries the engine's `reason` (API field
`reason`, omitted when empty; fleet's clients ignore unknown fields), and a unit state whose
task failed on its machine carries `failedTask` and `error` (likewise omitted when empty).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleetd.errors import InvalidInput, UnitFileError
from fleetd.model import Cordon, Machine, Placement, TargetState, Unit, UnitState
from fleetd.omitempty import omit_empty
from fleetd.registry.registry import Registry
from fleetd.unit.file import XFLEET_SECTION, UnitFile, UnitOption
from fleetd.unit.xfleet import requirements

_GLOBAL = "Global"  # the [X-Fleet] key that makes a unit global


@dataclass(frozen=True, slots=True)
class UnitView:
    """fleet's API `Unit`, plus what our registry knows beyond it (hash, is_global, reason)."""

    name: str
    options: tuple[UnitOption, ...]
    desired_state: str
    current_state: str | None  # None for global units (no single machine)
    machine_id: str | None  # where it is placed; None if unplaced or global
    is_global: bool
    hash: str  # sha1 of the serialized options, 40 hex chars
    reason: str = ""  # why the engine cannot place it, when it cannot

    @property
    def unit_file(self) -> UnitFile:
        return UnitFile(self.options)


@dataclass(frozen=True, slots=True)
class MachineView:
    """fleet's API `Machine`, plus whether it takes new units (beyond fleet: cordon, drain)."""

    id: str
    primary_ip: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    cordon: Cordon | None = None  # set while the machine is cordoned (or draining)

    @property
    def schedulable(self) -> bool:
        return self.cordon is None


@dataclass(frozen=True, slots=True)
class StateView:
    """fleet's API `UnitState`: systemd's state of one unit on one machine."""

    name: str
    machine_id: str
    hash: str
    load: str
    active: str
    sub: str
    failed_task: str = ""  # beyond fleet: the agent's failed task for it ("load", "start"...)
    error: str = ""  # ... and its error; both empty while its tasks succeed


# ---- pure joins ----------------------------------------------------------------------------


def current_state(
    unit: Unit,
    placement: Placement | None,
    states: Mapping[tuple[str, str], UnitState],
) -> tuple[str, str | None]:
    """(currentState, machineID) of a non-global unit: see the module docstring."""
    if placement is None or placement.machine_id is None:
        return TargetState.INACTIVE.value, None
    state = states.get((unit.name, placement.machine_id))
    current = state.agent_state.value if state is not None else TargetState.INACTIVE.value
    return current, placement.machine_id


def is_global_unit(body: UnitFile, name: str) -> bool:
    """`Global=` of a stored unit. A body whose [X-Fleet] no longer validates (a newer release
    wrote it) is shown as non-global rather than breaking every listing."""
    # Without a Global= option the answer is False whatever else [X-Fleet] holds; skipping
    # the full requirements parse for such units (nearly all) halves the cost of decoding a
    # 10,000-unit listing.
    if not any(o.name == _GLOBAL and o.section == XFLEET_SECTION for o in body.options):
        return False
    try:
        return requirements(body, name).is_global
    except UnitFileError:
        return False


def build_unit_view(
    unit: Unit,
    body: UnitFile,
    placement: Placement | None,
    states: Mapping[tuple[str, str], UnitState],
) -> UnitView:
    is_global = is_global_unit(body, unit.name)
    if is_global:
        current: str | None = None
        machine_id: str | None = None
    else:
        current, machine_id = current_state(unit, placement, states)
    # An unplaced unit says why; a placed one only when a drain cannot move it (why it stays).
    reason = placement.reason if placement is not None else ""
    return UnitView(
        name=unit.name,
        options=body.options,
        desired_state=unit.target_state.value,
        current_state=current,
        machine_id=machine_id,
        is_global=is_global,
        hash=unit.hash,
        reason="" if is_global else reason,
    )


def build_unit_views(
    units: Iterable[Unit],
    bodies: Mapping[str, UnitFile],
    placements: Mapping[str, Placement],
    states: Iterable[UnitState],
) -> list[UnitView]:
    """Unit views sorted by name. A unit whose body is missing is left out, as fleet does."""
    by_key = {(s.name, s.machine_id): s for s in states}
    views = []
    for unit in sorted(units, key=lambda u: u.name):
        body = bodies.get(unit.hash)
        if body is None:
            continue
        views.append(build_unit_view(unit, body, placements.get(unit.name), by_key))
    return views


def machine_view(machine: Machine, cordon: Cordon | None = None) -> MachineView:
    return MachineView(machine.id, machine.public_ip, machine.metadata_dict, cordon)


def state_view(state: UnitState) -> StateView:
    return StateView(
        name=state.name,
        machine_id=state.machine_id,
        hash=state.hash,
        load=state.load_state,
        active=state.active_state,
        sub=state.sub_state,
        failed_task=state.failed_task,
        error=state.error,
    )


# ---- registry reads ------------------------------------------------------------------------


async def load_unit_views(registry: Registry) -> list[UnitView]:
    """Every unit, sorted by name; bodies through the registry's cache (bodies.py)."""
    if len(registry.bodies):
        units, placements, states = await asyncio.gather(
            registry.list_units(), registry.placements(), registry.list_states()
        )
        bodies = await registry.fetch_bodies({u.hash for u in units})
        return build_unit_views(units, bodies, placements, states)
    # Nothing cached (a fresh fleetctl, a new API server): every body will be wanted, which
    # (beyond a single unit) `fetch_bodies` reads by ranging the whole prefix, so range it
    # beside the records instead of after them.
    units, placements, states, (kvs, _) = await asyncio.gather(
        registry.list_units(),
        registry.placements(),
        registry.list_states(),
        registry.body_records(),
    )
    hashes = {u.hash for u in units}
    registry.absorb_bodies(kvs, hashes)
    bodies = {h: body for h in hashes if (body := registry.bodies.get(h)) is not None}
    return build_unit_views(units, bodies, placements, states)


async def load_unit_view(registry: Registry, name: str) -> UnitView | None:
    """One unit, or None if it does not exist (or its body is missing)."""
    unit, placement, states = await asyncio.gather(
        registry.get_unit(name), registry.placement(name), registry.list_states(unit=name)
    )
    if unit is None:
        return None
    body = (await registry.fetch_bodies({unit.hash})).get(unit.hash)
    if body is None:
        return None
    return build_unit_view(unit, body, placement, {(s.name, s.machine_id): s for s in states})


async def load_machine_views(registry: Registry) -> list[MachineView]:
    """Registered machines, sorted by id."""
    machines, cordons = await asyncio.gather(registry.list_machines(), registry.cordons())
    return [machine_view(m, cordons.get(m.id)) for m in sorted(machines, key=lambda m: m.id)]


async def load_state_views(
    registry: Registry, unit: str | None = None, machine_id: str | None = None
) -> list[StateView]:
    """Published states, sorted by (unit name, machine id), optionally filtered exactly."""
    states = await registry.list_states(unit=unit, machine_id=machine_id)
    return [state_view(s) for s in sorted(states, key=lambda s: (s.name, s.machine_id))]


# ---- API v1 JSON ---------------------------------------------------------------------------


def option_to_api(option: UnitOption) -> dict[str, str]:
    return omit_empty({"name": option.name, "section": option.section, "value": option.value})


def unit_to_api(view: UnitView) -> dict[str, Any]:
    return omit_empty(
        {
            "currentState": view.current_state,
            "desiredState": view.desired_state,
            "machineID": view.machine_id,
            "name": view.name,
            "options": [option_to_api(o) for o in view.options],
            "reason": view.reason,
        }
    )


def state_to_api(view: StateView) -> dict[str, str]:
    return omit_empty(
        {
            "hash": view.hash,
            "machineID": view.machine_id,
            "name": view.name,
            "systemdActiveState": view.active,
            "systemdLoadState": view.load,
            "systemdSubState": view.sub,
            "failedTask": view.failed_task,
            "error": view.error,
        }
    )


def cordon_to_api(cordon: Cordon) -> dict[str, Any]:
    return {
        "deadline": cordon.deadline,
        "drain": cordon.drain,
        "includeGlobal": cordon.include_global,
        "reason": cordon.reason,
        "since": cordon.since,
    }


def cordon_from_api(machine_id: str, obj: Any) -> Cordon:
    """A cordon from an API body: {"reason", "drain", "deadline"} (each optional)."""
    obj = _object(obj, "Cordon")
    unknown = sorted(set(obj) - {"reason", "drain", "deadline", "since", "includeGlobal"})
    if unknown:
        raise InvalidInput(f"Cordon: unknown field {unknown[0]!r}")
    flags = {}
    for name in ("drain", "includeGlobal"):
        flag = obj.get(name, False)
        if not isinstance(flag, bool):
            raise InvalidInput(f"Cordon: field {name!r} must be a boolean, got {flag!r}")
        flags[name] = flag
    numbers = {}
    for name in ("deadline", "since"):
        value = obj.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise InvalidInput(f"Cordon: field {name!r} must be a number >= 0, got {value!r}")
        numbers[name] = float(value)
    return Cordon(
        machine_id,
        reason=_field(obj, "reason", "Cordon"),
        since=numbers["since"],
        drain=flags["drain"],
        deadline=numbers["deadline"],
        include_global=flags["includeGlobal"],
    )


def machine_to_api(view: MachineView) -> dict[str, Any]:
    obj = omit_empty({"id": view.id, "metadata": dict(view.metadata), "primaryIP": view.primary_ip})
    if view.cordon is not None:
        # Beyond fleet, and only when cordoned: a fleet client sees the Machine it knows.
        obj["cordon"] = cordon_to_api(view.cordon)
        obj["schedulable"] = False
    return obj


def _field(obj: Mapping[str, Any], name: str, entity: str) -> str:
    value = obj.get(name, "")
    if not isinstance(value, str):
        raise InvalidInput(f"{entity}: field {name!r} must be a string, got {value!r}")
    return value


def _object(obj: Any, entity: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise InvalidInput(f"{entity}: expected a JSON object, got {obj!r}")
    return obj


@functools.lru_cache(maxsize=4096)
def _option(section: str, name: str, value: str) -> UnitOption:
    # Units share most of their options (ExecStart=..., template instances share all): one
    # object per distinct option saves a frozen dataclass construction per option per unit.
    return UnitOption(section, name, value)


def _unit_file(options: list[Any]) -> UnitFile:
    """The unit of an API `Unit`'s options; the API omits empty values (a missing "value").

    The common case (objects of ASCII strings) is built directly; anything else goes through
    `UnitFile.from_options`, which has the exact checks and error messages.
    """
    built = []
    for o in options:
        if type(o) is not dict:
            break
        section, name, value = o.get("section"), o.get("name"), o.get("value", "")
        if not (
            type(section) is str
            and type(name) is str
            and type(value) is str
            and section.isascii()
            and name.isascii()
            and value.isascii()
        ):
            break
        built.append(_option(section, name, value))
    else:
        return UnitFile(tuple(built))
    return UnitFile.from_options({"value": "", **_object(o, "UnitOption")} for o in options)


def unit_from_api(obj: Any) -> UnitView:
    """A UnitView from an API `Unit`; the hash and globality are derived from the options,
    as fleetctl does (the API does not carry them)."""
    obj = _object(obj, "Unit")
    options = obj.get("options") or []
    if not isinstance(options, list):
        raise InvalidInput(f"Unit: field 'options' must be a list, got {options!r}")
    body = _unit_file(options)
    name = _field(obj, "name", "Unit")
    return UnitView(
        name=name,
        options=body.options,
        desired_state=_field(obj, "desiredState", "Unit"),
        current_state=_field(obj, "currentState", "Unit") or None,
        machine_id=_field(obj, "machineID", "Unit") or None,
        is_global=is_global_unit(body, name),
        hash=body.hash,
        reason=_field(obj, "reason", "Unit"),
    )


def state_from_api(obj: Any) -> StateView:
    obj = _object(obj, "UnitState")
    return StateView(
        name=_field(obj, "name", "UnitState"),
        machine_id=_field(obj, "machineID", "UnitState"),
        hash=_field(obj, "hash", "UnitState"),
        load=_field(obj, "systemdLoadState", "UnitState"),
        active=_field(obj, "systemdActiveState", "UnitState"),
        sub=_field(obj, "systemdSubState", "UnitState"),
        failed_task=_field(obj, "failedTask", "UnitState"),
        error=_field(obj, "error", "UnitState"),
    )


def machine_from_api(obj: Any) -> MachineView:
    obj = _object(obj, "Machine")
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidInput(f"Machine: field 'metadata' must map strings to strings: {metadata!r}")
    machine_id = _field(obj, "id", "Machine")
    cordon = obj.get("cordon")
    return MachineView(
        id=machine_id,
        primary_ip=_field(obj, "primaryIP", "Machine"),
        metadata=dict(metadata),
        cordon=None if cordon is None else cordon_from_api(machine_id, cordon),
    )
