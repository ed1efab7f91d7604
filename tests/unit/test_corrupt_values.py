"""Corrupt values under the fleet prefix (not JSON, wrong schema): skipped by every reader,
logged once per key and revision, reported once per key by fleetctl, removed by `destroy`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from test_api_harness import V1, Api, serving_api
from test_fleetctl_harness import M1, M2, Cluster, run

from fleetd.model import Machine, TargetState
from fleetd.registry.fake import FakeKV
from fleetd.registry.kv import Put
from fleetd.registry.registry import Registry
from fleetd.unit.file import parse_unit

GOOD = "[Service]\nExecStart=/bin/true\n"


def _put(kv: FakeKV, key: str, value: str) -> None:
    run(kv.txn([], [Put(key, value)]))


# ---- the registry ----------------------------------------------------------------------------


async def test_a_corrupt_value_is_logged_once_per_key_and_revision() -> None:
    kv = FakeKV()
    registry = Registry(kv)
    await registry.create_unit("good.service", parse_unit(GOOD), TargetState.LAUNCHED)
    bad = registry.keys.unit("bad.service")
    await kv.txn([], [Put(bad, "{not json")])
    with capture_logs() as logs:
        for _ in range(5):  # the engine and the agent read on every pass
            assert [u.name for u in await registry.list_units()] == ["good.service"]
    skipped = [e for e in logs if e["event"] == "corrupt_value_skipped"]
    assert [e["key"] for e in skipped] == [bad]
    await kv.txn([], [Put(bad, '{"hash": 1}')])  # written again, still corrupt: said again
    with capture_logs() as logs:
        await registry.list_units()
        await registry.list_units()
    assert [(e["key"], e["error"]) for e in logs] == [(bad, "field 'hash' missing or not a string")]
    assert registry.corrupt == {bad: "field 'hash' missing or not a string"}


async def test_a_corrupt_placement_reads_as_none() -> None:
    kv = FakeKV()
    registry = Registry(kv)
    await kv.txn([], [Put(registry.keys.placement("a.service"), "[1]")])
    assert await registry.placement("a.service") is None
    assert await registry.placements() == {}
    assert registry.corrupt == {registry.keys.placement("a.service"): "not a JSON object"}


async def test_destroy_deletes_a_corrupt_record_and_the_units_corrupt_keys() -> None:
    kv = FakeKV()
    registry = Registry(kv)
    keys = registry.keys
    await registry.create_unit("ok.service", parse_unit(GOOD), TargetState.LAUNCHED)
    lease = await kv.grant(3600)
    assert await registry.register_machine(Machine.make(M1), lease)
    corrupt = {
        keys.unit("bad.service"): "{not json",
        keys.placement("bad.service"): "zzz",
        keys.state("bad.service", M1): '{"agent_state": "running"}',
        keys.state("bad.service", M2): "[]",  # M2 is not registered: found through its state
        keys.scheduled(M1, "bad.service"): "{}",
        keys.scheduled(M2, "bad.service"): "nope",
        keys.global_unit("bad.service"): "1",
    }
    await kv.txn([], [Put(k, v) for k, v in corrupt.items()])
    # keys of other units, and of bad.service's own that decode, are not destroy's to delete
    await kv.txn([], [Put(keys.placement("ok.service"), "zzz")])
    before = kv.dump(keys.prefix)
    assert await registry.destroy_unit("bad.service")
    after = kv.dump(keys.prefix)
    assert set(before) - set(after) == set(corrupt)
    assert not await registry.destroy_unit("bad.service")


async def test_destroy_removes_corrupt_leftovers_of_a_unit_with_no_record() -> None:
    kv = FakeKV()
    registry = Registry(kv)
    state_key = registry.keys.state("gone.service", M1)
    await kv.txn([], [Put(state_key, "garbage")])
    assert await registry.destroy_unit("gone.service")
    assert await kv.get(state_key) is None
    assert not await registry.destroy_unit("gone.service")


async def test_destroy_leaves_a_valid_record_s_decodable_keys_to_their_owners() -> None:
    kv = FakeKV()
    registry = Registry(kv)
    await registry.create_unit("a.service", parse_unit(GOOD), TargetState.LAUNCHED)
    unit = await registry.get_unit("a.service")
    assert unit is not None
    await kv.txn([], registry.op_schedule(unit, M1))
    assert await registry.destroy_unit("a.service")
    # the engine unschedules it: its placement and schedule entry are still there for it
    assert await kv.get(registry.keys.placement("a.service")) is not None
    assert await kv.get(registry.keys.scheduled(M1, "a.service")) is not None


# ---- fleetctl --------------------------------------------------------------------------------


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Cluster:
    monkeypatch.chdir(tmp_path)
    cluster = Cluster().install(monkeypatch)
    cluster.add_machine(M1, "10.0.0.1")
    cluster.run_unit("good.service")
    cluster.run_unit("a.service")
    keys = cluster.registry.keys
    _put(cluster.kv, keys.unit("bad.service"), "{not json")
    _put(cluster.kv, keys.state("a.service", M1), '{"x": 1}')
    return cluster


BAD_UNIT = (
    "WARNING: skipped a corrupt value at /fleet/units/bad.service: not JSON: Expecting property"
    " name enclosed in double quotes: line 1 column 2 (char 1)"
    " (fleetctl destroy bad.service removes it)\n"
)
BAD_STATE = (
    f"WARNING: skipped a corrupt value at /fleet/states/a.service/{M1}:"
    " field 'agent_state' missing or not a string\n"
)


def test_list_unit_files_warns_once_per_key_on_stderr(cluster: Cluster) -> None:
    result = cluster.invoke("list-unit-files", "--no-legend")
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [
        "a.service",
        "good.service",
    ]
    assert result.stderr == BAD_STATE + BAD_UNIT


def test_list_units_warns_once(cluster: Cluster) -> None:
    result = cluster.invoke("list-units", "--no-legend")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("good.service\t")
    assert result.stderr == BAD_STATE


def test_a_polling_command_warns_once(cluster: Cluster) -> None:
    # stop polls a.service until its agent reports it loaded; every poll reads the bad key.
    cluster.auto = False
    result = cluster.invoke("stop", "--block-attempts=2", "a.service")
    assert result.exit_code == 1  # nothing reports loaded: a.service's state is unreadable
    assert result.stderr.count("WARNING: skipped a corrupt value") == 2
    assert result.stderr.count(BAD_STATE) == 1


def test_destroy_removes_a_unit_whose_record_is_corrupt(cluster: Cluster) -> None:
    result = cluster.invoke("destroy", "bad.service")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Destroyed bad.service\n"
    assert BAD_UNIT not in result.stderr  # gone: no advice to destroy it again
    assert "/fleet/units/bad.service" not in cluster.dump("units/")
    result = cluster.invoke("destroy", "bad.service")
    assert result.exit_code == 1
    assert result.stderr.startswith("Unit bad.service not found\n")
    assert result.stderr.endswith("Units not found in registry\n")


def test_destroy_with_a_glob_does_not_reach_corrupt_records(cluster: Cluster) -> None:
    # A glob matches what the listing shows; a corrupt record is removed by its name.
    result = cluster.invoke("destroy", "b*")
    assert result.exit_code == 1
    assert "No unit matches b*\n" in result.stderr
    assert "/fleet/units/bad.service" in cluster.dump("units/")


# ---- the API ---------------------------------------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with serving_api() as harness:
        yield harness


async def test_api_lists_around_a_corrupt_record_and_deletes_it(api: Api) -> None:
    await api.add_unit("good.service")
    bad = api.registry.keys.unit("bad.service")
    await api.fake.txn([], [Put(bad, "{not json")])
    with capture_logs() as logs:
        for _ in range(3):
            status, page, _ = await api.call("GET", f"{V1}/units")
            assert status == 200
            assert [u["name"] for u in page["units"]] == ["good.service"]
        status, _, _ = await api.call("GET", f"{V1}/units/bad.service")
        assert status == 404
    assert [e["key"] for e in logs if e["event"] == "corrupt_value_skipped"] == [bad]
    status, _, _ = await api.call("DELETE", f"{V1}/units/bad.service")
    assert status == 204
    assert await api.fake.get(bad) is None
