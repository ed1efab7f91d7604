"""The API driver against a tiny fleet API v1 server (aiohttp, in a thread): request shapes,
pagination, errors, unix socket and TCP endpoints, and whole commands through the real
client factory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner
from test_fleetctl_harness import HELLO, HELLO_TEMPLATE, M1

from fleetctl.api_client import ApiClient, ApiError, base_url
from fleetctl.cli import cli
from fleetd.errors import InvalidInput, NotFound, RegistryUnavailable
from fleetd.model import TargetState
from fleetd.unit.file import parse_unit
from fleetd.unit.names import UnitNameInfo


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"code": status, "message": message}}
    return web.json_response(body, status=status)


@dataclass
class FakeApi:
    """fleet's API v1 over dicts, one item per page so clients must follow page tokens."""

    units: dict[str, dict[str, Any]] = field(default_factory=dict)
    states: list[dict[str, str]] = field(default_factory=list)
    machines: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/fleet/v1/units", self.list_units)
        app.router.add_get("/fleet/v1/units/{name}", self.get_unit)
        app.router.add_put("/fleet/v1/units/{name}", self.put_unit)
        app.router.add_delete("/fleet/v1/units/{name}", self.delete_unit)
        app.router.add_get("/fleet/v1/state", self.list_states)
        app.router.add_get("/fleet/v1/machines", self.list_machines)
        app.router.add_patch("/fleet/v1/machines", self.patch_machines)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.requests.append((request.method, request.path, dict(request.query), body))
        assert request.query.get("alt") == "json"
        if body is not None:
            assert request.headers["Content-Type"] == "application/json"
        response: web.StreamResponse = await handler(request)
        return response

    @staticmethod
    def _page(request: web.Request, key: str, items: list[Any]) -> web.Response:
        page = int(request.query.get("nextPageToken", "0") or 0)
        body: dict[str, Any] = {key: items[page : page + 1]} if items[page:] else {}
        if page + 1 < len(items):
            body["nextPageToken"] = str(page + 1)
        return web.json_response(body)

    async def list_units(self, request: web.Request) -> web.Response:
        return self._page(request, "units", [self.units[n] for n in sorted(self.units)])

    async def get_unit(self, request: web.Request) -> web.Response:
        unit = self.units.get(request.match_info["name"])
        return web.json_response(unit) if unit else _error(404, "unit does not exist")

    async def put_unit(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await request.json()
        existing = self.units.get(name)
        if body.get("options"):
            self.units[name] = {
                "name": name,
                "options": body["options"],
                "desiredState": body.get("desiredState", "inactive"),
            }
            return web.Response(status=201)
        if existing is None:
            return _error(409, "unit does not exist and options field empty")
        info = UnitNameInfo.parse(name)
        if info and info.is_template and body["desiredState"] != "inactive":
            return _error(400, f'cannot activate template "{name}"')
        existing["desiredState"] = body["desiredState"]
        return web.Response(status=204)

    async def delete_unit(self, request: web.Request) -> web.Response:
        if self.units.pop(request.match_info["name"], None) is None:
            return _error(404, "unit does not exist")
        return web.Response(status=204)

    async def list_states(self, request: web.Request) -> web.Response:
        states = [
            s
            for s in self.states
            if request.query.get("unitName", s["name"]) == s["name"]
            and request.query.get("machineID", s["machineID"]) == s["machineID"]
        ]
        return self._page(request, "states", states)

    async def list_machines(self, request: web.Request) -> web.Response:
        return self._page(request, "machines", self.machines)

    async def patch_machines(self, request: web.Request) -> web.Response:
        return web.Response(status=204)


@dataclass
class Server:
    api: FakeApi
    socket_path: str
    port: int

    @property
    def unix_endpoint(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def server() -> Iterator[Server]:
    """The fake API on a unix socket and on a TCP port, served from its own thread and loop
    (commands under test run their own asyncio.run)."""
    api = FakeApi()
    directory = tempfile.mkdtemp()
    path = str(Path(directory) / "fleet.sock")
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner = web.AppRunner(api.app())
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    port = tcp.getsockname()[1]
    tcp.close()

    async def start() -> None:
        await runner.setup()
        await web.UnixSite(runner, path).start()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop)
    assert ready.wait(10)
    try:
        yield Server(api, path, port)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def api_unit(name: str, text: str, desired: str, **extra: str) -> dict[str, Any]:
    options = [{k: v for k, v in o.items() if v} for o in parse_unit(text).to_options()]
    return {"name": name, "options": options, "desiredState": desired, **extra}


def test_base_url() -> None:
    assert base_url("unix:///var/run/fleet.sock", "/var/run/fleet.sock") == (
        "http://domain-sock/fleet/v1/"
    )
    assert base_url("http://h:8080", None) == "http://h:8080/fleet/v1/"
    assert base_url("https://h/prefix/", None) == "https://h/prefix/fleet/v1/"


# ---- the client itself -----------------------------------------------------------------------


async def test_lists_follow_page_tokens(server: Server) -> None:
    server.api.units = {
        n: api_unit(n, HELLO, "launched", currentState="launched", machineID=M1)
        for n in ("a.service", "b.service", "c.service")
    }
    server.api.machines = [{"id": M1, "primaryIP": "10.0.0.1"}, {"id": "m2"}]
    server.api.states = [
        {"name": "a.service", "machineID": M1, "hash": "h", "systemdActiveState": "active"},
        {"name": "b.service", "machineID": M1},
    ]
    client = ApiClient(server.unix_endpoint, unix_socket=server.socket_path)
    try:
        units = await client.units()
        assert [u.name for u in units] == ["a.service", "b.service", "c.service"]
        assert units[0].hash == parse_unit(HELLO).hash  # derived from the options
        assert (units[0].current_state, units[0].machine_id) == ("launched", M1)
        assert [m.primary_ip for m in await client.machines()] == ["10.0.0.1", ""]
        assert [s.name for s in await client.unit_states()] == ["a.service", "b.service"]
        only = await client.unit_states(unit="a.service", machine_id=M1)
        assert [(s.hash, s.active) for s in only] == [("h", "active")]
    finally:
        await client.close()
    pages = [r[2].get("nextPageToken") for r in server.api.requests if r[1].endswith("/units")]
    assert pages == [None, "1", "2"]
    assert (
        "GET",
        "/fleet/v1/state",
        {"alt": "json", "unitName": "a.service", "machineID": M1},
        None,
    ) in server.api.requests


async def test_a_bad_page_stops_the_listing_and_its_prefetch(server: Server) -> None:
    """The next page is requested before a page is decoded; a page that does not decode
    fails the listing, and the request already sent for the next page is not left behind."""
    server.api.units = {
        "a.service": api_unit("a.service", HELLO, "launched"),
        "b.service": {"name": 3},
        "c.service": api_unit("c.service", HELLO, "launched"),
    }
    client = ApiClient(server.http_endpoint)
    try:
        with pytest.raises(InvalidInput):
            await client.units()
        assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert [m.id for m in await client.machines()] == []  # the session still works
    finally:
        await client.close()


async def test_unit_writes_have_fleets_shapes(server: Server) -> None:
    client = ApiClient(server.http_endpoint)
    body = parse_unit(HELLO_TEMPLATE)
    try:
        assert await client.unit("hello@.service") is None  # 404 means absent
        await client.create_unit("hello@.service", body)
        await client.create_unit("hello@1.service", body, TargetState.LOADED)
        await client.set_target_state("hello@1.service", TargetState.LAUNCHED)
        refused = re.escape('cannot activate template "hello@.service"')
        with pytest.raises(InvalidInput, match=refused):
            await client.set_target_state("hello@.service", TargetState.LAUNCHED)
        with pytest.raises(NotFound):
            await client.set_target_state("nope.service", TargetState.LAUNCHED)
        assert await client.destroy_unit("hello@1.service") is True
        assert await client.destroy_unit("hello@1.service") is False
        await client.set_machine_metadata(M1, "role", "db")
        await client.set_machine_metadata(M1, "role", None)
    finally:
        await client.close()
    writes = [(m, p, b) for m, p, _, b in server.api.requests if m != "GET"]
    options = [{k: v for k, v in o.items() if v} for o in body.to_options()]
    assert writes == [
        ("PUT", "/fleet/v1/units/hello@.service", {"name": "hello@.service", "options": options}),
        (
            "PUT",
            "/fleet/v1/units/hello@1.service",
            {"name": "hello@1.service", "options": options, "desiredState": "loaded"},
        ),
        (
            "PUT",
            "/fleet/v1/units/hello@1.service",
            {"desiredState": "launched", "name": "hello@1.service"},
        ),
        (
            "PUT",
            "/fleet/v1/units/hello@.service",
            {"desiredState": "launched", "name": "hello@.service"},
        ),
        (
            "PUT",
            "/fleet/v1/units/nope.service",
            {"desiredState": "launched", "name": "nope.service"},
        ),
        ("DELETE", "/fleet/v1/units/hello@1.service", None),
        ("DELETE", "/fleet/v1/units/hello@1.service", None),
        (
            "PATCH",
            "/fleet/v1/machines",
            [{"op": "add", "path": f"/{M1}/metadata/role", "value": {"value": "db"}}],
        ),
        ("PATCH", "/fleet/v1/machines", [{"op": "remove", "path": f"/{M1}/metadata/role"}]),
    ]


async def test_errors(server: Server, tmp_path: Path) -> None:
    client = ApiClient("unix:///x", unix_socket=str(tmp_path / "missing.sock"))
    with pytest.raises(RegistryUnavailable, match="unable to reach the fleet API"):
        await client.units()
    await client.close()
    client = ApiClient(server.http_endpoint + "/nothing-here")
    try:
        with pytest.raises(ApiError, match="API error 404"):
            await client.units()
    finally:
        await client.close()


# ---- whole commands through the real factory -------------------------------------------------


def fleetctl(server: Server, *args: str) -> Any:
    return CliRunner().invoke(cli, ["--endpoint", server.unix_endpoint, *args])


def test_commands_over_the_unix_socket(server: Server) -> None:
    server.api.units["hello.service"] = api_unit(
        "hello.service", HELLO, "launched", currentState="launched", machineID=M1
    )
    server.api.machines = [{"id": M1, "primaryIP": "172.17.8.103"}]
    result = fleetctl(server, "list-unit-files")
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "UNIT\t\tHASH\tDSTATE\t\tSTATE\t\tTARGET\n"
        "hello.service\te55c0ae\tlaunched\tlaunched\t113f16a7.../172.17.8.103\n"
    )
    assert fleetctl(server, "cat", "hello").stdout == parse_unit(HELLO).serialize()
    result = fleetctl(server, "stop", "--no-block", "hello")
    assert (result.exit_code, result.stdout) == (0, "Triggered unit hello.service stop\n")
    assert server.api.units["hello.service"]["desiredState"] == "loaded"
    result = fleetctl(server, "destroy", "hello")
    assert (result.exit_code, result.stdout) == (0, "Destroyed hello.service\n")


