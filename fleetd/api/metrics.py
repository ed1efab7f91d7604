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

prometheus-client is imported at the first scrape, not with fleetd: most fleetds are never
scraped, and the library (with the http.server, wsgiref and email modules it pulls in) costs
a fleetd about 1 MB of its resident memory. Until then the pushed values are kept in the
plain counters and histograms below, which also cost less per etcd request than
prometheus-client's locked ones; at a scrape they are handed to prometheus-client as metric
families (with the same `_created` series its own Counter and Histogram write), so the page is
what it was with prometheus-client's metric objects.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import structlog

from fleetd import __version__
from fleetd.errors import FleetError
from fleetd.model import TargetState
from fleetd.registry.registry import Registry

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

log = structlog.get_logger("fleetd.api.metrics")

# A fleetd that does not lead reads the cluster counts from etcd at most this often.
CLUSTER_CACHE_SECONDS = 5.0


# prometheus-client's default histogram buckets (Histogram.DEFAULT_BUCKETS), upper bounds
# in seconds; +Inf is implied.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


def _float_text(value: float) -> str:
    # How prometheus-client names a bucket bound (floatToGoString).
    return repr(float(value))


_BUCKET_LABELS = (*(_float_text(b) for b in BUCKETS), "+Inf")


class Histogram:
    """A histogram with prometheus-client's default buckets; `observe` is all the hot path
    does. Not thread-safe: everything that observes runs on fleetd's event loop."""

    __slots__ = ("counts", "created", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # per bucket, not cumulative; last is +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out = []
        total = 0
        for label, count in zip(_BUCKET_LABELS, self.counts, strict=True):
            total += count
            out.append((label, float(total)))
        return out


class EtcdMetrics:
    """The `RequestObserver` that `InstrumentedKV` reports to: per-kind counts (and when
    each kind was first seen, for the `_created` series), and per-kind latency."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.seconds: dict[str, Histogram] = {}
        self.created: dict[tuple[str, str], float] = {}  # (series, kind) -> first seen

    def _count(self, series: dict[str, int], name: str, kind: str) -> None:
        if kind in series:
            series[kind] += 1
        else:
            series[kind] = 1
            self.created[(name, kind)] = time.time()

    def started(self, kind: str) -> None:
        self._count(self.requests, "requests", kind)

    def finished(self, kind: str, seconds: float | None, failed: bool) -> None:
        if failed:
            self._count(self.errors, "errors", kind)
        if seconds is not None:
            histogram = self.seconds.get(kind)
            if histogram is None:
                histogram = self.seconds[kind] = Histogram()
            histogram.observe(seconds)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        for series, name, doc in (
            ("requests", "fleet_etcd_requests", "etcd requests sent, by kind"),
            ("errors", "fleet_etcd_request_errors", "etcd requests that failed, by kind"),
        ):
            family = CounterMetricFamily(name, doc, labels=["kind"])
            for kind, count in getattr(self, series).items():
                family.add_metric([kind], count, created=self.created[(series, kind)])
            yield family
        yield _histogram_family(
            "fleet_etcd_request_seconds",
            "etcd request latency, by kind (watch streams are not timed)",
            self.seconds,
        )


def _histogram_family(name: str, doc: str, children: dict[str, Histogram]) -> Metric:
    """A histogram family as prometheus-client's Histogram writes it, `_created` included;
    the key "" is an unlabelled histogram."""
    from prometheus_client.core import HistogramMetricFamily
    from prometheus_client.samples import Sample

    labelled = "" not in children
    family = HistogramMetricFamily(name, doc, labels=["kind"] if labelled else None)
    for kind, histogram in children.items():
        family.add_metric([kind] if labelled else [], histogram.cumulative(), histogram.sum)
        labels = {"kind": kind} if labelled else {}
        family.samples.append(Sample(f"{name}_created", labels, histogram.created))
    return family


class _Counts(Protocol):
    @property
    def plans(self) -> int: ...
    @property
    def writes(self) -> int: ...


class _Desired(Protocol):
    @property
    def target_state(self) -> TargetState: ...


class _EngineView(Protocol):
    @property
    def units(self) -> Mapping[str, _Desired]: ...
    @property
    def machines(self) -> Sized: ...


class EngineProbe(Protocol):
    """What the metrics read of an engine (fleetd/engine/engine.py's Engine), at scrape time."""

    @property
    def is_leader(self) -> bool: ...
    @property
    def stats(self) -> _Counts: ...
    @property
    def view(self) -> _EngineView: ...
    @property
    def plan_observers(self) -> list[Callable[[float], None]]: ...


class _Done(Protocol):
    @property
    def state(self) -> TargetState: ...


class _Record(Protocol):
    @property
    def units(self) -> Mapping[str, _Done]: ...


class AgentProbe(Protocol):
    """What the metrics read of an agent (fleetd/agent/agent.py's Agent), at scrape time."""

    @property
    def tasks_run(self) -> int: ...
    @property
    def record(self) -> _Record: ...


@dataclass(frozen=True, slots=True)
class ClusterCounts:
    units: dict[str, int]  # desired state -> count
    machines: int


def _counts(states: Iterable[TargetState], machines: int) -> ClusterCounts:
    tally = Tally(s.value for s in states)
    return ClusterCounts({s.value: tally.get(s.value, 0) for s in TargetState}, machines)


class Metrics:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.etcd = EtcdMetrics()
        self.reconcile_seconds = Histogram()
        self._registry: CollectorRegistry | None = None  # made at the first scrape
        self.engine: EngineProbe | None = None
        self.agent: AgentProbe | None = None
        self.registered: Callable[[], bool] = lambda: False
        self._clock = clock
        self._cluster: ClusterCounts | None = None
        self._cluster_read_at = float("-inf")

    def attach(
        self,
        *,
        engine: EngineProbe | None = None,
        agent: AgentProbe | None = None,
        registered: Callable[[], bool] | None = None,
    ) -> None:
        """Point the scrape-time metrics at the live components (fleetd's wiring calls this)."""
        if engine is not None:
            engine.plan_observers.append(self.reconcile_seconds.observe)
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
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    @property
    def content_type(self) -> str:
        from prometheus_client import CONTENT_TYPE_LATEST

        return CONTENT_TYPE_LATEST

    @property
    def registry(self) -> CollectorRegistry:
        """fleetd's own CollectorRegistry (see the module docstring), made on first use."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry()
            registry.register(_Collector(self))
            self._registry = registry
        return self._registry

    def collect(self) -> Iterator[Metric]:
        yield from self.etcd.collect()
        yield _histogram_family(
            "fleet_engine_reconcile_seconds",
            "duration of each engine plan (read the view, plan, write)",
            {"": self.reconcile_seconds},
        )
        yield from self.collect_live()

    def collect_live(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

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
        from prometheus_client.core import GaugeMetricFamily

        cluster = self._cluster
        if cluster is None:
            return
        units = GaugeMetricFamily("fleet_units", "units by desired state", labels=["state"])
        for state, count in cluster.units.items():
            units.add_metric([state], count)
        yield units
        yield GaugeMetricFamily("fleet_machines", "registered machines", value=cluster.machines)

    def _collect_engine(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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


class _Collector:
    """What fleetd's CollectorRegistry collects: everything, in the order the metric objects
    used to be registered (etcd, engine plans, then the values read at scrape time)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return list(self._metrics.collect())
