"""Simulated-cluster scenarios on a real etcd: place, failover, idle (and list, which runs
against the cluster `place` leaves behind).

Every simulated machine runs fleetd's real Presence, Agent and (on `engines` of them) Engine,
exactly as fleetd wires them (fleetd.sim.SimCluster); only systemd is simulated
(FakeUnitManager, which answers at once). So the figures measure fleetd's own code and etcd,
and every etcd request is real, etcd's gRPC API, on loopback.

All machines share one EtcdKV (one etcd connection) unless --channels says otherwise: N > 0
means N EtcdKVs assigned round robin, 0 means one per machine, as on a real cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from benchmarks.costs import raw_txn_rate, request_costs
from benchmarks.etcd import BenchEtcd, EtcdCounters
from benchmarks.report import ScenarioResult, progress, say
from benchmarks.submit import submit_all, unit_specs
from fleetd.etcd.client import EtcdConfig, EtcdKV
from fleetd.model import Placement, TargetState
from fleetd.registry.kv import KV
from fleetd.registry.registry import Registry
from fleetd.sim import SimCluster, SimMachine


def quiet_logging() -> None:
    """fleetd logs every placement and task at info: 50,000 lines for one `place`, which would
    measure the terminal. Keep warnings and errors (a failing task still shows)."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=__import__("sys").stderr),
        cache_logger_on_first_use=False,
    )


@dataclass
class SimOptions:
    machines: int = 1000
    units: int = 10_000
    templates: int = 1000  # of `units`, how many are instances of one template
    agent_ttl: float = 10.0
    engines: int = 3  # machines that run an engine (one leads)
    channels: int = 1  # EtcdKV channels the machines share; 0 = one per machine
    submit_concurrency: int = 64  # client requests in flight while submitting units
    idle_seconds: float = 60.0
    kill: int = 100
    raw_txns: int = 5000
    raw_concurrency: int = 64
    client_in_process: bool = False  # submit from the simulator's own process
    timeout: float = 900.0  # give up on a scenario after this long


