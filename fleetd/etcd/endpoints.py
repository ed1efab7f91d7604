"""What an etcd endpoint URL may be: the one rule fleetd's config and the etcd client share.

An endpoint is `http://host:port` or `https://host:port` and nothing else: a host, a port
(or, where the caller gives one, the default port), no credentials (etcd users are options of
their own), no path, query or fragment, no whitespace or control characters (`urlsplit` drops
tabs and newlines silently, so such a URL would not be the one used). Every endpoint of a list
has the same scheme, because the client reaches every member the same way: TLS or not.

Pure: no I/O. A broken rule is an `EndpointError` (a `ConfigError`) naming the `Problem`, so
each caller can word it for its own users (fleet.conf's `etcd_servers`, `EtcdConfig`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit

from fleetd.errors import ConfigError

SCHEMES = ("http", "https")


class Problem(Enum):
    """Which part of the rule an endpoint (or the list) breaks, in the order they are checked."""

    NONE = "no endpoints given"
    EMPTY = "is empty"
    WHITESPACE = "contains whitespace or control characters"
    UNPARSABLE = "is not a URL"
    SCHEME = "must use http or https"
    HOST_PORT = "needs a host and a port"
    CREDENTIALS = "carries credentials"
    PATH = "must not have a path, query or fragment"
    MIXED = "mixes http:// and https://; use one scheme for all"


class EndpointError(ConfigError):
    """An endpoint list that breaks the rule: `problem`, the `url` at fault ("" for the whole
    list: NONE, MIXED) and, for UNPARSABLE, urllib's reason in `detail`."""

    def __init__(self, problem: Problem, url: str = "", detail: str = "") -> None:
        self.problem = problem
        self.url = url
        self.detail = detail
        what = f"etcd endpoint {url!r} " if url or problem is Problem.EMPTY else "etcd endpoints: "
        super().__init__(what + (f"{problem.value}: {detail}" if detail else problem.value))


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str  # an IP literal (without brackets) or a DNS name, lowercased
    port: int


@dataclass(frozen=True, slots=True)
class Endpoints:
    scheme: str  # "http" or "https", the same for every member
    members: tuple[Endpoint, ...]

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


def parse_endpoints(urls: Sequence[str], *, default_port: int | None) -> Endpoints:
    """The endpoints of `urls`, or the first `EndpointError`. Each URL is checked in turn, then
    the schemes together. A URL without a port (or with port 0) gets `default_port`; with
    `default_port=None` it is a HOST_PORT problem."""
    if not urls:
        raise EndpointError(Problem.NONE)
    schemes: set[str] = set()
    members = []
    for url in urls:
        scheme, member = _parse_endpoint(url, default_port)
        schemes.add(scheme)
        members.append(member)
    if len(schemes) > 1:
        raise EndpointError(Problem.MIXED)
    return Endpoints(schemes.pop(), tuple(members))


def _parse_endpoint(url: str, default_port: int | None) -> tuple[str, Endpoint]:
    if not url:
        raise EndpointError(Problem.EMPTY, url)
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise EndpointError(Problem.WHITESPACE, url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise EndpointError(Problem.UNPARSABLE, url, str(e)) from None
    if parts.scheme not in SCHEMES:
        raise EndpointError(Problem.SCHEME, url)
    if not port:  # none, or 0: no port to connect to
        port = default_port
    if not parts.hostname or port is None:
        raise EndpointError(Problem.HOST_PORT, url)
    if parts.username is not None or parts.password is not None:
        raise EndpointError(Problem.CREDENTIALS, url)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise EndpointError(Problem.PATH, url)
    return parts.scheme, Endpoint(parts.hostname, port)
