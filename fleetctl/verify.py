"""`version`, and `verify` (deprecated in fleet; kept so scripts get fleet's answer)."""

from __future__ import annotations

import json
from collections import defaultdict

import click

from fleetctl.client import ClusterClient
from fleetctl.command import FleetCommand, output_format_option, run
from fleetctl.errors import CommandFailed
from fleetd import __version__
from fleetd.errors import FleetError
from fleetd.registry.migrations import version_key


def version_line() -> str:
    return f"fleetctl version {__version__}"


@click.command(cls=FleetCommand, short_help="Print fleetctl's and the cluster's versions.")
@output_format_option("table: lines; json: one object.")
def version(output_format: str) -> None:
    """Print fleetctl's version, then the fleetd versions of the cluster where it answers.

    The first line is fleet's own output. Through etcd every registered machine's version is
    known; through the API, that of the fleetd serving it. An unreachable cluster is said on
    stderr and the exit status stays 0, as the client's version was printed.
    """

    async def work(client: ClusterClient) -> int:
        try:
            versions, error = await client.fleetd_versions(), ""
        except FleetError as e:
            versions, error = {}, str(e)
        _print_versions(versions, error, as_json=output_format.lower() == "json")
        return 0

    try:
        run(work)
    except CommandFailed as e:  # no client at all (e.g. nothing answers where it looked)
        if e.exit_code != 1:  # Ctrl-C (130) and the like are not "unreachable"
            raise
        _print_versions({}, str(e), as_json=output_format.lower() == "json")


def _print_versions(versions: dict[str, str], error: str, *, as_json: bool) -> None:
    """fleetctl's line, then one per fleetd version (machine id -> version), and why the
    cluster's versions are unknown if they are (`error`: on stderr, or in the JSON)."""
    by_version: dict[str, list[str]] = defaultdict(list)
    for machine, found in sorted(versions.items()):
        by_version[found or "unknown"].append(machine)
    ordered = sorted(by_version, key=lambda v: (version_key(v) or (), v))
    if as_json:
        fleetd = [{"version": v, "machines": by_version[v]} for v in ordered]
        body = {"fleetctl": __version__, "fleetd": fleetd, "error": error or None}
        click.echo(json.dumps(body, indent=2))
        return
    click.echo(version_line())
    for found in ordered:
        machines = [m for m in by_version[found] if m]
        if not machines:  # the API driver: the answering fleetd only
            click.echo(f"fleetd version {found} (the fleetd serving the API)")
            continue
        listed = ", ".join(m[:8] for m in machines[:5]) + (", ..." if machines[5:] else "")
        count = f"{len(machines)} machine{'s' if len(machines) != 1 else ''}"
        click.echo(f"fleetd version {found} ({count}: {listed})")
    if error:
        click.echo(f"fleetd version unknown: {error}", err=True)


@click.command(cls=FleetCommand, deprecated="No longer works.", short_help="DEPRECATED")
@click.argument("units", nargs=-1, metavar="UNIT")
def verify(units: tuple[str, ...]) -> None:
    """DEPRECATED: signed units are not supported (exit status 2, as in fleet)."""
    raise CommandFailed(
        "WARNING: The signed/verified units feature is DEPRECATED and cannot be used.",
        exit_code=2,
    )
