"""Scenarios on real machines: systemd-nspawn containers booting real systemd, fleetd in each,
etcd on the host (deploy/fleet_cluster). Need root and systemd-nspawn; skipped otherwise.

- latency: 3 machines, agent_ttl 10s. `fleetctl start` (the real CLI, --driver etcd) until it
  returns, which it does once the unit is launched and active in systemd; the median of N.
  Then one machine is killed (SIGKILL of its whole cgroup) and the time until its unit is
  active on another machine is measured.
- kill: 3 machines, agent_ttl 10s. The machine running a unit is killed, 20 times; the time to
  the unit active elsewhere, split into detection (lease expiry), engine and agent.
- agent + footprint: 1 machine. fleetd's RSS and CPU over 30 s with 20 units running; then
  1,000 more units started (time until systemd runs them all); then RSS, CPU and the system
  bus' message rate with everything idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.listing import fleetctl_argv
from benchmarks.report import ScenarioResult, say

T = TypeVar("T")

UNIT_TEXT = "[Unit]\nDescription=bench {name}\n\n[Service]\nExecStart=/bin/sleep infinity\n"


@dataclass
class ClusterOptions:
    latency_runs: int = 20
    kill_runs: int = 20
    agent_units: int = 1000
    footprint_seconds: float = 30.0
    agent_ttl: str = "10s"


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (overlay mounts, a bridge, cgroups, systemd-nspawn)"
    try:
        from fleet_cluster.prereqs import missing_binaries
    except ImportError as e:
        return f"fleet_cluster not importable: {e}"
    missing = missing_binaries()
    if missing:
        return f"missing {', '.join(sorted(missing))}"
    return None


def free_subnet(offset: int) -> str:
    """A /24 in 10.77.50-99 (the functional tests use 100-249) that nothing here overlaps."""
    from fleet_cluster.network import overlap

    for attempt in range(50):
        third = 50 + (os.getpid() + offset + attempt) % 50
        subnet = f"10.77.{third}.0/24"
        if overlap(ipaddress.IPv4Network(subnet)) is None:
            return subnet
    raise RuntimeError("no free /24 in 10.77.50.0-10.77.99.0")


class Client:
    """fleetd's Registry on the cluster's etcd, in a private event loop (for set-up and for
    reading states; the figures that concern fleetctl run the real CLI)."""

    def __init__(self, endpoint: str) -> None:
        from fleetd.etcd.client import EtcdConfig, EtcdKV
        from fleetd.registry.registry import Registry

        self.loop = asyncio.new_event_loop()
        self.kv = EtcdKV(EtcdConfig(endpoints=[endpoint], request_timeout=30.0))
        self.registry = Registry(self.kv)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def start_units(self, names: list[str]) -> None:
        from fleetd.model import TargetState
        from fleetd.unit.file import parse_unit

        async def go() -> None:
            sem = asyncio.Semaphore(32)

            async def one(name: str) -> None:
                async with sem:
                    unit = parse_unit(UNIT_TEXT.format(name=name))
                    await self.registry.create_unit(name, unit, TargetState.LAUNCHED)

            await asyncio.gather(*(one(n) for n in names))

        self.run(go())

    def start_and_wait(self, name: str) -> float:
        """Seconds from creating a launched unit to its active state being published."""
        from fleetd.model import TargetState
        from fleetd.unit.file import parse_unit

        unit = parse_unit(UNIT_TEXT.format(name=name))

        async def go() -> float:
            started = time.perf_counter()
            await self.registry.create_unit(name, unit, TargetState.LAUNCHED)
            while True:
                states = await self.registry.list_states(name)
                if any(s.active_state == "active" for s in states):
                    return time.perf_counter() - started
                if time.perf_counter() - started > 60:
                    raise TimeoutError(f"{name} not active within 60 s")
                await asyncio.sleep(0.01)

        return self.run(go())

    def active(self) -> dict[str, str]:
        """unit -> machine, for every unit published active/running."""
        states = self.run(self.registry.list_states())
        return {s.name: s.machine_id for s in states if s.active_state == "active"}

    def close(self) -> None:
        self.run(self.kv.close())
        self.loop.close()


def wait_for(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    poll: float = 0.05,
    status: Callable[[], str] | None = None,
) -> T:
    deadline = time.monotonic() + timeout
    started = last = time.monotonic()
    while True:
        result = probe()
        if result:
            return result
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        if status is not None and now - last >= 1.0:
            last = now
            say(f"  [{what} {now - started:6.1f}s] {status()}")
        time.sleep(poll)


@contextlib.contextmanager
def booted(n: int, opts: ClusterOptions, offset: int) -> Iterator[Any]:
    from fleet_cluster import Cluster

    name = f"fb{os.getpid() % 10000}x{offset}"

    def progress(subject: str, message: str) -> None:
        say(f"  [{name}] {subject:<10} {message}")

    say(f"booting {n} nspawn machine(s) as cluster {name} (agent_ttl {opts.agent_ttl})")
    with Cluster(
        name=name, n=n, subnet=free_subnet(offset), agent_ttl=opts.agent_ttl, progress=progress
    ) as cluster:
        yield cluster


def fleetctl(endpoint: str, *args: str, timeout: float = 120.0) -> tuple[float, str]:
    argv = [*fleetctl_argv(), "--driver", "etcd", "--endpoint", endpoint, *args]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"fleetctl {' '.join(args)} failed: {proc.stderr.strip()[-300:]}")
    return took, proc.stdout


# ---- scenario 4: latency ---------------------------------------------------------------------


def latency(opts: ClusterOptions) -> ScenarioResult:
    result = ScenarioResult("latency")
    ttl = float(opts.agent_ttl.rstrip("s"))
    with booted(3, opts, 0) as cluster:
        endpoint = cluster.etcd_endpoint
        client = Client(endpoint)
        try:
            cli_floor = min(fleetctl(endpoint, "list-machines")[0] for _ in range(3))
            unit_dir = Path(tempfile.mkdtemp(prefix="fleet-bench-units-"))
            samples: list[float] = []
            for i in range(opts.latency_runs):
                path = unit_dir / f"lat{i}.service"
                path.write_text(UNIT_TEXT.format(name=path.name))
                took, _ = fleetctl(endpoint, "start", str(path))
                samples.append(took)
                say(f"  [latency] fleetctl start {path.name}: {took:.3f}s")
            median = statistics.median(samples)
            result.details.update(
                start_seconds=[round(s, 3) for s in samples],
                fleetctl_list_machines_seconds=round(cli_floor, 3),
            )
            result.add(
                f"fleetctl start -> active (median of {len(samples)})",
                round(median, 3),
                "s",
                "< 0.5 s",
                median < 0.5,
            )
            result.add("  fastest / slowest", f"{min(samples):.3f} / {max(samples):.3f} s")
            result.add("  fleetctl's own floor (list-machines)", round(cli_floor, 3), "s")

            # The same path without the CLI: create the unit through the registry, then
            # poll its published state every 10 ms (fleetctl polls every 250 ms, as fleet's).
            direct: list[float] = []
            for i in range(opts.latency_runs):
                took = client.start_and_wait(f"direct{i}.service")
                direct.append(took)
            dmedian = statistics.median(direct)
            result.details["direct_seconds"] = [round(s, 3) for s in direct]
            result.add(
                f"registry create -> active, no CLI (median of {len(direct)})",
                round(dmedian, 3),
                "s",
            )

            # machine kill -> active elsewhere
            path = unit_dir / "failover.service"
            path.write_text(UNIT_TEXT.format(name=path.name))
            fleetctl(endpoint, "start", str(path))
            host = client.active()["failover.service"]
            victim = next(m for m in cluster.machines if m.machine_id == host)
            say(f"  [latency] killing {victim.name}, which runs failover.service")
            killed = time.perf_counter()
            cluster.kill(victim)

            def moved() -> bool:
                where = client.active().get("failover.service")
                return where is not None and where != host

            wait_for(moved, ttl * 3 + 30, "failover.service active elsewhere")
            took = time.perf_counter() - killed
            result.add(
                f"machine kill -> active elsewhere (agent_ttl {ttl:g}s)",
                round(took, 2),
                "s",
                f"<= {ttl + 1:g} s",
                took <= ttl + 1,
            )
        finally:
            client.close()
    return result


# ---- scenario 5: kill (failover on real machines, with its breakdown) ------------------------

# fleet v1.0 on the same kind of cluster (3 nspawn machines, agent_ttl 10 s), as issue 16
# measured it: machine kill -> unit active elsewhere.
FLEET_V1_FAILOVER = (5.6, 6.9)


def kill(opts: ClusterOptions) -> ScenarioResult:
    """Kill the machine running a unit, `kill_runs` times; each time the seconds from the kill
    to: the machine's key gone (its lease expired: detection), the unit placed elsewhere
    (the engine's reaction), the unit active there (the agent and systemd). The victim is
    booted again between runs and given one agent_ttl to settle (a fleetd that just started
    holds absent machines for one grace, by design)."""
    result = ScenarioResult("kill")
    ttl = float(opts.agent_ttl.rstrip("s"))
    with booted(3, opts, 1) as cluster:
        client = Client(cluster.etcd_endpoint)
        runs: list[dict[str, float]] = []
        try:
            time.sleep(ttl)  # past the engine's start-up grace, as between runs
            for i in range(opts.kill_runs):
                runs.append(_kill_once(cluster, client, f"kill{i}.service", ttl))
                r = runs[-1]
                say(
                    f"  [kill {i + 1}/{opts.kill_runs}] lease gone {r['expired']:.2f} s, "
                    f"placed +{r['placed'] - r['expired']:.2f} s, active "
                    f"+{r['active'] - r['placed']:.2f} s = {r['active']:.2f} s"
                )
        finally:
            client.close()
    totals = [r["active"] for r in runs]
    detect = [r["expired"] for r in runs]
    react = [r["placed"] - r["expired"] for r in runs]
    start = [r["active"] - r["placed"] for r in runs]
    median, worst = statistics.median(totals), max(totals)
    result.details.update(
        runs=[{k: round(v, 3) for k, v in r.items()} for r in runs],
        fleet_v1_seconds=list(FLEET_V1_FAILOVER),
    )
    result.add(
        f"machine kill -> active elsewhere, median of {len(runs)} (agent_ttl {ttl:g}s)",
        round(median, 2),
        "s",
        f"<= fleet v1.0's {FLEET_V1_FAILOVER[0]:g}-{FLEET_V1_FAILOVER[1]:g} s",
        median <= FLEET_V1_FAILOVER[1],
    )
    result.add("  worst", round(worst, 2), "s", f"<= {ttl + 1:g} s", worst <= ttl + 1)
    result.add("  best", round(min(totals), 2), "s")
    for label, series in (
        ("  kill -> lease gone (detection), median", detect),
        ("  lease gone -> placed (engine), median", react),
        ("  placed -> active (agent, systemd), median", start),
    ):
        result.add(label, round(statistics.median(series), 3), "s")
    return result


def _kill_once(cluster: Any, client: Client, name: str, ttl: float) -> dict[str, float]:
    """One run of `kill`: seconds from the kill to expired, placed and active."""
    keys = client.registry.keys
    client.start_units([name])
    host = wait_for(lambda: client.active().get(name), 60, f"{name} active")
    victim = next(m for m in cluster.machines if m.machine_id == host)
    marks: dict[str, float] = {}
    killed = time.perf_counter()
    cluster.kill(victim)

    def moved() -> bool:
        now = time.perf_counter() - killed
        if "expired" not in marks and not client.run(client.kv.get(keys.machine(host))):
            marks["expired"] = now
        placed = client.run(client.registry.placement(name))
        if "placed" not in marks and placed and placed.machine_id not in (None, host):
            marks["placed"] = now
        where = client.active().get(name)
        if where is not None and where != host:
            marks["active"] = now
            return True
        return False

    wait_for(moved, ttl * 3 + 30, f"{name} active elsewhere", poll=0.01)
    marks.setdefault("expired", marks["active"])
    marks.setdefault("placed", marks["active"])
    cluster.restart(victim)
    wait_for(
        lambda: client.run(client.kv.get(keys.machine(victim.machine_id))),
        120,
        f"{victim.name} registered again",
    )
    # The restarted fleetd's start-up grace (see kill's docstring), then a random part of a
    # TTL more: waiting a fixed time would lock the next kill to the same phase of the
    # victim's renewals (always just after one), and measure the worst case every time.
    time.sleep(ttl + random.uniform(0, ttl))
    return marks


# ---- scenarios 6 and 7: agent and footprint --------------------------------------------------


def fleetd_pid(cluster: Any, m: Any) -> int:
    out = cluster.exec(m, ["systemctl", "show", "-p", "MainPID", "--value", "fleet.service"])
    return int(out.stdout.strip())


def proc_sample(cluster: Any, m: Any, pid: int) -> tuple[float, int]:
    """(utime+stime seconds, VmRSS bytes) of a process inside the machine."""
    out = cluster.exec(m, ["cat", f"/proc/{pid}/stat", f"/proc/{pid}/status"], check=True)
    stat, _, status = out.stdout.partition("\n")
    fields = stat.rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = next(
        int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")
    )
    return cpu, rss


def footprint(cluster: Any, m: Any, seconds: float) -> tuple[float, float]:
    """(RSS in MB, CPU % of a core) of fleetd over `seconds`."""
    pid = fleetd_pid(cluster, m)
    cpu0, _ = proc_sample(cluster, m, pid)
    t0 = time.monotonic()
    peak = 0
    while time.monotonic() - t0 < seconds:
        time.sleep(min(5.0, seconds))
        _, rss = proc_sample(cluster, m, pid)
        peak = max(peak, rss)
        say(f"  [footprint {time.monotonic() - t0:5.1f}s] fleetd RSS {rss / 1e6:.1f} MB")
    cpu1, rss = proc_sample(cluster, m, pid)
    return max(peak, rss) / 1e6, 100 * (cpu1 - cpu0) / (time.monotonic() - t0)


def dbus_rate(cluster: Any, m: Any, seconds: float = 10.0) -> float | None:
    """System bus messages per second, counted by `busctl monitor` inside the machine."""
    out = cluster.exec(
        m, ["timeout", str(int(seconds)), "busctl", "--system", "monitor"], timeout=seconds + 20
    )
    text: str = out.stdout
    if "Type=" not in text and out.returncode not in (0, 124):
        return None
    return text.count("Type=") / seconds


def agent_and_footprint(opts: ClusterOptions, wanted: list[str]) -> list[ScenarioResult]:
    agent = ScenarioResult("agent")
    foot = ScenarioResult("footprint")
    with booted(1, opts, 1) as cluster:
        m = cluster.machines[0]
        client = Client(cluster.etcd_endpoint)
        try:
            small = [f"small{i:02d}.service" for i in range(20)]
            client.start_units(small)
            wait_for(lambda: all(n in client.active() for n in small), 120, "20 units active")
            rss20, cpu20 = footprint(cluster, m, opts.footprint_seconds)
            foot.add("fleetd RSS at 20 units", round(rss20, 1), "MB")
            foot.add(
                "fleetd idle CPU at 20 units",
                round(cpu20, 2),
                "% of a core",
                "<= 1%",
                cpu20 <= 1.0,
            )
            big = [f"big{i:04d}.service" for i in range(opts.agent_units)]
            say(f"agent: starting {len(big)} units on {m.name}")
            started = time.perf_counter()
            client.start_units(big)
            submitted = time.perf_counter() - started

            def count() -> int:
                active = client.active()
                return sum(1 for n in big if n in active)

            wait_for(
                lambda: count() == len(big),
                900,
                f"{len(big)} units active",
                poll=0.5,
                status=lambda: f"{count()}/{len(big)} active",
            )
            took = time.perf_counter() - started
            agent.add(
                f"{len(big)} units submitted -> all active",
                round(took, 1),
                "s",
                "< 60 s",
                took < 60,
            )
            agent.add("  of which submitting", round(submitted, 1), "s")
            time.sleep(5)  # let the last state changes settle
            total = len(big) + len(small)
            rss_big, cpu_big = footprint(cluster, m, opts.footprint_seconds)
            agent.add(f"fleetd idle CPU at {total} units", round(cpu_big, 2), "% of a core")
            rate = dbus_rate(cluster, m)
            agent.add(
                f"system bus messages/s, idle at {total} units",
                "n/a (busctl monitor failed)" if rate is None else round(rate, 1),
            )
            foot.add(
                f"fleetd RSS at {total} units",
                round(rss_big, 1),
                "MB",
                "<= 60 MB",
                rss_big <= 60,
            )
            foot.add(f"fleetd idle CPU at {total} units", round(cpu_big, 2), "% of a core")
        finally:
            client.close()
    return [r for r in (agent, foot) if r.scenario in wanted]


def run_cluster(opts: ClusterOptions, wanted: list[str]) -> list[ScenarioResult]:
    why = unavailable()
    if why:
        say(f"skipping {', '.join(wanted)}: {why}")
        return [ScenarioResult(w, skipped=why) for w in wanted]
    results: list[ScenarioResult] = []
    if "latency" in wanted:
        results.append(_guard("latency", lambda: latency(opts)))
    if "kill" in wanted:
        results.append(_guard("kill", lambda: kill(opts)))
    if "agent" in wanted or "footprint" in wanted:
        try:
            results += agent_and_footprint(opts, wanted)
        except Exception as e:
            say(f"agent/footprint: failed: {e!r}")
            results += [
                ScenarioResult(w, error=repr(e)) for w in ("agent", "footprint") if w in wanted
            ]
    return results


def _guard(name: str, work: Callable[[], ScenarioResult]) -> ScenarioResult:
    try:
        return work()
    except Exception as e:
        say(f"{name}: failed: {e!r}")
        return ScenarioResult(name, error=repr(e))
