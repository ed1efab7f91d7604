"""The KV contract (fleetd/registry/kv.py), checked on both implementations.

Every test in the first part runs twice: on `FakeKV` (clock driven by the test) and on
`EtcdKV` against a real etcd started by a fixture. The second part is etcd only: TLS,
authentication and a 3-member cluster. Nothing sleeps and hopes: time-dependent outcomes
(lease expiry on real etcd) are polled against a deadline.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetd.errors import Compacted, ConfigError, NotFound, RegistryUnavailable
from fleetd.etcd.client import EtcdConfig, EtcdKV
from fleetd.registry.fake import FakeKV
from fleetd.registry.kv import (
    KV,
    MAX_TXN_OPS,
    Compare,
    Delete,
    EventType,
    Put,
    WatchEvent,
)
from tests.integration.etcd_fixture import EtcdCluster, EtcdServer, TLSFiles, free_port

TIMEOUT = 2.0  # request timeout for the etcd client in these tests
DEADLINE = 10.0  # how long a polled condition may take before the test fails


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """One KV implementation plus the means to make time pass or etcd go away for it."""

    name: str
    kv: KV
    fake: FakeKV | None = None
    server: EtcdServer | None = None

    async def let_leases_expire(self, ttl: int, done: Callable[[], Awaitable[bool]]) -> None:
        """Make more than `ttl` seconds pass for leases, until `done()` holds."""
        if self.fake is not None:
            self.fake.advance(ttl + 0.001)
            assert await done()
            return
        await poll(done, f"leases of {ttl}s to expire")

    async def go_down(self) -> None:
        if self.fake is not None:
            self.fake.set_unavailable(True)
        else:
            assert self.server is not None
            # On the main thread, blocking the loop briefly: etcd's parent-death signal is
            # tied to the spawning thread (see etcd_fixture).
            self.server.stop()

    async def come_back(self) -> None:
        if self.fake is not None:
            self.fake.set_unavailable(False)
        else:
            assert self.server is not None
            self.server.start()

    async def retry(self, what: Callable[[], Awaitable[object]]) -> None:
        """Run `what` until it does not raise RegistryUnavailable (a client reconnecting)."""

        async def ok() -> bool:
            try:
                await what()
            except RegistryUnavailable:
                return False
            return True

        await poll(ok, "etcd to serve again")


async def poll(cond: Callable[[], Awaitable[bool]], what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not await cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline}s waiting for {what}")
        await asyncio.sleep(0.05)


def etcd_kv(endpoints: list[str], **kw: object) -> EtcdKV:
    return EtcdKV(EtcdConfig(endpoints=endpoints, request_timeout=TIMEOUT, **kw))  # type: ignore[arg-type]


@pytest.fixture(
    params=[
        "fake",
        pytest.param("etcd", marks=pytest.mark.integration),
        pytest.param("etcd-3.5", marks=pytest.mark.integration),
    ],
)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "fake":
        fake = FakeKV(clock=ManualClock())
        yield Backend("fake", fake, fake=fake)
        await fake.close()
        return
    fixture = "etcd35_server" if request.param == "etcd-3.5" else "etcd_server"
    server: EtcdServer = request.getfixturevalue(fixture)
    kv = etcd_kv(server.endpoints)
    yield Backend("etcd", kv, server=server)
    await kv.close()


async def next_batch(it: AsyncIterator[list[WatchEvent]]) -> list[WatchEvent]:
    return await asyncio.wait_for(anext(it), DEADLINE)


async def collect(it: AsyncIterator[list[WatchEvent]], count: int) -> list[WatchEvent]:
    """At least `count` events from a watch (batches are not split)."""
    events: list[WatchEvent] = []
    while len(events) < count:
        events += await next_batch(it)
    return events


def put(key: str, value: str, lease: int = 0) -> Put:
    return Put(key, value, lease)


# -- basic reads and writes ---------------------------------------------------------------


async def test_get_put_range_delete(backend: Backend) -> None:
    kv = backend.kv
    assert await kv.get("/t/a") is None
    r1 = await kv.txn([], [put("/t/a", "1")])
    assert r1.succeeded
    a = await kv.get("/t/a")
    assert a is not None
    assert (a.key, a.value, a.version, a.lease) == ("/t/a", "1", 1, 0)
    assert a.create_revision == a.mod_revision == r1.revision

    r2 = await kv.txn([], [put("/t/a", "2")])
    a2 = await kv.get("/t/a")
    assert a2 is not None
    assert (a2.value, a2.version, a2.create_revision, a2.mod_revision) == (
        "2",
        2,
        r1.revision,
        r2.revision,
    )

    # Prefix boundaries: "/t/" must not take "/t0" or "/u/"; non-ASCII keys sort as UTF-8.
    await kv.txn(
        [],
        [put("/t/c", "c"), put("/t/b", "b"), put("/t0", "x"), put("/u/a", "y"), put("/t/é", "e")],
    )
    kvs, rev = await kv.range("/t/")
    assert [k.key for k in kvs] == ["/t/a", "/t/b", "/t/c", "/t/é"]
    assert [k.value for k in kvs] == ["2", "b", "c", "e"]
    assert rev == r2.revision + 1
    everything, _ = await kv.range("")
    assert [k.key for k in everything] == ["/t/a", "/t/b", "/t/c", "/t/é", "/t0", "/u/a"]

    r3 = await kv.txn([], [Delete("/t/b")])
    assert r3.revision == rev + 1
    assert await kv.get("/t/b") is None
    await kv.txn([], [Delete("/t/", prefix=True)])
    assert (await kv.range("/t/"))[0] == []
    assert [k.key for k in (await kv.range(""))[0]] == ["/t0", "/u/a"]

    # Re-created after a delete: a new life, version starts again at 1.
    r4 = await kv.txn([], [put("/t/a", "again")])
    a3 = await kv.get("/t/a")
    assert a3 is not None
    assert (a3.version, a3.create_revision) == (1, r4.revision)


async def test_get_many_across_many_transactions(backend: Backend) -> None:
    kv = backend.kv
    for start in range(0, 300, 100):
        await kv.txn([], [put(f"/many/{i:03d}", str(i)) for i in range(start, start + 100)])
    asked = [f"/many/{i:03d}" for i in range(300)] + ["/many/absent", "/many/007"]
    found = await kv.get_many(asked)
    assert sorted(found) == [f"/many/{i:03d}" for i in range(300)]  # 3 reads of 128 keys
    assert found["/many/299"].value == "299"
    assert await kv.get_many([]) == {}


async def test_revision_moves_once_per_writing_txn(backend: Backend) -> None:
    kv = backend.kv
    _, start = await kv.range("")
    assert start == 1  # a fresh etcd store
    r = await kv.txn([], [put(f"/r/{i}", str(i)) for i in range(5)])
    assert r.revision == start + 1
    kvs, rev = await kv.range("/r/")
    assert rev == r.revision
    assert {k.mod_revision for k in kvs} == {r.revision}
    # Deleting nothing, or a txn with no ops, changes nothing and keeps the revision.
    assert (await kv.txn([], [Delete("/nothing")])).revision == r.revision
    assert (await kv.txn([], [Delete("/nothing/", prefix=True)])).revision == r.revision
    assert (await kv.txn([], [])).revision == r.revision


# -- transactions -------------------------------------------------------------------------


async def test_compare_and_swap(backend: Backend) -> None:
    kv = backend.kv
    created = await kv.txn([Compare("/c/k", "version", "==", 0)], [put("/c/k", "v1")])
    assert created.succeeded
    # Someone else's create-if-absent now loses and runs the failure branch.
    lost = await kv.txn(
        [Compare("/c/k", "version", "==", 0)], [put("/c/k", "mine")], [put("/c/lost", "1")]
    )
    assert not lost.succeeded
    got = await kv.get("/c/k")
    assert got is not None
    assert got.value == "v1"
    assert (await kv.get("/c/lost")) is not None
    assert lost.revision == created.revision + 1  # the failure branch wrote

    mod, create = got.mod_revision, got.create_revision
    cases: list[tuple[Compare, bool]] = [
        (Compare("/c/k", "mod", "==", mod), True),
        (Compare("/c/k", "mod", "==", mod - 1), False),
        (Compare("/c/k", "mod", "!=", mod), False),
        (Compare("/c/k", "mod", "<", mod + 1), True),
        (Compare("/c/k", "mod", ">", mod), False),
        (Compare("/c/k", "create", "==", create), True),
        (Compare("/c/k", "create", ">", 0), True),
        (Compare("/c/k", "version", "==", 1), True),
        (Compare("/c/k", "version", ">", 1), False),
        (Compare("/c/k", "version", "!=", 0), True),
        (Compare("/c/k", "value", "==", "v1"), True),
        (Compare("/c/k", "value", "==", "v2"), False),
        (Compare("/c/k", "value", "!=", "v2"), True),
        (Compare("/c/k", "value", "<", "v2"), True),
        (Compare("/c/k", "value", ">", "v2"), False),
        # A missing key: version/create/mod are 0; its value compares false, even "!=".
        (Compare("/c/none", "version", "==", 0), True),
        (Compare("/c/none", "create", "==", 0), True),
        (Compare("/c/none", "mod", "<", 1), True),
        (Compare("/c/none", "value", "==", ""), False),
        (Compare("/c/none", "value", "!=", "x"), False),
    ]
    for compare, expected in cases:
        result = await kv.txn([compare], [])
        assert result.succeeded is expected, compare
    # All compares must hold.
    assert not (await kv.txn([cases[0][0], cases[1][0]], [])).succeeded
    assert (await kv.txn([cases[0][0], cases[5][0]], [])).succeeded

    # A CAS on mod revision: the first writer wins, the second sees a conflict.
    first = await kv.txn([Compare("/c/k", "mod", "==", mod)], [put("/c/k", "v2")])
    second = await kv.txn([Compare("/c/k", "mod", "==", mod)], [put("/c/k", "v3")])
    assert (first.succeeded, second.succeeded) == (True, False)
    assert second.revision == first.revision  # a failed compare with no failure ops: no write
    final = await kv.get("/c/k")
    assert final is not None
    assert final.value == "v2"


async def test_txn_limits_and_refusals(backend: Backend) -> None:
    kv = backend.kv
    too_many = [put(f"/big/{i:03}", "x") for i in range(MAX_TXN_OPS + 1)]
    with pytest.raises(ValueError, match="at most 128"):
        await kv.txn([], too_many)
    with pytest.raises(ValueError, match="at most 128"):
        await kv.txn([], [], [Delete(f"/big/{i}") for i in range(MAX_TXN_OPS + 1)])
    with pytest.raises(ValueError, match="at most 128"):
        await kv.txn([Compare(f"/big/{i}", "version", "==", 0) for i in range(129)], [])
    assert (await kv.range("/big/"))[0] == []

    # 200 operations: the caller chunks them into transactions of at most MAX_TXN_OPS.
    ops = [put(f"/big/{i:03}", str(i)) for i in range(200)]
    for start in range(0, len(ops), MAX_TXN_OPS):
        assert (await kv.txn([], ops[start : start + MAX_TXN_OPS])).succeeded
    kvs, _ = await kv.range("/big/")
    assert len(kvs) == 200

    # etcd refuses a key put twice, and a delete overlapping a put, in one branch.
    with pytest.raises(ValueError, match="duplicate key"):
        await kv.txn([], [put("/d/a", "1"), put("/d/a", "2")])
    with pytest.raises(ValueError, match="duplicate key"):
        await kv.txn([], [put("/d/a", "1"), Delete("/d/", prefix=True)])
    with pytest.raises(ValueError, match="key is not provided"):
        await kv.txn([], [put("", "1")])
    with pytest.raises(ValueError, match="key is not provided"):
        await kv.get("")
    # A put on a lease that does not exist refuses the whole transaction.
    _, before = await kv.range("")
    with pytest.raises(NotFound, match="lease not found"):
        await kv.txn([], [put("/d/b", "1"), put("/d/c", "1", lease=123456789)])
    assert (await kv.range("/d/"))[0] == []
    assert (await kv.range(""))[1] == before


# -- leases -------------------------------------------------------------------------------


async def test_lease_expiry_deletes_attached_keys(backend: Backend) -> None:
    kv = backend.kv
    lease = await kv.grant(1)
    assert lease != 0
    r = await kv.txn([], [put("/l/a", "1", lease), put("/l/b", "2", lease), put("/l/c", "3")])
    a = await kv.get("/l/a")
    assert a is not None
    assert a.lease == lease
    watch = kv.watch("/l/", r.revision + 1)

    async def gone() -> bool:
        kvs, _ = await kv.range("/l/")
        return [k.key for k in kvs] == ["/l/c"]

    # Start the watch before expiry so its DELETEs arrive live.
    pending = asyncio.ensure_future(next_batch(watch))
    await asyncio.sleep(0)
    await backend.let_leases_expire(1, gone)
    events = await pending
    if len(events) < 2:
        events += await collect(watch, 2 - len(events))
    assert [(e.type, e.key, e.value) for e in events] == [
        (EventType.DELETE, "/l/a", ""),
        (EventType.DELETE, "/l/b", ""),
    ]
    # One revision for the whole expiry, as etcd revokes a lease in one transaction.
    assert events[0].mod_revision == events[1].mod_revision > r.revision
    assert await kv.keepalive(lease) == 0
    # A put on the expired lease is refused.
    with pytest.raises(NotFound):
        await kv.txn([], [put("/l/a", "again", lease)])
    await watch.aclose()  # type: ignore[attr-defined]


async def test_keepalive_and_revoke(backend: Backend) -> None:
    kv = backend.kv
    lease = await kv.grant(5)
    ttl = await kv.keepalive(lease)
    assert 1 <= ttl <= 5
    if backend.fake is not None:
        # Refreshing restarts the TTL: 4 s + 4 s after the grant it is still alive.
        backend.fake.advance(4)
        assert await kv.keepalive(lease) == 5
        backend.fake.advance(4)
        assert await kv.keepalive(lease) == 5
    await kv.txn([], [put("/k/a", "1", lease), put("/k/b", "1", lease), put("/k/c", "1")])
    _, before = await kv.range("")
    await kv.revoke(lease)
    kvs, after = await kv.range("/k/")
    assert [k.key for k in kvs] == ["/k/c"]
    assert after == before + 1  # both keys went in one revision
    assert await kv.keepalive(lease) == 0
    await kv.revoke(lease)  # a missing lease is no error
    # A lease with no keys: revoking it writes nothing.
    empty = await kv.grant(5)
    await kv.revoke(empty)
    assert (await kv.range(""))[1] == after


async def test_reput_without_lease_detaches_key(backend: Backend) -> None:
    kv = backend.kv
    lease = await kv.grant(5)
    await kv.txn([], [put("/p/a", "1", lease), put("/p/b", "1", lease)])
    await kv.txn([], [put("/p/a", "2")])  # now without a lease
    await kv.revoke(lease)
    kvs, _ = await kv.range("/p/")
    assert [(k.key, k.value, k.lease) for k in kvs] == [("/p/a", "2", 0)]


# -- watches ------------------------------------------------------------------------------


async def test_watch_from_revision_in_order(backend: Backend) -> None:
    kv = backend.kv
    r1 = await kv.txn([], [put("/w/a", "1")])
    await kv.txn([], [put("/other/x", "1"), put("/w/b", "1")])
    await kv.txn([], [put("/w/a", "2")])
    await kv.txn([], [Delete("/w/b")])
    watch = kv.watch("/w/", r1.revision)
    events = await collect(watch, 4)
    assert [(e.type, e.key, e.value) for e in events] == [
        (EventType.PUT, "/w/a", "1"),
        (EventType.PUT, "/w/b", "1"),
        (EventType.PUT, "/w/a", "2"),
        (EventType.DELETE, "/w/b", ""),
    ]
    revs = [e.mod_revision for e in events]
    assert revs == sorted(revs)
    assert revs[0] == r1.revision
    # Live events follow, in order; a txn's events arrive together in one batch.
    r5 = await kv.txn([], [put("/w/c", "1"), put("/w/d", "1"), put("/other/y", "1")])
    batch = await next_batch(watch)
    assert [(e.key, e.mod_revision) for e in batch] == [
        ("/w/c", r5.revision),
        ("/w/d", r5.revision),
    ]
    # A watch from a revision not reached yet starts there, not before.
    future = kv.watch("/w/", r5.revision + 2)
    first_future = asyncio.ensure_future(next_batch(future))
    await kv.txn([], [put("/w/e", "skipped by the future watch")])
    await kv.txn([], [Delete("/w/", prefix=True)])
    assert {e.mod_revision for e in await first_future} == {r5.revision + 2}
    await future.aclose()  # type: ignore[attr-defined]
    # (A batch may hold several revisions, never part of one.)
    deletes = await collect(watch, 5)
    assert [(e.type, e.key) for e in deletes] == [
        (EventType.PUT, "/w/e"),
        (EventType.DELETE, "/w/a"),
        (EventType.DELETE, "/w/c"),
        (EventType.DELETE, "/w/d"),
        (EventType.DELETE, "/w/e"),
    ]
    await watch.aclose()  # type: ignore[attr-defined]


async def test_watch_stops_cleanly_on_aclose(backend: Backend) -> None:
    kv = backend.kv
    watch = kv.watch("/q/", 0)
    pending = asyncio.ensure_future(next_batch(watch))
    await asyncio.sleep(0.1)  # let the watch get created
    await kv.txn([], [put("/q/a", "1")])
    assert [e.key for e in await pending] == ["/q/a"]
    await watch.aclose()  # type: ignore[attr-defined]
    # The store no longer serves that watch.
    if backend.fake is not None:
        assert backend.fake.watch_count == 0
    else:
        assert backend.server is not None
        server = backend.server

        async def no_watchers() -> bool:
            return await asyncio.to_thread(etcd_watchers, server) == 0

        await poll(no_watchers, "etcd to drop the cancelled watcher")
    # Other requests are unaffected.
    assert await kv.get("/q/a") is not None


async def test_watch_resume_after_restart(backend: Backend) -> None:
    kv = backend.kv
    r = await kv.txn([], [put("/s/a", "1")])
    watch = kv.watch("/s/", r.revision)
    seen = await collect(watch, 1)
    last = seen[-1].mod_revision

    await backend.go_down()
    with pytest.raises(RegistryUnavailable):
        await collect(watch, 1)  # the stream breaks; it does not hang
    await backend.come_back()
    await backend.retry(lambda: kv.get("/s/a"))

    await kv.txn([], [put("/s/b", "2")])
    await kv.txn([], [put("/s/a", "3"), Delete("/s/b")])
    resumed = kv.watch("/s/", last + 1)
    events = await collect(resumed, 3)
    assert [(e.type, e.key, e.value) for e in events] == [
        (EventType.PUT, "/s/b", "2"),
        (EventType.PUT, "/s/a", "3"),
        (EventType.DELETE, "/s/b", ""),
    ]
    assert all(e.mod_revision > last for e in events)  # nothing seen twice
    await resumed.aclose()  # type: ignore[attr-defined]


async def test_compacted_watch_and_resync(backend: Backend) -> None:
    kv = backend.kv
    first = await kv.txn([], [put("/z/a", "1")])
    for i in range(3):
        await kv.txn([], [put("/z/a", str(i + 2))])
    _, rev = await kv.range("")
    await kv.compact(rev)
    await kv.compact(rev)  # again: nothing to do, no error
    with pytest.raises(ValueError, match="future revision"):
        await kv.compact(rev + 100)  # a revision the store has not reached

    with pytest.raises(Compacted) as caught:
        await collect(kv.watch("/z/", first.revision), 1)
    assert caught.value.compact_revision == rev

    # Resync: a fresh snapshot, then watch from just after it.
    kvs, snap = await kv.range("/z/")
    assert [(k.key, k.value) for k in kvs] == [("/z/a", "4")]
    watch = kv.watch("/z/", snap + 1)
    await kv.txn([], [put("/z/b", "1")])
    events = await collect(watch, 1)
    assert [(e.key, e.mod_revision) for e in events] == [("/z/b", snap + 1)]
    await watch.aclose()  # type: ignore[attr-defined]


async def test_unavailable_is_reported_not_hung(backend: Backend) -> None:
    kv = backend.kv
    lease = await kv.grant(5)
    await backend.go_down()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: kv.get("/x"),
        lambda: kv.range("/x"),
        lambda: kv.txn([], [put("/x", "1")]),
        lambda: kv.grant(5),
        lambda: kv.keepalive(lease),
        lambda: kv.revoke(lease),
        lambda: kv.compact(1),
        lambda: collect(kv.watch("/x", 1), 1),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable):
            await call()
        assert time.monotonic() - started < TIMEOUT + 1.0
    await backend.come_back()
    await backend.retry(lambda: kv.get("/x"))
    assert await kv.keepalive(lease) >= 1  # the lease outlived the outage


# -- FakeKV's own knobs -------------------------------------------------------------------


async def test_fake_injected_failures_and_stats() -> None:
    kv = FakeKV(clock=ManualClock())
    kv.fail_next(2)
    for _ in range(2):
        with pytest.raises(RegistryUnavailable):
            await kv.get("/a")
    assert await kv.get("/a") is None
    # A lost answer: the write happened, the caller was told it failed.
    kv.fail_next(1, after_apply=True)
    with pytest.raises(RegistryUnavailable):
        await kv.txn([], [Put("/a", "1")])
    assert kv.dump() == {"/a": "1"}
    assert kv.stats["get"] == 3
    assert kv.stats["txn"] == 1
    # Auto-compaction keeps the history bounded.
    small = FakeKV(auto_compact_retention=10)
    for i in range(100):
        await small.txn([], [Put("/k", str(i))])
    assert small.revision - 30 <= small.compact_revision <= small.revision - 10
    with pytest.raises(Compacted):
        await collect(small.watch("/k", 2), 1)
    # Closing ends open watches.
    watch = small.watch("/k", small.revision)
    await collect(watch, 1)
    await small.close()
    with pytest.raises(RegistryUnavailable):
        await collect(watch, 1)


async def test_fake_scales() -> None:
    """10,000 keys under 1,000 machine prefixes, 1,000 watchers: ranges and dispatch stay fast."""
    kv = FakeKV(clock=ManualClock())
    watches = [kv.watch(f"/s/m{m:04}/", 0) for m in range(1000)]
    first = [asyncio.ensure_future(anext(w)) for w in watches]
    await asyncio.sleep(0)
    started = time.monotonic()
    for m in range(1000):
        await kv.txn([], [Put(f"/s/m{m:04}/u{u}", "x") for u in range(10)])
    batches = await asyncio.gather(*first)
    assert all(len(b) == 10 for b in batches)
    for m in range(0, 1000, 10):
        kvs, _ = await kv.range(f"/s/m{m:04}/")
        assert len(kvs) == 10
    assert time.monotonic() - started < 5.0
    for w in watches:
        await w.aclose()  # type: ignore[attr-defined]
    assert kv.watch_count == 0


# -- etcd only: configuration -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"endpoints": []}, "no etcd endpoints"),
        ({"endpoints": ["127.0.0.1:2379"]}, "expected http://"),
        ({"endpoints": ["ftp://127.0.0.1:2379"]}, "expected http://"),
        ({"endpoints": ["http://127.0.0.1:99999"]}, "bad etcd endpoint"),
        ({"endpoints": ["http://127.0.0.1:2379/v2"]}, "scheme://host:port only"),
        (
            {"endpoints": ["http://127.0.0.1:2379", "https://127.0.0.2:2379"]},
            "mix http:// and https://",
        ),
        ({"endpoints": ["https://h:1"], "cert_file": "c.pem"}, "cert_file and key_file"),
        ({"endpoints": ["https://h:1"], "key_file": "k.pem"}, "cert_file and key_file"),
        ({"endpoints": ["http://h:1"], "ca_file": "ca.pem"}, "use https://"),
        ({"username": "root"}, "username and password"),
        ({"password": "pw"}, "username and password"),
        ({"request_timeout": 0}, "request_timeout"),
    ],
)
def test_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        EtcdConfig(**kwargs)  # type: ignore[arg-type]


def test_unreadable_tls_files_fail_at_construction(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match="cannot read etcd CA file"):
        EtcdKV(EtcdConfig(endpoints=["https://127.0.0.1:2379"], ca_file=missing))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM file"):
        EtcdKV(EtcdConfig(endpoints=["https://127.0.0.1:2379"], ca_file=str(junk)))


async def test_nothing_listening_fails_fast() -> None:
    kv = etcd_kv([f"http://127.0.0.1:{free_port()}"])
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable, match="nothing is listening"):
        await kv.get("/a")
    assert time.monotonic() - started < TIMEOUT + 1.0
    await kv.close()


# -- etcd only: TLS -----------------------------------------------------------------------


@pytest.mark.integration
async def test_tls_with_ca_cert_and_key(etcd_tls_server: EtcdServer, tls_files: TLSFiles) -> None:
    kv = etcd_kv(
        etcd_tls_server.endpoints,
        ca_file=str(tls_files.ca),
        cert_file=str(tls_files.client_cert),
        key_file=str(tls_files.client_key),
    )
    r = await kv.txn([], [put("/tls/a", "1")])
    watch = kv.watch("/tls/", r.revision)
    assert [e.key for e in await collect(watch, 1)] == ["/tls/a"]
    await watch.aclose()  # type: ignore[attr-defined]
    lease = await kv.grant(5)
    assert await kv.keepalive(lease) >= 1
    await kv.close()


async def _fails_within_timeout(kv: EtcdKV, match: str) -> None:
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable, match=match):
        await kv.get("/a")
    assert time.monotonic() - started < TIMEOUT + 1.0
    await kv.close()
    # The keepalive stream has a connection of its own (fleetd/etcd/keepalive.py): it is
    # refused the same way.
    kv = EtcdKV(kv.config)
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable, match="etcd lease keepalive"):
        await kv.keepalive(1)
    assert time.monotonic() - started < TIMEOUT + 1.0
    await kv.close()


@pytest.mark.integration
async def test_plaintext_client_to_tls_etcd_fails_clearly(etcd_tls_server: EtcdServer) -> None:
    url = f"http://127.0.0.1:{etcd_tls_server.client_port}"
    await _fails_within_timeout(etcd_kv([url]), "does it serve TLS")


@pytest.mark.integration
async def test_tls_without_client_cert_is_refused(
    etcd_tls_server: EtcdServer, tls_files: TLSFiles
) -> None:
    kv = etcd_kv(etcd_tls_server.endpoints, ca_file=str(tls_files.ca))
    await _fails_within_timeout(kv, "needs a client certificate")


@pytest.mark.integration
async def test_tls_server_not_signed_by_our_ca_is_refused(
    etcd_tls_server: EtcdServer, tls_files: TLSFiles
) -> None:
    # A valid client certificate, but we trust another CA: the server must be rejected.
    kv = etcd_kv(
        etcd_tls_server.endpoints,
        ca_file=str(tls_files.other_ca),
        cert_file=str(tls_files.client_cert),
        key_file=str(tls_files.client_key),
    )
    await _fails_within_timeout(kv, "not signed by ca_file")


@pytest.mark.integration
async def test_tls_server_name_is_verified(
    etcd_tls_server: EtcdServer, tls_files: TLSFiles
) -> None:
    # The server certificate names 127.0.0.1 only; reaching the same server as "localhost"
    # must fail the hostname check even though the CA is right.
    kv = etcd_kv(
        [f"https://localhost:{etcd_tls_server.client_port}"],
        ca_file=str(tls_files.ca),
        cert_file=str(tls_files.client_cert),
        key_file=str(tls_files.client_key),
    )
    await _fails_within_timeout(kv, "does not name the host")


@pytest.mark.integration
async def test_tls_multi_endpoint_with_dead_first(
    etcd_tls_server: EtcdServer, tls_files: TLSFiles
) -> None:
    # Several endpoints: the certificate is still checked, against each member's own host.
    dead = f"https://127.0.0.1:{free_port()}"
    kv = etcd_kv(
        [dead, *etcd_tls_server.endpoints],
        ca_file=str(tls_files.ca),
        cert_file=str(tls_files.client_cert),
        key_file=str(tls_files.client_key),
    )
    await kv.txn([], [put("/tls/b", "1")])
    assert await kv.get("/tls/b") is not None
    assert await kv.keepalive(await kv.grant(5)) >= 1
    await kv.close()


@pytest.mark.integration
async def test_tls_each_member_is_checked_against_its_own_host(
    etcd_tls_server: EtcdServer, tls_files: TLSFiles
) -> None:
    # The first endpoint names a host the live member's certificate does not (it names
    # 127.0.0.1 only): that member is still reached, checked against its own 127.0.0.1.
    dead = f"https://localhost:{free_port()}"
    kv = etcd_kv(
        [dead, *etcd_tls_server.endpoints],
        ca_file=str(tls_files.ca),
        cert_file=str(tls_files.client_cert),
        key_file=str(tls_files.client_key),
    )
    await kv.txn([], [put("/tls/c", "1")])
    assert await kv.get("/tls/c") is not None
    assert await kv.keepalive(await kv.grant(5)) >= 1
    await kv.close()


# -- etcd only: authentication ------------------------------------------------------------


@pytest.mark.integration
async def test_user_password_auth(etcd_server: EtcdServer) -> None:
    etcd_server.enable_auth("s3cret")
    kv = etcd_kv(etcd_server.endpoints, username="root", password="s3cret")
    r = await kv.txn([], [put("/auth/a", "1")])
    lease = await kv.grant(5)
    assert await kv.keepalive(lease) >= 1
    watch = kv.watch("/auth/", r.revision)
    assert [e.key for e in await collect(watch, 1)] == ["/auth/a"]
    await watch.aclose()  # type: ignore[attr-defined]

    # etcd forgets or rejects a token (expiry, restart): the client authenticates again.
    client = kv.session
    client.token = "stale.1"
    assert await kv.get("/auth/a") is not None
    assert client.token != "stale.1"
    client.token = "stale.2"
    watch = kv.watch("/auth/", r.revision)
    assert [e.key for e in await collect(watch, 1)] == ["/auth/a"]
    await watch.aclose()  # type: ignore[attr-defined]
    # The keepalive stream (its own HTTP/2 connection) opens anew for a new token; etcd does
    # not check tokens on keepalives, so a stale one renews as well (a refusal would be
    # re-authenticated like any call: tests/unit/test_keepalive_stream.py).
    client.token = "stale.3"
    assert await kv.keepalive(lease) >= 1
    await kv.close()

    wrong = etcd_kv(etcd_server.endpoints, username="root", password="wrong")
    with pytest.raises(ConfigError, match="refused the credentials of user 'root'"):
        await wrong.get("/auth/a")
    await wrong.close()

    anonymous = etcd_kv(etcd_server.endpoints)
    with pytest.raises(ConfigError, match="requires authentication"):
        await anonymous.get("/auth/a")
    await anonymous.close()


# -- etcd only: a 3-member cluster --------------------------------------------------------


@pytest.mark.integration
async def test_cluster_survives_first_member_loss(etcd_cluster: EtcdCluster) -> None:
    kv = etcd_kv(etcd_cluster.endpoints)
    r = await kv.txn([], [put("/m/a", "1")])
    lease = await kv.grant(30)
    watch = kv.watch("/m/", r.revision)
    assert [e.key for e in await collect(watch, 1)] == ["/m/a"]

    etcd_cluster.members[0].kill()

    # The open watch may have been on the dead member: it breaks or carries on; either way a
    # resumed watch on the same channel reaches a live member.
    async def write() -> object:
        return await kv.txn([], [put("/m/b", "2")])

    backend = Backend("etcd", kv)
    await backend.retry(write)
    assert await kv.keepalive(lease) >= 1
    got = await kv.get("/m/b")
    assert got is not None
    await watch.aclose()  # type: ignore[attr-defined]
    resumed = kv.watch("/m/", r.revision + 1)
    events = await collect(resumed, 1)
    assert [e.key for e in events] == ["/m/b"]
    await resumed.aclose()  # type: ignore[attr-defined]
    await kv.close()


@pytest.mark.integration
async def test_a_frozen_member_is_mute_and_a_read_moves_off_it(etcd_cluster: EtcdCluster) -> None:
    """SIGSTOP of the member the channels are on (the first): a read that times out on it is
    answered by another member, within one timeout and the probe; mute_members names it, not
    a stopped member (it refuses: down, not frozen), and a channel on it leaves it at once."""
    kv, other = etcd_kv(etcd_cluster.endpoints), etcd_kv(etcd_cluster.endpoints)
    first, _, third = etcd_cluster.members
    assert first.proc is not None
    try:
        await kv.txn([], [put("/mute/a", "1")])
        assert await other.get("/mute/a") is not None  # both on the first member now
        assert await kv.mute_members() == []
        third.stop()
        assert await kv.mute_members() == []
        third.start()  # two members answering: a quorum, when the first freezes
        os.kill(first.proc.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            got = await kv.get("/mute/a")  # timed out there, probed, sent to the next
            assert got is not None
            assert got.value == "1"
            assert time.monotonic() - start < TIMEOUT + 1.0 + 1.0

            frozen = [etcd_cluster.endpoints[0].split("//")[1]]
            assert await other.mute_members() == frozen  # once: not left yet
            assert await other.mute_members() == frozen  # twice in a row: left
            start = time.monotonic()
            assert await other.get("/mute/a") is not None  # its connection was dropped
            assert time.monotonic() - start < 1.0
        finally:
            os.kill(first.proc.pid, signal.SIGCONT)
    finally:
        await kv.close()
        await other.close()


def etcd_watchers(server: EtcdServer) -> int:
    """Watchers etcd currently serves, from its Prometheus metrics."""
    with urllib.request.urlopen(f"{server.client_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(r"^etcd_debugging_mvcc_watcher_total (\S+)$", text, re.MULTILINE)
    assert match, "etcd exports no watcher gauge"
    return int(float(match.group(1)))


# -- etcd's raft term ------------------------------------------------------------------------


async def test_raft_term_is_seen_in_reads_keepalives_and_watches(backend: Backend) -> None:
    """The engine's grace after an etcd leader election needs the term from every kind of
    answer: a keepalive (presence) and a watch event (the engine plans on it)."""
    kv = backend.kv
    await kv.get("/term/none")
    term = kv.raft_term
    assert term >= 1
    lease = await kv.grant(30)
    assert await kv.keepalive(lease) > 0
    assert kv.raft_term == term  # no election meanwhile
    events = kv.watch("/term/", await kv.current_revision() + 1)
    try:
        await kv.txn([], [put("/term/a", "1")])
        assert [e.key for e in await next_batch(events)] == ["/term/a"]
    finally:
        await events.aclose()
    assert kv.raft_term == term
    await kv.revoke(lease)
