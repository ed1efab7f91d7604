"""The cluster's persisted state: one JSON file in the state directory, plus where things live.

Separate CLI invocations (`up`, then `kill`, then `down`) share nothing but this file, so it is
rewritten after every change (atomically: written aside, then renamed) and read under a lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import NoSuchMachine, PrerequisiteError

STATE_ROOT = Path("/run/fleet-cluster")
FORMAT_VERSION = 2


@dataclass
class MachineState:
    name: str
    index: int
    ip: str
    machine_id: str
    metadata: dict[str, str] = field(default_factory=dict)
    # new -> booting -> running; killed (SIGKILL, overlay kept) or stopped (graceful)
    status: str = "new"
    nspawn_pid: int | None = None
    init_pid: int | None = None
    veth: str | None = None
    partitioned: bool = False
    boot_seconds: float | None = None
    fleetd: str | None = None
    # The fleet version installed in the machine's venv (from the cluster's wheel), if any.
    fleet_version: str | None = None
    fleet_wheel: str | None = None

    @property
    def short(self) -> str:
        return f"m{self.index}"

    @property
    def running(self) -> bool:
        return self.status == "running" and self.init_pid is not None


@dataclass
class EtcdState:
    """One etcd member; `pid` is 0 while the member is stopped."""

    pid: int
    client_port: int
    peer_port: int
    index: int = 1


@dataclass
class ClusterState:
    name: str
    state_dir: str
    subnet: str
    bridge: str
    bridge_ip: str
    prefixlen: int
    agent_ttl: str | None
    etcd_key_prefix: str
    fleetd: bool
    binds: list[str]
    # The wheel new machines get (a file name in wheels_dir), or None: fleet not installed.
    wheel: str | None = None
    wheels_dir: str | None = None
    # Machines configured by cloud-init from this user-data (a copy in the state directory);
    # their etcd members are fleet's etcd, the host's etcd only their discovery service.
    cloud_config: str | None = None
    discovery_url: str | None = None
    etcd_members: list[EtcdState] = field(default_factory=list)
    machines: list[MachineState] = field(default_factory=list)
    version: int = FORMAT_VERSION

    @property
    def etcd(self) -> EtcdState | None:
        """The first etcd member (the only one, unless the cluster was made with more)."""
        return self.etcd_members[0] if self.etcd_members else None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ClusterState:
        raw: dict[str, Any] = json.loads(text)
        members = raw.pop("etcd_members", None)
        single = raw.pop("etcd", None)  # state written before etcd had members
        if members is None:
            members = [single] if single else []
        machines = raw.pop("machines", [])
        raw.pop("venv", None)  # format 1: machines ran the host's venv
        return cls(
            **raw,
            etcd_members=[EtcdState(**m) for m in members],
            machines=[MachineState(**m) for m in machines],
        )

    def machine(self, ref: str | int) -> MachineState:
        """Resolve `fleet2`, `m2`, `2` or `10.77.0.12` to that machine."""
        text = str(ref)
        for machine in self.machines:
            if text in (machine.name, machine.short, str(machine.index), machine.ip):
                return machine
        names = ", ".join(m.name for m in self.machines) or "none"
        raise NoSuchMachine(f"no machine {text!r} in cluster {self.name!r} (machines: {names})")


class Layout:
    """Where every file of one cluster lives, below its state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.root / "lock"

    @property
    def user_key(self) -> Path:
        return self.root / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def user_data(self) -> Path:
        return self.root / "user-data"

    @property
    def wheels_dir(self) -> Path:
        """fleet's wheel(s) and their dependencies, bound into every machine read-only."""
        return self.root / "wheels"

    @property
    def etcd_dir(self) -> Path:
        return self.root / "etcd"

    @property
    def etcd_data(self) -> Path:
        return self.etcd_dir / "data"

    @property
    def etcd_log(self) -> Path:
        return self.etcd_dir / "etcd.log"

    @property
    def etcd_pid(self) -> Path:
        return self.etcd_dir / "etcd.pid"

    # Member 1 keeps the single-member names above; further members get numbered ones.
    def etcd_member_data(self, index: int) -> Path:
        return self.etcd_data if index == 1 else self.etcd_dir / f"data-{index}"

    def etcd_member_log(self, index: int) -> Path:
        return self.etcd_log if index == 1 else self.etcd_dir / f"etcd-{index}.log"

    def etcd_member_pid(self, index: int) -> Path:
        return self.etcd_pid if index == 1 else self.etcd_dir / f"etcd-{index}.pid"

    def machine_dir(self, name: str) -> Path:
        return self.root / "machines" / name

    def machine_fs(self, name: str) -> Path:
        """The tmpfs that holds the overlay's upper and work directories."""
        return self.machine_dir(name) / "fs"

    def machine_root(self, name: str) -> Path:
        """The overlay mount: the machine's root file system."""
        return self.machine_dir(name) / "root"

    def nspawn_log(self, name: str) -> Path:
        return self.machine_dir(name) / "nspawn.log"

    def nspawn_pid(self, name: str) -> Path:
        return self.machine_dir(name) / "nspawn.pid"


def load(layout: Layout) -> ClusterState | None:
    try:
        return ClusterState.from_json(layout.state_file.read_text())
    except FileNotFoundError:
        return None
    except PermissionError as exc:
        raise PrerequisiteError(f"cannot read {layout.state_file} (run as root): {exc}") from exc


def save(layout: Layout, state: ClusterState) -> None:
    tmp = layout.state_file.with_suffix(".json.tmp")
    tmp.write_text(state.to_json())
    os.replace(tmp, layout.state_file)


_local = threading.local()


@contextlib.contextmanager
def locked(layout: Layout) -> Iterator[None]:
    """Serialise changes to one cluster across processes (flock), re-entrant within a thread."""
    depth: dict[Path, int] = getattr(_local, "depth", {})
    _local.depth = depth
    if depth.get(layout.root, 0) > 0 or not layout.root.is_dir():
        depth[layout.root] = depth.get(layout.root, 0) + 1
        try:
            yield
        finally:
            depth[layout.root] -= 1
        return
    with layout.lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        depth[layout.root] = 1
        try:
            yield
        finally:
            depth[layout.root] = 0
            fcntl.flock(handle, fcntl.LOCK_UN)
