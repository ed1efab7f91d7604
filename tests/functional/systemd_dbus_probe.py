"""Exercise DBusUnitManager against the real systemd of the machine this runs in.

Run INSIDE a throw-away nspawn machine (tests/functional/test_systemd_dbus.py does that):
it loads, starts, stops and unloads units in /run/fleet/units. It records what it observes
and prints one JSON object on stdout; the test on the host makes the assertions, so a
failure shows the whole picture instead of the first surprise.

    python systemd_dbus_probe.py [--user] [--many N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout

from fleetd.systemd.dbus import DBusUnitManager
from fleetd.systemd.manager import SystemdState, UnitManagerError

DEADLINE = 10.0


def unit(exec_start: str, *, extra: str = "", install: str = "") -> str:
    text = f"[Unit]\nDescription=probe\n\n[Service]\nExecStart={exec_start}\n{extra}"
    return text + (f"\n[Install]\n{install}\n" if install else "")


class Recorder:
    """Collects watch() events with their time, so the probe can wait for one."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, SystemdState]] = []
        self.changed = asyncio.Event()
        self.error: str | None = None

    async def run(self, mgr: DBusUnitManager) -> None:
        try:
            async for name, state in mgr.watch():
                self.events.append((time.monotonic(), name, state))
                self.changed.set()
        except UnitManagerError as e:
            self.error = str(e)

    async def wait_for(self, name: str, active: str, sub: str, since: float) -> float | None:
        """Seconds from `since` to the first event of `name` in (active, sub), or None."""
        end = time.monotonic() + DEADLINE
        while True:
            for t, n, s in self.events:
                if t >= since and n == name and (s.active_state, s.sub_state) == (active, sub):
                    return t - since
            remaining = end - time.monotonic()
            if remaining <= 0:
                return None
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                return None

    def of(self, name: str) -> list[list[str]]:
        return [[s.load_state, s.active_state, s.sub_state] for _, n, s in self.events if n == name]


def as_list(s: SystemdState) -> list[str | int]:
    return [s.load_state, s.active_state, s.sub_state, s.main_pid]


async def state_of(mgr: DBusUnitManager, name: str) -> list[str | int]:
    return as_list((await mgr.states([name]))[name])


async def poll_until(
    mgr: DBusUnitManager, name: str, want: tuple[str, str, str]
) -> tuple[float | None, list[str | int]]:
    """Poll states() until `name` is in `want`; (seconds taken or None, last state)."""
    start = time.monotonic()
    while True:
        now = await state_of(mgr, name)
        if tuple(now[:3]) == want:
            return time.monotonic() - start, now
        if time.monotonic() - start > DEADLINE:
            return None, now
        await asyncio.sleep(0.005)


async def timed(coro: Awaitable[Any]) -> tuple[Any, float]:
    t = time.monotonic()
    result = await coro
    return result, time.monotonic() - t


async def error_of(call: Callable[[], Awaitable[Any]]) -> str | None:
    try:
        await call()
    except UnitManagerError as e:
        return f"{type(e).__name__}: {e}"
    return None


def systemctl(*args: str, user: bool) -> str:
    argv = ["systemctl", *(["--user"] if user else []), *args]
    return subprocess.run(argv, capture_output=True, text=True).stdout.strip()


def comm_of(pid: int) -> str | None:
    return Path(f"/proc/{pid}/comm").read_text().strip() if pid else None


def exists(path: Path) -> bool:
    return path.exists()


def link_of(path: Path) -> str | None:
    return os.readlink(path) if path.is_symlink() else None


