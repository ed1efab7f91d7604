"""fleetd run in the test's own process against a real etcd (a fake systemd underneath): its
config, and the environment it must not inherit from pytest."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fleetctl.api_client import ApiClient
from fleetd.config import Config
from fleetd.server import Server
from fleetd.systemd.fake import FakeUnitManager
from tests.integration.waits import wait_for

M1 = "113f16a7f2c54d35b3cde2e2ad5c2f10"


def fleetd_config(tmp_path: Path, endpoints: list[str], **overrides: Any) -> Config:
    """A one-machine fleetd config: short TTL, its API on a socket in `tmp_path`."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {
        "etcd_servers": tuple(endpoints),
        "etcd_request_timeout": 2.0,
        "machine_id": M1,
        "public_ip": "10.0.0.1",
        "agent_ttl": 3.0,
        "engine_reconcile_interval": 0.5,
        "state_dir": str(tmp_path / "state"),
        "api_socket": str(tmp_path / "fleet.sock"),
        "api_socket_group": "",
    }
    settings.update(overrides)
    return replace(Config(), **settings)


def quiet_for_pytest(monkeypatch: pytest.MonkeyPatch) -> None:
    """No sd_notify or socket activation from pytest's environment; pytest owns the signals."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.setattr(Server, "_install_signals", lambda self: None)


@contextlib.asynccontextmanager
async def fleetd(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Server, FakeUnitManager, asyncio.Future[int]]]:
    """fleetd running until the block ends (then stopped, waited for up to 30 s)."""
    quiet_for_pytest(monkeypatch)
    manager = FakeUnitManager(tmp_path / "units")
    server = Server(config, manager=manager)
    task = asyncio.ensure_future(server.run())
    try:
        yield server, manager, task
    finally:
        server.stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)


async def wait_launched(client: ApiClient, name: str, what: str = "") -> None:
    """Until the API reports `name` launched (fleetd's agent ran it)."""

    async def launched() -> bool:
        view = await client.unit(name)
        return view is not None and view.current_state == "launched"

    await wait_for(launched, what or f"{name} to run")
