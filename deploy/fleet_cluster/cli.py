"""`fleet-cluster`: boot, inspect, disturb and tear down a local fleet cluster."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import machine as machine_ops
from . import prereqs, signals, ssh
from .cluster import Cluster
from .errors import ClusterError
from .fleet_service import parse_metadata
from .options import parse_machine_metadata
from .state import STATE_ROOT, Layout, locked

F = TypeVar("F", bound=Callable[..., Any])

_started = time.monotonic()


def _progress(subject: str, message: str) -> None:
    first, *rest = message.splitlines() or [""]
    click.echo(f"{time.monotonic() - _started:6.2f}s  {subject:<10} {first}")
    for line in rest:
        click.echo(f"{'':20}{line}")


def cluster_options(func: F) -> F:
    """--name and --state-root, on every command (so they can come after the command name)."""
    func = click.option(
        "--name",
        default="fleet",
        show_default=True,
        envvar="FLEET_CLUSTER_NAME",
        help="Cluster name: prefix of its machines (NAME1..NAMEn), bridge (NAMEbr0), state dir.",
    )(func)
    func = click.option(
        "--state-root",
        type=click.Path(path_type=Path),
        default=STATE_ROOT,
        show_default=True,
        envvar="FLEET_CLUSTER_STATE_ROOT",
        help="Where cluster state directories live.",
    )(func)
    return func


def _errors(func: F) -> F:
    """Turn the tool's own errors into a one-line message and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ClusterError as exc:
            click.echo(f"fleet-cluster: error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("fleet-cluster: interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _attach(name: str, state_root: Path) -> Cluster:
    prereqs.require_root()
    return Cluster.attach(name, state_root=state_root, progress=_progress)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """A local fleet cluster: etcd on the host and N systemd-nspawn machines on a bridge,
    each running real systemd, sshd and fleetd. Needs root."""
    signals.terminate_as_interrupt()


@main.command()
@cluster_options
@click.option("-n", "count", default=3, show_default=True, metavar="N", help="Number of machines.")
@click.option("--subnet", default="10.77.0.0/24", show_default=True, help="Bridge subnet.")
@click.option(
    "--metadata",
    multiple=True,
    help="Machine metadata: 'm1:k=v,k2=v2' for machine 1, 'k=v' for all. Repeatable.",
)
@click.option("--agent-ttl", default=None, help="fleetd agent_ttl, e.g. 10s.")
@click.option("--etcd-key-prefix", default="/fleet/", show_default=True)
@click.option("--etcd-port", default=0, help="etcd client port (default: a free one).")
@click.option(
    "--etcd-members",
    default=1,
    show_default=True,
    type=click.Choice(["1", "3", "5"]),
    help="etcd cluster size (members on the host; `fleet-cluster etcd` stops and starts them).",
)
@click.option(
    "--no-fleetd",
    is_flag=True,
    help="Boot the machines without fleet (neither installed nor started).",
)
@click.option(
    "--wheel",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="FLEET_CLUSTER_WHEEL",
    help="fleet's wheel to install in every machine (default: built from this checkout).",
)
@click.option(
    "--cloud-config",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="User-data for cloud-init in every machine (e.g. deploy/cloud-config.yaml): etcd "
    "and fleet come up as the file says, etcd found through a local discovery service.",
)
@click.option(
    "--bind-ro",
    "binds",
    multiple=True,
    help="Extra host path to bind read-only into every machine (repeatable).",
)
@click.option("--boot-timeout", default=60.0, show_default=True, help="Seconds per machine.")
@click.option("--keep-on-failure", is_flag=True, help="Do not tear down when booting fails.")
@_errors
def up(
    name: str,
    state_root: Path,
    count: int,
    subnet: str,
    metadata: tuple[str, ...],
    agent_ttl: str | None,
    etcd_key_prefix: str,
    etcd_port: int,
    etcd_members: str,
    no_fleetd: bool,
    wheel: Path | None,
    cloud_config: Path | None,
    binds: tuple[str, ...],
    boot_timeout: float,
    keep_on_failure: bool,
) -> None:
    """Start etcd, the bridge and N machines (each with sshd, and fleet installed from its
    wheel in the machine's own venv and running as fleet.service)."""
    prereqs.check_host()
    cluster = Cluster(
        name,
        count,
        subnet=subnet,
        agent_ttl=agent_ttl,
        metadata=parse_machine_metadata(metadata),
        etcd_key_prefix=etcd_key_prefix,
        fleetd=not no_fleetd,
        etcd_port=etcd_port,
        etcd_members=int(etcd_members),
        binds=list(binds),
        wheel=wheel,
        cloud_config=cloud_config,
        state_root=state_root,
        progress=_progress,
        boot_timeout=boot_timeout,
        keep_on_failure=keep_on_failure,
    )
    cluster.up()
    click.echo()
    _print_status(cluster.status())
    failed = [m for m in cluster.machines if m.fleetd and m.fleetd.startswith("FAILED")]
    if failed and not no_fleetd:
        names = ", ".join(m.name for m in failed)
        click.echo(
            f"\nwarning: fleetd is not running on {names}; see "
            f"`fleet-cluster exec --name {name} MACHINE journalctl -u fleet`",
            err=True,
        )


@main.command()
@cluster_options
@click.option("--grace", default=5.0, show_default=True, help="Seconds before SIGKILL.")
@_errors
def down(name: str, state_root: Path, grace: float) -> None:
    """Stop every machine and etcd, remove mounts, cgroups, bridge and state. Idempotent."""
    prereqs.require_root()
    Cluster(name, state_root=state_root, progress=_progress, stop_grace=grace).down()


@main.command()
@cluster_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_errors
def status(name: str, state_root: Path, as_json: bool) -> None:
    """Machines, their pids, addresses, machine-ids, systemd and fleet state; etcd health."""
    info = _attach(name, state_root).status()
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        _print_status(info)


def _print_status(info: dict[str, Any]) -> None:
    etcd_info = info["etcd"]
    health = "healthy" if etcd_info["healthy"] else "UNHEALTHY"
    click.echo(
        f"cluster {info['name']}  bridge {info['bridge']} {info['bridge_ip']}  "
        f"state {info['state_dir']}"
    )
    click.echo(
        f"etcd    {etcd_info['endpoint']}  pid {etcd_info['pid']}  {health}  "
        f"prefix {info['etcd_key_prefix']}  agent_ttl {info['agent_ttl'] or 'default'}"
    )
    for member in etcd_info.get("members", [])[1:]:
        health = "healthy" if member["healthy"] else "UNHEALTHY"
        click.echo(f"        {member['endpoint']}  pid {member['pid']}  {health}")
    header = (
        "MACHINE",
        "STATE",
        "NSPAWN",
        "INIT",
        "IP",
        "MACHINE-ID",
        "SYSTEMD",
        "FLEET",
        "VERSION",
    )
    rows = [header]
    for m in info["machines"]:
        state = m["status"] + (" (partitioned)" if m["partitioned"] else "")
        rows.append(
            (
                m["name"],
                state,
                str(m["nspawn_pid"] or "-"),
                str(m["init_pid"] or "-"),
                m["ip"],
                m["machine_id"],
                m["systemd"],
                m["fleet"],
                m["fleet_version"] or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


@main.command("ssh", context_settings={"ignore_unknown_options": True})
@cluster_options
@click.argument("machine")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@_errors
def ssh_(name: str, state_root: Path, machine: str, command: tuple[str, ...]) -> None:
    """SSH into MACHINE as root with the cluster key (runs COMMAND if given)."""
    prereqs.require_binaries(prereqs.SSH_CLIENT)
    cluster = _attach(name, state_root)
    argv = ssh.client_argv(cluster.layout, cluster.machine(machine).ip, command)
    os.execvp(argv[0], argv)


@main.command("exec", context_settings={"ignore_unknown_options": True})
@cluster_options
@click.argument("machine")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@_errors
def exec_(name: str, state_root: Path, machine: str, command: tuple[str, ...]) -> None:
    """Run COMMAND (default: a login shell) in MACHINE through nsenter, without SSH."""
    cluster = _attach(name, state_root)
    init_pid = machine_ops.require_running(cluster.machine(machine))
    argv = machine_ops.shell_argv(init_pid, command)
    os.execvpe(argv[0], argv, machine_ops.terminal_env())


def _machine_command(
    command_name: str, help_text: str, action: Callable[[Cluster, str], None]
) -> None:
    @main.command(command_name, help=help_text)
    @cluster_options
    @click.argument("machine")
    @_errors
    def command(name: str, state_root: Path, machine: str) -> None:
        with locked(Layout(state_root / name)):
            action(_attach(name, state_root), machine)


def _start_fleetd(cluster: Cluster, ref: str) -> None:
    status = cluster.start_fleetd(ref)
    click.echo(f"{cluster.machine(ref).name}: fleetd {status.summary}")
    for line in status.detail.splitlines():
        click.echo(f"  {line}")
    if not status.ok:
        sys.exit(1)


def _stop_fleetd(cluster: Cluster, ref: str) -> None:
    click.echo(f"{cluster.machine(ref).name}: fleetd {cluster.stop_fleetd(ref)}")


_machine_command("kill", "SIGKILL MACHINE (its overlay is kept for restart).", Cluster.kill)
_machine_command("stop", "Shut MACHINE down cleanly (overlay kept for restart).", Cluster.stop)
_machine_command(
    "restart", "Boot MACHINE again (same machine-id); stops it first.", Cluster.restart
)
_machine_command(
    "partition", "Cut MACHINE off the network (its veth goes down).", Cluster.partition
)
_machine_command("heal", "Reconnect a partitioned MACHINE.", Cluster.heal)
_machine_command("start-fleetd", "Start fleetd (fleet.service) in MACHINE.", _start_fleetd)
_machine_command("stop-fleetd", "Stop fleetd (fleet.service) in MACHINE.", _stop_fleetd)


@main.command("etcd")
@cluster_options
@click.argument("action", type=click.Choice(["stop", "kill", "start", "pause", "resume", "leader"]))
@click.argument("members", nargs=-1, type=int)
@_errors
def etcd_(name: str, state_root: Path, action: str, members: tuple[int, ...]) -> None:
    """Fail etcd on purpose: stop (SIGTERM), kill (SIGKILL) or start MEMBERS (default all),
    keeping their data; pause (SIGSTOP: a stall, answering nothing) or resume them; `leader`
    prints the raft leader's member number."""
    cluster = _attach(name, state_root)
    chosen = list(members) or None
    with locked(cluster.layout):
        if action == "leader":
            leader = cluster.etcd_leader()
            click.echo("none" if leader is None else str(leader))
            if leader is None:
                sys.exit(1)
        elif action == "start":
            cluster.start_etcd(chosen)
        elif action == "pause":
            cluster.pause_etcd(chosen)
        elif action == "resume":
            cluster.resume_etcd(chosen)
        else:
            cluster.stop_etcd(chosen, kill=action == "kill")


@main.command()
@cluster_options
@click.option("--metadata", default="", help="The new machine's metadata: 'k=v,k2=v2'.")
@_errors
def add(name: str, state_root: Path, metadata: str) -> None:
    """Boot one more machine into the running cluster (next index, new machine-id)."""
    cluster = _attach(name, state_root)
    added = cluster.add_machine(parse_metadata(metadata))
    fleetd = added.fleetd or "not started"
    click.echo(f"{added.name}: {added.ip} machine-id {added.machine_id} fleetd {fleetd}")


@main.command()
@cluster_options
@click.argument("machines", nargs=-1)
@click.option(
    "--wheel",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="FLEET_CLUSTER_WHEEL",
    help="The wheel to upgrade to (default: built from this checkout).",
)
@_errors
def upgrade(name: str, state_root: Path, machines: tuple[str, ...], wheel: Path | None) -> None:
    """Roll fleet to WHEEL on MACHINES (default all), one machine at a time.

    Each machine installs the wheel in its venv and restarts fleet.service, which leaves its
    units running; the next machine waits until fleetd is back. Stops at the first failure.
    """
    cluster = _attach(name, state_root)
    for machine, before, after in cluster.upgrade(machines, wheel=wheel):
        click.echo(f"{machine}: fleet {before} -> {after}")


@main.command()
@cluster_options
@_errors
def env(name: str, state_root: Path) -> None:
    """Print shell exports for driving the cluster with fleetctl from the host."""
    cluster = _attach(name, state_root)
    state = cluster.state
    assert state is not None
    # fleetctl infers the etcd driver only from ports 2379/4001; say it outright.
    click.echo("export FLEETCTL_DRIVER=etcd")
    click.echo(f"export FLEETCTL_ENDPOINT={','.join(cluster.etcd_endpoints)}")
    click.echo(f"export FLEETCTL_ETCD_KEY_PREFIX={state.etcd_key_prefix}")
    click.echo(f"export FLEETCTL_KNOWN_HOSTS_FILE={cluster.known_hosts}")
    # The machines have only root; their sshd accepts the cluster key.
    click.echo("export FLEETCTL_SSH_USERNAME=root")
    click.echo(f"export FLEETCTL_SSH_IDENTITY_FILE={cluster.ssh_key}")
    click.echo(f"export FLEET_CLUSTER_SSH_KEY={cluster.ssh_key}")
