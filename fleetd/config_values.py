"""What a fleetd option's value may be: Go's value syntax as fleet's flags read it, and checks.

fleet read every option through Go's `flag` package, so a value is what Go's strconv and
time.ParseDuration accept (`parse_bool`, `parse_int`, `parse_float`, `parse_duration`), plus
fleet's own list and metadata forms (`parse_string_slice`, `parse_metadata`). The other
parsers add what an option needs beyond its type: a positive number, a range, an IP address,
an absolute path, a machine ID usable as a key segment, `host:port`, etcd endpoint URLs (by
the one rule of fleetd/etcd/endpoints.py, worded for fleet.conf).

Each parser takes the raw text (`parse_metadata` also a list to append warnings to) and
returns the value or raises `ConfigError` with a short message; fleetd/config.py's option
table names the parser of each option and prefixes the message with the option and where its
value came from. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Callable
from fractions import Fraction

from fleetd.errors import ConfigError
from fleetd.etcd.endpoints import EndpointError, Problem, parse_endpoints
from fleetd.registry.keys import normalize_prefix

_GO_BOOLS = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool, which fleet's bool flags used."""
    try:
        return _GO_BOOLS[text]
    except KeyError:
        raise ConfigError(f"invalid boolean {quote(text)} (use true or false)") from None


_GO_OCTAL = re.compile(r"[+-]?0[_0-7]+")
_INT64 = 2**63


def parse_int(text: str) -> int:
    """Go's strconv.ParseInt(s, 0, 64): 0x/0o/0b prefixes, a leading 0 means octal, `_`."""
    # Python's int() would also take surrounding spaces and non-ASCII digits; Go takes neither.
    if not text.isascii() or text != text.strip():
        raise ConfigError(f"invalid integer {quote(text)}")
    digits = text
    if _GO_OCTAL.fullmatch(digits):
        sign = digits[0] if digits[0] in "+-" else ""
        digits = f"{sign}0o{digits[len(sign) + 1 :]}"
    try:
        value = int(digits, 0)
    except ValueError:
        raise ConfigError(f"invalid integer {quote(text)}") from None
    if not -_INT64 <= value < _INT64:
        raise ConfigError(f"integer {quote(text)} out of range")
    return value


_DECIMAL_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_float(text: str) -> float:
    """A decimal float as Go's strconv.ParseFloat reads it (no inf/nan: no option wants them)."""
    if not _DECIMAL_FLOAT.fullmatch(text):
        raise ConfigError(f"invalid number {quote(text)}")
    value = float(text)
    if not math.isfinite(value):
        raise ConfigError(f"number {quote(text)} out of range")
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
        raise ConfigError(f"invalid duration {quote(text)}")
    nanos = Fraction(0)
    while rest:
        part, consumed = _duration_part(text, rest)
        nanos += part
        rest = rest[consumed:]
    # Go keeps durations in int64 nanoseconds; beyond that (~292 years) it reports an error.
    if nanos >= _INT64:
        raise ConfigError(f"invalid duration {quote(text)}: out of range")
    return float(-nanos if negative else nanos) / 1e9


def _duration_part(text: str, rest: str) -> tuple[Fraction, int]:
    """The nanoseconds of the leading `<number><unit>` of `rest`, and its length."""
    match = _DURATION_PART.match(rest)
    assert match is not None  # every group can match empty
    whole, frac, unit = match.groups()
    if not whole and not frac:
        raise ConfigError(f"invalid duration {quote(text)}")
    if not unit:
        raise ConfigError(
            f"missing unit in duration {quote(text)} (use ns, us, ms, s, m or h, e.g. 30s)"
        )
    if unit not in _DURATION_UNITS:
        raise ConfigError(
            f"unknown unit {quote(unit)} in duration {quote(text)} (use ns, us, ms, s, m or h)"
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
                warnings.append(f'metadata entry {quote(pair.strip())} has no "=" - ignoring')
            continue
        key = key.strip()
        if not _METADATA_KEY.fullmatch(key):
            raise ConfigError(
                f"invalid metadata key {quote(key)} (use letters, digits, '_', '.' and '-')"
            )
        metadata[key] = value.strip()
    return metadata


def parse_etcd_servers(text: str) -> tuple[str, ...]:
    servers = parse_string_slice(text)
    try:
        parse_endpoints(servers, default_port=None)  # fleet.conf names every port
    except EndpointError as e:
        raise ConfigError(_server_error(e)) from None
    return servers


def _server_error(e: EndpointError) -> str:
    """The etcd endpoint rule (fleetd/etcd/endpoints.py) in fleet.conf's words."""
    example = "use http://host:port or https://host:port"
    server = f"server {quote(e.url)}"
    match e.problem:
        case Problem.NONE | Problem.EMPTY:
            return "empty server entry (a stray comma?)"
        case Problem.UNPARSABLE:
            return f"invalid server URL {quote(e.url)}: {e.detail}; {example}"
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


def parse_positive_float(text: str) -> float:
    value = parse_float(text)
    if value <= 0:
        raise ConfigError(f"must be greater than 0, got {quote(text)}")
    return value


def parse_positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ConfigError(f"must be greater than 0, got {quote(text)}")
    return value


def int_in_range(low: int, high: int | None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = parse_int(text)
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"must be {bounds}, got {quote(text)}")
        return value

    return parse


def parse_ip(text: str) -> str:
    if not text:
        return text  # empty: detect it at startup (fleet's behaviour)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{quote(text)} is not an IP address") from None
    return text


def parse_absolute_path(text: str) -> str:
    if not text.startswith("/"):
        raise ConfigError(f"must be an absolute path, got {quote(text)}")
    return text


def parse_optional_absolute_path(text: str) -> str:
    return parse_absolute_path(text) if text else text


def parse_key_prefix(text: str) -> str:
    return normalize_prefix(text)


_MACHINE_ID = re.compile(r"[A-Za-z0-9]+")


def check_machine_id(machine_id: str) -> str:
    # Machine IDs are path segments of etcd keys: no "/", no spaces. systemd's are 32 hex digits.
    if not _MACHINE_ID.fullmatch(machine_id):
        raise ConfigError(
            f"invalid machine ID {quote(machine_id)}: use letters and digits only"
            " (systemd's are 32 lowercase hex digits)"
        )
    return machine_id


def parse_machine_id(text: str) -> str:
    return check_machine_id(text) if text else text


def split_host_port(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isascii() or not port_text.isdigit():
        raise ConfigError(f"{quote(text)} is not host:port (e.g. 0.0.0.0:49153 or [::1]:49153)")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ConfigError(f"port {port} in {quote(text)} must be between 1 and 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{quote(text)} has an invalid IPv6 address") from None
    elif ":" in host or any(ch.isspace() for ch in host):
        raise ConfigError(f"{quote(text)} is not host:port (bracket IPv6 addresses: [::1]:49153)")
    return host, port


def parse_host_port(text: str) -> str:
    if text:
        split_host_port(text)
    return text


def quote(text: str) -> str:
    """Quote a value for a message, escaping control characters so the message stays one line."""
    return json.dumps(text, ensure_ascii=False)
