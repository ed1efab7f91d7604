"""plan and why: the engine's own planner asked "what if?" (beyond fleet).

`fleetctl plan UNIT...` shows what `fleetctl start UNIT...` would do, without doing it: where
each unit would land, which would not be placed and why, what else would move. `fleetctl plan
--kill MACHINE` runs the planner on a copy of the cluster without that machine: which units
would move where, which would run nowhere; it answers "is it safe to reboot this box?" before
anyone does. `fleetctl why UNIT` shows, machine by machine, which of the unit's constraints
pass and fail, and the smallest change that would place it.

The prediction is fleetd/engine/whatif.py's, computed where the driver reads the cluster:
through etcd, here (the registry read as the engine reads it); through the API, in fleetd
(`POST /fleet/v1/plan`, `GET /fleet/v1/why/<unit>`). Both print the same. Nothing is written.

Exit status: 0; 3 when `plan` finds a unit it concerns that would run nowhere (so `fleetctl
plan --kill m1 && reboot` reboots only when every unit has somewhere to go); 1 on an error
(an unknown file, an invalid unit, an unknown or ambiguous machine prefix), 2 on a usage error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import click

from fleetctl.client import ClusterClient
from fleetctl.command import (
    FleetCommand,
    full_option,
    output_format_option,
    replace_options,
    run,
    say,
    warn,
)
from fleetctl.completion import complete_files, complete_machines, complete_units
from fleetctl.errors import CommandFailed
from fleetctl.output import machine_legend, tabwrite
from fleetctl.unitargs import check_names, plan_units
from fleetctl.units import allow_unknown_option
from fleetd.engine.whatif import (
    CONSTRAINTS,
    Action,
    Check,
    Explanation,
    Fix,
    Prediction,
    Result,
    Start,
    explanation_to_api,
    prediction_to_api,
    resolve_machines,
)
from fleetd.errors import FleetError, InvalidInput
from fleetd.model import TargetState
from fleetd.unit.names import mangle_name
from fleetd.views import MachineView

# `plan`'s exit status when some unit it concerns would run nowhere.
UNPLACED_EXIT = 3
# Machines listed after a change that applies to any one of them.
LISTED_MACHINES = 5


def _legend(machine_id: str | None, machines: Mapping[str, MachineView], full: bool) -> str:
    return machine_legend(machine_id, machines, full) if machine_id else "-"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


# ---- plan ----------------------------------------------------------------------------------


def summary(p: Prediction, machines: Mapping[str, MachineView], full: bool) -> str:
    """One line: what would change, e.g. "Without 113f16a7...: 3 units would move, ..."."""
    parts = []
    for action, words in (
        (Action.MOVE, "would move"),
        (Action.PLACE, "would be placed"),
        (Action.UNPLACED, "would not be placed"),
        (Action.UNSCHEDULE, "would be unscheduled"),
        (Action.STUCK, "could not leave"),
        (Action.STAY, "would stay where they are"),
    ):
        count = p.count(action)
        if count:
            if count == 1:
                words = words.replace("they are", "it is")
            parts.append(f"{_plural(count, 'unit')} {words}")
    starts = sum(1 for g in p.globals if g.action == "start")
    stops = sum(1 for g in p.globals if g.action == "stop")
    if starts:
        parts.append(f"{_plural(starts, 'global unit instance')} would start")
    if stops:
        parts.append(f"{_plural(stops, 'global unit instance')} would stop")
    what = ", ".join(parts) if parts else "nothing would change"
    if p.kill or p.drain:
        gone = ", ".join(_legend(m, machines, full) for m in p.kill)
        drained = ", ".join(_legend(m, machines, full) for m in p.drain)
        parts = [f"Without {gone}" if gone else "", f"Draining {drained}" if drained else ""]
        scope = " and ".join(part for part in parts if part)
        return f"{scope}: {what}."
    return what[0].upper() + what[1:] + "."


def render_prediction(p: Prediction, machines: Mapping[str, MachineView], full: bool) -> str:
    out = []
    if p.units:
        rows = [["UNIT", "ACTION", "FROM", "TO", "REASON"]]
        for u in p.units:
            rows.append(
                [
                    u.name,
                    u.action.value,
                    _legend(u.before, machines, full),
                    _legend(u.after, machines, full),
                    u.reason or "-",
                ]
            )
        out.append(tabwrite(rows))
    if p.globals:
        rows = [["GLOBAL UNIT", "ACTION", "MACHINE", "REASON"]]
        for g in p.globals:
            rows.append([g.name, g.action, _legend(g.machine_id, machines, full), g.reason or "-"])
        out.append(tabwrite(rows))
    out.append(summary(p, machines, full) + "\n")
    return "\n".join(out)


def _kill_arguments(values: Sequence[str]) -> list[str]:
    """--kill m1 --kill m2, or --kill m1,m2."""
    return [part for value in values for part in value.split(",")]


def _planning_error(e: CommandFailed) -> CommandFailed:
    """start's checks say "Error creating units"; plan creates nothing, so it says so."""
    message = e.message.replace("Error creating units: ", "Error planning units: ", 1)
    return CommandFailed(message, e.exit_code)


