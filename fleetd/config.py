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

Pure except `load_config` (reads the file), `read_machine_id` and `detect_public_ip`.
"""

from __future__ import annotations

import difflib
import fcntl
import ipaddress
import json
import math
import os
import re
import socket
import struct
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from fleetd.errors import ConfigError
from fleetd.etcd.endpoints import EndpointError, Problem, parse_endpoints
from fleetd.registry.keys import DEFAULT_PREFIX, normalize_prefix
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
        return _split_host_port(self.api_tcp) if self.api_tcp else None


@dataclass(frozen=True, slots=True)
class Setting:
    """One raw option value and where it came from (for error messages)."""

    value: str
    origin: str  # "/etc/fleet/fleet.conf:3", "environment variable FLEET_X", "command line -o"


# ---------------------------------------------------------------------------------------------
# Value parsers. Each takes the raw text and a list to append warnings to, and raises
# ConfigError with a short message; `_convert` prefixes the origin and option name.

Parser = Callable[[str, list[str]], object]

_GO_BOOLS = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool, which fleet's bool flags used."""
    try:
        return _GO_BOOLS[text]
    except KeyError:
        raise ConfigError(f"invalid boolean {_q(text)} (use true or false)") from None


_GO_OCTAL = re.compile(r"[+-]?0[_0-7]+")
_INT64 = 2**63


def parse_int(text: str) -> int:
    """Go's strconv.ParseInt(s, 0, 64): 0x/0o/0b prefixes, a leading 0 means octal, `_`."""
    # Python's int() would also take surrounding spaces and non-ASCII digits; Go takes neither.
    if not text.isascii() or text != text.strip():
        raise ConfigError(f"invalid integer {_q(text)}")
    digits = text
    if _GO_OCTAL.fullmatch(digits):
        sign = digits[0] if digits[0] in "+-" else ""
        digits = f"{sign}0o{digits[len(sign) + 1 :]}"
    try:
        value = int(digits, 0)
    except ValueError:
        raise ConfigError(f"invalid integer {_q(text)}") from None
    if not -_INT64 <= value < _INT64:
        raise ConfigError(f"integer {_q(text)} out of range")
    return value


_DECIMAL_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_float(text: str) -> float:
    """A decimal float as Go's strconv.ParseFloat reads it (no inf/nan: no option wants them)."""
    if not _DECIMAL_FLOAT.fullmatch(text):
        raise ConfigError(f"invalid number {_q(text)}")
    value = float(text)
    if not math.isfinite(value):
        raise ConfigError(f"number {_q(text)} out of range")
    return value


# Go's time.ParseDuration units, in nanoseconds (µ and μ are both accepted, as in Go).
_DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DURATION_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration ("30s", "1m30s", "500ms", "1.5h"), returned in seconds."""
    rest = text
    negative = rest[:1] == "-"
    if rest[:1] in ("-", "+"):
        rest = rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ConfigError(f"invalid duration {_q(text)}")
    nanos = Fraction(0)
    while rest:
        part, consumed = _duration_part(text, rest)
        nanos += part
        rest = rest[consumed:]
    # Go keeps durations in int64 nanoseconds; beyond that (~292 years) it reports an error.
    if nanos >= _INT64:
        raise ConfigError(f"invalid duration {_q(text)}: out of range")
    return float(-nanos if negative else nanos) / 1e9


def _duration_part(text: str, rest: str) -> tuple[Fraction, int]:
    """The nanoseconds of the leading `<number><unit>` of `rest`, and its length."""
    match = _DURATION_PART.match(rest)
    assert match is not None  # every group can match empty
    whole, frac, unit = match.groups()
    if not whole and not frac:
        raise ConfigError(f"invalid duration {_q(text)}")
    if not unit:
        raise ConfigError(
            f"missing unit in duration {_q(text)} (use ns, us, ms, s, m or h, e.g. 30s)"
        )
    if unit not in _DURATION_UNITS:
        raise ConfigError(
            f"unknown unit {_q(unit)} in duration {_q(text)} (use ns, us, ms, s, m or h)"
        )
    number = Fraction(int(whole or "0")) + Fraction(int(frac or "0"), 10 ** len(frac or ""))
    return number * _DURATION_UNITS[unit], match.end()


def parse_string_slice(text: str) -> tuple[str, ...]:
    """fleet's pkg.StringSlice: split on ",", trim ` ["` left and ` "]` right of each item.

    So `["http://a:2379", "http://b:4001"]` and `http://a:2379,http://b:4001` are the same.
    """
    return tuple(item.lstrip(' ["').rstrip(' "]') for item in text.split(","))


_METADATA_KEY = re.compile(r"[A-Za-z0-9_.-]+")


def parse_metadata(text: str, warnings: list[str] | None = None) -> dict[str, str]:
    """fleet's config.Metadata: `k=v,k2=v2`, trimmed, a later duplicate wins.

    fleet skipped a pair without "=" silently; we skip it too but warn, since it is almost
    always a typo. Keys are checked because MachineMetadata= constraints must match them.
    """
    metadata: dict[str, str] = {}
    for pair in text.split(","):
        key, sep, value = pair.partition("=")
        if not sep:
            if pair.strip() and warnings is not None:
                warnings.append(f'metadata entry {_q(pair.strip())} has no "=" - ignoring')
            continue
        key = key.strip()
        if not _METADATA_KEY.fullmatch(key):
            raise ConfigError(
                f"invalid metadata key {_q(key)} (use letters, digits, '_', '.' and '-')"
            )
        metadata[key] = value.strip()
    return metadata


def _parse_etcd_servers(text: str) -> tuple[str, ...]:
    servers = parse_string_slice(text)
    try:
        parse_endpoints(servers, default_port=None)  # fleet.conf names every port
    except EndpointError as e:
        raise ConfigError(_server_error(e)) from None
    return servers


def _server_error(e: EndpointError) -> str:
    """The etcd endpoint rule (fleetd/etcd/endpoints.py) in fleet.conf's words."""
    example = "use http://host:port or https://host:port"
    server = f"server {_q(e.url)}"
    match e.problem:
        case Problem.NONE | Problem.EMPTY:
            return "empty server entry (a stray comma?)"
        case Problem.UNPARSABLE:
            return f"invalid server URL {_q(e.url)}: {e.detail}; {example}"
        case Problem.WHITESPACE:
            return f"{server} contains whitespace or control characters"
        case Problem.SCHEME:
            return f"{server} must use http or https; {example}"
        case Problem.HOST_PORT:
            return f"{server} needs a host and a port; {example}"
        case Problem.CREDENTIALS:
            return f"{server} carries credentials; set etcd_username and etcd_password instead"
        case Problem.PATH:
            return f"{server} must not have a path or query; {example}"
        case Problem.MIXED:
            # The etcd adapter reaches every member the same way: it is either TLS or not.
            return "mixes http:// and https:// servers; use one scheme for all"


