"""The desired-state commands: submit, load, start, stop, unload, destroy, restart.

Each one writes desired states and (unless --no-block) waits for the agents to report them,
with fleet's output lines (reference §1.5, §1.6). Deviations from fleet are listed in
fleetctl/README-deviations.md; the ones that change what a script sees are marked there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import click

from fleetctl.client import ClusterClient
from fleetctl.command import (
    FleetCommand,
    block_options,
    find_or_fail,
    replace_options,
    run,
    say,
    warn,
)
from fleetctl.completion import complete_files, complete_units
from fleetctl.errors import CommandFailed
from fleetctl.unitargs import (
    Created,
    check_names,
    is_glob,
    match_units,
    missing_line,
    plan_units,
    valid_name,
    write_steps,
)
from fleetctl.waiting import (
    NO_BLOCK,
    MachineCache,
    block_attempts,
    fetch_states,
    fetch_units,
    poll_until,
    wait_for_active,
    wait_for_states,
)
from fleetd.errors import FleetError
from fleetd.model import TargetState
from fleetd.unit.names import mangle_name
from fleetd.views import UnitView

# Systemd active states of a unit that is (or is getting) stopped.
_STOPPED = frozenset({"inactive", "failed"})


def _require(units: Sequence[str]) -> None:
    if not units:
        raise click.UsageError("No units given")


def _report_errors(prefix: str, errors: dict[str, str]) -> None:
    for error in errors.values():
        click.echo(f"{prefix}: {error}", err=True)


async def _set_states(
    client: ClusterClient, views: Sequence[UnitView], target: TargetState, what: str
) -> None:
    for view in views:
        if view.desired_state == target.value:
            continue
        try:
            await client.set_target_state(view.name, target)
        except FleetError as e:
            raise CommandFailed(f"Error {what} units: {e}") from e


def _never_activated(view: UnitView) -> bool:
    """Neither wanted nor seen loaded or launched: a submitted unit, or one being unloaded
    whose machine has already unloaded it."""
    inactive = TargetState.INACTIVE.value
    return view.desired_state == inactive and view.current_state == inactive


def _split_global(views: Sequence[UnitView]) -> tuple[list[UnitView], list[UnitView]]:
    return [v for v in views if v.is_global], [v for v in views if not v.is_global]


# ---- submit / load / start -----------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., None])


def allow_unknown_option(func: F) -> F:
    return click.option(
        "--allow-unknown-options",
        "allow_unknown",
        is_flag=True,
        help="Accept [X-Fleet] options fleet does not know (refused by default, as a typo"
        " would silently drop a scheduling constraint). etcd driver only: the API refuses them.",
    )(func)


async def _create_units(
    client: ClusterClient,
    args: Sequence[str],
    *,
    command: str,
    replace: bool,
    allow_unknown: bool,
) -> Created:
    """fleet's lazyCreateUnits: check every argument first (a bad one writes nothing), then
    write the new and replaced units in argument order, with fleet's output lines."""
    plan = await plan_units(
        client, args, command=command, replace=replace, allow_unknown=allow_unknown
    )
    for step in plan.steps:
        if step.warning:
            click.echo(step.warning, err=True)
    await write_steps(client, plan.steps)
    for step in plan.steps:
        if step.done:
            click.echo(step.done)
    return plan.created()


