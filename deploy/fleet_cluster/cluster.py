"""A local fleet cluster: etcd on the host, N systemd-nspawn machines on a bridge, fleetd in each.

`Cluster` is the library API (pytest fixtures use it) and what the CLI drives. Its state lives
in `<state root>/<name>/state.json` so that separate CLI invocations can operate one cluster.

It composes the parts, each with one job, over one shared context (context.py): the etcd
members (etcd_members.py), machine roots made ready to boot (provision.py), a machine's
lifecycle (lifecycle.py), fleet in the machines (fleet_ops.py), partitions (partition.py) and
the live status (status.py). What spans them is here: `up`, which builds them in order, and
`down`, which takes everything apart (teardown.py).

Teardown is the part that must never fail quietly: `down()` tries every step even when some
fail, finds leftovers by where they live (mounts under the state directory, processes in the
cluster's cgroups or naming its paths), not only through the state file, and reports whatever
it could not remove.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from . import cgroups, machine, network, options, prereqs, signals, ssh
from .context import ClusterContext, MachineRef, Progress, quiet
from .errors import (
    ClusterError,
    ClusterExists,
    NoSuchCluster,
    PrerequisiteError,
    TeardownIncomplete,
)
from .etcd_members import EtcdMembers
from .fleet_ops import FleetOps
from .fleet_service import FleetdStatus
from .lifecycle import Machines
from .partition import Partitions
from .provision import Provisioner, new_machine
from .state import STATE_ROOT, ClusterState, Layout, MachineState, load, locked
from .status import report
from .teardown import teardown


class Cluster:
    """A local cluster. `with Cluster(...) as c:` boots it and always tears it down."""

    def __init__(
        self,
        name: str = "fleet",
        n: int = 3,
        *,
        subnet: str = "10.77.0.0/24",
        agent_ttl: str | None = None,
        metadata: Mapping[str, Mapping[str, str]] | None = None,
        etcd_key_prefix: str = "/fleet/",
        fleetd: bool = True,
        etcd_port: int = 0,
        etcd_members: int = 1,
        binds: Sequence[str] = (),
        wheel: str | Path | None = None,
        install_fleet: bool | None = None,
        cloud_config: str | Path | None = None,
        state_root: Path = STATE_ROOT,
        progress: Progress | None = None,
        boot_timeout: float = 60.0,
        stop_grace: float = 5.0,
        fleetd_settle: float = 0.5,
        keep_on_failure: bool = False,
    ) -> None:
        options.check_sizes(name, n, etcd_members)
        self.name = name
        self.n = n
        self.subnet = network.parse_subnet(subnet)
        self.agent_ttl = agent_ttl
        self.metadata = options.machine_metadata(metadata, n, name)
        self.etcd_key_prefix = etcd_key_prefix
        self.fleetd = fleetd
        self.etcd_port = etcd_port
        self.etcd_members = etcd_members
        # Extra host paths every machine sees read-only at the same path (tests bind a probe).
        self.binds = list(binds)
        self.wheel = wheel
        # fleet is installed from its wheel in each machine when fleetd runs there, or on
        # request (a machine with fleet installed but fleetd not started).
        self.install_fleet = fleetd if install_fleet is None else install_fleet
        self.cloud_config = Path(cloud_config) if cloud_config is not None else None
        if self.cloud_config is not None:
            options.check_cloud_config(
                self.cloud_config,
                etcd_members=etcd_members,
                agent_ttl=agent_ttl,
                metadata=metadata,
                etcd_key_prefix=etcd_key_prefix,
                fleetd=fleetd,
            )
            # The user-data installs and starts fleet; the wheels must be there for it.
            self.install_fleet = True
        self.layout = Layout(state_root / name)
        self._ctx = ClusterContext(
            name,
            self.layout,
            progress=progress or quiet,
            boot_timeout=boot_timeout,
            stop_grace=stop_grace,
            fleetd_settle=fleetd_settle,
        )
        self.keep_on_failure = keep_on_failure
        try:
            self._ctx.state = load(self.layout)
        except PrerequisiteError:  # not root: every operation that needs it will say so
            self._ctx.state = None
        self._etcd = EtcdMembers(self._ctx)
        self._provisioner = Provisioner(self._ctx, self._etcd)
        self._fleet = FleetOps(self._ctx)
        self._machines = Machines(self._ctx, self._provisioner, self._etcd, self._fleet)
        self._partitions = Partitions(self._ctx, self._etcd)

    @classmethod
    def attach(
        cls, name: str = "fleet", *, state_root: Path = STATE_ROOT, progress: Progress | None = None
    ) -> Cluster:
        """The cluster `name` that an earlier `up` (maybe another process) left running."""
        state = load(Layout(state_root / name))
        if state is None:
            raise NoSuchCluster(f"no cluster {name!r} (no {state_root / name / 'state.json'})")
        cluster = cls(
            name,
            max(1, len(state.machines)),
            subnet=state.subnet,
            agent_ttl=state.agent_ttl,
            etcd_key_prefix=state.etcd_key_prefix,
            fleetd=state.fleetd,
            etcd_members=max(1, len(state.etcd_members)),
            binds=state.binds,
            state_root=state_root,
            progress=progress,
        )
        return cluster

    # -- what the parts share (kept here as attributes: callers read and set them) -------

    @property
    def state(self) -> ClusterState | None:
        """The cluster's recorded state, or None while it is not up."""
        return self._ctx.state

    @state.setter
    def state(self, value: ClusterState | None) -> None:
        self._ctx.state = value

    @property
    def progress(self) -> Progress:
        return self._ctx.progress

    @progress.setter
    def progress(self, value: Progress) -> None:
        self._ctx.progress = value

    @property
    def boot_timeout(self) -> float:
        return self._ctx.boot_timeout

    @boot_timeout.setter
    def boot_timeout(self, value: float) -> None:
        self._ctx.boot_timeout = value

    @property
    def stop_grace(self) -> float:
        return self._ctx.stop_grace

    @stop_grace.setter
    def stop_grace(self, value: float) -> None:
        self._ctx.stop_grace = value

    @property
    def fleetd_settle(self) -> float:
        return self._ctx.fleetd_settle

    @fleetd_settle.setter
    def fleetd_settle(self, value: float) -> None:
        self._ctx.fleetd_settle = value

    # -- what the cluster is -------------------------------------------------------------

    @property
    def bridge(self) -> str:
        return f"{self.name}br0"

    @property
    def machines(self) -> list[MachineState]:
        return list(self._ctx.require_state().machines)

    def machine(self, ref: MachineRef) -> MachineState:
        return self._ctx.machine(ref)

    @property
    def etcd_endpoint(self) -> str:
        """etcd's client URL as the machines (and the host) reach it: on the bridge.

        With several members, the first one's; `etcd_endpoints` names them all.
        """
        return self.etcd_endpoints[0]

    @property
    def etcd_endpoints(self) -> list[str]:
        """Every etcd member's client URL on the bridge (what fleetd's etcd_servers lists).

        In a cloud-config cluster, the members in the machines (on fleet's port 2379).
        """
        return self._etcd.endpoints()

    @property
    def ssh_key(self) -> Path:
        return self.layout.user_key

    @property
    def known_hosts(self) -> Path:
        return self.layout.known_hosts

    # -- up ------------------------------------------------------------------------------

    def up(self) -> None:
        """Boot the cluster. On any failure (or Ctrl-C) what was built is torn down again."""
        prereqs.check_host()
        if self.state is not None or self.layout.state_file.exists():
            raise ClusterExists(
                f"cluster {self.name!r} already exists (state in {self.layout.root}); "
                f"use it, or run `fleet-cluster down --name {self.name}` first"
            )
        # Checks that build nothing come first: failing them needs no teardown.
        self._ctx.hierarchies = cgroups.discover()
        network.check_free(self.subnet, self.bridge)
        self._ctx.cancel.clear()
        try:
            self._up()
        except BaseException as failure:
            self._ctx.cancel.set()
            if not self.keep_on_failure:
                self.progress("cluster", "boot failed; tearing down what was built")
                try:
                    self.down()
                except ClusterError as exc:
                    # Keep the boot failure as the error, but never hide a dirty teardown.
                    self.progress("cluster", str(exc))
                    failure.add_note(str(exc))
            raise

    def _up(self) -> None:
        started = time.monotonic()
        bridge_ip = network.bridge_address(self.subnet)
        self.layout.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.layout.root, 0o700)  # it holds the cluster's private SSH key
        state = ClusterState(
            name=self.name,
            state_dir=str(self.layout.root),
            subnet=str(self.subnet),
            bridge=self.bridge,
            bridge_ip=str(bridge_ip),
            prefixlen=self.subnet.prefixlen,
            agent_ttl=self.agent_ttl,
            etcd_key_prefix=self.etcd_key_prefix,
            fleetd=self.fleetd,
            binds=self.binds,
            machines=[
                new_machine(self.name, i, self.subnet, self.metadata) for i in range(1, self.n + 1)
            ],
            cloud_config=str(self.cloud_config) if self.cloud_config else None,
        )
        self.state = state
        with locked(self.layout):
            self._ctx.save()  # first thing: `down` can find whatever follows
            if self.install_fleet:
                self._fleet.stage_wheel(self.wheel)
            network.create_bridge(self.bridge, bridge_ip, self.subnet.prefixlen)
            self.progress("network", f"bridge {self.bridge} {bridge_ip}/{self.subnet.prefixlen}")
            self._etcd.create(self.etcd_members, self.etcd_port)
            if self.cloud_config is not None:
                self._provisioner.prepare_cloud(self.cloud_config)
            ssh.ensure_user_key(self.layout, self.name)
            self._machines.parallel(self._provisioner.prepare, state.machines)
            self._provisioner.write_known_hosts()
            self._machines.parallel(self._machines.boot, state.machines)
        took = time.monotonic() - started
        boots = ", ".join(f"{m.name} {m.boot_seconds:.2f} s" for m in state.machines)
        self.progress("cluster", f"{self.n} machine(s) up in {took:.2f} s (boot: {boots})")

    # -- etcd (etcd_members.py) ----------------------------------------------------------

    def start_etcd(self, members: Sequence[int] | None = None, timeout: float = 30.0) -> None:
        """Start stopped etcd members (all by default) on their data; wait until healthy."""
        self._etcd.start(members, timeout)

    def stop_etcd(self, members: Sequence[int] | None = None, *, kill: bool = False) -> None:
        """SIGTERM etcd members (all by default), or SIGKILL with `kill`; their data stays."""
        self._etcd.stop(members, kill=kill)

    def pause_etcd(self, members: Sequence[int] | None = None) -> None:
        """SIGSTOP etcd members (all by default): a stall; `resume_etcd` lets them go on."""
        self._etcd.pause(members)

    def resume_etcd(self, members: Sequence[int] | None = None) -> None:
        self._etcd.resume(members)

    def etcd_leader(self, among: Sequence[int] | None = None) -> int | None:
        """The raft leader's member index as the running members (of `among`) see it, or
        None (also while they disagree)."""
        return self._etcd.leader(among)

    # -- machines (lifecycle.py, partition.py) -------------------------------------------

    def exec(
        self,
        m: MachineRef,
        argv: Sequence[str],
        *,
        check: bool = False,
        timeout: float | None = 60.0,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside a machine (nsenter into all its namespaces): CompletedProcess[str]."""
        target = self.machine(m)
        init_pid = machine.require_running(target)
        return machine.exec_in(init_pid, argv, check=check, timeout=timeout, input_text=input_text)

    def ssh_argv(
        self, m: MachineRef, command: Sequence[str] = (), *, tty: bool = False
    ) -> list[str]:
        return ssh.client_argv(self.layout, self.machine(m).ip, command, tty=tty)

    def kill(self, m: MachineRef) -> None:
        """SIGKILL a machine (as a crash would); its overlay is kept for `restart`."""
        self._machines.kill(m)

    def stop(self, m: MachineRef) -> None:
        """Shut a machine down cleanly (SIGKILL after the grace period); overlay kept."""
        self._machines.stop(m)

    def restart(self, m: MachineRef) -> None:
        """Boot a killed or stopped machine again, on its overlay (a running one stops first)."""
        self._machines.restart(m)

    def add_machine(
        self, metadata: Mapping[str, str] | None = None, *, machine_id: str | None = None
    ) -> MachineState:
        """Boot one more machine (the next index and address) into the running cluster.

        It gets a new machine-id (or `machine_id`: a clone of another machine's, as a copied
        VM image would have), the cluster's default metadata (`*`) updated with `metadata`,
        and fleetd if the cluster runs fleetd; the others learn its name and host key. A
        machine that fails to boot stays in the state, so `down` removes it too.
        """
        state = self._ctx.require_state()
        if state.cloud_config:
            raise ClusterError(
                "a cloud-config cluster's etcd members found each other through discovery, "
                "which only bootstraps; adding a machine needs `etcdctl member add` first"
            )
        prereqs.check_host()
        self._ctx.cancel.clear()
        with locked(self.layout):
            index = max((m.index for m in state.machines), default=0) + 1
            new = new_machine(self.name, index, self.subnet, self.metadata)
            new.metadata.update(metadata or {})
            if machine_id is not None:
                new.machine_id = machine_id
            state.machines.append(new)
            self.n = len(state.machines)
            self._ctx.save()  # first: `down` finds the machine whatever happens next
            self._machines.join(new)
        self.progress(new.name, f"added in {new.boot_seconds:.2f} s")
        return new

    def partition(self, m: MachineRef) -> None:
        """Take a machine's host-side veth down; returns once the machine lost carrier."""
        self._partitions.partition(m)

    def heal(self, m: MachineRef) -> None:
        """Undo `partition`; returns once the machine reaches etcd on the bridge again."""
        self._partitions.heal(m)

    # -- fleet in the machines (fleet_ops.py) --------------------------------------------

    def start_fleetd(self, m: MachineRef) -> FleetdStatus:
        """Start fleet.service in a machine; a fleetd that fails is reported, not raised."""
        return self._fleet.start_fleetd(m)

    def restart_fleetd(self, m: MachineRef) -> FleetdStatus:
        """`systemctl restart fleet.service` in a machine (its units stay up)."""
        return self._fleet.restart_fleetd(m)

    def stop_fleetd(self, m: MachineRef) -> str:
        return self._fleet.stop_fleetd(m)

    def upgrade(
        self, machines: Sequence[MachineRef] = (), *, wheel: str | Path | None = None
    ) -> list[tuple[str, str, str]]:
        """Roll fleet to `wheel` (default: built from this checkout), one machine at a time;
        (machine, version before, version after) per machine. See `FleetOps.upgrade`."""
        return self._fleet.upgrade(machines, wheel=wheel)

    # -- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A live look at the cluster (processes, systemd and fleet state, etcd health)."""
        return report(self._ctx)

    # -- down ----------------------------------------------------------------------------

    def down(self) -> None:
        """Tear everything down; safe to repeat, and to run on a half-built cluster."""
        with signals.deferred():
            self._down()

    def _down(self) -> None:
        self._ctx.cancel.set()  # a boot still waiting in another thread gives up
        with locked(self.layout):
            self._teardown()

    def _teardown(self) -> None:
        state = self.state or load(self.layout)
        bridge = state.bridge if state else self.bridge
        problems = teardown(
            self.name, self.layout, state, bridge, grace=self.stop_grace, report=self.progress
        )
        self.state = None
        if problems:
            raise TeardownIncomplete(
                f"cluster {self.name!r} teardown left things behind:\n  " + "\n  ".join(problems)
            )
        self.progress("cluster", f"{self.name!r} is down")

    # -- context manager -----------------------------------------------------------------

    def __enter__(self) -> Cluster:
        self.up()  # tears down by itself when it fails
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.down()


__all__ = ["Cluster"]