@click.command(
    cls=FleetCommand,
    short_help="Show what starting units, or losing machines, would do (changes nothing).",
)
@click.option(
    "--kill",
    "kill",
    multiple=True,
    metavar="MACHINE",
    shell_complete=complete_machines,
    help="Plan as if this machine went away (an ID or unique ID prefix); repeat it, or give"
    " several separated by commas.",
)
@click.option(
    "--drain",
    "drain",
    multiple=True,
    metavar="MACHINE",
    shell_complete=complete_machines,
    help="Plan as if this machine were drained (its units moved off, the machine kept);"
    " repeat it, or give several separated by commas.",
)
@replace_options
@allow_unknown_option
@full_option
@output_format_option("table: the tables and a summary; json: the prediction as the API gives it.")
@click.argument("units", nargs=-1, metavar="[UNIT...]", shell_complete=complete_files)
def plan(
    units: tuple[str, ...],
    kill: tuple[str, ...],
    drain: tuple[str, ...],
    replace: bool,
    sign: bool,
    allow_unknown: bool,
    full: bool,
    output_format: str,
) -> None:
    """Show what `fleetctl start UNIT...` would do, or what losing machines would do, without
    doing it: where each unit would go, which would not be placed and why, what else moves.

    UNIT is what `start` takes (a unit file, an instance of a template, a unit in the
    cluster). --kill MACHINE runs the engine's planner without that machine: is it safe to
    reboot it? --drain MACHINE runs it with the machine drained: which units would move where,
    which could not leave. Exit status 3 when a unit concerned would run nowhere (or could not
    leave a drained machine), 0 otherwise.
    """
    killed = _kill_arguments(kill)
    drained = _kill_arguments(drain)
    if not units and not killed and not drained:
        raise click.UsageError("No units or machines given")
    try:
        check_names(units, activate=True)
    except CommandFailed as e:
        raise _planning_error(e) from e

    async def work(client: ClusterClient) -> int:
        try:
            listed = await client.machines()
        except FleetError as e:
            raise CommandFailed(f"Error retrieving list of machines: {e}") from e
        machines = {m.id: m for m in listed}
        try:
            ids = sorted(resolve_machines(killed, machines))
            drain_ids = sorted(resolve_machines(drained, machines))
        except InvalidInput as e:
            raise CommandFailed(f"Error planning: {e}") from e
        try:
            steps = await plan_units(
                client, units, command="start", replace=replace, allow_unknown=allow_unknown
            )
        except CommandFailed as e:
            raise _planning_error(e) from e
        for step in steps.steps:
            if step.warning:
                warn(step.warning)
        starts = [Start(s.name, s.body, TargetState.LAUNCHED) for s in steps.steps if not s.skipped]
        try:
            prediction = await client.plan(starts, ids, drain_ids)
        except InvalidInput as e:
            raise CommandFailed(f"Error planning: {e}") from e
        if output_format.lower() == "json":
            click.echo(json.dumps(prediction_to_api(prediction), indent=2))
        else:
            click.echo(render_prediction(prediction, machines, full), nl=False)
            _warn_state(prediction.pending, prediction.unplanned)
        return UNPLACED_EXIT if prediction.unplaced else 0

    run(work)


