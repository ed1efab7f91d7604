"""The real fleetctl against the real cluster, as a user runs it from the host.

`fleetctl` runs as a subprocess with the environment `fleet-cluster env` prints (no ssh-agent:
the cluster key comes from FLEETCTL_SSH_IDENTITY_FILE). The unit lifecycle goes through both
drivers: `--driver etcd` straight to the cluster's etcd, and `--driver api` to a machine's
/var/run/fleet.sock through fleet's SSH tunnel (`fleetctl fd-forward` on the far end). Both must
print the same lists. Every check waits on a condition with a deadline.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from fleet_cluster import Cluster, MachineState
from fleet_helpers import eventually

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "units" / "hello.service"
FLEETCTL = str(Path(sys.prefix) / "bin" / "fleetctl")
API_SOCKET = "unix:///var/run/fleet.sock"
DRIVERS = ("etcd", "api")


class Fleetctl:
    """`fleetctl` subprocesses with the cluster's environment, through either driver."""

    def __init__(self, cluster: Cluster, home: Path) -> None:
        state = cluster.state
        assert state is not None
        self.cluster = cluster
        self.tunnel = cluster.machines[0]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETCTL_")}
        env.pop("SSH_AUTH_SOCK", None)  # the identity file must be enough
        env.update(
            {
                "HOME": str(home),  # no ~/.ssh/config or ~/.fleetctl of the invoking user
                "FLEETCTL_ETCD_KEY_PREFIX": state.etcd_key_prefix,
                "FLEETCTL_KNOWN_HOSTS_FILE": str(cluster.known_hosts),
                "FLEETCTL_SSH_USERNAME": "root",
                "FLEETCTL_SSH_IDENTITY_FILE": str(cluster.ssh_key),
            }
        )
        self.env = env

    def driver_args(self, driver: str) -> list[str]:
        if driver == "etcd":
            return ["--driver", "etcd", "--endpoint", self.cluster.etcd_endpoint]
        return ["--driver", "api", "--endpoint", API_SOCKET, "--tunnel", self.tunnel.ip]

    def run(
        self,
        driver: str,
        *args: str,
        stdin: str = "",
        timeout: float = 60,
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = [FLEETCTL, *self.driver_args(driver), *args]
        return subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**self.env, **(extra_env or {})},
            cwd=REPO,
            check=False,
        )

    def ok(self, driver: str, *args: str, timeout: float = 60) -> str:
        done = self.run(driver, *args, timeout=timeout)
        assert done.returncode == 0, (
            f"fleetctl {' '.join(args)} ({driver}) exited {done.returncode}:\n"
            f"{done.stdout}\n{done.stderr}"
        )
        return done.stdout


@pytest.fixture(scope="module")
def fleetctl(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleetctl]:
    ctl = Fleetctl(cluster, tmp_path_factory.mktemp("fleetctl-home"))
    running = [m for m in cluster.machines if m.running]
    # Every machine registered, and the tunnel's fleetd serving its API socket.
    eventually(
        lambda: ctl.ok("etcd", "list-machines", "--no-legend").count("\n") >= len(running),
        30,
        "every machine in list-machines",
        poll=0.2,
    )
    eventually(lambda: ctl.run("api", "list-machines").returncode == 0, 30, "the API", poll=0.5)
    yield ctl
    ctl.run("etcd", "destroy", "hello.service")


def _rows(text: str, unit: str = "hello.service") -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.startswith(unit)]


def _machine(cluster: Cluster, list_units: str) -> MachineState:
    """The machine of hello.service from list-units' MACHINE column (`<id prefix>.../<ip>`)."""
    (row,) = _rows(list_units)
    ip = row[1].rsplit("/", 1)[1]
    return next(m for m in cluster.machines if m.ip == ip)


def _same_lists(ctl: Fleetctl, *args: str) -> str:
    """Wait until both drivers print the same `args` output; return it."""
    seen: dict[str, str] = {}

    def probe() -> str | None:
        seen.update({driver: ctl.ok(driver, *args) for driver in DRIVERS})
        return seen["etcd"] if seen["etcd"] == seen["api"] else None

    return eventually(probe, 30, lambda: f"identical {' '.join(args)}: {seen}", poll=0.3)


