"""`python -m benchmarks <scenario|all> [options] [--json out.json]` (run from the checkout).

Scenarios (see docs/scaling.md for what each measures and the targets):

  place     10,000 units (1,000 template instances) started on 1,000 simulated machines
  list      fleetctl list-units / list-unit-files on those 10,000 units (runs after place)
  idle      1,000 machines and 10,000 units, nothing changing (runs after place)
  costs     etcd CPU of each request kind a placed unit needs, in raw txns (runs after place)
  failover  crash 100 of the 1,000 machines; time until their units run elsewhere
  drain     4 simulated machines, 100 units on one: drain it (make-before-break), time to empty
  latency   real 3-machine nspawn cluster: fleetctl start to active; machine kill to moved
  kill      real 3-machine nspawn cluster: machine kill to moved, 20 runs, with the breakdown
  agent     real nspawn machine: 1,000 units started by one fleetd; idle CPU and D-Bus rate
  footprint real nspawn machine: fleetd RSS and idle CPU at 20 and 1,000 units
  scheduler the pure scheduler alone (benchmarks/bench_scheduler.py)
  plan      `fleetctl plan --kill` on 10,000 units / 1,000 machines (benchmarks/bench_plan.py)

The simulator scenarios (place, list, idle, costs, failover) share one cluster on one etcd that the
command starts and always tears down. latency, agent and footprint need root and
systemd-nspawn; without them they are skipped with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.report import ScenarioResult, say, table

SIM = ["place", "list", "idle", "costs", "failover"]
CLUSTER = ["latency", "kill", "agent", "footprint"]
ALL = [*SIM, "drain", *CLUSTER]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "scenarios", nargs="+", choices=[*ALL, "scheduler", "plan", "all", "sim", "cluster"]
    )
    p.add_argument("--machines", type=int, default=1000, help="simulated machines")
    p.add_argument("--units", type=int, default=10_000, help="units (simulator scenarios)")
    p.add_argument("--templates", type=int, default=1000, help="of --units, template instances")
    p.add_argument("--agent-ttl", type=float, default=10.0, help="simulated machines' TTL, s")
    p.add_argument("--engines", type=int, default=3, help="simulated machines running an engine")
    p.add_argument(
        "--channels",
        type=int,
        default=1,
        help="EtcdKVs (etcd connections) shared by the simulated machines (0: one per machine)",
    )
    p.add_argument("--submit-concurrency", type=int, default=64)
    p.add_argument(
        "--client-in-process",
        action="store_true",
        help="place: submit units from the simulator's process (default: a client process)",
    )
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--kill", type=int, default=100, help="machines crashed by failover")
    p.add_argument("--drain-units", type=int, default=100, help="units on the drained machine")
    p.add_argument(
        "--raw-txns", type=int, default=5000, help="place's raw rate, and costs, per request kind"
    )
    p.add_argument("--list-runs", type=int, default=3)
    p.add_argument("--latency-runs", type=int, default=20)
    p.add_argument("--kill-runs", type=int, default=20, help="machine kills by kill")
    p.add_argument("--agent-units", type=int, default=1000, help="units on one real machine")
    p.add_argument("--footprint-seconds", type=float, default=30.0)
    p.add_argument("--json", type=Path, help="write every figure here")
    return p.parse_args(argv)


def expand(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        group = {"all": ALL, "sim": SIM, "cluster": CLUSTER}.get(n, [n])
        out += [g for g in group if g not in out]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    wanted = expand(args.scenarios)
    started = time.monotonic()
    results: list[ScenarioResult] = []
    try:
        if "scheduler" in wanted:
            from benchmarks import bench_scheduler

            bench_scheduler.main([])
        if "plan" in wanted:
            from benchmarks import bench_plan

            results.append(bench_plan.scenario(args.units, args.machines))
        sim = [s for s in wanted if s in SIM]
        if sim:
            results += run_simulator(args, sim)
        if "drain" in wanted:
            results.append(run_drain(args))
        cluster = [s for s in wanted if s in CLUSTER]
        if cluster:
            from benchmarks.cluster import ClusterOptions, run_cluster

            results += run_cluster(
                ClusterOptions(
                    latency_runs=args.latency_runs,
                    kill_runs=args.kill_runs,
                    agent_units=args.agent_units,
                    footprint_seconds=args.footprint_seconds,
                ),
                cluster,
            )
    except KeyboardInterrupt:
        say("interrupted: everything started was torn down")
        return 130
    elapsed = time.monotonic() - started
    print()
    print(table(results))
    print(f"\n({elapsed:.0f} s in all)")
    if args.json:
        doc: dict[str, Any] = {
            "argv": sys.argv[1:],
            "host": {"python": platform.python_version(), "machine": platform.machine()},
            "seconds": round(elapsed, 1),
            "results": [r.as_dict() for r in results],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        say(f"figures written to {args.json}")
    return 1 if any(r.error for r in results) else 0


def run_simulator(args: argparse.Namespace, wanted: list[str]) -> list[ScenarioResult]:
    from benchmarks.etcd import bench_etcd
    from benchmarks.listing import list_scenario
    from benchmarks.sim import SimBench, SimOptions, run_sim
    from fleetd import collector

    # The simulated machines run fleetd's code in this process: give it fleetd's GC settings.
    collector.tune()

    opts = SimOptions(
        machines=args.machines,
        units=args.units,
        templates=args.templates,
        agent_ttl=args.agent_ttl,
        engines=args.engines,
        channels=args.channels,
        submit_concurrency=args.submit_concurrency,
        idle_seconds=args.idle_seconds,
        kill=args.kill,
        raw_txns=args.raw_txns,
        client_in_process=args.client_in_process,
    )
    with bench_etcd() as etcd:
        say(f"etcd {etcd.endpoint} (pid {etcd.pid}, data in {etcd.tmp})")

        async def listing(bench: SimBench) -> ScenarioResult:
            return await list_scenario(bench, args.list_runs)

        return asyncio.run(run_sim(etcd, opts, wanted, {"list": listing}))


def run_drain(args: argparse.Namespace) -> ScenarioResult:
    from benchmarks.drain import drain_scenario
    from benchmarks.etcd import bench_etcd

    with bench_etcd() as etcd:
        return asyncio.run(drain_scenario(etcd, args.drain_units))


if __name__ == "__main__":
    sys.exit(main())
