"""SSH connections to the tunnel host and to machines: dial, handshake, host key, login.

As fleet did (reference §7):

- host keys are checked against `--known-hosts-file` (fleetctl/known_hosts.py: fleet's prompt
  and warnings), unless `--strict-host-key-checking=false`; the server is asked only for key
  types already known for the host, so a host known by its RSA key is checked against that
  key;
- `--tunnel`: one SSH connection to the tunnel host; a machine behind it is reached with a
  `direct-tcpip` channel to its SSH port and a second, full SSH handshake over that channel
  (same user, same host-key checks: fleet's NewTunnelledSSHClient);
- `--ssh-timeout` bounds the dial and the handshake (not the time spent at the host-key
  prompt, which fleet's timer also counted, failing a user who read the fingerprint for 10 s).

`Connections` keeps one connection per machine and one to the tunnel host for the life of a
fleetctl invocation; the commands (fleetctl/ssh/session.py) and the forwarders
(fleetctl/ssh/forward.py) open their channels on them.
"""

from __future__ import annotations

import socket
import threading
import time

import paramiko

from fleetctl.known_hosts import DEFAULT_SSH_PORT, HostKeyChecker, host_id
from fleetctl.ssh.auth import Credentials, authenticate
from fleetctl.ssh.config import SSH_CONFIG, Destination, SshConfig
from fleetctl.ssh.stdio import stdin_hub, write_stderr
from fleetctl.transport import SshError, SshOptions

DIAL_TIMEOUT = "timed out while initiating SSH connection"

# Host-key algorithms the server may use for a key type found in known_hosts (paramiko no
# longer negotiates SHA-1 "ssh-rsa" signatures; an RSA key is verified via rsa-sha2-*).
_HOST_KEY_ALGORITHMS = {
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256"),
}