def _wait_listed(ctl: Fleetctl, driver: str, args: Sequence[str], want: list[str] | None) -> str:
    """Wait until hello.service's row of `args` holds the words `want` (None: not listed)."""
    last = ""

    def probe() -> bool:
        nonlocal last
        last = ctl.ok(driver, *args)
        rows = _rows(last)
        if want is None:
            return not rows
        return bool(rows) and f" {' '.join(want)} " in f" {' '.join(rows[0])} "

    eventually(probe, 30, lambda: f"{' '.join(args)} to show {want}:\n{last}", poll=0.2)
    return last


@pytest.mark.parametrize("driver", DRIVERS)
def test_unit_lifecycle(fleetctl: Fleetctl, driver: str) -> None:
    ctl = fleetctl
    ctl.run("etcd", "destroy", "hello.service")  # a leftover of an interrupted run
    ctl.ok(driver, "submit", "units/hello.service")
    _wait_listed(ctl, driver, ["list-unit-files"], ["inactive", "inactive", "-"])
    assert ctl.ok(driver, "cat", "hello.service").strip() == HELLO.read_text().strip()

    ctl.ok(driver, "start", "hello.service")
    listed = _wait_listed(ctl, driver, ["list-units"], ["active", "running"])
    assert _machine(ctl.cluster, listed).running
    _wait_listed(ctl, driver, ["list-unit-files"], ["launched", "launched"])
    assert _rows(_same_lists(ctl, "list-units", "--full"))[0][-2:] == ["active", "running"]
    assert _rows(_same_lists(ctl, "list-unit-files"))[0][2:4] == ["launched", "launched"]

    ctl.ok(driver, "stop", "hello.service")
    _wait_listed(ctl, driver, ["list-unit-files"], ["loaded", "loaded"])
    _wait_listed(ctl, driver, ["list-units"], ["inactive", "dead"])
    _same_lists(ctl, "list-units")

    ctl.ok(driver, "unload", "hello.service")
    _wait_listed(ctl, driver, ["list-unit-files"], ["inactive", "inactive", "-"])
    _wait_listed(ctl, driver, ["list-units"], None)

    ctl.ok(driver, "destroy", "hello.service")
    _wait_listed(ctl, driver, ["list-unit-files"], None)
    _same_lists(ctl, "list-unit-files")


def test_status_journal_and_ssh_through_the_tunnel(fleetctl: Fleetctl) -> None:
    ctl = fleetctl
    ctl.run("etcd", "destroy", "hello.service")
    ctl.ok("api", "start", "units/hello.service")
    listed = _wait_listed(ctl, "api", ["list-units"], ["active", "running"])
    where = _machine(ctl.cluster, listed)

    status = ctl.ok("api", "status", "hello.service")
    assert "Active: active (running)" in status, status
    journal = eventually(
        lambda: (out := ctl.ok("api", "journal", "hello.service")) and "Hello, world" in out,
        20,
        "hello.service's journal lines",
        poll=0.5,
    )
    assert journal

    # A machine by a prefix of its id, a command after `--`.
    target = ctl.cluster.machines[1]
    out = ctl.ok("api", "ssh", target.machine_id[:12], "--", "hostname")
    assert out.strip() == target.name
    # And by the unit it runs.
    assert ctl.ok("api", "ssh", "--unit", "hello.service", "hostname").strip() == where.name

    ctl.ok("api", "destroy", "hello.service")
    _wait_listed(ctl, "api", ["list-unit-files"], None)


def test_unknown_host_refused_with_strict_checking(fleetctl: Fleetctl, tmp_path: Path) -> None:
    ctl = fleetctl
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    target = ctl.cluster.machines[0]
    done = ctl.run(
        "etcd",
        "--strict-host-key-checking=true",
        "ssh",
        target.machine_id[:12],
        "--",
        "hostname",
        stdin="no\n",
        extra_env={"FLEETCTL_KNOWN_HOSTS_FILE": str(known_hosts)},
    )
    assert done.returncode != 0, done.stdout
    assert target.name not in done.stdout
    assert "can't be established" in done.stderr, done.stderr
    assert "Host key verification failed" in done.stderr, done.stderr
    assert known_hosts.read_text() == ""  # nothing was trusted
