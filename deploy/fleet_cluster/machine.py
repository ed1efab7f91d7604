"""One machine: a systemd-nspawn container booting the host's OS with real systemd and D-Bus.

Commands run inside through `nsenter -t <init pid> -a`, which joins every namespace of the
container's init (mount, pid, network, cgroup...): the same view a service in it has, without
needing sshd or a console.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from . import cgroups, procs
from .errors import ClusterError, MachineNotRunning
from .state import Layout, MachineState

# nspawn leaves this behind (on the host) when it is killed instead of exiting on its own.
NSPAWN_PROPAGATE = Path("/run/systemd/nspawn/propagate")
RUNNING_STATES = ("running", "degraded")


def nspawn_argv(name: str, root: Path, bridge: str, binds: Sequence[str]) -> list[str]:
    argv = [
        "systemd-nspawn",
        "-D",
        str(root),
        "-M",
        name,
        # No systemd-machined on the host to register with, and no unit to move into: stay in
        # the cgroup the launching shell put us in.
        "--register=no",
        "--keep-unit",
        "-b",
        "--console=passive",
        f"--network-bridge={bridge}",
        # Never link the machine's journal into the host's /var/log/journal.
        "--link-journal=no",
    ]
    argv += [f"--bind-ro={path}" for path in binds]
    # basic.target boots in well under a second and starts none of the host's enabled services.
    return [*argv, "systemd.unit=basic.target"]


def launch(
    layout: Layout, name: str, bridge: str, binds: Sequence[str], cgroup_procs: Sequence[Path]
) -> int:
    """Start systemd-nspawn for a machine whose root is mounted; return nspawn's pid."""
    env = dict(procs.BASE_ENV)
    # Without this nspawn takes lock files in the host's /run/systemd/nspawn/locks and, when
    # killed, leaves them there.
    env["SYSTEMD_NSPAWN_LOCK"] = "0"
    return procs.spawn_detached(
        nspawn_argv(name, layout.machine_root(name), bridge, binds),
        log_path=layout.nspawn_log(name),
        pid_path=layout.nspawn_pid(name),
        cgroup_procs=cgroup_procs,
        env=env,
    )


def is_nspawn_of(pid: int, root: Path) -> bool:
    """Whether `pid` is still the systemd-nspawn running `root` (guards against pid reuse)."""
    argv = procs.cmdline(pid)
    return bool(argv) and Path(argv[0]).name == "systemd-nspawn" and str(root) in argv


def find_init(
    layout: Layout, name: str, nspawn_pid: int, timeout: float, cancel: threading.Event | None
) -> int:
    """The container's init: the child of systemd-nspawn that has exec'd systemd."""

    def probe() -> int | None:
        if not procs.is_alive(nspawn_pid):
            raise ClusterError(
                f"systemd-nspawn of {name} exited:\n{procs.tail(layout.nspawn_log(name))}"
            )
        for child in procs.children(nspawn_pid):
            if procs.comm(child) == "systemd":
                return child
        return None

    return procs.wait_for(
        probe,
        timeout,
        f"the init process of {name}",
        cancel=cancel,
        detail=lambda: procs.tail(layout.nspawn_log(name)),
    )


