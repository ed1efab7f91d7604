"""fleetd and fleetctl against a secured etcd: TLS with client certificates, and RBAC.

The real `Server` (presence, engine, agent; the in-package fake systemd, as the host has no
systemd to drive) runs against the etcd, and the real `fleetctl` runs as a separate process
with `--driver etcd` and the matching flags (or FLEETCTL_* variables), the way a user would
run it: it submits and starts a unit, fleetd places it and the fake systemd runs it, and
`list-units` shows it running.

Then the refusals: plaintext to a TLS etcd, a CA that did not sign the server, a CA file
without a client certificate (which fleet answered by skipping verification), wrong etcd
credentials. Each fails with a message naming the cause, and nothing gets stored.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from fleetd.etcd.client import EtcdConfig, EtcdKV
from fleetd.server import Server
from fleetd.systemd.fake import FakeUnitManager
from tests.conftest import _require_etcd
from tests.integration.etcd_fixture import EtcdServer, TLSFiles, running
from tests.integration.inprocess import fleetd, fleetd_config
from tests.integration.waits import wait_for

pytestmark = pytest.mark.integration

HELLO = "[Unit]\nDescription=Hello\n\n[Service]\nExecStart=/bin/sleep 1000\n"
PREFIX = "/fleet/"
FLEETCTL_DEADLINE = 60.0


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str


async def fleetctl(*args: str, env: Mapping[str, str] | None = None, cwd: Path) -> Ran:
    """The real fleetctl in its own process (its own event loop, like a user's shell)."""
    # As from a user's shell: none of this process's settings (GRPC_VERBOSITY is set by
    # fleetd.etcd.client, imported here) leak into fleetctl.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLEETCTL_", "GRPC_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fleetctl",
        *args,
        env={**clean, **(env or {})},
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), FLEETCTL_DEADLINE)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"fleetctl {' '.join(args)} did not finish in {FLEETCTL_DEADLINE}s")
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


async def dump(etcd: EtcdConfig) -> dict[str, str]:
    """Everything stored under fleet's prefix, read with admin credentials."""
    kv = EtcdKV(etcd)
    try:
        kvs, _ = await kv.range(PREFIX)
        return {item.key: item.value for item in kvs}
    finally:
        await kv.close()


async def run_hello(
    server: Server, manager: FakeUnitManager, flags: list[str], env: dict[str, str], cwd: Path
) -> None:
    """submit, start (blocking until fleetd's agent reports it running), list-units."""
    (cwd / "hello.service").write_text(HELLO)
    await wait_for(lambda: _is_set(server.presence.registered), "fleetd to register")

    ran = await fleetctl(*flags, "submit", "hello.service", env=env, cwd=cwd)
    assert (ran.code, ran.stdout, ran.stderr) == (0, "Unit hello.service inactive\n", "")

    ran = await fleetctl(*flags, "start", "--block-attempts=200", "hello.service", env=env, cwd=cwd)
    assert ran.code == 0, ran.stderr
    assert ran.stdout == "Unit hello.service launched on 113f16a7.../10.0.0.1\n"
    assert (await manager.states(["hello.service"]))["hello.service"].active_state == "active"

    async def listed() -> bool:
        # The agent publishes systemd's state a moment after the start job returns.
        ran = await fleetctl(*flags, "list-units", "--no-legend", env=env, cwd=cwd)
        assert ran.code == 0, ran.stderr
        return ran.stdout == "hello.service\t113f16a7.../10.0.0.1\tactive\trunning\n"

    await wait_for(listed, "list-units to show hello.service running")


async def _is_set(event: asyncio.Event) -> bool:
    return event.is_set()


# -- TLS with client certificates ---------------------------------------------------------


