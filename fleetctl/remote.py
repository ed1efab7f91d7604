"""Commands that reach the machine running a unit: status, journal, ssh, fd-forward (§7).

As in fleet, `status` and `journal` run locally (exec, no SSH) when the unit's machine is this
machine (its /etc/machine-id), and over SSH to the machine's public IP otherwise, through
`--tunnel` if given. SSH itself sits behind `fleetctl.transport` (paramiko in fleetctl/ssh/).

The remote command line is built with POSIX shell quoting (fleet used Go's %q, which a
shell reads differently for `$`, backquotes and backslashes).
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import os
import shlex
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar, cast

import click

from fleetctl import transport
from fleetctl.client import ClusterClient
from fleetctl.command import FleetCommand, find_or_fail, run, settings_of
from fleetctl.completion import complete_units
from fleetctl.errors import CommandFailed
from fleetctl.settings import Settings
from fleetctl.transport import SshError, SshTransport, ssh_options
from fleetctl.waiting import MachineCache
from fleetd.model import TargetState
from fleetd.unit.names import mangle_name
from fleetd.views import MachineView, UnitView

T = TypeVar("T")

MACHINE_ID_FILE = "/etc/machine-id"
SSH_FAILURE = 255  # fleet's exit status when SSH itself fails (-1 as a byte)


def local_machine_id() -> str | None:
    try:
        with open(MACHINE_ID_FILE, encoding="ascii") as f:
            return f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


async def run_local(argv: Sequence[str]) -> int:
    """Run a command here, on this terminal; its exit status."""
    process = await asyncio.create_subprocess_exec(*argv)
    return await process.wait()


def ssh_address(host: str, port: int) -> str:
    """`host:port` for SSH (fleet's rule: add the port unless the host already has one)."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return host if ":" in host else f"{host}:{port}"


def in_daemon_thread(work: Callable[[], T]) -> Awaitable[T]:
    """Run blocking SSH work off the event loop, in a *daemon* thread.

    Not `asyncio.to_thread`: its executor threads are joined at exit, so Ctrl-C during
    `journal -f` would wait for a remote command that never ends.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def target() -> None:
        try:
            result = work()
        except BaseException as e:  # handed to the awaiting coroutine, not lost in a thread
            error = e
            loop.call_soon_threadsafe(settle, lambda: future.set_exception(error))
        else:
            loop.call_soon_threadsafe(settle, lambda: future.set_result(result))

    threading.Thread(target=target, daemon=True).start()
    return future


class RemoteRunner:
    """Runs commands on cluster machines; one SSH transport per fleetctl invocation."""

    def __init__(self, settings: Settings, machines: MachineCache, ssh_port: int) -> None:
        self._settings = settings
        self._machines = machines
        self._port = ssh_port
        self._transport: SshTransport | None = None
        self._local_id = local_machine_id()

    def _ssh(self) -> SshTransport:
        if self._transport is None:
            self._transport = transport.open_transport(ssh_options(self._settings))
        return self._transport

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def run(self, machine_id: str, argv: Sequence[str]) -> int:
        if machine_id == self._local_id:
            return await run_local(argv)
        machine = await self._machines.get(machine_id)
        if machine is None or not machine.primary_ip:
            raise CommandFailed("Error running command: unable to determine address of machine")
        address = ssh_address(machine.primary_ip, self._port)
        try:
            return await in_daemon_thread(
                lambda: self._ssh().run(address, shlex.join(argv), tty=False, forward_agent=False)
            )
        except SshError as e:
            raise CommandFailed(f"Unable to SSH to remote host: {e}", SSH_FAILURE) from e


def _ssh_port_option(func: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--ssh-port", type=int, default=22, show_default=True, help="Remote SSH port."
    )(func)


async def _machines_of(client: ClusterClient, view: UnitView) -> list[str]:
    """Where a unit runs: its machine, or for a global unit every machine reporting it."""
    if view.is_global:
        return sorted({s.machine_id for s in await client.unit_states(unit=view.name)})
    if view.current_state in (None, TargetState.INACTIVE.value) or not view.machine_id:
        return []
    return [view.machine_id]


# ---- status --------------------------------------------------------------------------------


@click.command(cls=FleetCommand, short_help="Output the status of one or more units.")
@_ssh_port_option
@click.argument("units", nargs=-1, metavar="UNIT...", shell_complete=complete_units)
def status(units: tuple[str, ...], ssh_port: int) -> None:
    """Run `systemctl status -l` for each unit on the machine that runs it.

    The exit status is the first non-zero one of those commands (3: a unit is not active).
    Global units are shown on every machine that reports them (fleet showed nothing).
    """
    if not units:
        raise click.UsageError("No units given")
    settings = settings_of(click.get_current_context())

    async def work(client: ClusterClient) -> int:
        found = await find_or_fail(client, units)
        runner = RemoteRunner(settings, MachineCache(client), ssh_port)
        try:
            first = True
            for view in found.units:
                machine_ids = await _machines_of(client, view)
                if not machine_ids:
                    raise CommandFailed(f"Unit {view.name} does not appear to be loaded.")
                for machine_id in machine_ids:
                    if not first:
                        click.echo("")
                    first = False
                    code = await runner.run(machine_id, ["systemctl", "status", "-l", view.name])
                    if code:
                        return code
        finally:
            runner.close()
        return int(bool(found.missing))

    run(work)


# ---- journal -------------------------------------------------------------------------------


def journal_argv(unit: str, lines: int, output: str, follow: bool, sudo: bool) -> list[str]:
    argv = ["journalctl", "--unit", unit, "--no-pager", "-n", str(lines), "--output", output]
    if follow:
        argv.append("-f")
    return ["sudo", *argv] if sudo else argv


@click.command(cls=FleetCommand, short_help="Print the journal of a unit in the cluster to stdout.")
@click.option(
    "-n",
    "--lines",
    type=int,
    default=10,
    show_default=True,
    help="Number of recent log lines to return.",
)
@click.option(
    "-f",
    "--f",
    "--follow",
    "follow",
    is_flag=True,
    help="Continuously print new entries as they are appended to the journal.",
)
@click.option("--output", default="short", show_default=True, help="Output mode (journalctl -o).")
@click.option("--sudo", is_flag=True, help="Run journalctl with sudo on the machine.")
@_ssh_port_option
@click.argument("units", nargs=-1, metavar="UNIT", shell_complete=complete_units)
def journal(
    units: tuple[str, ...], lines: int, follow: bool, output: str, sudo: bool, ssh_port: int
) -> None:
    """Run journalctl for a unit on the machine that runs it."""
    if len(units) != 1:
        raise click.UsageError("One unit file must be provided.")
    name = mangle_name(units[0])
    settings = settings_of(click.get_current_context())

    async def work(client: ClusterClient) -> int:
        view = await client.unit(name)
        if view is None:
            raise CommandFailed(f"Unit {name} does not exist.")
        if view.is_global:
            raise CommandFailed(f"Unable to retrieve journal of global unit {name}.")
        machine_ids = await _machines_of(client, view)
        if not machine_ids:
            raise CommandFailed(f"Unit {name} does not appear to be running.")
        runner = RemoteRunner(settings, MachineCache(client), ssh_port)
        try:
            return await runner.run(machine_ids[0], journal_argv(name, lines, output, follow, sudo))
        finally:
            runner.close()

    run(work)


# ---- ssh -----------------------------------------------------------------------------------


def _match_machines(prefix: str, machines: Sequence[MachineView]) -> list[MachineView]:
    return [m for m in machines if m.id.startswith(prefix)]


async def _address_of_unit(client: ClusterClient, arg: str) -> tuple[bool, str]:
    """(found, address) for a unit name; raises for a global unit or one not running."""
    view = await client.unit(mangle_name(arg))
    if view is None:
        return False, ""
    if view.is_global:
        raise CommandFailed("Unable to proceed: global units unsupported")
    if not view.machine_id:
        raise CommandFailed(f"Unable to proceed: unit {view.name} is not running on any machine")
    machine = next((m for m in await client.machines() if m.id == view.machine_id), None)
    return True, machine.primary_ip if machine else ""


async def ssh_target(client: ClusterClient, target: str, *, by_machine: bool, by_unit: bool) -> str:
    """The IP to SSH to for a machine-id prefix or a unit (fleet's findAddress*)."""
    machines = await client.machines()
    matches = _match_machines(target, machines) if not by_unit else []
    if len(matches) > 1:
        raise CommandFailed("Unable to proceed: found more than one machine")
    unit_found, unit_ip = (False, "") if by_machine else await _address_of_unit(client, target)
    if by_machine and not matches:
        raise CommandFailed("Unable to proceed: machine does not exist")
    if matches and unit_found:
        raise CommandFailed(
            f"Unable to proceed: ambiguous argument, both machine and unit found for `{target}`."
            "\nPlease use flag `-m` or `-u` to refine the search"
        )
    if not matches and not unit_found:
        raise CommandFailed("Unable to proceed: could not find matching unit or machine")
    ip = matches[0].primary_ip if matches else unit_ip
    if not ip:
        raise CommandFailed("Could not determine address of machine.")
    return ip


def _remote_command(args: Sequence[str]) -> str:
    """Everything after `--` if present, joined with spaces as ssh(1) does."""
    if "--" in args:
        args = args[args.index("--") + 1 :]
    return " ".join(args)


@click.command(
    cls=FleetCommand,
    short_help="Open interactive shell on a machine in the cluster.",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option(
    "-m", "--machine", "machine", help="Open SSH connection to a specific machine (id prefix)."
)
@click.option("-u", "--unit", "unit", help="Open SSH connection to the machine running a unit.")
@click.option(
    "-A",
    "--A",
    "--forward-agent",
    "forward_agent",
    is_flag=True,
    help="Forward the local ssh-agent to the remote machine.",
)
@_ssh_port_option
@click.argument(
    "args", nargs=-1, type=click.UNPROCESSED, metavar="{MACHINE|UNIT} [--] [COMMAND...]"
)
def ssh(
    machine: str | None, unit: str | None, forward_agent: bool, ssh_port: int, args: tuple[str, ...]
) -> None:
    """SSH to a machine, given by id prefix or by a unit it runs, optionally running a command.

    Without --machine/--unit the first argument may be either. Options go before it; what
    follows it (or `--`) is the remote command, whose exit status fleetctl exits with.
    """
    if machine and unit:
        raise CommandFailed("Both machine and unit flags provided, please specify only one.")
    rest = list(args)
    target = machine or unit
    if target is None:
        if not rest:
            raise click.UsageError("Provide a machine or unit to connect to")
        target = rest.pop(0)
    command = _remote_command(rest) or None
    settings = settings_of(click.get_current_context())

    async def work(client: ClusterClient) -> int:
        ip = await ssh_target(client, target, by_machine=bool(machine), by_unit=bool(unit))
        address = ssh_address(ip, ssh_port)
        tty = command is None and sys.stdin.isatty()

        def connect() -> int:
            connection = transport.open_transport(ssh_options(settings))
            try:
                return connection.run(address, command, tty=tty, forward_agent=forward_agent)
            finally:
                connection.close()

        try:
            return await in_daemon_thread(connect)
        except SshError as e:
            raise CommandFailed(f"Failed building SSH client: {e}") from e

    run(work)


# ---- fd-forward ----------------------------------------------------------------------------


def _pump_stdin(sock: socket.socket) -> None:
    stdin = cast(io.BufferedIOBase, sys.stdin.buffer)
    try:
        while data := stdin.read1(65536):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@click.command(
    "fd-forward", cls=FleetCommand, short_help="Proxy stdin and stdout to a unix domain socket."
)
@click.argument("socket_path", nargs=-1, metavar="SOCKET")
def fd_forward(socket_path: tuple[str, ...]) -> None:
    """Internal: what `--tunnel` runs on the tunnel host to reach fleetd's API socket."""
    if len(socket_path) != 1:
        raise click.UsageError("Provide a single argument")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.path.expanduser(socket_path[0]))
    except OSError as e:
        sock.close()
        raise CommandFailed(f"Failed dialing remote address: {e}") from e
    # Two directions, two threads: stdin may be a pipe, a pty or a file, and only blocking
    # reads work on all of them.
    threading.Thread(target=_pump_stdin, args=(sock,), daemon=True).start()
    stdout = sys.stdout.buffer
    with sock:
        while data := sock.recv(65536):
            stdout.write(data)
            stdout.flush()
