"""Processes: starting detached daemons, looking them up in /proc, signalling, waiting.

Everything the tool starts (etcd, systemd-nspawn) is started detached through `setsid -f`, so
it is never a child of the tool: a CLI invocation can exit while the cluster runs, and a
long-lived caller (pytest) never accumulates zombies it would have to reap.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from .errors import ClusterError

T = TypeVar("T")

# A clean environment for what we run: the caller's (a venv, pytest, a systemd unit with
# NOTIFY_SOCKET, SYSTEMD_* knobs) must not leak into containers or etcd.
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
}


class Cancelled(ClusterError):
    """A wait was abandoned because the operation was cancelled (e.g. Ctrl-C in another thread)."""


def wait_for(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    cancel: threading.Event | None = None,
    detail: Callable[[], str] | None = None,
) -> T:
    """Call `probe` until it returns something other than None, or fail after `timeout` s.

    `what` completes the sentence "timed out after N s waiting for ..."; `detail`, if given, is
    called on timeout to add diagnostics (a log tail, a state) to the error.
    """
    deadline = time.monotonic() + timeout
    while True:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled while waiting for {what}")
        result = probe()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            extra = f": {detail()}" if detail is not None else ""
            raise ClusterError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm is in parentheses and may itself contain spaces or parentheses.
    close = raw.rfind(")")
    return [raw[raw.find("(") + 1 : close], *raw[close + 2 :].split()]


def is_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a zombie is dead, only not reaped yet)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[1] not in ("Z", "X")


def is_zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[1] == "Z"


def comm(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return None if fields is None else fields[0]


def parent(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[2])


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def children(pid: int) -> list[int]:
    """Live children of `pid` (scanning /proc: /proc/PID/task/*/children is optional in kernels)."""
    return [p for p in all_pids() if parent(p) == pid and is_alive(p)]


def find_processes(match: Callable[[list[str]], bool]) -> list[int]:
    """Live processes whose argv satisfies `match` (to find leftovers no state file knows)."""
    own = os.getpid()
    return [p for p in all_pids() if p != own and is_alive(p) and match(cmdline(p))]


def spawn_detached(
    argv: Sequence[str],
    *,
    log_path: Path,
    pid_path: Path,
    cgroup_procs: Iterable[Path] = (),
    env: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> int:
    """Start `argv` in a new session, reparented to init, and return its pid.

    A shell writes its own pid into each `cgroup_procs` file, then into `pid_path`, then execs
    `argv`: so the process is in its cgroups before it runs a single instruction, and keeps
    the pid we recorded.
    """
    procs = [str(p) for p in cgroup_procs]
    script = (
        'set -e; pidfile=$1; n=$2; shift 2; while [ "$n" -gt 0 ]; do '
        'echo $$ > "$1"; shift; n=$((n - 1)); done; echo $$ > "$pidfile"; exec "$@"'
    )
    pid_path.unlink(missing_ok=True)
    launcher_argv = ["setsid", "-f", "sh", "-c", script, "sh", str(pid_path), str(len(procs))]
    with log_path.open("ab") as log:
        launcher = subprocess.run(
            [*launcher_argv, *procs, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env if env is not None else dict(BASE_ENV),
            check=False,
        )
    if launcher.returncode != 0:
        raise ClusterError(f"could not start {argv[0]}: setsid exited {launcher.returncode}")

    def read_pid() -> int | None:
        try:
            text = pid_path.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    return wait_for(
        read_pid,
        timeout,
        f"{argv[0]} to start",
        detail=lambda: tail(log_path),
    )


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no {path})"
    return "\n".join(text.rstrip().splitlines()[-lines:])


def signal_pids(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def terminate(pids: Sequence[int], grace: float) -> list[int]:
    """SIGTERM `pids`, SIGKILL those still alive after `grace` s; return those that survived."""
    signal_pids(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_alive(p) for p in pids):
        time.sleep(0.05)
    left = [p for p in pids if is_alive(p)]
    if not left:
        return []
    signal_pids(left, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(is_alive(p) for p in left):
        time.sleep(0.05)
    return [p for p in left if is_alive(p)]


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = 30.0,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a host command, capturing text output; a failure raises with its stderr."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_text,
            check=False,
            env=dict(BASE_ENV),
        )
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"`{' '.join(argv)}` timed out after {timeout} s") from exc
    if check and done.returncode != 0:
        message = (done.stderr or done.stdout).strip()
        raise ClusterError(f"`{' '.join(argv)}` failed ({done.returncode}): {message}")
    return done
