"""Local ports that reach through the tunnel host: `forward_tcp` and `forward_unix`.

With `--tunnel`, the etcd driver and an http(s) API endpoint reach `host:port` as the tunnel
host sees it: each local connection is carried by a `direct-tcpip` channel. The API driver
on a unix endpoint reaches a socket on the tunnel host: each local connection is a session
running `fleetctl fd-forward <socket>` there (so fleetctl must be on its PATH). A `Forwarder`
listens on 127.0.0.1 and bridges each connection it accepts to the channel its opener gives.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import threading
from collections.abc import Callable

import paramiko

from fleetctl.ssh.connections import Connections
from fleetctl.ssh.stdio import CHUNK, write_stderr
from fleetctl.transport import SshError

FD_FORWARD = "fleetctl fd-forward"

ChannelOpener = Callable[[tuple[str, int]], paramiko.Channel]  # origin (host, port) -> channel


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
            write_stderr(data.decode(errors="replace"))


class Forwarder:
    """A listening socket on 127.0.0.1 whose connections each get a channel from `open`."""

    def __init__(self, what: str, open_channel: ChannelOpener) -> None:
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
                write_stderr(f"SSH tunnel: cannot reach {self._what}: {e}\n")
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


def tcp_opener(connections: Connections, host: str, port: int) -> ChannelOpener:
    """Channels to `host:port` from the tunnel host (`direct-tcpip`)."""

    def open_channel(origin: tuple[str, int]) -> paramiko.Channel:
        return connections.open_direct(connections.tunnel(), (host, port), origin)

    return open_channel


def unix_opener(connections: Connections, path: str) -> ChannelOpener:
    """Channels to the unix socket `path` on the tunnel host (`fleetctl fd-forward` there)."""
    command = f"{FD_FORWARD} {shlex.quote(path)}"

    def open_channel(origin: tuple[str, int]) -> paramiko.Channel:
        try:
            channel = connections.tunnel().open_session(timeout=connections.options.timeout)
            channel.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise SshError(f"ssh: cannot run {command!r} on the tunnel host: {e}") from None
        threading.Thread(
            target=_relay_stderr, args=(channel,), name="fleetctl-fd-stderr", daemon=True
        ).start()
        return channel

    return open_channel
