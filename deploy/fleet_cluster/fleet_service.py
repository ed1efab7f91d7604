"""fleetd in a machine: its fleet.conf, and fleetd run as a real systemd service there.

fleetd runs exactly as deployed: the machine installed fleet's wheel in its own venv
(`install`), which put fleet.service (Type=notify, watchdog) and fleet.socket (the API on
/var/run/fleet.sock, socket-activated) from the installed package in /etc/systemd/system and
linked /usr/local/bin/fleetd to the venv. The machine's own systemd supervises, restarts and
journals it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ClusterError
from .machine import exec_in, require_running
from .state import MachineState

FLEET_UNIT = "fleet.service"
FLEET_SOCKET = "fleet.socket"
FLEET_CONF = "etc/fleet/fleet.conf"


def _quote(value: str) -> str:
    # fleet.conf cuts a bare value at `#` or `;`; a double-quoted one is taken whole.
    if '"' in value or "\n" in value:
        raise ClusterError(f"fleet.conf value {value!r} may not contain quotes or newlines")
    return f'"{value}"'


def fleet_conf(
    *,
    machine: str,
    etcd_servers: list[str],
    public_ip: str,
    metadata: Mapping[str, str],
    agent_ttl: str | None,
    etcd_key_prefix: str | None,
) -> str:
    lines = [
        f"# Written by fleet-cluster for machine {machine}.",
        f"etcd_servers={_quote(','.join(etcd_servers))}",
        f"public_ip={_quote(public_ip)}",
    ]
    if etcd_key_prefix:
        lines.append(f"etcd_key_prefix={_quote(etcd_key_prefix)}")
    if metadata:
        lines.append(f"metadata={_quote(format_metadata(metadata))}")
    if agent_ttl:
        lines.append(f"agent_ttl={_quote(agent_ttl)}")
    return "\n".join(lines) + "\n"


def format_metadata(metadata: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in metadata.items())


def parse_metadata(text: str) -> dict[str, str]:
    """`k=v,k2=v2` (fleet's syntax) into a dict; a pair without `=` is an error here."""
    found: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ClusterError(f"bad metadata pair {pair!r}: want key=value")
        found[key.strip()] = value.strip()
    return found


@dataclass(frozen=True)
class FleetdStatus:
    """How a start of fleetd went: `ok` once it stayed up through the settle period."""

    ok: bool
    state: str
    detail: str = ""

    @property
    def summary(self) -> str:
        """One line: the unit's state, prefixed with FAILED when fleetd did not stay up."""
        return self.state if self.ok else f"FAILED ({self.state})"

    def __str__(self) -> str:
        return self.summary if self.ok else f"{self.summary}\n{self.detail}".rstrip()


def unit_properties(machine: MachineState, unit: str = FLEET_UNIT) -> dict[str, str]:
    init_pid = require_running(machine)
    done = exec_in(
        init_pid,
        ["systemctl", "show", unit, "--property=LoadState,ActiveState,SubState,NRestarts,Result"],
        timeout=10,
    )
    pairs = (line.partition("=") for line in done.stdout.splitlines())
    return {key: value for key, _, value in pairs}


def fleetd_state(machine: MachineState) -> str:
    """`active/running`, `inactive/dead`, `activating/auto-restart`, ... of fleet.service."""
    props = unit_properties(machine)
    if props.get("LoadState") == "not-found":
        return "not started"
    return f"{props.get('ActiveState', '?')}/{props.get('SubState', '?')}"


def journal_tail(machine: MachineState, lines: int = 15) -> str:
    init_pid = require_running(machine)
    done = exec_in(
        init_pid,
        ["journalctl", "-u", FLEET_UNIT, "-n", str(lines), "--no-pager", "-o", "cat"],
        timeout=10,
    )
    return done.stdout.strip()


def start_fleetd(machine: MachineState, *, settle: float = 0.5) -> FleetdStatus:
    """Start fleet.socket and fleet.service in `machine`, as `systemctl start` would on a host.

    fleet.service is Type=notify: `systemctl start` returns once fleetd said READY=1, so only a
    short `settle` check follows (that it did not crash right after). A fleetd that fails is
    reported, not raised: the cluster is still useful. systemd restarts it (Restart=always).
    """
    props = unit_properties(machine)
    if props.get("ActiveState") in ("active", "activating", "reloading"):
        return FleetdStatus(True, f"already {fleetd_state(machine)}")
    return _systemctl_then_watch(machine, "start", (FLEET_SOCKET, FLEET_UNIT), settle)


def restart_fleetd(machine: MachineState, *, settle: float = 0.5) -> FleetdStatus:
    """`systemctl restart fleet.service`: what an upgrade does once the new fleetd is installed.

    fleetd sees the pending restart job and exits leaving its units running and its lease
    alive; the new process adopts both. The units are reloaded first (the new wheel's).
    """
    return _systemctl_then_watch(machine, "restart", (FLEET_UNIT,), settle)


def _systemctl_then_watch(
    machine: MachineState, verb: str, units: tuple[str, ...], settle: float
) -> FleetdStatus:
    """daemon-reload (the unit files may be new), `systemctl VERB UNITS`, then `_watch`."""
    init_pid = require_running(machine)
    exec_in(init_pid, ["systemctl", "reset-failed", *units], timeout=10)
    reload = exec_in(init_pid, ["systemctl", "daemon-reload"], timeout=60)
    if reload.returncode != 0:
        return FleetdStatus(False, f"not {verb}ed", reload.stderr.strip())
    before = unit_properties(machine).get("NRestarts", "0")
    done = exec_in(init_pid, ["systemctl", verb, *units], timeout=150)
    if done.returncode != 0:
        detail = f"{done.stderr.strip()}\n{journal_tail(machine)}".strip()
        return FleetdStatus(False, f"failing ({fleetd_state(machine)})", detail)
    return _watch(machine, settle, restarts=before)


def _watch(machine: MachineState, settle: float, restarts: str) -> FleetdStatus:
    """fleetd counts as up once it stays active/running, not restarted since the count was
    `restarts`, for `settle` s."""
    deadline = time.monotonic() + settle
    while True:
        props = unit_properties(machine)
        state = f"{props.get('ActiveState', '?')}/{props.get('SubState', '?')}"
        restarted = props.get("NRestarts", "0") not in ("", "0", restarts)
        if restarted or props.get("ActiveState") == "failed" or props.get("SubState") == "dead":
            return FleetdStatus(False, f"failing ({state})", journal_tail(machine))
        if time.monotonic() >= deadline:
            if state == "active/running":
                return FleetdStatus(True, state)
            return FleetdStatus(False, state, journal_tail(machine))
        time.sleep(0.1)


def stop_fleetd(machine: MachineState) -> str:
    init_pid = require_running(machine)
    # fleet.socket is PartOf=fleet.service: it stops too, so no API client revives fleetd.
    exec_in(init_pid, ["systemctl", "stop", FLEET_UNIT, FLEET_SOCKET], timeout=200)
    return fleetd_state(machine)
