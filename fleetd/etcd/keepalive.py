"""The etcd lease keepalive stream: one long-lived LeaseKeepAlive call on its own connection.

Every machine renews its lease every TTL/3, forever, so a keepalive is the one request whose
cost is paid all the time. Through grpc.aio one keepalive cost about 180 us of CPU even when
thousands were pipelined (a write and a read each cross gRPC's poller thread and wake the
event loop), and 430 us when spread out. 1,000 simulated machines in one process renewing
every 3.3 s then spent 10-13 % of a core on keepalives alone. The same stream on this
client's own HTTP/2 (transport.py, http2.py) costs some tens of us a keepalive, all of it in
the event loop's own thread.

This is one gRPC method, LeaseKeepAlive: the request is a stream of length-prefixed
`LeaseKeepAliveRequest`s, the answers come back in order on the same stream. It is a
streaming `transport.Call` like a watch, framed, flow-controlled and ended by the same
`transport.Connection`, with this stream as its `Listener`: answers are matched to their
waiters in the connection's own callback, as they are read. What is its own: a connection to
itself (a keepalive never waits behind the channel's calls, nor fails with its connection),
no pings (its answers are its liveness check), an answer timeout, and failing at once on a
GOAWAY, so its keepalives are sent again at once on a new stream. gRPC's status from etcd
(in the trailers, or the headers of a refused stream) is raised as `transport.RpcError`, so
EtcdKV maps it, and re-authenticates after a stale token, exactly as for its other calls;
whatever else ends the stream is RegistryUnavailable.

The stream is owned by EtcdKV, which opens a new one when this one broke, when its auth token
changed, or when it went quiet past the request timeout.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Sequence

from fleetd.errors import RegistryUnavailable
from fleetd.etcd import http2
from fleetd.etcd.etcdpb import rpc
from fleetd.etcd.transport import Connection, Member, RpcError, StatusCode, connect_first

PATH = b"/etcdserverpb.Lease/LeaseKeepAlive"
# An answer is a response header and two numbers, tens of bytes: one over 64 KiB is a broken
# peer, and refusing it on its prefix keeps the stream from buffering it.
MAX_ANSWER = 64 * 1024


def connection(member: Member, timeout: float) -> Connection:
    """The protocol of a keepalive stream's own connection to `member`: no pings, and
    HTTP/2's default receive window (answers are small: it is plenty)."""
    return Connection(member, timeout, None, http2.DEFAULT_WINDOW)