class SimBench:
    """A simulated cluster on the benchmark's etcd, populated on demand."""

    def __init__(self, etcd: BenchEtcd, opts: SimOptions) -> None:
        self.etcd = etcd
        self.opts = opts
        self.kvs: list[EtcdKV] = []
        self.client_kv = EtcdKV(EtcdConfig(endpoints=[etcd.endpoint], request_timeout=30.0))
        self.client = Registry(self.client_kv)
        self.cluster: SimCluster | None = None
        self.populated = False
        self.place_result: ScenarioResult | None = None

    def _kv_for(self) -> Callable[[str], KV]:
        config = EtcdConfig(endpoints=[self.etcd.endpoint], request_timeout=30.0)
        n = self.opts.channels
        if n > 0:
            self.kvs = [EtcdKV(config) for _ in range(n)]
            order: dict[str, int] = {}

            def shared(machine_id: str) -> KV:
                idx = order.setdefault(machine_id, len(order)) % n
                return self.kvs[idx]

            return shared

        def own(machine_id: str) -> KV:
            kv = EtcdKV(config)
            self.kvs.append(kv)
            return kv

        return own

    @property
    def sim(self) -> SimCluster:
        assert self.cluster is not None
        return self.cluster

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for kv in self.kvs:
            for k, v in kv.stats.items():
                total[k] = total.get(k, 0) + v
        return total

    async def start(self) -> None:
        opts = self.opts
        kv_for = self._kv_for()
        self.cluster = SimCluster(
            self.client_kv,
            agent_ttl=opts.agent_ttl,
            engines=opts.engines,
            safety_interval=30.0,
            machine_kv=kv_for,
        )
        for i in range(opts.machines):
            self.cluster.add(f"{i:08x}" + "0" * 24, metadata={"idx": str(i)})
        started = time.monotonic()
        say(f"starting {opts.machines} simulated machines ({self.channel_desc()})")
        await self.cluster.start_all()
        sim = self.cluster

        def ready() -> str:
            registered = sum(m.presence.registered.is_set() for m in sim.machines.values())
            synced = sum(m.agent.synced for m in sim.machines.values())
            leader = sim.leader()
            led = leader is not None and leader.engine is not None and leader.engine.stats.plans
            return (
                f"registered {registered}/{opts.machines}, agents synced {synced}, "
                f"leader {'yes' if led else 'no'}"
            )

        def is_ready() -> bool:
            leader = sim.leader()
            return (
                all(
                    m.presence.registered.is_set() and m.agent.synced for m in sim.machines.values()
                )
                and leader is not None
                and leader.engine is not None
                and leader.engine.stats.plans > 0
            )

        async with progress("start", ready):
            await wait(is_ready, opts.timeout, "cluster ready")
        say(f"cluster ready in {time.monotonic() - started:.1f}s")

    def channel_desc(self) -> str:
        n = self.opts.channels
        return "one etcd connection per machine" if n == 0 else f"{n} shared etcd connection(s)"

    async def close(self) -> None:
        if self.cluster is not None:
            await self.cluster.close()
        for kv in {id(k): k for k in self.kvs}.values():
            with contextlib.suppress(Exception):
                await kv.close()
        await self.client_kv.close()

    # ---- what the cluster did ------------------------------------------------------------

    def launched(self, names: set[str] | None = None) -> int:
        """Units whose launched state (active) an agent of a running machine has published."""
        n = 0
        for m in self.sim.machines.values():
            if not m.running:
                continue
            for name, s in m.agent.publisher.published.items():
                if (
                    s.agent_state is TargetState.LAUNCHED
                    and s.active_state == "active"
                    and (names is None or name in names)
                ):
                    n += 1
        return n

    def leader_engine_status(self) -> str:
        leader = self.sim.leader()
        if leader is None or leader.engine is None:
            return "no leader"
        e = leader.engine
        return (
            f"engine plans {e.stats.plans} writes {e.stats.writes} scheduled {len(e.view.schedule)}"
        )


async def wait(cond: Callable[[], bool], within: float, what: str, poll: float = 0.05) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > within:
            raise TimeoutError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(poll)
    return time.monotonic() - start


@contextlib.asynccontextmanager
async def measured(etcd: BenchEtcd) -> AsyncIterator[dict[str, Any]]:
    """Wall time, this process's CPU time, etcd's CPU time and etcd's counters over a block."""
    out: dict[str, Any] = {}
    c0 = etcd.counters()
    cpu0, ecpu0, t0 = time.process_time(), etcd.cpu_seconds(), time.perf_counter()
    try:
        yield out
    finally:
        wall = time.perf_counter() - t0
        out["wall"] = wall
        out["cpu"] = time.process_time() - cpu0
        out["etcd_cpu"] = etcd.cpu_seconds() - ecpu0
        out["counters"] = etcd.counters() - c0


def add_cost(result: ScenarioResult, m: dict[str, Any]) -> None:
    c: EtcdCounters = m["counters"]
    wall = m["wall"]
    result.details["etcd"] = c.as_dict(wall)
    result.details["fleet_cpu_seconds"] = round(m["cpu"], 2)
    result.details["etcd_cpu_seconds"] = round(m["etcd_cpu"], 2)
    result.add("etcd requests", c.total_requests)
    result.add("etcd bytes (in+out)", round(c.total_bytes / 1e6, 2), "MB")
    result.add("fleet CPU (one process)", round(100 * m["cpu"] / wall, 1), "% of a core")
    result.add("etcd CPU", round(100 * m["etcd_cpu"] / wall, 1), "% of a core")
    say(f"  etcd: {c.summary()}")


# ---- scenario 1: place -----------------------------------------------------------------------


