"""`fleetctl cat UNIT`: the unit file as the cluster stores it (reference §1.6)."""

from __future__ import annotations

import click

from fleetctl.client import ClusterClient
from fleetctl.command import FleetCommand, run
from fleetctl.completion import complete_units
from fleetctl.errors import CommandFailed
from fleetd.unit.names import mangle_name


@click.command(cls=FleetCommand, short_help="Output the contents of a submitted unit.")
@click.argument("units", nargs=-1, metavar="UNIT", shell_complete=complete_units)
def cat(units: tuple[str, ...]) -> None:
    """Print a unit's file in its normalized form: the text its HASH is computed from.

    Comments and blank lines of the original are gone and repeated sections are merged.
    """
    if len(units) != 1:
        raise click.UsageError("One unit file must be provided")
    name = mangle_name(units[0])

    async def work(client: ClusterClient) -> int:
        view = await client.unit(name)
        if view is None:
            raise CommandFailed(f"Unit {name} not found")
        # fleet prints the serialization as is: it already ends with a newline.
        click.echo(view.unit_file.serialize(), nl=False)
        return 0

    run(work)
