"""The OpenAPI document (fleetd/api/openapi.json): served at /fleet/v1/openapi.json, every route
the router serves is documented (and nothing else), and its schemas describe the responses
the handlers really give.

The served routes come from the routing table itself (`app.route_table`, built from the maps
`resolve` reads), so a route added without documenting it fails here. jsonschema is not a
dependency: `check` below is a small structural validator of the OpenAPI subset the document
uses ($ref, oneOf, type, enum, required, properties, additionalProperties, items). It is
strict: an object property the schema does not name is an error unless the schema says
`additionalProperties` (or names no properties at all: a free-form object), so an
undocumented response field fails too.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from typing import Any

import pytest
from test_api_harness import HELLO, M1, M2, TEMPLATE, V1, Api, serving_api

from fleetd.api import app as api_app
from fleetd.api.app import PREFIXES, resolve, route_table
from fleetd.model import TargetState

DOC: dict[str, Any] = json.loads(
    resources.files("fleetd.api").joinpath("openapi.json").read_text("utf-8")
)
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
PARAM = re.compile(r"\{[^}]*\}")


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with serving_api() as harness:
        yield harness


# ---- a structural validator ------------------------------------------------------------------


def deref(node: Any) -> Any:
    """`node`, or what its local `$ref` names, repeatedly."""
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        target: Any = DOC
        for part in ref[2:].split("/"):
            target = target[part]
        node = target
    return node


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "boolean": (bool,),
    "number": (int, float),
}


def errors(schema: Any, value: Any, where: str = "$") -> Iterator[str]:
    """What is wrong with `value` against `schema` (nothing: it conforms)."""
    schema = deref(schema)
    if "oneOf" in schema:
        matching = [s for s in schema["oneOf"] if not list(errors(s, value, where))]
        if len(matching) != 1:
            yield f"{where}: matches {len(matching)} of oneOf, not 1"
        return
    kind = schema.get("type")
    if kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            yield f"{where}: {value!r} is not an integer"
            return
    elif kind is not None:
        ok = isinstance(value, _TYPES[kind]) and not (kind == "number" and isinstance(value, bool))
        if not ok:
            yield f"{where}: {value!r} is not of type {kind}"
            return
    if "enum" in schema and value not in schema["enum"]:
        yield f"{where}: {value!r} not in {schema['enum']}"
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        yield f"{where}: {value!r} does not match {schema['pattern']}"
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from errors(schema["items"], item, f"{where}[{i}]")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                yield f"{where}: required property {name!r} missing"
        # A schema naming no properties is a free-form object, as OpenAPI reads it.
        extra = schema.get("additionalProperties", not properties)
        for name, item in value.items():
            if name in properties:
                yield from errors(properties[name], item, f"{where}.{name}")
            elif isinstance(extra, dict):
                yield from errors(extra, item, f"{where}.{name}")
            elif extra is not True:
                yield f"{where}: property {name!r} is not in the schema"


def check(schema: Any, value: Any) -> None:
    found = list(errors(schema, value))
    assert not found, found


def test_validator_refuses_what_it_should() -> None:
    unit = {"$ref": "#/components/schemas/Unit"}
    good = {"name": "a.service", "desiredState": "launched", "options": []}
    check(unit, good)
    assert list(errors(unit, {**good, "desiredState": "running"}))
    assert list(errors(unit, {**good, "bogus": 1}))
    assert list(errors(unit, {"name": "a.service", "options": []}))
    assert list(errors(unit, {**good, "options": [{"section": "Unit", "name": 1}]}))
    assert list(errors({"$ref": "#/components/schemas/Error"}, {"error": {"code": "404"}}))
    op = {"$ref": "#/components/schemas/MetadataOp"}
    check(op, {"op": "add", "path": "/m/metadata/k", "value": {"value": "v"}})
    assert list(errors(op, {"op": "add", "path": "/m/metadata/k", "value": 1}))


def response_schema(path: str, method: str, status: int) -> Any:
    operation = DOC["paths"][path][method]
    assert str(status) in operation["responses"], (path, method, status)
    response = deref(operation["responses"][str(status)])
    return response["content"]["application/json"]["schema"]


# ---- the document itself ---------------------------------------------------------------------


def test_document_is_openapi_3_0_with_every_ref_resolving() -> None:
    assert re.fullmatch(r"3\.0\.\d+", DOC["openapi"])
    assert DOC["info"]["title"]
    assert DOC["info"]["version"]

    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    refs = set(walk(DOC))
    assert refs
    for ref in refs:
        deref({"$ref": ref})  # KeyError if it names nothing
    operation_ids = [
        op["operationId"]
        for item in DOC["paths"].values()
        for method, op in item.items()
        if method in METHODS
    ]
    assert len(operation_ids) == len(set(operation_ids))


def test_path_parameters_are_declared() -> None:
    for path, item in DOC["paths"].items():
        declared = {
            deref(p)["name"] for p in item.get("parameters", []) if deref(p)["in"] == "path"
        }
        assert declared == {p[1:-1] for p in PARAM.findall(path)}, path


async def test_served_as_json(api: Api) -> None:
    for prefix in PREFIXES:
        response = await api.client.get(f"{prefix}/openapi.json")
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        body = await response.read()
        assert json.loads(body) == DOC
        assert re.fullmatch(r"3\.0\.\d+", json.loads(body)["openapi"])


async def test_gated_like_the_discovery_document(api: Api) -> None:
    api.registered = False
    assert (await api.error("GET", f"{V1}/openapi.json"))[0] == 503
    assert (await api.error("GET", f"{V1}/discovery.json"))[0] == 503
    status, _ = await api.error("POST", f"{V1}/openapi.json")
    assert status == 503  # the gate comes before the method check


async def test_other_methods_refused(api: Api) -> None:
    status, message = await api.error("PUT", f"{V1}/openapi.json")
    assert (status, message) == (405, "only GET supported against this resource")


# ---- documented == served ----------------------------------------------------------------------


def served() -> dict[str, set[str]]:
    """{path with items as `{}`: methods} of every route that serves a method."""
    return {
        path: {m.lower() for m in resource.methods}
        for path, resource in route_table()
        if resource.methods
    }


def documented() -> dict[str, set[str]]:
    return {
        PARAM.sub("{}", path): {m for m in item if m in METHODS}
        for path, item in DOC["paths"].items()
    }


def concrete(path: str) -> str:
    return PARAM.sub("hello.service", path).replace("{}", "hello.service")


def test_route_table_is_what_resolve_serves() -> None:
    for path, resource in route_table():
        assert resolve(concrete(path)).resource is resource, path
    assert resolve(f"{V1}/nonexistent").resource is None


def test_every_served_route_is_documented_and_nothing_else() -> None:
    assert documented() == served()


def test_the_alias_prefixes_serve_the_same_routes() -> None:
    # The document describes /fleet/v1 and says every route is also under /v1-alpha.
    assert "/v1-alpha" in DOC["info"]["description"]
    reference = [(p.replace(PREFIXES[0], "", 1), r) for p, r in route_table(PREFIXES[0])]
    for prefix in PREFIXES[1:]:
        other = [(p.replace(prefix, "", 1), r) for p, r in route_table(prefix)]
        assert other == reference


def test_a_route_added_without_documenting_it_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    fixed = dict(api_app._FIXED)
    fixed["undocumented"] = api_app.UNITS
    monkeypatch.setattr(api_app, "_FIXED", fixed)
    assert documented() != served()
    assert resolve(f"{V1}/undocumented").resource is api_app.UNITS


def test_error_responses_use_fleets_error_schema() -> None:
    error = "#/components/schemas/Error"
    for path, item in DOC["paths"].items():
        for method, operation in item.items():
            if method not in METHODS or method == "head":
                continue
            for status, response in operation["responses"].items():
                content = deref(response).get("content", {})
                if int(status) >= 400 and path != "/health":
                    assert content["application/json"]["schema"] == {"$ref": error}, (
                        path,
                        method,
                        status,
                    )


def request_example(path: str, method: str, name: str | None = None) -> Any:
    media = DOC["paths"][path][method]["requestBody"]["content"]["application/json"]
    return media["examples"][name]["value"] if name else media["example"]


async def test_every_documented_operation_is_routed(api: Api) -> None:
    """Each documented path and method reaches a handler: no 404 `not found` (the router's),
    no 405 (a handler may still answer 404 for a missing unit)."""
    await api.run_unit("hello.service")
    unit_path = f"{V1}/units/{{unitName}}"
    bodies = {
        (unit_path, "put"): request_example(unit_path, "put", "stop"),
        (f"{V1}/machines", "patch"): request_example(f"{V1}/machines", "patch"),
        (f"{V1}/plan", "post"): request_example(f"{V1}/plan", "post", "start"),
    }
    for path, item in DOC["paths"].items():
        for method in sorted(set(item) & METHODS, key=lambda m: m == "delete"):
            body = bodies.get((path, method))
            status, decoded, _ = await api.call(method.upper(), concrete(path), body)
            assert status != 405, (path, method, decoded)
            if status == 404 and method != "head":
                assert decoded["error"]["message"] != "not found", (path, method)
            documented_statuses = set(item[method]["responses"])
            assert str(status) in documented_statuses, (path, method, status, decoded)


async def test_request_examples_are_accepted(api: Api) -> None:
    unit_path = f"{V1}/units/{{unitName}}"
    request = {"$ref": "#/components/schemas/UnitRequest"}
    create = request_example(unit_path, "put", "create")
    stop = request_example(unit_path, "put", "stop")
    check(request, create)
    check(request, stop)
    assert await api.put_unit("example.service", **create) == 201
    assert await api.put_unit("example.service", **stop) == 204
    patch = request_example(f"{V1}/machines", "patch")
    patch_body = DOC["paths"][f"{V1}/machines"]["patch"]["requestBody"]
    check(patch_body["content"]["application/json"]["schema"], patch)
    status, _, _ = await api.call("PATCH", f"{V1}/machines", patch)
    assert status == 204


# ---- the schemas describe the real responses ---------------------------------------------------


async def _fixture(api: Api) -> None:
    await api.add_machine(M1, "172.17.8.103", az="us-west-1b")
    await api.add_machine(M2)
    await api.run_unit("hello.service", M1)
    await api.add_unit("waiting.service", HELLO, TargetState.LAUNCHED)
    await api.place("waiting.service", None, "no machine satisfies the requirements")
    await api.add_unit("idle.service")
    await api.add_unit("hello@.service", TEMPLATE)
    await api.run_unit("worker.service", M2)
    await api.publish("worker.service", M1, TargetState.LOADED, "inactive", "dead")


async def _get(api: Api, path: str, template: str, expected: int = 200) -> Any:
    status, decoded, response = await api.call("GET", path)
    assert status == expected, decoded
    assert response.headers["Content-Type"] == "application/json"
    check(response_schema(template, "get", status), decoded)
    return decoded


async def test_listings_and_items_match_the_schemas(api: Api) -> None:
    await _fixture(api)
    units = await _get(api, f"{V1}/units", f"{V1}/units")
    assert len(units["units"]) == 5
    assert {"reason", "machineID", "currentState"} <= {k for u in units["units"] for k in u}
    states = await _get(api, f"{V1}/state", f"{V1}/state")
    assert len(states["states"]) == 3
    filtered = await _get(api, f"{V1}/state?machineID={M1}&alt=json", f"{V1}/state")
    assert {s["machineID"] for s in filtered["states"]} == {M1}
    machines = await _get(api, f"{V1}/machines", f"{V1}/machines")
    assert [m.get("metadata") for m in machines["machines"]] == [{"az": "us-west-1b"}, None]
    for name in ("hello.service", "waiting.service", "hello@.service"):
        await _get(api, f"{V1}/units/{name}", f"{V1}/units/{{unitName}}")
    await _get(api, f"{V1}/state/worker.service", f"{V1}/state/{{unitName}}")


async def test_pages_with_tokens_match_the_schemas() -> None:
    counts = {"units": 5, "states": 3, "machines": 2}
    async with serving_api(token_limit=2) as api:
        await _fixture(api)
        for collection, field in [
            ("units", "units"),
            ("state", "states"),
            ("machines", "machines"),
        ]:
            path = f"{V1}/{collection}"
            page = await _get(api, path, path)
            seen = len(page.get(field, []))
            while "nextPageToken" in page:
                page = await _get(api, f"{path}?nextPageToken={page['nextPageToken']}", path)
                seen += len(page.get(field, []))
            assert seen == counts[field]
        # An exact multiple of the limit ends with an empty page, `{}`.
        await api.add_unit("sixth.service")
        last = await _get(api, f"{V1}/units?nextPageToken=AgAEAA==", f"{V1}/units")
        assert last == {}


async def test_empty_cluster_pages_match_the_schemas(api: Api) -> None:
    for collection in ("units", "state", "machines"):
        assert await _get(api, f"{V1}/{collection}", f"{V1}/{collection}") == {}


async def test_errors_match_the_schemas(api: Api) -> None:
    await _get(api, f"{V1}/units/nope.service", f"{V1}/units/{{unitName}}", 404)
    await _get(api, f"{V1}/state/nope.service", f"{V1}/state/{{unitName}}", 404)
    await _get(api, f"{V1}/units?nextPageToken=bad", f"{V1}/units", 400)
    api.registered = False
    await _get(api, f"{V1}/machines", f"{V1}/machines", 503)


async def test_health_matches_its_schema(api: Api) -> None:
    await _get(api, "/health", "/health")
    api.registered = False
    unavailable = await _get(api, "/health", "/health", 503)
    assert unavailable["reason"]


async def test_discovery_document_matches_its_schema(api: Api) -> None:
    for path in (f"{V1}/discovery", f"{V1}/discovery.json"):
        await _get(api, path, path)


async def test_metrics_media_type(api: Api) -> None:
    response = await api.client.get("/metrics")
    assert response.status == 200
    documented_types = deref(DOC["paths"]["/metrics"]["get"]["responses"]["200"])["content"]
    assert response.content_type in documented_types
