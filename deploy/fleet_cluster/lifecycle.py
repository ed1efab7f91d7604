"""A machine's life in the cluster: booted, killed, stopped, booted again, or joining late.

machine.py runs one container's processes; this is the sequence around them and what the
state records at each step: a boot goes nspawn, systemd running, network, etcd reachable,
sshd, then fleet (or cloud-init); every pid is saved as soon as it is known, so a `down` in
another process, or after a failed boot, finds it. Waits give up when the cluster's cancel
flag is set (Ctrl-C, or another machine of a parallel boot failing).
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable

from . import cgroups, cloud, fleet_service, install, machine, mounts, network, prereqs, procs, ssh
from .context import ClusterContext, MachineRef
from .errors import ClusterError
from .etcd_members import EtcdMembers
from .fleet_ops import FleetOps
from .provision import Provisioner
from .state import MachineState, locked


class Machines:
    def __init__(
        self,
        ctx: ClusterContext,
        provisioner: Provisioner,
        etcd_members: EtcdMembers,
        fleet: FleetOps,
    ) -> None:
        self._ctx = ctx
        self._provisioner = provisioner
        self._etcd = etcd_members
        self._fleet = fleet

    def parallel(self, work: Callable[[MachineState], None], items: list[MachineState]) -> None:
        """Run `work` for every machine at once; Ctrl-C cancels the others' waits."""
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(len(items), 32) or 1)
        futures = {pool.submit(work, item): item for item in items}
        try:
            concurrent.futures.wait(futures)
        except BaseException:
            self._ctx.cancel.set()
            raise
        finally:
            pool.shutdown(wait=True)
        errors = [(futures[f].name, f.exception()) for f in futures if f.exception() is not None]
        if errors:
            lines = "\n".join(f"  {name}: {exc}" for name, exc in errors)
            raise ClusterError(f"{len(errors)} machine(s) failed:\n{lines}")

    def boot(self, m: MachineState) -> None:
        """Boot a prepared machine: nspawn, systemd running, network, sshd, then fleetd."""
        ctx = self._ctx
        state = ctx.require_state()
        started = time.monotonic()

        def step(message: str) -> None:
            ctx.progress(m.name, f"{message} ({time.monotonic() - started:.2f} s)")

        dirs = ctx.cgroup_dirs(m.name)
        for directory in dirs:  # leftovers of a previous boot would confuse systemd
            cgroups.remove(directory)
        procs_files = cgroups.create(dirs)
        m.status = "booting"
        binds = list(state.binds)
        if state.wheels_dir:
            binds.append(f"{state.wheels_dir}:{install.MACHINE_WHEELS}")
        m.nspawn_pid = machine.launch(ctx.layout, m.name, state.bridge, binds, procs_files)
        ctx.save()
        step(f"systemd-nspawn started (pid {m.nspawn_pid})")
        m.init_pid = machine.find_init(
            ctx.layout, m.name, m.nspawn_pid, ctx.boot_timeout, ctx.cancel
        )
        ctx.save()
        system = machine.wait_running(ctx.layout, m, ctx.boot_timeout, ctx.cancel)
        step(f"systemd {system} (init pid {m.init_pid})")
        network.configure_machine(m.init_pid, m.ip, state.prefixlen, state.bridge_ip)
        m.veth = network.host_veth(m.init_pid)
        m.partitioned = False
        ctx.save()
        step(f"network {m.ip}/{state.prefixlen} via {state.bridge_ip} (host side {m.veth})")
        self._etcd.wait_reachable(m)
        step("etcd reachable from inside")
        self._start_sshd(m)
        step("sshd ready")
        m.status = "running"
        m.boot_seconds = round(time.monotonic() - started, 3)
        ctx.save()
        if state.cloud_config:
            self._run_cloud_init(m, step)
            return
        self._fleet.after_boot(m, step)

    def _run_cloud_init(self, m: MachineState, step: Callable[[str], None]) -> None:
        """cloud-init's stages, then what they started: etcd's member, fleetd.

        A machine booted again (same root) has run its user-data already: cloud-init skips
        the per-instance modules, and the services the user-data enabled are started as a
        full boot would (these machines boot basic.target, which does not want them).
        """
        ctx = self._ctx
        assert m.init_pid is not None
        ran_before = (ctx.layout.machine_root(m.name) / "var/lib/cloud/instance").exists()
        m.fleetd = "cloud-init running"
        ctx.save()
        status = cloud.run(m.init_pid, timeout=max(300.0, ctx.boot_timeout))
        step(f"cloud-init {status}")
        if ran_before:
            argv = ["systemctl", "start", "etcd.service", "fleet.socket", "fleet.service"]
            machine.exec_in(m.init_pid, argv, timeout=150)
        version = machine.exec_in(m.init_pid, ["fleetd", "--version"], timeout=30)
        m.fleet_version = install.version_of(version.stdout) or None
        m.fleetd = fleet_service.fleetd_state(m)
        ctx.save()
        step(f"fleetd {m.fleetd} (fleet {m.fleet_version})")

    def _start_sshd(self, m: MachineState) -> None:
        assert m.init_pid is not None
        machine.exec_in(
            m.init_pid,
            [
                "systemd-run",
                f"--unit={ssh.SSHD_UNIT}",
                "--description=sshd for fleet-cluster",
                "--property=RuntimeDirectory=sshd",
                "--property=RuntimeDirectoryMode=0755",
                "--property=Restart=on-failure",
                "/usr/sbin/sshd",
                "-D",
                "-e",
                "-f",
                f"/{ssh.SSHD_CONFIG}",
            ],
            check=True,
            timeout=20,
        )
        procs.wait_for(
            lambda: True if network.ssh_banner(m.ip) else None,
            10.0,
            f"sshd on {m.name} ({m.ip}:22)",
            cancel=self._ctx.cancel,
        )

    def kill(self, m: MachineRef) -> None:
        """SIGKILL a machine (as a crash would); its overlay is kept for `restart`."""
        ctx = self._ctx
        target = ctx.machine(m)
        with locked(ctx.layout):
            machine.kill(ctx.layout, target, ctx.cgroup_dirs(target.name))
            target.status = "killed"
            target.fleetd = None
            ctx.save()
        ctx.progress(target.name, "killed")

    def stop(self, m: MachineRef) -> None:
        """Shut a machine down cleanly (SIGKILL after the grace period); overlay kept."""
        ctx = self._ctx
        target = ctx.machine(m)
        with locked(ctx.layout):
            machine.stop(ctx.layout, target, ctx.cgroup_dirs(target.name), ctx.stop_grace)
            target.status = "stopped"
            target.fleetd = None
            ctx.save()
        ctx.progress(target.name, "stopped")

    def restart(self, m: MachineRef) -> None:
        """Boot a killed or stopped machine again (a running one is stopped first).

        Same overlay, so same machine-id, host key and whatever the machine wrote.
        """
        ctx = self._ctx
        target = ctx.machine(m)
        prereqs.check_host()
        if target.nspawn_pid is not None or target.init_pid is not None:
            self.stop(target)
        ctx.cancel.clear()
        with locked(ctx.layout):
            if not mounts.is_mounted(ctx.layout.machine_root(target.name)):
                # Unmounted by hand: the machine's writes are gone; give it its identity again.
                self._provisioner.prepare(target)
                self._provisioner.write_known_hosts()
            self.boot(target)
        ctx.progress(target.name, f"restarted in {target.boot_seconds:.2f} s")

    def join(self, new: MachineState) -> None:
        """Prepare and boot a machine just added to the state; the others (those with a root
        mounted) learn its name, and every machine its host key."""
        ctx = self._ctx
        self._provisioner.prepare(new)
        for other in ctx.require_state().machines:
            if other is not new and mounts.is_mounted(ctx.layout.machine_root(other.name)):
                self._provisioner.write_hosts(other)
        self._provisioner.write_known_hosts()
        self.boot(new)
