"""fleet v1.0's etcd v2 keyspace, read and planned into ours: the pure part of
`fleetctl migrate-from-fleet` (fleetctl/migrate.py does the I/O).

fleet's layout under its prefix (default `/_coreos.com/fleet/`), from its registry package:

    job/<unit>/object            {"Name": <unit>, "UnitHash": [20 byte values]}  (jobModel)
    job/<unit>/target-state      inactive | loaded | launched                     (desired)
    job/<unit>/target            machine id the engine placed it on
    job/<unit>/job-state         machine id, heartbeat of a launched unit (TTL)
    unit/<sha1 hex>              {"Raw": <serialized unit file>}                  (unitModel)
    machines/<id>/object         {"ID", "PublicIP", "Metadata", "Capabilities", "Version"} (TTL)
    machines/<id>/metadata/<k>   dynamic metadata set through the API; "" = deleted
    states/<unit>/<machine>      published systemd states (TTL)
    engine/...                   the engine leader's lease

Only units (name, body, desired state) and dynamic machine metadata carry over. Placements,
heartbeats, published states and machine presence are the cluster's live state: the new
engine places units afresh and every fleetd registers its own machine.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from fleetd.errors import FleetError
from fleetd.model import TargetState
from fleetd.unit.file import UnitFile, parse_unit
from fleetd.unit.names import UnitNameInfo, validate_name
from fleetd.unit.xfleet import unknown_xfleet_keys, validate_options

DEFAULT_FLEET_PREFIX = "/_coreos.com/fleet/"
_HASH_BYTES = 20


class SourceError(FleetError):
    """fleet's keyspace could not be read at all (as opposed to one bad unit in it)."""


# ---- what fleet stored -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FleetUnit:
    """One `job/<name>/` directory of fleet's, with its body looked up."""

    name: str
    hash: str | None = None  # 40 hex chars, from the job object's UnitHash
    target_state: str | None = None  # raw target-state value; None if the key is missing
    target_machine: str | None = None  # where fleet's engine had placed it
    raw: str | None = None  # the body's Raw text (fleet's serialization of the options)
    problem: str | None = None  # why the unit cannot be read from fleet's keys


@dataclass(frozen=True, slots=True)
class FleetMachine:
    id: str
    public_ip: str = ""
    version: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)  # from fleet.conf (its object)
    dynamic: Mapping[str, str] = field(default_factory=dict)  # set through the API
    present: bool = False  # whether its presence object was there (fleetd alive)


@dataclass(frozen=True, slots=True)
class FleetKeyspace:
    units: tuple[FleetUnit, ...]
    machines: tuple[FleetMachine, ...]
    bodies: int  # unit/<hash> keys
    ignored: Mapping[str, int]  # other top-level directories -> how many keys (not migrated)


