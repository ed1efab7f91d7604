"""Prometheus metrics at `/metrics`, on fleetd's own CollectorRegistry.

An own registry, not prometheus-client's global one: two fleetds in one process (tests, the
simulator) must not share or clash over series, and nothing else in the process leaks in.

Most values are read when scraped from the live objects, not pushed on every event: the
engine's and agent's counters, the agent's units, leadership. A scrape costs a few attribute
reads, plus, on a fleetd that does not lead, one cached registry read for the cluster-wide
gauges (the leader has them in memory). Pushed: etcd request metrics (`InstrumentedKV` reports
each request) and the engine's plan durations.

| metric | type | what |
| --- | --- | --- |
| fleet_units{state} | gauge | units by desired state, cluster-wide |
| fleet_machines | gauge | registered machines |
| fleet_engine_leader | gauge | 1 if this fleetd's engine leads |
| fleet_engine_reconcile_seconds | histogram | duration of each engine plan |
| fleet_engine_reconciles_total | counter | engine plans run here |
| fleet_engine_writes_total | counter | schedule writes the engine made here |
| fleet_agent_tasks_total | counter | load/start/stop/unload tasks the agent completed |
| fleet_agent_units{state} | gauge | units this agent runs, by loaded/launched |
| fleet_etcd_requests_total{kind} | counter | etcd requests by kind (get, range, txn, ...) |
| fleet_etcd_request_errors_total{kind} | counter | those that failed |
| fleet_etcd_request_seconds{kind} | histogram | their latency (watches are not timed) |
| fleet_machine_registered | gauge | 1 once this machine is registered in etcd |
| fleet_build_info{version} | gauge | always 1 |
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetd import __version__
from fleetd.engine import EngineStats
from fleetd.errors import FleetError
from fleetd.model import TargetState
from fleetd.registry.registry import Registry

if TYPE_CHECKING:
    from fleetd.agent import Agent
    from fleetd.engine import Engine

log = structlog.get_logger("fleetd.api.metrics")

# A fleetd that does not lead reads the cluster counts from etcd at most this often.
CLUSTER_CACHE_SECONDS = 5.0


class EtcdMetrics:
    """The `RequestObserver` that `InstrumentedKV` reports to."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "fleet_etcd_requests", "etcd requests sent, by kind", ["kind"], registry=registry
        )
        self.errors = Counter(
            "fleet_etcd_request_errors",
            "etcd requests that failed, by kind",
            ["kind"],
            registry=registry,
        )
        self.seconds = Histogram(
            "fleet_etcd_request_seconds",
            "etcd request latency, by kind (watch streams are not timed)",
            ["kind"],
            registry=registry,
        )

    def started(self, kind: str) -> None:
        self.requests.labels(kind).inc()

    def finished(self, kind: str, seconds: float | None, failed: bool) -> None:
        if failed:
            self.errors.labels(kind).inc()
        if seconds is not None:
            self.seconds.labels(kind).observe(seconds)


class TimedEngineStats(EngineStats):
    """EngineStats that also feed each plan's duration to a histogram.

    The engine sets `last_plan_seconds` once per plan; observing that assignment gives every
    plan's duration without the engine knowing about Prometheus.
    """

    def __init__(self, base: EngineStats, histogram: Histogram) -> None:
        super().__init__(base.plans, base.writes, base.last_plan_seconds)
        self._histogram = histogram  # set last: the dataclass __init__ must not be observed

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "last_plan_seconds" and "_histogram" in self.__dict__:
            self._histogram.observe(value)


@dataclass(frozen=True, slots=True)
class ClusterCounts:
    units: dict[str, int]  # desired state -> count
    machines: int


def _counts(states: Iterable[TargetState], machines: int) -> ClusterCounts:
    tally = Tally(s.value for s in states)
    return ClusterCounts({s.value: tally.get(s.value, 0) for s in TargetState}, machines)


