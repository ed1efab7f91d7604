"""The etcd driver end to end through the real client factory, against a real etcd
(started by tests/conftest.py's fixture; skipped where /usr/bin/etcd is missing)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from test_fleetctl_harness import HELLO

from fleetctl.cli import cli
from fleetd import __version__
from fleetd.etcd.client import EtcdConfig, EtcdKV
from fleetd.model import Machine
from fleetd.registry.registry import Registry
from tests.integration.etcd_fixture import EtcdServer

pytestmark = pytest.mark.integration


def fleetctl(server: EtcdServer, *args: str) -> Result:
    return CliRunner().invoke(
        cli,
        ["--endpoint", server.client_url, "--driver", "etcd", "--etcd-key-prefix", "/t/", *args],
    )


async def _register(server: EtcdServer, version: str) -> None:
    kv = EtcdKV(EtcdConfig(endpoints=server.endpoints))
    try:
        lease = await kv.grant(60)
        machine = Machine.make("113f16a7f2c54d35", "10.0.0.1", version=version)
        await Registry(kv, "/t/").register_machine(machine, lease)
    finally:
        await kv.close()


def test_commands_over_etcd(
    etcd_server: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("hello.service").write_text(HELLO)
    asyncio.run(_register(etcd_server, "0.1.0"))
    result = fleetctl(etcd_server, "submit", "hello.service")
    assert (result.exit_code, result.stdout, result.stderr) == (
        0,
        "Unit hello.service inactive\n",
        "",
    )
    result = fleetctl(etcd_server, "start", "--no-block", "hello")
    assert (result.exit_code, result.stdout) == (0, "Triggered unit hello.service start\n")
    result = fleetctl(etcd_server, "list-unit-files", "--no-legend")
    assert result.stdout == "hello.service\te55c0ae\tlaunched\tinactive\t-\n"
    result = fleetctl(etcd_server, "list-machines", "--no-legend")
    assert result.stdout == "113f16a7...\t10.0.0.1\t-\n"
    result = fleetctl(etcd_server, "destroy", "hello")
    assert (result.exit_code, result.stdout) == (0, "Destroyed hello.service\n")


def test_older_fleetctl_is_warned(etcd_server: EtcdServer) -> None:
    asyncio.run(_register(etcd_server, "9.0.0"))
    result = fleetctl(etcd_server, "list-machines")
    assert result.exit_code == 0
    assert f"WARNING: fleetctl ({__version__}) is older than the latest registered" in result.stderr
    assert "version of fleet found in the cluster (9.0.0)." in result.stderr


def test_unreachable_etcd_fails_fast() -> None:
    result = CliRunner().invoke(
        cli,
        ["--driver=etcd", "--endpoint=http://127.0.0.1:9", "--request-timeout=0.5", "list-units"],
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("Unable to initialize client: ")


def test_unreachable_default_endpoint_says_fleetctl_chose_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETCTL_")}
    done = subprocess.run(
        [sys.executable, "-m", "fleetctl", "--request-timeout=0.5", "--debug", "list-units"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if Path("/var/run/fleet.sock").exists() or done.returncode == 0:
        pytest.skip("this host runs fleetd or etcd on the default endpoints")
    assert done.returncode == 1
    assert "Unable to initialize client: " in done.stderr
    assert "fell back to etcd at http://127.0.0.1:2379" in done.stderr
    assert "endpoint_selected" in done.stderr  # --debug names the choice before trying it


def test_debug_shows_fleetctls_requests_not_the_hpack_decoder(etcd_server: EtcdServer) -> None:
    asyncio.run(_register(etcd_server, __version__))
    argv = [sys.executable, "-m", "fleetctl", "--driver=etcd", "--etcd-key-prefix=/t/"]
    argv += [f"--endpoint={etcd_server.client_url}", "--debug", "list-machines"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("MACHINE")  # the table alone on stdout
    requests = [line for line in done.stderr.splitlines() if "etcd_request" in line]
    assert requests, done.stderr
    assert all("kind=" in line and "ms=" in line for line in requests), requests
    assert "hpack" not in done.stderr.lower()


def test_etcd_through_a_tunnel(etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    forwarded: list[tuple[str, int]] = []

    class Tunnel:
        @contextlib.contextmanager
        def forward_tcp(self, host: str, port: int) -> Iterator[tuple[str, int]]:
            forwarded.append((host, port))
            yield ("127.0.0.1", etcd_server.client_port)

        def close(self) -> None:
            pass

    monkeypatch.setattr("fleetctl.transport.open_transport", lambda options: Tunnel())
    asyncio.run(_register(etcd_server, "0.1.0"))
    result = CliRunner().invoke(
        cli,
        ["--tunnel=b", "--endpoint=http://10.9.9.9:2379", "--etcd-key-prefix=/t/", "list-machines"],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "MACHINE\t\tIP\t\tMETADATA\n113f16a7...\t10.0.0.1\t-\n"
    assert forwarded == [("10.9.9.9", 2379)]