async def _activate(
    client: ClusterClient,
    args: Sequence[str],
    *,
    command: str,
    target: TargetState,
    attempts: int,
    replace: bool,
    allow_unknown: bool,
) -> int:
    """lazyCreateUnits, then desired state `target`, then wait (load and start)."""
    what = {"load": "loading", "start": "starting"}[command]
    created = await _create_units(
        client, args, command=command, replace=replace, allow_unknown=allow_unknown
    )
    views = await fetch_units(client, created.names)
    missing = [n for n in created.names if n not in views]
    if missing:
        raise CommandFailed(f"Error {what} units: unable to find unit {missing[0]}")
    ordered = [views[n] for n in created.names]
    await _set_states(client, ordered, target, what)
    globals_, placed = _split_global(ordered)
    for view in globals_:
        click.echo(f"Triggered global unit {view.name} {command}")
    names = [v.name for v in placed]
    failed = bool(created.skipped)
    if attempts == NO_BLOCK:
        # fleet printed this line twice for start (§9.3); once is enough.
        for name in names:
            click.echo(f"Triggered unit {name} {command}")
        return int(failed)
    errors = await wait_for_states(
        client, names, target, attempts, MachineCache(client), created.replaced, say=say, warn=warn
    )
    _report_errors("Error waiting for units", errors)
    if target is TargetState.LAUNCHED:
        reached = [n for n in names if n not in errors]
        active_errors = await wait_for_active(client, reached, attempts, created.replaced)
        _report_errors("Error waiting for systemd unit states", active_errors)
        errors.update(active_errors)
    return int(failed or bool(errors))


@click.command(cls=FleetCommand, short_help="Upload one or more units to the cluster.")
@replace_options
@allow_unknown_option
@click.argument("units", nargs=-1, metavar="UNIT...", shell_complete=complete_files)
def submit(units: tuple[str, ...], replace: bool, sign: bool, allow_unknown: bool) -> None:
    """Upload one or more units to the cluster without starting them.

    UNIT is a unit file, or an instance (hello@1.service) of a template in the cluster or
    beside it. Prints `Unit <name> inactive` for each new unit.
    """
    _require(units)
    check_names(units, activate=False)

    async def work(client: ClusterClient) -> int:
        created = await _create_units(
            client, units, command="submit", replace=replace, allow_unknown=allow_unknown
        )
        return int(bool(created.skipped))

    run(work)


@click.command(cls=FleetCommand, short_help="Schedule one or more units in the cluster.")
@block_options
@replace_options
@allow_unknown_option
@click.argument("units", nargs=-1, metavar="UNIT...", shell_complete=complete_files)
def load(
    units: tuple[str, ...],
    block_attempts_: int,
    no_block: bool,
    replace: bool,
    sign: bool,
    allow_unknown: bool,
) -> None:
    """Schedule units to machines and load them into systemd, without starting them.

    Submits the units first if needed. On a running unit, this stops it (as in fleet).
    """
    _activate_command(
        units, "load", TargetState.LOADED, no_block, block_attempts_, replace, allow_unknown
    )


@click.command(cls=FleetCommand, short_help="Instruct systemd to start one or more units.")
@block_options
@replace_options
@allow_unknown_option
@click.argument("units", nargs=-1, metavar="UNIT...", shell_complete=complete_files)
def start(
    units: tuple[str, ...],
    block_attempts_: int,
    no_block: bool,
    replace: bool,
    sign: bool,
    allow_unknown: bool,
) -> None:
    """Start units in the cluster, submitting and loading them first if needed.

    Waits until each unit is launched and active in systemd, printing
    `Unit <name> launched on <machine>/<ip>`. A unit that cannot be placed is reported with
    the scheduler's reason, and the command fails after --block-attempts.
    """
    _activate_command(
        units, "start", TargetState.LAUNCHED, no_block, block_attempts_, replace, allow_unknown
    )


def _activate_command(
    units: tuple[str, ...],
    command: str,
    target: TargetState,
    no_block: bool,
    block_attempts_: int,
    replace: bool,
    allow_unknown: bool,
) -> None:
    """load and start: submit what is missing, set the target state, wait as asked."""
    _require(units)
    check_names(units, activate=True)
    attempts = block_attempts(no_block, block_attempts_)

    async def work(client: ClusterClient) -> int:
        return await _activate(
            client,
            units,
            command=command,
            target=target,
            attempts=attempts,
            replace=replace,
            allow_unknown=allow_unknown,
        )

    run(work)


# ---- stop / unload / destroy ---------------------------------------------------------------


