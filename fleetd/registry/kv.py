"""The key-value contract fleet needs from etcd v3, and nothing more.

Two implementations honour it: `fleetd.etcd.client.EtcdKV` (the only module that speaks
to etcd) and `fleetd.registry.fake.FakeKV` (in memory, for unit tests and the simulator). The
schema-aware `Registry` is written once against this protocol, so the same code runs on both,
and one contract test suite checks both.

Keys and values are `str` here; the etcd adapter encodes them as UTF-8.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: str
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


CompareTarget = Literal["value", "version", "create", "mod"]
CompareOp = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True, slots=True)
class Compare:
    """One transaction guard, as in etcd: `target(key) op operand`.

    A key that does not exist has version 0, create/mod revision 0 and never equals a value.
    """

    key: str
    target: CompareTarget
    op: CompareOp
    operand: str | int


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: str
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    prefix: bool = False


Op = Put | Delete


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int


class EventType(StrEnum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: EventType
    key: str
    value: str  # "" for deletes
    mod_revision: int


# etcd refuses transactions with more operations than --max-txn-ops (default 128).
MAX_TXN_OPS = 128


class KV(Protocol):
    """What the registry needs from etcd. All methods may raise RegistryUnavailable."""

    async def mute_members(self) -> list[str]:
        """The etcd members (of those configured) that are mute: their host accepts a
        connection, but they answer no request within a second: a frozen process
        (SIGSTOPped, hung). One that cannot be reached at all (stopped, or its host dead or
        paused) is not. A former leader that resumes from a freeze may revoke leases (see
        raft_term)."""
        ...

    @property
    def raft_term(self) -> int:
        """The highest raft term seen in etcd's answers so far (0: none yet). It grows with
        every etcd leader election, when etcd's lease state is least trustworthy: a new
        leader extends every lease, and a leader resuming from a stall may revoke leases it
        thinks expired (etcd issues #12528, #15247; fixed in etcd 3.4.28 and 3.5.11)."""
        ...

    async def get(self, key: str) -> KeyValue | None: ...

    async def get_many(self, keys: Sequence[str]) -> dict[str, KeyValue]:
        """The keys that exist among `keys`, by key, in one round trip (a read-only txn)."""
        ...

    async def range(self, prefix: str, *, keys_only: bool = False) -> tuple[list[KeyValue], int]:
        """Every key starting with `prefix`, sorted by key, and the store revision read at.

        With `keys_only` every value is "" (etcd sends none): for a caller that needs only the
        keys and their revisions, e.g. the body sweep (gc.py), which must not fetch every
        unit file to learn which exist."""
        ...

    async def current_revision(self) -> int:
        """The store's current revision, in one cheap request (no keys are returned). Any
        write anywhere bumps it, so an unchanged revision means nothing changed."""
        ...

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        """Atomically: if every compare holds, apply `success`, else `failure`.

        At most MAX_TXN_OPS operations per branch.
        """
        ...

    async def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; returns its id."""
        ...

    async def keepalive(self, lease: int) -> int:
        """Refresh a lease; returns its remaining TTL, or 0 if it has expired (it is gone)."""
        ...

    async def revoke(self, lease: int) -> None:
        """End a lease now, deleting every key attached to it. A missing lease is no error."""
        ...

    def watch(self, prefix: str, start_revision: int) -> AsyncGenerator[list[WatchEvent], None]:
        """Batches of events on keys under `prefix`, from `start_revision` (inclusive) on.

        Raises `fleetd.errors.Compacted` when `start_revision` is compacted away (the caller
        resyncs from a fresh snapshot) and RegistryUnavailable when the stream breaks; the
        caller resumes with a new watch from the revision after the last event it saw.
        """
        ...

    async def compact(self, revision: int) -> None: ...

    async def close(self) -> None: ...


def check_txn_size(
    compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]
) -> None:
    """Refuse a transaction etcd would refuse (--max-txn-ops applies to each list): the caller
    chunks. Both KV implementations call this, so they refuse the same requests alike."""
    for what, items in (("compares", compares), ("success ops", success), ("failure ops", failure)):
        if len(items) > MAX_TXN_OPS:
            raise ValueError(
                f"transaction has {len(items)} {what}; etcd allows at most {MAX_TXN_OPS}"
                " per transaction: split the batch"
            )