def exec_in(
    init_pid: int,
    argv: Sequence[str],
    *,
    check: bool = False,
    timeout: float | None = 60.0,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` inside the machine (all of its namespaces); capture its output as text."""
    if not procs.is_alive(init_pid):
        raise MachineNotRunning(f"the machine with init pid {init_pid} is not running")
    return procs.run(
        ["nsenter", "-t", str(init_pid), "-a", *argv],
        check=check,
        timeout=timeout,
        input_text=input_text,
    )


def system_state(init_pid: int) -> str:
    """`systemctl is-system-running` inside, or why it could not be asked."""
    try:
        done = exec_in(init_pid, ["systemctl", "is-system-running"], timeout=10)
    except ClusterError as exc:
        return f"unknown ({exc})"
    return done.stdout.strip() or "unknown"


def wait_running(
    layout: Layout,
    machine: MachineState,
    timeout: float,
    cancel: threading.Event | None,
) -> str:
    """Wait until systemd in the machine reports running or degraded; return which."""
    assert machine.init_pid is not None
    assert machine.nspawn_pid is not None
    init_pid = machine.init_pid
    nspawn_pid = machine.nspawn_pid
    last = {"state": "?"}

    def probe() -> str | None:
        if not procs.is_alive(nspawn_pid):
            raise ClusterError(
                f"{machine.name} died while booting:\n{procs.tail(layout.nspawn_log(machine.name))}"
            )
        # Before D-Bus and systemd's private socket are up this fails; that is "not yet".
        done = procs.run(
            ["nsenter", "-t", str(init_pid), "-a", "systemctl", "is-system-running"],
            check=False,
            timeout=10,
        )
        last["state"] = done.stdout.strip() or done.stderr.strip()
        return last["state"] if last["state"] in RUNNING_STATES else None

    def detail() -> str:
        jobs = exec_in(init_pid, ["systemctl", "list-jobs", "--no-pager"], timeout=10)
        return f"last state {last['state']!r}; pending jobs:\n{jobs.stdout.strip()}"

    return procs.wait_for(
        probe,
        timeout,
        f"systemd in {machine.name} to be running",
        cancel=cancel,
        detail=detail,
    )


def stop(layout: Layout, machine: MachineState, dirs: list[Path], grace: float) -> None:
    """Shut a machine down cleanly, or kill it after `grace` seconds.

    SIGTERM makes systemd-nspawn ask the container's systemd to power off (SIGRTMIN+3), which
    stops its services in order; whatever is left after the grace period is SIGKILLed.
    """
    root = layout.machine_root(machine.name)
    pid = machine.nspawn_pid
    if pid is not None and is_nspawn_of(pid, root):
        procs.terminate([pid], grace)
    kill(layout, machine, dirs)


def kill(layout: Layout, machine: MachineState, dirs: list[Path]) -> None:
    """SIGKILL the machine: nspawn and every process of the container, at once.

    Killing nspawn alone is not enough: the container's init survives it (reparented to the
    host's init) and the machine runs on. Everything of the machine is in its cgroup subtree,
    so that is what gets killed; the pids from the state file are a fallback when the cgroup
    is gone.
    """
    root = layout.machine_root(machine.name)
    cgroups.kill(dirs)
    if machine.nspawn_pid is not None and is_nspawn_of(machine.nspawn_pid, root):
        procs.terminate([machine.nspawn_pid], 0.0)
    if machine.init_pid is not None and is_init_of(machine.init_pid, machine.name):
        procs.terminate([machine.init_pid], 0.0)
    leftovers = procs.find_processes(lambda argv: str(root) in argv)
    procs.terminate(leftovers, 0.0)
    forget_process(layout, machine, dirs)


def forget_process(layout: Layout, machine: MachineState, dirs: list[Path]) -> None:
    """Clean what a dead machine leaves on the host (not its root file system)."""
    for directory in dirs:
        cgroups.remove(directory)
    with contextlib.suppress(OSError):
        shutil.rmtree(NSPAWN_PROPAGATE / machine.name)
    layout.nspawn_pid(machine.name).unlink(missing_ok=True)
    machine.nspawn_pid = None
    machine.init_pid = None
    machine.veth = None
    machine.partitioned = False


def machine_id_of(init_pid: int) -> str:
    with open(f"/proc/{init_pid}/root/etc/machine-id") as handle:
        return handle.read().strip()


def is_init_of(pid: int, name: str) -> bool:
    """Whether `pid` is still the init of machine `name`: a live `systemd` in its cgroup.

    A pid from the state file may have died and been reused; nsenter into, or a SIGKILL to,
    whatever has it now would be a nasty surprise.
    """
    if not procs.is_alive(pid) or procs.comm(pid) != "systemd":
        return False
    try:
        membership = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False
    return f"/{cgroups.TOP}/" in membership and f"/{name}/" in membership


def require_running(machine: MachineState) -> int:
    pid = machine.init_pid
    if not machine.running or pid is None or not is_init_of(pid, machine.name):
        raise MachineNotRunning(f"machine {machine.name} is not running ({machine.status})")
    return pid


def shell_argv(init_pid: int, argv: Sequence[str]) -> list[str]:
    """An argv that runs `argv` inside the machine, for exec'ing in a terminal."""
    return ["nsenter", "-t", str(init_pid), "-a", *(argv or ["/bin/bash", "-l"])]


def terminal_env() -> dict[str, str]:
    env = dict(procs.BASE_ENV)
    env["TERM"] = os.environ.get("TERM", "dumb")
    return env
