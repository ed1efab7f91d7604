"""`fleetctl migrate-from-fleet`: copy units from a running fleet v1.0 cluster into fleet-py.

Reads fleet's etcd v2 keyspace over etcd's v2 HTTP API (one recursive GET), plans what to
write (fleetctl/fleetv1.py) against what the cluster fleetctl points at already holds, and
with `--apply` writes it through the same client calls submit, load and start use, so names,
bodies and options are validated exactly as for submit. Without `--apply` nothing is written.
Running it again after `--apply` finds everything already identical and writes nothing.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import replace
from typing import Any

import click

from fleetctl.client import ClusterClient, RegistryClient
from fleetctl.command import FleetCommand, run
from fleetctl.errors import CommandFailed
from fleetctl.fleetv1 import (
    DEFAULT_FLEET_PREFIX,
    Action,
    Existing,
    FleetKeyspace,
    MetadataStep,
    Plan,
    SourceError,
    UnitStep,
    normalize_fleet_prefix,
    parse_keyspace,
    plan,
    report,
)
from fleetd.errors import FleetError

READ_TIMEOUT = 60.0  # one recursive GET of the whole keyspace


def _ssl_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file or None)
    if cert_file or key_file:
        if not (cert_file and key_file):
            raise SourceError("--etcd2-cert-file and --etcd2-key-file go together")
        context.load_cert_chain(cert_file, key_file)
    return context


def keys_url(endpoint: str, prefix: str) -> str:
    """The v2 URL of a recursive, sorted GET of `prefix`."""
    base = endpoint.rstrip("/")
    return f"{base}/v2/keys{prefix.rstrip('/')}?recursive=true&sorted=true"


async def read_fleet_keyspace(
    endpoint: str, prefix: str, *, context: ssl.SSLContext | None = None
) -> dict[str, Any]:
    """fleet's keys under `prefix`, as etcd's v2 API returns them."""
    import aiohttp  # here: the etcd driver's commands never need it

    url = keys_url(endpoint, prefix)
    timeout = aiohttp.ClientTimeout(total=READ_TIMEOUT)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, ssl=context if context is not None else True) as resp,
        ):
            text = await resp.text()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        why = str(e) or type(e).__name__
        raise SourceError(f"cannot read fleet's keyspace from {url}: {why}") from e

    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if status == 404 and isinstance(body, dict) and body.get("errorCode") == 100:
        raise SourceError(f"no fleet keyspace at {prefix} in {endpoint} (etcd: Key not found)")
    if status != 200 or not isinstance(body, dict):
        detail = body.get("message") if isinstance(body, dict) else text[:200]
        raise SourceError(f"cannot read fleet's keyspace from {url}: HTTP {status}: {detail}")
    return body


async def _existing_metadata(
    client: ClusterClient, source: FleetKeyspace
) -> dict[str, dict[str, str]]:
    """Our dynamic metadata of the machines fleet had metadata for."""
    if isinstance(client, RegistryClient):
        return await client.registry.dynamic_metadata()
    # The API serves metadata merged with the machine's own, and only of live machines.
    wanted = {m.id for m in source.machines if m.dynamic}
    if not wanted:
        return {}
    return {m.id: dict(m.metadata) for m in await client.machines() if m.id in wanted}


async def migrate(client: ClusterClient, source: FleetKeyspace, *, apply: bool) -> Plan:
    """Plan against `client`'s cluster and (with `apply`) write. The plan as carried out:
    a write that failed turns its step into a SKIP with the error."""
    units = {u.name: Existing(u.hash, u.desired_state) for u in await client.units()}
    the_plan = plan(source, units, await _existing_metadata(client, source))
    if not apply:
        return the_plan
    done_units: list[UnitStep] = []
    for step in the_plan.units:
        if step.action is Action.CREATE:
            assert step.unit_file is not None
            assert step.state is not None
            try:
                await client.create_unit(step.name, step.unit_file, step.state)
            except FleetError as e:
                step = replace(step, action=Action.SKIP, detail=f"failed creating unit: {e}")
        done_units.append(step)
    done_meta: list[MetadataStep] = []
    for meta in the_plan.metadata:
        if meta.action is Action.CREATE:
            try:
                await client.set_machine_metadata(meta.machine_id, meta.key, meta.value)
            except FleetError as e:
                meta = replace(meta, action=Action.SKIP, detail=f"failed: {e}")
        done_meta.append(meta)
    return Plan(tuple(done_units), tuple(done_meta), the_plan.notes)


@click.command(
    "migrate-from-fleet",
    cls=FleetCommand,
    short_help="Copy the units of a fleet v1.0 cluster (etcd v2) into this cluster.",
)
@click.option(
    "--etcd2",
    "etcd2",
    required=True,
    metavar="URL",
    help="etcd endpoint of the fleet v1.0 cluster, serving the v2 API (http(s)://host:port).",
)
@click.option(
    "--etcd-prefix",
    "fleet_prefix",
    default=DEFAULT_FLEET_PREFIX,
    show_default=True,
    help="fleet's etcd key prefix (its etcd_key_prefix).",
)
@click.option("--etcd2-ca-file", default="", help="CA to verify the v2 etcd's TLS certificate.")
@click.option("--etcd2-cert-file", default="", help="Client certificate for the v2 etcd.")
@click.option("--etcd2-key-file", default="", help="Client key for the v2 etcd.")
@click.option("--apply", is_flag=True, help="Write. Without it, only report what would be done.")
def migrate_from_fleet(
    etcd2: str,
    fleet_prefix: str,
    etcd2_ca_file: str,
    etcd2_cert_file: str,
    etcd2_key_file: str,
    apply: bool,
) -> None:
    """Copy units (names, bodies, desired states) and dynamic machine metadata from a fleet
    v1.0 cluster's etcd v2 keyspace into the cluster fleetctl points at (--endpoint,
    --driver, --etcd-key-prefix as for every command).

    Dry run by default: prints, per unit, whether it would be created, is already identical,
    differs (left as it is), or is skipped and why, and exits 0. With --apply it writes and
    exits 1 if a unit was skipped or differs. Units are validated as `submit` validates them;
    a unit that fails is reported and skipped, the others are migrated. Running it again
    changes nothing. Placements, machine presence and published states are not copied: the
    new engine places units afresh and every fleetd registers its own machine.
    """
    try:
        prefix = normalize_fleet_prefix(fleet_prefix)
        context = (
            _ssl_context(etcd2_ca_file, etcd2_cert_file, etcd2_key_file)
            if etcd2.startswith("https:")
            else None
        )
    except (SourceError, OSError, ssl.SSLError) as e:
        raise CommandFailed(f"Error reading fleet's keyspace: {e}") from e

    async def work(client: ClusterClient) -> int:
        try:
            response = await read_fleet_keyspace(etcd2, prefix, context=context)
            source = parse_keyspace(response, prefix)
        except SourceError as e:
            raise CommandFailed(f"Error reading fleet's keyspace: {e}") from e
        click.echo(
            f"fleet v1.0 keyspace {prefix} at {etcd2}: {len(source.units)} unit(s),"
            f" {source.bodies} unit file(s), {len(source.machines)} machine(s)"
        )
        done = await migrate(client, source, apply=apply)
        for line in report(done, applied=apply):
            click.echo(line)
        if apply and (done.failed or any(m.action is Action.SKIP for m in done.metadata)):
            click.echo("Error: some units were not migrated (see above)", err=True)
            return 1
        return 0

    run(work)
