"""Time fleetd.engine.scheduler.plan_schedule at cluster scale. Prints figures; never fails on time.

    /work/venv/bin/python benchmarks/bench_scheduler.py [--units 10000] [--machines 1000]

Scenarios: first placement of plain units; first placement of a realistic mix (metadata,
template instances with Conflicts, MachineOf pairs, MachineID, Replaces, global units); the
steady-state engine tick (everything already placed); losing 5% of machines; 10 joining.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from fleetd.engine.scheduler import SchedulePlan, plan_schedule
from fleetd.model import Machine, Requirements, TargetState, Unit

HASH = "5" * 40
REGIONS = ["us-east", "us-west", "eu", "ap"]


def make_machines(count: int) -> dict[str, Machine]:
    machines = {}
    for i in range(count):
        metadata = {"region": REGIONS[i % len(REGIONS)]}
        if i % 2:
            metadata["disk"] = "ssd"
        machine_id = f"{i:08x}" + "0" * 24
        machines[machine_id] = Machine.make(machine_id, f"10.{i // 256}.{i % 256}.1", metadata)
    return machines


def plain_units(count: int) -> tuple[dict[str, Unit], dict[str, Requirements]]:
    units = {
        f"u{i:05d}.service": Unit(f"u{i:05d}.service", HASH, TargetState.LAUNCHED)
        for i in range(count)
    }
    return units, {}


def mixed_units(
    count: int, machines: dict[str, Machine]
) -> tuple[dict[str, Unit], dict[str, Requirements]]:
    """60% plain, 15% MachineMetadata, 10% template instances that conflict with each other,
    8% MachineOf pairs, 2% MachineID, 1% Replaces, the rest plain; plus 5 global units."""
    machine_ids = sorted(machines)
    reqs: dict[str, Requirements] = {}
    names: list[str] = []
    for i in range(count):
        bucket = i % 100
        if bucket < 15:
            name = f"meta{i:05d}.service"
            reqs[name] = Requirements(
                metadata=(("region", frozenset({REGIONS[i % 4], REGIONS[(i + 1) % 4]})),)
            )
        elif bucket < 25:
            template = f"tmpl{i % 10}"
            name = f"{template}@{i}.service"
            reqs[name] = Requirements(conflicts=(f"{template}@*.service",))
        elif bucket < 29:
            name = f"db{i:05d}.service"
        elif bucket < 33:
            name = f"app{i:05d}.service"
            reqs[name] = Requirements(machine_of=(f"db{i - 4:05d}.service",))
        elif bucket < 35:
            name = f"pinned{i:05d}.service"
            reqs[name] = Requirements(machine_id=machine_ids[i % len(machine_ids)][:8])
        elif bucket < 36:
            name = f"v2-{i:05d}.service"
            reqs[name] = Requirements(replaces=(f"v1-{i:05d}.service",))
        else:
            name = f"u{i:05d}.service"
        names.append(name)
    for g in range(5):
        name = f"global{g}.service"
        metadata = (("disk", frozenset({"ssd"})),) if g == 0 else ()
        reqs[name] = Requirements(is_global=True, metadata=metadata)
        names.append(name)
    units = {n: Unit(n, HASH, TargetState.LAUNCHED) for n in names}
    return units, reqs


def best_of(runs: int, call: Callable[[], SchedulePlan]) -> tuple[float, SchedulePlan]:
    best = float("inf")
    result = SchedulePlan()
    for _ in range(runs):
        start = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - start)
    return best, result


def report(label: str, seconds: float, result: SchedulePlan) -> None:
    print(
        f"{label:<44} {seconds * 1000:8.1f} ms   placed={len(result.assignments):6d} "
        f"unplaced={len(result.unplaced):5d} moves={len(result.moves):5d}"
    )


def run_scenarios(
    kind: str,
    units: dict[str, Unit],
    reqs: dict[str, Requirements],
    machines: dict[str, Machine],
    runs: int,
) -> None:
    seconds, first = best_of(runs, lambda: plan_schedule(units, reqs, machines, {}))
    report(f"{kind}: first placement", seconds, first)
    placed = first.assignments
    seconds, result = best_of(runs, lambda: plan_schedule(units, reqs, machines, placed))
    report(f"{kind}: steady state (nothing to do)", seconds, result)
    lost = set(sorted(machines)[::20])
    survivors = {m: v for m, v in machines.items() if m not in lost}
    seconds, result = best_of(runs, lambda: plan_schedule(units, reqs, survivors, placed))
    report(f"{kind}: {len(lost)} machines lost", seconds, result)
    joined = {**machines, **{f"new{i:05d}": Machine.make(f"new{i:05d}") for i in range(10)}}
    seconds, result = best_of(runs, lambda: plan_schedule(units, reqs, joined, placed))
    report(f"{kind}: 10 machines join", seconds, result)
    print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--units", type=int, default=10_000)
    parser.add_argument("--machines", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    machines = make_machines(args.machines)
    print(f"{args.units} units on {args.machines} machines, best of {args.runs}\n")
    run_scenarios("plain", *plain_units(args.units), machines, args.runs)
    run_scenarios("mixed", *mixed_units(args.units, machines), machines, args.runs)


if __name__ == "__main__":
    main()
