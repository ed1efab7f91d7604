"""Where the API listens: systemd-activated sockets, the unix socket, TCP with TLS.

- Socket activation (fleet.socket, as fleet shipped it): sockets systemd passes as fds 3.. with
  LISTEN_FDS/LISTEN_PID (sd_listen_fds). When there are any, fleetd creates no unix socket of
  its own: systemd owns the path, its mode and group.
- Otherwise fleetd binds `api_socket` itself (fleet served no API at all without activation,
  reference §9.17): mode 0660, group `api_socket_group` when that group exists. A stale socket
  file left by a crash is replaced; a live one (another fleetd answers) or a non-socket file
  at the path is an error, never silently removed.
- `api_tcp` serves TCP only with TLS (`api_tls_cert`/`api_tls_key`; with `api_tls_ca` every
  client must present a certificate signed by it), unless `api_tcp_insecure` says plaintext is
  meant: the API has no other authentication, and whoever reaches it controls the cluster.
  The same rule applies to activated TCP sockets.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import ssl
import stat
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import structlog

from fleetd.errors import ConfigError

log = structlog.get_logger("fleetd.api")

SD_LISTEN_FDS_START = 3
SOCKET_MODE = 0o660


@dataclass
class Listener:
    sock: socket.socket
    tls: ssl.SSLContext | None = None
    path: str = ""  # a unix socket file fleetd created (and removes at stop)
    inode: int = 0  # of that file, to leave alone a socket someone else made there since
    activated: bool = False

    @property
    def description(self) -> str:
        if self.sock.family == socket.AF_UNIX:
            name = self.sock.getsockname()
            where = f"unix:{name if isinstance(name, str) else name.decode(errors='replace')}"
        else:
            host, port = self.sock.getsockname()[:2]
            where = f"{'https' if self.tls else 'http'}://{host}:{port}"
        return f"{where} (socket-activated)" if self.activated else where


def activated_sockets(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> list[socket.socket]:
    """The listening sockets systemd passed (sd_listen_fds), or [] when not activated.

    LISTEN_PID must name this process: the variables are inherited by children, and a child
    must not take its parent's sockets for its own.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID", "") != str(os.getpid() if pid is None else pid):
        return []
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        raise ConfigError(f"LISTEN_FDS={env.get('LISTEN_FDS')!r} is not a number") from None
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(count, 0)):
        try:
            os.set_inheritable(fd, False)  # keep them from units' and helpers' processes
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise ConfigError(f"socket activation: fd {fd} is not a socket: {e}") from None
        if sock.type != socket.SOCK_STREAM:
            raise ConfigError(f"socket activation: fd {fd} is not a stream socket")
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def forget_activation(environ: MutableMapping[str, str]) -> None:
    """sd_listen_fds(unset_environment=1): the fds are taken; children must not see them."""
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)


def server_tls(cert: str, key: str, ca: str = "") -> ssl.SSLContext:
    """TLS for the API: our certificate, and with `ca` a required, verified client one."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        if ca:
            context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"API TLS: cannot load {cert}, {key} or {ca or 'no CA'}: {e}") from None
    context.verify_mode = ssl.CERT_REQUIRED if ca else ssl.CERT_NONE
    return context


def _remove_stale_socket(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(f"api_socket {path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"api_socket {path}: cannot tell whether it is in use: {e}") from e
        os.unlink(path)  # nobody listens: left behind by a fleetd that died
        log.info("api_stale_socket_removed", path=path)
        return
    finally:
        probe.close()
    raise ConfigError(f"api_socket {path} is in use by another process (another fleetd?)")


def unix_listener(path: str, group: str) -> Listener:
    """Bind the API's unix socket with mode 0660, owned by `group` if that group exists."""
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # umask covers the window between bind and chmod: nobody else can connect in it.
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        inode = os.lstat(path).st_ino
        _set_group(path, group)
        os.chmod(path, SOCKET_MODE)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on api_socket {path}: {e.strerror or e}") from None
    return Listener(sock, path=path, inode=inode)


def _set_group(path: str, group: str) -> None:
    if not group:
        return
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        log.info("api_socket_group_missing", group=group, path=path, mode=oct(SOCKET_MODE))
        return
    try:
        os.chown(path, -1, gid)
    except OSError as e:
        # Not root and not in the group: the socket stays usable by fleetd's own user.
        log.warning("api_socket_chgrp_failed", group=group, path=path, error=str(e))


def tcp_listener(host: str, port: int) -> Listener:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and not host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on api_tcp {host}:{port}: {e.strerror or e}") from None
    return Listener(sock)


def _is_tcp(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6)


def plan_listeners(
    activated: list[socket.socket],
    *,
    api_socket: str,
    api_socket_group: str,
    tcp: tuple[str, int] | None,
    tls: ssl.SSLContext | None,
    insecure: bool,
) -> list[Listener]:
    """The listeners to serve: activated sockets, else our unix socket; plus api_tcp.

    Raises ConfigError for a plaintext TCP socket that was not declared insecure.
    """
    listeners: list[Listener] = []
    try:
        for sock in activated:
            listeners.append(_tcp_checked(Listener(sock, activated=True), tls, insecure))
        if not activated and api_socket:
            listeners.append(unix_listener(api_socket, api_socket_group))
        if tcp is not None:
            listeners.append(_tcp_checked(tcp_listener(*tcp), tls, insecure))
    except ConfigError:
        close_listeners(listeners)
        raise
    return listeners


def _tcp_checked(listener: Listener, tls: ssl.SSLContext | None, insecure: bool) -> Listener:
    if not _is_tcp(listener.sock):
        return listener
    if tls is not None:
        listener.tls = tls
        return listener
    if not insecure:
        where = listener.description
        listener.sock.close()
        raise ConfigError(
            f"the API would be served over TCP without TLS on {where}: set api_tls_cert and"
            " api_tls_key, or api_tcp_insecure=true to accept that anyone who can reach the"
            " port controls the cluster"
        )
    log.warning("api_tcp_insecure", listener=listener.description)
    return listener


def close_listeners(listeners: list[Listener]) -> None:
    for listener in listeners:
        listener.sock.close()
        remove_socket_file(listener)


def remove_socket_file(listener: Listener) -> None:
    """Remove a unix socket file we created, unless someone replaced it meanwhile."""
    if not listener.path or listener.activated:
        return
    with contextlib.suppress(OSError):
        if os.lstat(listener.path).st_ino == listener.inode:
            os.unlink(listener.path)
