"""list-units, list-unit-files and list-machines (reference §1.6, §1.7).

Tables are fleet's, byte for byte (see output.py). Beyond fleet: `-o json` prints the same
rows as a JSON array with unabbreviated values, list-unit-files has a `reason` field (why the
scheduler cannot place a unit), and list-units an `error` field (the agent's failed task for
the unit on that machine and its error, e.g. `load failed: ...`).

A unit whose task fails on a machine shows it in list-units' default columns without changing
them: its SUB reads `<task>-failed` (`load-failed`, `start-failed`, `stop-failed`,
`unload-failed`, `reload-failed`) instead of systemd's sub-state, so `fleetctl list-units`
alone tells a stuck unit from a healthy one and a script splitting the columns still finds
four. ACTIVE stays systemd's (`-` when nothing is loaded). `-o json` keeps systemd's `sub`,
and `error` says what failed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import click

from fleetctl.client import ClusterClient
from fleetctl.command import FleetCommand, full_option, list_options, run
from fleetctl.errors import CommandFailed
from fleetctl.output import (
    Field,
    machine_id_legend,
    machine_legend,
    parse_fields,
    render_json,
    render_table,
)
from fleetd.errors import FleetError
from fleetd.views import MachineView, StateView, UnitView, cordon_to_api

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Shown:
    """What a row renderer needs besides the row: the machines (for legends) and --full."""

    machines: Mapping[str, MachineView]
    full: bool


def _hash(value: str, full: bool) -> str:
    return value if full else value[:7]


def _print(
    fields: Sequence[str],
    columns: Mapping[str, Field[T, Shown]],
    items: Sequence[T],
    shown: Shown,
    *,
    output_format: str,
    no_legend: bool,
) -> None:
    if output_format.lower() == "json":
        click.echo(render_json(fields, columns, items, shown), nl=False)
    else:
        click.echo(render_table(fields, columns, items, shown, legend=not no_legend), nl=False)


def _fields(spec: str, source: click.core.ParameterSource | None, valid: Sequence[str]) -> str:
    """The JSON output of an unchanged default shows every field; tables keep fleet's."""
    if source is click.core.ParameterSource.DEFAULT:
        return ",".join(valid)
    return spec


# ---- list-units ------------------------------------------------------------------------------


def _sub(state: StateView, _: Shown) -> str:
    return f"{state.failed_task}-failed" if state.failed_task else state.sub


def _error(state: StateView) -> str:
    if not state.failed_task and not state.error:
        return ""
    return f"{state.failed_task or 'task'} failed: {state.error or 'unknown error'}"


UNIT_STATE_FIELDS: dict[str, Field[StateView, Shown]] = {
    "unit": Field(lambda s, _: s.name, lambda s, _: s.name),
    "machine": Field(
        lambda s, c: machine_legend(s.machine_id, c.machines, c.full) if s.machine_id else "",
        lambda s, _: s.machine_id or None,
    ),
    "active": Field(lambda s, _: s.active, lambda s, _: s.active or None),
    "sub": Field(_sub, lambda s, _: s.sub or None),
    "load": Field(lambda s, _: s.load, lambda s, _: s.load or None),
    "hash": Field(lambda s, c: _hash(s.hash, c.full), lambda s, _: s.hash or None),
    "error": Field(lambda s, _: _error(s), lambda s, _: _error(s) or None),
}


@click.command("list-units", cls=FleetCommand, short_help="List the current state of units.")
@full_option
@list_options("unit,machine,active,sub", "active,error,hash,load,machine,sub,unit")
@click.pass_context
def list_units(
    ctx: click.Context, full: bool, no_legend: bool, fields: str, output_format: str
) -> None:
    """List the systemd state of units: one row per unit per machine that loaded it."""
    if output_format.lower() == "json":
        fields = _fields(fields, ctx.get_parameter_source("fields"), list(UNIT_STATE_FIELDS))
    chosen = parse_fields(fields, UNIT_STATE_FIELDS)

    async def work(client: ClusterClient) -> int:
        try:
            states = await client.unit_states()
            machines = await client.machines() if "machine" in chosen else []
        except FleetError as e:
            raise CommandFailed(f"Error retrieving list of units from repository: {e}") from e
        shown = Shown({m.id: m for m in machines}, full)
        _print(
            chosen,
            UNIT_STATE_FIELDS,
            states,
            shown,
            output_format=output_format,
            no_legend=no_legend,
        )
        return 0

    run(work)


# ---- list-unit-files -------------------------------------------------------------------------


def _target(unit: UnitView, shown: Shown) -> str:
    if unit.is_global:
        return "global"
    if unit.machine_id:
        return machine_legend(unit.machine_id, shown.machines, shown.full)
    return ""


