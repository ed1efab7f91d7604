"""fleetd's command line: `fleetd [--config PATH] [--version] [-o KEY=VALUE ...]`, `fleetd version`.

Compatible with fleet's fleetd, which used Go's flag package: the single-dash long forms
`-config PATH`, `-config=PATH`, `-version` and `-help` work, flag parsing stops at the first
positional argument, `fleetd version` prints the version, and any other positional argument
is refused with fleet's hint that fleetctl was meant (exit 1). `-o/--option` is ours: it sets
any fleet.conf option and wins over the environment and the file (see fleetd.config).

Exit codes: 0 ok, 1 bad configuration or stray argument (fleet), 2 bad flag (Go's flag and
click both use 2), otherwise whatever the server returns.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import click

from fleetd import __version__, collector
from fleetd.config import DEFAULT_CONFIG_FILE, Config, load_config
from fleetd.errors import ConfigError, InvalidInput

DESCRIPTION = (
    "fleetd is the server component of fleet, a simple orchestration system for scheduling"
    " systemd units in a cluster."
)
EPILOG = (
    "Option precedence: -o flags, then FLEET_<OPTION> environment variables (set but empty"
    " counts), then the config file, then the defaults."
)
# Go's flag package accepted one or two dashes for long flags; click wants two.
_GO_LONG_FLAGS = ("config", "version", "help")
# Flags whose value is the next argument, which must not be mistaken for a flag or positional.
_FLAGS_WITH_VALUE = ("--config", "-o", "--option")


class UsageError(InvalidInput):
    """A bad command line. `main` prints it with the usage and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class FleetdArgs:
    """What the command line asked for."""

    config_path: str | None = None
    show_version: bool = False
    show_help: bool = False
    overrides: Mapping[str, str] = field(default_factory=dict)


@click.command(
    name="fleetd",
    help=DESCRIPTION,
    epilog=EPILOG,
    add_help_option=False,  # our own -h/--help, so parsing never prints or exits by itself
    # Like Go's flag package: everything after the first positional argument is positional.
    context_settings={"allow_interspersed_args": False},
)
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    help=f"Path to config file. fleetd looks for a config at {DEFAULT_CONFIG_FILE} by default.",
)
@click.option("--version", "show_version", is_flag=True, help="Print the version and exit.")
@click.option(
    "-o",
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Set a fleet.conf option, e.g. -o agent_ttl=10s. Repeatable; wins over env and file.",
)
@click.option("-h", "--help", "show_help", is_flag=True, help="Show this message and exit.")
@click.argument("args", nargs=-1, metavar="[version]")
def _command(**_params: object) -> None:
    """Never invoked: `parse_args` only parses with it."""


def translate_go_flags(argv: Sequence[str]) -> list[str]:
    """Rewrite Go-style `-config`, `-config=PATH`, `-version`, `-help` to click's `--` form."""
    translated: list[str] = []
    expect_value = False
    for index, arg in enumerate(argv):
        if expect_value:  # the value of `-config PATH` is copied as is, even if it starts with -
            translated.append(arg)
            expect_value = False
            continue
        if arg == "--" or not arg.startswith("-") or arg == "-":
            # Go stops parsing flags at the first positional argument; so does our command.
            translated.extend(argv[index:])
            break
        name, _, _ = arg.lstrip("-").partition("=")
        if arg.startswith("-") and not arg.startswith("--") and name in _GO_LONG_FLAGS:
            arg = "-" + arg
        expect_value = arg in _FLAGS_WITH_VALUE
        translated.append(arg)
    return translated


def parse_args(argv: Sequence[str], prog_name: str = "fleetd") -> FleetdArgs:
    """Parse fleetd's arguments (without the program name); raise UsageError if they are bad."""
    try:
        ctx = _command.make_context(prog_name, translate_go_flags(argv))
    except click.UsageError as exc:
        raise UsageError(exc.format_message()) from None
    params = ctx.params
    positional: tuple[str, ...] = params["args"]
    show_version = bool(params["show_version"])
    if positional:
        if positional[0] != "version":  # fleet ignored anything after `version`, so do we
            raise UsageError(
                f"{prog_name} takes no arguments. Did you mean to invoke fleetctl instead?",
                exit_code=1,
            )
        show_version = True
    return FleetdArgs(
        config_path=params["config_path"],
        show_version=show_version,
        show_help=bool(params["show_help"]),
        overrides=_parse_overrides(params["options"]),
    )


def _parse_overrides(options: Sequence[str]) -> dict[str, str]:
    overrides: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"-o expects KEY=VALUE (e.g. -o agent_ttl=10s), got {option!r}")
        overrides[key] = value  # a later -o for the same key wins
    return overrides


def help_text(prog_name: str = "fleetd") -> str:
    with click.Context(_command, info_name=prog_name) as ctx:
        return ctx.get_help()


def _default_prog_name() -> str:
    # fleet printed os.Args[0] as invoked; under `python -m fleetd` that is __main__.py.
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "fleetd"
    return "fleetd" if os.path.basename(argv0) == "__main__.py" else argv0


def main(argv: Sequence[str] | None = None, prog_name: str | None = None) -> int:
    """Run fleetd; returns the process exit code."""
    prog = prog_name or _default_prog_name()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, prog)
    except UsageError as exc:
        click.echo(str(exc), err=True)
        click.echo(help_text(prog), err=True)
        return exc.exit_code
    if args.show_help:
        click.echo(help_text(prog))
        return 0
    if args.show_version:
        click.echo(f"fleetd version {__version__}")
        return 0
    try:
        config = load_config(args.config_path, os.environ, args.overrides)
    except ConfigError as exc:
        # One line, no traceback: the message already names the option and where it came from.
        click.echo(f"fleetd: {exc}", err=True)
        return 1
    return _run_server(config, args.config_path)


def _run_server(config: Config, config_path: str | None) -> int:
    # Imported at call time, by name: keeps the daemon's heavy imports (aiohttp, dbus-fast)
    # out of `fleetd --version`, lets tests substitute the module, and keeps this module's type
    # check independent of the server's. server.run configures logging and logs config.warnings;
    # config_path (not the resolved file) is what SIGHUP re-reads, as fleet's reconfigure did.
    server = importlib.import_module("fleetd.server")
    collector.tune()  # after the imports, so they are frozen too
    result = server.run(config, config_path)
    return result if isinstance(result, int) else 0
