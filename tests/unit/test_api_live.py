"""The API's listings kept current by a watch (fleetd/api/live.py): every change reaches the
listing in order without a reload, deletes remove items, a broken or compacted watch falls
back to a reload, and a write completed before a listing is always in it (read-your-writes),
even when the watch cannot deliver it. Each listing is compared with the full build the
API used before (views over range reads), byte for byte."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest
from test_api_harness import M1, M2, Api, serving_api

from fleetd.api.errors import json_bytes
from fleetd.api.live import LiveListings
from fleetd.errors import Compacted
from fleetd.model import TargetState
from fleetd.registry import codec
from fleetd.registry.kv import Delete, Put
from fleetd.unit.file import parse_unit
from fleetd.views import (
    load_machine_views,
    load_state_views,
    load_unit_views,
    machine_to_api,
    state_to_api,
    unit_to_api,
)


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with serving_api() as harness:
        yield harness


async def rebuilt(api: Api, collection: str) -> list[bytes]:
    """What the full rebuild from range reads gives for `collection`."""
    registry = api.registry
    if collection == "units":
        return [json_bytes(unit_to_api(v)) for v in await load_unit_views(registry)]
    if collection == "states":
        return [json_bytes(state_to_api(v)) for v in await load_state_views(registry)]
    return [json_bytes(machine_to_api(v)) for v in await load_machine_views(registry)]


async def assert_current(api: Api) -> None:
    for collection in ("units", "states", "machines"):
        assert list(await api.ctx.live_items(collection)) == await rebuilt(api, collection)


def live(api: Api) -> LiveListings:
    assert api.ctx.live is not None
    return api.ctx.live


async def followed(api: Api) -> asyncio.Task[None]:
    """Unit a.service and the listings loaded: the task that follows the registry's watch."""
    await api.add_unit("a.service")
    await api.ctx.live_items("units")
    follower = live(api)._follower
    assert follower is not None
    return follower