def _leaves(node: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(key, value) of every non-directory node under a v2 node, depth first."""
    stack = [node]
    while stack:
        current = stack.pop()
        if current.get("dir"):
            children = current.get("nodes") or []
            if not isinstance(children, list):
                raise SourceError(f"etcd v2 node {current.get('key')!r} has malformed children")
            stack.extend(reversed([c for c in children if isinstance(c, Mapping)]))
            continue
        key, value = current.get("key"), current.get("value")
        if isinstance(key, str) and isinstance(value, str):
            yield key, value


def _root(response: Mapping[str, Any]) -> Mapping[str, Any]:
    """The node of a v2 GET response (`{"action": "get", "node": ...}`), or a bare node."""
    node = response.get("node", response)
    if not isinstance(node, Mapping) or "key" not in node:
        raise SourceError("not an etcd v2 keys response (no node)")
    return node


def normalize_fleet_prefix(prefix: str) -> str:
    if not prefix.startswith("/"):
        raise SourceError(f"fleet's etcd prefix must start with '/': {prefix!r}")
    return prefix.rstrip("/") + "/"


def decode_unit_hash(value: Any) -> str:
    """fleet's unit.Hash is a [20]byte, which Go's JSON encodes as an array of 20 numbers."""
    if (
        isinstance(value, list)
        and len(value) == _HASH_BYTES
        and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in value)
    ):
        return bytes(value).hex()
    if isinstance(value, str) and len(value) == 2 * _HASH_BYTES:
        try:
            return bytes.fromhex(value).hex()
        except ValueError:
            pass
    raise ValueError(f"UnitHash is not a SHA1 hash: {json.dumps(value)[:80]}")


def _decode_job(name: str, value: str) -> tuple[str | None, str | None]:
    """(hash, problem) from a job object."""
    try:
        model = json.loads(value)
    except ValueError:
        return None, "job object is not JSON"
    if not isinstance(model, dict):
        return None, "job object is not a JSON object"
    if model.get("Name") != name:
        return None, f"job object names {model.get('Name')!r}, not {name!r}"
    try:
        return decode_unit_hash(model.get("UnitHash")), None
    except ValueError as e:
        return None, str(e)


def _decode_body(value: str) -> str | None:
    try:
        model = json.loads(value)
    except ValueError:
        return None
    raw = model.get("Raw") if isinstance(model, dict) else None
    return raw if isinstance(raw, str) else None


def parse_keyspace(
    response: Mapping[str, Any], prefix: str = DEFAULT_FLEET_PREFIX
) -> FleetKeyspace:
    """Everything of fleet's under `prefix` in a recursive v2 GET response."""
    prefix = normalize_fleet_prefix(prefix)
    jobs: dict[str, dict[str, str]] = {}
    bodies: dict[str, str | None] = {}
    machine_objects: dict[str, str] = {}
    machine_meta: dict[str, dict[str, str]] = {}
    ignored: dict[str, int] = {}
    for key, value in _leaves(_root(response)):
        if not key.startswith(prefix):
            continue
        parts = key[len(prefix) :].split("/")
        top = parts[0]
        if top == "job" and len(parts) == 3:
            jobs.setdefault(parts[1], {})[parts[2]] = value
        elif top == "unit" and len(parts) == 2:
            bodies[parts[1]] = _decode_body(value)
        elif top == "machines" and len(parts) == 3 and parts[2] == "object":
            machine_objects[parts[1]] = value
        elif top == "machines" and len(parts) == 4 and parts[2] == "metadata":
            machine_meta.setdefault(parts[1], {})[parts[3]] = value
        else:
            ignored[top] = ignored.get(top, 0) + 1
    units = tuple(_unit(name, jobs[name], bodies) for name in sorted(jobs))
    machine_ids = sorted(set(machine_objects) | set(machine_meta))
    machines = tuple(
        _machine(mid, machine_objects.get(mid), machine_meta.get(mid, {})) for mid in machine_ids
    )
    return FleetKeyspace(units, machines, len(bodies), dict(sorted(ignored.items())))


def _unit(name: str, keys: Mapping[str, str], bodies: Mapping[str, str | None]) -> FleetUnit:
    target_state = keys.get("target-state")
    target = keys.get("target") or None
    if "object" not in keys:
        # fleet itself ignores such a directory (dirToUnit returns no unit).
        return FleetUnit(name, None, target_state, target, problem="no job object in fleet")
    hash_, problem = _decode_job(name, keys["object"])
    if hash_ is None:
        return FleetUnit(name, None, target_state, target, problem=problem)
    if hash_ not in bodies:
        return FleetUnit(
            name, hash_, target_state, target, problem=f"fleet has no body unit/{hash_}"
        )
    raw = bodies[hash_]
    if raw is None:
        return FleetUnit(
            name, hash_, target_state, target, problem=f"body unit/{hash_} is not fleet's JSON"
        )
    return FleetUnit(name, hash_, target_state, target, raw)


def _machine(machine_id: str, obj: str | None, dynamic: Mapping[str, str]) -> FleetMachine:
    public_ip = version = ""
    metadata: dict[str, str] = {}
    if obj is not None:
        try:
            state = json.loads(obj)
        except ValueError:
            state = None
        if isinstance(state, dict):
            public_ip = str(state.get("PublicIP") or "")
            version = str(state.get("Version") or "")
            meta = state.get("Metadata")
            if isinstance(meta, dict):
                metadata = {str(k): str(v) for k, v in sorted(meta.items())}
    return FleetMachine(
        machine_id, public_ip, version, metadata, dict(sorted(dynamic.items())), obj is not None
    )


# ---- the plan --------------------------------------------------------------------------


class Action(Enum):
    CREATE = "create"
    IDENTICAL = "already identical"
    DIFFERS = "differs"
    SKIP = "skipped"


@dataclass(frozen=True, slots=True)
class Existing:
    """A unit already in our keyspace."""

    hash: str
    desired_state: str


@dataclass(frozen=True, slots=True)
class UnitStep:
    name: str
    action: Action
    detail: str
    unit_file: UnitFile | None = None  # for CREATE
    state: TargetState | None = None  # for CREATE
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MetadataStep:
    machine_id: str
    key: str
    value: str
    action: Action
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Plan:
    units: tuple[UnitStep, ...]
    metadata: tuple[MetadataStep, ...]
    notes: tuple[str, ...]

    @property
    def failed(self) -> bool:
        """Whether some unit is not (and will not be) in our keyspace as fleet had it."""
        return any(s.action in (Action.SKIP, Action.DIFFERS) for s in self.units)


def _short(hash_: str) -> str:
    return hash_[:7]


def _target_state(unit: FleetUnit) -> tuple[TargetState | None, str | None]:
    if unit.target_state is None:
        # fleet's CreateUnit always writes it; without it fleet reported no desired state.
        return TargetState.INACTIVE, None
    try:
        return TargetState(unit.target_state), None
    except ValueError:
        return None, f'invalid value "{unit.target_state}" for target-state'


def _check(unit: FleetUnit) -> tuple[UnitFile | None, TargetState | None, str]:
    """What submit would check, in its order: the name, the body, its options, the state.
    (unit file, state, "") or (None, None, why it cannot be migrated)."""
    if unit.problem is not None:
        return None, None, unit.problem
    try:
        validate_name(unit.name)
    except FleetError as e:
        return None, None, str(e)
    assert unit.raw is not None
    assert unit.hash is not None
    actual = hashlib.sha1(unit.raw.encode("utf-8", "surrogateescape")).hexdigest()
    if actual != unit.hash:
        return None, None, f"fleet's body unit/{unit.hash} does not hash to its key ({actual})"
    try:
        body = parse_unit(unit.raw)
        validate_options(body)
    except FleetError as e:
        return None, None, f"invalid unit file: {e}"
    if body.hash != unit.hash:
        return (
            None,
            None,
            (f"fleet-py reads the body as hash {_short(body.hash)}, fleet had {_short(unit.hash)}"),
        )
    state, problem = _target_state(unit)
    if state is None:
        return None, None, problem or "no desired state"
    info = UnitNameInfo.parse(unit.name)
    if state is not TargetState.INACTIVE and info is not None and info.is_template:
        return None, None, f'cannot activate template "{unit.name}" (desired state {state.value})'
    return body, state, ""


def plan_unit(unit: FleetUnit, existing: Existing | None) -> UnitStep:
    body, state, problem = _check(unit)
    if body is None or state is None:
        return UnitStep(unit.name, Action.SKIP, problem)
    warnings = tuple(
        f'unrecognized requirement in [X-Fleet] section: "{key}"'
        for key in unknown_xfleet_keys(body)
    )
    ours = f"hash {_short(body.hash)}, {state.value}"
    if existing is None:
        return UnitStep(unit.name, Action.CREATE, ours, body, state, warnings)
    if existing.hash == body.hash and existing.desired_state == state.value:
        return UnitStep(unit.name, Action.IDENTICAL, ours, warnings=warnings)
    theirs = f"hash {_short(existing.hash)}, {existing.desired_state}"
    return UnitStep(
        unit.name,
        Action.DIFFERS,
        f"fleet-py has {theirs}; fleet has {ours}: left as it is",
        warnings=warnings,
    )


def plan_metadata(
    machine: FleetMachine, ours: Mapping[str, str]
) -> tuple[list[MetadataStep], list[str]]:
    """Steps for a machine's dynamic metadata, and notes on what does not carry over."""
    steps = []
    notes = []
    for key, value in machine.dynamic.items():
        if value == "":
            notes.append(
                f"machine {machine.id} metadata {key}: not migrated: fleet's deletion marker"
                " (an empty value hiding the machine's own key); fleet-py has none, remove"
                f" {key} from that machine's `metadata` in fleet.conf instead"
            )
            continue
        current = ours.get(key)
        if current == value:
            steps.append(MetadataStep(machine.id, key, value, Action.IDENTICAL))
        elif current is None:
            steps.append(MetadataStep(machine.id, key, value, Action.CREATE))
        else:
            steps.append(
                MetadataStep(
                    machine.id,
                    key,
                    value,
                    Action.DIFFERS,
                    f"fleet-py has {current!r}: left as it is",
                )
            )
    return steps, notes


def plan(
    source: FleetKeyspace,
    existing: Mapping[str, Existing],
    existing_metadata: Mapping[str, Mapping[str, str]],
) -> Plan:
    units = tuple(plan_unit(u, existing.get(u.name)) for u in source.units)
    metadata: list[MetadataStep] = []
    notes: list[str] = []
    for machine in source.machines:
        steps, more = plan_metadata(machine, existing_metadata.get(machine.id, {}))
        metadata.extend(steps)
        notes.extend(more)
    present = [m for m in source.machines if m.present]
    if present:
        notes.append(
            f"{len(present)} machine(s) registered in fleet ("
            + ", ".join(_legend(m) for m in present)
            + "): not migrated: each fleetd registers its own machine when it starts, with the"
            " metadata of its own config"
        )
    placed = [u for u in source.units if u.target_machine]
    if placed:
        notes.append(
            f"{len(placed)} placement(s) of fleet's engine not migrated: fleet-py's engine"
            " places units afresh"
        )
    for top, count in source.ignored.items():
        notes.append(f"{count} key(s) under {top}/ not migrated (live state of fleet's agents)")
    return Plan(units, tuple(metadata), tuple(notes))


def _legend(machine: FleetMachine) -> str:
    legend = machine.id[:8]
    return f"{legend}/{machine.public_ip}" if machine.public_ip else legend


# ---- the report ------------------------------------------------------------------------


def _unit_line(step: UnitStep, applied: bool) -> str:
    verb = {Action.CREATE: "created" if applied else "create"}.get(step.action, step.action.value)
    sep = ":" if step.action is Action.SKIP or step.action is Action.DIFFERS else ""
    detail = f" ({step.detail})" if not sep else f": {step.detail}"
    return f"{step.name}: {verb}{detail}"


def _metadata_line(step: MetadataStep, applied: bool) -> str:
    verb = {Action.CREATE: "created" if applied else "create"}.get(step.action, step.action.value)
    line = f"machine {step.machine_id} metadata {step.key}={step.value}: {verb}"
    return f"{line}: {step.detail}" if step.detail else line


def report(plan_: Plan, *, applied: bool) -> list[str]:
    """The report's lines: one per unit, one per metadata key, the notes, a summary."""
    lines: list[str] = []
    for step in plan_.units:
        lines.append(_unit_line(step, applied))
        lines.extend(f"  warning: {w}" for w in step.warnings)
    lines.extend(_metadata_line(s, applied) for s in plan_.metadata)
    lines.extend(f"note: {n}" for n in plan_.notes)
    lines.append(summary(plan_, applied=applied))
    return lines


def _count(steps: Sequence[UnitStep], action: Action) -> int:
    return sum(1 for s in steps if s.action is action)


def summary(plan_: Plan, *, applied: bool) -> str:
    units = plan_.units
    created = _count(units, Action.CREATE)
    meta = sum(1 for s in plan_.metadata if s.action is Action.CREATE)
    text = (
        f"{'Created' if applied else 'Would create'} {created} unit(s) and {meta} metadata"
        f" key(s); {_count(units, Action.IDENTICAL)} unit(s) already identical,"
        f" {_count(units, Action.DIFFERS)} differ, {_count(units, Action.SKIP)} skipped."
    )
    if not applied:
        text += " Dry run: nothing was written; run again with --apply to write."
    return text