def test_submit_over_http(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("hello.service").write_text(HELLO)
    result = CliRunner().invoke(
        cli, ["--endpoint", server.http_endpoint, "--driver", "api", "submit", "hello.service"]
    )
    assert (result.exit_code, result.stdout) == (0, "Unit hello.service inactive\n")
    assert server.api.units["hello.service"]["desiredState"] == "inactive"
    put = [r for r in server.api.requests if r[0] == "PUT"]
    assert json.dumps(put[0][3]).startswith('{"name": "hello.service", "options"')


class TunnelTo:
    """A fake SSH transport whose forwards all lead to one local port (the fake API)."""

    def __init__(self, port: int, log: list[tuple[str, Any]]) -> None:
        self.port = port
        self.log = log

    @contextlib.contextmanager
    def forward_unix(self, path: str) -> Iterator[tuple[str, int]]:
        self.log.append(("unix", path))
        yield ("127.0.0.1", self.port)

    @contextlib.contextmanager
    def forward_tcp(self, host: str, port: int) -> Iterator[tuple[str, int]]:
        self.log.append(("tcp", (host, port)))
        yield ("127.0.0.1", self.port)

    def close(self) -> None:
        self.log.append(("close", None))


def test_api_through_a_tunnel(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    server.api.machines = [{"id": M1, "primaryIP": "10.0.0.1"}]
    log: list[tuple[str, Any]] = []
    options: list[Any] = []

    def open_transport(opts: Any) -> TunnelTo:
        options.append(opts)
        return TunnelTo(server.port, log)

    monkeypatch.setattr("fleetctl.transport.open_transport", open_transport)
    # no endpoint: through a tunnel, the tunnel host's fleetd socket
    result = CliRunner().invoke(cli, ["--tunnel", "bastion", "list-machines", "--no-legend"])
    assert (result.exit_code, result.stdout) == (0, "113f16a7...\t10.0.0.1\t-\n")
    assert log == [("unix", "/var/run/fleet.sock"), ("close", None)]
    assert (options[0].tunnel, options[0].username) == ("bastion:22", "core")
    log.clear()
    result = CliRunner().invoke(
        cli, ["--tunnel", "b:2222", "--endpoint", "http://10.1.1.1:49153", "list-machines"]
    )
    assert result.exit_code == 0, result.output
    assert log == [("tcp", ("10.1.1.1", 49153)), ("close", None)]
