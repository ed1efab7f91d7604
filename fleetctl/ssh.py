"""fleetctl's SSH transport over paramiko: the only module of the project importing paramiko.

`make_transport(options)` returns a `ParamikoTransport`, the `fleetctl.transport.SshTransport`
that status, journal, ssh and `--tunnel` use (reference §7). What it does as fleet did:

- authentication with every key of the ssh-agent at SSH_AUTH_SOCK, as `--ssh-username`;
- host keys checked against `--known-hosts-file` (fleetctl/known_hosts.py: fleet's prompt and
  warnings), unless `--strict-host-key-checking=false`; the server is asked only for key types
  already known for the host, so a host known by its RSA key is checked against that key;
- `--tunnel`: one SSH connection to the tunnel host; a machine behind it is reached with a
  `direct-tcpip` channel to its SSH port and a second, full SSH handshake over that channel
  (same user, same host-key checks: fleet's NewTunnelledSSHClient); `forward_tcp` carries
  local connections as `direct-tcpip` channels, `forward_unix` as sessions running
  `fleetctl fd-forward <socket>` on the tunnel host (so fleetctl must be on its PATH);
- `--ssh-timeout` bounds the dial and the handshake (not the time spent at the host-key prompt,
  which fleet's timer also counted, failing a user who read the fingerprint for 10 s);
- `run` gives the remote command this process's stdin/stdout/stderr and returns its exit
  status; with a terminal and no command, a shell on a PTY `xterm-256color` in raw mode;
  `-A` forwards the agent.

Beyond fleet (a top request of its users): ~/.ssh/config is read for the tunnel and
every machine. `HostName`, `Port`, `User` and `IdentityFile` are honoured:

- `HostName` replaces the name dialled (and the name the host key is recorded under);
- `Port` applies when the address carries the default port 22 (fleetctl always has a port:
  `--tunnel host` means `host:22`, `--ssh-port` defaults to 22, so 22 counts as "not chosen");
- `User` applies when `--ssh-username`/FLEETCTL_SSH_USERNAME is the default `core`; so
  `--ssh-username core` cannot override a config `User` (the flag's value is all we get);
- identity files are offered after the agent's keys: `--ssh-identity-file` (also beyond
  fleet; with it no agent is needed), then those named by `IdentityFile`, else
  OpenSSH's defaults (~/.ssh/id_ed25519, id_ecdsa, id_rsa). Encrypted ones are skipped (there
  is no passphrase prompt: put them in the agent). Without an agent *and* without any identity
  file, the error is fleet's `SSH_AUTH_SOCK environment variable is not set...`.

Other ssh_config options (ProxyJump, ProxyCommand, StrictHostKeyChecking, UserKnownHostsFile,
...) are ignored: fleetctl's own flags govern those.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import IO, Any

import paramiko
from paramiko.agent import Agent, AgentRequestHandler
from paramiko.pkey import UnknownKeyType

from fleetctl.known_hosts import DEFAULT_SSH_PORT, HostKeyChecker, host_id
from fleetctl.transport import SshError, SshOptions

log = logging.getLogger(__name__)
# paramiko logs handshake failures with tracebacks at ERROR; without a handler anywhere Python
# would print them to stderr next to our own one-line error. --debug still shows them.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

AUTH_SOCK_MISSING = (
    "SSH_AUTH_SOCK environment variable is not set. Verify ssh-agent is running. See"
    " https://github.com/coreos/fleet/blob/master/Documentation/using-the-client.md for help."
)
DIAL_TIMEOUT = "timed out while initiating SSH connection"
DEFAULT_USER = "core"
FD_FORWARD = "fleetctl fd-forward"
TERM = "xterm-256color"
SSH_CONFIG = "~/.ssh/config"
DEFAULT_IDENTITIES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
CHUNK = 65536
SIGPIPE_STATUS = 141  # what a shell reports for a command killed by SIGPIPE

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


def _stderr(text: str) -> None:
    """Write to this process's stderr as it is now (tests and click swap sys.stderr)."""
    stream = sys.stderr
    if stream is not None:
        stream.write(text)
        stream.flush()


