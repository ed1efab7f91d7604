"""The functional suite's cluster: real systemd-nspawn machines on a bridge, etcd on the host.

Every test in this directory is marked `functional`. The `cluster` fixture boots one cluster
per session (3 machines, agent_ttl 3s, fleetd started in each) and always tears it down, on
failure and Ctrl-C too. Override its shape per test module with indirect parametrization:

    @pytest.mark.parametrize("cluster", [{"n": 5, "agent_ttl": "5s"}], indirect=True)

Each session names its cluster and picks its subnet from its pid, so two test sessions on one
host do not collide; FLEET_TEST_CLUSTER_NAME and FLEET_TEST_SUBNET override that, and
FLEET_TEST_NO_FLEETD=1 boots the machines without fleetd.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_fixture import free_subnet, progress_printer, require_cluster_host, session_name
from fleet_cluster import Cluster

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.functional)


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A booted cluster (3 machines, agent_ttl 3s) for the session; torn down at its end."""
    require_cluster_host()
    options: dict[str, Any] = {
        "name": session_name(),
        "n": 3,
        "subnet": free_subnet(),
        "agent_ttl": "3s",
        "fleetd": os.environ.get("FLEET_TEST_NO_FLEETD") != "1",
        "boot_timeout": 60.0,
    }
    options.update(getattr(request, "param", None) or {})
    with Cluster(progress=progress_printer(options["name"]), **options) as booted:
        yield booted
