"""The `fleetctl` command: global flags, FLEETCTL_* variables and command dispatch.

Global flags are fleet's (reference §1.1), each also read from `FLEETCTL_<FLAG>` (an empty
variable counts as unset); click gives the precedence flag > environment > default. As with
fleet's cobra persistent flags, they may also come after the command name
(`fleetctl list-units --endpoint ...`).

Commands match by unique prefix, as cobra's (`list-m` is list-machines). Unlike fleet, an
unknown or ambiguous command and a bad flag exit with status 2 and a usage message (§9.2).
"""

from __future__ import annotations

import difflib
import logging
from typing import Any

import click

from fleetctl.cat import cat
from fleetctl.command import interspersed, normalize_bool_flags, takes_value
from fleetctl.lists import list_machines, list_unit_files, list_units
from fleetctl.maintenance import cordon, drain, uncordon
from fleetctl.migrate import migrate_from_fleet
from fleetctl.remote import fd_forward, journal, ssh, status
from fleetctl.settings import DEFAULT_KNOWN_HOSTS, Settings
from fleetctl.units import destroy, load, restart, start, stop, submit, unload
from fleetctl.verify import verify, version, version_line
from fleetctl.whatif import plan, why
from fleetd import __version__
from fleetd.registry.keys import DEFAULT_PREFIX

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}
# Global flags that must not move from after the command name to before it.
_NOT_PERSISTENT = frozenset({"--version", "--help"})


class FleetGroup(click.Group):
    """Prefix matching, and cobra-style persistent global flags."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        exact = super().get_command(ctx, cmd_name)
        if exact is not None:
            return exact
        candidates = [name for name in self.list_commands(ctx) if name.startswith(cmd_name)]
        if len(candidates) == 1:
            return super().get_command(ctx, candidates[0])
        if ctx.resilient_parsing:  # shell completion: never raise
            return None
        suggestions = candidates or difflib.get_close_matches(cmd_name, self.list_commands(ctx))
        message = f'unknown command "{cmd_name}" for "fleetctl"'
        if suggestions:
            message += "\n\nDid you mean this?\n" + "".join(f"\t{s}\n" for s in suggestions)
        raise click.UsageError(message, ctx)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        _, command, rest = super().resolve_command(ctx, args)
        # The full name, so `fleetctl list-m --help` says "list-machines".
        return (command.name if command else None), command, rest

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # A group does not take options after its first argument (the command name), so
        # only the global flags are rewritten here; the rest is the command's to parse.
        args = normalize_bool_flags(self, self._hoist_global_flags(ctx, args))
        return super().parse_args(ctx, args)

    def _command_index(self, args: list[str]) -> int:
        """The position of the command name: after the global flags and their values."""
        index = 0
        while index < len(args) and args[index].startswith("-") and args[index] != "--":
            name = args[index].split("=", 1)[0]
            index += 2 if "=" not in args[index] and takes_value(self, name) else 1
        return index

    def _hoist_global_flags(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Move global flags found after the command name to before it."""
        index = self._command_index(args)
        if index >= len(args) or args[index] == "--":
            return args
        command = self.get_command(ctx, args[index]) if not ctx.resilient_parsing else None
        mixed = command is None or interspersed(command)
        before, after, moved = args[: index + 1], [], []
        rest = iter(args[index + 1 :])
        for arg in rest:
            if arg == "--" or (not mixed and not arg.startswith("-")):
                after.append(arg)
                after.extend(rest)
                break
            name = arg.split("=", 1)[0]
            if not self._is_global(name):
                after.append(arg)
                continue
            moved.append(arg)
            if "=" not in arg and takes_value(self, name):
                value = next(rest, None)
                if value is not None:
                    moved.append(value)
        return before[:-1] + moved + before[-1:] + after

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # fleet's usage template has a VERSION section in the help of fleetctl itself only
        # (not of its commands), after its usage: the bare version on a tab-indented line.
        # Written as fleet writes it, not as a click section, for the scripts that read it.
        super().format_help_text(ctx, formatter)
        formatter.write_paragraph()
        formatter.write(f"VERSION:\n\t{__version__}\n")

    def _is_global(self, name: str) -> bool:
        if not name.startswith("--") or name in _NOT_PERSISTENT:
            return False
        return any(
            isinstance(p, click.Option) and name in p.opts + p.secondary_opts for p in self.params
        )


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_line())
        ctx.exit(0)


