"""`/state`, `/state/<unit>` and `/machines` (list and PATCH of dynamic metadata, §6.4)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_api_harness import M1, M2, V1, Api, serving_api

from fleetd.api.errors import ApiError
from fleetd.api.machines import MetadataOp, parse_patch
from fleetd.model import TargetState

# ---- /state --------------------------------------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with serving_api() as harness:
        yield harness


async def _states(api: Api) -> None:
    await api.run_unit("b.service", M2)
    await api.run_unit("a.service", M2)
    await api.publish("a.service", M1, TargetState.LOADED, "inactive", "dead")


async def test_list_states_sorted_by_unit_then_machine(api: Api) -> None:
    await _states(api)
    status, page, _ = await api.call("GET", f"{V1}/state")
    assert status == 200
    unit = await api.registry.get_unit("a.service")
    assert unit is not None
    assert page["states"][0] == {
        "hash": unit.hash,
        "machineID": M1,
        "name": "a.service",
        "systemdActiveState": "inactive",
        "systemdLoadState": "loaded",
        "systemdSubState": "dead",
    }
    assert [(s["name"], s["machineID"]) for s in page["states"]] == [
        ("a.service", M1),
        ("a.service", M2),
        ("b.service", M2),
    ]
    assert "nextPageToken" not in page


async def test_a_state_whose_task_failed_carries_failed_task_and_error(api: Api) -> None:
    await api.run_unit("a.service", M1)
    await api.publish(
        "a.service", M1, TargetState.LOADED, "activating", "start",
        failed_task="start", error="StartUnit a.service: job 7 did not finish in 120s",
    )  # fmt: skip
    status, page, _ = await api.call("GET", f"{V1}/state")
    assert status == 200
    (state,) = page["states"]
    # Beyond fleet, and only when set: fleet's clients ignore the two extra fields.
    assert state["failedTask"] == "start"
    assert state["error"] == "StartUnit a.service: job 7 did not finish in 120s"
    assert state["systemdSubState"] == "start"  # systemd's own, unchanged
    await api.publish("a.service", M1)
    status, page, _ = await api.call("GET", f"{V1}/state")
    assert "failedTask" not in page["states"][0]
    assert "error" not in page["states"][0]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"machineID": M2}, [("a.service", M2), ("b.service", M2)]),
        ({"unitName": "a.service"}, [("a.service", M1), ("a.service", M2)]),
        ({"unitName": "a.service", "machineID": M1}, [("a.service", M1)]),
        ({"unitName": "a"}, []),  # exact, not a prefix
        ({"machineID": M1[:8]}, []),  # exact: no short ids
        ({"unitName": "a.service/" + M1}, []),  # cannot reach into the key space
        (
            {"unitName": "", "machineID": ""},
            [("a.service", M1), ("a.service", M2), ("b.service", M2)],
        ),
    ],
)
async def test_state_filters(
    api: Api, query: dict[str, str], expected: list[tuple[str, str]]
) -> None:
    await _states(api)
    status, page, _ = await api.call("GET", f"{V1}/state", params=query)
    assert status == 200
    assert [(s["name"], s["machineID"]) for s in page.get("states", [])] == expected


async def test_state_filters_take_the_first_value(api: Api) -> None:
    await _states(api)
    _, page, _ = await api.call("GET", f"{V1}/state?machineID={M1}&machineID={M2}")
    assert [s["machineID"] for s in page["states"]] == [M1]


async def test_get_state(api: Api) -> None:
    await _states(api)
    status, state, _ = await api.call("GET", f"{V1}/state/a.service")
    assert status == 200
    assert (state["name"], state["machineID"]) == ("a.service", M1)  # first machine by id


async def test_get_missing_state_is_404(api: Api) -> None:
    # fleet dereferenced nil here and dropped the connection (reference §9.14)
    await api.add_unit("a.service")
    assert await api.error("GET", f"{V1}/state/a.service") == (404, "unit state does not exist")


# ---- /machines -----------------------------------------------------------------------------


async def test_list_machines(api: Api) -> None:
    await api.add_machine(M2, "172.17.8.102")
    await api.add_machine(M1, "172.17.8.103", az="us-west-1b")
    status, page, _ = await api.call("GET", f"{V1}/machines")
    assert (status, page) == (
        200,
        {
            "machines": [
                {"id": M1, "metadata": {"az": "us-west-1b"}, "primaryIP": "172.17.8.103"},
                {"id": M2, "primaryIP": "172.17.8.102"},
            ]
        },
    )


def _op(op: str, path: str, value: Any = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"op": op, "path": path}
    if value is not None:
        doc["value"] = value
    return doc


async def test_patch_adds_replaces_and_removes_metadata(api: Api) -> None:
    await api.add_machine(M1, "172.17.8.103", az="us-west-1b")
    ops = [
        _op("add", f"/{M1}/metadata/role", {"value": "db"}),
        _op("replace", f"/{M1}/metadata/az", {"value": "eu-1"}),  # dynamic wins over config
        _op("add", f"/{M2}/metadata/role", "web"),  # machines need not exist; bare strings too
    ]
    status, body, _ = await api.call("PATCH", f"{V1}/machines", ops)
    assert (status, body) == (204, None)
    _, page, _ = await api.call("GET", f"{V1}/machines")
    assert page["machines"] == [
        {"id": M1, "metadata": {"az": "eu-1", "role": "db"}, "primaryIP": "172.17.8.103"}
    ]
    status, _, _ = await api.call(
        "PATCH", f"{V1}/machines", [_op("remove", f"/{M1}/metadata/role")]
    )
    assert status == 204
    _, page, _ = await api.call("GET", f"{V1}/machines")
    assert page["machines"][0]["metadata"] == {"az": "eu-1"}
    stored = api.stored()
    assert stored[api.registry.keys.machine_meta_key(M2, "role")] == "web"


# fleet's machinesResource.patch decodes the body whatever its Content-Type (only PUT /units
# calls validateContentType): `curl -d` sends a form type, other clients none at all.
ANY_CONTENT_TYPE = [
    None,
    "application/x-www-form-urlencoded",
    "text/plain",
    "multipart/form-data; boundary=x",
    "application/json; charset=utf-8",
    "not a media type",
]


@pytest.mark.parametrize("content_type", ANY_CONTENT_TYPE)
async def test_patch_decodes_the_body_whatever_its_content_type(
    api: Api, content_type: str | None
) -> None:
    ops = json.dumps([_op("add", "/m/metadata/k", {"value": "v"})]).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    response = await api.client.patch(
        f"{V1}/machines", data=ops, headers=headers, skip_auto_headers=["Content-Type"]
    )
    assert response.status == 204
    assert api.stored()[api.registry.keys.machine_meta_key("m", "k")] == "v"


@pytest.mark.parametrize("content_type", ANY_CONTENT_TYPE)
async def test_patch_of_a_body_that_is_not_json_is_400_whatever_its_content_type(
    api: Api, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    before = api.stored()
    status, message = await api.error(
        "PATCH",
        f"{V1}/machines",
        data=b"op=add&path=/m/metadata/k",
        headers=headers,
        skip_auto_headers=["Content-Type"],
    )
    assert status == 400
    assert message.startswith("unable to decode body: invalid JSON")
    assert api.stored() == before


def test_parse_patch_accepts_gos_spellings() -> None:
    doc = [
        {"Op": "add", "Path": "/m/metadata/a.b-c_1", "Value": {"Value": "x"}},
        {"op": "remove", "path": "/m/metadata/k"},
        {"op": "remove", "path": "/m/metadata/j", "value": "ignored"},
    ]
    assert parse_patch(json.dumps(doc).encode()) == [
        MetadataOp("m", "a.b-c_1", "x"),
        MetadataOp("m", "k", None),
        MetadataOp("m", "j", None),
    ]
    assert parse_patch(b"[]") == []
    assert parse_patch(b"null") == []


BAD_JSON = (
    "unable to decode body: invalid JSON: Expecting property name enclosed in double quotes:"
    " line 1 column 2 (char 1)"
)
PATCH_REFUSALS = [
    ("{", BAD_JSON),
    ('{"op": "add"}', "unable to decode body: expected an array of ops, got an object"),
    ('["x"]', "unable to decode body: op 0 is a string"),
    (
        '[{"op": "move", "path": "/m/metadata/k", "value": {"value": "v"}}]',
        "invalid op: expect add, remove, or replace",
    ),
    (
        '[{"path": "/m/metadata/k", "value": {"value": "v"}}]',
        "invalid op: expect add, remove, or replace",
    ),
    ('[{"op": 1, "path": "/m/metadata/k"}]', "invalid op: expect add, remove, or replace"),
    (
        '[{"op": "add", "path": "/m/meta/k", "value": {"value": "v"}}]',
        "machine metadata path invalid",
    ),
    (
        '[{"op": "add", "path": "m/metadata/k", "value": {"value": "v"}}]',
        "machine metadata path invalid",
    ),
    (
        '[{"op": "add", "path": "/m/metadata/k/x", "value": {"value": "v"}}]',
        "machine metadata path invalid",
    ),
    (
        '[{"op": "add", "path": "/m/metadata/k k", "value": {"value": "v"}}]',
        "machine metadata path invalid",
    ),
    (
        '[{"op": "add", "path": "/m/metadata/k\\n", "value": {"value": "v"}}]',
        "machine metadata path invalid",
    ),
    (
        '[{"op": "add", "path": "//metadata/k", "value": {"value": "v"}}]',
        "machine metadata path invalid",
    ),
    ('[{"op": "add", "path": 5, "value": {"value": "v"}}]', "machine metadata path invalid"),
    ('[{"op": "add", "path": "/m/metadata/k"}]', "invalid value: add and replace require a value"),
    (
        '[{"op": "replace", "path": "/m/metadata/k", "value": {"value": ""}}]',
        "invalid value: add and replace require a value",
    ),
    (
        '[{"op": "add", "path": "/m/metadata/k", "value": {}}]',
        "invalid value: add and replace require a value",
    ),
    (
        '[{"op": "add", "path": "/m/metadata/k", "value": 5}]',
        'invalid value in op 0: expect a string or {"value": string}, got a number',
    ),
    (
        '[{"op": "add", "path": "/m/metadata/k", "value": {"value": ["v"]}}]',
        'invalid value in op 0: expect a string or {"value": string}, got an array',
    ),
]


@pytest.mark.parametrize(("body", "message"), PATCH_REFUSALS)
async def test_patch_refusals_change_nothing(api: Api, body: str, message: str) -> None:
    await api.add_machine(M1)
    # a valid op first: validation runs over every op before any is applied
    good = '{"op": "add", "path": "/m/metadata/ok", "value": {"value": "v"}}'
    if body.startswith("[") and body != '["x"]':
        body = "[" + good + ", " + body[1:]
    before = api.stored()
    status, got = await api.error("PATCH", f"{V1}/machines", data=body)
    assert (status, got.replace("op 1", "op 0")) == (400, message)
    assert api.stored() == before


def test_parse_patch_raises_api_errors() -> None:
    with pytest.raises(ApiError) as caught:
        parse_patch(b'[{"op": "add", "path": "/m/metadata/k"}]')
    assert caught.value.status == 400


async def test_patch_body_limit(api: Api) -> None:
    status, message = await api.error("PATCH", f"{V1}/machines", data=b" " * (1024 * 1024 + 1))
    assert (status, message) == (413, "request body too large: 1048577 bytes (max 1048576)")