def split_address(address: str, default_port: int = DEFAULT_SSH_PORT) -> tuple[str, int]:
    """`host:port`, `[v6]:port`, `host` or a bare IPv6 address -> (host, port)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif address.count(":") == 1:
        host, _, port = address.partition(":")
    else:
        host, port = address, ""
    if not host:
        raise SshError(f"missing host in address {address!r}")
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise SshError(f"bad port in address {address!r}") from None


class Connections:
    """The authenticated SSH connections of one transport: the tunnel's and each machine's."""

    def __init__(self, options: SshOptions, *, ssh_config: str = SSH_CONFIG) -> None:
        self.options = options
        self.credentials = Credentials()
        self._config = SshConfig(ssh_config)
        self._checker: HostKeyChecker | None = None
        if options.strict_host_key_checking:
            self._checker = HostKeyChecker(
                options.known_hosts_file, write_stderr, lambda: stdin_hub().read_line()
            )
        self._lock = threading.RLock()
        self._tunnel: paramiko.Transport | None = None
        self._machines: dict[tuple[str, int], paramiko.Transport] = {}
        self._closed = False

    def _deadline(self) -> float:
        return time.monotonic() + self.options.timeout

    @staticmethod
    def _remaining(deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SshError(DIAL_TIMEOUT)
        return remaining

    def _handshake(
        self,
        sock: socket.socket | paramiko.Channel,
        dest: Destination,
        names: list[str],
        deadline: float,
    ) -> paramiko.Transport:
        """SSH over a connected socket or channel: host key checked, user authenticated.

        `deadline` bounds the connection and the key exchange (fleet's timeoutSSHDial);
        each authentication attempt then gets the whole --ssh-timeout again, the time at the
        host-key prompt being the user's.
        """
        transport = paramiko.Transport(sock)
        try:
            remaining = self._remaining(deadline)
            transport.banner_timeout = remaining
            transport.handshake_timeout = remaining
            transport.auth_timeout = self.options.timeout
            if self._checker is not None:
                self._restrict_host_key_types(transport, names)
            try:
                transport.start_client(timeout=remaining)
                key = transport.get_remote_server_key()
            except paramiko.SSHException as e:
                if time.monotonic() >= deadline:
                    raise SshError(DIAL_TIMEOUT) from None
                raise SshError(f"ssh: handshake failed: {e}") from None
            except EOFError:
                raise SshError("ssh: handshake failed: connection closed by remote host") from None
            if self._checker is not None:
                self._checker.check(names, key.get_name(), key.asbytes())
            try:
                authenticate(transport, dest, self.credentials)
            except paramiko.SSHException as e:
                raise SshError(f"ssh: authentication failed: {e}") from None
        except BaseException:
            transport.close()
            raise
        return transport

    def _restrict_host_key_types(self, transport: paramiko.Transport, names: list[str]) -> None:
        """Ask only for host keys of the types known_hosts has for this host (fleet's
        HostKeyAlgorithms), keeping paramiko's order of preference."""
        assert self._checker is not None
        known = self._checker.known_key_types(names)
        if not known:
            return
        wanted = {a for t in known for a in _HOST_KEY_ALGORITHMS.get(t, (t,))}
        options = transport.get_security_options()
        usable = [a for a in options.key_types if a in wanted]
        if usable:  # else: types paramiko cannot verify; the check will report the mismatch
            options.key_types = usable

    def _resolve(self, host: str, port: int) -> Destination:
        dest = self._config.resolve(host, port, self.options.username, self.options.identity_file)
        self.credentials.check_usable(dest)
        return dest

    def _dial(self, host: str, port: int) -> paramiko.Transport:
        """A direct connection (to the tunnel host, or to a machine without a tunnel)."""
        dest = self._resolve(host, port)
        deadline = self._deadline()
        try:
            sock = socket.create_connection((dest.hostname, dest.port), self.options.timeout)
        except TimeoutError:
            raise SshError(DIAL_TIMEOUT) from None
        except OSError as e:
            reason = e.strerror or str(e)
            raise SshError(f"dial tcp {dest.hostname}:{dest.port}: {reason}") from None
        names = [host_id(dest.hostname, dest.port)]
        peer = str(sock.getpeername()[0])
        if host_id(peer, dest.port) not in names:
            names.append(host_id(peer, dest.port))  # fleet knew hosts by their IP
        try:
            return self._handshake(sock, dest, names, deadline)
        except BaseException:
            sock.close()
            raise

    def _through_tunnel(self, host: str, port: int) -> paramiko.Transport:
        """fleet's NewTunnelledSSHClient: direct-tcpip to the machine, SSH over that."""
        dest = self._resolve(host, port)
        tunnel = self.tunnel()
        deadline = self._deadline()
        channel = self.open_direct(tunnel, (dest.hostname, dest.port))
        try:
            return self._handshake(channel, dest, [host_id(dest.hostname, dest.port)], deadline)
        except BaseException:
            channel.close()
            raise

    def open_direct(
        self,
        tunnel: paramiko.Transport,
        dest: tuple[str, int],
        origin: tuple[str, int] = ("127.0.0.1", 0),
    ) -> paramiko.Channel:
        """A `direct-tcpip` channel from the tunnel host to `dest`."""
        try:
            return tunnel.open_channel("direct-tcpip", dest, origin, timeout=self.options.timeout)
        except paramiko.ChannelException as e:
            raise SshError(f"ssh: rejected: {e.text} ({dest[0]}:{dest[1]})") from None
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise SshError(f"ssh: cannot open a channel to {dest[0]}:{dest[1]}: {e}") from None

    def tunnel(self) -> paramiko.Transport:
        """The connection to the `--tunnel` host, made on first use (again if it dropped)."""
        with self._lock:
            if self._closed:
                raise SshError("the SSH transport is closed")
            if not self.options.tunnel:
                raise SshError("no --tunnel given")
            if self._tunnel is None or not self._tunnel.is_active():
                self._tunnel = self._dial(*split_address(self.options.tunnel))
            return self._tunnel

    def machine(self, address: str) -> paramiko.Transport:
        """The connection to the machine at `address`, through the tunnel if there is one."""
        host, port = split_address(address)
        with self._lock:
            if self._closed:
                raise SshError("the SSH transport is closed")
            cached = self._machines.get((host, port))
            if cached is not None and cached.is_active():
                return cached
            if self.options.tunnel:
                transport = self._through_tunnel(host, port)
            else:
                transport = self._dial(host, port)
            self._machines[(host, port)] = transport
            return transport

    def close(self) -> None:
        with self._lock:
            self._closed = True
            machines = list(self._machines.values())
            self._machines.clear()
            tunnel, self._tunnel = self._tunnel, None
        # Machines reached through the tunnel ride on it: close them first.
        for transport in machines:
            transport.close()
        if tunnel is not None:
            tunnel.close()
