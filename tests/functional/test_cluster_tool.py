"""The local cluster tool itself: machines boot real systemd, reach etcd, take SSH, can be
killed, restarted, partitioned and healed, and `down` leaves nothing behind.

Every wait has a deadline (no blind sleeps); the clusters are always torn down.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from cluster_fixture import free_subnet, progress_printer, require_cluster_host, session_name
from fleet_cluster import Cluster, MachineNotRunning, MachineState
from fleet_cluster.network import bridge_mac, links
from fleet_cluster.procs import is_alive

T = TypeVar("T")
CLI = [sys.executable, "-m", "fleet_cluster"]


def eventually(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `probe` until it returns a truthy value, failing the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def reaches(cluster: Cluster, m: MachineState, host: str, port: int, timeout: int = 1) -> bool:
    """Whether a TCP connection from inside `m` to host:port succeeds within `timeout` s."""
    probe = f"exec 3<>/dev/tcp/{host}/{port}"
    done = cluster.exec(m, ["timeout", str(timeout), "bash", "-c", probe], timeout=timeout + 10)
    return done.returncode == 0


def etcd_port(cluster: Cluster) -> int:
    assert cluster.state is not None
    assert cluster.state.etcd is not None
    return cluster.state.etcd.client_port


# -- a booted cluster ----------------------------------------------------------------------


def test_machines_run_systemd_with_distinct_machine_ids(cluster: Cluster) -> None:
    assert len(cluster.machines) == 3
    ids = []
    for m in cluster.machines:
        state = cluster.exec(m, ["systemctl", "is-system-running"]).stdout.strip()
        assert state in ("running", "degraded"), f"{m.name}: {state}"
        machine_id = cluster.exec(m, ["cat", "/etc/machine-id"], check=True).stdout.strip()
        assert machine_id == m.machine_id
        assert cluster.exec(m, ["hostname"], check=True).stdout.strip() == m.name
        ids.append(machine_id)
    assert len(set(ids)) == 3, ids


def test_each_machine_reaches_etcd_at_the_bridge_address(cluster: Cluster) -> None:
    url = f"{cluster.etcd_endpoint}/health"
    assert cluster.state is not None
    assert cluster.state.bridge_ip in url
    fetch = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).read())"
    for m in cluster.machines:
        done = cluster.exec(m, ["python3", "-c", fetch], check=True)
        assert '"health":"true"' in done.stdout, f"{m.name}: {done.stdout}"


def test_fleet_conf_and_fleetctl_are_in_place(cluster: Cluster) -> None:
    for m in cluster.machines:
        conf = cluster.exec(m, ["cat", "/etc/fleet/fleet.conf"], check=True).stdout
        assert f'etcd_servers="{cluster.etcd_endpoint}"' in conf
        assert f'public_ip="{m.ip}"' in conf
        assert 'agent_ttl="3s"' in conf
        which = cluster.exec(m, ["sh", "-c", "command -v fleetctl"], check=True).stdout
        assert which.strip() == "/usr/local/bin/fleetctl"


def test_fleet_runs_from_the_wheel_in_each_machines_own_venv(cluster: Cluster) -> None:
    where = "import fleetd, sys; print(fleetd.__file__); print(sys.prefix)"
    for m in cluster.machines:
        assert m.fleet_version is not None
        assert m.fleet_wheel is not None
        assert m.fleet_wheel.startswith(f"fleet_py-{m.fleet_version}-")
        links = cluster.exec(m, ["readlink", "-f", "/usr/local/bin/fleetd"], check=True)
        assert links.stdout.strip() == "/opt/fleet/venv/bin/fleetd"
        done = cluster.exec(m, ["/opt/fleet/venv/bin/python", "-c", where], check=True)
        module, prefix = done.stdout.split()
        assert module.startswith("/opt/fleet/venv/lib/python3"), module  # not the checkout
        assert prefix == "/opt/fleet/venv"
        # The daemon that runs is that one: fleet.service's main process in that venv.
        pid = cluster.exec(m, ["systemctl", "show", "-P", "MainPID", "fleet.service"])
        cmdline = cluster.exec(m, ["cat", f"/proc/{pid.stdout.strip()}/cmdline"], check=True)
        assert "/opt/fleet/venv/bin/" in cmdline.stdout, cmdline.stdout
        version = cluster.exec(m, ["fleetd", "--version"], check=True).stdout
        assert version.split()[-1] == m.fleet_version


def test_sshd_accepts_the_cluster_key(cluster: Cluster) -> None:
    for m in cluster.machines:
        argv = [
            "ssh",
            "-i",
            str(cluster.ssh_key),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            f"root@{m.ip}",
            "true",
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, f"{m.name}: {done.stderr}"
        # and with the known_hosts file the tool wrote: host keys are checked strictly
        strict = subprocess.run(
            cluster.ssh_argv(m, ["hostname"]), capture_output=True, text=True, timeout=30
        )
        assert strict.stdout.strip() == m.name, strict.stderr


def test_transient_unit_becomes_active(cluster: Cluster) -> None:
    m = cluster.machines[0]
    unit = f"cluster-test-{uuid.uuid4().hex[:8]}.service"
    cluster.exec(m, ["systemd-run", f"--unit={unit}", "sleep", "600"], check=True)
    try:
        eventually(
            lambda: cluster.exec(m, ["systemctl", "is-active", unit]).stdout.strip() == "active",
            10,
            f"{unit} to be active",
        )
    finally:
        cluster.exec(m, ["systemctl", "stop", unit])


def test_namesake_units_in_different_machines_do_not_interfere(cluster: Cluster) -> None:
    """Each machine has cgroups of its own: stopping a unit in one machine while its namesake
    starts in another must not fail the start (219/CGROUP without per-machine cgroups)."""
    unit = f"cluster-same-{uuid.uuid4().hex[:8]}.service"
    machines = cluster.machines
    try:
        for _round in range(3):
            for m in machines:
                cluster.exec(m, ["systemd-run", f"--unit={unit}", "sleep", "600"], check=True)
            cluster.exec(machines[0], ["systemctl", "stop", unit], check=True)
            for m in machines[1:]:
                state = cluster.exec(m, ["systemctl", "is-active", unit]).stdout.strip()
                assert state == "active", f"{unit} on {m.name}: {state}"
            for m in machines[1:]:
                cluster.exec(m, ["systemctl", "stop", unit], check=True)
    finally:
        for m in machines:
            cluster.exec(m, ["systemctl", "stop", unit])


def test_kill_and_restart_keep_the_machine_id(cluster: Cluster) -> None:
    m = cluster.machines[1]
    machine_id = m.machine_id
    nspawn_pid, init_pid = m.nspawn_pid, m.init_pid
    assert nspawn_pid is not None
    assert init_pid is not None

    cluster.kill(m)
    assert m.status == "killed"
    assert not is_alive(nspawn_pid), "systemd-nspawn survived kill"
    assert not is_alive(init_pid), "the container's init survived kill"
    with pytest.raises(MachineNotRunning):
        cluster.exec(m, ["true"])

    cluster.restart(m)
    assert m.status == "running"
    assert m.init_pid not in (None, init_pid)
    state = cluster.exec(m, ["systemctl", "is-system-running"]).stdout.strip()
    assert state in ("running", "degraded")
    assert cluster.exec(m, ["cat", "/etc/machine-id"], check=True).stdout.strip() == machine_id
    assert reaches(cluster, m, cluster.state.bridge_ip if cluster.state else "", etcd_port(cluster))
    ssh = subprocess.run(cluster.ssh_argv(m, ["true"]), capture_output=True, timeout=30)
    assert ssh.returncode == 0, ssh.stderr


def bridge_mac_now(cluster: Cluster) -> str:
    [link] = [link for link in links() if link.get("ifname") == cluster.bridge]
    return str(link["address"])


def test_bridge_mac_stays_when_a_machine_goes_and_comes_back(cluster: Cluster) -> None:
    """A bridge without a MAC of its own takes the lowest of its ports': killing that port's
    machine changed it, and the other machines, still sending to the old one, lost etcd."""
    assert cluster.state is not None
    fixed = bridge_mac(ipaddress.IPv4Address(cluster.state.bridge_ip))
    assert bridge_mac_now(cluster) == fixed
    m, other = cluster.machines[0], cluster.machines[2]
    cluster.kill(m)
    try:
        assert bridge_mac_now(cluster) == fixed
        assert reaches(cluster, other, cluster.state.bridge_ip, etcd_port(cluster))
    finally:
        cluster.restart(m)
    assert bridge_mac_now(cluster) == fixed
    assert reaches(cluster, other, cluster.state.bridge_ip, etcd_port(cluster))


def test_partition_cuts_the_bridge_and_heal_restores_it(cluster: Cluster) -> None:
    m = cluster.machines[2]
    other = cluster.machines[0]
    assert cluster.state is not None
    bridge_ip = cluster.state.bridge_ip
    port = etcd_port(cluster)
    assert reaches(cluster, m, bridge_ip, port)

    cluster.partition(m)
    try:
        assert m.partitioned
        assert not reaches(cluster, m, bridge_ip, port), "etcd still reachable when partitioned"
        assert not reaches(cluster, other, m.ip, 22), f"{other.name} still reaches {m.name}"
        assert reaches(cluster, other, bridge_ip, port), "the partition cut the others off too"
    finally:
        cluster.heal(m)
    assert not m.partitioned
    eventually(lambda: reaches(cluster, m, bridge_ip, port), 10, f"{m.name} to reach etcd")
    eventually(lambda: reaches(cluster, other, m.ip, 22), 10, f"{other.name} to reach {m.name}")


# -- down, through the CLI and through the context manager ---------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=180)


def assert_nothing_left(name: str, state: dict[str, object]) -> None:
    state_dir = Path(str(state["state_dir"]))
    bridge = str(state["bridge"])
    machines = state["machines"]
    assert isinstance(machines, list)

    mount_table = subprocess.run(["mount"], capture_output=True, text=True, check=True).stdout
    ours = [line for line in mount_table.splitlines() if str(state_dir) in line]
    assert not [line for line in ours if "overlay" in line], f"overlay mounts left: {ours}"
    assert not ours, f"mounts left: {ours}"

    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True)
    link_names = [line.split()[0].split("@")[0] for line in links.stdout.splitlines()]
    assert bridge not in link_names, f"bridge {bridge} left"
    assert not [n for n in link_names if n.startswith(f"vb-{name}")], link_names

    for m in machines:
        for key in ("nspawn_pid", "init_pid"):
            pid = m[key]
            assert pid is None or not is_alive(pid), f"{m['name']} {key} {pid} still running"
    nspawns = subprocess.run(
        ["pgrep", "-a", "-x", "systemd-nspawn"], capture_output=True, text=True
    )
    assert str(state_dir) not in nspawns.stdout, f"nspawn processes left: {nspawns.stdout}"

    members = state["etcd_members"]
    assert isinstance(members, list)
    assert members, "no etcd member recorded"
    for member in members:
        assert not is_alive(member["pid"]), f"etcd member {member['index']} still running"
    pgrep = ["pgrep", "-a", "-x", "etcd"]
    etcds = subprocess.run(pgrep, capture_output=True, text=True, check=False)
    assert str(state_dir) not in etcds.stdout, f"etcd left: {etcds.stdout}"

    for hierarchy in ("systemd", "unified"):
        directory = Path("/sys/fs/cgroup") / hierarchy / "fleet-cluster" / name
        assert not directory.exists(), f"cgroup {directory} left"
    assert not state_dir.exists(), f"state directory {state_dir} left"


def test_cli_up_status_down_leaves_nothing() -> None:
    require_cluster_host()
    name = session_name("c")
    subnet = free_subnet(offset=50)
    common = ["--name", name]
    state: dict[str, object] = {}
    try:
        up = run_cli("up", *common, "-n", "2", "--subnet", subnet, "--no-fleetd")
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"{name}1" in up.stdout
        assert "sshd ready" in up.stdout
        state_file = Path("/run/fleet-cluster", name, "state.json")
        state = json.loads(state_file.read_text())

        again = run_cli("up", *common, "-n", "2", "--subnet", subnet, "--no-fleetd")
        assert again.returncode == 1
        assert "already exists" in again.stderr

        status = run_cli("status", *common, "--json")
        assert status.returncode == 0, status.stderr
        info = json.loads(status.stdout)
        assert [m["systemd"] for m in info["machines"]] == ["running", "running"]
        assert info["etcd"]["healthy"] is True

        ssh = run_cli("ssh", *common, "2", "cat", "/etc/machine-id")
        assert ssh.returncode == 0, ssh.stderr
        machines = state["machines"]
        assert isinstance(machines, list)
        assert ssh.stdout.strip() == machines[1]["machine_id"]
    finally:
        down = run_cli("down", *common)
    assert down.returncode == 0, down.stdout + down.stderr
    assert_nothing_left(name, state)
    second = run_cli("down", *common)
    assert second.returncode == 0, second.stderr
    assert run_cli("status", *common).returncode == 1


def boot_then_fail(name: str, error: type[BaseException], snapshot: dict[str, object]) -> None:
    with Cluster(
        name, 1, subnet=free_subnet(offset=75), fleetd=False, progress=progress_printer(name)
    ) as booted:
        assert booted.state is not None
        snapshot.update(json.loads(booted.state.to_json()))
        assert booted.exec(booted.machines[0], ["true"]).returncode == 0
        raise error()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_context_manager_tears_down_on_error(error: type[BaseException]) -> None:
    require_cluster_host()
    name = session_name("x")
    snapshot: dict[str, object] = {}
    with pytest.raises(error):
        boot_then_fail(name, error, snapshot)
    assert snapshot, "the cluster never came up"
    assert_nothing_left(name, snapshot)
