"""A rolling upgrade of fleet across a running cluster, from a pinned earlier release to HEAD.

The earlier version is the commit that first shipped a complete wheel (0.1.1, PINNED), built
as a wheel from `git archive`; the cluster boots with it in every machine, runs units, then
`Cluster.upgrade` moves one machine at a time to this checkout's wheel (the session's). While
the cluster is mixed, both versions' fleetctl see the whole cluster and new work is placed and
run; after the roll, every unit still runs where it ran, with the same MainPID (no restarts, no
reschedules), while every fleetd did restart into the new version.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_fixture import free_subnet, progress_printer, require_cluster_host, session_name
from fleet_cluster import Cluster
from fleet_cluster.install import CHECKOUT, build_wheel, wheel_info
from fleet_helpers import Fleet, fleet_on, report

from fleetd import __version__

# 0.1.1: "packaging: packages discovered by setuptools ...". Found by its subject too, should
# history ever be rewritten under it.
PINNED = "f6ebe34"
PINNED_SUBJECT = "; 0.1.1"
AGENT_TTL = 10.0
UNIT = "[Unit]\nDescription=upgrade test {n}\n\n[Service]\nExecStart=/bin/sleep infinity\n"


def _pinned_commit() -> str:
    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(CHECKOUT), *args], capture_output=True, text=True, check=False
        )

    if git("cat-file", "-e", f"{PINNED}^{{commit}}").returncode == 0:
        return PINNED
    found = git("log", "--format=%H", "--fixed-strings", f"--grep={PINNED_SUBJECT}").stdout
    if not found.strip():
        pytest.fail(f"the pinned earlier version {PINNED} is not in this clone's history")
    return found.split()[-1]


@pytest.fixture(scope="module")
def old_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_cluster_host()
    root = tmp_path_factory.mktemp("old")
    archive = root / "src.tar"
    subprocess.run(
        ["git", "-C", str(CHECKOUT), "archive", "-o", str(archive), _pinned_commit()],
        check=True,
        timeout=60,
    )
    with tarfile.open(archive) as tar:
        tar.extractall(root / "src", filter="tar")
    wheel = build_wheel(root / "src", root / "dist")
    assert wheel_info(wheel).version != __version__, "the pinned version must differ from HEAD"
    return wheel


@pytest.fixture(scope="module")
def fleet(old_wheel: Path) -> Iterator[Fleet]:
    name = session_name("u")
    cluster = Cluster(
        name=name,
        n=3,
        agent_ttl=f"{AGENT_TTL:g}s",
        wheel=old_wheel,
        subnet=free_subnet(2),
        progress=progress_printer(name),
    )
    with cluster, fleet_on(cluster, AGENT_TTL, "tests/functional/test_upgrade.py") as booted:
        yield booted


def _registered_versions(fleet: Fleet) -> dict[str, str]:
    return {fleet.machine(m.id).name: m.version for m in fleet.driver.machines()}


def _fleetctl_in(fleet: Fleet, machine: str, *args: str) -> str:
    """The machine's own fleetctl (its installed version) against the cluster's etcd."""
    endpoints = ",".join(fleet.cluster.etcd_endpoints)
    argv = ["fleetctl", "--driver=etcd", f"--endpoint={endpoints}", *args]
    done = fleet.cluster.exec(machine, argv, timeout=60)
    assert done.returncode == 0, f"fleetctl {args} in {machine}: {done.stderr}"
    return done.stdout


def test_rolling_upgrade_keeps_units_running_in_place(fleet: Fleet) -> None:
    cluster = fleet.cluster
    target = wheel_info(Path(os.environ["FLEET_CLUSTER_WHEEL"]))
    assert target.version == __version__  # the session's wheel: what we upgrade to
    before_version = {m.fleet_version for m in cluster.machines}
    assert len(before_version) == 1
    assert before_version != {__version__}
    units = [f"up{n}.service" for n in range(1, 7)]
    for n, name in enumerate(units, 1):
        fleet.start(name, UNIT.format(n=n))
    placed = {name: fleet.wait_running(name, 30.0).name for name in units}
    pids = fleet.main_pids(units)
    fleetd_pids = {m.name: fleet.systemd(m, "fleet.service").main_pid for m in cluster.machines}
    assert set(_registered_versions(fleet).values()) == before_version

    # One machine first: the cluster runs mixed.
    first, *rest = cluster.machines
    started = time.monotonic()
    cluster.upgrade([first.name])
    took = {first.name: time.monotonic() - started}
    versions = _registered_versions(fleet)
    assert versions[first.name] == __version__
    assert {versions[m.name] for m in rest} == before_version
    for m in (first, rest[0]):  # the new and the old fleetctl both see all three machines
        listed = _fleetctl_in(fleet, m.name, "list-machines", "--no-legend", "--full")
        assert {line.split()[0] for line in listed.splitlines()} == {
            x.machine_id for x in cluster.machines
        }, listed
    mixed = "mixed.service"
    fleet.start(mixed, UNIT.format(n="mixed"))
    fleet.wait_running(mixed, 30.0)

    for m in rest:
        started = time.monotonic()
        cluster.upgrade([m.name])
        took[m.name] = time.monotonic() - started

    assert set(_registered_versions(fleet).values()) == {__version__}
    assert {m.fleet_version for m in cluster.machines} == {__version__}
    for m in cluster.machines:
        # fleetd really restarted into the new version...
        assert fleet.systemd(m, "fleet.service").main_pid != fleetd_pids[m.name]
    # ...and not one unit restarted or moved, through the roll and after it.
    for name in units:
        assert fleet.wait_running(name, 30.0).name == placed[name]
    assert fleet.main_pids(units) == pids
    assert fleet.driver.placement(mixed) is not None
    fleet.cleanup()
    figures = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in took.items())
    report(f"rolling upgrade {before_version.pop()} -> {__version__}: {figures}")
    fleet.record("upgrade_seconds_per_machine", {k: round(v, 2) for k, v in took.items()})
