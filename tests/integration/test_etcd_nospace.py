"""etcd out of quota (its NOSPACE alarm) on a real etcd started with a tiny
--quota-backend-bytes, under a real fleetd (fake systemd): every write fleetctl and the API
try fails with a message naming the alarm and the way out, reads still work, fleetd keeps
running and so does its unit (same PID), and once an operator has compacted, defragmented and
disarmed, a submit works again."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from fleetctl.api_client import ApiClient
from fleetd.errors import QuotaExceeded
from fleetd.etcd.client import EtcdConfig, EtcdKV
from fleetd.model import TargetState
from fleetd.registry.kv import Put
from fleetd.server import Server
from fleetd.systemd.fake import FakeUnitManager
from fleetd.unit.file import parse_unit
from tests.conftest import _require_etcd
from tests.integration.etcd_fixture import EtcdServer, running
from tests.integration.inprocess import fleetd_config, quiet_for_pytest, wait_launched
from tests.integration.waits import wait_for

pytestmark = pytest.mark.integration

M1 = "113f16a7f2c54d35b3cde2e2ad5c2f10"
HELLO = "[Unit]\nDescription=Hello\n\n[Service]\nExecStart=/bin/sleep 1000\n"
LATER = "[Service]\nExecStart=/bin/sleep 2000\n"
# etcd 3.4 takes any quota; a fresh member's database is ~20 kB, fleetd's keys a few more.
QUOTA = 256 * 1024
FILLER = "/filler/"
FLEETCTL_DEADLINE = 30.0


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


async def fleetctl(*args: str, cwd: Path) -> Ran:
    """The real fleetctl in its own process, as from a user's shell."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLEETCTL_", "GRPC_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fleetctl",
        *args,
        env=clean,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), FLEETCTL_DEADLINE)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


@pytest.fixture
def small_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    _require_etcd()
    server = EtcdServer(tmp_path / "etcd", extra_args=[f"--quota-backend-bytes={QUOTA}"])
    with running(server):
        yield server


def assert_names_the_alarm(text: str) -> None:
    assert "NOSPACE alarm" in text, text
    for fix in ("etcdctl compact", "etcdctl defrag", "etcdctl alarm disarm"):
        assert fix in text, text


async def fill(kv: EtcdKV) -> None:
    """Write until etcd raises its NOSPACE alarm (a few dozen 16 kB values)."""
    deadline = time.monotonic() + 10
    for i in range(10_000):
        assert time.monotonic() < deadline, "etcd never ran out of space"
        try:
            await kv.txn([], [Put(f"{FILLER}{i:05d}", "x" * 16384)])
        except QuotaExceeded as e:
            assert_names_the_alarm(str(e))
            return


def recover(server: EtcdServer) -> None:
    """What the message tells the operator to do, with etcdctl when it is installed (else
    the same requests through etcd's gateway)."""
    etcdctl = shutil.which(os.environ.get("FLEET_TEST_ETCDCTL", "etcdctl"))
    if etcdctl is None:
        server.gateway("/v3/kv/deleterange", {"key": "L2ZpbGxlci8=", "range_end": "L2ZpbGxlcjA="})
        status = server.gateway("/v3/maintenance/status", {})
        assert isinstance(status, dict)
        server.gateway("/v3/kv/compaction", {"revision": status["header"]["revision"]})
        server.gateway("/v3/maintenance/defragment", {})
        alarms = server.gateway("/v3/maintenance/alarm", {"action": "GET"})
        assert isinstance(alarms, dict)
        for alarm in alarms.get("alarms", []):
            server.gateway("/v3/maintenance/alarm", {"action": "DEACTIVATE", **alarm})
        return

    def ctl(*args: str) -> str:
        env = {**os.environ, "ETCDCTL_API": "3"}
        done = subprocess.run(
            [etcdctl, f"--endpoints={server.client_url}", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return done.stdout

    ctl("del", "--prefix", FILLER)  # what filled it (deletes work under the alarm)
    revision = json.loads(ctl("endpoint", "status", "-w", "json"))[0]["Status"]["header"][
        "revision"
    ]
    ctl("compact", str(revision))
    ctl("defrag")
    ctl("alarm", "disarm")
    assert "NOSPACE" not in ctl("alarm", "list")


async def test_nospace_refuses_writes_clearly_and_recovers(
    small_etcd: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    quiet_for_pytest(monkeypatch)
    config = fleetd_config(tmp_path, small_etcd.endpoints, etcd_request_timeout=5.0)
    socket_path = tmp_path / "fleet.sock"
    manager = FakeUnitManager(tmp_path / "units")
    server = Server(config, manager=manager)
    fleetd = asyncio.ensure_future(server.run())
    client = ApiClient(f"unix://{socket_path}", unix_socket=str(socket_path), timeout=5.0)
    kv = EtcdKV(EtcdConfig(endpoints=small_etcd.endpoints, request_timeout=5.0))
    unit_file = tmp_path / "later.service"
    unit_file.write_text(LATER)
    by_etcd = ("--endpoint", small_etcd.client_url, "--driver", "etcd")
    by_api = ("--endpoint", f"unix://{socket_path}")
    try:

        async def listening() -> bool:
            return socket_path.exists()

        await wait_for(listening, "the API socket")
        await client.create_unit("hello.service", parse_unit(HELLO), TargetState.LAUNCHED)

        await wait_launched(client, "hello.service", "the unit to run")
        pid = await manager.main_pid("hello.service")

        await fill(kv)

        # Every write path says what happened and how to get out; nothing is changed.
        ran = await fleetctl(*by_etcd, "submit", str(unit_file), cwd=tmp_path)
        assert ran.code != 0
        assert_names_the_alarm(ran.err)
        ran = await fleetctl(*by_api, "submit", str(unit_file), cwd=tmp_path)
        assert ran.code != 0
        assert "API error 503" in ran.err
        assert_names_the_alarm(ran.err)
        ran = await fleetctl(*by_etcd, "stop", "--no-block", "hello.service", cwd=tmp_path)
        assert ran.code != 0
        assert_names_the_alarm(ran.err)
        connector = aiohttp.UnixConnector(path=str(socket_path))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.put(
                "http://domain-sock/fleet/v1/units/hello.service",
                json={"desiredState": "loaded"},
            ) as response,
        ):
            assert response.status == 503
            assert_names_the_alarm((await response.json())["error"]["message"])

        # Reads still work; fleetd and its unit carry on untouched.
        ran = await fleetctl(*by_etcd, "list-unit-files", "--no-legend", cwd=tmp_path)
        assert ran.code == 0, ran.err
        assert "hello.service" in ran.out
        assert "later.service" not in ran.out
        assert not fleetd.done()
        assert await manager.main_pid("hello.service") == pid
        assert (await manager.states(["hello.service"]))["hello.service"].active_state == "active"

        await asyncio.to_thread(recover, small_etcd)

        # Recovered: a submit works, and fleetd runs the new unit.
        ran = await fleetctl(*by_etcd, "start", "--no-block", str(unit_file), cwd=tmp_path)
        assert ran.code == 0, ran.err

        await wait_launched(client, "later.service", "the new unit to run after recovery")
        assert await manager.main_pid("hello.service") == pid
    finally:
        await kv.close()
        await client.close()
        server.stop.set()
        assert await asyncio.wait_for(fleetd, 30) == 0