UNIT_FIELDS: dict[str, Field[UnitView, Shown]] = {
    "unit": Field(lambda u, _: u.name, lambda u, _: u.name),
    "hash": Field(lambda u, c: _hash(u.hash, c.full), lambda u, _: u.hash),
    "desc": Field(
        lambda u, _: u.unit_file.description, lambda u, _: u.unit_file.description or None
    ),
    "dstate": Field(lambda u, _: u.desired_state, lambda u, _: u.desired_state or None),
    "state": Field(
        lambda u, _: "" if u.is_global else u.current_state or "",
        lambda u, _: None if u.is_global else u.current_state,
    ),
    "target": Field(_target, lambda u, _: "global" if u.is_global else u.machine_id),
    "tmachine": Field(_target, lambda u, _: "global" if u.is_global else u.machine_id),
    "global": Field(lambda u, _: "true" if u.is_global else "false", lambda u, _: u.is_global),
    "reason": Field(lambda u, _: u.reason, lambda u, _: u.reason or None),
}
_UNIT_FIELDS_JSON = ["unit", "hash", "desc", "dstate", "state", "target", "global", "reason"]


@click.command(
    "list-unit-files", cls=FleetCommand, short_help="List the units that exist in the cluster."
)
@click.option("--full", is_flag=True, help="Do not ellipsize fields on output.")
@list_options(
    "unit,hash,dstate,state,target", "desc,dstate,global,hash,reason,state,target,tmachine,unit"
)
@click.pass_context
def list_unit_files(
    ctx: click.Context, full: bool, no_legend: bool, fields: str, output_format: str
) -> None:
    """List every unit in the cluster with its desired state, state and target machine."""
    if output_format.lower() == "json":
        fields = _fields(fields, ctx.get_parameter_source("fields"), _UNIT_FIELDS_JSON)
    chosen = parse_fields(fields, UNIT_FIELDS)
    if "tmachine" in chosen:
        click.echo('WARNING: The "tmachine" field is deprecated. Use "target" instead', err=True)

    async def work(client: ClusterClient) -> int:
        try:
            units = await client.units()
            needs_machines = "target" in chosen or "tmachine" in chosen
            machines = await client.machines() if needs_machines else []
        except FleetError as e:
            raise CommandFailed(f"Error retrieving list of units from repository: {e}") from e
        shown = Shown({m.id: m for m in machines}, full)
        _print(chosen, UNIT_FIELDS, units, shown, output_format=output_format, no_legend=no_legend)
        return 0

    run(work)


# ---- list-machines ---------------------------------------------------------------------------


def _metadata(machine: MachineView) -> str:
    return ",".join(f"{k}={machine.metadata[k]}" for k in sorted(machine.metadata))


MACHINE_FIELDS: dict[str, Field[MachineView, Shown]] = {
    "machine": Field(lambda m, c: machine_id_legend(m.id, c.full), lambda m, _: m.id),
    "ip": Field(lambda m, _: m.primary_ip, lambda m, _: m.primary_ip or None),
    "metadata": Field(lambda m, _: _metadata(m), lambda m, _: dict(sorted(m.metadata.items()))),
    # Beyond fleet: not among the default columns, so fleet's table stays as it was.
    "schedulable": Field(
        lambda m, _: "true" if m.schedulable else ("draining" if _draining(m) else "cordoned"),
        lambda m, _: m.schedulable,
    ),
    "cordon": Field(
        lambda m, _: m.cordon.reason if m.cordon is not None else "",
        lambda m, _: None if m.cordon is None else cordon_to_api(m.cordon),
    ),
}


def _draining(machine: MachineView) -> bool:
    return machine.cordon is not None and machine.cordon.drain


MACHINES_UNREACHABLE = """\
Error retrieving list of active machines from fleet API ({error})
Possible issues:
  etcd is unhealthy and/or lost quorum
  connection cannot be established to any etcd servers"""


@click.command("list-machines", cls=FleetCommand, short_help="Enumerate the current hosts.")
@full_option
@list_options("machine,ip,metadata", "machine,ip,metadata,schedulable,cordon")
def list_machines(full: bool, no_legend: bool, fields: str, output_format: str) -> None:
    """List the machines registered in the cluster, with their IP and metadata."""
    chosen = parse_fields(fields, MACHINE_FIELDS)

    async def work(client: ClusterClient) -> int:
        try:
            machines = await client.machines()
        except FleetError as e:
            raise CommandFailed(MACHINES_UNREACHABLE.format(error=e)) from e
        shown = Shown({}, full)
        _print(
            chosen,
            MACHINE_FIELDS,
            machines,
            shown,
            output_format=output_format,
            no_legend=no_legend,
        )
        return 0

    run(work)
