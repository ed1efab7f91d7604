"""fleetd's wiring serves the API: the real `Server` (presence, engine, agent; fake systemd)
over a real etcd, with the API on a unix socket in a temporary directory, driven by fleetctl's
API driver and plain HTTP. Checks the socket's life (created 0660 at start, removed at stop),
/health, /metrics from the live components, and a unit started through the API."""

from __future__ import annotations

import asyncio
import stat
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from fleetctl.api_client import ApiClient
from fleetd.config import Config
from fleetd.etcd.client import EtcdConfig, EtcdKV
from fleetd.model import TargetState
from fleetd.registry.kv import Put
from fleetd.server import Server
from fleetd.systemd.fake import FakeUnitManager
from fleetd.unit.file import parse_unit
from tests.integration.etcd_fixture import EtcdServer
from tests.integration.inprocess import fleetd_config, quiet_for_pytest, wait_launched
from tests.integration.waits import wait_for

pytestmark = pytest.mark.integration

M1 = "113f16a7f2c54d35b3cde2e2ad5c2f10"
HELLO = "[Unit]\nDescription=Hello\n\n[Service]\nExecStart=/bin/sleep 1000\n"


async def test_fleetd_serves_the_api(
    etcd_server: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    quiet_for_pytest(monkeypatch)
    config = fleetd_config(tmp_path, etcd_server.endpoints, etcd_request_timeout=5.0)
    socket_path = tmp_path / "fleet.sock"
    server = Server(config, manager=FakeUnitManager(tmp_path / "units"))
    running = asyncio.ensure_future(server.run())
    client = ApiClient(f"unix://{socket_path}", unix_socket=str(socket_path), timeout=5.0)
    connector = aiohttp.UnixConnector(path=str(socket_path))
    try:

        async def listening() -> bool:
            return socket_path.exists()

        await wait_for(listening, "the API socket")
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o660
        async with aiohttp.ClientSession(connector=connector) as session:

            async def healthy() -> bool:
                async with session.get("http://domain-sock/health") as response:
                    return response.status == 200

            await wait_for(healthy, "registration")
            await client.create_unit("hello.service", parse_unit(HELLO), TargetState.LAUNCHED)

            await wait_launched(client, "hello.service", "the unit to run")
            assert [m.id for m in await client.machines()] == [M1]
            async with session.get("http://domain-sock/metrics") as response:
                text = await response.text()
            assert "fleet_engine_leader 1.0" in text
            assert 'fleet_units{state="launched"} 1.0' in text
            assert 'fleet_agent_units{state="launched"} 1.0' in text
            assert 'fleet_etcd_requests_total{kind="txn"}' in text
    finally:
        await client.close()
        server.stop.set()
        assert await asyncio.wait_for(running, 30) == 0
    assert not socket_path.exists()


async def test_fleetd_refuses_a_keyspace_of_a_newer_release(
    etcd_server: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.setattr(Server, "_install_signals", lambda self: None)
    kv = EtcdKV(EtcdConfig(endpoints=etcd_server.endpoints))
    try:
        await kv.txn([], [Put("/fleet/schema", "99")])
        config = replace(
            Config(),
            etcd_servers=tuple(etcd_server.endpoints),
            machine_id=M1,
            public_ip="10.0.0.1",
            state_dir=str(tmp_path / "state"),
            api_socket=str(tmp_path / "fleet.sock"),
            api_socket_group="",
        )
        server = Server(config, manager=FakeUnitManager(tmp_path / "units"))
        # Refused: exits non-zero at once, having written nothing (no machine key, no leader).
        assert await asyncio.wait_for(server.run(), timeout=30) == 1
        keys, _ = await kv.range("/fleet/")
        assert [(k.key, k.value) for k in keys] == [("/fleet/schema", "99")]
    finally:
        await kv.close()