def _parse_positive_float(text: str) -> float:
    value = parse_float(text)
    if value <= 0:
        raise ConfigError(f"must be greater than 0, got {_q(text)}")
    return value


def _parse_positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ConfigError(f"must be greater than 0, got {_q(text)}")
    return value


def _int_in_range(low: int, high: int | None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = parse_int(text)
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"must be {bounds}, got {_q(text)}")
        return value

    return parse


def _parse_ip(text: str) -> str:
    if not text:
        return text  # empty: detect it at startup (fleet's behaviour)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{_q(text)} is not an IP address") from None
    return text


def _parse_absolute_path(text: str) -> str:
    if not text.startswith("/"):
        raise ConfigError(f"must be an absolute path, got {_q(text)}")
    return text


def _parse_optional_absolute_path(text: str) -> str:
    return _parse_absolute_path(text) if text else text


def _parse_key_prefix(text: str) -> str:
    return normalize_prefix(text)


_MACHINE_ID = re.compile(r"[A-Za-z0-9]+")


def _check_machine_id(machine_id: str) -> str:
    # Machine IDs are path segments of etcd keys: no "/", no spaces. systemd's are 32 hex digits.
    if not _MACHINE_ID.fullmatch(machine_id):
        raise ConfigError(
            f"invalid machine ID {_q(machine_id)}: use letters and digits only"
            " (systemd's are 32 lowercase hex digits)"
        )
    return machine_id


def _parse_machine_id(text: str) -> str:
    return _check_machine_id(text) if text else text


