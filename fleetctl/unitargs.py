"""From command-line arguments to units: local files, templates, names and globs.

`lazy_create_units` is fleet's lazyCreateUnits (reference §1.4), used by submit, load and
start: a unit argument names a unit already in the cluster, a local unit file, or an
instance (`hello@3.service`) of a template found in the cluster or beside the argument.

`find_units` resolves arguments to existing units for stop, unload, destroy, restart and
status. Beyond fleet: an argument may be a glob (Go `path.Match`, as in [X-Fleet]: `*` does not
cross "/"), and an argument that matches nothing is reported instead of silently dropped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import click

from fleetctl.client import ClusterClient
from fleetctl.errors import CommandFailed
from fleetd.errors import FleetError, UnitFileError
from fleetd.model import TargetState
from fleetd.unitfile import (
    MAX_UNIT_BYTES,
    UnitFile,
    UnitNameInfo,
    glob_match,
    mangle_name,
    maybe_append_default_type,
    parse_unit_bytes,
    unknown_xfleet_keys,
    validate_name,
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


async def _local_body(client: ClusterClient, arg: str, name: str) -> UnitFile:
    """The body for `name`, in fleet's order: the file `arg`; for an instance, its template
    from the cluster, else the template file beside `arg`."""
    body = _read_local(arg, f"Unit({name})")
    if body is not None:
        return body
    info = UnitNameInfo.parse(name)
    if info is None or not info.is_instance:
        raise CommandFailed(
            f"Error creating units: unable to find Unit({name}) in Registry or on filesystem"
        )
    template = await client.unit(info.template)
    if template is not None:
        return template.unit_file
    path = os.path.join(os.path.dirname(arg), info.template)
    body = _read_local(path, f"template Unit({info.template})")
    if body is None:
        raise CommandFailed(
            f"Error creating units: unable to find Unit({name}) or template "
            f"Unit({info.template}) in Registry or on filesystem"
        )
    return body


def _warn_if_different(arg: str, existing: UnitView) -> None:
    """Without --replace, say when the local file (or template) differs from the cluster's."""
    if os.path.exists(arg):
        try:
            local = read_unit_file(arg)
        except (OSError, FleetError):
            return
        if local.hash != existing.hash:
            click.echo(
                f"WARNING: Unit {existing.name} in registry differs from local unit file {arg}."
                " Add --replace to override.",
                err=True,
            )
        return
    info = UnitNameInfo.parse(existing.name)
    if info is None or not info.is_instance:
        return
    path = os.path.join(os.path.dirname(arg), info.template)
    try:
        template = read_unit_file(path)
    except (OSError, FleetError):
        return
    if template.hash != existing.hash:
        click.echo(
            f"WARNING: Unit {existing.name} in registry differs from local template unit file"
            f" {info.template}. Add --replace to override.",
            err=True,
        )


async def _create(
    client: ClusterClient, name: str, body: UnitFile, state: TargetState | None
) -> None:
    """fleet's createUnit: validate on the client, warn on unknown [X-Fleet] keys, write."""
    try:
        validate_options(body)
    except FleetError as e:
        raise CommandFailed(f"Error creating units: {e}") from e
    for key in unknown_xfleet_keys(body):
        click.echo(
            f'WARNING: Unit {name}: unrecognized requirement in [X-Fleet] section: "{key}"',
            err=True,
        )
    try:
        await client.create_unit(name, body, state)
    except FleetError as e:
        raise CommandFailed(f"Error creating units: failed creating unit {name}: {e}") from e


async def lazy_create_units(
    client: ClusterClient, args: Sequence[str], *, command: str, replace: bool
) -> Created:
    """Make sure every argument names a unit in the cluster (reference §1.4).

    New units are created `inactive` and reported as `Unit <n> inactive`, as fleet does. With
    --replace, a changed unit is overwritten *keeping its desired state*, so the agent swaps
    it in place (fleet reset it to inactive, stopping and rescheduling it first).
    """
    created = Created()
    for raw in args:
        arg = maybe_append_default_type(raw)
        name = mangle_name(arg)
        if name in created.names or name in created.skipped:
            continue
        existing = await client.unit(name)
        if existing is None:
            body = await _local_body(client, arg, name)
            await _create(client, name, body, None)
            click.echo(f"Unit {name} inactive")
        elif not replace:
            _warn_if_different(arg, existing)
        else:
            body = await _local_body(client, arg, name)
            if body.hash == existing.hash:
                click.echo(f"Found same Unit({name}) in Registry, nothing to do")
            elif TargetState(existing.desired_state) not in REPLACEABLE[command]:
                click.echo(
                    f"Warning: can not replace Unit({name}) in state"
                    f" '{existing.desired_state}', use the appropriate command",
                    err=True,
                )
                created.skipped.append(name)
                continue
            else:
                state = TargetState(existing.desired_state)
                await _create(client, name, body, state)
                if state is TargetState.INACTIVE:
                    click.echo(f"Unit {name} inactive")
                else:
                    created.replaced[name] = body.hash
        created.names.append(name)
    return created


@dataclass
class Found:
    units: list[UnitView]
    missing: list[str]  # arguments that matched nothing


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
    try:
        units = await client.units()
    except FleetError as e:
        raise CommandFailed(f"Error retrieving list of units from repository: {e}") from e
    found = match_units(args, units)
    for arg in found.missing:
        what = f"No unit matches {arg}" if is_glob(arg) else f"Unit {mangle_name(arg)} not found"
        click.echo(what, err=True)
    if not found.units:
        raise CommandFailed("Units not found in registry")
    return found
