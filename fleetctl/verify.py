"""`version`, and `verify` (deprecated in fleet; kept so scripts get fleet's answer)."""

from __future__ import annotations

import click

from fleetctl.command import FleetCommand
from fleetctl.errors import CommandFailed
from fleetd import __version__


def version_line() -> str:
    return f"fleetctl version {__version__}"


@click.command(cls=FleetCommand, short_help="Print the version and exit.")
def version() -> None:
    """Print the version and exit."""
    click.echo(version_line())


@click.command(cls=FleetCommand, deprecated="No longer works.", short_help="DEPRECATED")
@click.argument("units", nargs=-1, metavar="UNIT")
def verify(units: tuple[str, ...]) -> None:
    """DEPRECATED: signed units are not supported (exit status 2, as in fleet)."""
    raise CommandFailed(
        "WARNING: The signed/verified units feature is DEPRECATED and cannot be used.",
        exit_code=2,
    )
