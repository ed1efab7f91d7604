"""The cluster's etcd: one member on the host, reachable from the machines at the bridge address."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from . import procs
from .errors import ClusterError
from .state import EtcdState, Layout


def command(
    layout: Layout, cluster: str, bridge_ip: str, client_port: int, peer_port: int
) -> list[str]:
    # Clients: the bridge address for the machines, loopback for the host's tools. Peers:
    # loopback only; a single member never talks to a peer, but etcd insists on the flags.
    peer = f"http://127.0.0.1:{peer_port}"
    return [
        "etcd",
        f"--name={cluster}",
        f"--data-dir={layout.etcd_data}",
        f"--listen-client-urls=http://{bridge_ip}:{client_port},http://127.0.0.1:{client_port}",
        f"--advertise-client-urls=http://{bridge_ip}:{client_port}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster={cluster}={peer}",
        f"--initial-cluster-token=fleet-cluster-{cluster}",
        "--initial-cluster-state=new",
        "--logger=zap",
    ]


def start(layout: Layout, cluster: str, bridge_ip: str, client_port: int, peer_port: int) -> int:
    layout.etcd_dir.mkdir(parents=True, exist_ok=True)
    argv = command(layout, cluster, bridge_ip, client_port, peer_port)
    return procs.spawn_detached(argv, log_path=layout.etcd_log, pid_path=layout.etcd_pid)


def healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            body = json.loads(response.read() or b"{}")
    except (OSError, urllib.error.URLError, ValueError):
        return False
    return str(body.get("health")) == "true"


def wait_healthy(layout: Layout, pid: int, url: str, timeout: float = 15.0) -> None:
    def probe() -> bool | None:
        if not procs.is_alive(pid):
            raise ClusterError(f"etcd exited during start:\n{procs.tail(layout.etcd_log)}")
        return True if healthy(url) else None

    procs.wait_for(probe, timeout, f"etcd at {url}", detail=lambda: procs.tail(layout.etcd_log))


def is_ours(pid: int, layout: Layout) -> bool:
    """A pid from the state file is ours only if it is still etcd on our data dir (pid reuse)."""
    argv = procs.cmdline(pid)
    return bool(argv) and Path(argv[0]).name == "etcd" and f"--data-dir={layout.etcd_data}" in argv


def leftovers(layout: Layout) -> list[int]:
    """etcd processes on our data dir, whether or not the state file knows them."""
    flag = f"--data-dir={layout.etcd_data}"
    return procs.find_processes(lambda argv: bool(argv) and flag in argv)


def stop(layout: Layout, etcd: EtcdState | None, grace: float = 5.0) -> list[int]:
    """Stop our etcd (SIGTERM, then SIGKILL after `grace`); return pids that would not die."""
    targets = set(leftovers(layout))
    if etcd is not None and is_ours(etcd.pid, layout):
        targets.add(etcd.pid)
    return procs.terminate(sorted(targets), grace)
