"""Listeners: the unix socket (mode, group, stale files), systemd socket activation, TCP with
TLS and client certificates, plaintext TCP only when declared insecure, and ApiServer's
start/stop."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
import ssl
import stat
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from test_api_harness import V1

from fleetd.api import listeners
from fleetd.api.context import ApiContext
from fleetd.api.listeners import activated_sockets, plan_listeners, unix_listener
from fleetd.api.server import ApiServer
from fleetd.config import Config
from fleetd.errors import ConfigError
from fleetd.registry.fake import FakeKV
from fleetd.registry.registry import Registry
from tests.integration.etcd_fixture import TLSFiles

REPO = Path(__file__).resolve().parents[2]


def own_group() -> str:
    return grp.getgrgid(os.getgid()).gr_name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- unix socket ---------------------------------------------------------------------------


def test_unix_socket_mode_and_group(tmp_path: Path) -> None:
    path = str(tmp_path / "fleet.sock")
    umask = os.umask(0o022)
    listener = unix_listener(path, own_group())
    assert os.umask(umask) == 0o022  # the process umask is restored
    try:
        info = os.stat(path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == os.getgid()
        assert listener.description == f"unix:{path}"
    finally:
        listeners.close_listeners([listener])
    assert not os.path.exists(path)


def test_unix_socket_without_the_group(tmp_path: Path) -> None:
    path = str(tmp_path / "fleet.sock")
    listener = unix_listener(path, "no-such-group-fleet-test")
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    finally:
        listeners.close_listeners([listener])


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "fleet.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens: a crashed fleetd's leftover
    listener = unix_listener(path, "")
    listeners.close_listeners([listener])


def test_live_socket_is_not_stolen(tmp_path: Path) -> None:
    path = str(tmp_path / "fleet.sock")
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen()
    try:
        with pytest.raises(ConfigError, match="in use by another process"):
            unix_listener(path, "")
        assert os.path.exists(path)
    finally:
        live.close()


def test_non_socket_file_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "fleet.sock"
    path.write_text("precious")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        unix_listener(str(path), "")
    assert path.read_text() == "precious"


def test_unbindable_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot listen on api_socket"):
        unix_listener(str(tmp_path / "missing-dir" / "fleet.sock"), "")


def test_socket_file_replaced_by_someone_else_is_left_alone(tmp_path: Path) -> None:
    path = str(tmp_path / "fleet.sock")
    listener = unix_listener(path, "")
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX)
    other.bind(path)
    try:
        listeners.close_listeners([listener])
        assert os.path.exists(path)
    finally:
        other.close()


# ---- socket activation ---------------------------------------------------------------------


@pytest.fixture
def listening_unix(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "activated.sock")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.listen()
    yield sock, path
    sock.close()


def test_activated_sockets_from_the_environment(
    listening_unix: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listening_unix
    fd = os.dup(sock.fileno())
    # fds start at 3 under systemd; here the test's own fd stands in for it
    monkeypatch.setattr(listeners, "SD_LISTEN_FDS_START", fd)
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "fleet.socket"}
    got = activated_sockets(env)
    assert [s.fileno() for s in got] == [fd]
    assert got[0].getsockname() == path
    assert not os.get_inheritable(fd)
    listeners.forget_activation(env)
    assert env == {}
    got[0].close()


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_FDS": "1"},  # no LISTEN_PID
        {"LISTEN_PID": "1", "LISTEN_FDS": "1"},  # meant for another process (our parent)
    ],
)
def test_not_activated(env: dict[str, str]) -> None:
    assert activated_sockets(env) == []


def test_activation_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pid = str(os.getpid())
    with pytest.raises(ConfigError, match="LISTEN_FDS='x' is not a number"):
        activated_sockets({"LISTEN_PID": pid, "LISTEN_FDS": "x"})
    with open(tmp_path / "file", "w") as handle:
        monkeypatch.setattr(listeners, "SD_LISTEN_FDS_START", handle.fileno())
        with pytest.raises(ConfigError, match="is not a socket"):
            activated_sockets({"LISTEN_PID": pid, "LISTEN_FDS": "1"})
    # a closed fd (LISTEN_FDS larger than what was passed)
    with pytest.raises(ConfigError, match="Bad file descriptor"):
        activated_sockets({"LISTEN_PID": pid, "LISTEN_FDS": "1"})


ACTIVATED_CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    os.dup2(int(sys.argv[1]), 3)  # where systemd puts the first socket
    os.close(int(sys.argv[1]))
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())
    from fleetd.api import ApiContext, ApiServer
    from fleetd.config import Config
    from fleetd.registry.fake import FakeKV
    from fleetd.registry.registry import Registry

    async def main():
        server = ApiServer(ApiContext(Registry(FakeKV())), Config(api_socket=sys.argv[2]))
        await server.start()
        print("READY", [l.description for l in server.listeners],
              "LISTEN_FDS" in os.environ, flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


async def test_socket_activation_in_a_child_process(
    listening_unix: tuple[socket.socket, str], tmp_path: Path
) -> None:
    sock, path = listening_unix
    own_socket = tmp_path / "not-created.sock"
    child = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-c", ACTIVATED_CHILD, str(sock.fileno()), str(own_socket)],
        pass_fds=[sock.fileno()],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert child.stdout is not None
        stdout = child.stdout

        def ready_line() -> str:
            for line in stdout:  # structlog's console lines come first
                if line.startswith("READY"):
                    return line
            return ""

        line = await asyncio.wait_for(asyncio.to_thread(ready_line), 30)
        assert line.strip() == f"READY ['unix:{path} (socket-activated)'] False"
        assert not own_socket.exists()  # activated: no socket of its own
        sock.close()  # only the child serves it now
        connector = aiohttp.UnixConnector(path=path)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(f"http://domain-sock{V1}/units") as response,
        ):
            assert (response.status, await response.text()) == (200, "{}")
            assert response.headers["Server"].startswith("fleetd/")
    finally:
        child.kill()
        child.wait()


def test_activated_plaintext_tcp_needs_insecure(monkeypatch: pytest.MonkeyPatch) -> None:
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    with pytest.raises(ConfigError, match="without TLS"):
        plan_listeners(
            [tcp], api_socket="", api_socket_group="", tcp=None, tls=None, insecure=False
        )
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    got = plan_listeners(
        [tcp], api_socket="", api_socket_group="", tcp=None, tls=None, insecure=True
    )
    assert got[0].activated
    assert got[0].tls is None
    listeners.close_listeners(got)


# ---- ApiServer over real sockets -------------------------------------------------------------


def make_server(tmp_path: Path, **options: object) -> tuple[ApiServer, Registry]:
    registry = Registry(FakeKV())
    settings: dict[str, object] = {
        "api_socket": str(tmp_path / "fleet.sock"),
        "api_socket_group": "",
    }
    config = replace(Config(), **(settings | options))  # type: ignore[arg-type]
    return ApiServer(ApiContext(registry, machine_id="m1"), config, environ={}), registry


@contextlib.asynccontextmanager
async def serving(server: ApiServer) -> AsyncIterator[ApiServer]:
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_unix_socket_server_start_stop(tmp_path: Path) -> None:
    server, _ = make_server(tmp_path)
    path = tmp_path / "fleet.sock"
    async with serving(server):
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        connector = aiohttp.UnixConnector(path=str(path))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(f"http://domain-sock{V1}/machines") as response,
        ):
            assert response.status == 200
    assert not path.exists()


async def test_plaintext_tcp_is_refused_unless_insecure(tmp_path: Path) -> None:
    port = free_port()
    server, _ = make_server(tmp_path, api_tcp=f"127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="without TLS"):
        await server.start()
    assert not (tmp_path / "fleet.sock").exists()  # nothing left half-served
    server, _ = make_server(tmp_path, api_tcp=f"127.0.0.1:{port}", api_tcp_insecure=True)
    async with (
        serving(server),
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{V1}/units") as response,
    ):
        assert response.status == 200


def client_tls(tls: TLSFiles, with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls.ca))
    if with_cert:
        context.load_cert_chain(str(tls.client_cert), str(tls.client_key))
    return context


async def test_tls_with_required_client_certificates(tmp_path: Path, tls_files: TLSFiles) -> None:
    port = free_port()
    server, _ = make_server(
        tmp_path,
        api_socket="",
        api_tcp=f"127.0.0.1:{port}",
        api_tls_cert=str(tls_files.server_cert),
        api_tls_key=str(tls_files.server_key),
        api_tls_ca=str(tls_files.ca),
    )
    url = f"https://127.0.0.1:{port}{V1}/units"
    async with serving(server):
        assert [listener.description for listener in server.listeners] == [
            f"https://127.0.0.1:{port}"
        ]
        async with aiohttp.ClientSession() as session:
            async with session.get(url, ssl=client_tls(tls_files, True)) as response:
                assert response.status == 200
            with pytest.raises(aiohttp.ClientError):  # no client certificate
                async with session.get(url, ssl=client_tls(tls_files, False)) as response:
                    await response.read()
            with pytest.raises(aiohttp.ClientError):  # plaintext to the TLS port
                async with session.get(f"http://127.0.0.1:{port}{V1}/units") as response:
                    await response.read()


async def test_tls_without_client_certificates(tmp_path: Path, tls_files: TLSFiles) -> None:
    port = free_port()
    server, _ = make_server(
        tmp_path,
        api_tcp=f"127.0.0.1:{port}",
        api_tls_cert=str(tls_files.server_cert),
        api_tls_key=str(tls_files.server_key),
    )
    async with (
        serving(server),
        aiohttp.ClientSession() as session,
        session.get(
            f"https://127.0.0.1:{port}{V1}/units", ssl=client_tls(tls_files, False)
        ) as response,
    ):
        assert response.status == 200


async def test_bad_tls_files_are_a_clear_error(tmp_path: Path) -> None:
    server, _ = make_server(
        tmp_path,
        api_tcp=f"127.0.0.1:{free_port()}",
        api_tls_cert=str(tmp_path / "missing.pem"),
        api_tls_key=str(tmp_path / "missing.key"),
    )
    with pytest.raises(ConfigError, match="API TLS: cannot load"):
        await server.start()
