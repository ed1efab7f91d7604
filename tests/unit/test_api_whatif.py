"""`POST /fleet/v1/plan` and `GET /fleet/v1/why/<unit>` (fleetd/api/whatif.py): the engine's
planner asked "what if?" through the API, its answers as documented, bad input refused with
a 4xx, and nothing ever written."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from engine_once import run_engine_once
from test_api_harness import HELLO, M1, M2, TEMPLATE, V1, Api, api_options, serving_api
from test_api_openapi import check, response_schema

from fleetd.model import TargetState
from fleetd.registry import codec
from fleetd.registry.kv import Put

M3 = "5a2e9c3d7b8f4e1a9c0d2b3e4f5a6b7c"
DB = HELLO + "\n[X-Fleet]\nMachineMetadata=role=db\n"


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with serving_api() as harness:
        await harness.add_machine(M1, "10.0.0.1", role="web")
        await harness.add_machine(M2, "10.0.0.2", role="db")
        await harness.add_machine(M3, "10.0.0.3")
        for i in range(3):
            await harness.add_unit(
                f"app{i}.service", HELLO.replace("Hello", f"{i}"), TargetState.LAUNCHED
            )
        await harness.add_unit("db.service", DB, TargetState.LAUNCHED)
        await harness.add_unit("hello@.service", TEMPLATE)
        await run_engine_once(harness.registry)
        yield harness


async def plan(api: Api, body: Any) -> tuple[int, Any]:
    status, decoded, _ = await api.call("POST", f"{V1}/plan", body)
    if status == 200:
        check(response_schema(f"{V1}/plan", "post", 200), decoded)
    return status, decoded


async def test_kill_predicts_moves_and_units_that_would_run_nowhere(api: Api) -> None:
    before, revision = api.stored(), await api.registry.current_revision()
    status, answer = await plan(api, {"kill": [M2[:4]]})
    assert status == 200, answer
    outcomes = {u["name"]: u for u in answer["units"]}
    assert outcomes["db.service"]["action"] == "unplaced"
    assert outcomes["db.service"]["from"] == M2
    assert "no machine has metadata role=db" in outcomes["db.service"]["reason"]
    moved = [u for u in answer["units"] if u["action"] == "move"]
    assert all(u["from"] == M2 and u["to"] in (M1, M3) for u in moved)
    assert answer["kill"] == [M2]
    assert answer["summary"]["unplaced"] == 1
    assert answer["pending"] == 0
    assert answer["revision"] == revision
    assert api.stored() == before
    assert await api.registry.current_revision() == revision


async def test_plan_of_units_to_start(api: Api) -> None:
    before = api.stored()
    body = {
        "units": [
            {"name": "new.service", "options": api_options(HELLO.replace("Hello", "New"))},
            {"name": "db2.service", "options": api_options(DB), "desiredState": "loaded"},
            {"name": "app0.service"},  # stored already: its own body
            {"name": "hello@7.service", "options": api_options(TEMPLATE)},
        ]
    }
    status, answer = await plan(api, body)
    assert status == 200, answer
    actions = {u["name"]: (u["action"], u.get("to")) for u in answer["units"]}
    assert actions["db2.service"] == ("place", M2)
    assert actions["app0.service"][0] == "stay"
    assert actions["new.service"][0] == "place"
    assert actions["hello@7.service"][0] == "place"
    assert api.stored() == before


async def test_an_empty_plan_is_what_the_engine_is_about_to_do(api: Api) -> None:
    await api.add_unit("late.service", HELLO, TargetState.LAUNCHED)  # no engine ran since
    status, answer = await plan(api, {})
    assert status == 200, answer
    assert answer["pending"] == 2
    assert "units" not in answer


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"kill": ["zz"]}, 'no machine matches ID prefix "zz"'),
        ({"kill": "m1"}, "field 'kill' must be an array of machine IDs"),
        ({"units": {}}, "field 'units' must be an array of Unit objects"),
        ({"units": [{"name": "nope.service"}]}, "nope.service does not exist and no unit file"),
        ({"units": [{"name": "hello@.service"}]}, 'cannot activate template "hello@.service"'),
        ({"units": [{"options": []}]}, "units[0]: field 'name' is required"),
        ({"units": [{"name": "a b"}]}, "units[0]:"),
        ({"units": [{"name": "a.service", "desiredState": "up"}]}, "invalid desiredState"),
        ({"units": [{"name": "a.service", "options": [1]}]}, "units[0]: option 0"),
        (
            {"units": [{"name": "app0.service"}, {"name": "app0.service"}]},
            "unit app0.service is given twice",
        ),
        (
            {
                "units": [
                    {
                        "name": "x.service",
                        "options": api_options(HELLO + "\n[X-Fleet]\nMachineMetdata=a=b\n"),
                    }
                ]
            },
            'unknown option "MachineMetdata"',
        ),
        ([], "unable to decode body: expected an object"),
    ],
)
async def test_bad_plans_are_400_and_write_nothing(api: Api, body: Any, message: str) -> None:
    before, revision = api.stored(), await api.registry.current_revision()
    status, text = await api.error("POST", f"{V1}/plan", body)
    assert status == 400
    assert message in text
    assert api.stored() == before
    assert await api.registry.current_revision() == revision


async def test_an_ambiguous_machine_prefix_is_400(api: Api) -> None:
    await api.add_machine("11aa16a7f2c54d35b3cde2e2ad5c2f10")
    status, text = await api.error("POST", f"{V1}/plan", {"kill": ["11"]})
    assert (status, text) == (
        400,
        'machine ID prefix "11" is ambiguous: it matches 2 machines'
        f" ({M1}, 11aa16a7f2c54d35b3cde2e2ad5c2f10)",
    )


async def test_plan_body_checks(api: Api) -> None:
    status, text = await api.error(
        "POST", f"{V1}/plan", data="{", headers={"Content-Type": "application/json"}
    )
    assert (status, text.split(":")[0]) == (400, "unable to decode body")
    status, _ = await api.error(
        "POST", f"{V1}/plan", data="{}", headers={"Content-Type": "text/plain"}
    )
    assert status == 415
    status, _ = await api.error("GET", f"{V1}/plan")
    assert status == 405


async def test_a_huge_unit_is_413() -> None:
    async with serving_api(max_unit_bytes=100) as api:
        big = api_options(HELLO + "\n# " + "x" * 200 + "\n")
        status, _ = await api.error(
            "POST", f"{V1}/plan", {"units": [{"name": "a.service", "options": big}]}
        )
        assert status == 413


async def test_why_a_unit_is_not_placed(api: Api) -> None:
    await api.add_unit(
        "cache.service", HELLO + "\n[X-Fleet]\nMachineMetadata=role=cache\n", TargetState.LAUNCHED
    )
    await run_engine_once(api.registry)
    before = api.stored()
    status, answer, _ = await api.call("GET", f"{V1}/why/cache.service")
    assert status == 200, answer
    check(response_schema(f"{V1}/why/{{unitName}}", "get", 200), answer)
    assert answer["reason"] == "no machine has metadata role=cache (machines: 3)"
    assert [m["id"] for m in answer["machines"]] == sorted([M1, M2, M3])
    assert not any(m["fits"] for m in answer["machines"])
    assert answer["fixes"][0]["change"] == "add metadata role=cache to one more machine"
    assert answer["fixes"][0]["machines"][0] == M3  # the least loaded, with no role to change
    assert api.stored() == before


async def test_why_a_unit_runs_where_it_does(api: Api) -> None:
    status, answer, _ = await api.call("GET", f"{V1}/why/db.service")
    assert status == 200, answer
    check(response_schema(f"{V1}/why/{{unitName}}", "get", 200), answer)
    assert (answer["machineID"], answer["predictedMachineID"]) == (M2, M2)
    assert [m["id"] for m in answer["machines"] if m["here"]] == [M2]
    assert "fixes" not in answer


async def test_why_an_unknown_unit_is_404(api: Api) -> None:
    assert await api.error("GET", f"{V1}/why/nope.service") == (404, "unit does not exist")
    status, _ = await api.error("PUT", f"{V1}/why/db.service")
    assert status == 405


async def test_a_unit_whose_body_is_missing_is_named_not_planned(api: Api) -> None:
    # A unit record whose body is not stored (only a direct etcd write makes one).
    record = codec.encode_desired("f" * 40, TargetState.LAUNCHED)
    await api.fake.txn([], [Put(api.registry.keys.unit("orphan.service"), record)])
    status, answer = await plan(api, {"kill": [M3]})
    assert status == 200, answer
    assert answer["unplanned"] == ["orphan.service"]
    status, answer, _ = await api.call("GET", f"{V1}/why/orphan.service")
    assert status == 200, answer
    assert "unit file is missing" in answer["reason"]
    status, text = await api.error("POST", f"{V1}/plan", {"units": [{"name": "orphan.service"}]})
    assert (status, text) == (
        400,
        "unit orphan.service: its stored unit file cannot be read; give the file",
    )
