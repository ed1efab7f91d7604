"""From command-line arguments to units: local files, templates, names and globs.

`plan_units` is fleet's lazyCreateUnits (reference §1.4), used by submit, load and start: a
unit argument names a unit already in the cluster, a local unit file, or an instance
(`hello@3.service`) of a template found in the cluster or beside the argument. Every
argument is read and checked before anything is written; the command layer
(fleetctl/units.py) then writes the plan with `write_steps` (through etcd, one transaction)
and prints its lines.

`find_units` resolves arguments to existing units for stop, unload, destroy, restart and
status. Beyond fleet: an argument may be a glob (Go `path.Match`, as in [X-Fleet]: `*` does not
cross "/"), and an argument that matches nothing is reported instead of silently dropped.

Nothing here prints: what a command has to say comes back as data (a step's `warning` and
`done` lines, `Found.missing_lines`) and the command layer writes it, in its order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from fleetctl.client import ClusterClient, RegistryClient
from fleetctl.errors import CommandFailed
from fleetd.errors import FleetError, UnitFileError
from fleetd.model import TargetState
from fleetd.unit.file import MAX_UNIT_BYTES, UnitFile, parse_unit_bytes
from fleetd.unit.glob import glob_match
from fleetd.unit.names import UnitNameInfo, mangle_name, maybe_append_default_type, validate_name
from fleetd.unit.xfleet import (
    UnknownXFleetOption,
    check_requirements,
    unknown_xfleet_keys,
    validate_options,
)
from fleetd.views import UnitView

GLOB_CHARS = frozenset("*?[")

# Which desired states --replace may overwrite, per command (fleet's allowedReplace).
REPLACEABLE = {
    "submit": {TargetState.INACTIVE},
    "load": {TargetState.INACTIVE, TargetState.LOADED},
    "start": {TargetState.INACTIVE, TargetState.LOADED, TargetState.LAUNCHED},
}


def is_glob(arg: str) -> bool:
    return any(ch in GLOB_CHARS for ch in arg)


def valid_name(name: str) -> bool:
    """Whether fleet accepts `name` as a unit name (`validate_name`)."""
    try:
        validate_name(name)
    except FleetError:
        return False
    return True


def read_unit_file(path: str) -> UnitFile:
    """Parse a local unit file, refusing one over MAX_UNIT_BYTES (the API's default limit).

    Reads at most one byte past the limit: a huge file (or a FIFO, /dev/zero) must be refused,
    not read whole into memory first.
    """
    with open(path, "rb") as f:
        data = f.read(MAX_UNIT_BYTES + 1)
        if len(data) > MAX_UNIT_BYTES:
            size = max(os.fstat(f.fileno()).st_size, len(data))
            raise UnitFileError(f"unit file too large: {size} bytes (max {MAX_UNIT_BYTES})")
    return parse_unit_bytes(data)


@dataclass
class Created:
    """What lazy creation did, for the commands that go on to load or start."""

    names: list[str] = field(default_factory=list)  # every unit to act on, in argument order
    skipped: list[str] = field(default_factory=list)  # --replace refused: leave them alone
    # Units replaced in place while loaded or launched: their new hash must be what runs.
    replaced: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Step:
    """One argument of submit/load/start, decided but not yet carried out.

    `body` is what to write (None: nothing), with `state` the desired state to keep for a
    replacement (None: inactive); `warning` (lines) goes to stderr before the write, `done`
    to stdout after it.
    """

    name: str
    body: UnitFile | None = None
    state: TargetState | None = None
    warning: str = ""
    done: str = ""
    skipped: bool = False


@dataclass
class Plan:
    """Every step of one command, all of them checked before anything is written."""

    steps: list[Step] = field(default_factory=list)

    def created(self) -> Created:
        created = Created()
        for step in self.steps:
            if step.skipped:
                created.skipped.append(step.name)
                continue
            created.names.append(step.name)
            if step.body is not None and step.state not in (None, TargetState.INACTIVE):
                created.replaced[step.name] = step.body.hash
        return created


def check_names(args: Sequence[str], activate: bool) -> None:
    """Refuse bad names (and activating templates) before anything is written."""
    for arg in args:
        name = mangle_name(arg)
        try:
            validate_name(name)
        except FleetError as e:
            raise CommandFailed(f"Error creating units: {e}") from e
        info = UnitNameInfo.parse(name)
        if activate and info is not None and info.is_template:
            raise CommandFailed(f'Error creating units: cannot activate template "{name}"')


def _read_local(path: str, what: str) -> UnitFile | None:
    """A local unit file, or None if there is no such file (fleet's os.Stat test)."""
    if not os.path.exists(path):
        return None
    try:
        return read_unit_file(path)
    except (OSError, FleetError) as e:
        raise CommandFailed(f"Error creating units: failed getting {what} from file: {e}") from e


async def _local_body(
    client: ClusterClient, arg: str, name: str, planned: dict[str, UnitFile]
) -> tuple[UnitFile, str]:
    """The body for `name`, in fleet's order: the file `arg`; for an instance, its template
    from the cluster (or created earlier by this same command: `planned`), else the
    template file beside `arg`. Also says where it came from, for error messages."""
    body = _read_local(arg, f"Unit({name})")
    if body is not None:
        return body, ""
    info = UnitNameInfo.parse(name)
    if info is None or not info.is_instance:
        raise CommandFailed(
            f"Error creating units: unable to find Unit({name}) in Registry or on filesystem"
        )
    source = f" (from template {info.template})"
    if info.template in planned:
        return planned[info.template], source
    template = await client.unit(info.template)
    if template is not None:
        return template.unit_file, source
    path = os.path.join(os.path.dirname(arg), info.template)
    body = _read_local(path, f"template Unit({info.template})")
    if body is None:
        raise CommandFailed(
            f"Error creating units: unable to find Unit({name}) or template "
            f"Unit({info.template}) in Registry or on filesystem"
        )
    return body, source


def _difference_warning(arg: str, existing: UnitView) -> str:
    """Without --replace, the warning when the local file (or template) differs from the
    cluster's, or ""."""
    if os.path.exists(arg):
        try:
            local = read_unit_file(arg)
        except (OSError, FleetError):
            return ""
        if local.hash != existing.hash:
            return (
                f"WARNING: Unit {existing.name} in registry differs from local unit file {arg}."
                " Add --replace to override."
            )
        return ""
    info = UnitNameInfo.parse(existing.name)
    if info is None or not info.is_instance:
        return ""
    path = os.path.join(os.path.dirname(arg), info.template)
    try:
        template = read_unit_file(path)
    except (OSError, FleetError):
        return ""
    if template.hash != existing.hash:
        return (
            f"WARNING: Unit {existing.name} in registry differs from local template unit file"
            f" {info.template}. Add --replace to override."
        )
    return ""


def _check_body(
    client: ClusterClient, name: str, body: UnitFile, source: str, allow_unknown: bool
) -> str:
    """Everything a body to be written must pass, before the command writes anything:
    fleet's ValidateOptions (its messages unchanged), then the stricter [X-Fleet] checks.
    Returns fleet's warning lines for the unknown options --allow-unknown-options let in."""
    try:
        validate_options(body)
    except FleetError as e:
        raise CommandFailed(f"Error creating units: {e}") from e
    # The API refuses unknown options whatever fleetctl says, so with --driver api the flag
    # cannot help: refuse here, before anything is written, rather than halfway through.
    lenient = allow_unknown and isinstance(client, RegistryClient)
    try:
        check_requirements(body, name, allow_unknown=lenient)
    except UnknownXFleetOption as e:
        hint = (
            "; --allow-unknown-options does not apply with --driver api (the API refuses"
            " unknown options)"
            if allow_unknown
            else "; add --allow-unknown-options to submit it anyway"
        )
        raise CommandFailed(f"Error creating units: unit {name}{source}: {e}{hint}") from e
    except FleetError as e:
        raise CommandFailed(f"Error creating units: unit {name}{source}: {e}") from e
    return "\n".join(
        f'WARNING: Unit {name}: unrecognized requirement in [X-Fleet] section: "{key}"'
        for key in unknown_xfleet_keys(body)
    )


async def plan_units(
    client: ClusterClient,
    args: Sequence[str],
    *,
    command: str,
    replace: bool,
    allow_unknown: bool = False,
) -> Plan:
    """fleet's lazyCreateUnits, decided for every argument before anything is written.

    Reads every file and template and checks every body to be written (parse, size,
    options); the first problem is a CommandFailed and the cluster is left as it was. Unlike
    fleet, which wrote unit by unit and so left the units before a bad one created.
    """
    plan = Plan()
    seen: set[str] = set()
    planned: dict[str, UnitFile] = {}  # bodies this command will create, by name
    for raw in args:
        arg = maybe_append_default_type(raw)
        name = mangle_name(arg)
        if name in seen:
            continue
        seen.add(name)
        existing = await client.unit(name)
        if existing is None:
            body, source = await _local_body(client, arg, name, planned)
            warning = _check_body(client, name, body, source, allow_unknown)
            planned[name] = body
            plan.steps.append(Step(name, body, warning=warning, done=f"Unit {name} inactive"))
        elif not replace:
            plan.steps.append(Step(name, warning=_difference_warning(arg, existing)))
        else:
            plan.steps.append(
                await _replacement(client, arg, name, existing, command, planned, allow_unknown)
            )
    return plan


async def _replacement(
    client: ClusterClient,
    arg: str,
    name: str,
    existing: UnitView,
    command: str,
    planned: dict[str, UnitFile],
    allow_unknown: bool,
) -> Step:
    """--replace on an existing unit: nothing to do, refused for its state, or overwrite it
    keeping its desired state (the agent then swaps it in place; fleet reset it to inactive,
    stopping and rescheduling it first)."""
    body, source = await _local_body(client, arg, name, planned)
    if body.hash == existing.hash:
        return Step(name, done=f"Found same Unit({name}) in Registry, nothing to do")
    state = TargetState(existing.desired_state)
    if state not in REPLACEABLE[command]:
        return Step(
            name,
            warning=f"Warning: can not replace Unit({name}) in state"
            f" '{existing.desired_state}', use the appropriate command",
            skipped=True,
        )
    warning = _check_body(client, name, body, source, allow_unknown)
    planned[name] = body
    done = f"Unit {name} inactive" if state is TargetState.INACTIVE else ""
    return Step(name, body, state, warning=warning, done=done)


async def write_steps(client: ClusterClient, steps: Sequence[Step]) -> None:
    """Carry out the planned steps' writes (fleet's createUnit, after every check), all of
    them at once: through etcd one transaction, so a command's units land together."""
    writes = [(s.name, s.body, s.state) for s in steps if s.body is not None]
    if not writes:
        return
    try:
        await client.create_units(writes)
    except FleetError as e:
        names = ", ".join(name for name, _, _ in writes)
        raise CommandFailed(f"Error creating units: failed creating {names}: {e}") from e


def missing_line(arg: str) -> str:
    """fleet's line (stderr) for an argument that names no unit; for a glob, ours."""
    return f"No unit matches {arg}" if is_glob(arg) else f"Unit {mangle_name(arg)} not found"


@dataclass
class Found:
    units: list[UnitView]
    missing: list[str]  # arguments that matched nothing

    def missing_lines(self) -> list[str]:
        """One line per argument that matched nothing, in argument order (for stderr)."""
        return [missing_line(arg) for arg in self.missing]


def match_units(args: Sequence[str], units: Sequence[UnitView]) -> Found:
    """Pure part of `find_units`: arguments (names or globs) against the cluster's units."""
    by_name = {u.name: u for u in units}
    chosen: dict[str, UnitView] = {}
    missing = []
    for arg in args:
        if is_glob(arg):
            # As typed ("web@*", "*.socket"), or completed like a name: "web@?" also matches
            # as "web@?.service", the way "web@1" names "web@1.service".
            pattern, mangled = arg, mangle_name(arg)
            hits = [u for u in units if glob_match(pattern, u.name) or glob_match(mangled, u.name)]
        else:
            found = by_name.get(mangle_name(arg))
            hits = [found] if found is not None else []
        if not hits:
            missing.append(arg)
        for unit in hits:
            chosen.setdefault(unit.name, unit)
    return Found(list(chosen.values()), missing)


async def find_units(client: ClusterClient, args: Sequence[str]) -> Found:
    """The cluster's units the arguments name. Arguments that match nothing are in
    `missing`, for the command to report (and to fail on when nothing matched at all)."""
    try:
        units = await client.units()
    except FleetError as e:
        raise CommandFailed(f"Error retrieving list of units from repository: {e}") from e
    return match_units(args, units)
