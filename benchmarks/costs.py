"""`costs`: what each etcd request a placed unit needs costs etcd, in raw single-put txns.

`place` compares the placement rate with the raw rate (single-put transactions). This scenario
says where the ceiling of that ratio is on this box: every placed unit needs

- the client's create: one transaction writing the unit's record (and its body when new),
  guarded on the unit being absent;
- the agent's read of a body it has never seen (every template instance lands elsewhere);
- the agent's publication of the state it reached, on its machine's lease;
- its share of the engine's fenced schedule writes (64 units, 128 puts, per transaction).

Each kind is sent alone, shaped as fleetd sends it (64 in flight; the engine's chunks one at a
time, where fleetd sends up to 4 at once: what is counted is etcd's CPU per chunk), on the etcd
`place` used, with the simulated cluster's watches still open, under a prefix no
one watches. Its cost is etcd's CPU time per request, and is shown in units of a raw put
measured the same way. If etcd did nothing else and ran flat out, placement could reach at
most 1 / (the sum per unit) of the raw rate.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks.etcd import BenchEtcd
from benchmarks.report import ScenarioResult, say
from benchmarks.submit import bounded
from fleetd.registry.kv import KV, MAX_TXN_OPS, Compare, Put

PREFIX = "/bench-cost/"
BODY = "[Unit]\nDescription=bench unit {i}\n\n[Service]\nExecStart=/bin/sleep infinity\n"
DESIRED = '{"hash":"%s","target_state":"launched"}'
STATE = (
    '{"load":"loaded","active":"active","sub":"running",'
    '"hash":"0123456789abcdef0123456789abcdef01234567","agent":"launched"}'
)
CHUNK_UNITS = MAX_TXN_OPS // 2  # the engine's fenced transactions: two ops per unit


Job = Callable[[], Awaitable[Any]]


def _body_key(i: int) -> tuple[str, str]:
    text = BODY.format(i=i)
    return f"{PREFIX}bodies/{hashlib.sha1(text.encode()).hexdigest()}", text


async def _cpu_per_item(
    etcd: BenchEtcd, jobs: list[Job], concurrency: int, items: int
) -> tuple[float, float]:
    """(etcd CPU seconds per item, items per second) for running `jobs`."""
    cpu0, t0 = etcd.cpu_seconds(), time.perf_counter()
    await bounded(concurrency, jobs)
    wall = time.perf_counter() - t0
    return (etcd.cpu_seconds() - cpu0) / items, items / wall


async def raw_txn_rate(
    etcd: BenchEtcd, kv: KV, count: int, concurrency: int
) -> tuple[float, float]:
    """Single-put transactions per second one client achieves (etcd's limit on this box), and
    etcd's CPU seconds per transaction: the unit every cost here is counted in."""
    value = "x" * 60  # about a desired-state record

    def job(i: int) -> Job:
        return lambda: kv.txn([], [Put(f"/bench-raw/{i:06d}", value)])

    cpu, rate = await _cpu_per_item(etcd, [job(i) for i in range(count)], concurrency, count)
    return rate, cpu


async def request_costs(etcd: BenchEtcd, kv: KV, count: int = 5000) -> ScenarioResult:
    result = ScenarioResult("costs")
    say(f"costs: {count} requests of each kind a placed unit needs, alone, on etcd")
    base_rate, base = await raw_txn_rate(etcd, kv, count, 64)
    result.details["raw single-put txn"] = {
        "etcd_cpu_us": round(base * 1e6, 1),
        "per_s": round(base_rate),
    }
    if base <= 0:
        # etcd's CPU time is read in clock ticks (10 ms): a few requests can measure nothing.
        result.error = f"etcd used no measurable CPU for {count} raw txns: raise --raw-txns"
        return result
    lease = await kv.grant(120)
    leader = f"{PREFIX}leader"
    await kv.txn([], [Put(leader, "m0")])
    found = await kv.get(leader)
    assert found is not None
    leader_rev = found.create_revision

    def create(i: int) -> Job:
        body_key, text = _body_key(i)
        unit_key = f"{PREFIX}units/u{i:06d}.service"
        guards = [Compare(unit_key, "version", "==", 0), Compare(body_key, "version", "==", 0)]
        ops = [Put(body_key, text), Put(unit_key, DESIRED % body_key[-40:])]
        return lambda: kv.txn(guards, ops)

    def read_body(i: int) -> Job:
        return lambda: kv.get(_body_key(i)[0])

    def publish(i: int) -> Job:
        key = f"{PREFIX}states/u{i:06d}.service/m{i % 1000:04d}"
        return lambda: kv.txn([], [Put(key, STATE, lease)])

    def engine_chunk(c: int) -> Job:
        ops: list[Put] = []
        for u in range(c * CHUNK_UNITS, (c + 1) * CHUNK_UNITS):
            machine = f"m{u % 1000:04d}"
            ops.append(Put(f"{PREFIX}schedule/{machine}/u{u:06d}.service", DESIRED % ("0" * 40)))
            placement = '{"machine":"' + machine + '"}'
            ops.append(Put(f"{PREFIX}placements/u{u:06d}.service", placement))
        guard = Compare(leader, "create", "==", leader_rev)
        return lambda: kv.txn([guard], ops)

    chunks = max(1, count // CHUNK_UNITS)
    kinds: list[tuple[str, list[Job], int, int]] = [
        ("client create (txn: body + record)", [create(i) for i in range(count)], 64, count),
        ("agent body read (Range)", [read_body(i) for i in range(count)], 64, count),
        ("agent state publication (txn, lease)", [publish(i) for i in range(count)], 64, count),
        (
            "engine schedule write, per unit (64 a txn)",
            [engine_chunk(c) for c in range(chunks)],
            1,
            chunks * CHUNK_UNITS,
        ),
    ]
    costs: dict[str, float] = {}
    for name, jobs, concurrency, items in kinds:
        per_item, rate = await _cpu_per_item(etcd, jobs, concurrency, items)
        costs[name] = per_item
        result.details[name] = {"etcd_cpu_us": round(per_item * 1e6, 1), "per_s": round(rate)}
        say(f"  [costs] {name}: {per_item * 1e6:.0f} us of etcd CPU, {rate:.0f}/s")
    await kv.revoke(lease)
    result.add("etcd CPU per raw single-put txn", round(base * 1e6, 1), "us")
    for name, cost in costs.items():
        result.add(f"  {name}", round(cost / base, 2), "raw txns")
    per_unit = sum(costs.values()) / base
    result.add("a placed unit costs etcd", round(per_unit, 2), "raw txns")
    # No verdict: this bounds place's ratio from above; watches and keepalives, which a real
    # placement also costs etcd, are left out (place reports what a unit cost in its own run).
    result.add("so placement / raw rate is at most", round(100 / per_unit, 1), "%")
    return result