async def wait_for(cond: Callable[[], bool], what: str, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


async def test_changes_are_applied_in_order_without_a_reload(api: Api) -> None:
    await api.add_machine(M1, "10.0.0.1", role="web")
    for i in range(5):
        await api.run_unit(f"u{i}.service")
    await assert_current(api)
    # Several writes to the same keys: the last one wins, whatever was listed between.
    await api.registry.set_target_state("u1.service", TargetState.LOADED)
    await api.registry.set_target_state("u1.service", TargetState.INACTIVE)
    await api.publish("u2.service", M1, TargetState.LOADED, "inactive", "dead")
    await api.place("u3.service", None, "no machine matches")
    await api.add_unit("u0.service", "[Service]\nExecStart=/bin/other\n", TargetState.LAUNCHED)
    await api.add_unit("a-new.service")
    await api.add_machine(M2, "10.0.0.2")
    await api.registry.set_machine_metadata(M1, "role", "db")
    # Counted after the writes (they read what they change).
    ranges = api.fake.stats["range"]
    listed = {c: list(await api.ctx.live_items(c)) for c in ("units", "states", "machines")}
    # The listings read no range: the changes came from the watch.
    assert api.fake.stats["range"] == ranges
    assert live(api).loads == 1
    for collection, items in listed.items():
        assert items == await rebuilt(api, collection)
    units = [_decode(i)["name"] for i in listed["units"]]
    assert units == ["a-new.service", *(f"u{i}.service" for i in range(5))]


def _decode(item: bytes) -> dict[str, object]:
    decoded: dict[str, object] = json.loads(item)
    return decoded


async def test_deletes_remove_items(api: Api) -> None:
    await api.add_machine(M1, "10.0.0.1")
    await api.add_machine(M2, "10.0.0.2")
    await api.run_unit("a.service", M1)
    await api.run_unit("b.service", M2)
    await api.registry.set_machine_metadata(M2, "disk", "ssd")
    await assert_current(api)
    assert await api.registry.destroy_unit("a.service")
    await api.fake.txn([], [Delete(api.registry.keys.state("b.service", M2))])
    await api.registry.set_machine_metadata(M2, "disk", None)
    await api.fake.revoke(await _lease_of(api, M1))  # M1's lease expires: it leaves
    await assert_current(api)
    assert [_decode(i)["name"] for i in await api.ctx.live_items("units")] == ["b.service"]
    assert [_decode(i)["name"] for i in await api.ctx.live_items("states")] == ["a.service"]
    assert [_decode(i)["id"] for i in await api.ctx.live_items("machines")] == [M2]
    # The destroyed unit's body left the cache with it.
    assert len(api.ctx.registry.bodies) == 1
    assert live(api).loads == 1


async def _lease_of(api: Api, machine_id: str) -> int:
    kv = await api.fake.get(api.registry.keys.machine(machine_id))
    assert kv is not None
    return kv.lease


async def test_a_write_is_in_the_very_next_listing(api: Api) -> None:
    """Read-your-writes: no chance for the watch to run between the write and the listing."""
    await api.add_unit("a.service")
    await api.ctx.live_items("units")
    for state in (TargetState.LAUNCHED, TargetState.LOADED, TargetState.INACTIVE):
        await api.registry.set_target_state("a.service", state)
        (item,) = await api.ctx.live_items("units")
        assert _decode(item)["desiredState"] == state.value
    assert live(api).loads == 1


async def test_a_write_the_watch_never_sees_is_still_served(api: Api) -> None:
    """A write outside the registry prefix moves the revision but brings no event: the
    listing waits `catch_up_seconds` at most, then reloads, and is current."""
    await api.add_unit("a.service")
    await api.ctx.live_items("units")
    live(api).catch_up_seconds = 0.05
    await api.fake.txn([], [Put("/elsewhere/key", "x")])
    assert list(await api.ctx.live_items("units")) == await rebuilt(api, "units")
    assert live(api).loads == 2


async def test_a_broken_watch_falls_back_to_a_reload(api: Api) -> None:
    follower = await followed(api)
    api.fake.set_unavailable(True)
    await wait_for(follower.done, "the watch to end")
    api.fake.set_unavailable(False)
    await api.add_unit("b.service")
    assert list(await api.ctx.live_items("units")) == await rebuilt(api, "units")
    assert live(api).loads == 2
    # Followed again from the reload on.
    await api.add_unit("c.service")
    await assert_current(api)
    assert live(api).loads == 2


async def test_a_compacted_watch_falls_back_to_a_reload(api: Api) -> None:
    follower = await followed(api)
    # What etcd does to a watch whose next revision was compacted away.
    api.fake._break_watches(Compacted(api.fake.revision))
    await wait_for(follower.done, "the watch to end")
    await api.registry.destroy_unit("a.service")
    await api.add_unit("b.service")
    await api.fake.compact(api.fake.revision)
    assert [_decode(i)["name"] for i in await api.ctx.live_items("units")] == ["b.service"]
    assert live(api).loads == 2


async def test_a_unit_whose_body_comes_later_is_listed_then(api: Api) -> None:
    """A unit record without its body is left out (as fleet does) until the body arrives."""
    body = parse_unit("[Service]\nExecStart=/bin/late\n")
    keys = api.registry.keys
    await api.ctx.live_items("units")
    desired = codec.encode_desired(body.hash, TargetState.INACTIVE)
    await api.fake.txn([], [Put(keys.unit("late.service"), desired)])
    assert list(await api.ctx.live_items("units")) == []
    await api.fake.txn([], [Put(keys.body(body.hash), body.serialize())])
    assert [_decode(i)["name"] for i in await api.ctx.live_items("units")] == ["late.service"]
    assert list(await api.ctx.live_items("units")) == await rebuilt(api, "units")


async def test_closing_the_app_stops_the_watch() -> None:
    async with serving_api() as harness:
        await harness.ctx.live_items("units")
        follower = live(harness)._follower
        assert follower is not None
        assert not follower.done()
    assert follower.done()
    assert harness.ctx.live is None


async def test_a_unit_whose_body_was_pruned_is_listed_again(api: Api) -> None:
    """Destroying the last unit of a body drops it from the cache; a unit created again with
    that body writes no body (it is still stored), so no body event comes for it."""
    await api.add_unit("a.service")
    await api.ctx.live_items("units")
    assert await api.registry.destroy_unit("a.service")
    assert list(await api.ctx.live_items("units")) == []
    assert len(api.ctx.registry.bodies) == 0
    await api.add_unit("a.service")
    assert [_decode(i)["name"] for i in await api.ctx.live_items("units")] == ["a.service"]
    assert list(await api.ctx.live_items("units")) == await rebuilt(api, "units")