async def lifecycle(mgr: DBusUnitManager, rec: Recorder, out: dict[str, Any], conf: Path) -> None:
    """load -> reload -> start -> stop -> unload of a plain long-running service."""
    name = "hello.service"
    path = mgr.unit_path(name)
    _, out["load_s"] = await timed(mgr.load(name, unit("/bin/sleep 1000"), has_install=False))
    out["file_mode"] = oct(path.stat().st_mode & 0o777)
    out["link"] = link_of(conf / name)
    _, out["reload_s"] = await timed(mgr.reload())
    out["after_load"] = await state_of(mgr, name)
    out["unit_files"] = sorted(await mgr.unit_files())
    out["file_state"] = systemctl("is-enabled", name, user=mgr.user)

    t0 = time.monotonic()
    out["start_result"], out["start_call_s"] = await timed(mgr.start(name))
    out["start_to_active_poll_s"], out["after_start"] = await poll_until(
        mgr, name, ("loaded", "active", "running")
    )
    out["start_to_active_watch_s"] = await rec.wait_for(name, "active", "running", t0)
    pid = await mgr.main_pid(name)
    out["main_pid"] = pid
    out["main_pid_comm"] = comm_of(pid)
    out["main_pid_not_service"] = await mgr.main_pid("multi-user.target")

    t0 = time.monotonic()
    out["stop_result"], out["stop_call_s"] = await timed(mgr.stop(name))
    out["after_stop"] = await state_of(mgr, name)
    out["stop_watch_s"] = await rec.wait_for(name, "inactive", "dead", t0)
    out["main_pid_after_stop"] = await mgr.main_pid(name)

    await mgr.start(name)  # unload must stop a running unit itself
    _, out["unload_s"] = await timed(mgr.unload(name))
    out["file_after_unload"] = path.exists()
    out["link_after_unload"] = (conf / name).is_symlink() or (conf / name).exists()
    await mgr.reload()
    out["after_unload"] = await state_of(mgr, name)
    out["watch_events"] = rec.of(name)


async def install_section(mgr: DBusUnitManager, out: dict[str, Any], conf: Path) -> None:
    """[Install] WantedBy=: enabled at runtime on load, disabled again on unload."""
    name = "inst.service"
    text = unit("/bin/sleep 1000", install="WantedBy=multi-user.target")
    await mgr.load(name, text, has_install=True)
    wants = conf / "multi-user.target.wants" / name
    out["wants_link"] = link_of(wants)
    await mgr.reload()
    out["file_state"] = systemctl("is-enabled", name, user=mgr.user)
    await mgr.start(name)
    out["after_start"] = await state_of(mgr, name)
    await mgr.unload(name)
    await mgr.reload()
    out["wants_after_unload"] = wants.is_symlink()
    out["after_unload"] = await state_of(mgr, name)

    # An [Install] section systemd refuses: the load fails and leaves nothing behind.
    bad = "badalias.service"
    text = unit("/bin/true", install="Alias=other.socket")
    out["enable_error"] = await error_of(lambda: mgr.load(bad, text, has_install=True))
    out["enable_error_file_left"] = mgr.unit_path(bad).exists()
    out["enable_error_link_left"] = (conf / bad).is_symlink()


async def failing(mgr: DBusUnitManager, rec: Recorder, out: dict[str, Any]) -> None:
    """A service whose ExecStart fails shows failed; unload resets it."""
    name = "bad.service"
    await mgr.load(name, unit("/bin/false"), has_install=False)
    await mgr.reload()
    t0 = time.monotonic()
    out["start_result"] = await mgr.start(name)
    out["failed_poll_s"], out["after_start"] = await poll_until(
        mgr, name, ("loaded", "failed", "failed")
    )
    out["failed_watch_s"] = await rec.wait_for(name, "failed", "failed", t0)
    out["stop_failed_result"] = await mgr.stop(name)
    out["after_stop_failed"] = await state_of(mgr, name)
    await mgr.unload(name)
    out["file_after_unload"] = mgr.unit_path(name).exists()
    out["after_unload_no_reload"] = await state_of(mgr, name)
    await mgr.reload()
    out["after_unload"] = await state_of(mgr, name)

    # Type=exec makes the exec failure the job's own result.
    name = "badexec.service"
    await mgr.load(name, unit("/nonexistent/binary", extra="Type=exec\n"), has_install=False)
    await mgr.reload()
    out["exec_start_result"] = await mgr.start(name)
    out["exec_after_start"] = await state_of(mgr, name)
    await mgr.unload(name)
    await mgr.reload()
    out["exec_after_unload"] = await state_of(mgr, name)


