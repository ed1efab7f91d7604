"""Fixtures shared by the test suites: real etcd servers for integration tests.

Each fixture starts its own etcd (random loopback ports, temporary data directory) and always
tears it down, also when the test fails. They skip, with the reason, where /usr/bin/etcd is
not installed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.etcd_fixture import (
    ETCD35_BIN,
    ETCD_BIN,
    EtcdCluster,
    EtcdServer,
    TLSFiles,
    etcd_available,
    make_tls_files,
    running,
)


def _require_etcd() -> None:
    if not etcd_available():
        pytest.skip(f"{ETCD_BIN} is not installed (Debian package etcd-server)")


@pytest.fixture
def etcd35_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """As `etcd_server`, on etcd 3.5 (deploy/fetch-etcd35.sh). Where the tests must cover it
    (deploy/test.sh sets FLEET_REQUIRE_ETCD35=1), a missing binary fails instead of skipping."""
    if not etcd_available(ETCD35_BIN):
        why = f"{ETCD35_BIN} is missing: run deploy/fetch-etcd35.sh"
        if os.environ.get("FLEET_REQUIRE_ETCD35") == "1":
            pytest.fail(why)
        pytest.skip(why)
    server = EtcdServer(tmp_path / "etcd35", binary=ETCD35_BIN)
    with running(server):
        yield server


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """A fresh single-member etcd; `.endpoints`, `.stop()`, `.start()` (same data and ports),
    `.kill()`."""
    _require_etcd()
    server = EtcdServer(tmp_path / "etcd")
    with running(server):
        yield server


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A test CA, server and client certificates (and an unrelated CA)."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        pytest.skip("the cryptography package is needed to make test TLS certificates")
    return make_tls_files(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def etcd_tls_server(tmp_path: Path, tls_files: TLSFiles) -> Iterator[EtcdServer]:
    """A fresh etcd serving TLS only and requiring a client certificate (--client-cert-auth)."""
    _require_etcd()
    server = EtcdServer(tmp_path / "etcd-tls", tls=tls_files)
    with running(server):
        yield server


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh 3-member etcd cluster on loopback; `.members[i]` can be stopped or killed."""
    _require_etcd()
    cluster = EtcdCluster(tmp_path / "cluster", size=3)
    with running(cluster):
        yield cluster
