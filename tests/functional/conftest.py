"""The functional suite's cluster: real systemd-nspawn machines on a bridge, etcd on the host.

Every test in this directory is marked `functional`. The `cluster` fixture boots one cluster
per session (3 machines, agent_ttl 3s, fleetd started in each) and always tears it down, on
failure and Ctrl-C too. Override its shape per test module with indirect parametrization:

    @pytest.mark.parametrize("cluster", [{"n": 5, "agent_ttl": "5s"}], indirect=True)

Each session names its cluster and picks its subnet from its pid, so two test sessions on one
host do not collide; FLEET_TEST_CLUSTER_NAME and FLEET_TEST_SUBNET override that, and
FLEET_TEST_NO_FLEETD=1 boots the machines without fleetd.

fleet runs in the machines as users run it: the session builds the wheel from the checkout once
(`fleet_wheel`) and every cluster of the session installs it in each machine's own venv
(FLEET_CLUSTER_WHEEL, which a developer may point at a wheel of their own instead).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_fixture import (
    cluster_unavailable_reason,
    free_subnet,
    progress_printer,
    require_cluster_host,
    session_name,
)
from fleet_cluster import Cluster
from fleet_cluster.install import CHECKOUT, build_wheel

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.functional)


@pytest.fixture(scope="session", autouse=True)
def fleet_wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path | None]:
    """The wheel of this checkout, built once; what every cluster of the session installs."""
    if cluster_unavailable_reason() is not None:
        yield None
        return
    given = os.environ.get("FLEET_CLUSTER_WHEEL")
    wheel = Path(given) if given else build_wheel(CHECKOUT, tmp_path_factory.mktemp("wheel"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLEET_CLUSTER_WHEEL", str(wheel))
        yield wheel


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
