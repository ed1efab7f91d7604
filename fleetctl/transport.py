"""The seam between fleetctl and SSH: what commands need, not how paramiko does it.

`fleetctl/ssh/` (paramiko, the only package that imports it) provides
`make_transport(options: SshOptions) -> SshTransport`. Everything else goes through
`open_transport`, which tests replace with a fake. The protocol is synchronous because
paramiko is; async callers run it in a worker thread.

What fleet does over SSH (reference §7), and so what a transport must offer:

- `run`: a command (or an interactive shell) on a machine, reached directly or, with
  `--tunnel`, through the tunnel host (`direct-tcpip` to the machine, then a second SSH
  handshake over that channel, with the same user and host-key checks);
- `forward_tcp`: a local TCP port that reaches `host:port` from the tunnel host (the etcd
  driver and an http(s) API endpoint, with `--tunnel`);
- `forward_unix`: a local TCP port that reaches a unix socket on the tunnel host, through
  `fleetctl fd-forward <path>` run there (the API driver on a unix endpoint, with `--tunnel`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from fleetctl.settings import Settings
from fleetd.errors import FleetError


class SshError(FleetError):
    """The SSH connection could not be set up (dial, handshake, host key, auth)."""


@dataclass(frozen=True, slots=True)
class SshOptions:
    """The SSH-related global flags (reference §1.1, §7)."""

    username: str = "core"
    tunnel: str = ""  # "host:port", or "" to connect directly
    known_hosts_file: str = "~/.fleetctl/known_hosts"
    strict_host_key_checking: bool = True
    timeout: float = 10.0  # dial + handshake, seconds
    identity_file: str = ""  # offered first after the agent's keys; "" for none


def ssh_options(settings: Settings) -> SshOptions:
    return SshOptions(
        username=settings.ssh_username,
        tunnel=settings.tunnel_address,
        known_hosts_file=settings.known_hosts_file,
        strict_host_key_checking=settings.strict_host_key_checking,
        timeout=settings.ssh_timeout,
        identity_file=settings.ssh_identity_file,
    )


class SshTransport(Protocol):
    def run(self, address: str, command: str | None, *, tty: bool, forward_agent: bool) -> int:
        """Run `command` on `address` ("host:port"), or an interactive shell if None.

        The remote side's stdin/stdout/stderr are this process's. Returns the remote exit
        status; raises SshError when the connection cannot be made.
        """
        ...

    def forward_tcp(self, host: str, port: int) -> AbstractContextManager[tuple[str, int]]:
        """A local (host, port) forwarded to host:port as seen from the tunnel host."""
        ...

    def forward_unix(self, path: str) -> AbstractContextManager[tuple[str, int]]:
        """A local (host, port) forwarded to the unix socket `path` on the tunnel host."""
        ...

    def close(self) -> None: ...


def _load_default() -> Callable[[SshOptions], SshTransport]:
    try:
        module = importlib.import_module("fleetctl.ssh")
    except ImportError as e:
        raise SshError(f"SSH support is not available: {e}") from None
    factory: Callable[[SshOptions], SshTransport] = module.make_transport
    return factory


def open_transport(options: SshOptions) -> SshTransport:
    """An SSH transport for `options`; tests monkeypatch this function."""
    return _load_default()(options)
