"""Hypothesis over the whole API: arbitrary methods, paths, query strings, headers and bodies
(raw bytes, arbitrary JSON, and near-valid Units and PATCH documents) against a real server.

Invariants: never a 5xx (the server is registered and etcd is up); every response carries
the Server header; every 4xx is fleet's JSON error body with the status as its code; and a 4xx
changes nothing in etcd. State accumulates across examples (units get created, replaced,
destroyed), so later requests meet a populated cluster.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fleetd.api.context import ApiContext
from fleetd.api.server import ApiServer
from fleetd.config import Config
from fleetd.model import Machine, TargetState
from fleetd.registry.fake import FakeKV
from fleetd.registry.registry import Registry
from fleetd.unit.file import parse_unit


class Served:
    def __init__(self) -> None:
        self.kv = FakeKV()
        self.registry = Registry(self.kv)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = Config(api_socket="", api_tcp=f"127.0.0.1:{self.port}", api_tcp_insecure=True)
        ctx = ApiContext(self.registry, machine_id="m1", token_limit=2, max_unit_bytes=4096)
        self.server = ApiServer(ctx, config, environ={})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stored(self) -> dict[str, str]:
        return self.kv.dump()


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    s = Served()
    s.thread.start()
    s.run(s.server.start())

    async def seed() -> None:
        lease = await s.kv.grant(3600)
        await s.registry.register_machine(Machine.make("m1", "10.0.0.1", {"az": "a"}), lease)
        body = parse_unit("[Service]\nExecStart=/bin/true\n")
        await s.registry.create_unit("hello.service", body, TargetState.LAUNCHED)
        await s.registry.create_unit("t@.service", body)

    s.run(seed())
    yield s
    s.run(s.server.stop())
    s.loop.call_soon_threadsafe(s.loop.stop)
    s.thread.join(10)


# Unit names the fuzzers pick from, valid and not: NAMES has them all, ITEM_NAMES (a unit's
# own URL) not "", ".", ".." or "%".
URL_NAMES = [
    "hello.service",
    "new.service",
    "t@.service",
    "t@1.service",
    "x.socket",
    "a b.service",
    "noext",
    "@x.service",
    "x.bogus",
]
ODD_NAMES = ["é.service", "a" * 300 + ".service"]
NAMES = st.sampled_from([*URL_NAMES, "..", ".", "%", *ODD_NAMES, ""]) | st.text(max_size=20)
STATES = st.sampled_from(["inactive", "loaded", "launched", "", "bogus", "LAUNCHED"])
SECTIONS = st.sampled_from(["Unit", "Service", "X-Fleet", "Install", "", "a]b"])
KEYS = st.sampled_from(
    [
        "ExecStart",
        "Description",
        "MachineID",
        "Conflicts",
        "Global",
        "MachineOf",
        "MachineMetadata",
        "Replaces",
        "PartitionPolicy",
        "",
        "a=b",
    ]
)
VALUES = st.sampled_from(
    ["/bin/true", "true", "m1", "*.service", "stop", "", " x", "a\nb", "x\\", "role=db"]
) | st.text(max_size=30)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def units(draw: st.DrawFn) -> Any:
    option = st.fixed_dictionaries(
        {}, optional={"section": SECTIONS | JSON, "name": KEYS | JSON, "value": VALUES | JSON}
    )
    return draw(
        st.fixed_dictionaries(
            {},
            optional={
                "name": NAMES | JSON,
                "desiredState": STATES | JSON,
                "currentState": STATES,
                "machineID": st.sampled_from(["m1", ""]) | JSON,
                "options": st.lists(option, max_size=5) | JSON,
            },
        )
    )


PATCH_OPS = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "op": st.sampled_from(["add", "remove", "replace", "move", ""]) | JSON,
            "path": st.sampled_from(
                [
                    "/m1/metadata/k",
                    "/m2/metadata/a.b",
                    "/m1/meta/k",
                    "/m1/metadata/k\n",
                    "//metadata/k",
                ]
            )
            | st.text(max_size=20),
            "value": st.sampled_from([{"value": "v"}, "v", {"value": ""}, {}]) | JSON,
        },
    ),
    max_size=4,
)
RAW_BODIES = (
    st.builds(lambda o: json.dumps(o).encode(), units() | PATCH_OPS | JSON)
    | st.binary(max_size=64)
    | st.just(b"")
)
API_PATHS = st.builds(
    lambda prefix, resource, item: (
        f"{prefix}/{resource}" + (f"/{quote(item, safe='')}" if item is not None else "")
    ),
    st.sampled_from(["/fleet/v1", "/fleet/v1", "/v1-alpha"]),
    st.sampled_from(["units", "units", "state", "machines", "discovery", "discovery.json"]),
    st.none() | NAMES,
)
OTHER_PATHS = st.sampled_from(
    ["/", "/metrics", "/health", "/fleet/v1", "/fleet/v1/units/", "/fleet/v1/", "/x"]
) | st.text(min_size=1, max_size=30).map(lambda t: "/" + quote(t, safe="/"))
QUERIES = st.lists(
    st.tuples(
        st.sampled_from(["nextPageToken", "machineID", "unitName", "alt", "x"])
        | st.text(max_size=5),
        st.sampled_from(
            ["AgACAA==", "AgABAA==", "ZAACAA==", "AgAAAA==", "m1", "hello.service", "json", ""]
        )
        | st.text(max_size=12),
    ),
    max_size=3,
)
CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        None,
        "application/jsonx",
    ]
)


ITEM_NAMES = st.sampled_from([*URL_NAMES, *ODD_NAMES]) | st.text(min_size=1, max_size=20).filter(
    lambda t: "/" not in t and t not in (".", "..")
)
AIMED = st.one_of(
    st.tuples(
        st.just("PUT"), ITEM_NAMES.map(lambda n: f"/fleet/v1/units/{quote(n, safe='')}"), units()
    ),
    st.tuples(st.just("PUT"), st.just("/fleet/v1/units/new.service"), units()),
    st.tuples(st.just("PUT"), st.just("/fleet/v1/units/hello.service"), units()),
    st.tuples(st.just("PATCH"), st.just("/fleet/v1/machines"), PATCH_OPS),
    st.tuples(
        st.sampled_from(["GET", "DELETE"]),
        ITEM_NAMES.map(lambda n: f"/fleet/v1/units/{quote(n, safe='')}"),
        st.none(),
    ),
    st.tuples(
        st.just("GET"),
        st.sampled_from(["/fleet/v1/units", "/fleet/v1/state", "/fleet/v1/machines"])
        | ITEM_NAMES.map(lambda n: f"/v1-alpha/state/{quote(n, safe='')}"),
        st.none(),
    ),
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(method, path, body): half well-aimed (Unit bodies PUT to unit paths, op lists PATCHed
    to /machines, lists and items read), so the deep paths get exercised; half junk."""
    if draw(st.booleans()):
        method, path, doc = draw(AIMED)
        return method, path, b"" if doc is None else json.dumps(doc).encode()
    method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "POST", "HEAD", "OPTIONS"]))
    return method, draw(API_PATHS | OTHER_PATHS), draw(RAW_BODIES)


@settings(
    max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=requests(), query=QUERIES, content_type=CONTENT_TYPES)
def test_no_request_breaks_the_api(
    served: Served,
    request: tuple[str, str, bytes],
    query: list[tuple[str, str]],
    content_type: str | None,
) -> None:
    method, path, body = request
    url = path + ("?" + urlencode(query) if query else "")
    headers = {"Content-Type": content_type} if content_type else {}
    before = served.stored()
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    try:
        connection.request(
            method, url, body=body if method not in ("GET", "HEAD") else None, headers=headers
        )
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    status = response.status
    event(f"{method} {status}")
    assert status < 500, (status, data)
    assert response.getheader("Server", "").startswith("fleetd/")
    if status >= 400 and method != "HEAD" and not path.startswith("/health"):
        assert response.getheader("Content-Type") == "application/json"
        decoded = json.loads(data)
        assert set(decoded) == {"error"}
        assert decoded["error"]["code"] == status
        assert isinstance(decoded["error"]["message"], str)
        assert decoded["error"]["message"]
    if status >= 400:
        assert served.stored() == before, (method, url, body)
