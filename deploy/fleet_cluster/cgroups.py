"""A cgroup of its own for every machine, in each hierarchy systemd uses.

With no systemd on the host, every systemd-nspawn otherwise leaves its machine in the launching
shell's cgroup, so all machines share `<cgroup>/payload/system.slice/<unit>`: a unit started in
one machine while another stops its namesake then fails with 219/CGROUP, and I/O errors show
up at random. So each machine gets `fleet-cluster/<cluster>/<machine>` in the `name=systemd` v1
hierarchy and in the v2 one, and nspawn is exec'd from a shell already moved into both.

The same directories are how a machine is killed for certain: nspawn and every process of the
container are in that subtree (what we run in it with nsenter stays in our own cgroup, but it
is in the container's pid namespace, so it dies with the container's init).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from . import mounts
from .errors import ClusterError, PrerequisiteError

TOP = "fleet-cluster"


@dataclass(frozen=True)
class Hierarchies:
    """Mount points of the hierarchies a machine's cgroup is made in."""

    systemd_v1: Path | None
    unified: Path | None

    def roots(self) -> list[Path]:
        return [p for p in (self.systemd_v1, self.unified) if p is not None]


def discover() -> Hierarchies:
    """Find the hierarchies; a host with only one of them (pure v1 or pure v2) uses that one,
    as systemd-nspawn does, since it picks the container's cgroup mode from the host's."""
    systemd_v1 = None
    unified = None
    for entry in mounts.table():
        options = entry.super_options.split(",")
        if entry.fstype == "cgroup" and "name=systemd" in options and systemd_v1 is None:
            systemd_v1 = entry.target
        elif entry.fstype == "cgroup2" and unified is None:
            unified = entry.target
    if systemd_v1 is None and unified is None:
        raise PrerequisiteError(
            "no name=systemd cgroup v1 hierarchy and no cgroup2 mount found; mount one, e.g. "
            "mount -t cgroup2 none /sys/fs/cgroup"
        )
    return Hierarchies(systemd_v1, unified)


def cluster_dirs(hierarchies: Hierarchies, cluster: str) -> list[Path]:
    return [root / TOP / cluster for root in hierarchies.roots()]


def machine_dirs(hierarchies: Hierarchies, cluster: str, machine: str) -> list[Path]:
    return [d / machine for d in cluster_dirs(hierarchies, cluster)]


def create(dirs: list[Path]) -> list[Path]:
    """Make the directories; return their cgroup.procs files (for the launching shell)."""
    for directory in dirs:
        directory.mkdir(parents=True, exist_ok=True)
    return [d / "cgroup.procs" for d in dirs]


def pids(directory: Path) -> set[int]:
    """Every process in the cgroup subtree at `directory`."""
    found: set[int] = set()
    if not directory.is_dir():
        return found
    for sub, _dirs, files in os.walk(directory):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError):
                text = (Path(sub) / "cgroup.procs").read_text()
                found.update(int(p) for p in text.split())
    return found


def kill(dirs: list[Path], timeout: float = 10.0) -> None:
    """SIGKILL everything in the subtrees and wait until they are empty.

    v2's cgroup.kill does it atomically (no fork can escape); in v1 we loop until empty.
    """
    deadline = time.monotonic() + timeout
    while True:
        left: set[int] = set()
        for directory in dirs:
            kill_file = directory / "cgroup.kill"
            if kill_file.exists():
                with contextlib.suppress(OSError):
                    kill_file.write_text("1")
            left |= pids(directory)
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() >= deadline:
            raise ClusterError(f"processes {sorted(left)} survived SIGKILL in {dirs}")
        time.sleep(0.05)


def remove(directory: Path, timeout: float = 10.0) -> None:
    """Remove a cgroup subtree bottom-up (rmdir only: cgroup files cannot be unlinked).

    A just-killed process may linger in cgroup.procs until it is reaped, making rmdir fail
    with EBUSY for a moment, hence the retries.
    """
    if not directory.exists():
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            for sub, _dirs, _files in os.walk(directory, topdown=False):
                os.rmdir(sub)
            return
        except FileNotFoundError:
            continue
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ClusterError(f"cannot remove cgroup {directory}: {exc}") from exc
            time.sleep(0.05)


def remove_empty_parents(hierarchies: Hierarchies, cluster: str) -> None:
    """Remove `fleet-cluster/<cluster>` and `fleet-cluster` where nothing else is left in them."""
    for root in hierarchies.roots():
        for directory in (root / TOP / cluster, root / TOP):
            with contextlib.suppress(FileNotFoundError, OSError):
                has_children = any(p.is_dir() for p in directory.iterdir())
                if not has_children:
                    os.rmdir(directory)