def _binary_writer(stream: IO[str] | None) -> Callable[[bytes], None]:
    """Raw bytes to a text stream: through its binary buffer when it has one."""
    if stream is None:
        return lambda data: None
    buffer: IO[bytes] | None = getattr(stream, "buffer", None)
    stream.flush()  # what was printed as text (click.echo) goes out first

    if buffer is not None:
        target = buffer

        def write(data: bytes) -> None:
            target.write(data)
            target.flush()

        return write

    def write_text(data: bytes) -> None:
        stream.write(data.decode(errors="replace"))
        stream.flush()

    return write_text


# ---- stdin --------------------------------------------------------------------------------


class StdinHub:
    """The single reader of this process's stdin, for the host-key prompt and remote commands.

    A blocking read cannot be taken back, so one daemon thread owns stdin and queues what it
    reads; whoever needs input takes it from the queue, and what one consumer left (a command
    that ended, the rest of a prompt's line) stays for the next. Without this, the reader
    thread of `status`'s first remote command would swallow the answer to the host-key prompt
    of the second machine. There is one hub per stdin stream (`stdin_hub`), shared by every
    transport: fleetctl may hold two (the `--tunnel` one of the API client and the one of
    status/journal/ssh).
    """

    def __init__(self, stream: object) -> None:
        self.stream = stream
        self._cond = threading.Condition()
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._started = False

    def _start(self) -> None:
        with self._cond:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._read_loop, name="fleetctl-stdin", daemon=True).start()

    def _read_loop(self) -> None:
        stream: Any = self.stream
        read: Callable[[], bytes]
        buffer = getattr(stream, "buffer", None)
        if stream is None:
            read = bytes
        elif buffer is not None and hasattr(buffer, "read1"):
            # read1: at most one read(2), so keystrokes and pipe data go out as they arrive.
            read = lambda: buffer.read1(CHUNK)  # noqa: E731
        else:
            read = lambda: stream.read(CHUNK).encode()  # noqa: E731
        try:
            while data := read():
                with self._cond:
                    self._chunks.append(data)
                    self._cond.notify_all()
        except (OSError, ValueError):  # closed or unreadable stdin: same as EOF
            pass
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def read_line(self) -> str:
        """The next line ("" at EOF without one), leaving what follows it queued."""
        self._start()
        with self._cond:
            while True:
                data = b"".join(self._chunks)
                newline = data.find(b"\n")
                if newline >= 0 or self._eof:
                    self._chunks.clear()
                    end = newline + 1 if newline >= 0 else len(data)
                    if data[end:]:
                        self._chunks.append(data[end:])
                    return data[:end].decode(errors="replace")
                self._cond.wait()

    def take(self, stop: threading.Event) -> bytes | None:
        """The next chunk; b"" at EOF; None once `stop` is set (nothing is consumed then)."""
        self._start()
        with self._cond:
            while not self._chunks and not self._eof and not stop.is_set():
                self._cond.wait(0.1)
            if stop.is_set():
                return None
            return self._chunks.popleft() if self._chunks else b""

    def pump(self, channel: paramiko.Channel, stop: threading.Event) -> None:
        """Feed stdin to a remote command until EOF (then EOF it) or `stop`."""
        try:
            while (data := self.take(stop)) is not None:
                if not data:
                    channel.shutdown_write()
                    return
                while data:
                    try:
                        sent = channel.send(data)
                    except TimeoutError:
                        # An interactive channel has a short timeout (for resize polling);
                        # a full window only means the remote side is slow to read.
                        continue
                    if not sent:
                        return  # closed
                    data = data[sent:]
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the channel went away: the command's end is reported by `run`


_hub_lock = threading.Lock()
_hub: StdinHub | None = None


def stdin_hub() -> StdinHub:
    """The hub of `sys.stdin` as it is now (click's test runner swaps it per invocation)."""
    global _hub
    with _hub_lock:
        if _hub is None or _hub.stream is not sys.stdin:
            _hub = StdinHub(sys.stdin)
        return _hub


# ---- ~/.ssh/config and credentials ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Destination:
    """Where to connect, after ~/.ssh/config."""

    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]


