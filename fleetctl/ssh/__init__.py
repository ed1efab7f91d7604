"""fleetctl's SSH transport over paramiko: the only package of the project importing paramiko.

`make_transport(options)` returns a `ParamikoTransport`, the `fleetctl.transport.SshTransport`
that status, journal, ssh and `--tunnel` use (reference §7). It is put together from one
module per concern:

- `connections.py`: dial, handshake, host-key checks (fleetctl/known_hosts.py), `--tunnel`
  (a machine reached through the tunnel host with a second SSH handshake), `--ssh-timeout`;
- `auth.py`: the ssh-agent's keys, then identity files;
- `config.py`: ~/.ssh/config (`HostName`, `Port`, `User`, `IdentityFile`; beyond fleet);
- `session.py`: `run`, a remote command or shell with this process's stdin/stdout/stderr;
- `forward.py`: `forward_tcp` and `forward_unix`, local ports reaching through the tunnel host;
- `stdio.py`: the one reader of stdin (shared with the host-key prompt), stdout and stderr.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager

from fleetctl.ssh import session
from fleetctl.ssh.config import SSH_CONFIG
from fleetctl.ssh.connections import Connections
from fleetctl.ssh.forward import ChannelOpener, Forwarder, tcp_opener, unix_opener
from fleetctl.transport import SshOptions

# paramiko logs handshake failures with tracebacks at ERROR; without a handler anywhere Python
# would print them to stderr next to our own one-line error. --debug still shows them.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


class ParamikoTransport:
    """`fleetctl.transport.SshTransport` over paramiko; one per fleetctl invocation."""

    def __init__(self, options: SshOptions, *, ssh_config: str = SSH_CONFIG) -> None:
        self._connections = Connections(options, ssh_config=ssh_config)
        self._lock = threading.Lock()
        self._forwarders: list[Forwarder] = []

    def run(self, address: str, command: str | None, *, tty: bool, forward_agent: bool) -> int:
        connections = self._connections
        return session.run(
            connections.machine(address),
            command,
            tty=tty,
            forward_agent=forward_agent,
            timeout=connections.options.timeout,
            agent_socket=connections.credentials.agent_socket,
        )

    @contextlib.contextmanager
    def _forward(self, what: str, open_channel: ChannelOpener) -> Iterator[tuple[str, int]]:
        self._connections.tunnel()  # connect now: errors (and the host-key prompt) belong here
        forwarder = Forwarder(what, open_channel)
        with self._lock:
            self._forwarders.append(forwarder)
        try:
            yield forwarder.address
        finally:
            forwarder.close()
            with self._lock:
                if forwarder in self._forwarders:
                    self._forwarders.remove(forwarder)

    def forward_tcp(self, host: str, port: int) -> AbstractContextManager[tuple[str, int]]:
        return self._forward(f"{host}:{port}", tcp_opener(self._connections, host, port))

    def forward_unix(self, path: str) -> AbstractContextManager[tuple[str, int]]:
        return self._forward(f"unix:{path}", unix_opener(self._connections, path))

    def close(self) -> None:
        with self._lock:
            forwarders, self._forwarders = self._forwarders, []
        for forwarder in forwarders:
            forwarder.close()
        self._connections.close()


def make_transport(options: SshOptions) -> ParamikoTransport:
    """The transport `fleetctl.transport.open_transport` hands to commands."""
    return ParamikoTransport(options)
