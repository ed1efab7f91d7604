"""Scenario 5, list: the real fleetctl CLI listing the 10,000 units `place` started.

Each command is a child process (`/work/venv/bin/fleetctl` or the venv's own), timed from
spawn to exit, with its peak RSS from the kernel (wait4's ru_maxrss). Through --driver etcd
fleetctl reads etcd itself; through --driver api it asks fleetd's HTTP API, served here by
fleetd's own API app (fleetd.api) in a separate process on a loopback port, over its own
etcd client: what a fleetd on a cluster machine would serve.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchmarks.report import ScenarioResult, say
from benchmarks.sim import SimBench
from fleetd.model import TargetState

COMMANDS = ("list-units", "list-unit-files")


def fleetctl_argv() -> list[str]:
    venv = Path(sys.executable).parent / "fleetctl"
    if venv.exists():
        return [str(venv)]
    found = shutil.which("fleetctl")
    return [found] if found else [sys.executable, "-m", "fleetctl"]


@dataclass
class Run:
    seconds: float
    max_rss_mb: float
    lines: int
    returncode: int
    stderr: str


def run_measured(argv: list[str], timeout: float = 120.0) -> Run:
    """Run `argv` under a tiny wrapper process, so that the command's own peak RSS is read
    (RUSAGE_CHILDREN of a fresh parent holds exactly that one child) with its wall time."""
    wrapper = (
        "import resource,subprocess,sys,time,json;"
        "t=time.perf_counter();"
        "p=subprocess.run(sys.argv[1:],stdout=subprocess.PIPE,stderr=subprocess.PIPE,"
        "stdin=subprocess.DEVNULL);"
        "s=time.perf_counter()-t;"
        "r=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss;"
        "print(json.dumps([s,r,p.stdout.count(b'\\n'),p.returncode,"
        "p.stderr.decode(errors='replace')[-500:]]))"
    )
    import json

    proc = subprocess.run(
        [sys.executable, "-c", wrapper, *argv],
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        return Run(0.0, 0.0, 0, proc.returncode, proc.stderr.decode()[-500:])
    seconds, rss, lines, rc, err = json.loads(proc.stdout)
    return Run(seconds, rss / 1024, lines, rc, err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


API_SERVER = """
import asyncio, sys
from aiohttp import web
from fleetd.api.app import make_app
from fleetd.api.context import ApiContext
from fleetd.etcd.client import EtcdConfig, EtcdKV
from fleetd.registry.registry import Registry

async def main(endpoint, port):
    kv = EtcdKV(EtcdConfig(endpoints=[endpoint]))
    runner = web.AppRunner(make_app(ApiContext(Registry(kv))), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


class ApiProcess:
    """fleetd's API app in its own process on a loopback port; None if it cannot start."""

    def __init__(self, endpoint: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", API_SERVER, endpoint, str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parent.parent,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 20.0) -> str | None:
        """None when it serves, else why not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                return f"fleetd API app did not start: {err.strip().splitlines()[-1:] or ''}"
            try:
                with urllib.request.urlopen(f"{self.url}/fleet/v1/machines", timeout=2):
                    return None
            except OSError:
                time.sleep(0.2)
        return "fleetd API app did not answer within 20 s"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def list_scenario(bench: SimBench, runs: int) -> ScenarioResult:
    result = ScenarioResult("list")
    units = bench.opts.units
    base = fleetctl_argv()
    drivers: list[tuple[str, list[str]]] = [
        ("etcd", ["--driver", "etcd", "--endpoint", bench.etcd.endpoint]),
    ]
    api: ApiProcess | None = None
    api_problem = None
    try:
        import fleetd.api.app  # noqa: F401  (others are building it: say so if it is not there)

        api = ApiProcess(bench.etcd.endpoint)
        api_problem = await asyncio.to_thread(api.wait_ready)
    except ImportError as e:
        api_problem = f"fleetd.api not importable: {e}"
    if api is not None and api_problem is None:
        drivers.append(("api", ["--driver", "api", "--endpoint", api.url]))
    else:
        result.details["api_driver"] = f"not measured: {api_problem}"
        say(f"list: --driver api not measured: {api_problem}")
    try:
        for driver, opts in drivers:
            for command in COMMANDS:
                argv = [*base, *opts, command]
                say(f"list: {' '.join(argv[-4:])} x{runs}")
                samples = [await asyncio.to_thread(run_measured, argv)]
                # Repeat for a median, unless one run already shows it is far off the target.
                if samples[0].seconds < 5.0:
                    samples += [
                        await asyncio.to_thread(run_measured, argv) for _ in range(runs - 1)
                    ]
                bad = [s for s in samples if s.returncode != 0]
                if bad:
                    result.add(f"{command} --driver {driver}", "failed", "", "< 1 s", False)
                    result.details[f"{driver}:{command}:error"] = bad[0].stderr
                    continue
                secs = statistics.median(s.seconds for s in samples)
                rss = max(s.max_rss_mb for s in samples)
                lines = samples[0].lines
                result.details[f"{driver}:{command}"] = {
                    "seconds": [round(s.seconds, 3) for s in samples],
                    "max_rss_mb": round(rss, 1),
                    "lines": lines,
                }
                result.add(
                    f"{command} --driver {driver} ({lines - 1} rows)",
                    round(secs, 3),
                    "s",
                    "< 1 s",
                    secs < 1.0,
                )
                result.add(f"{command} --driver {driver} peak RSS", round(rss, 1), "MB")
                await _after_write(bench, result, driver, command, argv, runs)
    finally:
        if api is not None:
            api.stop()
    result.details["units"] = units
    return result


async def _after_write(
    bench: SimBench,
    result: ScenarioResult,
    driver: str,
    command: str,
    argv: list[str],
    runs: int,
) -> None:
    """The listing a user sees right after `fleetctl start`/`stop`: one unit's desired state
    is written, then the listing is timed (the API's snapshot of the previous listing is
    stale by then). The unit ends in the state it started in."""
    units = await bench.client.list_units()
    if not units:
        return
    unit = min(units, key=lambda u: u.name)
    other = (
        TargetState.LOADED if unit.target_state is not TargetState.LOADED else TargetState.LAUNCHED
    )
    samples: list[Run] = []
    try:
        for i in range(runs):
            await bench.client.set_target_state(
                unit.name, other if i % 2 == 0 else unit.target_state
            )
            samples.append(await asyncio.to_thread(run_measured, argv))
    finally:
        await bench.client.set_target_state(unit.name, unit.target_state)
    bad = [s for s in samples if s.returncode != 0]
    name = f"{command} --driver {driver} right after a write"
    if bad:
        result.add(name, "failed", "", "< 1 s", False)
        result.details[f"{driver}:{command}:after_write:error"] = bad[0].stderr
        return
    secs = statistics.median(s.seconds for s in samples)
    result.details[f"{driver}:{command}:after_write"] = {
        "seconds": [round(s.seconds, 3) for s in samples]
    }
    result.add(name, round(secs, 3), "s", "< 1 s", secs < 1.0)