@click.command(cls=FleetCommand, short_help="Instruct systemd to stop one or more units.")
@block_options
@click.argument("units", nargs=-1, metavar="UNIT...", shell_complete=complete_units)
def stop(units: tuple[str, ...], block_attempts_: int, no_block: bool) -> None:
    """Stop units (they stay loaded on their machines). UNIT may be a glob ('web@*')."""
    _require(units)
    attempts = block_attempts(no_block, block_attempts_)

    async def work(client: ClusterClient) -> int:
        found = await find_or_fail(client, units)
        failed = bool(found.missing)
        stopping = []
        for view in found.units:
            if view.is_global:
                stopping.append(view)
            elif _never_activated(view):
                # fleet's refusal, kept where it is true: stopping would load the unit.
                click.echo(f"Unable to stop unit {view.name} in state inactive", err=True)
                failed = True
            elif view.desired_state != TargetState.LOADED.value:
                # Also a unit whose start has not reached a machine yet (a `start` that timed
                # out leaves it wanted `launched`): fleet refused to stop it, so it started
                # whenever a machine could take it.
                stopping.append(view)
        await _set_states(client, stopping, TargetState.LOADED, "stopping")
        globals_, placed = _split_global(stopping)
        for view in globals_:
            click.echo(f"Triggered global unit {view.name} stop")
        if attempts == NO_BLOCK:
            for view in placed:
                click.echo(f"Triggered unit {view.name} stop")
            return int(failed)
        for view in placed:
            if view.machine_id is None:
                click.echo(
                    f"Unit {view.name} is not placed on any machine: it will be loaded,"
                    " not started, once placed",
                    err=True,
                )
        # A unit on no machine has nothing to report until it is placed: no wait for it.
        names = [v.name for v in placed if v.machine_id is not None]
        errors = await wait_for_states(
            client, names, TargetState.LOADED, attempts, MachineCache(client), say=say, warn=warn
        )
        if errors:
            _report_errors("Error waiting for units", errors)
            click.echo(f"Failed to stop units [{' '.join(errors)}].", err=True)
            return 1
        if stopping:
            click.echo(
                f"Successfully stopped units [{' '.join(v.name for v in stopping)}].", err=True
            )
        return int(failed)

    run(work)


@click.command(cls=FleetCommand, short_help="Unschedule one or more units in the cluster.")
@block_options
@click.argument("units", nargs=-1, metavar="UNIT...", shell_complete=complete_units)
def unload(units: tuple[str, ...], block_attempts_: int, no_block: bool) -> None:
    """Stop units and unload them from their machines (they stay in the cluster)."""
    _require(units)
    attempts = block_attempts(no_block, block_attempts_)

    async def work(client: ClusterClient) -> int:
        found = await find_or_fail(client, units)
        unloading = [
            v
            for v in found.units
            if v.desired_state != TargetState.INACTIVE.value
            or v.current_state not in (None, TargetState.INACTIVE.value)
        ]
        await _set_states(client, unloading, TargetState.INACTIVE, "unloading")
        globals_, placed = _split_global(unloading)
        for view in globals_:
            click.echo(f"Triggered global unit {view.name} unload")
        names = [v.name for v in placed]
        if attempts == NO_BLOCK:
            for name in names:
                click.echo(f"Triggered unit {name} unload")
            return int(bool(found.missing))
        errors = await wait_for_states(
            client, names, TargetState.INACTIVE, attempts, MachineCache(client), say=say, warn=warn
        )
        if errors:
            _report_errors("Error waiting for units", errors)
            click.echo(f"Failed to unload units [{' '.join(errors)}].", err=True)
            return 1
        if unloading:
            done = " ".join(v.name for v in unloading)
            click.echo(f"Successfully unloaded units [{done}].", err=True)
        return int(bool(found.missing))

    run(work)


