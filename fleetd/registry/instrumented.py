"""`InstrumentedKV`: a `KV` that reports each request (kind, duration, failure) to an observer.

It wraps the real KV in fleetd's wiring, so every etcd request the registry, agent, engine,
presence and API make is counted without any of them knowing (fleetd/api/metrics.py turns the
reports into Prometheus metrics). It adds no behaviour: results and exceptions pass through.

A watch is one long-lived request: it is counted when opened, as an error if its stream
fails, and not timed (its duration is the stream's life, not a latency).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

from fleetd.registry.kv import KV, Compare, KeyValue, Op, TxnResult, WatchEvent

T = TypeVar("T")


class RequestObserver(Protocol):
    def started(self, kind: str) -> None:
        """A request of `kind` ("get", "range", "txn", "watch", ...) was sent."""
        ...

    def finished(self, kind: str, seconds: float | None, failed: bool) -> None:
        """It ended after `seconds` (None: untimed), having raised or not."""
        ...


class InstrumentedKV:
    def __init__(
        self,
        kv: KV,
        observer: RequestObserver,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.inner = kv
        self._observer = observer
        self._clock = clock

    @property
    def raft_term(self) -> int:
        return self.inner.raft_term

    async def mute_members(self) -> list[str]:
        return await self.inner.mute_members()

    async def _timed(self, kind: str, call: Awaitable[T]) -> T:
        self._observer.started(kind)
        started = self._clock()
        try:
            result = await call
        except Exception:
            self._observer.finished(kind, self._clock() - started, True)
            raise
        self._observer.finished(kind, self._clock() - started, False)
        return result

    async def get(self, key: str) -> KeyValue | None:
        return await self._timed("get", self.inner.get(key))

    async def get_many(self, keys: Sequence[str]) -> dict[str, KeyValue]:
        return await self._timed("get_many", self.inner.get_many(keys))

    async def range(self, prefix: str, *, keys_only: bool = False) -> tuple[list[KeyValue], int]:
        return await self._timed("range", self.inner.range(prefix, keys_only=keys_only))

    async def current_revision(self) -> int:
        return await self._timed("revision", self.inner.current_revision())

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        return await self._timed("txn", self.inner.txn(compares, success, failure))

    async def grant(self, ttl: int) -> int:
        return await self._timed("grant", self.inner.grant(ttl))

    async def keepalive(self, lease: int) -> int:
        return await self._timed("keepalive", self.inner.keepalive(lease))

    async def revoke(self, lease: int) -> None:
        await self._timed("revoke", self.inner.revoke(lease))

    async def compact(self, revision: int) -> None:
        await self._timed("compact", self.inner.compact(revision))

    async def watch(
        self, prefix: str, start_revision: int
    ) -> AsyncGenerator[list[WatchEvent], None]:
        stream = self.inner.watch(prefix, start_revision)
        self._observer.started("watch")
        failed = False
        try:
            async for batch in stream:
                yield batch
        except Exception:
            failed = True
            raise
        finally:
            self._observer.finished("watch", None, failed)
            # The consumer may stop early (aclose, cancellation): close the inner stream too,
            # so the etcd watch is cancelled rather than left to the garbage collector.
            await stream.aclose()

    async def close(self) -> None:
        await self.inner.close()
