"""A local multi-machine fleet cluster: etcd on the host, systemd-nspawn machines on a bridge.

    with Cluster(name="ftest", n=3, subnet="10.77.99.0/24", agent_ttl="3s") as cluster:
        cluster.exec(cluster.machines[0], ["systemctl", "is-system-running"])

See `fleet-cluster --help` for the command line.
"""

from __future__ import annotations

from .cluster import Cluster
from .context import Progress
from .errors import (
    ClusterError,
    ClusterExists,
    MachineNotRunning,
    NoSuchCluster,
    NoSuchMachine,
    PrerequisiteError,
    TeardownIncomplete,
)
from .fleet_service import FleetdStatus, fleetd_state, start_fleetd, stop_fleetd
from .options import parse_machine_metadata
from .state import MachineState

__all__ = [
    "Cluster",
    "ClusterError",
    "ClusterExists",
    "FleetdStatus",
    "MachineNotRunning",
    "MachineState",
    "NoSuchCluster",
    "NoSuchMachine",
    "PrerequisiteError",
    "Progress",
    "TeardownIncomplete",
    "fleetd_state",
    "parse_machine_metadata",
    "start_fleetd",
    "stop_fleetd",
]
