"""fleetctl's global settings and the choice of driver (API or etcd) and endpoints.

Pure: the CLI builds `Settings` from flags and FLEETCTL_* variables (click gives flag > env >
default), and `select_target` decides where to talk to. fleet always defaulted to the API
socket and its etcd auto-detection was dead code (reference §9.22); here the driver is:

1. `--driver` if given (`api`/`API`/`etcd`, any case);
2. else the endpoint decides: `unix://` or `file://` is the API, an http(s) URL on port 2379
   or 4001 is etcd, any other http(s) URL is the API;
3. with no endpoint at all: the local fleetd socket if it exists (with `--tunnel`: the
   tunnel host's socket, as fleet), else etcd on localhost.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from fleetd.errors import ConfigError
from fleetd.registry.keys import DEFAULT_PREFIX

DEFAULT_SOCKET = "/var/run/fleet.sock"
DEFAULT_API_ENDPOINT = f"unix://{DEFAULT_SOCKET}"
DEFAULT_ETCD_ENDPOINT = "http://127.0.0.1:2379"
ETCD_PORTS = frozenset({2379, 4001})
DEFAULT_KNOWN_HOSTS = "~/.fleetctl/known_hosts"


class Driver(StrEnum):
    API = "api"
    ETCD = "etcd"

    @classmethod
    def parse(cls, text: str) -> Driver:
        try:
            return cls(text.lower())
        except ValueError:
            raise ConfigError(f'unrecognized driver "{text}"') from None


@dataclass(frozen=True, slots=True)
class Settings:
    """The global flags (reference §1.1), after flag > FLEETCTL_* env > default."""

    endpoint: str | None = None  # None: not given, `select_target` picks
    driver: str | None = None
    etcd_key_prefix: str = DEFAULT_PREFIX
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    etcd_username: str = ""
    etcd_password: str = ""
    tunnel: str = ""
    ssh_username: str = "core"
    ssh_identity_file: str = ""  # beyond fleet: a key file offered after the agent's keys
    known_hosts_file: str = DEFAULT_KNOWN_HOSTS
    strict_host_key_checking: bool = True
    ssh_timeout: float = 10.0
    request_timeout: float = 3.0
    debug: bool = False

    @property
    def tunnel_address(self) -> str:
        """`host[:port]` with fleet's default port 22 appended when there is no ":"."""
        if self.tunnel and ":" not in self.tunnel:
            return f"{self.tunnel}:22"
        return self.tunnel


@dataclass(frozen=True, slots=True)
class Target:
    driver: Driver
    endpoints: tuple[str, ...]  # API: exactly one URL; etcd: every member's URL
    warning: str = ""  # something to tell the user on stderr (e.g. endpoints ignored)
    # Why this target, when fleetctl chose it rather than being told (no --endpoint): said in
    # --debug and in the error when nothing answers there.
    defaulted: str = ""

    @property
    def unix_socket(self) -> str | None:
        """The socket path of a unix:// or file:// API endpoint."""
        parts = urlsplit(self.endpoints[0])
        return parts.path if parts.scheme in ("unix", "file") else None


def _split(endpoint: str) -> list[str]:
    return [e.strip() for e in endpoint.split(",") if e.strip()]


def _driver_for(url: str) -> Driver:
    """Which driver an endpoint URL implies; raises ConfigError for an unusable URL."""
    parts = urlsplit(url)
    if not parts.scheme:
        raise ConfigError("URL scheme undefined")
    if parts.scheme in ("unix", "file"):
        if parts.netloc:
            # fleet's wording: "unix://var/run/fleet.sock" (two slashes) names host "var".
            raise ConfigError(
                f'unable to connect to host "{parts.netloc}" with scheme "{parts.scheme}"'
            )
        if not parts.path:
            raise ConfigError(f"no socket path in endpoint {url!r}")
        return Driver.API
    if parts.scheme in ("http", "https"):
        try:
            port = parts.port
        except ValueError as e:
            raise ConfigError(f"bad endpoint {url!r}: {e}") from None
        return Driver.ETCD if port in ETCD_PORTS else Driver.API
    raise ConfigError(f'unsupported URL scheme "{parts.scheme}" in endpoint {url!r}')


def select_target(
    settings: Settings, socket_exists: Callable[[str], bool] = os.path.exists
) -> Target:
    """Where to talk to; raises ConfigError (shown as `Unable to initialize client: ...`)."""
    explicit = Driver.parse(settings.driver) if settings.driver else None
    if not settings.endpoint:
        unset = "no --endpoint or FLEETCTL_ENDPOINT was given"
        if explicit is Driver.ETCD:
            why = f"{unset}, so fleetctl used etcd's default {DEFAULT_ETCD_ENDPOINT}"
            return Target(Driver.ETCD, (DEFAULT_ETCD_ENDPOINT,), defaulted=why)
        # Through a tunnel the socket that matters is the tunnel host's, as in fleet.
        if explicit is Driver.API or settings.tunnel or socket_exists(DEFAULT_SOCKET):
            why = f"{unset}, so fleetctl used fleetd's API on {DEFAULT_SOCKET}"
            return Target(Driver.API, (DEFAULT_API_ENDPOINT,), defaulted=why)
        why = (
            f"{unset} and there is no fleetd socket {DEFAULT_SOCKET} here, "
            f"so fleetctl fell back to etcd at {DEFAULT_ETCD_ENDPOINT}"
        )
        return Target(Driver.ETCD, (DEFAULT_ETCD_ENDPOINT,), defaulted=why)
    endpoints = _split(settings.endpoint)
    if not endpoints:
        raise ConfigError("URL scheme undefined")
    implied = [_driver_for(url) for url in endpoints]
    driver = explicit or implied[0]
    if driver is Driver.ETCD:
        if any(url.split(":", 1)[0] not in ("http", "https") for url in endpoints):
            raise ConfigError("the etcd driver needs http:// or https:// endpoints")
        return Target(Driver.ETCD, tuple(endpoints))
    warning = ""
    if len(endpoints) > 1:
        warning = f"multiple endpoints provided but only the first ({endpoints[0]}) is used"
    return Target(Driver.API, (endpoints[0],), warning)
