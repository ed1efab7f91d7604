"""`FakeKV`: the `KV` contract (fleetd/registry/kv.py) in memory, with etcd's semantics.

For unit tests and the large-scale simulator; never for integration tests (those use a real
etcd). The same contract suite runs against this and `EtcdKV`, so what holds here holds there:

- one store revision, starting at 1, bumped once per transaction (or lease expiry) that
  changes something; each key's create/mod revision and version as etcd keeps them;
- compares as etcd evaluates them (a missing key has version/create/mod 0 and its value
  compares false against anything, even with "!=");
- transactions refused as etcd refuses them: more than MAX_TXN_OPS per list, a key put twice,
  a delete overlapping a put (ValueError), a put on a missing lease (NotFound), all before
  anything changes;
- leases with a TTL on an injectable clock, expired lazily at every request (and by
  `expire_leases()` / `advance()`), deleting their keys in one revision, as watch DELETEs;
- watches served from an event history from any revision still held, `Compacted` below the
  compacted revision.

It is built to be fast at simulator scale (a thousand agents, ten thousand units): keys in a
dict plus a sorted list (bisect) for prefix ranges, lease expiry from a heap, and watchers
found by looking up each prefix of an event's key rather than testing every watcher.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import time
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

from fleetd.errors import Compacted, LeaseNotFound, RegistryUnavailable
from fleetd.registry.kv import (
    Compare,
    Delete,
    EventType,
    KeyValue,
    Op,
    Put,
    TxnResult,
    WatchEvent,
    check_txn_size,
)

# etcd's largest lease TTL (lease.MaxLeaseTTL).
MAX_LEASE_TTL = 9_000_000_000

_WRITES = frozenset({"txn", "grant", "keepalive", "revoke", "compact"})


def _prefix_end(prefix: str) -> str | None:
    """The first string after every string starting with `prefix`; None: no upper bound.

    Python orders str by code point, which is the order of their UTF-8 bytes, so this is the
    same range etcd serves for the encoded prefix.
    """
    stem = prefix.rstrip("\U0010ffff")
    if not stem:
        return None
    return stem[:-1] + chr(ord(stem[-1]) + 1)


def _check_compare(c: Compare) -> None:
    if c.target not in ("value", "version", "create", "mod") or c.op not in ("==", "!=", "<", ">"):
        raise ValueError(f"bad compare {c!r}: unknown target or op")
    if c.target == "value":
        if not isinstance(c.operand, str):
            raise TypeError(f"compare on value needs a str operand: {c!r}")
    elif not isinstance(c.operand, int) or isinstance(c.operand, bool):
        raise TypeError(f"compare on {c.target} needs an int operand: {c!r}")


def _holds(op: str, a: str | int, b: str | int) -> bool:
    if op == "==":
        return a == b
    if op == "!=":
        return a != b
    if op == "<":
        return a < b  # type: ignore[operator]  # same types, checked by _check_compare
    return a > b  # type: ignore[operator]


def _check_key(key: str) -> None:
    if not key:
        raise ValueError("etcdserver: key is not provided")


def _check_intervals(ops: Sequence[Op]) -> None:
    """etcd refuses an empty key, a txn that puts one key twice or deletes a key it puts."""
    puts: set[str] = set()
    for op in ops:
        if not (isinstance(op, Delete) and op.prefix):
            _check_key(op.key)
        if isinstance(op, Put):
            if op.key in puts:
                raise ValueError(f"duplicate key given in txn request: {op.key!r}")
            puts.add(op.key)
    if not puts:
        return
    for op in ops:
        if isinstance(op, Delete):
            if op.prefix:
                end = _prefix_end(op.key)
                clash = any(k >= op.key and (end is None or k < end) for k in puts)
            else:
                clash = op.key in puts
            if clash:
                raise ValueError(
                    f"duplicate key given in txn request: delete of {op.key!r} overlaps a put"
                )


@dataclass(slots=True)
class _Lease:
    id: int
    ttl: int
    expires_at: float
    keys: set[str] = field(default_factory=set)


class _Watcher:
    __slots__ = ("error", "pending", "prefix", "start", "wakeup")

    def __init__(self, prefix: str, start: int) -> None:
        self.prefix = prefix
        self.start = start  # a watch from a future revision skips what comes before it
        self.pending: list[WatchEvent] = []
        self.wakeup = asyncio.Event()
        self.error: Exception | None = None


class FakeKV:
    """In-memory etcd. Knobs for tests: `advance()`, `expire_leases()`, `fail_next()`,
    `set_unavailable()`; `stats` counts requests by kind (get, range, txn, grant, keepalive,
    revoke, watch, compact) plus `watch_events` delivered, like an etcd request counter."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        min_lease_ttl: int = 1,
        auto_compact_retention: int | None = None,
    ) -> None:
        """`clock` gives seconds (only differences matter); `min_lease_ttl` is the shortest
        lease granted (etcd: 1.5 election timeouts rounded up, 2 s by default); with
        `auto_compact_retention` = N the history keeps about the last N revisions, like etcd's
        --auto-compaction-mode=revision, so a long simulation does not grow without end."""
        self._clock = clock
        self._offset = 0.0
        self._min_lease_ttl = max(1, min_lease_ttl)
        self._retention = auto_compact_retention
        self._data: dict[str, KeyValue] = {}
        self._keys: list[str] = []  # sorted, same set as _data
        self._revision = 1  # etcd's empty store is at revision 1
        self._compact_revision = 0
        self._history: list[WatchEvent] = []
        self._history_revs: list[int] = []  # parallel to _history, for bisect
        self._leases: dict[int, _Lease] = {}
        self._expiry: list[tuple[float, int]] = []  # heap; stale entries skipped
        self._next_lease = 0x1F1EE7_0000_0000  # looks like etcd's (large, non-zero) ids
        self._watchers: dict[str, set[_Watcher]] = {}  # by prefix
        self._prefix_lengths: Counter[int] = Counter()
        self._fail_next = 0
        self._fail_after_apply = False
        self._unavailable = False
        self._resumed: asyncio.Event | None = None  # set while paused (see pause)
        self._raft_term = 1
        self.mute: set[str] = set()  # members mute_members names (a test sets them)
        self._pause_timeout = 1.0
        self._closed = False
        self.stats: Counter[str] = Counter()

    # -- test and simulator knobs -------------------------------------------------------

    def now(self) -> float:
        return self._clock() + self._offset

    def advance(self, seconds: float) -> int:
        """Move this store's clock forward (on top of `clock`) and expire what is due.
        Returns the number of leases that expired."""
        self._offset += seconds
        return self.expire_leases()

    def expire_leases(self) -> int:
        """Expire every lease whose TTL has run out by now; returns how many did."""
        now = self.now()
        expired = 0
        while self._expiry and self._expiry[0][0] <= now:
            at, lease_id = heapq.heappop(self._expiry)
            lease = self._leases.get(lease_id)
            if lease is not None and lease.expires_at == at:  # else refreshed since
                self._revoke(lease)
                expired += 1
        return expired

    def fail_next(self, n: int = 1, *, after_apply: bool = False) -> None:
        """The next `n` requests raise RegistryUnavailable. With `after_apply`, writes are
        applied first and only their answer is lost, as when etcd commits a request but the
        connection breaks before the reply (the caller cannot tell the difference)."""
        self._fail_next = n
        self._fail_after_apply = after_apply

    def set_unavailable(self, unavailable: bool) -> None:
        """While unavailable every request raises RegistryUnavailable; open watches end with
        it at once (after the events they already received)."""
        self._unavailable = unavailable
        if unavailable:
            self._break_watches(RegistryUnavailable("fake etcd is unavailable"))

    @property
    def raft_term(self) -> int:
        return self._raft_term

    async def mute_members(self) -> list[str]:
        return sorted(self.mute)

    def elect(self) -> None:
        """An etcd leader election: the raft term grows (what clients see in answers)."""
        self._raft_term += 1

    def pause(self, request_timeout: float = 1.0) -> None:
        """Stall like a SIGSTOPped etcd: requests hang (each gives up after
        `request_timeout`, as the client's deadline does), watches go silent, and no lease
        expires until `resume`, when every lease whose TTL ran out meanwhile expires at once."""
        if self._resumed is None:
            self._resumed = asyncio.Event()
        self._pause_timeout = request_timeout

    def resume(self) -> None:
        if self._resumed is not None:
            self._resumed.set()
            self._resumed = None
        self.expire_leases()

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def compact_revision(self) -> int:
        return self._compact_revision

    @property
    def lease_count(self) -> int:
        return len(self._leases)

    @property
    def watch_count(self) -> int:
        return sum(len(ws) for ws in self._watchers.values())

    def dump(self, prefix: str = "") -> dict[str, str]:
        """Every key under `prefix` with its value, without counting a request (for tests)."""
        return {kv.key: kv.value for kv in self._scan(prefix)}

    # -- the contract ---------------------------------------------------------------------

    async def _begin(self, kind: str) -> bool:
        """Account for a request; raise an injected failure. True: fail after applying."""
        # Every request is a suspension point, as a network round trip is, so concurrent
        # callers interleave here as they would against etcd.
        await asyncio.sleep(0)
        self.stats[kind] += 1
        resumed = self._resumed
        if resumed is not None:
            try:
                await asyncio.wait_for(resumed.wait(), self._pause_timeout)
            except TimeoutError:
                raise RegistryUnavailable(
                    f"fake etcd {kind}: no answer within {self._pause_timeout:g}s (paused)"
                ) from None
        if self._closed:
            raise RegistryUnavailable("fake etcd client is closed")
        if self._unavailable:
            raise RegistryUnavailable("fake etcd is unavailable")
        fail_after = False
        if self._fail_next > 0:
            self._fail_next -= 1
            if not (self._fail_after_apply and kind in _WRITES):
                raise RegistryUnavailable(f"injected failure of a {kind} request")
            fail_after = True
        self.expire_leases()
        return fail_after

    @staticmethod
    def _lost_answer(kind: str) -> RegistryUnavailable:
        return RegistryUnavailable(f"injected failure: the {kind} was applied, its answer lost")

    async def get(self, key: str) -> KeyValue | None:
        _check_key(key)
        await self._begin("get")
        return self._data.get(key)

    async def get_many(self, keys: Sequence[str]) -> dict[str, KeyValue]:
        for key in keys:
            _check_key(key)
        await self._begin("get_many")
        return {k: self._data[k] for k in keys if k in self._data}

    async def range(self, prefix: str, *, keys_only: bool = False) -> tuple[list[KeyValue], int]:
        await self._begin("range")
        found = self._scan(prefix)
        if keys_only:
            found = [dataclasses.replace(kv, value="") for kv in found]
        return found, self._revision

    async def current_revision(self) -> int:
        await self._begin("revision")
        return self._revision

    def _bounds(self, prefix: str) -> tuple[int, int]:
        lo = bisect_left(self._keys, prefix)
        end = _prefix_end(prefix)
        hi = len(self._keys) if end is None else bisect_left(self._keys, end, lo)
        return lo, hi

    def _scan(self, prefix: str) -> list[KeyValue]:
        lo, hi = self._bounds(prefix)
        data = self._data
        return [data[k] for k in self._keys[lo:hi]]

    def _compare(self, c: Compare) -> bool:
        kv = self._data.get(c.key)
        if c.target == "value":
            # etcd: a missing key's value compares false whatever the operator.
            return kv is not None and _holds(c.op, kv.value, c.operand)
        if kv is None:
            actual = 0
        elif c.target == "version":
            actual = kv.version
        elif c.target == "create":
            actual = kv.create_revision
        else:
            actual = kv.mod_revision
        return _holds(c.op, actual, c.operand)

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        check_txn_size(compares, success, failure)
        for c in compares:
            _check_compare(c)
        _check_intervals(success)
        _check_intervals(failure)
        fail_after = await self._begin("txn")
        succeeded = all(self._compare(c) for c in compares)
        ops = success if succeeded else failure
        for op in ops:
            if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                raise LeaseNotFound(f"etcd txn: requested lease not found: {op.lease}")
        self._apply(ops)
        if fail_after:
            raise self._lost_answer("txn")
        return TxnResult(succeeded, self._revision)

    def _apply(self, ops: Sequence[Op]) -> None:
        rev = self._revision + 1
        events: list[WatchEvent] = []
        for op in ops:
            if isinstance(op, Put):
                events.append(self._put(op, rev))
            elif op.prefix:
                lo, hi = self._bounds(op.key)
                doomed = self._keys[lo:hi]
                del self._keys[lo:hi]
                for key in doomed:
                    events.append(self._forget(key, rev))
            elif op.key in self._data:
                del self._keys[bisect_left(self._keys, op.key)]
                events.append(self._forget(op.key, rev))
        if events:
            self._revision = rev
            self._publish(events)

    def _put(self, op: Put, rev: int) -> WatchEvent:
        old = self._data.get(op.key)
        if old is None:
            insort(self._keys, op.key)
            kv = KeyValue(op.key, op.value, rev, rev, 1, op.lease)
        else:
            if old.lease and old.lease != op.lease:
                self._detach(old)
            kv = KeyValue(op.key, op.value, old.create_revision, rev, old.version + 1, op.lease)
        if op.lease:
            self._leases[op.lease].keys.add(op.key)
        self._data[op.key] = kv
        return WatchEvent(EventType.PUT, op.key, op.value, rev)

    def _forget(self, key: str, rev: int) -> WatchEvent:
        """Drop `key` from the dict (the caller keeps the sorted list in step)."""
        old = self._data.pop(key)
        if old.lease:
            self._detach(old)
        return WatchEvent(EventType.DELETE, key, "", rev)

    def _detach(self, kv: KeyValue) -> None:
        lease = self._leases.get(kv.lease)
        if lease is not None:
            lease.keys.discard(kv.key)

    async def grant(self, ttl: int) -> int:
        fail_after = await self._begin("grant")
        if ttl > MAX_LEASE_TTL:
            raise ValueError(f"lease TTL {ttl} is too large (at most {MAX_LEASE_TTL})")
        ttl = max(ttl, self._min_lease_ttl)
        self._next_lease += 1
        lease = _Lease(self._next_lease, ttl, self.now() + ttl)
        self._leases[lease.id] = lease
        heapq.heappush(self._expiry, (lease.expires_at, lease.id))
        if fail_after:
            raise self._lost_answer("grant")
        return lease.id

    async def keepalive(self, lease: int) -> int:
        fail_after = await self._begin("keepalive")
        found = self._leases.get(lease)
        if found is None:
            return 0
        found.expires_at = self.now() + found.ttl
        heapq.heappush(self._expiry, (found.expires_at, found.id))
        if fail_after:
            raise self._lost_answer("keepalive")
        return found.ttl

    async def revoke(self, lease: int) -> None:
        fail_after = await self._begin("revoke")
        found = self._leases.get(lease)
        if found is not None:
            self._revoke(found)
        if fail_after:
            raise self._lost_answer("revoke")

    def _revoke(self, lease: _Lease) -> None:
        """End a lease: its keys go in one revision (none if it holds no key), as in etcd."""
        del self._leases[lease.id]
        self._apply([Delete(k) for k in sorted(lease.keys)])

    async def compact(self, revision: int) -> None:
        fail_after = await self._begin("compact")
        if revision > self._revision:
            raise ValueError(
                f"cannot compact at revision {revision}: a future revision"
                f" (the store is at {self._revision})"
            )
        self._compact(revision)
        if fail_after:
            raise self._lost_answer("compact")

    def _compact(self, revision: int) -> None:
        if revision <= self._compact_revision:
            return  # compacted already: nothing to do (etcd's error is moot for callers)
        self._compact_revision = revision
        cut = bisect_left(self._history_revs, revision)
        del self._history[:cut]
        del self._history_revs[:cut]

    # -- watches -------------------------------------------------------------------------

    def _publish(self, events: list[WatchEvent]) -> None:
        rev = events[0].mod_revision
        self._history.extend(events)
        self._history_revs.extend([rev] * len(events))
        if self._prefix_lengths:
            touched: set[_Watcher] = set()
            for ev in events:
                key = ev.key
                for n in self._prefix_lengths:
                    if n <= len(key):
                        for w in self._watchers.get(key[:n], ()):
                            if rev >= w.start:
                                w.pending.append(ev)
                                touched.add(w)
            for w in touched:
                w.wakeup.set()
        retention = self._retention
        # Compact in steps of `retention` so the history is trimmed in amortised O(1).
        if retention is not None and rev - self._compact_revision > 2 * retention:
            self._compact(rev - retention)

    def _break_watches(self, error: Exception) -> None:
        for ws in self._watchers.values():
            for w in ws:
                w.error = error
                w.wakeup.set()

    def watch(self, prefix: str, start_revision: int) -> AsyncGenerator[list[WatchEvent], None]:
        return self._watch(prefix, start_revision)

    async def _watch(
        self, prefix: str, start_revision: int
    ) -> AsyncGenerator[list[WatchEvent], None]:
        await self._begin("watch")
        if 0 < start_revision < self._compact_revision:
            raise Compacted(self._compact_revision)
        start = start_revision if start_revision > 0 else self._revision + 1
        w = _Watcher(prefix, start)
        # Register and read the backlog with no await in between: no event can fall in a gap.
        self._watchers.setdefault(prefix, set()).add(w)
        self._prefix_lengths[len(prefix)] += 1
        try:
            lo = bisect_left(self._history_revs, start)
            backlog = [ev for ev in self._history[lo:] if ev.key.startswith(prefix)]
            if backlog:
                self.stats["watch_events"] += len(backlog)
                yield backlog
            while True:
                if w.pending:
                    batch, w.pending = w.pending, []
                    self.stats["watch_events"] += len(batch)
                    yield batch
                    continue
                if w.error is not None:
                    raise w.error
                w.wakeup.clear()
                await w.wakeup.wait()
        finally:
            ws = self._watchers[prefix]
            ws.discard(w)
            if not ws:
                del self._watchers[prefix]
            self._prefix_lengths[len(prefix)] -= 1
            if not self._prefix_lengths[len(prefix)]:
                del self._prefix_lengths[len(prefix)]

    async def close(self) -> None:
        self._closed = True
        self._break_watches(RegistryUnavailable("fake etcd client is closed"))

    async def __aenter__(self) -> FakeKV:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
