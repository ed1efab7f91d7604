"""Listings are built once and paged from it (fleetd/api/snapshots.py, and for unfiltered
listings fleetd/api/live.py, which keeps that build current through a watch): consecutive
pages of an unchanged cluster reuse one build, any write between two pages is seen by the
next page without a rebuild, and the pages keep fleet's bytes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_api_harness import M1, M2, V1, Api, serving_api

from fleetd.api.errors import json_bytes
from fleetd.api.snapshots import SnapshotCache, encode_page
from fleetd.model import TargetState

LIMIT = 3


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with serving_api(token_limit=LIMIT) as harness:
        yield harness


async def pages(api: Api, path: str, field: str) -> list[list[dict[str, Any]]]:
    """Every page of a listing, following nextPageToken as fleetctl does."""
    out = []
    query: dict[str, str] = {}
    while True:
        status, page, _ = await api.call("GET", f"{V1}/{path}", params=query)
        assert status == 200, page
        out.append(page.get(field, []))
        token = page.get("nextPageToken")
        if not token:
            return out
        query = {"nextPageToken": token}


def names(listing: list[list[dict[str, Any]]], key: str = "name") -> list[str]:
    return [item[key] for page in listing for item in page]


async def test_pages_of_an_unchanged_cluster_share_one_build(api: Api) -> None:
    for i in range(10):
        await api.add_unit(f"u{i:02}.service")
    listing = await pages(api, "units", "units")
    assert [len(p) for p in listing] == [3, 3, 3, 1]
    assert names(listing) == [f"u{i:02}.service" for i in range(10)]
    assert api.ctx.live is not None
    assert api.ctx.live.loads == 1
    ranges = api.fake.stats["range"]
    # Listing again reads nothing but the revision.
    assert names(await pages(api, "units", "units")) == names(listing)
    assert api.ctx.live.loads == 1
    assert api.fake.stats["range"] == ranges
    assert api.fake.stats["revision"] == 8


async def test_a_write_between_pages_is_seen_by_the_next_page(api: Api) -> None:
    for i in range(6):
        await api.add_unit(f"u{i}.service")
    _, first, _ = await api.call("GET", f"{V1}/units")
    assert names([first["units"]]) == ["u0.service", "u1.service", "u2.service"]
    # Between the pages: u4 changes state, u5 goes away, a new unit sorts onto page 2.
    await api.registry.set_target_state("u4.service", TargetState.LAUNCHED)
    assert await api.registry.destroy_unit("u5.service")
    await api.add_unit("u3a.service")
    params = {"nextPageToken": first["nextPageToken"]}
    _, second, _ = await api.call("GET", f"{V1}/units", params=params)
    assert [(u["name"], u["desiredState"]) for u in second["units"]] == [
        ("u3.service", "inactive"),
        ("u3a.service", "inactive"),
        ("u4.service", "launched"),
    ]
    # Applied from the watch: no second load.
    assert api.ctx.live is not None
    assert api.ctx.live.loads == 1


async def test_states_and_machines_are_fresh_and_filtered(api: Api) -> None:
    await api.add_machine(M1, "10.0.0.1")
    await api.run_unit("a.service", M1)
    listing = await pages(api, "state", "states")
    assert names(listing) == ["a.service"]
    await api.run_unit("b.service", M1)
    assert names(await pages(api, "state", "states")) == ["a.service", "b.service"]
    # A filter is a different listing, never served from the unfiltered one.
    filtered = await pages(api, "state?unitName=b.service", "states")
    assert names(filtered) == ["b.service"]
    assert names(await pages(api, "state", "states")) == ["a.service", "b.service"]
    assert names(await pages(api, "machines", "machines"), "id") == [M1]
    await api.add_machine(M2, "10.0.0.2")
    assert names(await pages(api, "machines", "machines"), "id") == [M1, M2]


async def test_unit_bodies_of_destroyed_units_leave_the_cache(api: Api) -> None:
    await api.add_unit("a.service", "[Service]\nExecStart=/bin/a\n")
    await api.add_unit("b.service", "[Service]\nExecStart=/bin/b\n")
    await pages(api, "units", "units")
    assert len(api.ctx.registry.bodies) == 2
    assert await api.registry.destroy_unit("a.service")
    assert names(await pages(api, "units", "units")) == ["b.service"]
    assert len(api.ctx.registry.bodies) == 1


async def test_concurrent_first_pages_build_once() -> None:
    cache = SnapshotCache()
    builds = 0

    async def revision() -> int:
        return 7

    async def build() -> list[bytes]:
        nonlocal builds
        builds += 1
        await asyncio.sleep(0.01)
        return [b"1"]

    results = await asyncio.gather(*(cache.items("units", None, revision, build) for _ in range(5)))
    assert results == [[b"1"]] * 5
    assert builds == 1


async def test_a_failed_build_leaves_nothing_cached() -> None:
    cache = SnapshotCache()

    async def revision() -> int:
        return 1

    async def broken() -> list[bytes]:
        raise RuntimeError("etcd went away")

    async def build() -> list[bytes]:
        return [b"2"]

    with pytest.raises(RuntimeError):
        await cache.items("units", None, revision, broken)
    assert await cache.items("units", None, revision, build) == [b"2"]


@pytest.mark.parametrize("token", [None, "ZAACAA=="])
@pytest.mark.parametrize("count", [0, 1, 3])
@pytest.mark.parametrize("token_first", [True, False])
def test_encode_page_is_json_bytes_of_the_page(
    token: str | None, count: int, token_first: bool
) -> None:
    objects = [{"name": f"u{i}\u00e9\"'", "options": [{"value": "a\\b"}]} for i in range(count)]
    page: dict[str, Any] = {}
    if token_first and token:
        page["nextPageToken"] = token
    if objects:
        page["units"] = objects
    if not token_first and token:
        page["nextPageToken"] = token
    encoded = encode_page([json_bytes(o) for o in objects], "units", token, token_first)
    assert encoded == json_bytes(page)
    assert json.loads(encoded) == page