async def test_fleetd_and_fleetctl_over_tls_with_client_certificates(
    etcd_tls_server: EtcdServer,
    tls_files: TLSFiles,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = fleetd_config(
        tmp_path,
        etcd_tls_server.endpoints,
        etcd_cafile=str(tls_files.ca),
        etcd_certfile=str(tls_files.client_cert),
        etcd_keyfile=str(tls_files.client_key),
    )
    # The CA by flag, the client pair through fleetctl's environment variables: both work.
    flags = ["--driver", "etcd", "--endpoint", etcd_tls_server.client_url]
    flags += ["--ca-file", str(tls_files.ca)]
    env = {
        "FLEETCTL_CERT_FILE": str(tls_files.client_cert),
        "FLEETCTL_KEY_FILE": str(tls_files.client_key),
    }
    async with fleetd(config, tmp_path, monkeypatch) as (server, manager, _):
        await run_hello(server, manager, flags, env, tmp_path)


def _tls_refusals(server: EtcdServer, tls: TLSFiles) -> list[tuple[list[str], str]]:
    https = ["--endpoint", server.client_url]
    pair = ["--cert-file", str(tls.client_cert), "--key-file", str(tls.client_key)]
    return [
        # plaintext to the TLS port
        (["--endpoint", f"http://127.0.0.1:{server.client_port}"], "does it serve TLS"),
        # a CA that did not sign the server's certificate, with a valid client pair
        ([*https, "--ca-file", str(tls.other_ca), *pair], "not signed by ca_file"),
        # the wrong CA and no client pair: still verified (fleet skipped verification here)
        ([*https, "--ca-file", str(tls.other_ca)], "not signed by ca_file"),
        # no CA at all: the system's roots, which do not know the test CA
        ([*https, *pair], "not signed by ca_file"),
        # the right CA but no client certificate: etcd requires one
        ([*https, "--ca-file", str(tls.ca)], "needs a client certificate"),
    ]


async def test_fleetctl_refuses_insecure_or_unverified_tls(
    etcd_tls_server: EtcdServer, tls_files: TLSFiles, tmp_path: Path
) -> None:
    admin = EtcdConfig(
        etcd_tls_server.endpoints,
        ca_file=str(tls_files.ca),
        cert_file=str(tls_files.client_cert),
        key_file=str(tls_files.client_key),
    )
    (tmp_path / "hello.service").write_text(HELLO)
    for flags, reason in _tls_refusals(etcd_tls_server, tls_files):
        ran = await fleetctl(
            "--driver",
            "etcd",
            "--request-timeout=2",
            *flags,
            "submit",
            "hello.service",
            cwd=tmp_path,
        )
        assert ran.code == 1, (flags, ran)
        assert ran.stdout == ""
        assert ran.stderr.startswith("Unable to initialize client: "), (flags, ran.stderr)
        assert reason in ran.stderr, (flags, ran.stderr)
    assert await dump(admin) == {}


class ServerOnlyTLS(EtcdServer):
    """A TLS etcd that does not ask for client certificates (a common deployment). etcd asks
    for one whenever it has a trusted CA, so this one is given none."""

    def command(self) -> list[str]:
        return [
            arg
            for arg in super().command()
            if arg != "--client-cert-auth" and not arg.startswith("--trusted-ca-file=")
        ]


@pytest.fixture
def etcd_server_only_tls(tmp_path: Path, tls_files: TLSFiles) -> Iterator[EtcdServer]:
    _require_etcd()
    server = ServerOnlyTLS(tmp_path / "etcd-server-tls", tls=tls_files)
    with running(server):
        yield server


async def test_ca_file_alone_still_verifies_the_server(
    etcd_server_only_tls: EtcdServer,
    tls_files: TLSFiles,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fleet used TLS without verification unless a cert+key pair was set; a CA file alone
    (and no CA file at all) must still verify the server's certificate."""
    url = etcd_server_only_tls.client_url
    base = ["--driver", "etcd", "--endpoint", url, "--request-timeout=2"]
    ran = await fleetctl(*base, "--ca-file", str(tls_files.ca), "list-machines", cwd=tmp_path)
    assert (ran.code, ran.stderr) == (0, "")
    for ca in (["--ca-file", str(tls_files.other_ca)], []):
        ran = await fleetctl(*base, *ca, "list-machines", cwd=tmp_path)
        assert ran.code == 1
        assert "not signed by ca_file" in ran.stderr, ran.stderr

    # fleetd, with the right CA alone, registers; with another CA it never does, and says why.
    admin = EtcdConfig([url], ca_file=str(tls_files.ca))
    wrong = fleetd_config(tmp_path / "wrong", [url], etcd_cafile=str(tls_files.other_ca))
    with capture_logs() as logs:
        async with fleetd(wrong, tmp_path / "wrong", monkeypatch) as (server, _, _):
            await wait_for(
                lambda: _logged(logs, "presence_registry_unavailable", "not signed by ca_file"),
                "fleetd to report the unverifiable server",
            )
            assert not server.presence.registered.is_set()
    assert await dump(admin) == {}

    right = fleetd_config(tmp_path / "right", [url], etcd_cafile=str(tls_files.ca))
    async with fleetd(right, tmp_path / "right", monkeypatch) as (server, _, _):
        await wait_for(lambda: _is_set(server.presence.registered), "fleetd to register")


async def _logged(logs: list[dict[str, Any]], event: str, text: str) -> bool:
    return any(e["event"] == event and text in str(e.get("error", "")) for e in logs)


async def test_fleetd_plaintext_to_tls_etcd_is_refused_clearly(
    etcd_tls_server: EtcdServer,
    tls_files: TLSFiles,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plain = fleetd_config(tmp_path, [f"http://127.0.0.1:{etcd_tls_server.client_port}"])
    with capture_logs() as logs:
        async with fleetd(plain, tmp_path, monkeypatch) as (server, _, _):
            await wait_for(
                lambda: _logged(logs, "presence_registry_unavailable", "does it serve TLS"),
                "fleetd to report plaintext refused",
            )
            assert not server.presence.registered.is_set()
    admin = EtcdConfig(
        etcd_tls_server.endpoints,
        ca_file=str(tls_files.ca),
        cert_file=str(tls_files.client_cert),
        key_file=str(tls_files.client_key),
    )
    assert await dump(admin) == {}


# -- user/password (RBAC) ------------------------------------------------------------------


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def enable_rbac(server: EtcdServer, root_password: str, password: str) -> None:
    """Auth on, with a `fleet` user that may read and write fleet's prefix and nothing else."""
    server.gateway("/v3/auth/role/add", {"name": "fleet"})
    server.gateway(
        "/v3/auth/role/grant",
        {
            "name": "fleet",
            "perm": {
                "permType": "READWRITE",
                "key": _b64(PREFIX),
                "range_end": _b64(PREFIX[:-1] + chr(ord(PREFIX[-1]) + 1)),
            },
        },
    )
    server.gateway("/v3/auth/user/add", {"name": "fleet", "password": password})
    server.gateway("/v3/auth/user/grant", {"user": "fleet", "role": "fleet"})
    server.enable_auth(root_password)


async def test_fleetd_and_fleetctl_with_etcd_user_and_password(
    etcd_server: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enable_rbac(etcd_server, "r00t", "s3cret")
    config = fleetd_config(
        tmp_path, etcd_server.endpoints, etcd_username="fleet", etcd_password="s3cret"
    )
    flags = ["--driver", "etcd", "--endpoint", etcd_server.client_url, "--etcd-username", "fleet"]
    env = {"FLEETCTL_ETCD_PASSWORD": "s3cret"}  # a password is better kept off the command line
    async with fleetd(config, tmp_path, monkeypatch) as (server, manager, _):
        await run_hello(server, manager, flags, env, tmp_path)


async def test_wrong_etcd_credentials_are_refused_clearly(
    etcd_server: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enable_rbac(etcd_server, "r00t", "s3cret")
    admin = EtcdConfig(etcd_server.endpoints, username="root", password="r00t")
    (tmp_path / "hello.service").write_text(HELLO)
    base = ["--driver", "etcd", "--endpoint", etcd_server.client_url]
    for creds, reason in [
        (["--etcd-username", "fleet", "--etcd-password", "wrong"], "refused the credentials"),
        ([], "requires authentication"),
    ]:
        ran = await fleetctl(*base, *creds, "submit", "hello.service", cwd=tmp_path)
        assert ran.code == 1
        assert ran.stderr.startswith("Unable to initialize client: "), ran.stderr
        assert reason in ran.stderr, ran.stderr

    # fleetd with a wrong password stops with the reason instead of running unregistered.
    wrong = fleetd_config(tmp_path, etcd_server.endpoints, etcd_username="fleet", etcd_password="x")
    with capture_logs() as logs:
        async with fleetd(wrong, tmp_path, monkeypatch) as (_, _, task):
            code = await asyncio.wait_for(task, 30)
    assert code == 1
    assert any(
        e["event"] == "fleetd_failed" and "refused the credentials of user 'fleet'" in e["error"]
        for e in logs
    ), logs
    assert await dump(admin) == {}
