"""/metrics: the instrumented KV, the lazily collected values, and the whole set over a
simulated one-machine cluster (real presence, engine and agent code over FakeKV)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from test_api_harness import HELLO, M1, V1, Api, serving_api

from fleetd import __version__
from fleetd.api.app import make_app
from fleetd.api.context import ApiContext
from fleetd.api.metrics import CLUSTER_CACHE_SECONDS, Metrics
from fleetd.engine.engine import Engine
from fleetd.errors import Compacted, RegistryUnavailable
from fleetd.model import TargetState
from fleetd.registry.fake import FakeKV
from fleetd.registry.instrumented import InstrumentedKV
from fleetd.registry.kv import Put
from fleetd.registry.registry import Registry
from fleetd.sim import SimCluster
from fleetd.unit.file import parse_unit


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with serving_api() as harness:
        yield harness


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text page."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, bool | None]] = []

    def started(self, kind: str) -> None:
        self.events.append(("started", kind, None))

    def finished(self, kind: str, seconds: float | None, failed: bool) -> None:
        assert (seconds is None) == (kind == "watch")
        self.events.append(("finished", kind, failed))


async def test_instrumented_kv_reports_each_request() -> None:
    fake = FakeKV()
    recorder = Recorder()
    kv = InstrumentedKV(fake, recorder)
    lease = await kv.grant(10)
    await kv.txn([], [Put("/a", "1", lease)])
    assert (await kv.get("/a")) is not None
    assert len((await kv.range("/"))[0]) == 1
    await kv.keepalive(lease)
    await kv.revoke(lease)
    fake.fail_next()
    with pytest.raises(RegistryUnavailable):
        await kv.get("/a")
    assert recorder.events == [
        ("started", "grant", None),
        ("finished", "grant", False),
        ("started", "txn", None),
        ("finished", "txn", False),
        ("started", "get", None),
        ("finished", "get", False),
        ("started", "range", None),
        ("finished", "range", False),
        ("started", "keepalive", None),
        ("finished", "keepalive", False),
        ("started", "revoke", None),
        ("finished", "revoke", False),
        ("started", "get", None),
        ("finished", "get", True),
    ]


async def test_instrumented_watch_passes_events_and_failures_through() -> None:
    fake = FakeKV()
    recorder = Recorder()
    kv = InstrumentedKV(fake, recorder)
    await fake.txn([], [Put("/w/a", "1")])
    stream = kv.watch("/w/", 1)
    batch = await stream.__anext__()
    assert [e.key for e in batch] == ["/w/a"]
    assert recorder.events == [("started", "watch", None)]
    fake.set_unavailable(True)
    with pytest.raises(RegistryUnavailable):
        await stream.__anext__()
    assert recorder.events[-1] == ("finished", "watch", True)
    fake.set_unavailable(False)
    # an early close by the consumer is no failure, and closes the inner watch
    stream = kv.watch("/w/", 1)
    await stream.__anext__()
    await stream.aclose()
    assert recorder.events[-1] == ("finished", "watch", False)
    await fake.compact(fake.revision)
    with pytest.raises(Compacted):
        await kv.watch("/w/", 1).__anext__()


def test_an_attached_engine_feeds_each_plan_to_the_histogram() -> None:
    metrics = Metrics()
    engine = Engine(Registry(FakeKV()), M1, lambda: asyncio.sleep(0, 1))
    metrics.attach(engine=engine)
    for seconds in (0.25, 0.5):
        for observe in engine.plan_observers:
            observe(seconds)
    got = samples(metrics.render().decode())
    assert got[("fleet_engine_reconcile_seconds_count", ())] == 2
    assert got[("fleet_engine_reconcile_seconds_sum", ())] == 0.75


def test_histograms_match_prometheus_clients() -> None:
    """Our plain histogram puts values (bounds included) where prometheus-client's would."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    registry = CollectorRegistry()
    theirs = Histogram("fleet_engine_reconcile_seconds", "x", registry=registry)
    metrics = Metrics()
    for value in (0.0, 0.005, 0.0051, 0.1, 1.0, 9.99, 10.0, 10.01, 1e6):
        theirs.observe(value)
        metrics.reconcile_seconds.observe(value)

    def buckets(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            k: v
            for k, v in samples(text).items()
            if k[0].startswith("fleet_engine_reconcile_seconds_") and not k[0].endswith("_created")
        }

    assert buckets(metrics.render().decode()) == buckets(generate_latest(registry).decode())


