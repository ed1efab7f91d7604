"""The etcd lease keepalive stream: one long-lived LeaseKeepAlive call on its own connection.

Every machine renews its lease every TTL/3, forever, so a keepalive is the one request whose
cost is paid all the time. Through grpc.aio one keepalive cost about 180 us of CPU even when
thousands were pipelined (a write and a read each cross gRPC's poller thread and wake the
event loop), and 430 us when spread out. 1,000 simulated machines in one process renewing
every 3.3 s then spent 10-13 % of a core on keepalives alone. The same stream as one asyncio
protocol over a plain socket (or TLS) cost about 30 us a keepalive with h2's framing, less with
fleetd/etcd/http2.py's; the messages are etcd's protobuf types, and all of it runs in the
event loop's own thread. (The rest of the etcd client, transport.py, works the same way.)

This is one gRPC method, LeaseKeepAlive, on one HTTP/2 connection to one member: the request
is a stream of length-prefixed `LeaseKeepAliveRequest`s, the answers come back in order on the
same stream. gRPC's status arrives in the trailers (or in the headers of a refused stream) and
is raised as `transport.RpcError`, so EtcdKV maps it, and re-authenticates after a stale
token, exactly as for its other calls.

The stream is owned by EtcdKV, which opens a new one when this one broke, when its auth token
changed, or when it went quiet past the request timeout.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Sequence
from typing import Any

from fleetd.errors import RegistryUnavailable
from fleetd.etcd import http2
from fleetd.etcd.etcdpb import rpc
from fleetd.etcd.transport import PREFIX as _PREFIX
from fleetd.etcd.transport import (
    BadMessage,
    Member,
    RpcError,
    connect_first,
    messages,
    request_headers,
    status_error,
)

PATH = b"/etcdserverpb.Lease/LeaseKeepAlive"
# An answer is a response header and two numbers, tens of bytes: one over 64 KiB is a broken
# peer, and refusing it on its prefix keeps the stream from buffering it.
MAX_ANSWER = 64 * 1024


class KeepAliveStream(asyncio.Protocol):
    """One LeaseKeepAlive call on its own HTTP/2 connection.

    `send(lease)` returns a future for etcd's answer, the lease's remaining TTL (0: expired or
    revoked). Answers are matched to waiters by lease id, oldest first (etcd answers in
    order). When the connection or the stream fails (a GOAWAY included), every waiter gets
    the error, and `broken` says why.
    """

    def __init__(self, member: Member, token: str | None, timeout: float) -> None:
        self.raft_term = 0  # the highest in its answers' headers
        self.member = member
        self.token = token
        self.timeout = timeout
        self.timed_out = False  # broken because an answer was overdue
        self.broken: BaseException | None = None
        self.waiting: dict[int, deque[asyncio.Future[int]]] = {}
        # Answers are small: HTTP/2's default window is plenty.
        self._conn = http2.ClientConnection(http2.DEFAULT_WINDOW)
        self._transport: asyncio.Transport | None = None
        self._stream_id = 0
        self._outbox = bytearray()  # request bytes not yet framed (flow control)
        self._inbox = bytearray()  # answer bytes not yet a whole message
        self._flush_scheduled = False
        self._half_closed = False
        self._ended = False  # END_STREAM sent (after a half-close)
        # (deadline, answer) of every keepalive in the order sent: etcd answers in that order,
        # so only the oldest unanswered one can be overdue, and one timer watches it. A timer
        # per keepalive (asyncio.wait_for) costs a heap push and leaves a cancelled timer in
        # the loop's heap for the whole timeout: at 300 keepalives/s, most of the idle CPU.
        self._deadlines: deque[tuple[float, asyncio.Future[int]]] = deque()
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def usable(self) -> bool:
        return self.broken is None and not self._half_closed

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        metadata = [("user-agent", "fleetd")]
        if self.token is not None:
            metadata.append(("token", self.token))
        headers = request_headers(self.member, PATH, metadata)
        self._stream_id = self._conn.open_stream(http2.encode_headers(headers))
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._conn.receive(data)
        except http2.ProtocolError as e:
            for event in e.events:  # the frames before the bad one count, as in any chunking
                self._event(event)
            self._fail(self._error(f"HTTP/2 protocol error: {e}"))
            return
        for event in events:
            self._event(event)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        why = f": {exc}" if exc else ""
        if not self._conn.heard and self.member.tls is None:
            why += " before answering (does it serve TLS? then use https:// endpoints)"
        self._fail(self._error(f"the connection closed{why}"), close=False)

    # -- requests ---------------------------------------------------------------------

    def send(self, lease: int) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if self.broken is not None:
            future.set_exception(self.broken)
            return future
        self.waiting.setdefault(lease, deque()).append(future)
        loop = asyncio.get_running_loop()
        self._deadlines.append((loop.time() + self.timeout, future))
        if self._watchdog is None:
            self._watchdog = loop.call_at(self._deadlines[0][0], self._check_overdue)
        body = rpc.LeaseKeepAliveRequest(ID=lease).SerializeToString()
        self._outbox += _PREFIX.pack(0, len(body)) + body
        if not self._flush_scheduled:
            # Keepalives sent in the same loop iteration leave in one write.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return future

    def half_close(self) -> None:
        """No more requests: etcd answers what it has, then ends the stream."""
        self._half_closed = True
        self._flush()

    def close(self) -> None:
        self._fail(self._error("stream closed"))

    # -- internals --------------------------------------------------------------------

    def _event(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == http2.DATA:
            _, stream_id, payload, end = event
            if stream_id == self._stream_id:
                self._inbox += payload
                self._answers()
                if end:
                    self._fail(self._error("etcd ended the stream"))
        elif kind == http2.HEADERS:
            _, stream_id, headers, end = event
            if stream_id != self._stream_id:
                return
            error = status_error(headers)
            if error is not None:
                self._fail(error)
            elif end or any(name == b"grpc-status" for name, _ in headers):
                self._fail(self._error("etcd ended the stream"))
        elif kind == http2.RESET:
            code = http2.error_name(event[2])
            self._fail(self._error(f"etcd reset the stream ({code})"))
        elif kind == http2.GOAWAY:
            # A member shutting down: this stream's waiters fail now and are retried on a
            # new stream (another member).
            self._fail(self._error("etcd is going away (GOAWAY)"))

    def _answers(self) -> None:
        try:
            found = messages(self._inbox, MAX_ANSWER)
        except BadMessage as e:
            self._answer(e.found)  # the answers before it still count
            self._fail(self._error(f"etcd sent {e}"))
            return
        self._answer(found)

    def _answer(self, found: list[bytes]) -> None:
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

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self._transport
        if transport is None or self.broken is not None:
            return
        conn = self._conn
        while self._outbox:
            room = conn.window(self._stream_id)
            if room <= 0:
                break  # the rest goes when etcd opens the window (WINDOW_UPDATE)
            chunk = bytes(self._outbox[:room])
            del self._outbox[:room]
            conn.data(self._stream_id, chunk)
        if self._half_closed and not self._outbox and not self._ended:
            self._ended = True
            conn.data(self._stream_id, b"", end_stream=True)
        data = conn.take()
        if data:
            transport.write(data)

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

    def _fail(self, error: BaseException, *, close: bool = True) -> None:
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
        if close and self._transport is not None:
            self._transport.abort()


async def open_stream(
    members: Sequence[Member], first: int, token: str | None, answer_timeout: float
) -> tuple[KeepAliveStream, int]:
    """A keepalive stream to the first member that accepts a connection, trying them in
    order from `first`; returns it with that member's index. Connecting and each answer
    may take up to `answer_timeout`."""
    try:
        return await connect_first(
            members,
            first,
            functools.partial(KeepAliveStream, token=token, timeout=answer_timeout),
            answer_timeout,
        )
    except RpcError as e:
        raise RegistryUnavailable(f"etcd lease keepalive: cannot connect: {e.details()}") from None