async def own_job(mgr: DBusUnitManager, rec: Recorder, out: dict[str, Any]) -> None:
    """own_job_type sees a pending restart / stop (fleetd's SIGTERM question)."""
    name = "slowstop.service"
    await mgr.load(
        name, unit("/bin/sleep 1000", extra="ExecStop=/bin/sleep 2\n"), has_install=False
    )
    await mgr.reload()
    await mgr.start(name)
    out["idle"] = await mgr.own_job_type(name)
    t0 = time.monotonic()
    systemctl("restart", "--no-block", name, user=mgr.user)
    out["during_restart"] = await mgr.own_job_type(name)
    out["state_during_restart"] = await state_of(mgr, name)
    # The restart is over when the unit is running again (its stop phase sleeps 2 s).
    out["restart_s"] = await rec.wait_for(name, "active", "running", t0)
    out["after_restart_job"] = await mgr.own_job_type(name)
    out["after_restart"] = await state_of(mgr, name)
    systemctl("stop", "--no-block", name, user=mgr.user)
    out["during_stop"] = await mgr.own_job_type(name)
    await mgr.unload(name)  # waits for the pending stop to finish
    out["after_unload"] = await state_of(mgr, name)


async def refusals(mgr: DBusUnitManager, out: dict[str, Any]) -> None:
    """Bad names never reach the file system or systemd; unknown units are errors."""
    for bad in ("../evil.service", "a/b.service", "..", "x\0.service", ""):
        out[repr(bad)] = await error_of(lambda b=bad: mgr.load(b, "x", has_install=False))
    out["escaped_written"] = exists(Path("/run/fleet/evil.service"))
    out["start_unknown"] = await error_of(lambda: mgr.start("nosuch.service"))
    out["stop_unknown"] = await error_of(lambda: mgr.stop("nosuch.service"))
    out["unload_unknown"] = await error_of(lambda: mgr.unload("nosuch.service"))
    out["states_unknown"] = await state_of(mgr, "nosuch.service")


async def many(mgr: DBusUnitManager, count: int, out: dict[str, Any]) -> None:
    """Figures for N units: load, one reload, start all, one states() call, unload."""
    names = [f"many{i:04d}.service" for i in range(count)]
    text = unit("/bin/sleep 1000")
    t = time.monotonic()
    for name in names:
        await mgr.load(name, text, has_install=False)
    out["load_all_s"] = time.monotonic() - t
    _, out["reload_s"] = await timed(mgr.reload())
    _, out["start_all_concurrent_s"] = await timed(asyncio.gather(*map(mgr.start, names)))
    states, out["states_one_call_s"] = await timed(mgr.states(names))
    out["active"] = sum(s.active_state == "active" for s in states.values())
    cpu0 = time.process_time()
    _, out["stop_all_concurrent_s"] = await timed(asyncio.gather(*map(mgr.stop, names)))
    out["stop_all_cpu_s"] = time.process_time() - cpu0
    t = time.monotonic()
    for name in names:
        await mgr.unload(name)
    out["unload_all_s"] = time.monotonic() - t
    await mgr.reload()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--user", action="store_true")
    parser.add_argument("--many", type=int, default=0)
    args = parser.parse_args()
    units_dir = Path("/run/fleet/units")
    conf = Path("/run/systemd/system")
    if args.user:
        units_dir = Path(os.environ["XDG_RUNTIME_DIR"]) / "fleet" / "units"
        conf = Path(os.environ["XDG_RUNTIME_DIR"]) / "systemd" / "user"
    mgr = DBusUnitManager(units_dir, user=args.user, job_timeout=30)
    rec = Recorder()
    watcher = asyncio.create_task(rec.run(mgr))
    out: dict[str, Any] = {"units_dir": str(units_dir)}
    cpu0 = time.process_time()
    try:
        await asyncio.sleep(0.2)  # let the watch subscribe before anything happens
        for section, run in (
            ("lifecycle", lambda o: lifecycle(mgr, rec, o, conf)),
            ("install", lambda o: install_section(mgr, o, conf)),
            ("failing", lambda o: failing(mgr, rec, o)),
            ("own_job", lambda o: own_job(mgr, rec, o)),
            ("refusals", lambda o: refusals(mgr, o)),
            ("many", lambda o: many(mgr, args.many, o) if args.many else asyncio.sleep(0)),
        ):
            out[section] = {}
            try:
                await run(out[section])
            except Exception as e:
                out[section]["exception"] = f"{type(e).__name__}: {e}"
        out["cpu_s"] = time.process_time() - cpu0
        out["left_in_units_dir"] = sorted(os.listdir(units_dir)) if units_dir.exists() else []
    finally:
        await mgr.close()
        try:
            await asyncio.wait_for(watcher, 5)
            out["watch_ended"] = True
        except TimeoutError:
            out["watch_ended"] = False
        out["watch_error"] = rec.error
    print(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    asyncio.run(main())
