"""`/units` and `/units/<name>`: entities, PUT's decision table (reference §6.3) with fleet's
messages and status codes, its quirks fixed (§9.14), body limits, and DELETE.

Every refused request is also checked to have changed nothing in etcd.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from multidict import CIMultiDict
from test_api_harness import HELLO, M1, M2, TEMPLATE, V1, Api, api_options, serving_api

from fleetd.api.errors import ApiError
from fleetd.api.units import Create, SetState, UnitRequest, plan_put
from fleetd.model import TargetState
from fleetd.unit.file import parse_unit

GLOBAL = """[Service]
ExecStart=/bin/true

[X-Fleet]
Global=true
"""
HELLO_V2 = HELLO.replace("Hello World", "Hello World v2")
OPTIONS = api_options(HELLO)
JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with serving_api() as harness:
        yield harness


def unit_url(name: str) -> str:
    return f"{V1}/units/{name}"


async def desired(api: Api, name: str) -> str | None:
    unit = await api.registry.get_unit(name)
    return unit.target_state.value if unit else None


# ---- GET -----------------------------------------------------------------------------------


async def test_list_units_entities(api: Api) -> None:
    await api.add_machine(M1, "172.17.8.103")
    await api.run_unit("hello.service")
    await api.add_unit("global.service", GLOBAL, TargetState.LAUNCHED)
    await api.add_unit("stuck.service", HELLO, TargetState.LAUNCHED)
    await api.place("stuck.service", None, "no machine matches MachineMetadata role=db")
    await api.add_unit("idle.service")
    status, page, _ = await api.call("GET", f"{V1}/units")
    assert status == 200
    assert page == {
        "units": [
            # global units carry neither currentState nor machineID
            {"desiredState": "launched", "name": "global.service", "options": api_options(GLOBAL)},
            {
                "currentState": "launched",
                "desiredState": "launched",
                "machineID": M1,
                "name": "hello.service",
                "options": OPTIONS,
            },
            {
                "currentState": "inactive",
                "desiredState": "inactive",
                "name": "idle.service",
                "options": OPTIONS,
            },
            # beyond fleet: why the engine cannot place it
            {
                "currentState": "inactive",
                "desiredState": "launched",
                "name": "stuck.service",
                "options": OPTIONS,
                "reason": "no machine matches MachineMetadata role=db",
            },
        ]
    }
    # fleet's key order: alphabetical, as its generated schema code emits them
    _, _, response = await api.call("GET", f"{V1}/units")
    text = await response.text()
    assert text.startswith('{"units":[{"desiredState":"launched","name":"global.service"')


async def test_empty_list_is_an_empty_object(api: Api) -> None:
    status, _, response = await api.call("GET", f"{V1}/units")
    assert (status, await response.text()) == (200, "{}")


async def test_get_unit(api: Api) -> None:
    await api.run_unit("hello.service", M2)
    status, unit, response = await api.call("GET", unit_url("hello.service"))
    assert status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert unit == {
        "currentState": "launched",
        "desiredState": "launched",
        "machineID": M2,
        "name": "hello.service",
        "options": OPTIONS,
    }


@pytest.mark.parametrize("name", ["missing.service", "not a name", "x", "a@.slice"])
async def test_get_missing_unit_is_404(api: Api, name: str) -> None:
    assert await api.error("GET", unit_url(name)) == (404, "unit does not exist")


# ---- DELETE --------------------------------------------------------------------------------


async def test_delete_unit(api: Api) -> None:
    await api.run_unit("hello.service")
    status, body, _ = await api.call("DELETE", unit_url("hello.service"))
    assert (status, body) == (204, None)
    assert await api.registry.get_unit("hello.service") is None
    assert await api.error("DELETE", unit_url("hello.service")) == (404, "unit does not exist")


# ---- PUT: the decision table ---------------------------------------------------------------


def _request(
    unit: str | None = None, state: str | None = None, name: str = "a.service"
) -> UnitRequest:
    return UnitRequest(
        name, parse_unit(unit) if unit else None, TargetState(state) if state else None
    )


HASH = parse_unit(HELLO).hash
TEMPLATE_NAME = "hello@.service"
NOT_EXISTING = "unit does not exist and options field empty"
NO_STATE = "must provide DesiredState to update existing unit"
TEMPLATE_ACTIVATED = 'cannot activate template "hello@.service"'


def created(unit: str, state: TargetState, replace: bool = False) -> Create:
    """The plan that creates (or with `replace`, replaces) unit file `unit` in `state`."""
    return Create(parse_unit(unit), state, replace=replace)


@pytest.mark.parametrize(
    ("request_", "existing", "outcome"),
    [
        # not existing
        (_request(), None, (409, NOT_EXISTING)),
        (_request(state="launched"), None, (409, NOT_EXISTING)),
        (_request(HELLO), None, created(HELLO, TargetState.INACTIVE)),
        (_request(HELLO, "launched"), None, created(HELLO, TargetState.LAUNCHED)),
        (_request(TEMPLATE, "loaded", TEMPLATE_NAME), None, (400, TEMPLATE_ACTIVATED)),
        (
            _request(TEMPLATE, "inactive", TEMPLATE_NAME),
            None,
            created(TEMPLATE, TargetState.INACTIVE),
        ),
        # existing, other options: replace, with the request's state or inactive
        (_request(HELLO_V2), HASH, created(HELLO_V2, TargetState.INACTIVE, replace=True)),
        (_request(HELLO_V2, "loaded"), HASH, created(HELLO_V2, TargetState.LOADED, replace=True)),
        (_request(TEMPLATE, "launched", TEMPLATE_NAME), HASH, (400, TEMPLATE_ACTIVATED)),
        # existing, same options or none: a state change, which needs a state
        (_request(), HASH, (409, NO_STATE)),
        (_request(HELLO), HASH, (409, NO_STATE)),
        (_request(state="launched"), HASH, SetState(TargetState.LAUNCHED)),
        (_request(HELLO, "loaded"), HASH, SetState(TargetState.LOADED)),
        (_request(state="launched", name=TEMPLATE_NAME), HASH, (400, TEMPLATE_ACTIVATED)),
        (_request(state="inactive", name=TEMPLATE_NAME), HASH, SetState(TargetState.INACTIVE)),
    ],
)
def test_plan_put(request_: UnitRequest, existing: str | None, outcome: Any) -> None:
    if isinstance(outcome, tuple):
        with pytest.raises(ApiError) as caught:
            plan_put(request_, existing)
        assert (caught.value.status, caught.value.message) == outcome
    else:
        assert plan_put(request_, existing) == outcome


async def test_create(api: Api) -> None:
    status, _, _ = await api.call(
        "PUT", unit_url("hello.service"), {"name": "hello.service", "options": OPTIONS}
    )
    assert status == 201
    assert await desired(api, "hello.service") == "inactive"
    status, unit, _ = await api.call("GET", unit_url("hello.service"))
    assert unit["options"] == OPTIONS
    stored = await api.registry.get_unit("hello.service")
    assert stored is not None
    assert stored.hash == HASH  # the same HASH as the unit file


async def test_create_fills_the_name_from_the_url_and_takes_a_state(api: Api) -> None:
    status, body, _ = await api.call(
        "PUT", unit_url("hello.service"), {"desiredState": "launched", "options": OPTIONS}
    )
    assert (status, body) == (201, None)
    assert await desired(api, "hello.service") == "launched"


async def test_create_ignores_read_only_fields(api: Api) -> None:
    body = {"options": OPTIONS, "currentState": "launched", "machineID": M1}
    assert await api.put_unit("hello.service", **body) == 201
    _, unit, _ = await api.call("GET", unit_url("hello.service"))
    assert (unit["currentState"], "machineID" in unit) == ("inactive", False)


async def test_fields_match_case_insensitively_as_in_go(api: Api) -> None:
    options = [{"Section": o["section"], "NAME": o["name"], "Value": o["value"]} for o in OPTIONS]
    body = {"Name": "hello.service", "Options": options, "DesiredState": "loaded"}
    assert await api.put_unit("hello.service", **body) == 201
    _, unit, _ = await api.call("GET", unit_url("hello.service"))
    assert (unit["options"], unit["desiredState"]) == (OPTIONS, "loaded")


async def test_set_desired_state(api: Api) -> None:
    await api.add_unit("hello.service")
    for state in ("loaded", "launched", "inactive"):
        status, body, _ = await api.call("PUT", unit_url("hello.service"), {"desiredState": state})
        assert (status, body) == (204, None)
        assert await desired(api, "hello.service") == state
    # with the same options: still only a state change
    assert await api.put_unit("hello.service", options=OPTIONS, desiredState="launched") == 204


async def test_replace(api: Api) -> None:
    await api.run_unit("hello.service")
    v2 = api_options(HELLO_V2)
    assert await api.put_unit("hello.service", options=v2) == 201
    _, unit, _ = await api.call("GET", unit_url("hello.service"))
    # fleet: a replaced unit takes the request's state, inactive when none is given
    assert (unit["options"], unit["desiredState"]) == (v2, "inactive")
    assert await api.put_unit("hello.service", options=OPTIONS, desiredState="launched") == 201
    assert await desired(api, "hello.service") == "launched"


async def test_templates(api: Api) -> None:
    template = api_options(TEMPLATE)
    assert await api.put_unit(TEMPLATE_NAME, options=template) == 201
    assert await api.error("PUT", unit_url(TEMPLATE_NAME), {"desiredState": "launched"}) == (
        400,
        'cannot activate template "hello@.service"',
    )
    assert await api.put_unit(TEMPLATE_NAME, desiredState="inactive") == 204
    # instances are ordinary units
    assert await api.put_unit("hello@1.service", options=template, desiredState="launched") == 201


BAD_JSON = (
    "unable to decode body: invalid JSON: Expecting property name enclosed in double quotes:"
    " line 1 column 2 (char 1)"
)


def xfleet(*options: tuple[str, str]) -> str:
    """A PUT body of [X-Fleet] options."""
    return json.dumps(
        {"options": [{"section": "X-Fleet", "name": n, "value": v} for n, v in options]}
    )


def undecodable(why: str) -> str:
    return f"unable to decode body: {why}"


REFUSALS = [
    # decode errors
    ("a.service", "{", 400, BAD_JSON),
    ("a.service", "[]", 400, undecodable("expected a Unit object, got an array")),
    ("a.service", '"x"', 400, undecodable("expected a Unit object, got a string")),
    (
        "a.service",
        '{"name": 1}',
        400,
        undecodable("Unit field 'name' must be a string, got a number"),
    ),
    (
        "a.service",
        '{"desiredState": true}',
        400,
        undecodable("Unit field 'desiredState' must be a string, got a boolean"),
    ),
    (
        "a.service",
        '{"machineID": []}',
        400,
        undecodable("Unit field 'machineID' must be a string, got an array"),
    ),
    (
        "a.service",
        '{"options": {}}',
        400,
        undecodable("Unit field 'options' must be an array, got an object"),
    ),
    (
        "a.service",
        '{"options": ["x"]}',
        400,
        undecodable("option 0: expected an object, got a string"),
    ),
    (
        "a.service",
        '{"options": [{"section": "S", "name": "N", "value": 1}]}',
        400,
        undecodable("option 0 field 'value' must be a string, got a number"),
    ),
    (
        "a.service",
        '{"options": [{"section": "S", "name": "N", "value": "\\udc80"}]}',
        400,
        undecodable("option 0: 'value' is not valid UTF-8"),
    ),
    (
        "a.service",
        '{"desiredState": NaN}',
        400,
        undecodable("invalid JSON: NaN is not a JSON value"),
    ),
    ("a.service", "{} {}", 400, undecodable("invalid JSON: Extra data: line 1 column 4 (char 3)")),
    # names
    (
        "a.service",
        '{"name": "b.service"}',
        400,
        'name in URL "a.service" differs from unit name in request body "b.service"',
    ),
    ("foo", "{}", 400, 'unit name must contain "."'),
    ("foo.bar", "{}", 400, 'invalid unit type: "bar"'),
    ("@x.service", "{}", 400, 'unit name cannot start in "@"'),
    ("a@b.slice", "{}", 400, 'invalid unit type for template: "slice"'),
    ("a b.service", "{}", 400, "invalid character ' ' in unit name"),
    # fixed quirk: an invalid desiredState is a 400 (fleet: 500 on create, stored on update)
    (
        "a.service",
        '{"desiredState": "running"}',
        400,
        'invalid desiredState "running": must be one of inactive, loaded, launched',
    ),
    # not existing
    ("a.service", "{}", 409, NOT_EXISTING),
    ("a.service", "null", 409, NOT_EXISTING),
    ("a.service", '{"options": []}', 409, NOT_EXISTING),
    ("a.service", '{"desiredState": "launched"}', 409, NOT_EXISTING),
    # fleet's ValidateOptions
    (
        "a.service",
        xfleet(("MachineID", "m"), ("Conflicts", "b.service")),
        400,
        "MachineID cannot be used with Conflicts",
    ),
    (
        "a.service",
        xfleet(("Global", "true"), ("MachineOf", "b.service")),
        400,
        "Global cannot be used with Peers",
    ),
    (
        "a.service",
        '{"options": [{"section": "Service", "name": "ExecStart", "value": "' + "x" * 3000 + '"}]}',
        400,
        "line 2: line too long (max 2048 bytes)",
    ),
]


@pytest.mark.parametrize(("name", "body", "status", "message"), REFUSALS)
async def test_put_refusals_change_nothing(
    api: Api, name: str, body: str, status: int, message: str
) -> None:
    before = api.stored()
    got = await api.error("PUT", unit_url(name), data=body, headers=JSON_HEADERS)
    assert got == (status, message)
    assert api.stored() == before


EXISTING_REFUSALS = [
    (
        '{"desiredState": "bogus"}',
        400,
        'invalid desiredState "bogus": must be one of inactive, loaded, launched',
    ),
    ("{}", 409, NO_STATE),
    (json.dumps({"options": OPTIONS}), 409, NO_STATE),
    # fixed quirk: a replacement is validated like a creation
    (
        xfleet(("MachineID", "m"), ("Global", "true")),
        400,
        "MachineID cannot be used with Global",
    ),
    (
        '{"options": [{"section": "Service", "name": "ExecStart", "value": "a\\nb"}]}',
        400,
        "line 3: unexpected newline encountered while parsing option name",
    ),
    (
        '{"options": [{"section": "Service", "name": "ExecStart", "value": " a"}]}',
        400,
        'option [Service] "ExecStart"=" a" does not survive serialization (check for newlines,'
        ' leading or trailing whitespace, a trailing "\\", or "=" in the name)',
    ),
]


# Beyond fleet (which ignored them): [X-Fleet] input checks, a 400 naming option and value.
XFLEET_REFUSALS = [
    (
        "a.service",
        [("MachineMetdata", "region=east")],
        'unknown option "MachineMetdata" in [X-Fleet] section (did you mean MachineMetadata?)',
    ),
    ("a.service", [("Frobnicate", "1")], 'unknown option "Frobnicate" in [X-Fleet] section'),
    (
        "a.service",
        [("MachineMetadata", "region")],
        'invalid value "region" for MachineMetadata in [X-Fleet] section: expected one'
        ' key=value pair (a single "=", both sides non-empty)',
    ),
    (
        "a.service",
        [("MachineMetadata", "=x")],
        'invalid value "=x" for MachineMetadata in [X-Fleet] section: expected one'
        ' key=value pair (a single "=", both sides non-empty)',
    ),
    (
        "a.service",
        [("Global", "perhaps")],
        'invalid value "perhaps" for Global in [X-Fleet] section: expected a boolean: true,'
        " yes, 1, on, t or false, no, 0, off, f (any case)",
    ),
    (
        "a.service",
        [("Conflicts", "[")],
        'invalid value "[" for Conflicts in [X-Fleet] section: malformed glob pattern "["',
    ),
    (
        "a.service",
        [("MachineOf", "%n")],
        'invalid value "%n" (expanded: "a.service") for MachineOf in [X-Fleet] section:'
        " a unit cannot be a MachineOf peer of itself",
    ),
    (
        "web@1.service",
        [("Replaces", "%p@%i.service")],
        'invalid value "%p@%i.service" (expanded: "web@1.service") for Replaces in [X-Fleet]'
        " section: a unit cannot replace itself",
    ),
]


@pytest.mark.parametrize(("name", "options", "message"), XFLEET_REFUSALS)
async def test_put_bad_xfleet_options_are_400_and_change_nothing(
    api: Api, name: str, options: list[tuple[str, str]], message: str
) -> None:
    await api.run_unit("running.service")  # so "nothing changed" is not an empty store
    before = api.stored()
    got = await api.error("PUT", unit_url(name), data=xfleet(*options), headers=JSON_HEADERS)
    assert got == (400, message)
    assert api.stored() == before


async def test_put_replacement_with_bad_xfleet_options_keeps_the_stored_unit(api: Api) -> None:
    await api.run_unit("a.service")
    before = api.stored()
    body = xfleet(("Global", "perhaps"))
    got = await api.error("PUT", unit_url("a.service"), data=body, headers=JSON_HEADERS)
    assert got[0] == 400
    assert "Global" in got[1]
    assert api.stored() == before
    assert await desired(api, "a.service") == "launched"


async def test_put_good_xfleet_options_and_template_specifiers_are_accepted(api: Api) -> None:
    """The checks do not refuse what is fine: a template is checked unexpanded (rack=%i is
    rack= only for the template itself), its instance expanded."""
    options = [("MachineMetadata", "rack=%i"), ("Global", "OFF"), ("Conflicts", "%p@*.service")]
    for name in ("web@.service", "web@1.service"):
        status, _, _ = await api.call("PUT", unit_url(name), json.loads(xfleet(*options)))
        assert status == 201, name


@pytest.mark.parametrize(("body", "status", "message"), EXISTING_REFUSALS)
async def test_put_refusals_on_an_existing_unit_change_nothing(
    api: Api, body: str, status: int, message: str
) -> None:
    await api.run_unit("a.service")
    before = api.stored()
    got = await api.error("PUT", unit_url("a.service"), data=body, headers=JSON_HEADERS)
    assert got == (status, message)
    assert api.stored() == before
    assert await desired(api, "a.service") == "launched"


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "expected 1 Content-Type, got 0"),
        ({"Content-Type": "text/plain"}, "only acceptable Content-Type is application/json"),
        ({"Content-Type": "application/jsonx"}, "only acceptable Content-Type is application/json"),
        (
            {"Content-Type": "application/x-www-form-urlencoded"},
            "only acceptable Content-Type is application/json",
        ),
    ],
)
async def test_put_content_type_415(api: Api, headers: dict[str, str], message: str) -> None:
    before = api.stored()
    body = '{"options": [{"section": "Service", "name": "ExecStart", "value": "/bin/true"}]}'
    response = await api.client.put(
        unit_url("a.service"),
        data=body.encode(),
        headers=headers,
        skip_auto_headers=["Content-Type"],
    )
    assert response.status == 415
    assert await response.json() == {"error": {"code": 415, "message": message}}
    assert api.stored() == before


async def test_put_two_content_types_is_refused(api: Api) -> None:
    # fleet: 415 "expected 1 Content-Type, got 2". aiohttp's HTTP parser refuses a repeated
    # Content-Type before the app sees the request: a plain-text 400, and nothing changes.
    headers = CIMultiDict(
        [("Content-Type", "application/json"), ("Content-Type", "application/json")]
    )
    before = api.stored()
    response = await api.client.put(unit_url("a.service"), data=b"{}", headers=headers)
    assert response.status == 400
    assert api.stored() == before


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", " application/json ;x=y"]
)
async def test_put_content_type_parameters_are_fine(api: Api, content_type: str) -> None:
    body = '{"options": [{"section": "Service", "name": "ExecStart", "value": "/bin/true"}]}'
    response = await api.client.put(
        unit_url("a.service"), data=body.encode(), headers={"Content-Type": content_type}
    )
    assert response.status == 201


# ---- size limits ---------------------------------------------------------------------------


@pytest.fixture
async def small_units() -> AsyncIterator[Api]:
    harness = Api(max_unit_bytes=200)
    await harness.start()
    try:
        yield harness
    finally:
        await harness.close()


async def test_unit_larger_than_max_unit_bytes_is_413(small_units: Api) -> None:
    api = small_units
    options = [{"section": "Service", "name": "ExecStart", "value": "x" * 200}]
    before = api.stored()
    status, message = await api.error("PUT", unit_url("a.service"), {"options": options})
    # "[Service]\n" + "ExecStart=" + 200 x + "\n"
    assert (status, message) == (413, "unit file too large: 221 bytes (max 200)")
    assert api.stored() == before
    assert (
        await api.put_unit(
            "a.service", options=[{"section": "Service", "name": "ExecStart", "value": "x" * 150}]
        )
        == 201
    )


async def test_body_larger_than_the_limit_is_refused_unread(small_units: Api) -> None:
    api = small_units
    limit = 200 * 12 + 64 * 1024
    status, message = await api.error(
        "PUT", unit_url("a.service"), data=b" " * (limit + 1), headers=JSON_HEADERS
    )
    assert (status, message) == (413, f"request body too large: {limit + 1} bytes (max {limit})")


async def test_chunked_body_over_the_limit_is_413(small_units: Api) -> None:
    api = small_units

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b" " * 1024

    response = await api.client.put(unit_url("a.service"), data=chunks(), headers=JSON_HEADERS)
    assert response.status == 413
    assert (await response.json())["error"]["message"].startswith(
        "request body too large: more than"
    )


async def test_concurrent_create_loses_cleanly(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = api.registry
    original = registry.get_unit

    async def unit_appears_meanwhile(name: str) -> Any:
        result = await original(name)
        await api.add_unit(name, HELLO_V2, TargetState.LOADED)
        return result

    monkeypatch.setattr(registry, "get_unit", unit_appears_meanwhile)
    status, message = await api.error("PUT", unit_url("a.service"), {"options": OPTIONS})
    assert (status, message) == (
        409,
        'unit "a.service" was created by another request meanwhile; retry',
    )
    monkeypatch.undo()
    assert await desired(api, "a.service") == "loaded"


async def test_state_change_of_a_unit_destroyed_meanwhile_is_404(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    await api.add_unit("a.service")
    registry = api.registry
    original = registry.get_unit

    async def destroyed_meanwhile(name: str) -> Any:
        result = await original(name)
        await registry.destroy_unit(name)
        return result

    monkeypatch.setattr(registry, "get_unit", destroyed_meanwhile)
    assert await api.error("PUT", unit_url("a.service"), {"desiredState": "launched"}) == (
        404,
        "unit does not exist",
    )


# ---- names with path tricks, bodies that are not UTF-8 ---------------------------------------


@pytest.mark.parametrize(
    ("quoted_name", "status", "message"),
    [
        # "/" never reaches the handler: the route takes one path segment, decoded first
        ("..%2F..%2Fetc%2Fpasswd.service", 404, "not found"),
        ("a%2F..%2F..%2Fb.service", 404, "not found"),
        ("..%2Fx.service", 404, "not found"),
        ("a..b.service", 400, 'unit name cannot contain ".."'),
        (".hidden.service", 400, 'unit name cannot start in "."'),
        ("nul%00.service", 400, "invalid character '\\x00' in unit name"),
        # aiohttp's route pattern ".*" stops at a newline: its own 404, before fleet's checks
        ("new%0Aline.service", 404, "Not Found"),
        ("x" * 300 + ".service", 400, "unit name exceeds maximum length (255)"),
        ("caf%C3%A9.service", 400, "invalid character '\u00e9' in unit name"),
    ],
)
async def test_put_names_with_path_tricks_change_nothing(
    api: Api, quoted_name: str, status: int, message: str
) -> None:
    before = api.stored()
    body = {"desiredState": "launched", "options": OPTIONS}
    assert await api.error("PUT", f"/fleet/v1/units/{quoted_name}", body) == (status, message)
    assert api.stored() == before


@pytest.mark.parametrize(
    "body",
    [
        b'{"options": [{"section": "Service", "name": "ExecStart", "value": "/bin/caf\xe9"}]}',
        b'{"desiredState": "launched", "options": [], "x": "\xff\xfe"}',
        '{"options": []}'.encode("utf-16"),
    ],
)
async def test_put_body_that_is_not_utf8_is_400_and_changes_nothing(api: Api, body: bytes) -> None:
    before = api.stored()
    status, message = await api.error("PUT", unit_url("a.service"), data=body, headers=JSON_HEADERS)
    assert status == 400
    assert message.startswith("unable to decode body: ")
    assert "UTF-8" in message
    assert api.stored() == before
