"""An independent fleet API client against our API: `fleet` from PyPI (python-fleet,
github.com/cnelson/python-fleet), which builds its bindings from the discovery document with
google-api-python-client, as fleet's own Documentation/examples/api.py does.

The server side is real: a simulated fleetd (presence, engine and agent code, fake systemd)
over a real etcd, and the API on TCP, plaintext (api_tcp_insecure) and TLS with a required
client certificate. The client follows fleet's example flow: list machines, submit, start,
wait for the unit to run, read its state, destroy.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fleetd.api.context import ApiContext
from fleetd.api.server import ApiServer
from fleetd.config import Config
from fleetd.etcd.client import EtcdConfig, EtcdKV
from fleetd.sim import SimCluster
from tests.integration.etcd_fixture import EtcdServer, TLSFiles

fleet_v1: Any = pytest.importorskip(
    "fleet.v1", reason="the `fleet` package (python-fleet) is a dev dependency"
)
httplib2: Any = pytest.importorskip("httplib2")

pytestmark = pytest.mark.integration

M1 = "113f16a7f2c54d35b3cde2e2ad5c2f10"
UNIT = """[Unit]
Description=Hello from python-fleet

[Service]
ExecStart=/bin/sleep 1000
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Fleetd:
    """One simulated machine's fleetd with the API, on its own event loop thread (the client
    under test is synchronous)."""

    def __init__(self, etcd: EtcdServer, tmp_path: Path, **api: object) -> None:
        self.port = free_port()
        self._etcd = etcd
        self._tmp_path = tmp_path
        self._api = {"api_socket": "", "api_tcp": f"127.0.0.1:{self.port}"} | api
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    async def _start(self) -> None:
        self.kv = EtcdKV(EtcdConfig(endpoints=self._etcd.endpoints, request_timeout=5.0))
        self.sim = SimCluster(self.kv, agent_ttl=2.0, safety_interval=0.5, state_dir=self._tmp_path)
        self.machine = sim_machine = self.sim.add(M1, {"role": "web"}, "10.0.0.1")
        engine = sim_machine.engine
        ctx = ApiContext(
            sim_machine.registry,
            machine_id=M1,
            registered=sim_machine.presence.registered.is_set,
            is_leader=lambda: engine is not None and engine.is_leader,
        )
        self.server = ApiServer(ctx, Config(**self._api), environ={})  # type: ignore[arg-type]
        await self.server.start()
        await self.sim.start_all()

    async def _stop(self) -> None:
        await self.server.stop()
        await self.sim.close()
        await self.kv.close()

    def __enter__(self) -> Fleetd:
        self.thread.start()
        self._run(self._start())
        wait_for(self.machine.presence.registered.is_set, "machine registration")
        return self

    def __exit__(self, *exc: object) -> None:
        self._run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def wait_for(cond: Callable[[], bool], what: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def example_flow(client: Any) -> None:
    """fleet's Documentation/examples/api.py, step by step, through python-fleet."""
    machines = list(client.list_machines())
    assert [(m.id, m.primaryIP, m.metadata) for m in machines] == [
        (M1, "10.0.0.1", {"role": "web"})
    ]

    unit = fleet_v1.Unit(from_string=UNIT, desired_state="inactive")
    created = client.create_unit("hello.service", unit)
    assert (created.name, created.desiredState) == ("hello.service", "inactive")
    assert [u.name for u in client.list_units()] == ["hello.service"]

    client.set_unit_desired_state("hello.service", "launched")
    wait_for(
        lambda: client.get_unit("hello.service").as_dict().get("currentState") == "launched",
        "the unit to be launched",
    )
    running = client.get_unit("hello.service")
    assert (running.machineID, running.desiredState) == (M1, "launched")
    wait_for(
        lambda: (
            [s.systemdActiveState for s in client.list_unit_states(unit_name="hello.service")]
            == ["active"]
        ),
        "the unit's published state",
    )
    states = list(client.list_unit_states(machine_id=M1))
    assert [(s.name, s.machineID, s.systemdSubState) for s in states] == [
        ("hello.service", M1, "running")
    ]

    # fleet's errors come back as python-fleet's APIError with fleet's code and message
    with pytest.raises(fleet_v1.APIError) as caught:
        client.set_unit_desired_state("missing.service", "launched")
    assert (caught.value.code, caught.value.message) == (
        409,
        "unit does not exist and options field empty",
    )
    template = fleet_v1.Unit(from_string=UNIT, desired_state="launched")
    with pytest.raises(fleet_v1.APIError) as caught:
        client.create_unit("hello@.service", template)
    assert (caught.value.code, caught.value.message) == (
        400,
        'cannot activate template "hello@.service"',
    )

    assert client.destroy_unit("hello.service") is True
    assert list(client.list_units()) == []
    with pytest.raises(fleet_v1.APIError) as caught:
        client.get_unit("hello.service")
    assert (caught.value.code, caught.value.message) == (404, "unit does not exist")


def test_python_fleet_over_plain_tcp(etcd_server: EtcdServer, tmp_path: Path) -> None:
    with Fleetd(etcd_server, tmp_path, api_tcp_insecure=True) as fleetd:
        client = fleet_v1.Client(f"http://127.0.0.1:{fleetd.port}")
        example_flow(client)


def test_python_fleet_over_tls_with_a_client_certificate(
    etcd_server: EtcdServer, tmp_path: Path, tls_files: TLSFiles
) -> None:
    tls = {
        "api_tls_cert": str(tls_files.server_cert),
        "api_tls_key": str(tls_files.server_key),
        "api_tls_ca": str(tls_files.ca),
    }
    with Fleetd(etcd_server, tmp_path, **tls) as fleetd:
        endpoint = f"https://127.0.0.1:{fleetd.port}"
        http = httplib2.Http(ca_certs=str(tls_files.ca))
        http.add_certificate(str(tls_files.client_key), str(tls_files.client_cert), "")
        example_flow(fleet_v1.Client(endpoint, http=http))
        # without a client certificate the handshake is refused
        with pytest.raises((ValueError, OSError)):
            fleet_v1.Client(endpoint, http=httplib2.Http(ca_certs=str(tls_files.ca)))
