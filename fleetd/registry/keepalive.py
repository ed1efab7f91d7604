"""The etcd lease keepalive stream: one long-lived LeaseKeepAlive call on its own connection.

Every machine renews its lease every TTL/3, forever, so a keepalive is the one request whose
cost is paid all the time. Through grpc.aio one keepalive cost about 180 us of CPU even when
thousands were pipelined (a write and a read each cross gRPC's poller thread and wake the
event loop), and 430 us when spread out. 1,000 simulated machines in one process renewing
every 3.3 s then spent 10-13 % of a core on keepalives alone. The same stream as one asyncio
protocol over a plain socket (or TLS) costs about 30 us a keepalive: the framing is h2's, the
messages etcd's protobuf types, and all of it runs in the event loop's own thread. (The rest of
the etcd client, fleetd/registry/transport.py, now works the same way.)

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
import ssl
from collections import deque
from collections.abc import Sequence

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from fleetd.errors import RegistryUnavailable
from fleetd.registry.etcdpb import rpc
from fleetd.registry.transport import PREFIX as _PREFIX
from fleetd.registry.transport import Member, status_error

PATH = b"/etcdserverpb.Lease/LeaseKeepAlive"


class KeepAliveStream(asyncio.Protocol):
    """One LeaseKeepAlive call on its own HTTP/2 connection.

    `send(lease)` returns a future for etcd's answer, the lease's remaining TTL (0: expired or
    revoked). Answers are matched to waiters by lease id, oldest first (etcd answers in
    order). When the connection or the stream fails (a GOAWAY included), every waiter gets
    the error, and `broken` says why.
    """

    def __init__(self, member: Member, token: str | None, timeout: float) -> None:
        self.member = member
        self.token = token
        self.timeout = timeout
        self.timed_out = False  # broken because an answer was overdue
        self.broken: BaseException | None = None
        self.waiting: dict[int, deque[asyncio.Future[int]]] = {}
        self._conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self._transport: asyncio.Transport | None = None
        self._stream_id = 0
        self._outbox = bytearray()  # request bytes not yet passed to h2 (flow control)
        self._inbox = bytearray()  # answer bytes not yet a whole message
        self._flush_scheduled = False
        self._half_closed = False
        self._ended = False  # END_STREAM sent (after a half-close)
        self._heard = False  # any bytes from the member yet
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
        self._conn.initiate_connection()
        self._stream_id = self._conn.get_next_available_stream_id()
        scheme = b"https" if self.member.tls is not None else b"http"
        headers = [
            (b":method", b"POST"),
            (b":scheme", scheme),
            (b":path", PATH),
            (b":authority", self.member.authority.encode("idna")),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"user-agent", b"fleetd"),
        ]
        if self.token is not None:
            headers.append((b"token", self.token.encode()))
        self._conn.send_headers(self._stream_id, headers)
        self._flush()

    def data_received(self, data: bytes) -> None:
        self._heard = True
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self._fail(self._error(f"HTTP/2 protocol error: {e}"))
            return
        for event in events:
            self._event(event)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        why = f": {exc}" if exc else ""
        if not self._heard and self.member.tls is None:
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

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            if event.stream_id == self._stream_id:
                self._inbox += event.data
                self._answers()
            self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            error = status_error(event.headers or [])
            if error is not None:
                self._fail(error)
            elif isinstance(event, h2.events.TrailersReceived):
                self._fail(self._error("etcd ended the stream"))
        elif isinstance(event, h2.events.StreamEnded):
            self._fail(self._error("etcd ended the stream"))
        elif isinstance(event, h2.events.StreamReset):
            self._fail(self._error(f"etcd reset the stream ({event.error_code!r})"))
        elif isinstance(event, h2.events.ConnectionTerminated):
            # GOAWAY: a member shutting down. h2 takes no frames after it, so this stream is
            # over; its waiters fail now and are retried on a new stream (another member).
            self._fail(self._error("etcd is going away (GOAWAY)"))
        elif isinstance(event, h2.events.WindowUpdated):
            pass  # _flush runs after every batch of events and sends what the window allows

    def _answers(self) -> None:
        inbox = self._inbox
        while len(inbox) >= _PREFIX.size:
            compressed, length = _PREFIX.unpack_from(inbox)
            if len(inbox) < _PREFIX.size + length:
                return
            body = bytes(inbox[_PREFIX.size : _PREFIX.size + length])
            del inbox[: _PREFIX.size + length]
            if compressed:
                # Never asked for (no grpc-accept-encoding): a peer we do not understand.
                self._fail(self._error("etcd sent a compressed answer"))
                return
            answer = rpc.LeaseKeepAliveResponse.FromString(body)
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
        try:
            while self._outbox:
                room = min(
                    self._conn.local_flow_control_window(self._stream_id),
                    self._conn.max_outbound_frame_size,
                )
                if room <= 0:
                    break  # the rest goes when etcd opens the window (WindowUpdated)
                chunk = bytes(self._outbox[:room])
                del self._outbox[:room]
                self._conn.send_data(self._stream_id, chunk)
            if self._half_closed and not self._outbox and not self._ended:
                self._ended = True
                self._conn.end_stream(self._stream_id)
        except h2.exceptions.ProtocolError as e:
            self._fail(self._error(f"HTTP/2 protocol error: {e}"))
            return
        data = self._conn.data_to_send()
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
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    for step in range(len(members)):
        index = (first + step) % len(members)
        member = members[index]
        try:
            _, stream = await asyncio.wait_for(
                loop.create_connection(
                    functools.partial(KeepAliveStream, member, token, answer_timeout),
                    member.host,
                    member.port,
                    ssl=member.tls,
                    server_hostname=member.server_hostname if member.tls else None,
                ),
                answer_timeout,
            )
        except TimeoutError:
            errors.append(f"{member.authority}: no answer within {answer_timeout:g}s")
            continue
        except ssl.SSLError as e:
            errors.append(f"{member.authority}: TLS: {e.reason or e}")
            continue
        except OSError as e:
            errors.append(f"{member.authority}: {e.strerror or e}")
            continue
        return stream, index
    raise RegistryUnavailable(f"etcd lease keepalive: cannot connect: {'; '.join(errors)}")