def _debug_logging(ctx: click.Context) -> None:
    """--debug: let debug records through for this invocation only."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.DEBUG)
    ctx.call_on_close(lambda: root.setLevel(previous))


@click.group(
    name="fleetctl",
    cls=FleetGroup,
    context_settings=CONTEXT_SETTINGS,
    invoke_without_command=True,
    help="fleetctl is a command-line interface to fleet, the cluster-wide init system.",
)
@click.option(
    "-v",
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print the version and exit.",
)
@click.option(
    "--endpoint",
    envvar="FLEETCTL_ENDPOINT",
    help="Location of the fleet API (unix:///var/run/fleet.sock, http://host:port) or of etcd"
    " (comma-separated http(s) URLs). Default: the local fleetd socket if it exists, else"
    " etcd at http://127.0.0.1:2379.",
)
@click.option(
    "--driver",
    envvar="FLEETCTL_DRIVER",
    help="Adapter used to talk to fleet: API or etcd. Default: decided by the endpoint.",
)
@click.option(
    "--etcd-key-prefix",
    envvar="FLEETCTL_ETCD_KEY_PREFIX",
    default=DEFAULT_PREFIX,
    show_default=True,
    help="Keyspace for fleet data in etcd.",
)
@click.option(
    "--key-file",
    "--etcd-keyfile",
    "key_file",
    envvar=["FLEETCTL_KEY_FILE", "FLEETCTL_ETCD_KEYFILE"],
    default="",
    help="Location of TLS key file used to secure communication with the fleet API or etcd.",
)
@click.option(
    "--cert-file",
    "--etcd-certfile",
    "cert_file",
    envvar=["FLEETCTL_CERT_FILE", "FLEETCTL_ETCD_CERTFILE"],
    default="",
    help="Location of TLS cert file used to secure communication with the fleet API or etcd.",
)
@click.option(
    "--ca-file",
    "--etcd-cafile",
    "ca_file",
    envvar=["FLEETCTL_CA_FILE", "FLEETCTL_ETCD_CAFILE"],
    default="",
    help="Location of TLS CA file used to secure communication with the fleet API or etcd.",
)
@click.option("--etcd-username", envvar="FLEETCTL_ETCD_USERNAME", default="", help="etcd user.")
@click.option("--etcd-password", envvar="FLEETCTL_ETCD_PASSWORD", default="", help="etcd password.")
@click.option(
    "--tunnel",
    envvar="FLEETCTL_TUNNEL",
    default="",
    help="Establish an SSH tunnel through the provided address (host[:port]) for"
    " communication with fleet and etcd.",
)
@click.option(
    "--ssh-username",
    envvar="FLEETCTL_SSH_USERNAME",
    default="core",
    show_default=True,
    help="Username to use when connecting to CoreOS instance.",
)
@click.option(
    "--ssh-identity-file",
    envvar="FLEETCTL_SSH_IDENTITY_FILE",
    default="",
    metavar="PATH",
    help="Private key to authenticate with, offered after the ssh-agent's keys; with it no"
    " agent is needed.",
)
@click.option(
    "--known-hosts-file",
    envvar="FLEETCTL_KNOWN_HOSTS_FILE",
    default=DEFAULT_KNOWN_HOSTS,
    show_default=True,
    help="File used to store remote machine fingerprints. Ignored if strict host key"
    " checking is disabled.",
)
@click.option(
    "--strict-host-key-checking/--no-strict-host-key-checking",
    envvar="FLEETCTL_STRICT_HOST_KEY_CHECKING",
    default=True,
    show_default=True,
    help="Verify host keys presented by remote machines before initiating SSH connections.",
)
@click.option(
    "--ssh-timeout",
    envvar="FLEETCTL_SSH_TIMEOUT",
    # A timeout of 0 or less failed every request at once, with no word about the flag.
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Amount of time in seconds to allow for SSH connection initialization before failing.",
)
@click.option(
    "--request-timeout",
    envvar="FLEETCTL_REQUEST_TIMEOUT",
    # A timeout of 0 or less failed every request at once, with no word about the flag.
    type=click.FloatRange(min=0, min_open=True),
    default=3.0,
    show_default=True,
    help="Amount of time in seconds to allow a single request before considering it failed.",
)
@click.option(
    "--experimental-api/--no-experimental-api",
    envvar="FLEETCTL_EXPERIMENTAL_API",
    default=True,
    hidden=True,  # deprecated in fleet, where it had no effect either
)
@click.option(
    "--debug/--no-debug",
    envvar="FLEETCTL_DEBUG",
    default=False,
    help="Print out more debug information to stderr.",
)
@click.pass_context
def cli(ctx: click.Context, /, experimental_api: bool, **flags: Any) -> None:
    settings = Settings(**flags)
    ctx.obj = settings
    if settings.debug:
        _debug_logging(ctx)
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@cli.command("help", short_help="Help about any command.")
@click.argument("command", nargs=-1, metavar="[COMMAND]")
@click.pass_context
def help_command(ctx: click.Context, command: tuple[str, ...]) -> None:
    """Show the help of fleetctl or of one of its commands."""
    root = ctx.find_root()
    if not command:
        click.echo(root.get_help())
        return
    group = root.command
    assert isinstance(group, click.Group)
    found = group.get_command(root, command[0])
    if found is None:
        raise click.UsageError(f'unknown command "{command[0]}" for "fleetctl"', ctx)
    with click.Context(found, info_name=found.name, parent=root) as sub:
        click.echo(found.get_help(sub))


for _command in (
    cat,
    cordon,
    destroy,
    drain,
    fd_forward,
    journal,
    list_machines,
    list_unit_files,
    list_units,
    load,
    migrate_from_fleet,
    plan,
    restart,
    ssh,
    start,
    status,
    stop,
    submit,
    uncordon,
    unload,
    verify,
    version,
    why,
):
    cli.add_command(_command)
