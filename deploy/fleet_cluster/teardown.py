"""Taking a cluster apart: every step is tried, whatever failed before it.

Leftovers are found by where they live, not only through the state file (which a crashed `up`
may not have finished writing): mounts below the state directory, machines by their cgroup
directories and machine directories, processes by the cgroup they are in or the paths they
name, the bridge by its name, etcd by its data directory.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from . import cgroups, etcd, machine, mounts, network, procs
from .state import ClusterState, Layout, MachineState

Report = Callable[[str, str], None]


def teardown(
    name: str,
    layout: Layout,
    state: ClusterState | None,
    bridge: str,
    *,
    grace: float,
    report: Report,
) -> list[str]:
    """Remove everything of cluster `name`; return what could not be removed (empty if all)."""
    problems: list[str] = []

    def attempt(what: str, action: Callable[[], object]) -> object:
        try:
            return action()
        except Exception as exc:  # any failure: note it and go on with the next step
            problems.append(f"{what}: {exc}")
            return None

    hierarchies: cgroups.Hierarchies | None = None
    try:
        hierarchies = cgroups.discover()
    except Exception as exc:
        problems.append(str(exc))

    known = {m.name: m for m in (state.machines if state else [])}
    names = set(known) | _machine_dirs_found(name, layout, hierarchies)
    if state is None and not names and not layout.root.exists():
        report("cluster", f"{name!r} is not up; checking for leftovers")

    # Pids we signal, to wait below until the host's init has reaped them.
    signalled = [p for m in known.values() for p in (m.nspawn_pid, m.init_pid) if p]

    def stop_one(machine_name: str) -> None:
        record = known.get(machine_name) or MachineState(machine_name, 0, "", "")
        dirs = cgroups.machine_dirs(hierarchies, name, machine_name) if hierarchies else []
        attempt(f"stop {machine_name}", lambda: machine.stop(layout, record, dirs, grace))
        record.status = "stopped"
        report(machine_name, "stopped")

    if names:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(names), 32)) as pool:
            list(pool.map(stop_one, sorted(names)))

    # Anything still naming our state directory (say an nspawn whose cgroup write failed).
    root_text = str(layout.root)
    stray = procs.find_processes(lambda argv: any(root_text in arg for arg in argv))
    signalled += stray
    if procs.terminate(stray, 1.0):
        problems.append(f"processes {stray} naming {root_text} would not die")

    for entry in mounts.under(layout.root):
        attempt(f"unmount {entry.target}", functools.partial(mounts.unmount, entry.target))
    if hierarchies is not None:
        for directory in cgroups.cluster_dirs(hierarchies, name):
            attempt(f"remove cgroup {directory}", functools.partial(cgroups.remove, directory))
        cgroups.remove_empty_parents(hierarchies, name)

    if attempt(f"delete bridge {bridge}", lambda: network.delete_bridge(bridge)):
        report("network", f"bridge {bridge} deleted")

    members = state.etcd_members if state else []
    etcd_pids = etcd.leftovers(layout) + [m.pid for m in members if m.pid > 0]
    left = attempt("stop etcd", lambda: etcd.stop(layout, members, grace))
    if left:
        problems.append(f"etcd pids {left} would not die")
    elif etcd_pids:
        report("etcd", "stopped")
    signalled += etcd_pids

    if mounts.under(layout.root):
        problems.append(f"not removing {layout.root}: something is still mounted below it")
    elif layout.root.exists():
        attempt(f"remove {layout.root}", lambda: shutil.rmtree(layout.root))
    with contextlib.suppress(OSError):
        layout.root.parent.rmdir()  # the state root, if no other cluster uses it

    _wait_reaped(signalled)
    return problems


def _machine_dirs_found(
    name: str, layout: Layout, hierarchies: cgroups.Hierarchies | None
) -> set[str]:
    """Machines that left a trace: a cgroup directory or a machine directory."""
    found: set[str] = set()
    places: list[Path] = [layout.root / "machines"]
    if hierarchies is not None:
        places += cgroups.cluster_dirs(hierarchies, name)
    for place in places:
        if place.is_dir():
            found |= {p.name for p in place.iterdir() if p.is_dir()}
    return found


def _wait_reaped(pids: list[int], timeout: float = 5.0) -> None:
    """Wait (briefly) until the killed processes are gone from /proc, not just dead.

    They are orphans of the host's init, which reaps them when it gets to it (every couple of
    seconds on some hosts); until then they show up in `pgrep` as `<defunct>`, which would make
    a check right after `down` see a cluster that is not there.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(procs.is_zombie(pid) for pid in pids):
        time.sleep(0.05)
