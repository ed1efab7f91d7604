"""What every fleetctl command shares: flag parsing quirks, common options, and how it runs.

fleet's flags are Go pflag flags, so scripts write booleans as `--full=true` or
`--strict-host-key-checking=false`; click only takes bare flags. `FleetCommand` rewrites
`--flag=<bool>` into the bare flag or its `--no-` form before click parses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import click

from fleetctl import client as client_module
from fleetctl.client import ClusterClient
from fleetctl.errors import CommandFailed
from fleetctl.settings import Settings
from fleetctl.unitargs import Found, find_units
from fleetd.errors import FleetError

F = TypeVar("F", bound=Callable[..., Any])


def _bool_flags(command: click.Command) -> dict[str, tuple[str | None, str | None]]:
    """Every long boolean flag name -> (name meaning true, name meaning false)."""
    flags: dict[str, tuple[str | None, str | None]] = {}
    for param in command.params:
        if not (isinstance(param, click.Option) and param.is_flag and param.is_bool_flag):
            continue
        on = next((o for o in param.opts if o.startswith("--")), None)
        off = next((o for o in param.secondary_opts if o.startswith("--")), None)
        for name in param.opts:
            flags[name] = (name, off)
        for name in param.secondary_opts:
            flags[name] = (on, name)
    return flags


def takes_value(command: click.Command, name: str) -> bool:
    """Does option `name` of `command` consume the next argument as its value?"""
    for param in command.params:
        if isinstance(param, click.Option) and name in param.opts + param.secondary_opts:
            return not param.is_flag and param.nargs != 0
    return False


def interspersed(command: click.Command) -> bool:
    """May options follow positional arguments? (Not for `ssh`: those are the remote's.)"""
    setting = command.context_settings.get("allow_interspersed_args")
    return bool(command.allow_interspersed_args if setting is None else setting)


def normalize_bool_flags(command: click.Command, args: list[str]) -> list[str]:
    """`--flag=true` -> `--flag`, `--flag=false` -> `--no-flag` (or nothing: flags without a
    `--no-` form default to false and have no environment variable).

    Stops at `--`, and for a command without interspersed options at its first argument.
    """
    flags = _bool_flags(command)
    mixed = interspersed(command)
    out: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--" or (not mixed and not arg.startswith("-")):
            out.extend(args[index:])
            break
        index += 1
        name, eq, value = arg.partition("=")
        if not eq and takes_value(command, name) and index < len(args):
            out.extend((arg, args[index]))  # an option and its value, e.g. --ssh-port 22
            index += 1
            continue
        if not eq or name not in flags:
            out.append(arg)
            continue
        try:
            on = click.BOOL.convert(value, None, None)
        except click.BadParameter:
            raise click.UsageError(
                f"invalid argument {value!r} for {name}: expected true or false"
            ) from None
        chosen = flags[name][0 if on else 1]
        if chosen is not None:
            out.append(chosen)
    return out


class FleetCommand(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, normalize_bool_flags(self, args))


# ---- shared options ------------------------------------------------------------------------


def block_options(func: F) -> F:
    func = click.option(
        "--no-block",
        is_flag=True,
        help="Do not wait until the units have reached the desired state.",
    )(func)
    return click.option(
        "--block-attempts",
        "block_attempts_",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Wait until the units are in their desired state, at most N 2-second attempts"
        " (0: forever).",
    )(func)


def replace_options(func: F) -> F:
    func = click.option(
        "--replace",
        is_flag=True,
        help="Replace the unit in the cluster if the local unit file differs.",
    )(func)
    # Deprecated in fleet and ignored there; accepted so old scripts keep working.
    return click.option("--sign", is_flag=True, hidden=True)(func)


def full_option(func: F) -> F:
    return click.option(
        "-l", "--l", "--full", "full", is_flag=True, help="Do not ellipsize fields on output."
    )(func)


def list_options(default_fields: str, valid: str) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        func = click.option(
            "--no-legend", is_flag=True, help="Do not print a legend (column headers)."
        )(func)
        func = click.option(
            "--fields",
            default=default_fields,
            show_default=True,
            help=f"Columns to print, comma-separated; valid: {valid}.",
        )(func)
        return output_format_option(
            "table: fleet's tab-aligned table; json: a JSON array (full values)."
        )(func)

    return decorate


def output_format_option(help_text: str) -> Callable[[F], F]:
    """`-o/--output-format table|json` (into `output_format`)."""

    def decorate(func: F) -> F:
        return click.option(
            "-o",
            "--output-format",
            "output_format",
            type=click.Choice(["table", "json"], case_sensitive=False),
            default="table",
            show_default=True,
            help=help_text,
        )(func)

    return decorate


# ---- saying things --------------------------------------------------------------------------
# The logic modules (fleetctl/unitargs.py, fleetctl/waiting.py) print nothing: they return
# their lines, or take these as callbacks for the lines a wait shows as it goes.


def say(line: str) -> None:
    """One line of the command's output, to stdout."""
    click.echo(line)


def warn(line: str) -> None:
    """One line to stderr: a warning, a note on progress, an error the command goes on after."""
    click.echo(line, err=True)


async def find_or_fail(client: ClusterClient, args: Sequence[str]) -> Found:
    """The units the arguments name; a line on stderr for each argument that names none, and
    the command fails if none names any (fleet's "Units not found in registry")."""
    found = await find_units(client, args)
    for line in found.missing_lines():
        warn(line)
    if not found.units:
        raise CommandFailed("Units not found in registry")
    return found


# ---- running a command ---------------------------------------------------------------------

Work = Callable[[ClusterClient], Awaitable[int]]


def settings_of(ctx: click.Context) -> Settings:
    return ctx.find_object(Settings) or Settings()


def run(work: Work) -> None:
    """Run a command's async work with a client in one event loop; exit with its code.

    Errors the command did not word itself still end as one stderr line and exit 1.
    """
    ctx = click.get_current_context()
    settings = settings_of(ctx)

    async def main() -> int:
        async with client_module.make_client(settings, warn=warn) as client:
            try:
                return await work(client)
            finally:
                warn_corrupt(client.corrupt_values())

    try:
        code = asyncio.run(main())
    except FleetError as e:
        raise CommandFailed(str(e)) from e
    except KeyboardInterrupt:
        raise CommandFailed("", 130) from None
    if code:
        ctx.exit(code)


def warn_corrupt(corrupt: Mapping[str, str]) -> None:
    """One stderr line per stored value the command skipped because it does not decode:
    once per key however often the command read it (a blocking command polls), after its
    output."""
    for key, error in sorted(corrupt.items()):
        click.echo(f"WARNING: skipped a corrupt value at {key}: {error}", err=True)
