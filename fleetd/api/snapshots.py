"""Listings served page by page from one snapshot per collection, keyed by the etcd revision.

fleet's clients page through a collection 100 items at a time (`nextPageToken`), and every
page request used to rebuild the whole collection from full range reads: N/100 pages cost
O(N^2) (`fleetctl --driver api list-unit-files` took 42 s at 10,000 units). Here the first
page builds the collection once, as a list of items already encoded as JSON, stamped with
the store revision read *before* the build; each later request first asks etcd for its
current revision (one cheap request) and reuses the snapshot only if nothing at all was
written since. A write between two pages is therefore always seen by the next page, exactly
as before (fleet's pages were never a consistent cut either), and a write during a build
only costs one rebuild more, never staleness.

Memory stays bounded: one snapshot per collection (units, states, machines), replaced by the
next build. Concurrent first pages share one build instead of each reading the cluster.

Unfiltered listings are now served by fleetd/api/live.py, which keeps its items current from
a watch instead of rebuilding after every write; this cache serves filtered `/state`
listings, with the same guarantee.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Snapshot:
    revision: int
    key: Hashable  # what the listing was built for (e.g. the state filters)
    items: Sequence[bytes]  # each item's JSON, in listing order


class SnapshotCache:
    """The latest snapshot of each collection (see the module docstring)."""

    def __init__(self) -> None:
        self._latest: dict[str, Snapshot] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.builds = 0  # how many snapshots were built (tests, metrics)

    async def items(
        self,
        collection: str,
        key: Hashable,
        revision: Callable[[], Awaitable[int]],
        build: Callable[[], Awaitable[Sequence[bytes]]],
    ) -> Sequence[bytes]:
        """The encoded items of `collection` for `key` at the store's current revision."""
        lock = self._locks.setdefault(collection, asyncio.Lock())
        async with lock:
            current = await revision()
            cached = self._latest.get(collection)
            if cached is not None and cached.revision == current and cached.key == key:
                return cached.items
            # Drop the old snapshot first: two full copies are never held at once.
            self._latest.pop(collection, None)
            items = await build()
            self.builds += 1
            self._latest[collection] = Snapshot(current, key, items)
            return items

    def clear(self) -> None:
        self._latest.clear()


def encode_page(
    items: Sequence[bytes], field: str, token: str | None, token_first: bool = True
) -> bytes:
    """A page object from pre-encoded items, byte for byte what `json_bytes` writes for
    `{"nextPageToken": token, field: [...]}` with fleet's omitempty (an empty page is `{}`).

    `token_first`: the key order of fleet's page struct (MachinePage lists machines first).
    """
    parts: list[bytes] = []
    if token:
        # Page tokens are URL-safe base64: nothing in them needs escaping.
        parts.append(b'"nextPageToken":"' + token.encode("ascii") + b'"')
    if items:
        listed = b'"' + field.encode("ascii") + b'":[' + b",".join(items) + b"]"
        if token_first:
            parts.append(listed)
        else:
            parts.insert(0, listed)
    return b"{" + b",".join(parts) + b"}"
