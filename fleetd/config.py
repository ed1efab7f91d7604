"""fleetd's configuration: fleet.conf, `FLEET_*` environment variables and `-o` flags.

Precedence, highest first (each layer only replaces the options it names):

1. command-line overrides: ``fleetd -o key=value`` (ours; fleet had no per-option flags);
2. environment: ``FLEET_<OPTION_UPPER>``, e.g. ``FLEET_ETCD_SERVERS``. A variable that is set
   but empty still counts as set and shadows the file, as in fleet (``os.LookupEnv``);
3. the config file: ``--config PATH`` (must exist and not be a directory), else
   ``/etc/fleet/fleet.conf`` if it exists, else none;
4. the defaults in `Config`.

The file is read exactly as fleet's globalconf/goini read it: top-level ``key = value`` lines,
keys lowercased, ``#``/``;`` comment lines, values ``"..."``/``'...'`` (quotes stripped, only
when the quote ends the line) or bare (cut at the first ``#`` or ``;``, trimmed), a trailing
``\\`` joins the next line. Where fleet silently ignored a mistake we stop with a `ConfigError`
naming the option and where it came from: unknown options (with the closest known name),
``[section]`` headers (goini would drop every key under them), malformed values.

An empty value for an int, float or bool option means its default, from any layer: fleet's
``flag.Set("")`` failed and was ignored, so the default stayed (and the file was still
shadowed by an empty environment variable). Every other empty value is taken as given.

What a value of each option may be is fleetd/config_values.py's (Go's syntax and the
checks); this module names the parser of each option and merges the layers. Finding this
machine's ID and public IP is fleetd/machine.py's. Pure except `load_config` (reads the file).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleetd.config_values import (
    int_in_range,
    parse_absolute_path,
    parse_bool,
    parse_etcd_servers,
    parse_host_port,
    parse_int,
    parse_ip,
    parse_key_prefix,
    parse_machine_id,
    parse_metadata,
    parse_optional_absolute_path,
    parse_positive_duration,
    parse_positive_float,
    quote,
    split_host_port,
)
from fleetd.errors import ConfigError
from fleetd.etcd.endpoints import parse_endpoints
from fleetd.registry.keys import DEFAULT_PREFIX
from fleetd.unit.gotext import GO_SPACE  # goini trims with Go's whitespace, not str.strip()'s

DEFAULT_CONFIG_FILE = "/etc/fleet/fleet.conf"
ENV_PREFIX = "FLEET_"


@dataclass(frozen=True, slots=True)
class Config:
    """Every fleetd option, typed and validated. Build it with `load_config`."""

    verbosity: int = 0
    etcd_servers: tuple[str, ...] = ("http://127.0.0.1:2379",)
    etcd_username: str = ""
    etcd_password: str = field(default="", repr=False)
    etcd_keyfile: str = ""
    etcd_certfile: str = ""
    etcd_cafile: str = ""
    etcd_key_prefix: str = DEFAULT_PREFIX
    etcd_request_timeout: float = 1.0
    engine_reconcile_interval: float = 2.0
    public_ip: str = ""
    # Not hashed: a dict is unhashable, and two configs differing only here still compare unequal.
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)
    agent_ttl: float = 30.0
    token_limit: int = 100
    disable_engine: bool = False
    disable_watches: bool = False
    units_directory: str = "/run/fleet/units/"
    systemd_user: bool = False
    machine_id_file: str = "/etc/machine-id"
    machine_id: str = ""
    api_socket: str = "/var/run/fleet.sock"
    api_socket_group: str = "fleet"
    api_tcp: str = ""
    api_tcp_insecure: bool = False
    api_tls_cert: str = ""
    api_tls_key: str = ""
    api_tls_ca: str = ""
    max_unit_bytes: int = 1024 * 1024
    state_dir: str = "/run/fleet"
    # Not options: what the caller should log, and which file (if any) was read.
    warnings: tuple[str, ...] = ()
    config_file: str = ""

    @property
    def debug(self) -> bool:
        return self.verbosity > 0

    @property
    def api_tcp_address(self) -> tuple[str, int] | None:
        """`api_tcp` split into (host, port); host "" means every interface."""
        return split_host_port(self.api_tcp) if self.api_tcp else None


@dataclass(frozen=True, slots=True)
class Setting:
    """One raw option value and where it came from (for error messages)."""

    value: str
    origin: str  # "/etc/fleet/fleet.conf:3", "environment variable FLEET_X", "command line -o"


# ---------------------------------------------------------------------------------------------
# How the option table calls a parser (fleetd/config_values.py): the raw text and a list to
# append warnings to; it raises ConfigError with a short message, which `_convert` prefixes
# with the origin and the option name.

Parser = Callable[[str, list[str]], object]


def _plain(parse: Callable[[str], object]) -> Parser:
    """Adapt a parser that never warns to the `Parser` signature."""
    return lambda text, _warnings: parse(text)


def _deprecated_bool(name: str, why: str) -> Parser:
    def parse(text: str, warnings: list[str]) -> None:
        if parse_bool(text):
            warnings.append(f"Config option {name} {why} - ignoring")

    return parse


def _deprecated_str(name: str, why: str) -> Parser:
    def parse(text: str, warnings: list[str]) -> None:
        if text:
            warnings.append(f"Config option {name} {why} - ignoring")

    return parse


# ---------------------------------------------------------------------------------------------
# The option table.


@dataclass(frozen=True, slots=True)
class _Option:
    parse: Parser
    # Go flag types whose Set("") fails: fleet then kept the default, so an empty value means it.
    empty_means_default: bool = False
    # False for deprecated options: accepted (with a warning) but not stored in Config.
    stored: bool = True


def _typed(parse: Callable[[str], object]) -> _Option:
    return _Option(_plain(parse), empty_means_default=True)


def _text(parse: Callable[[str], object] = str) -> _Option:
    return _Option(_plain(parse))


_NOT_SUPPORTED = "is no longer supported"
OPTIONS: Mapping[str, _Option] = {
    "verbosity": _typed(parse_int),
    "etcd_servers": _text(parse_etcd_servers),
    "etcd_username": _text(),
    "etcd_password": _text(),
    "etcd_keyfile": _text(),
    "etcd_certfile": _text(),
    "etcd_cafile": _text(),
    "etcd_key_prefix": _text(parse_key_prefix),
    "etcd_request_timeout": _typed(parse_positive_float),
    "engine_reconcile_interval": _typed(parse_positive_float),
    "public_ip": _text(parse_ip),
    "metadata": _Option(parse_metadata),
    "agent_ttl": _text(parse_positive_duration),
    "token_limit": _typed(int_in_range(1, 65535)),
    "disable_engine": _typed(parse_bool),
    "disable_watches": _typed(parse_bool),
    "units_directory": _text(parse_absolute_path),
    "systemd_user": _typed(parse_bool),
    "machine_id_file": _text(parse_absolute_path),
    "machine_id": _text(parse_machine_id),
    "api_socket": _text(parse_optional_absolute_path),
    "api_socket_group": _text(),
    "api_tcp": _text(parse_host_port),
    "api_tcp_insecure": _typed(parse_bool),
    "api_tls_cert": _text(),
    "api_tls_key": _text(),
    "api_tls_ca": _text(),
    "max_unit_bytes": _typed(int_in_range(1, None)),
    "state_dir": _text(parse_absolute_path),
    "verify_units": _Option(
        _deprecated_bool("verify_units", _NOT_SUPPORTED), empty_means_default=True, stored=False
    ),
    "authorized_keys_file": _Option(
        _deprecated_str("authorized_keys_file", _NOT_SUPPORTED), stored=False
    ),
    "enable_grpc": _Option(
        _deprecated_bool("enable_grpc", "(fleet's experimental gRPC engine) is not supported"),
        empty_means_default=True,
        stored=False,
    ),
}


def env_var(option: str) -> str:
    """The environment variable that sets `option`, as globalconf named it."""
    return ENV_PREFIX + option.replace(".", "_").replace("-", "_").upper()


def unknown_option_error(name: str, where: str) -> ConfigError:
    """An unknown option, with the closest known name when one is close enough."""
    close = difflib.get_close_matches(name, OPTIONS, n=1)
    hint = f'; did you mean "{close[0]}"?' if close else ""
    return ConfigError(f"{where}: unknown option {quote(name)}{hint}")


# ---------------------------------------------------------------------------------------------
# fleet.conf syntax (goini). The regexes are goini's, anchored the same way: only the quoted
# forms must reach the end of the line, so `k = "v" # note` keeps its quotes, as in fleet.

_DOUBLE_QUOTED = re.compile(r"^([^= \t]+)[ \t]*=[ \t]*\"([^\"]*)\"\Z")
_SINGLE_QUOTED = re.compile(r"^([^= \t]+)[ \t]*=[ \t]*'([^']*)'\Z")
_UNQUOTED = re.compile(r"^([^= \t]+)[ \t]*=[ \t]*([^#;]+)")
_NO_VALUE = re.compile(r"^([^= \t]+)[ \t]*=[ \t]*([#;].*)?")


def parse_fleet_conf(text: str, source: str) -> dict[str, Setting]:
    """Parse fleet.conf text into {option: Setting}. Later duplicates win, as in goini."""
    settings: dict[str, Setting] = {}
    for lineno, line in _logical_lines(text, source):
        if line[0] in "#;":
            continue
        where = f"{source}:{lineno}"
        if line[0] == "[" and line[-1] == "]":
            raise ConfigError(
                f"{where}: section header {quote(line)} is not supported: fleet.conf has only"
                " top-level key = value lines (fleet silently ignored everything under a section)"
            )
        key, value = _parse_assignment(line, where)
        key = key.lower()
        if key not in OPTIONS:
            raise unknown_option_error(key, where)
        settings[key] = Setting(value, where)
    return settings


def _logical_lines(text: str, source: str) -> list[tuple[int, str]]:
    """Trimmed non-blank lines with `\\` continuations joined, each with its first line number."""
    physical = text.split("\n")  # bufio.ReadLine splits on \n only; \r goes with the trim
    lines: list[tuple[int, str]] = []
    index = 0
    while index < len(physical):
        lineno = index + 1
        line = physical[index].strip(GO_SPACE)
        index += 1
        while line.endswith("\\"):
            if index >= len(physical) or (index == len(physical) - 1 and not physical[index]):
                raise ConfigError(f"{source}:{lineno}: line continuation at the end of the file")
            line = line[:-1] + physical[index].strip(GO_SPACE)
            index += 1
        if line:  # goini skips empty lines (and crashed on whitespace-only ones)
            lines.append((lineno, line))
    return lines


def _parse_assignment(line: str, where: str) -> tuple[str, str]:
    for pattern in (_DOUBLE_QUOTED, _SINGLE_QUOTED):
        if match := pattern.match(line):
            return match[1], match[2]
    if match := _UNQUOTED.match(line):
        return match[1], match[2].strip(GO_SPACE)
    if match := _NO_VALUE.match(line):
        return match[1], ""
    raise ConfigError(f"{where}: syntax error: expected key = value, got {quote(line)}")


# ---------------------------------------------------------------------------------------------
# Layers -> Config.


_OVERRIDE_ORIGIN = "command line -o"


def build_config(
    file_settings: Mapping[str, Setting],
    environ: Mapping[str, str],
    overrides: Mapping[str, str],
    *,
    config_file: str = "",
) -> Config:
    """Merge the layers (overrides > environment > file > defaults), convert and validate."""
    winners = dict(file_settings)
    for option in OPTIONS:
        name = env_var(option)
        if name in environ:  # set-but-empty counts, as with Go's os.LookupEnv
            winners[option] = Setting(environ[name], f"environment variable {name}")
    for raw_key, value in overrides.items():
        option = normalize_override_key(raw_key)
        if option not in OPTIONS:
            raise unknown_option_error(option, _OVERRIDE_ORIGIN)
        winners[option] = Setting(value, _OVERRIDE_ORIGIN)

    warnings: list[str] = []
    values: dict[str, Any] = {}
    for option, setting in winners.items():
        spec = OPTIONS[option]
        if setting.value == "" and spec.empty_means_default:
            continue
        converted = _convert(option, spec, setting, warnings)
        if spec.stored:
            values[option] = converted
    config = Config(**values, warnings=tuple(warnings), config_file=config_file)
    _check_combinations(config)
    return config


def normalize_override_key(key: str) -> str:
    """`-o Etcd-Servers=...` names etcd_servers: lowercase like file keys, `-` like globalconf."""
    return key.strip().lower().replace("-", "_")


def _convert(option: str, spec: _Option, setting: Setting, warnings: list[str]) -> object:
    try:
        return spec.parse(setting.value, warnings)
    except ConfigError as exc:
        raise ConfigError(f"{setting.origin}: {option}: {exc}") from None


def _check_combinations(config: Config) -> None:
    """Rules that span options, so no single origin can be named."""
    _require_pair(config.etcd_certfile, "etcd_certfile", config.etcd_keyfile, "etcd_keyfile")
    _require_pair(config.api_tls_cert, "api_tls_cert", config.api_tls_key, "api_tls_key")
    # etcd auth needs both; the etcd adapter refuses one without the other, so say it here.
    _require_pair(config.etcd_username, "etcd_username", config.etcd_password, "etcd_password")
    # etcd_servers is valid here: parsed like every option, or the default.
    if not parse_endpoints(config.etcd_servers, default_port=None).tls:
        tls_files = [
            name
            for name in ("etcd_cafile", "etcd_certfile", "etcd_keyfile")
            if getattr(config, name)
        ]
        if tls_files:
            # Never send plaintext when TLS material was configured (the adapter refuses too).
            raise ConfigError(
                f"{', '.join(tls_files)} set but etcd_servers use http://; use https:// servers"
            )
    if config.api_tls_ca and not config.api_tls_cert:
        raise ConfigError(
            "api_tls_ca (to verify API clients) needs api_tls_cert and api_tls_key as well"
        )
    if config.api_tcp and not config.api_tls_cert and not config.api_tcp_insecure:
        raise ConfigError(
            f"api_tcp={config.api_tcp} would serve the API over TCP without TLS: set"
            " api_tls_cert and api_tls_key, or api_tcp_insecure=true to accept that anyone"
            " who can reach the port controls the cluster"
        )


def _require_pair(first: str, first_name: str, second: str, second_name: str) -> None:
    # A TLS certificate is useless without its private key, and vice versa.
    if bool(first) != bool(second):
        have, missing = (first_name, second_name) if first else (second_name, first_name)
        raise ConfigError(f"{have} is set but {missing} is not; set both or neither")


def load_config(
    path: str | None,
    environ: Mapping[str, str],
    overrides: Mapping[str, str],
    *,
    default_path: str = DEFAULT_CONFIG_FILE,
) -> Config:
    """Read the config file (see the module docstring for which) and build the Config."""
    config_file = resolve_config_file(path, default_path)
    settings: dict[str, Setting] = {}
    if config_file:
        settings = parse_fleet_conf(_read_text(config_file), config_file)
    return build_config(settings, environ, overrides, config_file=config_file)


def resolve_config_file(path: str | None, default_path: str = DEFAULT_CONFIG_FILE) -> str:
    """The file to read: `path` (must be a usable file), else the default if it exists, else ""."""
    if path:  # fleet treated -config "" as not given
        if not os.path.exists(path):
            raise ConfigError(f"unable to use config file {path}: no such file")
        if os.path.isdir(path):
            raise ConfigError(f"provided config {path} is a directory, not a file")
        return path
    return default_path if os.path.exists(default_path) else ""


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError(f"unable to read config file {path}: {exc.strerror}") from None
    try:
        # utf-8-sig: an editor's byte-order mark would otherwise become part of the first key.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (bad byte at offset {exc.start})"
        ) from None
