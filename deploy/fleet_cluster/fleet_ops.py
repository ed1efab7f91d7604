"""fleet in the cluster's machines, as the cluster records it: its wheel staged for them,
installed in them, rolled to a new version one machine at a time; fleetd started, restarted
and stopped.

install.py and fleet_service.py do each step in one machine; this decides which wheel a
machine gets, keeps the state in step (`wheel`, each machine's `fleet_version` and `fleetd`)
and says what happened.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from . import fleet_service, install, machine, procs
from .context import ClusterContext, MachineRef
from .errors import ClusterError
from .fleet_service import FleetdStatus
from .state import MachineState, locked


class FleetOps:
    def __init__(self, ctx: ClusterContext) -> None:
        self._ctx = ctx

    def stage_wheel(self, wheel: str | Path | None) -> install.WheelInfo:
        """Put fleet's wheel (given, or built from this checkout) and its dependencies in the
        folder the machines install from; it becomes what new machines get."""
        ctx = self._ctx
        state = ctx.require_state()
        started = time.monotonic()
        info = install.resolve_wheel(wheel, ctx.layout.root / "build")
        state.wheels_dir = str(ctx.layout.wheels_dir)
        state.wheel = install.stage(info, ctx.layout.wheels_dir)
        ctx.save()
        took = time.monotonic() - started
        ctx.progress("cluster", f"fleet {info.version} staged ({info.path.name}, {took:.2f} s)")
        return info

    def install(self, m: MachineState, wheel: str) -> None:
        """Install the staged wheel `wheel` in a running machine's own venv."""
        init_pid = machine.require_running(m)
        m.fleet_version = install.install_in(init_pid, wheel)
        m.fleet_wheel = wheel
        self._ctx.save()

    def after_boot(self, m: MachineState, step: Callable[[str], None]) -> None:
        """fleet in a machine that just booted: installed (once per root), fleetd started
        if the cluster runs it. A broken fleetd is reported, never fails the boot."""
        state = self._ctx.require_state()
        # Installed once per machine root: a restarted machine keeps its venv (and version).
        root = self._ctx.layout.machine_root(m.name)
        if state.wheel and not (root / install.MACHINE_VENV.lstrip("/") / "bin/fleetd").exists():
            self.install(m, state.wheel)
            step(f"fleet {m.fleet_version} installed from {state.wheel}")
        if state.fleetd:
            try:
                status = self.start_fleetd(m)
            except ClusterError as exc:  # a broken fleetd must not fail the boot
                status = FleetdStatus(False, "error", str(exc))
                m.fleetd = status.summary
            detail = "\n".join(status.detail.splitlines()[-8:])
            step(f"fleetd {status.summary}" + ("" if status.ok else f"\n{detail}"))

    def start_fleetd(self, m: MachineRef) -> FleetdStatus:
        target = self._ctx.machine(m)
        if self._ctx.require_state().wheel is None:
            raise ClusterError(
                f"cluster {self._ctx.name!r} was booted with --no-fleetd: fleet is not installed "
                f"in {target.name} (boot the cluster without --no-fleetd)"
            )
        status = fleet_service.start_fleetd(target, settle=self._ctx.fleetd_settle)
        self._record(target, status.summary)
        return status

    def restart_fleetd(self, m: MachineRef) -> FleetdStatus:
        """`systemctl restart fleet.service` (units stay up), or a start if it was not running."""
        target = self._ctx.machine(m)
        status = fleet_service.restart_fleetd(target, settle=self._ctx.fleetd_settle)
        self._record(target, status.summary)
        return status

    def stop_fleetd(self, m: MachineRef) -> str:
        target = self._ctx.machine(m)
        result = fleet_service.stop_fleetd(target)
        self._record(target, result)
        return result

    def _record(self, target: MachineState, fleetd: str) -> None:
        """What fleetd in `target` is now, in the state (`fleet-cluster status` shows it)."""
        target.fleetd = fleetd
        self._ctx.save()

    def upgrade(
        self, machines: Sequence[MachineRef] = (), *, wheel: str | Path | None = None
    ) -> list[tuple[str, str, str]]:
        """Roll fleet to `wheel` (default: built from this checkout), one machine at a time.

        Each machine gets the wheel in its venv, then `systemctl restart fleet.service` (which
        fleetd tells from a stop: its units keep running, its lease and placements stay) and
        must be back active before the next one is touched; a machine whose fleetd does not
        come back stops the roll there. New machines get the new wheel from then on.
        Returns (machine, version before, version after) per machine.
        """
        ctx = self._ctx
        state = ctx.require_state()
        targets = [ctx.machine(r) for r in machines] or list(state.machines)
        for target in targets:
            machine.require_running(target)
        with locked(ctx.layout):
            info = self.stage_wheel(wheel)
            assert state.wheel is not None
            done: list[tuple[str, str, str]] = []
            for target in targets:
                init_pid = machine.require_running(target)
                if machine.exec_in(init_pid, ["test", "-d", install.MACHINE_WHEELS]).returncode:
                    raise ClusterError(
                        f"{target.name} booted without fleet's wheel folder "
                        f"({install.MACHINE_WHEELS}: a --no-fleetd cluster, or one made by an "
                        f"older fleet-cluster); `fleet-cluster restart {target.name}` first"
                    )
                before = target.fleet_version or "-"
                started = time.monotonic()
                self.install(target, state.wheel)
                status = self.restart_fleetd(target)
                if status.ok:
                    status = self._wait_serving(target, info.version)
                took = time.monotonic() - started
                ctx.progress(
                    target.name, f"fleet {before} -> {info.version}: {status} ({took:.2f} s)"
                )
                if not status.ok:
                    raise ClusterError(
                        f"{target.name}: fleetd {info.version} did not come back after the "
                        f"upgrade, the roll stops here:\n{status.detail}"
                    )
                done.append((target.name, before, info.version))
        return done

    def _wait_serving(self, m: MachineState, version: str, timeout: float = 60.0) -> FleetdStatus:
        """Until the machine's fleetd of `version` answers its API, which it does only once
        registered in etcd: systemd calls it active earlier (READY=1 comes before that)."""
        init_pid = machine.require_running(m)
        argv = ["fleetctl", "--driver=api", "--endpoint=unix:///var/run/fleet.sock"]
        argv += ["version", "-o", "json"]

        def serving() -> bool | None:
            done = machine.exec_in(init_pid, argv, timeout=30)
            try:
                found = json.loads(done.stdout or "{}").get("fleetd") or []
            except ValueError:
                return None
            return True if [v["version"] for v in found] == [version] else None

        try:
            procs.wait_for(
                serving, timeout, f"fleetd {version} on {m.name} to register", interval=0.25
            )
        except ClusterError as exc:
            return FleetdStatus(False, "not registered", str(exc))
        return FleetdStatus(True, f"active/running, registered as {version}")