class SshConfig:
    """~/.ssh/config, read once (lazily: HOME is looked up when first needed)."""

    def __init__(self, path: str = SSH_CONFIG) -> None:
        self._path = path
        self._config: paramiko.SSHConfig | None = None
        self._loaded = False

    def _load(self) -> paramiko.SSHConfig | None:
        if not self._loaded:
            self._loaded = True
            path = os.path.expanduser(self._path)
            if os.path.exists(path):
                try:
                    self._config = paramiko.SSHConfig.from_path(path)
                except (OSError, paramiko.SSHException, ValueError) as e:
                    _stderr(f"WARNING: ignoring {path}: {e}\n")
        return self._config

    def resolve(self, host: str, port: int, user: str, identity_file: str = "") -> Destination:
        config = self._load()
        options: dict[str, Any] = {}
        if config is not None:
            try:
                options = dict(config.lookup(host))
            # `Match exec` needs the optional `invoke` package; anything the parser or the
            # matcher trips on only costs the config, never the connection.
            except Exception as e:
                _stderr(f"WARNING: ignoring ssh config for {host}: {e}\n")
        hostname = str(options.get("hostname") or host)
        if port == DEFAULT_SSH_PORT and "port" in options:
            try:
                port = int(options["port"])
            except ValueError:
                _stderr(f"WARNING: ignoring bad Port {options['port']!r} for {host}\n")
        if user == DEFAULT_USER and options.get("user"):
            user = str(options["user"])
        identities = tuple(options.get("identityfile") or DEFAULT_IDENTITIES)
        if identity_file:  # --ssh-identity-file: first after the agent's keys
            identities = (identity_file, *(i for i in identities if i != identity_file))
        return Destination(hostname, port, user, identities)


