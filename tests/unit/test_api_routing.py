"""Routing (reference §6.1): which path is which resource, 404 vs 405 and their messages, the
Allow and Server headers, both prefixes, the discovery document, and 503 before registration.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator

import pytest
from test_api_harness import V1, Api, serving_api

from fleetd import __version__
from fleetd.api import app as api_app
from fleetd.api.app import UNAVAILABLE, resolve
from fleetd.api.discovery import DISCOVERY_JSON

PREFIXES = ["/fleet/v1", "/v1-alpha"]


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with serving_api() as harness:
        yield harness


@pytest.mark.parametrize(
    ("path", "resource", "item"),
    [
        ("/", "root", ""),
        ("/fleet/v1", "root", ""),
        ("/v1-alpha", "root", ""),
        ("/fleet/v1/discovery", "discovery", ""),
        ("/fleet/v1/discovery.json", "discovery", ""),
        ("/v1-alpha/discovery", "discovery", ""),
        ("/fleet/v1/units", "units", ""),
        ("/fleet/v1/units/hello.service", "unit", "hello.service"),
        ("/v1-alpha/units/a@b.service", "unit", "a@b.service"),
        ("/fleet/v1/state", "states", ""),
        ("/fleet/v1/state/hello.service", "state", "hello.service"),
        ("/fleet/v1/machines", "machines", ""),
        ("/fleet/v1/plan", "plan", ""),
        ("/fleet/v1/why/hello.service", "why", "hello.service"),
        ("/metrics", "metrics", ""),
        ("/health", "health", ""),
        # fleet's 404s: trailing slashes, deeper paths, machines items, unknown names
        ("/fleet/v1/", None, ""),
        ("/fleet/v1/units/", None, ""),
        ("/fleet/v1/units/a/b.service", None, ""),
        ("/fleet/v1/units/hello.service/", None, ""),
        ("/fleet/v1/state/", None, ""),
        ("/fleet/v1/machines/", None, ""),
        ("/fleet/v1/machines/m1", None, ""),
        ("/fleet/v1/discovery/", None, ""),
        ("/fleet/v1/unknown", None, ""),
        ("/fleet/v1/why", None, ""),
        ("/fleet/v1/plan/x", None, ""),
        ("/fleet/v2/units", None, ""),
        ("/fleet/v1units", None, ""),
        ("/metrics/", None, ""),
        ("/fleet", None, ""),
        ("", None, ""),
    ],
)
def test_resolve(path: str, resource: str | None, item: str) -> None:
    route = resolve(path)
    assert (route.resource.name if route.resource else None, route.item) == (resource, item)


# (path, method) -> status and message, for every resource and a refused method each.
REFUSED = [
    ("units", "POST", "only GET supported against this resource", "GET"),
    ("units", "DELETE", "only GET supported against this resource", "GET"),
    (
        "units/x.service",
        "POST",
        "only GET, PUT and DELETE supported against this resource",
        "GET, PUT, DELETE",
    ),
    (
        "units/x.service",
        "PATCH",
        "only GET, PUT and DELETE supported against this resource",
        "GET, PUT, DELETE",
    ),
    ("state", "PUT", "only GET supported against this resource", "GET"),
    ("state/x.service", "DELETE", "only GET supported against this resource", "GET"),
    ("machines", "PUT", "only GET and PATCH supported against this resource", "GET, PATCH"),
    ("machines", "DELETE", "only GET and PATCH supported against this resource", "GET, PATCH"),
    # fleet answered 400 here (reference §9.14); 405 is what HTTP means
    ("discovery", "POST", "only HTTP GET supported against this resource", "GET"),
    ("discovery.json", "PUT", "only HTTP GET supported against this resource", "GET"),
]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(("path", "method", "message", "allow"), REFUSED)
async def test_refused_methods_are_405_with_fleets_message(
    api: Api, prefix: str, path: str, method: str, message: str, allow: str
) -> None:
    before = api.stored()
    status, text = await api.error(method, f"{prefix}/{path}")
    assert (status, text) == (405, message)
    _, _, response = await api.call(method, f"{prefix}/{path}")
    assert response.headers["Allow"] == allow
    assert api.stored() == before


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/", "/fleet/v1", "/v1-alpha"])
async def test_roots_are_405(api: Api, method: str, path: str) -> None:
    status, message = await api.error(method, path)
    assert status == 405
    assert "/fleet/v1" in message


@pytest.mark.parametrize(
    "path",
    [
        "/nope",
        "/fleet/v1/",
        "/fleet/v1/units/",
        "/fleet/v1/units/a/b.service",
        "/fleet/v1/units/a%2Fb.service",  # decoded before matching, as Go's ServeMux did
        "/fleet/v1/machines/m1",
        "/fleet/v1/state/",
        "/v1-alpha/nope",
    ],
)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_unknown_paths_are_404(api: Api, path: str, method: str) -> None:
    assert await api.error(method, path) == (404, "not found")


async def test_head_is_not_get_on_api_resources(api: Api) -> None:
    # fleet's handlers compared the method with "GET"; HEAD was a 405 there too.
    status, _, response = await api.call("HEAD", f"{V1}/units")
    assert (status, response.headers["Allow"]) == (405, "GET")
    status, _, _ = await api.call("HEAD", "/health")
    assert status == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"{V1}/units"),
        ("GET", f"{V1}/units/x.service"),
        ("GET", "/nope"),
        ("POST", f"{V1}/units"),
        ("PUT", f"{V1}/units/x.service"),
        ("GET", f"{V1}/discovery"),
        ("GET", "/metrics"),
        ("GET", "/health"),
        ("GET", "/"),
    ],
)
async def test_every_response_names_the_server(api: Api, method: str, path: str) -> None:
    _, _, response = await api.call(method, path)
    assert response.headers["Server"] == f"fleetd/{__version__}"


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("name", ["discovery", "discovery.json"])
async def test_discovery_is_fleets_document(api: Api, prefix: str, name: str) -> None:
    response = await api.client.get(f"{prefix}/{name}", params={"alt": "json"})
    body = await response.read()
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert body == DISCOVERY_JSON.encode()
    # fleet's schema/v1.json, byte for byte (6792 bytes at coreos/fleet 97a7adb)
    assert len(body) == 6792
    assert hashlib.sha1(body).hexdigest() == "1c11f4f9696be193b36027650ef3e86d7bf49f49"
    doc = json.loads(body)
    assert (doc["id"], doc["rootUrl"], doc["servicePath"]) == (
        "fleet:v1",
        "$ENDPOINT/",
        "fleet/v1/",
    )
    methods = {
        (resource, name, m["httpMethod"], m["path"])
        for resource, r in doc["resources"].items()
        for name, m in r["methods"].items()
    }
    assert methods == {
        ("Machines", "List", "GET", "machines"),
        ("Units", "List", "GET", "units"),
        ("Units", "Get", "GET", "units/{unitName}"),
        ("Units", "Delete", "DELETE", "units/{unitName}"),
        ("Units", "Set", "PUT", "units/{unitName}"),
        ("UnitState", "List", "GET", "state"),
        ("UnitState", "Get", "GET", "state/{unitName}"),
    }


GATED = [
    ("GET", f"{V1}/units"),
    ("GET", f"{V1}/units/x.service"),
    ("PUT", f"{V1}/units/x.service"),
    ("DELETE", f"{V1}/units/x.service"),
    ("GET", f"{V1}/state"),
    ("GET", f"{V1}/state/x.service"),
    ("GET", f"{V1}/machines"),
    ("PATCH", f"{V1}/machines"),
    ("GET", f"{V1}/discovery"),
    ("POST", f"{V1}/units"),
    ("GET", "/v1-alpha/units"),
    ("GET", "/"),
]


@pytest.mark.parametrize(("method", "path"), GATED)
async def test_503_until_registered(api: Api, method: str, path: str) -> None:
    api.registered = False
    before = api.stored()
    body = [{"op": "add", "path": "/m/metadata/k", "value": {"value": "v"}}]
    if method == "PUT":
        body = {"options": [{"section": "Service", "name": "ExecStart", "value": "/bin/true"}]}  # type: ignore[assignment]
    assert await api.error(method, path, body) == (503, UNAVAILABLE)
    assert api.stored() == before
    api.registered = True
    status, _, _ = await api.call(method, path, body)
    assert status != 503


async def test_unknown_paths_are_404_even_when_unregistered(api: Api) -> None:
    api.registered = False
    assert await api.error("GET", "/nope") == (404, "not found")


async def test_metrics_and_health_answer_before_registration(api: Api) -> None:
    api.registered = False
    status, _, _ = await api.call("GET", "/metrics")
    assert status == 200
    status, body, _ = await api.call("GET", "/health")
    assert status == 503
    assert body == {
        "status": "unavailable",
        "machine": api.ctx.machine_id,
        "registered": False,
        "leader": False,
        "reason": UNAVAILABLE,
    }


async def test_health_when_registered(api: Api) -> None:
    api.leader = True
    status, body, response = await api.call("GET", "/health")
    assert status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert body == {
        "status": "ok",
        "machine": api.ctx.machine_id,
        "registered": True,
        "leader": True,
    }
    status, _ = await api.error("POST", "/health")
    assert status == 405


async def test_query_parameters_fleet_does_not_know_are_ignored(api: Api) -> None:
    status, body, _ = await api.call("GET", f"{V1}/units", params={"alt": "json", "x": "1"})
    assert (status, body) == (200, {})


async def test_registry_outage_is_503_with_the_cause(api: Api) -> None:
    api.fake.set_unavailable(True)
    try:
        status, message = await api.error("GET", f"{V1}/units")
    finally:
        api.fake.set_unavailable(False)
    assert status == 503
    assert message.startswith(UNAVAILABLE + ": ")


async def test_unexpected_errors_are_500_without_details(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def boom(*args: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setitem(api_app.UNITS.methods, "GET", boom)
    status, message = await api.error("GET", f"{V1}/units")
    assert status == 500
    assert "secret" not in message
