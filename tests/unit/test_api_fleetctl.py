"""fleetctl through this API gives exactly what fleetctl through etcd gives, on the same data.

The cluster is the fleetctl harness's (FakeKV, placements and states written directly). The
API server runs over the same FakeKV on a unix socket, in its own thread and event loop (each
fleetctl command runs its own asyncio.run), with a small page size so fleetctl's API driver
has to follow page tokens. fleetctl reaches it through its real client factory
(`--endpoint unix://...`), the etcd driver through the harness's patched one.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from test_fleetctl_harness import GLOBAL, HELLO, HELLO_TEMPLATE, M1, M2, Cluster

from fleetctl import client as client_module
from fleetd import __version__
from fleetd.api.context import ApiContext
from fleetd.api.server import ApiServer
from fleetd.config import Config
from fleetd.model import TargetState
from fleetd.registry.registry import Registry
from tests.integration.etcd_fixture import TLSFiles

M3 = "5a2e9c3d7b8f4e1a9c0d2b3e4f5a6b7c"


class ServedCluster:
    """A harness cluster plus the API served over it from a background thread."""

    def __init__(self, cluster: Cluster, directory: Path, **config: object) -> None:
        self.cluster = cluster
        self.socket = str(directory / "fleet.sock")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        ctx = ApiContext(Registry(cluster.kv), machine_id=M1, token_limit=3)
        settings = {"api_socket": self.socket, "api_socket_group": ""} | config
        self.server = ApiServer(ctx, Config(**settings), environ={})  # type: ignore[arg-type]

    def __enter__(self) -> ServedCluster:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def via_api(self, *args: str) -> Result:
        return self.cluster.invoke("--driver", "api", "--endpoint", f"unix://{self.socket}", *args)

    def via_etcd(self, monkeypatch: pytest.MonkeyPatch, *args: str) -> Result:
        with monkeypatch.context() as patch:
            patch.setattr(client_module, "make_client", self.cluster.make_client)
            return self.cluster.invoke(*args)


def populate(cluster: Cluster) -> None:
    cluster.add_machine(M1, "172.17.8.103", az="us-west-1b", role="web")
    cluster.add_machine(M2, "172.17.8.102")
    cluster.add_machine(M3, "", disk="ssd")
    cluster.run_unit("hello.service", M1)
    cluster.add_unit("loaded.service", HELLO.replace("Hello World", "Loaded"), TargetState.LOADED)
    cluster.place("loaded.service", M2)
    cluster.publish("loaded.service", M2, TargetState.LOADED, active="inactive", sub="dead")
    cluster.add_unit("idle.service", HELLO)
    cluster.add_unit("global.service", GLOBAL, TargetState.LAUNCHED)
    cluster.publish("global.service", M1)
    cluster.publish("global.service", M3, active="failed", sub="failed")
    cluster.add_unit("hello@.service", HELLO_TEMPLATE)
    cluster.add_unit("hello@1.service", HELLO_TEMPLATE, TargetState.LAUNCHED)
    cluster.place("hello@1.service", M3)
    cluster.publish("hello@1.service", M3, active="activating", sub="start")
    cluster.add_unit("stuck.service", HELLO, TargetState.LAUNCHED)
    cluster.place("stuck.service", None, "no machine matches MachineMetadata role=db")
    for n in range(5):  # enough units for several pages of 3
        cluster.add_unit(f"batch{n}.service", HELLO, TargetState.LOADED)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[ServedCluster]:
    cluster = Cluster()
    populate(cluster)
    with tempfile.TemporaryDirectory() as directory, ServedCluster(cluster, Path(directory)) as s:
        yield s


COMMANDS = [
    ["list-units"],
    ["list-units", "--full"],
    ["list-units", "--no-legend"],
    ["list-units", "--fields", "unit,hash,load,active,sub,machine"],
    ["list-units", "-o", "json"],
    ["list-unit-files"],
    ["list-unit-files", "--full"],
    ["list-unit-files", "--fields", "unit,desc,global,reason,tmachine,state,dstate,hash"],
    ["list-unit-files", "-o", "json"],
    ["list-machines"],
    ["list-machines", "--full"],
    ["list-machines", "--no-legend", "--fields", "machine,metadata"],
    ["list-machines", "-o", "json"],
    ["cat", "hello.service"],
    ["cat", "global.service"],
    ["cat", "hello@1"],
    ["cat", "missing.service"],
]


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_api_driver_output_is_byte_identical(
    served: ServedCluster, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    by_etcd = served.via_etcd(monkeypatch, *args)
    by_api = served.via_api(*args)
    assert (by_api.exit_code, by_api.stdout, by_api.stderr) == (
        by_etcd.exit_code,
        by_etcd.stdout,
        by_etcd.stderr,
    )
    if args[0] != "cat" or args[1] != "missing.service":
        assert by_api.exit_code == 0, by_api.output
        assert by_api.stdout


def test_commands_that_write_through_the_api(
    served: ServedCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("new.service").write_text(HELLO.replace("Hello World", "New"))
    result = served.via_api("submit", "new.service")
    assert (result.exit_code, result.stdout) == (0, "Unit new.service inactive\n")
    result = served.via_api("load", "--no-block", "new.service")
    assert result.exit_code == 0, result.output
    assert served.cluster.unit("new.service").target_state is TargetState.LOADED
    result = served.via_api("start", "--no-block", "hello@.service")
    assert result.exit_code != 0  # a template cannot be started
    result = served.via_api("destroy", "new.service")
    assert (result.exit_code, result.stdout) == (0, "Destroyed new.service\n")
    assert served.cluster.unit("new.service") is None


def test_bad_units_through_the_api_write_nothing(
    served: ServedCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API driver checks every argument first, like the etcd driver (same message), and
    --allow-unknown-options is refused up front there: the API would refuse the option
    after the units before it had been written."""
    monkeypatch.chdir(tmp_path)
    Path("good.service").write_text(HELLO.replace("Hello World", "Good"))
    Path("bad.service").write_text(HELLO + "\n[X-Fleet]\nMachineMetadata=region\n")
    Path("odd.service").write_text(HELLO + "\n[X-Fleet]\nMachineMetdata=region=east\n")
    before = served.cluster.kv.dump("")
    for command in ("submit", "start"):
        by_api = served.via_api(command, "good.service", "bad.service")
        by_etcd = served.via_etcd(monkeypatch, command, "good.service", "bad.service")
        assert (by_api.exit_code, by_api.stderr) == (by_etcd.exit_code, by_etcd.stderr)
        assert by_api.exit_code == 1
        assert 'invalid value "region" for MachineMetadata' in by_api.stderr
    result = served.via_api("submit", "--allow-unknown-options", "good.service", "odd.service")
    assert result.exit_code == 1
    assert result.stderr == (
        'Error creating units: unit odd.service: unknown option "MachineMetdata" in [X-Fleet]'
        " section (did you mean MachineMetadata?); --allow-unknown-options does not apply"
        " with --driver api (the API refuses unknown options)\n"
    )
    assert served.cluster.kv.dump("") == before