async def place(bench: SimBench) -> ScenarioResult:
    opts = bench.opts
    result = ScenarioResult("place")
    names = {n for n, _ in unit_specs(opts.units, opts.templates)}
    submitted = 0

    def status() -> str:
        return (
            f"submitted {submitted}/{len(names)}, {bench.leader_engine_status()}, "
            f"launched {bench.launched()}/{len(names)}"
        )

    where = "in this process" if opts.client_in_process else "from a client process"
    say(
        f"place: {len(names)} units ({min(opts.templates, opts.units)} template instances) on "
        f"{opts.machines} machines, submitted {where}, {opts.submit_concurrency} in flight"
    )
    client: asyncio.subprocess.Process | None = None
    if not opts.client_in_process:
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.submit",
            "--endpoint",
            bench.etcd.endpoint,
            "--units",
            str(opts.units),
            "--templates",
            str(opts.templates),
            "--concurrency",
            str(opts.submit_concurrency),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert client.stdout is not None
        assert client.stdin is not None
        await client.stdout.readline()  # "ready": imports and unit parsing are done
    try:
        async with measured(bench.etcd) as m, progress("place", status):
            t0 = time.perf_counter()
            if client is None:
                specs = unit_specs(opts.units, opts.templates)

                def count(n: int) -> None:
                    nonlocal submitted
                    submitted = n

                await submit_all(bench.client, specs, opts.submit_concurrency, count)
            else:
                assert client.stdout is not None
                assert client.stdin is not None
                client.stdin.write(b"go\n")
                await client.stdin.drain()
                while line := (await client.stdout.readline()).decode():
                    if line.startswith("submitted "):
                        submitted = int(line.split()[1])
                    elif line.startswith("done "):
                        break
                if await client.wait() != 0:
                    raise RuntimeError("the submitting client failed")
            t_submit = time.perf_counter() - t0
            await wait(
                lambda: bench.launched(names) >= len(names), opts.timeout, "all launched", 0.1
            )
            t_all = time.perf_counter() - t0
    finally:
        if client is not None and client.returncode is None:
            client.kill()
            await client.wait()
    specs_count = len(names)
    bench.populated = True
    rate = specs_count / t_all
    result.details.update(
        client="in process" if opts.client_in_process else "separate process",
        units=specs_count,
        machines=opts.machines,
        channels=bench.channel_desc(),
        submit_seconds=round(t_submit, 2),
        engine=bench.leader_engine_status(),
    )
    result.add("submit (client, all units)", round(t_submit, 2), "s")
    result.add("all launched (from first submit)", round(t_all, 2), "s")
    rate_fig = result.add(
        "placement rate", round(rate, 1), "units/s", ">= 500 units/s", rate >= 500
    )
    add_cost(result, m)
    per_unit = m["counters"].total_requests / specs_count
    result.add("etcd requests per unit", round(per_unit, 2))

    say(f"place: raw etcd rate, {opts.raw_txns} single-put txns, {opts.raw_concurrency} in flight")
    raw_kv = bench.kvs[0]
    runs = [
        await raw_txn_rate(bench.etcd, raw_kv, opts.raw_txns, opts.raw_concurrency)
        for _ in range(2)
    ]
    raw, raw_cpu = max(runs)
    ratio = rate / raw
    result.add("raw etcd txn rate (same client)", round(raw, 0), "txn/s")
    result.add("placement / raw rate", round(100 * ratio, 1), "%", ">= 30%", ratio >= 0.3)
    # What bounds that ratio: etcd's CPU for one placed unit, counted in raw transactions (the
    # `costs` scenario splits it by request kind).
    per_unit = m["etcd_cpu"] / specs_count / raw_cpu if raw_cpu > 0 else 0.0
    result.add("etcd CPU per placed unit", round(per_unit, 2), "raw txns")
    if per_unit > 0:
        result.add("  so, with etcd flat out, at most", round(100 / per_unit, 1), "%")
    result.details["rate_met"] = rate_fig.met
    return result


# ---- scenario 2: failover ----------------------------------------------------------------------