class Credentials:
    """The agent's keys and the identity files, loaded once per transport."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._agent: Agent | None = None
        self._agent_error: str | None = None  # None: not tried yet
        self._files: dict[str, paramiko.PKey | str] = {}  # path -> key, or why not usable

    @property
    def agent_socket(self) -> str:
        return os.environ.get("SSH_AUTH_SOCK", "")

    def agent_keys(self) -> list[paramiko.PKey]:
        with self._lock:
            if self._agent_error is None:
                self._agent_error = self._open_agent()
            return list(self._agent.get_keys()) if self._agent is not None else []

    def _open_agent(self) -> str:
        sock = self.agent_socket
        if not sock:
            return "SSH_AUTH_SOCK is not set"
        # paramiko's Agent swallows a connection failure; try first to be able to say why.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(sock)
        except OSError as e:
            return f"dial unix {sock}: {e.strerror or e}"
        try:
            self._agent = Agent()
        except paramiko.SSHException as e:
            return f"ssh-agent at {sock}: {e}"
        return ""

    @property
    def agent_problem(self) -> str:
        return self._agent_error or ""

    def identity(self, path: str) -> paramiko.PKey | str:
        """The key in `path`, or why it cannot be used."""
        with self._lock:
            if path not in self._files:
                self._files[path] = self._load(path)
            return self._files[path]

    @staticmethod
    def _load(path: str) -> paramiko.PKey | str:
        full = os.path.expanduser(path)
        try:
            return paramiko.PKey.from_path(full)
        # cryptography, which paramiko loads keys with, says "password missing" as TypeError.
        except (paramiko.PasswordRequiredException, TypeError):
            return f"{full} is encrypted (add it to ssh-agent)"
        except FileNotFoundError:
            return f"{full} does not exist"
        except (OSError, paramiko.SSHException, UnknownKeyType, ValueError) as e:
            return f"{full}: {e}"

    def check_usable(self, dest: Destination) -> None:
        """Fail before dialing when there is nothing to authenticate with (fleet's check)."""
        self.agent_keys()
        if self._agent is not None:
            return
        if any(os.path.exists(os.path.expanduser(p)) for p in dest.identity_files):
            return
        if not self.agent_socket:
            raise SshError(AUTH_SOCK_MISSING)
        raise SshError(self.agent_problem)


def _authenticate(transport: paramiko.Transport, dest: Destination, creds: Credentials) -> None:
    """Offer the agent's keys, then the identity files, until the server accepts one."""
    offered: set[bytes] = set()
    notes: list[str] = []
    tried = 0

    def attempt(key: paramiko.PKey) -> bool:
        nonlocal tried
        if key.asbytes() in offered:
            return False
        offered.add(key.asbytes())
        tried += 1
        try:
            transport.auth_publickey(dest.user, key)
        except paramiko.BadAuthenticationType as e:
            raise SshError(
                f"ssh: unable to authenticate as {dest.user!r}: the server does not accept"
                f" public keys (it allows: {', '.join(e.allowed_types) or 'nothing'})"
            ) from None
        except paramiko.AuthenticationException:
            return False
        return transport.is_authenticated()

    agent_keys = creds.agent_keys()
    for key in agent_keys:
        if attempt(key):
            return
    if creds.agent_problem:
        notes.append(f"no ssh-agent: {creds.agent_problem}")
    elif not agent_keys:
        notes.append("ssh-agent holds no keys (add one with ssh-add)")
    for path in dest.identity_files:
        key_or_reason = creds.identity(path)
        if isinstance(key_or_reason, str):
            # Missing default files are normal; anything else is worth telling.
            if path in DEFAULT_IDENTITIES and key_or_reason.endswith("does not exist"):
                continue
            notes.append(key_or_reason)
        elif attempt(key_or_reason):
            return
    detail = f"the server refused the {tried} key(s) offered" if tried else "no key to offer"
    if notes:
        detail += "; " + "; ".join(notes)
    raise SshError(f"ssh: unable to authenticate as {dest.user!r}: {detail}")


# ---- forwarding -----------------------------------------------------------------------------


def _quietly(action: Callable[[], object]) -> None:
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        action()


class _Bridge:
    """One local connection carried by one SSH channel, both ways, half-closes included."""

    def __init__(self, conn: socket.socket, channel: paramiko.Channel) -> None:
        self.conn = conn
        self.channel = channel

    def run(self) -> None:
        up = threading.Thread(target=self._up, name="fleetctl-fwd-up", daemon=True)
        up.start()
        self._down()
        up.join()
        self.close()

    def _up(self) -> None:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            while data := self.conn.recv(CHUNK):
                self.channel.sendall(data)
        _quietly(self.channel.shutdown_write)

    def _down(self) -> None:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            while data := self.channel.recv(CHUNK):
                self.conn.sendall(data)
        _quietly(lambda: self.conn.shutdown(socket.SHUT_WR))

    def close(self) -> None:
        # shutdown() first: it wakes a thread blocked in recv(), which close() would not.
        _quietly(lambda: self.conn.shutdown(socket.SHUT_RDWR))
        _quietly(self.conn.close)
        _quietly(self.channel.close)


def _relay_stderr(channel: paramiko.Channel) -> None:
    """A forwarding session's stderr (e.g. fd-forward's dial error) onto ours."""
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        while data := channel.recv_stderr(CHUNK):
            _stderr(data.decode(errors="replace"))


class Forwarder:
    """A listening socket on 127.0.0.1 whose connections each get a channel from `open`."""

    def __init__(
        self, what: str, open_channel: Callable[[tuple[str, int]], paramiko.Channel]
    ) -> None:
        self._what = what
        self._open = open_channel
        self._lock = threading.Lock()
        self._bridges: set[_Bridge] = set()
        self._closed = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        host, port = self._listener.getsockname()[:2]
        self.address: tuple[str, int] = (str(host), int(port))
        self._thread = threading.Thread(target=self._accept_loop, name="fleetctl-fwd", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(
                target=self._serve, args=(conn, peer), name="fleetctl-fwd-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            channel = self._open((str(peer[0]), int(peer[1])))
        except (SshError, OSError, EOFError, paramiko.SSHException) as e:
            if not self._closed:
                _stderr(f"SSH tunnel: cannot reach {self._what}: {e}\n")
            _quietly(conn.close)
            return
        bridge = _Bridge(conn, channel)
        with self._lock:
            if self._closed:
                bridge.close()
                return
            self._bridges.add(bridge)
        try:
            bridge.run()
        finally:
            with self._lock:
                self._bridges.discard(bridge)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            bridges = list(self._bridges)
        # shutdown() wakes the thread blocked in accept() (Linux); close() alone would not.
        _quietly(lambda: self._listener.shutdown(socket.SHUT_RDWR))
        _quietly(self._listener.close)
        for bridge in bridges:
            bridge.close()
        self._thread.join(timeout=5)


# ---- the transport --------------------------------------------------------------------------


class ParamikoTransport:
    """`fleetctl.transport.SshTransport` over paramiko; one per fleetctl invocation."""

    def __init__(self, options: SshOptions, *, ssh_config: str = SSH_CONFIG) -> None:
        self._options = options
        self._config = SshConfig(ssh_config)
        self._creds = Credentials()
        self._checker: HostKeyChecker | None = None
        if options.strict_host_key_checking:
            self._checker = HostKeyChecker(
                options.known_hosts_file, _stderr, lambda: stdin_hub().read_line()
            )
        self._lock = threading.RLock()
        self._tunnel: paramiko.Transport | None = None
        self._machines: dict[tuple[str, int], paramiko.Transport] = {}
        self._forwarders: list[Forwarder] = []
        self._closed = False

    # ---- connections ------------------------------------------------------------------------

    def _deadline(self) -> float:
        return time.monotonic() + self._options.timeout

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
            transport.auth_timeout = self._options.timeout
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
                _authenticate(transport, dest, self._creds)
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

    def _dial(self, host: str, port: int) -> paramiko.Transport:
        """A direct connection (to the tunnel host, or to a machine without a tunnel)."""
        dest = self._config.resolve(host, port, self._options.username, self._options.identity_file)
        self._creds.check_usable(dest)
        deadline = self._deadline()
        try:
            sock = socket.create_connection((dest.hostname, dest.port), self._options.timeout)
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
        dest = self._config.resolve(host, port, self._options.username, self._options.identity_file)
        self._creds.check_usable(dest)
        tunnel = self._tunnel_transport()
        deadline = self._deadline()
        channel = self._open_direct(tunnel, (dest.hostname, dest.port))
        try:
            return self._handshake(channel, dest, [host_id(dest.hostname, dest.port)], deadline)
        except BaseException:
            channel.close()
            raise

    def _open_direct(
        self,
        tunnel: paramiko.Transport,
        dest: tuple[str, int],
        origin: tuple[str, int] = ("127.0.0.1", 0),
    ) -> paramiko.Channel:
        try:
            return tunnel.open_channel("direct-tcpip", dest, origin, timeout=self._options.timeout)
        except paramiko.ChannelException as e:
            raise SshError(f"ssh: rejected: {e.text} ({dest[0]}:{dest[1]})") from None
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise SshError(f"ssh: cannot open a channel to {dest[0]}:{dest[1]}: {e}") from None

    def _tunnel_transport(self) -> paramiko.Transport:
        with self._lock:
            if self._closed:
                raise SshError("the SSH transport is closed")
            if not self._options.tunnel:
                raise SshError("no --tunnel given")
            if self._tunnel is None or not self._tunnel.is_active():
                self._tunnel = self._dial(*split_address(self._options.tunnel))
            return self._tunnel

    def _machine(self, address: str) -> paramiko.Transport:
        host, port = split_address(address)
        with self._lock:
            if self._closed:
                raise SshError("the SSH transport is closed")
            cached = self._machines.get((host, port))
            if cached is not None and cached.is_active():
                return cached
            if self._options.tunnel:
                transport = self._through_tunnel(host, port)
            else:
                transport = self._dial(host, port)
            self._machines[(host, port)] = transport
            return transport

    # ---- SshTransport -----------------------------------------------------------------------

    def run(self, address: str, command: str | None, *, tty: bool, forward_agent: bool) -> int:
        transport = self._machine(address)
        try:
            channel = transport.open_session(timeout=self._options.timeout)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise SshError(f"ssh: cannot open a session: {e}") from None
        agent_handler = None
        try:
            if forward_agent:
                if not self._creds.agent_socket:
                    _stderr("WARNING: no ssh-agent to forward (SSH_AUTH_SOCK is not set)\n")
                agent_handler = AgentRequestHandler(channel)
            terminal = _Terminal.of_stdin() if tty else None
            if terminal is not None:
                width, height = terminal.size()
                channel.get_pty(TERM, width, height)
            if command is None:
                channel.invoke_shell()
            else:
                channel.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as e:
            channel.close()
            if agent_handler is not None:
                agent_handler.close()
            raise SshError(f"ssh: {e}") from None
        try:
            return self._session(channel, terminal)
        finally:
            channel.close()
            if agent_handler is not None:
                agent_handler.close()

    def _session(self, channel: paramiko.Channel, terminal: _Terminal | None) -> int:
        """Copy stdin/stdout/stderr until the remote side is done; its exit status."""
        out = _binary_writer(sys.stdout)
        err = _binary_writer(sys.stderr)
        stop = threading.Event()
        feeder = threading.Thread(
            target=stdin_hub().pump, args=(channel, stop), name="fleetctl-stdin-feed", daemon=True
        )
        errors = threading.Thread(
            target=self._copy, args=(channel.recv_stderr, err), name="fleetctl-stderr", daemon=True
        )
        # A timeout on the channel lets the loop below notice terminal resizes.
        channel.settimeout(0.25 if terminal is not None else None)
        with terminal.raw() if terminal is not None else contextlib.nullcontext():
            feeder.start()
            errors.start()
            try:
                broken = self._copy(channel.recv, out, terminal, channel)
            finally:
                stop.set()
            errors.join()
        if broken:
            return SIGPIPE_STATUS
        status = channel.recv_exit_status()
        # No exit-status: killed by a signal (paramiko drops exit-signal) or the server gave
        # none; either way the command failed, and -1 is what fleet turned into 255.
        return status if status >= 0 else 255

    @staticmethod
    def _copy(
        read: Callable[[int], bytes],
        write: Callable[[bytes], None],
        terminal: _Terminal | None = None,
        channel: paramiko.Channel | None = None,
    ) -> bool:
        """Copy until EOF; True if the local side is a broken pipe (`... | head`)."""
        while True:
            if terminal is not None and channel is not None:
                terminal.follow_size(channel)
            try:
                data = read(CHUNK)
            except TimeoutError:
                continue
            except (OSError, EOFError, paramiko.SSHException):
                return False
            if not data:
                return False
            try:
                write(data)
            except BrokenPipeError:
                if channel is not None:
                    channel.close()
                return True

    @contextlib.contextmanager
    def _forward(
        self, what: str, open_channel: Callable[[tuple[str, int]], paramiko.Channel]
    ) -> Iterator[tuple[str, int]]:
        self._tunnel_transport()  # connect now: errors (and the host-key prompt) belong here
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
        def open_channel(origin: tuple[str, int]) -> paramiko.Channel:
            return self._open_direct(self._tunnel_transport(), (host, port), origin)

        return self._forward(f"{host}:{port}", open_channel)

    def forward_unix(self, path: str) -> AbstractContextManager[tuple[str, int]]:
        command = f"{FD_FORWARD} {shlex.quote(path)}"

        def open_channel(origin: tuple[str, int]) -> paramiko.Channel:
            try:
                channel = self._tunnel_transport().open_session(timeout=self._options.timeout)
                channel.exec_command(command)
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise SshError(f"ssh: cannot run {command!r} on the tunnel host: {e}") from None
            threading.Thread(
                target=_relay_stderr, args=(channel,), name="fleetctl-fd-stderr", daemon=True
            ).start()
            return channel

        return self._forward(f"unix:{path}", open_channel)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            forwarders, self._forwarders = self._forwarders, []
            machines = list(self._machines.values())
            self._machines.clear()
            tunnel, self._tunnel = self._tunnel, None
        for forwarder in forwarders:
            forwarder.close()
        # Machines reached through the tunnel ride on it: close them first.
        for transport in machines:
            transport.close()
        if tunnel is not None:
            tunnel.close()


class _Terminal:
    """This process's terminal, for an interactive shell."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._size = self.size()

    @classmethod
    def of_stdin(cls) -> _Terminal | None:
        stdin = sys.stdin
        try:
            if stdin is not None and stdin.isatty():
                return cls(stdin.fileno())
        except (OSError, ValueError):
            pass
        return None

    def size(self) -> tuple[int, int]:
        try:
            columns, lines = os.get_terminal_size(self.fd)
        except OSError:
            return 80, 24
        return columns, lines

    def follow_size(self, channel: paramiko.Channel) -> None:
        """Tell the server about a resize (polled: SIGWINCH handlers need the main thread)."""
        size = self.size()
        if size != self._size:
            self._size = size
            _quietly(lambda: channel.resize_pty(*size))

    @contextlib.contextmanager
    def raw(self) -> Iterator[None]:
        import termios
        import tty

        saved = termios.tcgetattr(self.fd)
        # TCSADRAIN, not setraw's default TCSAFLUSH: what was typed ahead is kept (as ssh).
        tty.setraw(self.fd, termios.TCSADRAIN)
        try:
            yield
        finally:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)


def make_transport(options: SshOptions) -> ParamikoTransport:
    """The transport `fleetctl.transport.open_transport` hands to commands."""
    return ParamikoTransport(options)