class Metrics:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry()
        self.etcd = EtcdMetrics(self.registry)
        self.reconcile_seconds = Histogram(
            "fleet_engine_reconcile_seconds",
            "duration of each engine plan (read the view, plan, write)",
            registry=self.registry,
        )
        self.engine: Engine | None = None
        self.agent: Agent | None = None
        self.registered: Callable[[], bool] = lambda: False
        self._clock = clock
        self._cluster: ClusterCounts | None = None
        self._cluster_read_at = float("-inf")
        self.registry.register(_LiveCollector(self))

    def attach(
        self,
        *,
        engine: Engine | None = None,
        agent: Agent | None = None,
        registered: Callable[[], bool] | None = None,
    ) -> None:
        """Point the scrape-time metrics at the live components (fleetd's wiring calls this)."""
        if engine is not None:
            engine.stats = TimedEngineStats(engine.stats, self.reconcile_seconds)
            self.engine = engine
        if agent is not None:
            self.agent = agent
        if registered is not None:
            self.registered = registered

    def _leader_view_counts(self) -> ClusterCounts | None:
        engine = self.engine
        if engine is None or not engine.is_leader:
            return None
        view = engine.view
        return _counts((u.target_state for u in view.units.values()), len(view.machines))

    async def refresh(self, registry: Registry) -> None:
        """Bring the cluster-wide counts up to date before a scrape: from the engine's memory
        when it leads, else from etcd (cached). On an etcd error they are left out rather
        than shown stale."""
        counts = self._leader_view_counts()
        if counts is not None:
            self._cluster, self._cluster_read_at = counts, self._clock()
            return
        if self._clock() - self._cluster_read_at < CLUSTER_CACHE_SECONDS:
            return
        try:
            units = await registry.list_units()
            machines = await registry.list_machines()
        except FleetError as e:
            log.warning("metrics_cluster_read_failed", error=str(e))
            self._cluster = None
            return
        self._cluster = _counts((u.target_state for u in units), len(machines))
        self._cluster_read_at = self._clock()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect_live(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("fleet_build_info", "fleetd version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "fleet_machine_registered",
            "1 once this machine is registered in etcd",
            value=1 if self.registered() else 0,
        )
        yield from self._collect_cluster()
        yield from self._collect_engine()
        yield from self._collect_agent()

    def _collect_cluster(self) -> Iterator[Metric]:
        cluster = self._cluster
        if cluster is None:
            return
        units = GaugeMetricFamily("fleet_units", "units by desired state", labels=["state"])
        for state, count in cluster.units.items():
            units.add_metric([state], count)
        yield units
        yield GaugeMetricFamily("fleet_machines", "registered machines", value=cluster.machines)

    def _collect_engine(self) -> Iterator[Metric]:
        engine = self.engine
        leader = engine is not None and engine.is_leader
        yield GaugeMetricFamily(
            "fleet_engine_leader", "1 if this fleetd's engine leads", value=1 if leader else 0
        )
        if engine is None:
            return
        yield CounterMetricFamily(
            "fleet_engine_reconciles", "engine plans run here", value=engine.stats.plans
        )
        yield CounterMetricFamily(
            "fleet_engine_writes",
            "schedule writes made by the engine here",
            value=engine.stats.writes,
        )

    def _collect_agent(self) -> Iterator[Metric]:
        agent = self.agent
        if agent is None:
            return
        yield CounterMetricFamily(
            "fleet_agent_tasks", "unit tasks the agent completed", value=agent.tasks_run
        )
        tally = Tally(u.state.value for u in agent.record.units.values())
        units = GaugeMetricFamily(
            "fleet_agent_units", "units this agent runs, by state", labels=["state"]
        )
        for state in (TargetState.LOADED, TargetState.LAUNCHED):
            units.add_metric([state.value], tally.get(state.value, 0))
        yield units


class _LiveCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return list(self._metrics.collect_live())
