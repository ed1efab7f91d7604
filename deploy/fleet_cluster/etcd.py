"""The cluster's etcd: one or more members on the host, reachable from the machines at the
bridge address.

Members talk to each other on loopback; clients (the machines, the host's tools) use the
bridge address or loopback. A member can be stopped, killed and started again on its data
directory, which is how fault tests take etcd down, restart it, or kill its raft leader.
"""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from . import procs
from .errors import ClusterError
from .state import EtcdState, Layout


def member_name(cluster: str, index: int, members: int) -> str:
    # A single member keeps the cluster's name (as before members existed).
    return cluster if members == 1 else f"{cluster}-e{index}"


def command(
    layout: Layout,
    cluster: str,
    bridge_ip: str,
    member: EtcdState,
    peers: Sequence[EtcdState],
    *,
    discovery: bool = False,
) -> list[str]:
    # Clients: the bridge address for the machines, loopback for the host's tools. Peers:
    # loopback only (a single member never talks to a peer, but etcd insists on the flags).
    # With an existing data directory etcd ignores the --initial-* flags, so the same
    # command also restarts a member.
    def peer_url(m: EtcdState) -> str:
        return f"http://127.0.0.1:{m.peer_port}"

    initial = ",".join(f"{member_name(cluster, p.index, len(peers))}={peer_url(p)}" for p in peers)
    return [
        "etcd",
        f"--name={member_name(cluster, member.index, len(peers))}",
        f"--data-dir={layout.etcd_member_data(member.index)}",
        f"--listen-client-urls=http://{bridge_ip}:{member.client_port},"
        f"http://127.0.0.1:{member.client_port}",
        f"--advertise-client-urls=http://{bridge_ip}:{member.client_port}",
        f"--listen-peer-urls={peer_url(member)}",
        f"--initial-advertise-peer-urls={peer_url(member)}",
        f"--initial-cluster={initial}",
        f"--initial-cluster-token=fleet-cluster-{cluster}",
        "--initial-cluster-state=new",
        "--logger=zap",
        # The v2 API is what etcd's discovery protocol speaks (cloud-config clusters).
        *(["--enable-v2=true"] if discovery else []),
    ]


def start(
    layout: Layout,
    cluster: str,
    bridge_ip: str,
    member: EtcdState,
    peers: Sequence[EtcdState],
    *,
    discovery: bool = False,
) -> int:
    layout.etcd_dir.mkdir(parents=True, exist_ok=True)
    argv = command(layout, cluster, bridge_ip, member, peers, discovery=discovery)
    return procs.spawn_detached(
        argv,
        log_path=layout.etcd_member_log(member.index),
        pid_path=layout.etcd_member_pid(member.index),
    )


def local_url(member: EtcdState) -> str:
    return f"http://127.0.0.1:{member.client_port}"


def healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            body = json.loads(response.read() or b"{}")
    except (OSError, urllib.error.URLError, ValueError):
        return False
    return str(body.get("health")) == "true"


def status(url: str, timeout: float = 1.0) -> dict[str, str] | None:
    """A member's own id and the leader it knows ({"member": id, "leader": id}), or None.

    From the gRPC gateway's Maintenance.Status (etcd 3.4 serves it at /v3/).
    """
    request = urllib.request.Request(
        f"{url}/v3/maintenance/status",
        data=b"{}",
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read() or b"{}")
    except (OSError, urllib.error.URLError, ValueError):
        return None
    member = str(body.get("header", {}).get("member_id", ""))
    leader = str(body.get("leader", ""))
    if not member or leader in ("", "0"):
        return None
    return {"member": member, "leader": leader}


def wait_healthy(layout: Layout, member: EtcdState, timeout: float = 15.0) -> None:
    url = local_url(member)
    log = layout.etcd_member_log(member.index)

    def probe() -> bool | None:
        if not procs.is_alive(member.pid):
            raise ClusterError(
                f"etcd member {member.index} exited during start:\n{procs.tail(log)}"
            )
        return True if healthy(url) else None

    procs.wait_for(probe, timeout, f"etcd at {url}", detail=lambda: procs.tail(log))


def is_ours(pid: int, layout: Layout) -> bool:
    """A pid from the state file is ours only if it is still etcd on our data dir (pid reuse)."""
    argv = procs.cmdline(pid)
    return bool(argv) and Path(argv[0]).name == "etcd" and _names_our_data(argv, layout)


def _names_our_data(argv: Sequence[str], layout: Layout) -> bool:
    prefix = f"--data-dir={layout.etcd_dir}/"
    return any(arg.startswith(prefix) for arg in argv)


def running(member: EtcdState, layout: Layout) -> bool:
    return member.pid > 0 and procs.is_alive(member.pid) and is_ours(member.pid, layout)


def leftovers(layout: Layout) -> list[int]:
    """etcd processes on our data dirs, whether or not the state file knows them."""
    return procs.find_processes(lambda argv: bool(argv) and _names_our_data(argv, layout))


def pause(member: EtcdState, layout: Layout, *, resume: bool = False) -> None:
    """SIGSTOP one member (a VM pause, a disk stall, a long GC from the outside), or SIGCONT
    it with `resume`. Only a member that is ours and running is signalled."""
    if running(member, layout):
        procs.signal_pids([member.pid], signal.SIGCONT if resume else signal.SIGSTOP)


def kill(member: EtcdState, layout: Layout) -> None:
    """SIGKILL one member (as a crash would) and wait until it is gone."""
    if running(member, layout):
        procs.signal_pids([member.pid], signal.SIGKILL)
        procs.wait_for(
            lambda: None if procs.is_alive(member.pid) else True,
            5.0,
            f"etcd member {member.index} (pid {member.pid}) to die",
        )


def stop_member(member: EtcdState, layout: Layout, grace: float = 5.0) -> list[int]:
    """SIGTERM one member (SIGKILL after `grace`); return pids that would not die."""
    if not running(member, layout):
        return []
    return procs.terminate([member.pid], grace)


def stop(layout: Layout, members: Sequence[EtcdState], grace: float = 5.0) -> list[int]:
    """Stop all our etcd members (SIGTERM, then SIGKILL after `grace`); return survivors."""
    targets = set(leftovers(layout))
    targets |= {m.pid for m in members if m.pid > 0 and is_ours(m.pid, layout)}
    return procs.terminate(sorted(targets), grace)
