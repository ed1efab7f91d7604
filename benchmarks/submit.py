"""The benchmark's client: submits and starts units, as fleetctl or an API client would.

`place` runs it as its own process (`python -m benchmarks.submit`), because a real client runs
apart from the cluster: in the simulator's process it would take CPU from the 1,000 simulated
machines that share one core. It prints `submitted N` lines while it works and
`done SECONDS` at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fleetd.errors import FleetError
from fleetd.etcd.client import EtcdConfig, EtcdKV
from fleetd.model import TargetState
from fleetd.registry.registry import Registry
from fleetd.unit.file import UnitFile, parse_unit

TEMPLATE_TEXT = (
    "[Unit]\nDescription=bench instance %i\n\n[Service]\nExecStart=/bin/sleep infinity\n"
)


def unit_specs(count: int, templates: int) -> list[tuple[str, UnitFile]]:
    """`count` units: `templates` instances of bench@.service, the rest distinct units."""
    template = parse_unit(TEMPLATE_TEXT)
    specs = [(f"bench@{i}.service", template) for i in range(min(templates, count))]
    for i in range(count - len(specs)):
        text = f"[Unit]\nDescription=bench unit {i}\n\n[Service]\nExecStart=/bin/sleep infinity\n"
        specs.append((f"u{i:05d}.service", parse_unit(text)))
    return specs


async def bounded(concurrency: int, jobs: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    sem = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with sem:
            return await job()

    return await asyncio.gather(*(one(j) for j in jobs))


async def submit_all(
    registry: Registry,
    specs: list[tuple[str, UnitFile]],
    concurrency: int,
    on_progress: Callable[[int], None] = lambda n: None,
) -> None:
    done = 0

    async def submit(name: str, unit: UnitFile) -> None:
        nonlocal done
        for _ in range(5):
            try:
                await registry.create_unit(name, unit, TargetState.LAUNCHED)
                break
            except FleetError:
                await asyncio.sleep(0.5)
        done += 1
        on_progress(done)

    def job(name: str, unit: UnitFile) -> Callable[[], Awaitable[None]]:
        return lambda: submit(name, unit)

    await bounded(concurrency, [job(n, u) for n, u in specs])


async def main(endpoint: str, units: int, templates: int, concurrency: int) -> None:
    specs = unit_specs(units, templates)
    kv = EtcdKV(EtcdConfig(endpoints=[endpoint], request_timeout=30.0))
    last = 0.0

    def report(n: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last > 0.25 or n == len(specs):
            last = now
            print(f"submitted {n}", flush=True)

    print("ready", flush=True)
    sys.stdin.readline()  # the parent says go once it has read its own counters
    started = time.perf_counter()
    try:
        await submit_all(Registry(kv), specs, concurrency, report)
    finally:
        await kv.close()
    print(f"done {time.perf_counter() - started:.3f}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--units", type=int, required=True)
    p.add_argument("--templates", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=64)
    a = p.parse_args()
    asyncio.run(main(a.endpoint, a.units, a.templates, a.concurrency))