class KeepAliveStream:
    """One LeaseKeepAlive call, alone on its Connection.

    `send(lease)` returns a future for etcd's answer, the lease's remaining TTL (0: expired or
    revoked). Answers are matched to waiters by lease id, oldest first (etcd answers in
    order). When the connection or the stream fails (a GOAWAY included), every waiter gets
    the error, `broken` says why, and the connection is dropped.
    """

    def __init__(self, conn: Connection, token: str | None, timeout: float) -> None:
        self.raft_term = 0  # the highest in its answers' headers
        self.conn = conn
        self.member = conn.member
        self.token = token
        self.timeout = timeout
        self.timed_out = False  # broken because an answer was overdue
        self.broken: BaseException | None = None
        self.waiting: dict[int, deque[asyncio.Future[int]]] = {}
        self._half_closed = False
        # (deadline, answer) of every keepalive in the order sent: etcd answers in that order,
        # so only the oldest unanswered one can be overdue, and one timer watches it. A timer
        # per keepalive (asyncio.wait_for) costs a heap push and leaves a cancelled timer in
        # the loop's heap for the whole timeout: at 300 keepalives/s, most of the idle CPU.
        self._deadlines: deque[tuple[float, asyncio.Future[int]]] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        metadata = [("user-agent", "fleetd")]
        if token is not None:
            metadata.append(("token", token))
        # Raises RpcError when the connection cannot take it (open_stream says so).
        self._call = conn.start(
            PATH, metadata, unary=False, listener=self, max_message=MAX_ANSWER, drains=False
        )

    @property
    def usable(self) -> bool:
        return self.broken is None and not self._half_closed

    # -- requests ---------------------------------------------------------------------

    def send(self, lease: int) -> asyncio.Future[int]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        if self.broken is not None:
            future.set_exception(self.broken)
            return future
        if self._half_closed:
            future.set_exception(self._error("the stream is closing (a new token)"))
            return future
        # Keepalives sent in the same loop iteration leave in one write (the connection's).
        self._call.write(rpc.LeaseKeepAliveRequest(ID=lease).SerializeToString())
        self.waiting.setdefault(lease, deque()).append(future)
        self._deadlines.append((loop.time() + self.timeout, future))
        if self._watchdog is None:
            self._watchdog = loop.call_at(self._deadlines[0][0], self._check_overdue)
        return future

    def half_close(self) -> None:
        """No more requests: etcd answers what it has, then ends the stream."""
        self._half_closed = True
        self._call.end()

    def close(self) -> None:
        self._fail(self._error("stream closed"))

    # -- transport.Listener -------------------------------------------------------------

    def messages(self, found: list[bytes]) -> None:
        for body in found:
            answer = rpc.LeaseKeepAliveResponse.FromString(body)
            self.raft_term = max(self.raft_term, int(answer.header.raft_term))
            lease = int(answer.ID)
            waiters = self.waiting.get(lease)
            while waiters:
                future = waiters.popleft()
                if not future.done():
                    # etcd answers TTL 0 (not an error) for an expired or revoked lease.
                    future.set_result(max(0, int(answer.TTL)))
                    break
            if waiters is not None and not waiters:
                del self.waiting[lease]

    def ended(self, error: RpcError | None) -> None:
        if error is None:
            self._fail(self._error("etcd ended the stream"))
        elif error.answered:
            self._fail(error)  # etcd's status: EtcdKV maps it (a stale token, say)
        else:
            what = error.details().removeprefix(f"{self.member.authority}: ")
            if not self.conn.heard and self.member.tls is None:
                what += " (does it serve TLS? then use https:// endpoints)"
            self._fail(self._error(what))

    # -- internals --------------------------------------------------------------------

    def _check_overdue(self) -> None:
        self._watchdog = None
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].done():
            deadlines.popleft()
        if not deadlines or self.broken is not None:
            deadlines.clear()
            return
        loop = asyncio.get_running_loop()
        if deadlines[0][0] <= loop.time():
            # A mute stream is not trusted again: EtcdKV opens a new one, on the next member.
            self.timed_out = True
            self._fail(self._error(f"no answer within {self.timeout:g}s"))
            return
        self._watchdog = loop.call_at(deadlines[0][0], self._check_overdue)

    def _error(self, what: str) -> RegistryUnavailable:
        return RegistryUnavailable(f"etcd lease keepalive on {self.member.authority}: {what}")

    def _fail(self, error: BaseException) -> None:
        if self.broken is None:
            self.broken = error
        for waiters in self.waiting.values():
            for future in waiters:
                if not future.done():
                    future.set_exception(self.broken)
        self.waiting.clear()
        self._deadlines.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.conn.broken is None:
            # The connection is this stream's alone: it goes with it (and ends the call, if
            # it was not what ended: ended() then finds the stream broken already).
            self.conn.fail(RpcError(StatusCode.CANCELLED, "the keepalive stream is over"))


async def open_stream(
    members: Sequence[Member], first: int, token: str | None, answer_timeout: float
) -> tuple[KeepAliveStream, int]:
    """A keepalive stream to the first member that accepts a connection, trying them in
    order from `first`; returns it with that member's index. Connecting and each answer
    may take up to `answer_timeout`."""
    try:
        conn, index = await connect_first(
            members, first, functools.partial(connection, timeout=answer_timeout), answer_timeout
        )
    except RpcError as e:
        raise RegistryUnavailable(f"etcd lease keepalive: cannot connect: {e.details()}") from None
    try:
        return KeepAliveStream(conn, token, answer_timeout), index
    except RpcError as e:  # its headers over etcd's limit, say
        conn.fail(e)
        where = conn.member.authority
        raise RegistryUnavailable(f"etcd lease keepalive on {where}: {e.details()}") from None