def test_fleetctl_over_tls_with_a_client_certificate(
    tls_files: TLSFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = Cluster()
    populate(cluster)
    tls = {
        "api_tcp": f"127.0.0.1:{port}",
        "api_tls_cert": str(tls_files.server_cert),
        "api_tls_key": str(tls_files.server_key),
        "api_tls_ca": str(tls_files.ca),
    }
    with ServedCluster(cluster, tmp_path, **tls) as served:
        by_api = cluster.invoke(
            "--endpoint",
            f"https://127.0.0.1:{port}",
            "--ca-file",
            str(tls_files.ca),
            "--cert-file",
            str(tls_files.client_cert),
            "--key-file",
            str(tls_files.client_key),
            "list-machines",
        )
        by_etcd = served.via_etcd(monkeypatch, "list-machines")
        assert (by_api.exit_code, by_api.stdout) == (0, by_etcd.stdout)
        # without a client certificate the server refuses the connection
        refused = cluster.invoke(
            "--endpoint",
            f"https://127.0.0.1:{port}",
            "--ca-file",
            str(tls_files.ca),
            "list-machines",
        )
        assert refused.exit_code != 0


def test_version_through_the_api_names_the_fleetd_serving_it(served: ServedCluster) -> None:
    result = served.via_api("version")
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"fleetctl version {__version__}\n"
        f"fleetd version {__version__} (the fleetd serving the API)\n"
    )
