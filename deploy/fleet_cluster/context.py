"""What every part of one cluster works on: its name, files, state, progress and cancel flag.

`Cluster` (cluster.py) composes the parts (etcd members, machine roots, machine lifecycle,
fleet in the machines, partitions, status); they share one `ClusterContext` rather than each
other, so the state they change is one object, saved one way, and a cancel set by one (Ctrl-C
during a parallel boot, a failed `up`) is seen by every wait of the others.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from . import cgroups
from .errors import NoSuchCluster
from .state import ClusterState, Layout, MachineState, save

Progress = Callable[[str, str], None]
"""Called as progress(subject, message): subject is a machine name, "etcd", "network"..."""

MachineRef = MachineState | str | int


def quiet(subject: str, message: str) -> None:
    del subject, message


class ClusterContext:
    """The shared part of one cluster's parts. `state` is None while the cluster is not up."""

    def __init__(
        self,
        name: str,
        layout: Layout,
        *,
        progress: Progress,
        boot_timeout: float,
        stop_grace: float,
        fleetd_settle: float,
    ) -> None:
        self.name = name
        self.layout = layout
        self.progress = progress
        self.boot_timeout = boot_timeout
        self.stop_grace = stop_grace
        self.fleetd_settle = fleetd_settle
        self.state: ClusterState | None = None
        # Set to make every wait of a boot in progress give up (see procs.wait_for).
        self.cancel = threading.Event()
        self._save_lock = threading.Lock()
        self.hierarchies: cgroups.Hierarchies | None = None

    def require_state(self) -> ClusterState:
        if self.state is None:
            raise NoSuchCluster(f"cluster {self.name!r} is not up")
        return self.state

    def machine(self, ref: MachineRef) -> MachineState:
        if isinstance(ref, MachineState):
            return ref
        return self.require_state().machine(ref)

    def save(self) -> None:
        # Machines boot in parallel threads, each saving as it goes.
        with self._save_lock:
            if self.state is not None and self.layout.root.is_dir():
                save(self.layout, self.state)

    def cgroup_dirs(self, machine_name: str) -> list[Path]:
        if self.hierarchies is None:
            self.hierarchies = cgroups.discover()
        return cgroups.machine_dirs(self.hierarchies, self.name, machine_name)