def test_prometheus_client_is_imported_at_the_first_scrape_only() -> None:
    code = (
        "import sys, fleetd.server\n"
        "from fleetd.api.metrics import Metrics\n"
        "m = Metrics(); m.etcd.started('get'); m.etcd.finished('get', 0.1, False)\n"
        "assert 'prometheus_client' not in sys.modules\n"
        "m.render()\n"
        "assert 'prometheus_client' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_metrics_route_with_no_components(api: Api) -> None:
    await api.add_machine(M1)
    await api.add_unit("a.service", HELLO, TargetState.LAUNCHED)
    await api.add_unit("b.service", HELLO, TargetState.LAUNCHED)
    await api.add_unit("c.service", HELLO, TargetState.LOADED)
    response = await api.client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    got = samples(await response.text())
    assert got[("fleet_units", (("state", "launched"),))] == 2
    assert got[("fleet_units", (("state", "loaded"),))] == 1
    assert got[("fleet_units", (("state", "inactive"),))] == 0
    assert got[("fleet_machines", ())] == 1
    assert got[("fleet_engine_leader", ())] == 0
    assert got[("fleet_build_info", (("version", __version__),))] == 1
    assert got[("fleet_etcd_requests_total", (("kind", "range"),))] >= 3
    assert ("fleet_agent_tasks_total", ()) not in got  # no agent attached
    assert "python_gc" not in await response.text()  # own registry: no global collectors


async def test_cluster_counts_are_cached_and_dropped_on_errors(api: Api) -> None:
    now = [100.0]
    metrics = Metrics(clock=lambda: now[0])
    await api.add_unit("a.service")
    await metrics.refresh(api.registry)
    reads = api.fake.stats["range"]
    await metrics.refresh(api.registry)
    assert api.fake.stats["range"] == reads  # cached
    now[0] += CLUSTER_CACHE_SECONDS
    api.fake.set_unavailable(True)
    await metrics.refresh(api.registry)
    api.fake.set_unavailable(False)
    got = samples(metrics.render().decode())
    assert ("fleet_units", (("state", "inactive"),)) not in got  # not shown stale


async def wait_for(cond: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_metrics_of_a_running_fleetd(tmp_path: Path) -> None:
    """One simulated machine, metrics attached as fleetd's wiring does, scraped over HTTP."""
    metrics = Metrics()
    kv = InstrumentedKV(FakeKV(), metrics.etcd)
    sim = SimCluster(kv, agent_ttl=1.0, safety_interval=0.5, state_dir=tmp_path)
    machine = sim.add(M1)
    assert machine.engine is not None
    metrics.attach(
        engine=machine.engine, agent=machine.agent, registered=machine.presence.registered.is_set
    )
    ctx = ApiContext(
        machine.registry,
        machine_id=M1,
        registered=machine.presence.registered.is_set,
        metrics=metrics,
    )
    client = TestClient(TestServer(make_app(ctx)))
    await client.start_server()
    try:
        await sim.start_all()
        await wait_for(lambda: machine.engine is not None and machine.engine.is_leader)
        await sim.client.create_unit("hello.service", parse_unit(HELLO), TargetState.LAUNCHED)
        await wait_for(
            lambda: (
                machine.manager._states.get("hello.service") is not None
                and machine.manager._states["hello.service"].active_state == "active"
            )
        )
        await wait_for(lambda: len(machine.agent.record.units) == 1)
        got = samples(await (await client.get("/metrics")).text())
        engine = machine.engine
        assert got[("fleet_engine_leader", ())] == 1
        assert got[("fleet_machine_registered", ())] == 1
        assert got[("fleet_units", (("state", "launched"),))] == 1
        assert got[("fleet_machines", ())] == 1
        assert got[("fleet_engine_reconciles_total", ())] == engine.stats.plans >= 1
        assert got[("fleet_engine_reconcile_seconds_count", ())] == engine.stats.plans
        assert got[("fleet_engine_writes_total", ())] == engine.stats.writes >= 1
        assert got[("fleet_agent_tasks_total", ())] == machine.agent.tasks_run >= 2
        assert got[("fleet_agent_units", (("state", "launched"),))] == 1
        assert got[("fleet_agent_units", (("state", "loaded"),))] == 0
        for kind in ("grant", "txn", "range", "get", "watch"):
            assert got[("fleet_etcd_requests_total", (("kind", kind),))] >= 1, kind
        assert got[("fleet_etcd_request_seconds_count", (("kind", "txn"),))] >= 1
        # the API over it answers as fleet's
        status = (await client.get(f"{V1}/units/hello.service")).status
        assert status == 200
    finally:
        await client.close()
        await sim.close()
