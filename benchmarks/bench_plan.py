"""Time `fleetctl plan --kill` at cluster scale: the what-if prediction (fleetd/engine/whatif.py).

    python -m benchmarks plan [--units 10000] [--machines 1000] [--runs 3]

A synthetic cluster of real unit files (60% plain, 15% MachineMetadata, 10% template instances
that conflict with each other, 8% MachineOf pairs, 2% MachineID, 1% Replaces, and 5 global
units), placed by the engine's planner. Then, best of --runs:

- predict, kill 1 / 10 machines: the pure part (settle the view, plan it without them);
- predict, start 100 new units; explain an unplaceable unit (`fleetctl why`);
- `fleetctl plan --kill` end to end as the etcd driver runs it, on FakeKV (no network): a fresh
  registry (cold body cache, as a new fleetctl has) loads the snapshot (range reads, bodies
  parsed, requirements) and predicts. The API does the same in fleetd.

Prints figures; never fails on time.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

from benchmarks.bench_scheduler import REGIONS, make_machines
from benchmarks.report import ScenarioResult
from fleetd import whatif_load
from fleetd.engine.plan import EngineView
from fleetd.engine.whatif import Action, Hypothesis, Start, explain, hypothesis, predict, settle
from fleetd.model import Machine, TargetState, Unit
from fleetd.registry.fake import FakeKV
from fleetd.registry.kv import MAX_TXN_OPS, Op
from fleetd.registry.registry import Registry
from fleetd.unit.file import UnitFile, parse_unit
from fleetd.unit.xfleet import requirements

T = TypeVar("T")
EXEC = "[Service]\nExecStart=/bin/sleep 3600\n"


def body(x_fleet: str = "") -> UnitFile:
    return parse_unit(EXEC + (f"\n[X-Fleet]\n{x_fleet}\n" if x_fleet else ""))


def make_units(count: int, machine_ids: list[str]) -> dict[str, UnitFile]:
    """name -> unit file, the mix of benchmarks/bench_scheduler.py as real [X-Fleet] text."""
    plain = body()
    units: dict[str, UnitFile] = {}
    for i in range(count):
        bucket = i % 100
        if bucket < 15:
            regions = f"region={REGIONS[i % 4]},region={REGIONS[(i + 1) % 4]}"
            units[f"meta{i:05d}.service"] = body(f"MachineMetadata={regions}")
        elif bucket < 25:
            template = f"tmpl{i % 10}"
            units[f"{template}@{i}.service"] = body(f"Conflicts={template}@*.service")
        elif bucket < 29:
            units[f"db{i:05d}.service"] = plain
        elif bucket < 33:
            units[f"app{i:05d}.service"] = body(f"MachineOf=db{i - 4:05d}.service")
        elif bucket < 35:
            units[f"pinned{i:05d}.service"] = body(
                f"MachineID={machine_ids[i % len(machine_ids)][:8]}"
            )
        elif bucket < 36:
            units[f"v2-{i:05d}.service"] = body(f"Replaces=v1-{i:05d}.service")
        else:
            units[f"u{i:05d}.service"] = plain
    for g in range(5):
        units[f"global{g}.service"] = body(
            "Global=true" + ("\nMachineMetadata=disk=ssd" if not g else "")
        )
    units["nowhere.service"] = body("MachineMetadata=region=mars")  # for `why`
    return units


def make_view(units: dict[str, UnitFile], machines: dict[str, Machine]) -> EngineView:
    """The cluster after the engine placed everything (one plan, applied)."""
    view = EngineView(
        units={n: Unit(n, b.hash, TargetState.LAUNCHED) for n, b in units.items()},
        requirements={n: requirements(b, n) for n, b in units.items()},
        machines=dict(machines),
    )
    settled, _ = settle(view)
    return settled


def best_of(runs: int, call: Callable[[], T]) -> tuple[float, T]:
    best = float("inf")
    result: T | None = None
    for _ in range(runs):
        start = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - start)
    assert result is not None
    return best, result


async def write_registry(
    units: dict[str, UnitFile], machines: dict[str, Machine], view: EngineView
) -> FakeKV:
    """The registry a running cluster would hold for `view` (engine writes unfenced)."""
    kv = FakeKV()
    registry = Registry(kv)
    await registry.ensure_schema()
    lease = await kv.grant(3600)
    for machine in machines.values():
        await registry.register_machine(machine, lease)
    await registry.create_units([(n, b, TargetState.LAUNCHED) for n, b in units.items()])
    ops: list[Op] = []
    for name, entry in view.schedule.items():
        ops += registry.op_schedule(view.units[name], entry.machine_id)
    for name, placement in view.placements.items():
        if placement.machine_id is None:
            ops += registry.op_unplaced(name, placement.reason)
    for unit in view.globals.values():
        ops += registry.op_global(unit)
    for i in range(0, len(ops), MAX_TXN_OPS):
        await kv.txn([], ops[i : i + MAX_TXN_OPS])
    return kv


def report(result: ScenarioResult, label: str, seconds: float, detail: str = "") -> None:
    print(f"{label:<58} {seconds * 1000:8.1f} ms   {detail}")
    result.add(label, round(seconds * 1000, 1), "ms")


def scenario(units: int = 10_000, machine_count: int = 1_000, runs: int = 3) -> ScenarioResult:
    """Build the cluster, time each figure, print it; the figures for `--json`."""
    result = ScenarioResult("plan")
    started = time.perf_counter()
    machines = make_machines(machine_count)
    ids = sorted(machines)
    files = make_units(units, ids)
    view = make_view(files, machines)
    print(
        f"plan --kill: {len(view.units)} units ({len(view.schedule)} placed) on"
        f" {len(machines)} machines, best of {runs}"
        f" (cluster built in {time.perf_counter() - started:.1f} s)\n"
    )
    busiest = max(ids, key=lambda m: sum(1 for s in view.schedule.values() if s.machine_id == m))
    seconds, p = best_of(runs, lambda: predict(view, Hypothesis(kill=frozenset({busiest}))))
    moved, unplaced = p.count(Action.MOVE), len(p.unplaced)
    report(
        result,
        "predict: kill the busiest machine (pure)",
        seconds,
        f"moves={moved} unplaced={unplaced}",
    )
    ten = frozenset(ids[::100][:10])
    seconds, p = best_of(runs, lambda: predict(view, Hypothesis(kill=ten)))
    moved, unplaced = p.count(Action.MOVE), len(p.unplaced)
    report(
        result,
        f"predict: kill {len(ten)} machines (pure)",
        seconds,
        f"moves={moved} unplaced={unplaced}",
    )
    change = hypothesis(view, [Start(f"new{i:03d}.service", body()) for i in range(100)])
    seconds, p = best_of(runs, lambda: predict(view, change))
    report(
        result, "predict: start 100 new units (pure)", seconds, f"placed={p.count(Action.PLACE)}"
    )
    seconds, e = best_of(runs, lambda: explain(view, "nowhere.service"))
    report(result, "explain: an unplaceable unit (pure)", seconds, f"fixes={len(e.fixes)}")

    kv = asyncio.run(write_registry(files, machines, view))

    async def end_to_end() -> tuple[float, float]:
        """`fleetctl plan --kill` as the etcd driver runs it, timed in its two halves."""
        registry = Registry(kv)  # a new fleetctl: nothing cached
        start = time.perf_counter()
        snapshot = await whatif_load.load_snapshot(registry)
        loaded = time.perf_counter()
        change = hypothesis(snapshot.view, [], [busiest[:8]])
        predict(snapshot.view, change, revision=snapshot.revision)
        return loaded - start, time.perf_counter() - loaded

    timings = [asyncio.run(end_to_end()) for _ in range(runs)]
    load, plan_ = min(timings, key=sum)
    first = sum(timings[0])
    report(result, "fleetctl plan --kill end to end (etcd driver, FakeKV)", load + plan_)
    report(result, "  of which: reading the registry into the view", load)
    report(result, "  of which: the prediction", plan_)
    report(result, "  the first run (the process's caches cold too)", first)
    print(f"\n({time.perf_counter() - started:.1f} s in all)")
    return result


def main(argv: list[str] | None = None) -> ScenarioResult:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--units", type=int, default=10_000)
    parser.add_argument("--machines", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    return scenario(args.units, args.machines, args.runs)


if __name__ == "__main__":
    main()
