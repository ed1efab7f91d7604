"""The seed's cluster, built the way the seed builds it: deploy/cloud-config.yaml on 3 machines.

`Cluster(cloud_config=...)` gives each machine Debian's cloud-init and a NoCloud seed holding
the repository's user-data (its discovery URL replaced with a token on the host's etcd, which
speaks etcd's v2 discovery protocol); cloud-init starts an etcd member on every machine and
fleetd on every machine against its local member. The host's fleetctl then drives the cluster
through the machines' members: list the machines, start a unit, kill the machine running it
(its etcd member dies with it) and see the unit move while etcd keeps its quorum.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_fixture import free_subnet, progress_printer, require_cluster_host, session_name
from fleet_cluster import Cluster
from fleet_helpers import eventually, report

REPO = Path(__file__).resolve().parents[2]
USER_DATA = REPO / "deploy" / "cloud-config.yaml"
HELLO = REPO / "units" / "hello.service"
FLEETCTL = str(Path(sys.prefix) / "bin" / "fleetctl")
# What deploy/cloud-config.yaml sets: the move waits for the lost machine's lease to expire.
AGENT_TTL = 30.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require_cluster_host()
    name = session_name("s")
    booted = Cluster(
        name=name,
        n=3,
        cloud_config=USER_DATA,
        subnet=free_subnet(3),
        progress=progress_printer(name),
        boot_timeout=120.0,
    )
    with booted:
        yield booted


def run_fleetctl(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETCTL_")}
    argv = [FLEETCTL, "--driver=etcd", f"--endpoint={','.join(cluster.etcd_endpoints)}", *args]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env=env, cwd=REPO, check=False
    )


def fleetctl(cluster: Cluster, *args: str) -> str:
    done = run_fleetctl(cluster, *args)
    assert done.returncode == 0, f"fleetctl {args}: {done.stdout}\n{done.stderr}"
    return done.stdout


def test_cloud_init_ran_the_repositorys_user_data_unchanged_but_for_discovery(
    cluster: Cluster,
) -> None:
    original = USER_DATA.read_text().splitlines()
    for m in cluster.machines:
        status = cluster.exec(m, ["cloud-init", "status", "--long"]).stdout
        assert "status: done" in status, f"{m.name}: {status}"
        assert cluster.exec(m, ["cloud-id"]).stdout.strip() == "nocloud"
        seen = cluster.exec(
            m, ["cat", "/var/lib/cloud/instance/user-data.txt"], check=True
        ).stdout.splitlines()
        differing = [(a, b) for a, b in zip(original, seen, strict=True) if a != b]
        assert len(differing) == 1, differing
        assert "ETCD_DISCOVERY=" in differing[0][1]
        assert cluster.state is not None
        assert cluster.state.discovery_url is not None
        assert cluster.state.discovery_url in differing[0][1]
        # fleet as the user-data installed it: the wheel in /opt/fleet/venv, the units enabled.
        assert m.fleet_version is not None
        enabled = cluster.exec(m, ["systemctl", "is-enabled", "fleet.service", "etcd.service"])
        assert enabled.stdout.split() == ["enabled", "enabled"], enabled.stdout


def test_an_etcd_member_on_every_machine_bound_to_private_addresses(cluster: Cluster) -> None:
    names = set()
    for m in cluster.machines:
        listening = cluster.exec(m, ["ss", "-Hltn"], check=True).stdout
        ports = [line.split()[3] for line in listening.splitlines()]
        etcd_ports = sorted(p for p in ports if p.endswith((":2379", ":2380")))
        assert etcd_ports == sorted([f"{m.ip}:2379", f"{m.ip}:2380", "127.0.0.1:2379"]), ports
        members = cluster.exec(
            m, ["env", "ETCDCTL_API=3", "etcdctl", "member", "list"], check=True
        ).stdout
        names |= {line.split(", ")[2] for line in members.splitlines()}
        conf = cluster.exec(m, ["cat", "/etc/fleet/fleet.conf"], check=True).stdout
        assert 'etcd_servers="http://127.0.0.1:2379"' in conf  # its own member
    assert names == {m.name for m in cluster.machines}


def test_list_machines_start_then_move_when_a_machine_dies(cluster: Cluster) -> None:
    listed = fleetctl(cluster, "list-machines", "--no-legend", "--full")
    assert {line.split()[0] for line in listed.splitlines()} == {
        m.machine_id for m in cluster.machines
    }, listed
    fleetctl(cluster, "start", str(HELLO))

    def running_on() -> str | None:
        done = run_fleetctl(cluster, "list-units", "--no-legend", "--full")
        if done.returncode != 0:
            # Right after the kill etcd may be electing a leader (the victim's member may have
            # been it): the user retries, and so does this wait.
            print(f"list-units failed, retrying: {done.stderr.strip()}", file=sys.stderr)
            return None
        for line in done.stdout.splitlines():
            fields = line.split()
            if fields[0] == "hello.service" and fields[2:4] == ["active", "running"]:
                return fields[1].split("/")[0]
        return None

    first = eventually(running_on, 30.0, "hello.service to run")
    victim = next(m for m in cluster.machines if m.machine_id == first)
    cluster.kill(victim)  # its etcd member goes with it
    killed = time.monotonic()
    moved = eventually(
        lambda: (found := running_on()) is not None and found != first and found,
        AGENT_TTL + 45.0,
        "hello.service to run on another machine",
    )
    took = time.monotonic() - killed
    assert moved in {m.machine_id for m in cluster.machines if m is not victim}
    survivor = next(m for m in cluster.machines if m.running)
    etcdctl = ["env", "ETCDCTL_API=3", "etcdctl"]
    health = cluster.exec(survivor, [*etcdctl, "endpoint", "health", "--cluster"])
    both = health.stdout + health.stderr
    assert both.count("is healthy") == 2, both
    # The quorum, two of three: a write commits.
    cluster.exec(survivor, [*etcdctl, "put", "/quorum-check", "ok"], check=True)
    report(f"cloud-config cluster: hello.service moved {took:.1f} s after its machine died")
    fleetctl(cluster, "destroy", "hello.service")