def _warn_state(pending: int, unplanned: Sequence[str]) -> None:
    if pending:
        warn(
            f"Note: the engine has {_plural(pending, 'write')} still to make; the prediction"
            " starts from the state it converges to."
        )
    if unplanned:
        warn(
            f"Note: the engine leaves out {', '.join(unplanned)}: its unit file is missing or"
            " its [X-Fleet] section does not parse."
        )


# ---- why -----------------------------------------------------------------------------------


def _cell(check: Check) -> str:
    if check.result is Result.NONE:
        return "-"
    if check.result is Result.PASS:
        return f"ok: {check.detail}" if check.detail else "ok"
    return f"fail: {check.detail}"


def _where(fix: Fix, machines: Mapping[str, MachineView], full: bool) -> str:
    if not fix.machines:
        return ""
    shown = [_legend(m, machines, full) for m in fix.machines[:LISTED_MACHINES]]
    more = len(fix.machines) - len(shown)
    listed = ", ".join(shown) + (f" and {more} more" if more else "")
    return f" (on {listed})" if len(fix.machines) == 1 else f" (on any of {listed})"


def headline(e: Explanation, machines: Mapping[str, MachineView], full: bool) -> str:
    unit = f"Unit {e.name} (desired state {e.desired_state})"
    if e.is_global:
        running = sum(1 for m in e.machines if m.here)
        if running:
            return f"{unit} is global: it runs on {running} of {len(e.machines)} machines."
        return f"{unit} is global and runs on no machine: {e.reason}."
    if e.predicted is not None:
        where = _legend(e.predicted, machines, full)
        if e.machine_id == e.predicted:
            return f"{unit} runs on {where}."
        return f"{unit} would be placed on {where}."
    return f"{unit} is not placed: {e.reason or 'the engine has not placed it yet'}."


def render_explanation(e: Explanation, machines: Mapping[str, MachineView], full: bool) -> str:
    out = [headline(e, machines, full) + "\n"]
    if e.machines:
        rows = [["MACHINE", "LOAD", *(c.upper() for c in CONSTRAINTS), "FITS"]]
        for m in e.machines:
            fits = "here" if m.here else ("yes" if m.fits else "no")
            by_name = {c.constraint: c for c in m.checks}
            cells = [_cell(by_name[c]) if c in by_name else "-" for c in CONSTRAINTS]
            rows.append([_legend(m.machine_id, machines, full), str(m.load), *cells, fits])
        out.append(tabwrite(rows))
    lines = []
    if e.fixes:
        first, *others = e.fixes
        lines.append(f"Smallest change: {first.change}{_where(first, machines, full)}")
        if others:
            lines.append("Other changes that would place it:")
            lines += [f"  {f.change}{_where(f, machines, full)}" for f in others]
    elif not e.is_global and e.predicted is None and e.machines:
        lines.append("No change to the cluster alone would place it (see its constraints).")
    lines += [f"Note: {n}" for n in e.notes]
    if lines:
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


@click.command(
    cls=FleetCommand,
    short_help="Explain why a unit is not placed, or placed where it is.",
)
@full_option
@output_format_option("table: the explanation; json: as the API gives it.")
@click.argument("unit", metavar="UNIT", shell_complete=complete_units)
def why(unit: str, full: bool, output_format: str) -> None:
    """Explain where UNIT is placed, or why it is not: each machine against each of its
    [X-Fleet] constraints (MachineID, MachineMetadata, MachineOf, Conflicts, Replaces), and
    the smallest change that would place it. An inactive unit is explained as if started.
    """
    name = mangle_name(unit)

    async def work(client: ClusterClient) -> int:
        explanation = await client.why(name)
        if explanation is None:
            raise CommandFailed(f"Unit {name} does not exist.")
        if output_format.lower() == "json":
            click.echo(json.dumps(explanation_to_api(explanation), indent=2))
            return 0
        machines = {m.id: m for m in await client.machines()}
        say(render_explanation(explanation, machines, full).rstrip("\n"))
        return 0

    run(work)
