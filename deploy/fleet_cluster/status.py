"""A live look at a cluster: its state file's record, checked against what runs.

A machine the state calls running whose init is gone shows as `dead`; systemd's and fleetd's
state are asked of each live machine, etcd's health of each member. Nothing is changed.
"""

from __future__ import annotations

from typing import Any

from . import etcd, machine, procs
from .context import ClusterContext
from .errors import ClusterError
from .fleet_service import fleetd_state


def report(ctx: ClusterContext) -> dict[str, Any]:
    """Machines (processes, systemd and fleet state) and etcd members (health), as a dict."""
    state = ctx.require_state()
    machines = []
    for m in state.machines:
        alive = m.init_pid is not None and procs.is_alive(m.init_pid)
        entry: dict[str, Any] = {
            "name": m.name,
            "status": m.status if alive or m.status != "running" else "dead",
            "ip": m.ip,
            "machine_id": m.machine_id,
            "nspawn_pid": m.nspawn_pid,
            "init_pid": m.init_pid,
            "veth": m.veth,
            "partitioned": m.partitioned,
            "metadata": m.metadata,
            "boot_seconds": m.boot_seconds,
            "fleet_version": m.fleet_version,
            "systemd": "-",
            "fleet": "-",
        }
        if alive and m.init_pid is not None:
            entry["systemd"] = machine.system_state(m.init_pid)
            try:
                entry["fleet"] = fleetd_state(m)
            except ClusterError as exc:
                entry["fleet"] = f"unknown ({exc})"
        machines.append(entry)
    etcd_info: dict[str, Any] = {"endpoint": None, "pid": None, "healthy": False}
    members = [
        {
            "index": m.index,
            "endpoint": f"http://{state.bridge_ip}:{m.client_port}",
            "pid": m.pid,
            "healthy": etcd.running(m, ctx.layout) and etcd.healthy(etcd.local_url(m)),
        }
        for m in state.etcd_members
    ]
    if members:
        etcd_info = {**members[0], "members": members}
    return {
        "name": state.name,
        "state_dir": state.state_dir,
        "bridge": state.bridge,
        "bridge_ip": f"{state.bridge_ip}/{state.prefixlen}",
        "etcd": etcd_info,
        "etcd_key_prefix": state.etcd_key_prefix,
        "agent_ttl": state.agent_ttl,
        "machines": machines,
    }
