"""Shared harness of the API tests: a cluster in FakeKV, the API app over it, a test client.

There is no engine or agent: tests write what they would (placements, published states)
directly through the registry, as the fleetctl harness does. Imported by the other
test_api_* modules; it holds only a check of the harness itself.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from fleetd.api.app import make_app
from fleetd.api.context import ApiContext
from fleetd.api.metrics import Metrics
from fleetd.model import Machine, TargetState, UnitState
from fleetd.registry import codec
from fleetd.registry.fake import FakeKV
from fleetd.registry.instrumented import InstrumentedKV
from fleetd.registry.kv import Put
from fleetd.registry.registry import Registry
from fleetd.unit.file import UnitFile, parse_unit

HELLO = """[Unit]
Description=Hello World

[Service]
ExecStart=/bin/bash -c "while true; do echo \\"Hello, world\\"; sleep 1; done"
"""
TEMPLATE = """[Unit]
Description=Hello %i

[Service]
ExecStart=/bin/echo %i
"""
M1 = "113f16a7f2c54d35b3cde2e2ad5c2f10"
M2 = "e793afb9e0ee4a2a9d6b8c3e5f6a7b8c"
V1 = "/fleet/v1"


def api_options(text: str) -> list[dict[str, str]]:
    """A unit's options as fleet's API writes them (empty values omitted)."""
    return [{k: v for k, v in o.items() if v} for o in parse_unit(text).to_options()]


class Api:
    """The API over an in-memory cluster; `client` is an aiohttp TestClient on it."""

    def __init__(self, token_limit: int = 100, max_unit_bytes: int = 1 << 20) -> None:
        self.fake = FakeKV()
        self.metrics = Metrics()
        self.registry = Registry(InstrumentedKV(self.fake, self.metrics.etcd))
        self.registered = True
        self.leader = False
        self.ctx = ApiContext(
            self.registry,
            machine_id=M1,
            token_limit=token_limit,
            max_unit_bytes=max_unit_bytes,
            registered=lambda: self.registered,
            is_leader=lambda: self.leader,
            metrics=self.metrics,
        )
        self._client: TestClient[Any, Any] | None = None

    @property
    def client(self) -> TestClient[Any, Any]:
        assert self._client is not None
        return self._client

    async def start(self) -> None:
        self._client = TestClient(TestServer(make_app(self.ctx)))
        await self._client.start_server()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    # ---- requests ------------------------------------------------------------------------

    async def call(
        self, method: str, path: str, body: Any = None, **kwargs: Any
    ) -> tuple[int, Any, ClientResponse]:
        """(status, decoded JSON body or the text if not JSON, None if empty, response)."""
        if body is not None:
            kwargs["data"] = json.dumps(body)
            kwargs.setdefault("headers", {"Content-Type": "application/json"})
        response = await self.client.request(method, path, **kwargs)
        text = await response.text()
        if not text:
            return response.status, None, response
        is_json = response.headers.get("Content-Type") == "application/json"
        return response.status, json.loads(text) if is_json else text, response

    async def error(
        self, method: str, path: str, body: Any = None, **kwargs: Any
    ) -> tuple[int, str]:
        """(status, message) of a request that must fail with fleet's error body."""
        status, decoded, response = await self.call(method, path, body, **kwargs)
        assert status >= 400, decoded
        assert response.headers["Content-Type"] == "application/json"
        assert decoded == {"error": {"code": status, "message": decoded["error"]["message"]}}
        return status, decoded["error"]["message"]

    async def put_unit(self, name: str, **body: Any) -> int:
        status, _, _ = await self.call("PUT", f"{V1}/units/{name}", body)
        return status

    # ---- what clients, the engine and agents would write ----------------------------------

    async def add_unit(
        self, name: str, text: str = HELLO, state: TargetState = TargetState.INACTIVE
    ) -> UnitFile:
        body = parse_unit(text)
        assert await self.registry.create_unit(name, body, state, replace=True)
        return body

    async def add_machine(self, machine_id: str, ip: str = "", **metadata: str) -> None:
        lease = await self.fake.grant(3600)
        machine = Machine.make(machine_id, ip, metadata, version="0.1.0")
        assert await self.registry.register_machine(machine, lease)

    async def place(self, name: str, machine: str | None, reason: str = "") -> None:
        key = self.registry.keys.placement(name)
        await self.fake.txn([], [Put(key, codec.encode_placement(machine, reason))])

    async def publish(
        self,
        name: str,
        machine: str,
        agent_state: TargetState = TargetState.LAUNCHED,
        active: str = "active",
        sub: str = "running",
        failed_task: str = "",
        error: str = "",
    ) -> None:
        unit = await self.registry.get_unit(name)
        hash_ = unit.hash if unit else ""
        state = UnitState(
            name, machine, "loaded", active, sub, hash_, agent_state, failed_task, error
        )
        key = self.registry.keys.state(name, machine)
        await self.fake.txn([], [Put(key, codec.encode_state(state))])

    async def run_unit(self, name: str, machine: str = M1, text: str = HELLO) -> None:
        """A launched unit, placed and running, as after a successful start."""
        await self.add_unit(name, text, TargetState.LAUNCHED)
        await self.place(name, machine)
        await self.publish(name, machine)

    def stored(self) -> dict[str, str]:
        """Everything in etcd, to check that a refused request changed nothing."""
        return self.fake.dump(self.registry.keys.prefix)


@asynccontextmanager
async def serving_api(**options: int) -> AsyncIterator[Api]:
    """An `Api` with its test server running; each test module's `api` fixture uses this."""
    harness = Api(**options)
    await harness.start()
    try:
        yield harness
    finally:
        await harness.close()


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with serving_api() as harness:
        yield harness


async def test_harness_serves_what_it_writes(api: Api) -> None:
    await api.add_machine(M1, "172.17.8.103")
    await api.run_unit("hello.service")
    status, unit, _ = await api.call("GET", f"{V1}/units/hello.service")
    assert status == 200
    assert (unit["currentState"], unit["machineID"]) == ("launched", M1)