@click.command(cls=FleetCommand, short_help="Destroy one or more units in the cluster.")
@block_options
@click.argument("units", nargs=-1, metavar="UNIT...", shell_complete=complete_units)
def destroy(units: tuple[str, ...], block_attempts_: int, no_block: bool) -> None:
    """Remove units from the cluster; their machines stop and unload them.

    The blocking flags are accepted for compatibility: the removal is done when the command
    returns (fleet's wait here was inverted and only ran with --no-block).
    """
    _require(units)

    async def work(client: ClusterClient) -> int:
        try:
            listing = await client.units()
        except FleetError as e:
            raise CommandFailed(f"Error retrieving list of units from repository: {e}") from e
        found = match_units(units, listing)
        # A name the listing lacks may still have a record the listings skip because its value
        # is corrupt (reported as a warning): destroying it by name is how it is removed.
        names = [v.name for v in found.units]
        missing = []
        for arg in found.missing:
            name = mangle_name(arg)
            if is_glob(arg) or not valid_name(name):
                missing.append(arg)
            elif name not in names:
                names.append(name)
        failed = bool(missing)
        destroyed = 0
        for name in names:
            try:
                existed = await client.destroy_unit(name)
            except FleetError as e:
                click.echo(f"Error destroying units: {e}", err=True)
                failed = True
                continue
            if existed:  # fleet ignores a unit that vanished meanwhile, without a line
                click.echo(f"Destroyed {name}")
                destroyed += 1
            elif name not in (v.name for v in found.units):
                click.echo(f"Unit {name} not found", err=True)
                failed = True
        for arg in missing:
            warn(missing_line(arg))
        if not found.units and not destroyed:
            raise CommandFailed("Units not found in registry")
        return int(failed)

    run(work)


# ---- restart -------------------------------------------------------------------------------


async def _restart_placed(
    client: ClusterClient, view: UnitView, attempts: int, machines: MachineCache
) -> dict[str, str]:
    """Stop (if running), then start, waiting for each step: a serial rolling restart."""
    name = view.name
    if view.current_state == TargetState.LAUNCHED.value:
        await client.set_target_state(name, TargetState.LOADED)
        # fleet waited for `launched` here and could hang forever (§9.5).
        errors = await wait_for_states(
            client, [name], TargetState.LOADED, attempts, machines, say=say, warn=warn
        )
        if errors:
            return errors
    else:
        click.echo(f"Unit {name} already loaded, starting.", err=True)
    await client.set_target_state(name, TargetState.LAUNCHED)
    errors = await wait_for_states(
        client, [name], TargetState.LAUNCHED, attempts, machines, say=say, warn=warn
    )
    return errors or await wait_for_active(client, [name], attempts)


async def _restart_global(client: ClusterClient, view: UnitView, attempts: int) -> dict[str, str]:
    """Global units have no single machine (fleet did nothing, §9.7): stop everywhere, wait
    until no machine reports it running, then start everywhere."""
    name = view.name
    if view.desired_state == TargetState.LAUNCHED.value:
        await client.set_target_state(name, TargetState.LOADED)

        async def stopped() -> bool:
            return all(s.active in _STOPPED for s in await fetch_states(client, [name]))

        if not await poll_until(stopped, attempts):
            return {name: f"timed out waiting for global unit {name} to stop"}
    await client.set_target_state(name, TargetState.LAUNCHED)
    click.echo(f"Triggered global unit {name} restart")
    return {}


@click.command(cls=FleetCommand, short_help="Instruct systemd to restart one or more units.")
@click.option(
    "--block-attempts",
    "block_attempts_",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Wait at most N 2-second attempts for each step (0: forever).",
)
@click.argument("units", nargs=-1, metavar="UNIT...", shell_complete=complete_units)
def restart(units: tuple[str, ...], block_attempts_: int) -> None:
    """Restart units one after the other: stop, wait, start, wait.

    Stops at the first unit that does not come back, so a bad rollout halts early.
    """
    _require(units)

    async def work(client: ClusterClient) -> int:
        found = await find_or_fail(client, units)
        machines = MachineCache(client)
        failed = bool(found.missing)
        for view in found.units:
            if view.is_global:
                errors = await _restart_global(client, view, block_attempts_)
            elif view.current_state == TargetState.INACTIVE.value:
                click.echo(f"Unable to restart unit {view.name} in state inactive", err=True)
                failed = True
                continue
            else:
                errors = await _restart_placed(client, view, block_attempts_, machines)
            if errors:
                _report_errors("Error restarting units", errors)
                return 1
        return int(failed)

    run(work)
