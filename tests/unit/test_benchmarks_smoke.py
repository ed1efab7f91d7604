"""The benchmark code must not rot: run the simulator scenarios at toy scale.

Not a benchmark (no figure is checked against a target): 5 simulated machines, 20 units, on a
real etcd when the machine has one (as `python -m benchmarks` does), else skipped; plus the
pure parts (etcd metrics parsing, the table) without etcd.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.__main__ import expand, main
from benchmarks.etcd import parse_metrics
from benchmarks.report import ScenarioResult, table
from tests.integration.etcd_fixture import etcd_available

METRICS = "\n".join(
    [
        "# HELP grpc_server_handled_total Total number of RPCs completed on the server.",
        'grpc_server_handled_total{grpc_code="OK",grpc_method="Range",x="1"} 7',
        'grpc_server_handled_total{grpc_code="OK",grpc_method="Txn",x="1"} 3',
        'grpc_server_handled_total{grpc_code="FailedPrecondition",grpc_method="Txn",x="1"} 1',
        'grpc_server_msg_received_total{grpc_method="LeaseKeepAlive",x="1"} 40',
        'grpc_server_started_total{grpc_method="LeaseKeepAlive",x="1"} 2',
        'grpc_server_msg_sent_total{grpc_method="Watch",x="1"} 5',
        "etcd_network_client_grpc_received_bytes_total 1234",
        "etcd_network_client_grpc_sent_bytes_total 5678",
    ]
)


def test_metrics_parsing_and_difference() -> None:
    before = parse_metrics(METRICS)
    assert before.requests == {"Range": 7, "Txn": 4, "LeaseKeepAlive": 40}
    assert before.streams["LeaseKeepAlive"] == 2
    assert before.sent_messages["Watch"] == 5
    assert (before.received_bytes, before.sent_bytes) == (1234, 5678)
    after = parse_metrics(METRICS.replace("} 7", "} 10").replace("1234", "2000"))
    diff = after - before
    assert diff.requests == {"Range": 3}
    assert diff.total_bytes == 766


def test_table_and_groups() -> None:
    r = ScenarioResult("place")
    r.add("placement rate", 600.0, "units/s", ">= 500 units/s", True)
    text = table([r, ScenarioResult("latency", skipped="needs root")])
    assert "placement rate" in text
    assert "met" in text
    assert "skipped" in text
    assert expand(["sim", "place", "latency"]) == [
        *("place", "list", "idle", "costs", "failover", "latency")
    ]


@pytest.mark.integration
@pytest.mark.skipif(not etcd_available(), reason="needs etcd at /usr/bin/etcd")
def test_simulator_scenarios_at_toy_scale(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    argv = [
        "place", "idle", "failover", "list", "costs",
        "--machines", "5", "--units", "20", "--templates", "5", "--agent-ttl", "2",
        "--idle-seconds", "1", "--kill", "1", "--raw-txns", "500", "--list-runs", "1",
        "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    results = {r["scenario"]: r for r in doc["results"]}
    assert set(results) == {"place", "idle", "failover", "list", "costs"}
    for r in results.values():
        assert r["error"] is None, r
    figures = {f["name"]: f for f in results["failover"]["figures"]}
    assert figures["needless moves"]["value"] == 0
    assert figures["units moved"]["value"] >= 1
    place = {f["name"]: f for f in results["place"]["figures"]}
    assert place["placement rate"]["value"] > 0
    costs = {f["name"]: f for f in results["costs"]["figures"]}
    assert costs["a placed unit costs etcd"]["value"] > 0


def test_the_plan_benchmark_at_toy_scale(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import bench_plan

    result = bench_plan.scenario(units=300, machine_count=12, runs=1)
    figures = {f.name: f.value for f in result.figures}
    assert figures["fleetctl plan --kill end to end (etcd driver, FakeKV)"] is not None
    assert "predict: kill the busiest machine (pure)" in capsys.readouterr().out