def _split_host_port(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isascii() or not port_text.isdigit():
        raise ConfigError(f"{_q(text)} is not host:port (e.g. 0.0.0.0:49153 or [::1]:49153)")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ConfigError(f"port {port} in {_q(text)} must be between 1 and 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{_q(text)} has an invalid IPv6 address") from None
    elif ":" in host or any(ch.isspace() for ch in host):
        raise ConfigError(f"{_q(text)} is not host:port (bracket IPv6 addresses: [::1]:49153)")
    return host, port


def _parse_host_port(text: str) -> str:
    if text:
        _split_host_port(text)
    return text


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
    "etcd_servers": _text(_parse_etcd_servers),
    "etcd_username": _text(),
    "etcd_password": _text(),
    "etcd_keyfile": _text(),
    "etcd_certfile": _text(),
    "etcd_cafile": _text(),
    "etcd_key_prefix": _text(_parse_key_prefix),
    "etcd_request_timeout": _typed(_parse_positive_float),
    "engine_reconcile_interval": _typed(_parse_positive_float),
    "public_ip": _text(_parse_ip),
    "metadata": _Option(parse_metadata),
    "agent_ttl": _text(_parse_positive_duration),
    "token_limit": _typed(_int_in_range(1, 65535)),
    "disable_engine": _typed(parse_bool),
    "disable_watches": _typed(parse_bool),
    "units_directory": _text(_parse_absolute_path),
    "systemd_user": _typed(parse_bool),
    "machine_id_file": _text(_parse_absolute_path),
    "machine_id": _text(_parse_machine_id),
    "api_socket": _text(_parse_optional_absolute_path),
    "api_socket_group": _text(),
    "api_tcp": _text(_parse_host_port),
    "api_tcp_insecure": _typed(parse_bool),
    "api_tls_cert": _text(),
    "api_tls_key": _text(),
    "api_tls_ca": _text(),
    "max_unit_bytes": _typed(_int_in_range(1, None)),
    "state_dir": _text(_parse_absolute_path),
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
    return ConfigError(f"{where}: unknown option {_q(name)}{hint}")


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
                f"{where}: section header {_q(line)} is not supported: fleet.conf has only"
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
    raise ConfigError(f"{where}: syntax error: expected key = value, got {_q(line)}")


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


# ---------------------------------------------------------------------------------------------
# Machine identity and public IP (the only I/O besides load_config).

MACHINE_ID_ERROR = "unable to determine local machine ID"


def read_machine_id(config: Config) -> str:
    """config.machine_id if set, else the trimmed contents of config.machine_id_file.

    fleet re-read /etc/machine-id on every state refresh; callers may call this as often.
    """
    if config.machine_id:
        return _check_machine_id(config.machine_id)
    try:
        with open(config.machine_id_file, encoding="utf-8") as handle:
            machine_id = handle.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{MACHINE_ID_ERROR}: {config.machine_id_file}: {detail}") from None
    if not machine_id:
        raise ConfigError(f"{MACHINE_ID_ERROR}: {config.machine_id_file} is empty")
    try:
        return _check_machine_id(machine_id)
    except ConfigError as exc:
        raise ConfigError(f"{MACHINE_ID_ERROR}: {config.machine_id_file}: {exc}") from None


_SIOCGIFADDR = 0x8915
_RTF_UP = 0x1


def detect_public_ip(route_file: str = "/proc/net/route") -> str:
    """First global-unicast IPv4 address of the default route's interface, or "" (fleet)."""
    try:
        with open(route_file, encoding="ascii") as handle:
            interfaces = default_route_interfaces(handle.read())
    except (OSError, UnicodeDecodeError):
        return ""
    for interface in interfaces:
        address = _interface_ipv4(interface)
        if address:
            return address
    return ""


def default_route_interfaces(route_text: str) -> list[str]:
    """Interfaces of the up IPv4 default routes in /proc/net/route text, lowest metric first."""
    routes: list[tuple[int, int, str]] = []
    for position, line in enumerate(route_text.splitlines()[1:]):
        fields = line.split()
        if len(fields) < 8:
            continue
        interface, destination, flags, metric, mask = (
            fields[0],
            fields[1],
            fields[3],
            fields[6],
            fields[7],
        )
        try:
            is_default = int(destination, 16) == 0 and int(mask, 16) == 0
            is_up = bool(int(flags, 16) & _RTF_UP)
            order = (int(metric), position)
        except ValueError:
            continue
        if is_default and is_up:
            routes.append((*order, interface))
    # The kernel uses the lowest-metric default route; file order breaks ties.
    return [interface for _metric, _position, interface in sorted(routes)]


def is_global_unicast(address: str) -> bool:
    """Go's net.IP.IsGlobalUnicast for IPv4: unlike Python's is_global, private ranges count."""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return False
    return not (
        ip.is_unspecified
        or ip.is_loopback
        or ip.is_multicast
        or ip.is_link_local
        or ip == ipaddress.IPv4Address("255.255.255.255")
    )


def _interface_ipv4(interface: str) -> str:
    primary = _ioctl_ipv4(interface)
    if is_global_unicast(primary):
        return primary
    # The ioctl sees only the primary address; `ip` lists them all, in order.
    return first_global_ipv4_from_ip_json(_ip_addr_json(interface))


def _ioctl_ipv4(interface: str) -> str:
    request = struct.pack("256s", interface.encode()[:15])
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
    except OSError:
        return ""
    # struct ifreq: 16-byte name, then sockaddr_in (family, port, 4-byte address).
    return socket.inet_ntoa(reply[20:24])


def _ip_addr_json(interface: str) -> str:
    try:
        result = subprocess.run(
            ["ip", "-j", "-4", "addr", "show", "dev", interface],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout if result.returncode == 0 else ""


def first_global_ipv4_from_ip_json(text: str) -> str:
    """The first global-unicast IPv4 address in `ip -j addr` output, or ""."""
    try:
        links = json.loads(text) if text else []
    except ValueError:
        return ""
    for link in links if isinstance(links, list) else []:
        for info in link.get("addr_info", []) if isinstance(link, dict) else []:
            if not isinstance(info, dict) or info.get("family") != "inet":
                continue
            local = info.get("local")
            if isinstance(local, str) and is_global_unicast(local):
                return local
    return ""


def _q(text: str) -> str:
    """Quote a value for a message, escaping control characters so the message stays one line."""
    return json.dumps(text, ensure_ascii=False)