async def failover(bench: SimBench) -> ScenarioResult:
    opts = bench.opts
    sim = bench.sim
    result = ScenarioResult("failover")
    before = await bench.client.placements()
    engines = {m.id for m in sim.machines.values() if m.engine is not None}
    candidates = [m for m in sim.machines.values() if m.running and m.id not in engines]
    step = max(1, len(candidates) // max(1, opts.kill))
    victims: list[SimMachine] = candidates[::step][: opts.kill]
    victim_ids = {m.id for m in victims}
    moved = {n for n, p in before.items() if p.machine_id in victim_ids}
    say(
        f"failover: crashing {len(victims)} of {len(sim.machines)} machines (not the engines), "
        f"{len(moved)} units to move, agent_ttl {opts.agent_ttl:g}s"
    )
    gone: dict[str, float] = {}
    machines_prefix = sim.client.keys.machines
    _, revision = await bench.client_kv.range(machines_prefix)

    async def observe() -> None:
        events = bench.client_kv.watch(machines_prefix, revision + 1)
        async for batch in events:
            now = time.perf_counter()
            for ev in batch:
                mid = sim.client.keys.tail(ev.key, machines_prefix)
                if ev.type == "delete" and mid in victim_ids:
                    gone.setdefault(mid, now)

    observer = asyncio.ensure_future(observe())

    def status() -> str:
        return (
            f"leases expired {len(gone)}/{len(victims)}, "
            f"moved units launched {bench.launched(moved)}/{len(moved)}"
        )

    try:
        async with measured(bench.etcd) as m, progress("failover", status):
            t_kill = time.perf_counter()
            await asyncio.gather(*(sim.crash(v) for v in victims))
            await wait(lambda: len(gone) == len(victims), opts.agent_ttl * 3 + 30, "leases expired")
            t_expired = max(gone.values())
            first_expired = min(gone.values())
            await wait(lambda: bench.launched(moved) >= len(moved), opts.timeout, "moved launched")
            t_done = time.perf_counter()
    finally:
        observer.cancel()
        with contextlib.suppress(BaseException):
            await observer
    after = await bench.client.placements()
    needless = sorted(
        n
        for n, p in before.items()
        if p.machine_id not in victim_ids and _machine(after.get(n)) != p.machine_id
    )
    relocated_wrong = sorted(n for n in moved if _machine(after.get(n)) in victim_ids | {None})
    took = t_done - t_expired
    result.details.update(
        killed=len(victims),
        units_moved=len(moved),
        lease_expiry_spread_seconds=round(t_expired - first_expired, 2),
        needless_examples=needless[:10],
        not_relocated=relocated_wrong[:10],
    )
    result.add("kill -> last lease expired", round(t_expired - t_kill, 2), "s")
    result.add("units moved", len(moved))
    result.add(
        "last lease expiry -> all moved launched",
        round(took, 2),
        "s",
        "<= 1 s after expiry",
        took <= 1.0,
    )
    result.add(
        "kill -> all moved launched",
        round(t_done - t_kill, 2),
        "s",
        f"<= agent_ttl+1 = {opts.agent_ttl + 1:g} s",
        t_done - t_kill <= opts.agent_ttl + 1,
    )
    result.add("needless moves", len(needless), "", "0", not needless)
    add_cost(result, m)
    return result


def _machine(p: Placement | None) -> str | None:
    return p.machine_id if p else None


# ---- scenario 3: idle ------------------------------------------------------------------------


async def keepalive_bytes(etcd: BenchEtcd, count: int = 200) -> float:
    """etcd bytes (both ways) of one lease keepalive through EtcdKV: the calibration for
    'traffic within 10% of keepalives alone'. Run on a quiet etcd."""
    kv = EtcdKV(EtcdConfig(endpoints=[etcd.endpoint]))
    try:
        lease = await kv.grant(60)
        await kv.keepalive(lease)
        c0 = etcd.counters()
        for _ in range(count):
            await kv.keepalive(lease)
        c = etcd.counters() - c0
        await kv.revoke(lease)
    finally:
        await kv.close()
    return c.total_bytes / max(1, c.requests.get("LeaseKeepAlive", 0))


async def idle(bench: SimBench, per_keepalive: float) -> ScenarioResult:
    opts = bench.opts
    result = ScenarioResult("idle")
    await asyncio.sleep(3.0)  # let the last state publications land
    ka0 = bench.stats().get("keepalive", 0)
    say(
        f"idle: {opts.machines} machines, {opts.units} units, nothing changing,"
        f" {opts.idle_seconds:g}s"
    )

    def status() -> str:
        s = bench.stats()
        return f"client keepalives {s.get('keepalive', 0) - ka0}, other requests: " + ", ".join(
            f"{k} {v}" for k, v in sorted(s.items()) if k != "keepalive" and v
        )

    s0 = bench.stats()
    async with measured(bench.etcd) as m, progress("idle", status, interval=5.0):
        await asyncio.sleep(opts.idle_seconds)
    s1 = bench.stats()
    c: EtcdCounters = m["counters"]
    wall = m["wall"]
    keepalives = c.requests.get("LeaseKeepAlive", 0)
    others = c.total_requests - keepalives
    expected_bytes = keepalives * per_keepalive
    excess = (c.total_bytes - expected_bytes) / expected_bytes if expected_bytes else 0.0
    cpu = 100 * m["cpu"] / wall
    result.details["client_requests"] = {k: s1.get(k, 0) - s0.get(k, 0) for k in s1}
    result.details["bytes_per_keepalive"] = round(per_keepalive, 1)
    result.add("etcd requests/s", round(c.total_requests / wall, 1), "req/s")
    result.add("  of which keepalives", round(keepalives / wall, 1), "req/s")
    result.add("  other requests", others, "", "0 (no scans)", others == 0)
    result.add("etcd bytes/s", round(c.total_bytes / wall, 0), "B/s")
    result.add(
        "traffic over keepalives alone", round(100 * excess, 1), "%", "<= 10%", excess <= 0.10
    )
    result.add("engine+agents CPU", round(cpu, 2), "% of a core", "< 5%", cpu < 5.0)
    result.add("etcd CPU", round(100 * m["etcd_cpu"] / wall, 2), "% of a core")
    result.details["etcd"] = c.as_dict(wall)
    say(f"  etcd: {c.summary()}")
    return result


# ---- the runner ------------------------------------------------------------------------------


async def run_sim(
    etcd: BenchEtcd,
    opts: SimOptions,
    wanted: list[str],
    extra: dict[str, Callable[[SimBench], Awaitable[ScenarioResult]]] | None = None,
) -> list[ScenarioResult]:
    """Run the wanted simulator scenarios on one cluster, in the order that leaves it usable:
    place (populates), list and idle (read only), costs (keys no one watches), failover
    (kills machines) last."""
    quiet_logging()
    per_keepalive = await keepalive_bytes(etcd) if "idle" in wanted else 0.0
    bench = SimBench(etcd, opts)
    results: list[ScenarioResult] = []
    try:
        await bench.start()
        place_result = await place(bench)
        if "place" in wanted:
            results.append(place_result)
        for name, fn in (extra or {}).items():
            if name in wanted:
                results.append(await _guard(name, fn(bench)))
        if "idle" in wanted:
            results.append(await _guard("idle", idle(bench, per_keepalive)))
        if "costs" in wanted:
            costs = request_costs(bench.etcd, bench.kvs[0], opts.raw_txns)
            results.append(await _guard("costs", costs))
        if "failover" in wanted:
            results.append(await _guard("failover", failover(bench)))
    finally:
        await bench.close()
    return results


async def _guard(name: str, work: Awaitable[ScenarioResult]) -> ScenarioResult:
    try:
        return await work
    except Exception as e:
        say(f"{name}: failed: {e!r}")
        return ScenarioResult(name, error=repr(e))
