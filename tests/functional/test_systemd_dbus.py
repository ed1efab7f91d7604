"""DBusUnitManager against real systemd, inside one throw-away systemd-nspawn machine.

The machine is a one-machine `fleet_cluster` with fleet installed from its wheel but fleetd
not started (so nothing else touches /run/fleet/units in it): the host's OS on an overlay root,
booting real systemd with its own cgroups. systemd_dbus_probe.py (bound in) runs inside it with
the machine's venv python, drives the installed fleetd's manager on the machine's system bus
(and on root's user bus), and prints what it saw as JSON; the assertions are here. The cluster
is always torn down, and the teardown is checked.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_fixture import cluster_unavailable_reason, free_subnet, progress_printer, session_name
from fleet_cluster import Cluster
from fleet_cluster.install import MACHINE_VENV

_reason = cluster_unavailable_reason()
pytestmark = [
    pytest.mark.functional,
    pytest.mark.skipif(_reason is not None, reason=_reason or ""),
]

PROBE = Path(__file__).with_name("systemd_dbus_probe.py")
NOT_FOUND = ["not-found", "inactive", "dead", 0]
LOADED = ["loaded", "inactive", "dead", 0]
RUNNING = ["loaded", "active", "running", 0]
FAILED = ["loaded", "failed", "failed", 0]
MANY = 50


@pytest.fixture(scope="module")
def machine() -> Iterator[tuple[Cluster, str]]:
    """(cluster, machine name): one machine, no fleetd; its own name and subnet."""
    name = session_name("d")
    cluster = Cluster(
        name=name,
        n=1,
        fleetd=False,
        install_fleet=True,
        binds=[str(PROBE.parent)],
        subnet=free_subnet(1),
        progress=progress_printer(name),
    )
    with cluster:
        booted = cluster.machines[0]
        pids = [booted.nspawn_pid, booted.init_pid]
        yield cluster, booted.name
    _assert_nothing_left(cluster, pids)


def _assert_nothing_left(cluster: Cluster, pids: list[int | None]) -> None:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        mounts = [line.split()[4] for line in f]
    root = str(cluster.layout.root)
    assert not [p for p in mounts if p.startswith(root)], "mounts left behind"
    assert not cluster.layout.root.exists(), f"{root} left behind"
    assert not Path(f"/sys/class/net/{cluster.bridge}").exists(), "bridge left behind"
    for pid in pids:
        assert pid is not None
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} still running"


def _probe(machine: tuple[Cluster, str], *args: str, env: tuple[str, ...] = ()) -> dict[str, Any]:
    cluster, name = machine
    argv = ["env", *env, f"{MACHINE_VENV}/bin/python", str(PROBE), *args]
    done = cluster.exec(name, argv, timeout=240)
    if done.returncode != 0:
        pytest.fail(f"probe failed ({done.returncode}):\n{done.stderr}")
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"probe printed no JSON:\n{done.stdout}\n{done.stderr}")
    return result


@pytest.fixture(scope="module")
def system(machine: tuple[Cluster, str]) -> dict[str, Any]:
    return _probe(machine, "--many", str(MANY))


@pytest.fixture(scope="module")
def user(machine: tuple[Cluster, str]) -> dict[str, Any]:
    cluster, name = machine
    cluster.exec(name, ["systemctl", "start", "user@0.service"], check=True)
    return _probe(machine, "--user", env=("XDG_RUNTIME_DIR=/run/user/0",))


def _section(result: dict[str, Any], name: str) -> dict[str, Any]:
    section: dict[str, Any] = result[name]
    assert "exception" not in section, section["exception"]
    return section


def test_lifecycle(system: dict[str, Any]) -> None:
    s = _section(system, "lifecycle")
    # load: the file lands in the units dir (0644) and is linked into /run/systemd/system.
    assert s["file_mode"] == "0o644"
    assert s["link"] == "/run/fleet/units/hello.service"
    assert s["file_state"] == "linked-runtime"
    assert s["unit_files"] == ["hello.service"]
    assert s["after_load"] == LOADED
    # start: the job is done, systemd reports it running, with a main process.
    assert s["start_result"] == "done"
    assert s["after_start"] == RUNNING
    assert s["start_to_active_poll_s"] is not None
    assert s["main_pid"] > 0
    assert s["main_pid_comm"] == "sleep"
    assert s["main_pid_not_service"] == 0
    # stop
    assert s["stop_result"] == "done"
    assert s["after_stop"] == LOADED
    assert s["main_pid_after_stop"] == 0
    # unload (of a running unit): file and link gone, systemd no longer knows it.
    assert s["file_after_unload"] is False
    assert s["link_after_unload"] is False
    assert s["after_unload"] == NOT_FOUND


def test_watch_reports_transitions(system: dict[str, Any]) -> None:
    s = _section(system, "lifecycle")
    assert s["start_to_active_watch_s"] is not None, "watch missed active/running"
    assert s["stop_watch_s"] is not None, "watch missed inactive/dead"
    events = s["watch_events"]
    # First the unit's state once loaded (after the daemon-reload), then each change;
    # transient states (deactivating) may be coalesced away, the end states may not.
    assert events[0] == ["loaded", "inactive", "dead"]
    assert ["loaded", "active", "running"] in events
    assert events[-1] == ["loaded", "inactive", "dead"]
    assert all(a != b for a, b in itertools.pairwise(events)), "repeated state"
    assert system["watch_ended"] is True
    assert system["watch_error"] is None


def test_install_section_enables_at_runtime(system: dict[str, Any]) -> None:
    s = _section(system, "install")
    assert s["wants_link"] == "/run/fleet/units/inst.service"
    assert s["file_state"] == "enabled-runtime"
    assert s["after_start"] == RUNNING
    assert s["wants_after_unload"] is False
    assert s["after_unload"] == NOT_FOUND


def test_failed_enable_leaves_nothing(system: dict[str, Any]) -> None:
    s = _section(system, "install")
    assert s["enable_error"].startswith(
        "UnitManagerError: Failed to enable systemd unit badalias.service: "
    )
    assert s["enable_error_file_left"] is False
    assert s["enable_error_link_left"] is False


def test_failing_unit_shows_failed_and_unload_resets_it(system: dict[str, Any]) -> None:
    s = _section(system, "failing")
    # Type=simple: the job is done once forked; the failure shows in the state.
    assert s["start_result"] == "done"
    assert s["after_start"] == FAILED
    assert s["failed_watch_s"] is not None
    assert s["stop_failed_result"] == "done"
    assert s["after_stop_failed"] == FAILED  # stopping does not clear a failure
    assert s["file_after_unload"] is False
    assert s["after_unload_no_reload"] == NOT_FOUND
    assert s["after_unload"] == NOT_FOUND
    # Type=exec: the exec failure is the start job's own result.
    assert s["exec_start_result"] == "failed"
    assert s["exec_after_start"] == FAILED
    assert s["exec_after_unload"] == NOT_FOUND


def test_own_job_type(system: dict[str, Any]) -> None:
    s = _section(system, "own_job")
    assert s["idle"] is None
    assert s["during_restart"] == "restart"
    assert s["state_during_restart"][:2] == ["loaded", "deactivating"]
    assert s["restart_s"] is not None
    assert s["after_restart_job"] is None
    assert s["after_restart"] == RUNNING
    assert s["during_stop"] == "stop"
    assert s["after_unload"] == NOT_FOUND


def test_refusals(system: dict[str, Any]) -> None:
    s = _section(system, "refusals")
    for bad in ("'../evil.service'", "'a/b.service'", "'..'", "'x\\x00.service'", "''"):
        assert s[bad] is not None, bad
        assert s[bad].startswith("UnitManagerError: "), bad
    assert s["escaped_written"] is False
    assert s["start_unknown"].startswith("NoSuchUnitError: ")
    assert s["stop_unknown"].startswith("NoSuchUnitError: ")
    assert s["unload_unknown"] is None  # unload is idempotent
    assert s["states_unknown"] == NOT_FOUND


def test_many_units(system: dict[str, Any]) -> None:
    s = _section(system, "many")
    assert s["active"] == MANY
    print(json.dumps(s, indent=1))  # figures, not assertions (see -s)


def test_nothing_left_in_units_dir(system: dict[str, Any]) -> None:
    assert system["left_in_units_dir"] == []


def test_user_bus(user: dict[str, Any]) -> None:
    assert user["units_dir"] == "/run/user/0/fleet/units"
    s = _section(user, "lifecycle")
    assert s["link"] == "/run/user/0/fleet/units/hello.service"
    assert s["after_start"] == RUNNING
    assert s["main_pid"] > 0
    assert s["after_unload"] == NOT_FOUND
    assert s["start_to_active_watch_s"] is not None
    assert _section(user, "install")["file_state"] == "enabled-runtime"
    assert _section(user, "failing")["after_start"] == FAILED
    assert _section(user, "own_job")["during_restart"] == "restart"
    assert user["left_in_units_dir"] == []
