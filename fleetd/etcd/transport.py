"""gRPC to etcd, spoken over HTTP/2 directly (http2.py) on the event loop's own sockets.

etcd's API is gRPC: each request is an HTTP/2 stream (POST to /etcdserverpb.Service/Method)
carrying length-prefixed protobuf messages, with the call's status in the trailers. This
module is that much of gRPC and no more, for the etcd adapter (fleetd/etcd/client.py):

- `Connection`: one HTTP/2 connection to one member, many calls at once (one stream each,
  never more open than etcd's SETTINGS_MAX_CONCURRENT_STREAMS: calls beyond it wait, in
  order, for a stream to end; none sent whose headers are over etcd's
  SETTINGS_MAX_HEADER_LIST_SIZE). Unary calls resolve one future and tell etcd their deadline
  (grpc-timeout); streaming calls are read message by message (Watch) or push each message
  to a `Listener` as it is read (LeaseKeepAlive, keepalive.py: no task or future per
  message). A received message over MAX_MESSAGE (or the call's own lower limit) fails its
  call (RESOURCE_EXHAUSTED), not the connection.
- `Channel`: the connection to the first member that answers, trying each in order, and a
  new one (from the next member) once that one is lost; requests fail fast, with the last
  reason, while reconnecting is backing off (200 ms doubling to 2 s, as the channel options
  of the gRPC client this replaced).

Why not grpcio: its C core was about 14 MB of fleetd's memory (RSS 65.2 -> 51.0 MB at 20
units without it, CHANGELOG 0.1.0) plus threads of its own, and a unary call cost about
210 us of CPU at 64 in flight, against about 115 us here (framing by http2.py,
messages by protobuf, fleetd/etcd/etcdpb). One fleetd makes few requests, but a machine
holds fleetd for good, and 1,000 simulated machines in one process make thousands a second.

Liveness: a connection with a long-lived stream open (a watch) pings every `ping_interval` and
is abandoned when the ping is not answered within the timeout, so a silently dead member is
noticed and the watch resumed elsewhere (the keepalive stream's connection has no pings: its
answers are due within their own timeout). etcd refuses pings more often than every 5 s, or with
no stream open. A unary call that times out also sends a ping, which must be answered within
`PROBE_TIMEOUT`: etcd answers pings from its HTTP/2 layer, whatever raft and the disk are doing,
so a member that cannot answer that in a second is frozen (SIGSTOPped, its VM paused) or gone.
Its connection is dropped, the next call goes to the next member, and a read that timed out
there is sent once more to it; a write is not (it may yet be applied), its caller sees the
timeout.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import functools
import socket
import ssl
import struct
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote

from fleetd.etcd import http2

PREFIX = struct.Struct(">BI")  # gRPC message prefix: compressed flag, length

# Our receive windows: a full range of 10,000 units is several MB; HTTP/2's default 64 KiB
# window would take a window update every 64 KiB.
_WINDOW = 16 * 1024 * 1024
_MIN_BACKOFF = 0.2
_MAX_BACKOFF = 2.0
# The seconds a member has to answer the ping sent after a call of its timed out (etcd's HTTP/2
# layer answers in milliseconds, also while raft waits for a quorum or the disk).
PROBE_TIMEOUT = 1.0


# The largest gRPC message a call takes in (its 5-byte prefix says how large it will be).
# grpc-go's default, 4 MiB, is below what fleet reads at its design size: a range of every
# unit body at 10,000 units of a couple of KB each is 20-30 MB (etcd's own Go client lifts
# the cap to 2 GiB, no cap in practice). 64 MiB leaves that room twice over, while an answer
# even that large already costs some hundreds of MB once parsed into Python objects, several
# times fleetd's whole footprint: anything larger is a broken peer or a request to rethink,
# and is refused on its prefix, before a byte of it is kept.
MAX_MESSAGE = 64 * 1024 * 1024


class BadMessage(Exception):
    """A gRPC message this client does not take; `found` holds the whole messages that came
    before it (still the caller's to use)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.found: list[bytes] = []


class Compressed(BadMessage):
    """A compressed gRPC message: never asked for (no grpc-accept-encoding)."""

    def __init__(self) -> None:
        super().__init__("a compressed message")


class TooLarge(BadMessage):
    """A gRPC message larger than the limit it is received under."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a message of {size} bytes, larger than the limit of {limit} bytes")
        self.size = size
        self.limit = limit


def messages(inbox: bytearray, limit: int = MAX_MESSAGE) -> list[bytes]:
    """The whole gRPC messages at the start of `inbox`, taken out of it (a partial one stays).

    Raises Compressed for a compressed message (a peer we do not understand) and TooLarge for
    one over `limit` bytes, as soon as its prefix is in: nothing of it is waited for."""
    out: list[bytes] = []
    offset = 0
    size = len(inbox)
    try:
        while size - offset >= PREFIX.size:
            compressed, length = PREFIX.unpack_from(inbox, offset)
            if compressed:
                raise Compressed
            if length > limit:
                raise TooLarge(length, limit)
            end = offset + PREFIX.size + length
            if size < end:
                break
            out.append(bytes(inbox[offset + PREFIX.size : end]))
            offset = end
    except BadMessage as e:
        e.found = out
        inbox.clear()  # the rest is the bad message's: never to be parsed
        raise
    if offset:
        del inbox[:offset]
    return out


class StatusCode(enum.IntEnum):
    """gRPC's status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcError(Exception):
    """A failed call: gRPC's status from etcd, or UNAVAILABLE / DEADLINE_EXCEEDED / CANCELLED
    for what happened on the way."""

    def __init__(
        self, code: StatusCode, details: str, *, unprocessed: bool = False, answered: bool = False
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details
        # etcd never saw the call (a GOAWAY said so): safe to send again, even a write.
        self.unprocessed = unprocessed
        # etcd's own answer (its grpc-status, or an HTTP error status), not what this client
        # saw go wrong on the way.
        self.answered = answered

    def code(self) -> StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@dataclass(frozen=True)
class Member:
    """Where one etcd member listens, and how to reach it."""

    host: str  # IP literal without brackets, or a DNS name
    port: int
    authority: str  # the :authority header, host:port as in the endpoint
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None  # the name its TLS certificate must be valid for


def tls_context(ca: bytes | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """A client TLS context: the server is always verified, against the given CA or else the
    system's roots (a CA alone never disables verification); a client certificate when set."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # certificate and host name checked
    if ca is not None:
        context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
    else:
        context.load_default_certs()
    if cert_file and key_file:
        context.load_cert_chain(cert_file, key_file)
    context.set_alpn_protocols(["h2"])
    return context


def grpc_timeout(seconds: float) -> bytes:
    """`seconds` as gRPC's grpc-timeout header value: at most 8 digits and a unit (m, S, M,
    H), in the finest unit that fits, rounded up (etcd gives up no sooner than we do), and at
    least 1 (the value must be positive)."""
    micros = max(0, round(seconds * 1_000_000))
    for unit, size in ((b"m", 1_000), (b"S", 1_000_000), (b"M", 60_000_000)):
        value = -(-micros // size)
        if value <= 99_999_999:
            return b"%d" % max(1, value) + unit
    return b"%dH" % min(-(-micros // 3_600_000_000), 99_999_999)


def request_headers(
    member: Member,
    path: bytes,
    metadata: Sequence[tuple[str, str]],
    timeout: float | None = None,
) -> list[tuple[bytes, bytes]]:
    """A gRPC request's headers to `member`: POST to `path`, the `timeout` (seconds) as
    grpc-timeout if given, then the call's metadata."""
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"https" if member.tls is not None else b"http"),
        (b":path", path),
        (b":authority", member.authority.encode("idna")),
    ]
    if timeout is not None:
        headers.append((b"grpc-timeout", grpc_timeout(timeout)))
    headers += [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
    headers.extend((k.encode(), v.encode()) for k, v in metadata)
    return headers


def status_error(headers: Sequence[tuple[bytes, bytes]]) -> RpcError | None:
    """The error a grpc-status header (or a non-200 HTTP status) carries; None for OK or
    when neither says anything yet."""
    found = dict(headers)
    raw = found.get(b"grpc-status")
    if raw is None:
        status = found.get(b":status")
        if status not in (None, b"200"):
            return RpcError(
                StatusCode.UNAVAILABLE,
                f"etcd answered HTTP {status.decode('ascii', 'replace')}",
                answered=True,
            )
        return None
    if raw == b"0":
        return None
    try:
        code = StatusCode(int(raw))
    except ValueError:
        code = StatusCode.UNKNOWN
    message = unquote(found.get(b"grpc-message", b"").decode("utf-8", "replace"))
    return RpcError(code, message, answered=True)


def connect_error(member: Member, e: BaseException) -> RpcError:
    """Why connecting to `member` failed, in words the etcd adapter's hints recognise."""
    where = member.authority
    if isinstance(e, TimeoutError):
        return RpcError(StatusCode.UNAVAILABLE, f"{where}: connecting timed out")
    if isinstance(e, ssl.SSLCertVerificationError):
        if e.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
            return RpcError(StatusCode.UNAVAILABLE, f"{where}: hostname verification failed")
        return RpcError(
            StatusCode.UNAVAILABLE,
            f"{where}: TLS handshake failed: certificate_verify_failed: {e.verify_message}",
        )
    if isinstance(e, ssl.SSLError):
        return RpcError(StatusCode.UNAVAILABLE, f"{where}: TLS handshake failed: {_tls_reason(e)}")
    refused = f"[Errno {errno.ECONNREFUSED}]"
    if isinstance(e, OSError) and (
        # A name with several addresses, all refusing: asyncio raises one OSError without an
        # errno, naming each failure.
        e.errno == errno.ECONNREFUSED or (e.errno is None and refused in str(e))
    ):
        return RpcError(StatusCode.UNAVAILABLE, f"{where}: connection refused")
    if isinstance(e, OSError):
        return RpcError(StatusCode.UNAVAILABLE, f"{where}: {e.strerror or e}")
    return RpcError(StatusCode.UNAVAILABLE, f"{where}: {e}")


def _tls_reason(e: ssl.SSLError) -> str:
    return str(e.reason or e).lower()


class Listener(Protocol):
    """Where a pushed streaming call delivers (`Connection.start(listener=...)`): called from
    the connection's own callbacks as its frames are read, with no task or future per
    message in between. The lease keepalive stream is one (keepalive.py)."""

    def messages(self, found: list[bytes]) -> None:
        """Whole messages, in order, as they arrive."""

    def ended(self, error: RpcError | None) -> None:
        """The call is over: `error` None is a clean end (grpc-status 0). Called once."""


class Call:
    """One gRPC call: an HTTP/2 stream on a Connection.

    A unary call's answer is `result` (a future of the one message). A streaming call's
    messages are read with `read()`, which returns None at a clean end (grpc-status 0), or,
    when it has a `listener`, pushed to that as they arrive (and its end with them).
    """

    __slots__ = (
        "_inbox",
        "_messages",
        "_waiter",
        "closed",
        "conn",
        "drains",
        "end_after_outbox",
        "error",
        "listener",
        "local_done",
        "max_message",
        "outbox",
        "remote_done",
        "result",
        "stream_id",
    )

    def __init__(
        self,
        conn: Connection,
        stream_id: int,
        unary: bool,
        listener: Listener | None = None,
        max_message: int = MAX_MESSAGE,
        drains: bool = True,
    ) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.result: asyncio.Future[bytes] | None = (
            asyncio.get_running_loop().create_future() if unary else None
        )
        self.listener = listener
        self.max_message = max_message  # the largest message it takes in
        self.drains = drains  # goes on after a GOAWAY that took it (else fails at once)
        self.error: RpcError | None = None
        self.closed = False  # the stream is over, either way
        self.outbox = bytearray()  # request bytes not yet framed (flow control)
        self.end_after_outbox = False  # the request side ends once the outbox is sent
        self.local_done = False  # our END_STREAM has been framed
        self.remote_done = False  # etcd's END_STREAM or RST_STREAM arrived
        self._inbox = bytearray()
        self._messages: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None

    # -- for the caller -----------------------------------------------------------------

    def write(self, message: bytes, *, end: bool = False) -> None:
        """Send one message (already serialised); `end` half-closes the request side."""
        if self.closed:
            raise self.error or RpcError(StatusCode.CANCELLED, "the call is over")
        if self.end_after_outbox:
            raise RpcError(StatusCode.CANCELLED, "the call's request side is closed")
        self.outbox += PREFIX.pack(0, len(message)) + message
        self.end_after_outbox = end
        self.conn.want_flush(self)

    def end(self) -> None:
        """Half-close the request side after what was written: etcd answers what it has, then
        ends the call."""
        if not self.closed and not self.end_after_outbox:
            self.end_after_outbox = True
            self.conn.want_flush(self)

    async def read(self) -> bytes | None:
        """The next message of a streaming call; None when etcd ended the call with OK."""
        while not self._messages:
            if self.closed:
                if self.error is not None:
                    raise self.error
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._messages.popleft()

    def cancel(self) -> None:
        """End the call from our side (RST_STREAM CANCEL): etcd forgets it."""
        if not self.closed:
            self.conn.reset(self, RpcError(StatusCode.CANCELLED, "cancelled by the client"))

    # -- for the connection -------------------------------------------------------------

    def data(self, data: bytes) -> None:
        self._inbox += data
        try:
            found = messages(self._inbox, self.max_message)
        except BadMessage as e:
            # The call fails and its stream is reset; the connection and its other calls go
            # on (what etcd still sends on this stream is dropped as it comes, unkept).
            if e.found:  # a stream's messages before it are still read
                if self.listener is not None:
                    self.listener.messages(e.found)
                else:
                    self._messages.extend(e.found)
            if isinstance(e, TooLarge):
                why = (
                    f"{self.conn.member.authority}: etcd's answer is a message of {e.size}"
                    f" bytes, larger than the {e.limit} bytes a call may receive"
                )
                error = RpcError(StatusCode.RESOURCE_EXHAUSTED, why)
            else:
                error = RpcError(StatusCode.INTERNAL, "etcd sent a compressed answer")
            self.conn.reset(self, error)
            return
        if found:
            if self.listener is not None:
                self.listener.messages(found)
            else:
                self._messages.extend(found)
                # A unary call's answer counts once the trailers say OK (finish).
                if self.result is None:
                    self._wake()

    def finish(self, error: RpcError | None) -> None:
        """The stream is over: `error` None is a clean end (grpc-status 0)."""
        if self.closed:
            return
        self.closed = True
        self.error = error
        self.outbox.clear()
        result = self.result
        if result is not None and not result.done():
            if error is not None:
                result.set_exception(error)
            elif self._messages:
                result.set_result(self._messages.popleft())
            else:
                result.set_exception(RpcError(StatusCode.INTERNAL, "etcd sent no answer"))
        self._wake()
        if self.listener is not None:
            self.listener.ended(error)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Connection(asyncio.Protocol):
    """One HTTP/2 connection to one etcd member, carrying any number of calls."""

    max_message = MAX_MESSAGE  # the largest message a call takes in (tests lower it)

    def __init__(
        self,
        member: Member,
        timeout: float,
        ping_interval: float | None,
        receive_window: int = _WINDOW,
    ) -> None:
        """`timeout`: what a ping has to be answered in; `ping_interval`: how often to ping
        while a streaming call is open (None: never, for a call that is its own liveness
        check, as the keepalive stream's answers are)."""
        self.member = member
        self.timeout = timeout
        self.ping_interval = ping_interval
        self.broken: RpcError | None = None
        self.calls: dict[int, Call] = {}
        self._streaming = 0  # open calls that are not unary (they keep the pings going)
        # Calls waiting for a stream (etcd's SETTINGS_MAX_CONCURRENT_STREAMS are all open), in
        # the order made: (call, path, metadata, deadline) to encode its headers when it goes.
        self._queue: deque[tuple[Call, bytes, Sequence[tuple[str, str]], float | None]] = deque()
        self._h2 = http2.ClientConnection(receive_window)
        # Header blocks, with their header list's size, by (path, metadata, timeout): encoded
        # once, sent with every such call (a channel's unary calls all have its one timeout;
        # streams have none).
        self._blocks: dict[
            tuple[bytes, tuple[tuple[str, str], ...], float | None], tuple[bytes, int]
        ] = {}
        self.draining = False  # etcd sent GOAWAY: no new calls here
        self._flushed_id = 0  # the highest stream id whose headers have left
        self._last_id = 0  # the highest stream id started
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, Call] = {}  # calls with request bytes not yet sent
        self._flush_scheduled = False
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_deadline: asyncio.TimerHandle | None = None
        self._pong: asyncio.Future[bool] | None = None  # the outstanding ping's answer
        self._ping_limit: float | None = None  # a ping's deadline, armed when it is written
        self._closed = asyncio.get_running_loop().create_future()

    @property
    def usable(self) -> bool:
        return self.broken is None and not self.draining and self._transport is not None

    @property
    def heard(self) -> bool:
        """Whether the member answered in HTTP/2 yet (its SETTINGS frame)."""
        return self._h2.heard

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(self._h2.take())

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive(data)
        except http2.ProtocolError as e:
            for event in e.events:  # the frames before the bad one count, as in any chunking
                self._event(event)
            if self.heard:
                self.fail(RpcError(StatusCode.UNAVAILABLE, f"HTTP/2 protocol error: {e}"))
            else:
                self.fail(self._not_http2())
            return
        for event in events:
            self._event(event)
        if self._queue:
            self._open_queued()  # etcd's SETTINGS may allow more streams now
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            why = "etcd closed the connection"
        elif isinstance(exc, ssl.SSLError):
            why = f"TLS: {_tls_reason(exc)}"
        else:
            why = f"the connection failed: {exc}"
        if not self.heard and self.member.tls is None:
            self._lost(self._not_http2())
        else:
            if not self.heard:
                why += " before answering"
            self._lost(RpcError(StatusCode.UNAVAILABLE, f"{self.member.authority}: {why}"))
        if not self._closed.done():
            self._closed.set_result(None)

    def _not_http2(self) -> RpcError:
        if self.member.tls is None:
            what = "closed a plaintext connection without answering in HTTP/2"
        else:
            what = "did not answer in HTTP/2"
        return RpcError(StatusCode.UNAVAILABLE, f"{self.member.authority}: etcd {what}")

    # -- calls ------------------------------------------------------------------------

    def start(
        self,
        path: bytes,
        metadata: Sequence[tuple[str, str]],
        *,
        unary: bool,
        timeout: float | None = None,
        listener: Listener | None = None,
        max_message: int | None = None,
        drains: bool = True,
    ) -> Call:
        """A new call: its request headers are sent (with the next flush); `timeout`, the
        seconds the caller waits, goes as grpc-timeout so etcd gives up on it too. A
        streaming call with a `listener` has its messages and its end pushed to it; one
        that does not `drain` fails as soon as etcd sends GOAWAY, also if etcd took it.
        `max_message` lowers the largest message it takes in.

        While etcd's SETTINGS_MAX_CONCURRENT_STREAMS streams are open the call waits for one
        to end (in order, behind those already waiting); its stream_id is 0 until then.
        Headers larger than etcd's SETTINGS_MAX_HEADER_LIST_SIZE are not sent: RpcError
        INTERNAL, here or (for a call that waited) as the call's error."""
        if self.broken is not None:
            raise self.broken
        if self.draining:
            why = f"{self.member.authority}: etcd is going away (GOAWAY)"
            raise RpcError(StatusCode.UNAVAILABLE, why, unprocessed=True)
        key = (path, tuple(metadata), timeout)
        found = self._blocks.get(key)
        if found is None:
            headers = request_headers(self.member, path, metadata, timeout)
            found = http2.encode_headers(headers), http2.header_list_size(headers)
            self._blocks[key] = found
            if len(self._blocks) > 64:  # tokens come and go: keep the recent kinds only
                del self._blocks[next(iter(self._blocks))]
        block, size = found
        if size > self._h2.max_header_list:
            raise self._headers_too_large(size)
        call = Call(
            self,
            0,
            unary,
            listener,
            self.max_message if max_message is None else max_message,
            drains,
        )
        if self._queue or len(self.calls) >= self._h2.max_streams:
            deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
            self._queue.append((call, path, metadata, deadline))
            return call
        if not self._open(call, block):
            assert self.broken is not None
            raise self.broken
        return call

    def _headers_too_large(self, size: int) -> RpcError:
        """A call's headers over etcd's SETTINGS_MAX_HEADER_LIST_SIZE: refused here rather than
        sent to be refused there (grpc-go's client does the same, with the same code)."""
        why = (
            f"{self.member.authority}: the call's headers are {size} bytes as HTTP/2 counts"
            f" them, more than the {self._h2.max_header_list} etcd accepts"
            " (its SETTINGS_MAX_HEADER_LIST_SIZE); not sent"
        )
        return RpcError(StatusCode.INTERNAL, why)

    def _open(self, call: Call, block: bytes) -> bool:
        """Open `call`'s stream with its header block (False: the connection failed)."""
        try:
            stream_id = self._h2.open_stream(block)
        except http2.ProtocolError:
            # 2^30 calls on one connection: go on with a new one.
            self.fail(RpcError(StatusCode.UNAVAILABLE, "HTTP/2 stream ids used up"))
            return False
        self._last_id = call.stream_id = stream_id
        self.calls[stream_id] = call
        if call.outbox or call.end_after_outbox:
            self._pending[stream_id] = call  # written while it waited for a stream
        if call.result is None:
            self._streaming += 1
            if self._ping_timer is None and self.ping_interval is not None:
                self._ping_timer = asyncio.get_running_loop().call_later(
                    self.ping_interval, self._ping
                )
        self._schedule_flush()
        return True

    def _open_queued(self) -> None:
        """Open the waiting calls' streams, oldest first, as far as etcd's limit allows."""
        queue = self._queue
        limit = self._h2.max_streams
        loop = asyncio.get_running_loop()
        while queue and len(self.calls) < limit and self.broken is None and not self.draining:
            call, path, metadata, deadline = queue.popleft()
            # The time it has left, not the whole timeout: encoded for this call alone.
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            headers = request_headers(self.member, path, metadata, timeout)
            size = http2.header_list_size(headers)
            if size > self._h2.max_header_list:  # etcd's SETTINGS may have come meanwhile
                call.finish(self._headers_too_large(size))
                continue
            if not self._open(call, http2.encode_headers(headers)):
                why = f"{self.member.authority}: the connection failed before the call was sent"
                call.finish(RpcError(StatusCode.UNAVAILABLE, why, unprocessed=True))

    async def unary(
        self, path: bytes, message: bytes, metadata: Sequence[tuple[str, str]], limit: float
    ) -> bytes:
        """One request, one answer, within `limit` seconds (else DEADLINE_EXCEEDED; etcd is
        told the limit too, grpc-timeout)."""
        call = self.start(path, metadata, unary=True, timeout=limit)
        call.write(message, end=True)
        result = call.result
        assert result is not None
        # A timer, not asyncio.wait_for: that costs a task per call.
        timer = asyncio.get_running_loop().call_later(limit, self._expire, call, limit)
        try:
            return await result
        except asyncio.CancelledError:
            call.cancel()
            raise
        finally:
            timer.cancel()

    def want_flush(self, call: Call) -> None:
        if call.stream_id:  # a call still waiting for a stream is flushed once it has one
            self._pending[call.stream_id] = call
            self._schedule_flush()

    def reset(self, call: Call, error: RpcError) -> None:
        """End `call` with `error`, telling etcd (RST_STREAM CANCEL) if it is still open."""
        if call.closed:
            return
        self._end(call, error)

    def fail(self, error: RpcError) -> None:
        """Abandon the connection: every call fails with `error`."""
        self._lost(error)
        if self._transport is not None:
            self._transport.abort()

    async def wait_closed(self) -> None:
        await self._closed

    # -- internals --------------------------------------------------------------------

    def _lost(self, error: RpcError) -> None:
        if self.broken is None:
            self.broken = error
        for call in list(self.calls.values()):
            self._end(call, self.broken)
        self._fail_queued(self.broken)
        self._pending.clear()
        for timer in (self._ping_timer, self._ping_deadline):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._ping_deadline = None
        self._ping_limit = None
        self._answer_ping(False)

    def _fail_queued(self, error: RpcError) -> None:
        """Fail the calls waiting for a stream: etcd never saw them, so they are safe to send
        again elsewhere (`unprocessed`), even writes."""
        unprocessed = RpcError(error.code(), error.details(), unprocessed=True)
        while self._queue:
            call = self._queue.popleft()[0]
            call.finish(unprocessed)

    def _end(self, call: Call, error: RpcError | None) -> None:
        if not call.stream_id:  # still waiting for a stream: etcd knows nothing of it
            for i, (waiting, *_) in enumerate(self._queue):
                if waiting is call:
                    del self._queue[i]
                    break
            call.finish(error)
            return
        if self.calls.pop(call.stream_id, None) is not None and call.result is None:
            self._streaming -= 1
        self._pending.pop(call.stream_id, None)
        call.finish(error)
        if self.broken is None:
            if call.local_done and call.remote_done:
                self._h2.close_stream(call.stream_id)
            else:
                # Still open on one side (we give up on a call etcd serves, or etcd ended it
                # before our request was all sent): RST_STREAM ends it on both.
                self._h2.reset(call.stream_id)
                self._schedule_flush()
            if self._queue:
                self._open_queued()  # a stream is free (the RST, if any, goes first)
        self._close_if_drained()

    def _close_if_drained(self) -> None:
        if self.draining and not self.calls and self._transport is not None:
            self._transport.close()  # drained: etcd is going away

    def _event(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == http2.DATA:
            _, stream_id, payload, end = event
            call = self.calls.get(stream_id)
            if call is None:
                return
            call.data(payload)
            if end:
                call.remote_done = True
                if not call.closed:
                    # Ended without trailers (a grpc-status): not gRPC's way to finish.
                    why = "etcd ended the call without a status"
                    self._end(call, RpcError(StatusCode.INTERNAL, why))
        elif kind == http2.HEADERS:
            _, stream_id, headers, end = event
            call = self.calls.get(stream_id)
            if call is None:
                return
            if end:
                call.remote_done = True
            error = status_error(headers)
            if error is not None:
                if end:
                    self._end(call, error)
                else:
                    self.reset(call, error)
            elif any(name == b"grpc-status" for name, _ in headers):
                self._end(call, None)  # grpc-status 0: a clean end
            elif end:
                why = "etcd ended the call without a status"
                self._end(call, RpcError(StatusCode.INTERNAL, why))
        elif kind == http2.RESET:
            _, stream_id, code = event
            call = self.calls.get(stream_id)
            if call is not None:
                call.remote_done = call.local_done = True  # nothing more either way
                why = f"etcd reset the call ({http2.error_name(code)})"
                refused = code == http2.REFUSED_STREAM  # etcd never processed it
                self._end(call, RpcError(StatusCode.UNAVAILABLE, why, unprocessed=refused))
        elif kind == http2.GOAWAY:
            _, last, code, debug = event
            self._goaway(last, code, debug)
        elif kind == http2.PING_ACK and self._ping_deadline is not None:
            self._ping_deadline.cancel()
            self._ping_deadline = None
            self._answer_ping(True)

    def _goaway(self, last: int, code: int, debug: bytes) -> None:
        """GOAWAY: no new calls here; the calls etcd did not take fail as unprocessed (the
        channel sends them again on a new connection), the others may still finish. (etcd,
        like any grpc-go server, drains with a first GOAWAY naming the highest id and a
        PING, then a final one naming the last call it took.)"""
        self.draining = True
        # Headers still in our buffer never left.
        last = min(last, self._flushed_id)
        why = f"{self.member.authority}: etcd is going away (GOAWAY"
        if code:
            why += f" {http2.error_name(code)}"
        if debug:
            why += f": {debug.decode('utf-8', 'replace')}"
        why += ")"
        for call in list(self.calls.values()):
            if call.stream_id > last:
                call.remote_done = call.local_done = True  # etcd will say nothing of it
                self._end(call, RpcError(StatusCode.UNAVAILABLE, why, unprocessed=True))
            elif not call.drains:
                self.reset(call, RpcError(StatusCode.UNAVAILABLE, why))
        self._fail_queued(RpcError(StatusCode.UNAVAILABLE, why))
        self._close_if_drained()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            # Requests made in the same loop iteration leave in one write.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self._transport
        if transport is None or self.broken is not None:
            return
        framer = self._h2
        if self._pending:
            for stream_id, call in list(self._pending.items()):
                outbox = call.outbox
                while outbox:
                    room = framer.window(stream_id)
                    if room <= 0:
                        break  # the rest goes when etcd opens the window (WINDOW_UPDATE)
                    if room >= len(outbox):
                        end = call.end_after_outbox
                        framer.data(stream_id, bytes(outbox), end_stream=end)
                        outbox.clear()
                        call.local_done = end
                        break
                    framer.data(stream_id, bytes(outbox[:room]))
                    del outbox[:room]
                if not outbox:
                    if call.end_after_outbox and not call.local_done:
                        # end() with nothing left to send: an empty DATA frame ends it.
                        framer.data(stream_id, b"", end_stream=True)
                        call.local_done = True
                    del self._pending[stream_id]
        data = framer.take()
        if data:
            transport.write(data)
        self._flushed_id = self._last_id
        limit, self._ping_limit = self._ping_limit, None
        if limit is not None and self._ping_deadline is None:
            self._ping_deadline = asyncio.get_running_loop().call_later(
                limit, self._ping_overdue, limit
            )

    def _expire(self, call: Call, timeout: float) -> None:
        if call.closed:
            return
        why = f"no answer within {timeout:g}s"
        if not call.stream_id:
            limit = self._h2.max_streams
            why += f" (not sent: etcd allows {limit} streams at once, all of them were busy)"
        self.reset(call, RpcError(StatusCode.DEADLINE_EXCEEDED, why))
        self._send_ping(min(self.timeout, PROBE_TIMEOUT))  # is the member alive at all?

    async def responsive(self) -> bool:
        """Whether the member answers its outstanding ping (False: the connection failed).
        No ping outstanding: whether the connection is still up."""
        if self._pong is None:
            return self.broken is None
        return await asyncio.shield(self._pong)

    def _answer_ping(self, answered: bool) -> None:
        pong, self._pong = self._pong, None
        if pong is not None and not pong.done():
            pong.set_result(answered)

    def _ping(self) -> None:
        self._ping_timer = None
        if self.broken is not None or self._streaming <= 0 or self.ping_interval is None:
            return  # the next streaming call starts the pings again
        self._send_ping()
        self._ping_timer = asyncio.get_running_loop().call_later(self.ping_interval, self._ping)

    def _send_ping(self, limit: float | None = None) -> None:
        """A ping that must be answered within `limit` (the connection's timeout) seconds.
        One is outstanding already: its deadline is brought forward to that, if later."""
        if self.broken is not None:
            return
        loop = asyncio.get_running_loop()
        limit = self.timeout if limit is None else limit
        if self._ping_limit is not None:  # one is about to leave: it gets the shorter limit
            self._ping_limit = min(self._ping_limit, limit)
            return
        deadline = self._ping_deadline
        if deadline is not None:
            if deadline.when() > loop.time() + limit:
                deadline.cancel()
                self._ping_deadline = loop.call_later(limit, self._ping_overdue, limit)
            return
        self._h2.ping(b"fleetd\0\0")
        self._pong = loop.create_future()
        # The deadline runs from when the ping leaves (_flush), not from now: a loop busy
        # for a second in between (a large plan) must not fail a member that answers at once.
        self._ping_limit = limit
        self._schedule_flush()

    def _ping_overdue(self, limit: float) -> None:
        self._ping_deadline = None
        self.fail(
            RpcError(
                StatusCode.UNAVAILABLE,
                f"{self.member.authority}: no answer to an HTTP/2 ping within {limit:g}s",
            )
        )


P = TypeVar("P", bound=asyncio.Protocol)


async def connect_first(
    members: Sequence[Member], first: int, protocol: Callable[[Member], P], limit: float
) -> tuple[P, int]:
    """`protocol(member)` connected to the first member that accepts, trying them in order
    from index `first`, each within `limit` seconds; returns it with that member's index.
    None accepting: RpcError UNAVAILABLE naming why, member by member."""
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    for step in range(len(members)):
        index = (first + step) % len(members)
        member = members[index]
        try:
            _, connected = await asyncio.wait_for(
                loop.create_connection(
                    functools.partial(protocol, member),
                    member.host,
                    member.port,
                    ssl=member.tls,
                    server_hostname=member.server_hostname if member.tls else None,
                ),
                limit,
            )
        except (OSError, TimeoutError) as e:
            errors.append(connect_error(member, e).details())
            continue
        return connected, index
    raise RpcError(StatusCode.UNAVAILABLE, "; ".join(errors))


async def member_mute(
    member: Member, path: bytes, message: bytes, metadata: Sequence[tuple[str, str]], limit: float
) -> bool:
    """Whether `member` is mute: its host accepts a TCP connection, but the member does not
    answer one call (TLS handshake included) within `limit` seconds, on a connection of its
    own (closed after). That is a frozen process (SIGSTOPped, or hung). A member that cannot be
    reached at all (refused: down; no answer to the connect: its host dead, cut off or paused,
    or its name not resolving in time) is not mute: holding units for it would hold the
    failover of a machine that died with its etcd member. Any answer, an error too, says it
    runs."""
    loop = asyncio.get_running_loop()
    try:
        sock = await asyncio.wait_for(_tcp_connect(loop, member), limit)
    except (OSError, TimeoutError):
        return False
    factory = functools.partial(Connection, member, limit, 3600.0)
    try:
        _, conn = await asyncio.wait_for(
            loop.create_connection(
                factory,
                sock=sock,
                ssl=member.tls,
                server_hostname=member.server_hostname if member.tls else None,
            ),
            limit,
        )
    except TimeoutError:
        sock.close()
        return True  # accepted, but the TLS handshake went unanswered
    except OSError:
        sock.close()
        return False
    try:
        await conn.unary(path, message, metadata, limit)
    except RpcError as e:
        return e.code() == StatusCode.DEADLINE_EXCEEDED
    finally:
        conn.fail(RpcError(StatusCode.CANCELLED, "probe done"))
    return False


async def _tcp_connect(loop: asyncio.AbstractEventLoop, member: Member) -> socket.socket:
    """A connected non-blocking TCP socket to `member` (its addresses tried in order)."""
    infos = await loop.getaddrinfo(member.host, member.port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"{member.authority}: no address")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as e:
            sock.close()
            error = e
            continue
        except BaseException:  # cancelled (the caller's limit): leave no socket behind
            sock.close()
            raise
        return sock
    raise error


class Channel:
    """Calls to an etcd cluster over one connection at a time, to the first member that
    accepts one (in order, starting after the member whose connection was lost last)."""

    def __init__(
        self, members: Sequence[Member], timeout: float, ping_interval: float = 10.0
    ) -> None:
        if not members:
            raise ValueError("no etcd members")
        self.members = list(members)
        self.timeout = timeout
        self.ping_interval = ping_interval
        self._conn: Connection | None = None
        self._next = 0  # index of the member to try first
        self._lock: asyncio.Lock | None = None
        self._failure: RpcError | None = None
        self._retry_at = 0.0
        self._backoff = _MIN_BACKOFF
        self._closed = False
        # Connections finishing their calls after a GOAWAY (gone from here once closed).
        self._draining: weakref.WeakSet[Connection] = weakref.WeakSet()

    async def connection(self) -> Connection:
        # The connection as the loop last saw it: a close or GOAWAY is taken in as it arrives,
        # by a loop that runs all along (fleetd, fleetctl). One run only now and then
        # (run_until_complete between a test's steps) must be kept running meanwhile, in a
        # thread of its own (tests/functional/fleet_helpers.py), or it calls on what etcd
        # closed while it did not look.
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            conn = self._conn
            if conn is not None and conn.usable:
                return conn
            if self._closed:
                raise RpcError(StatusCode.CANCELLED, "the etcd client is closed")
            if conn is not None:
                # Lost or going away: start with the next member, in case this one is the
                # trouble. A draining connection finishes its calls on its own.
                self._next = (self.members.index(conn.member) + 1) % len(self.members)
                self._conn = None
                if conn.broken is None:
                    self._draining.add(conn)
            loop = asyncio.get_running_loop()
            if self._failure is not None and loop.time() < self._retry_at:
                raise self._failure  # fail fast while backing off, as gRPC does
            try:
                conn = await self._connect()
            except RpcError as e:
                self._failure = e
                self._retry_at = loop.time() + self._backoff
                self._backoff = min(self._backoff * 2, _MAX_BACKOFF)
                raise
            self._failure = None
            self._backoff = _MIN_BACKOFF
            self._conn = conn
            return conn

    async def _connect(self) -> Connection:
        factory = functools.partial(
            Connection, timeout=self.timeout, ping_interval=self.ping_interval
        )
        try:
            conn, self._next = await connect_first(self.members, self._next, factory, self.timeout)
        except RpcError as e:
            raise RpcError(e.code(), f"failed to connect: {e.details()}") from None
        return conn

    async def unary(
        self,
        path: bytes,
        message: bytes,
        metadata: Sequence[tuple[str, str]],
        *,
        idempotent: bool = False,
    ) -> bytes:
        """One call. Sent once more, on a new connection, when etcd went away before taking
        it (GOAWAY: as gRPC's transparent retry does), and, if `idempotent` (a read, as etcd's
        own client retries those), when its connection was lost under it or it timed out on
        a member that then did not answer a ping either (frozen), while another member may
        answer."""
        conn = await self.connection()
        try:
            return await conn.unary(path, message, metadata, self.timeout)
        except RpcError as e:
            if not e.unprocessed and not (
                idempotent and len(self.members) > 1 and await self._member_lost(conn, e)
            ):
                raise
        conn = await self.connection()
        return await conn.unary(path, message, metadata, self.timeout)

    @staticmethod
    async def _member_lost(conn: Connection, error: RpcError) -> bool:
        """Whether `error` ended a call because its connection is gone or its member mute."""
        if error.code() == StatusCode.UNAVAILABLE:
            return conn.broken is not None
        return error.code() == StatusCode.DEADLINE_EXCEEDED and not await conn.responsive()

    def leave(self, authorities: Sequence[str]) -> None:
        """Drop the connection if it is to one of these members (found mute elsewhere): its
        calls fail as UNAVAILABLE (a watch resumes on the next member) instead of waiting for
        their own deadline or the next ping."""
        conn = self._conn
        if conn is not None and conn.member.authority in authorities and conn.broken is None:
            why = f"{conn.member.authority}: mute (no answer to a Status call on its own)"
            conn.fail(RpcError(StatusCode.UNAVAILABLE, why))

    async def stream(self, path: bytes, metadata: Sequence[tuple[str, str]]) -> Call:
        conn = await self.connection()
        return conn.start(path, metadata, unary=False)

    async def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        closing = [*self._draining, *([conn] if conn is not None else [])]
        self._draining.clear()
        for c in closing:
            c.fail(RpcError(StatusCode.CANCELLED, "the etcd client is closed"))
