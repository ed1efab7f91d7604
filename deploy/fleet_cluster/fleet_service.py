"""fleetd in a machine: its fleet.conf, and fleetd run as a real systemd service there.

fleetd runs from the host's virtualenv (same OS, same paths: it runs unchanged inside) as the
transient unit `fleet.service`, started with systemd-run, so it is supervised, restarted and
journaled by the machine's own systemd exactly like a deployed fleetd.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ClusterError
from .machine import exec_in, require_running
from .state import MachineState

FLEET_UNIT = "fleet.service"
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


def start_fleetd(machine: MachineState, *, venv: str, settle: float = 2.0) -> FleetdStatus:
    """Start fleetd in `machine` as fleet.service; report whether it stayed up for `settle` s.

    A fleetd that fails is reported, not raised: the cluster is still useful. systemd retries
    it (Restart=on-failure) until its start limit, then leaves it failed; starting it again
    picks up the checkout as it is then (it is bound into the machine, not copied).
    """
    init_pid = require_running(machine)
    props = unit_properties(machine)
    if props.get("ActiveState") in ("active", "activating", "reloading"):
        return FleetdStatus(True, f"already {fleetd_state(machine)}")
    # A failed transient unit keeps its name until reset; a stopped one is already gone.
    exec_in(init_pid, ["systemctl", "reset-failed", FLEET_UNIT], timeout=10)
    done = exec_in(
        init_pid,
        [
            "systemd-run",
            f"--unit={FLEET_UNIT}",
            "--description=fleet daemon",
            "--property=Restart=on-failure",
            "--property=RestartSec=1s",
            "--setenv=PYTHONUNBUFFERED=1",
            f"{venv}/bin/fleetd",
        ],
        timeout=20,
    )
    if done.returncode != 0:
        return FleetdStatus(False, "not started", done.stderr.strip())
    return _watch(machine, settle)


def _watch(machine: MachineState, settle: float) -> FleetdStatus:
    """fleetd counts as up once it stays active/running, never restarted, for `settle` s."""
    deadline = time.monotonic() + settle
    while True:
        props = unit_properties(machine)
        state = f"{props.get('ActiveState', '?')}/{props.get('SubState', '?')}"
        restarted = props.get("NRestarts", "0") not in ("", "0")
        if restarted or props.get("ActiveState") == "failed" or props.get("SubState") == "dead":
            return FleetdStatus(False, f"failing ({state})", journal_tail(machine))
        if time.monotonic() >= deadline:
            if state == "active/running":
                return FleetdStatus(True, state)
            return FleetdStatus(False, state, journal_tail(machine))
        time.sleep(0.1)


def stop_fleetd(machine: MachineState) -> str:
    init_pid = require_running(machine)
    exec_in(init_pid, ["systemctl", "stop", FLEET_UNIT], timeout=120)
    return fleetd_state(machine)
