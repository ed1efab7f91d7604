"""The gRPC-over-HTTP/2 client (fleetd/etcd/transport.py) against HTTP/2 peers.

Most tests drive one `Connection` against an in-memory peer: h2's own server side, fed the
exact bytes the connection writes and answering with the frames etcd would send (or would
not). The `Channel` tests use real loopback sockets: ports with nothing listening and tiny
h2 servers. Against a real etcd the transport is covered by tests/integration.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from fleetd.etcd import transport as transport_module
from fleetd.etcd.etcdpb import rpc
from fleetd.etcd.transport import (
    Channel,
    Connection,
    Member,
    RpcError,
    StatusCode,
    connect_error,
    member_mute,
    status_error,
)
from tests.unit.memory_transport import Transport, h2_server

RANGE = b"/etcdserverpb.KV/Range"
WATCH = b"/etcdserverpb.Watch/Watch"
TXN = b"/etcdserverpb.KV/Txn"
STATUS = b"/etcdserverpb.Maintenance/Status"


def noop() -> None:
    pass


MEMBER = Member("127.0.0.1", 2379, "127.0.0.1:2379")
OK_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]


def prefixed(message: bytes, compressed: int = 0) -> bytes:
    return struct.pack(">BI", compressed, len(message)) + message


def range_request(key: bytes = b"/fleet/job/a.service") -> bytes:
    data: bytes = rpc.RangeRequest(key=key, limit=3).SerializeToString()
    return data


def range_response(count: int) -> bytes:
    data: bytes = rpc.RangeResponse(count=count).SerializeToString()
    return data


class Peer:
    """etcd's side of one connection: an h2 server the test answers through.

    It never acknowledges received data by itself, so flow-control windows only open when a
    test opens them."""

    def __init__(self, client: Connection, window: int | None = None) -> None:
        self.client = client
        self.transport = Transport()
        self.conn = h2_server(window)
        self.headers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.bodies: dict[int, bytearray] = {}
        self.frames: list[tuple[int, int, bool]] = []  # DATA: stream id, length, END_STREAM
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.pings = 0
        client.connection_made(self.transport)
        self.pump()
        self.pump()  # the settings acknowledgements, both ways

    def receive(self) -> None:
        """Take in what the client wrote."""
        for event in self.conn.receive_data(self.transport.take()):
            if isinstance(event, h2.events.RequestReceived):
                assert event.stream_id is not None
                assert event.headers is not None
                self.headers[event.stream_id] = [(bytes(k), bytes(v)) for k, v in event.headers]
                self.bodies[event.stream_id] = bytearray()
            elif isinstance(event, h2.events.DataReceived):
                assert event.stream_id is not None
                assert event.data is not None
                self.bodies[event.stream_id] += event.data
                self.frames.append(
                    (event.stream_id, len(event.data), event.stream_ended is not None)
                )
            elif isinstance(event, h2.events.StreamEnded):
                assert event.stream_id is not None
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                assert event.stream_id is not None
                assert event.error_code is not None
                self.resets[event.stream_id] = event.error_code
            elif isinstance(event, h2.events.PingReceived):
                self.pings += 1  # h2 queues the acknowledgement; `send` delivers it

    def send(self, chunk: int = 0) -> None:
        """Deliver the peer's pending frames to the client, in `chunk`-byte pieces if set."""
        data = self.conn.data_to_send()
        if not data:
            return
        if chunk <= 0:
            self.client.data_received(data)
            return
        for i in range(0, len(data), chunk):
            self.client.data_received(data[i : i + chunk])

    def pump(self) -> None:
        self.receive()
        self.send()

    def header(self, stream_id: int) -> dict[bytes, bytes]:
        return dict(self.headers[stream_id])

    def messages(self, stream_id: int) -> list[bytes]:
        body = bytes(self.bodies[stream_id])
        found = []
        while body:
            flag, length = struct.unpack(">BI", body[:5])
            assert flag == 0
            assert len(body) >= 5 + length, "a message cut short"
            found.append(body[5 : 5 + length])
            body = body[5 + length :]
        return found

    def respond(self, stream_id: int, *messages: bytes, status: int = 0, chunk: int = 0) -> None:
        """A whole answer: headers, each message in its own DATA frame, the trailers."""
        self.conn.send_headers(stream_id, OK_HEADERS)
        for message in messages:
            self.conn.send_data(stream_id, prefixed(message))
        self.trailers(stream_id, status)
        self.send(chunk)

    def trailers(self, stream_id: int, status: int = 0, message: bytes | None = None) -> None:
        headers = [(b"grpc-status", str(status).encode())]
        if message is not None:
            headers.append((b"grpc-message", message))
        self.conn.send_headers(stream_id, headers, end_stream=True)


def make(
    window: int | None = None,
    timeout: float = 5.0,
    ping_interval: float = 10.0,
    member: Member = MEMBER,
) -> tuple[Connection, Peer]:
    conn = Connection(member, timeout, ping_interval)
    return conn, Peer(conn, window)


async def settle() -> None:
    """Let call_soon callbacks (the connection's batched flush) run."""
    for _ in range(3):
        await asyncio.sleep(0)


def call(conn: Connection, request: bytes = b"x") -> asyncio.Task[bytes]:
    """A unary Range call on `conn`, under way (5 s timeout)."""
    return asyncio.create_task(conn.unary(RANGE, request, [], 5.0))


async def delivered(peer: Peer) -> None:
    """Let our batched writes out, and the peer read them."""
    await settle()
    peer.receive()


async def resets(peer: Peer) -> dict[int, int]:
    """The streams the peer has seen reset (and their codes), once our writes are out."""
    await delivered(peer)
    return peer.resets


async def answer(peer: Peer, stream: int, task: asyncio.Task[bytes], message: bytes) -> None:
    """The peer answers `stream` with `message`: the call's `task` must resolve to it."""
    peer.respond(stream, message)
    assert await asyncio.wait_for(task, 1) == message


async def call_sent(
    member: Member = MEMBER,
) -> tuple[Connection, Peer, asyncio.Task[bytes]]:
    """A connection with one unary call (stream 1) whose request the peer has read."""
    conn, peer = make(member=member)
    task = call(conn)
    await delivered(peer)
    return conn, peer, task


async def until(
    condition: Callable[[], bool], step: Callable[[], None], limit: float = 1.0
) -> None:
    """Run the loop (and `step`, e.g. the peer's pump) until `condition`, at most `limit` s."""
    deadline = asyncio.get_running_loop().time() + limit
    step()
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "waited too long"
        await asyncio.sleep(0.005)
        step()


async def failure(awaitable: Any, limit: float = 1.0) -> RpcError:
    """The RpcError `awaitable` fails with, within `limit` seconds."""
    with pytest.raises(RpcError) as caught:
        await asyncio.wait_for(awaitable, limit)
    return caught.value


async def failed(awaitable: Any, code: StatusCode, limit: float = 1.0) -> RpcError:
    """`failure`, which must be of gRPC status `code`."""
    error = await failure(awaitable, limit)
    assert error.code() == code
    return error


# -- unary calls -----------------------------------------------------------------------------


async def test_unary_call_is_a_grpc_post_with_the_metadata_and_resolves_to_the_answer() -> None:
    conn, peer = make()
    request = range_request()
    task = asyncio.create_task(conn.unary(RANGE, request, [("token", "tok")], 5.0))
    await delivered(peer)
    headers = peer.header(1)
    assert headers[b":method"] == b"POST"
    assert headers[b":path"] == RANGE
    assert headers[b":scheme"] == b"http"
    assert headers[b":authority"] == b"127.0.0.1:2379"
    assert headers[b"content-type"] == b"application/grpc"
    assert headers[b"te"] == b"trailers"
    assert headers[b"token"] == b"tok"
    # One DATA frame: the prefixed message, ending the request side.
    assert peer.frames == [(1, 5 + len(request), True)]
    assert bytes(peer.bodies[1]) == prefixed(request)
    assert peer.ended == {1}

    answer = range_response(7)
    peer.respond(1, answer)
    assert await asyncio.wait_for(task, 1) == answer
    assert rpc.RangeResponse.FromString(task.result()).count == 7
    assert conn.calls == {}
    assert conn.usable


GRPC_TIMEOUT = re.compile(rb"[1-9][0-9]{0,7}[HMSmun]|0[HMSmun]")  # gRPC's TimeoutValue, Unit


async def test_unary_calls_tell_etcd_their_deadline_as_grpc_timeout() -> None:
    conn, peer = make()
    tasks = [asyncio.create_task(conn.unary(RANGE, b"x", [("token", "t")], 5.0)) for _ in "ab"]
    short = asyncio.create_task(conn.unary(RANGE, b"x", [("token", "t")], 0.05))
    await settle()
    watch = conn.start(WATCH, [("token", "t")], unary=False)
    watch.write(b"watch")
    await delivered(peer)
    assert [peer.header(s).get(b"grpc-timeout") for s in (1, 3, 5, 7)] == [
        b"5000m",
        b"5000m",
        b"50m",
        None,  # a watch has no deadline
    ]
    for stream_id in (1, 3, 5):
        assert GRPC_TIMEOUT.fullmatch(peer.header(stream_id)[b"grpc-timeout"])
    # Encoded once per (path, metadata, timeout): a channel's calls all share its timeout.
    assert len(conn._blocks) == 3
    for stream_id in (1, 3, 5):
        peer.respond(stream_id, b"y")
    assert await asyncio.gather(*tasks, short) == [b"y"] * 3


@pytest.mark.parametrize(
    ("seconds", "header"),
    [
        (5.0, b"5000m"),
        (0.05, b"50m"),
        (1.1, b"1100m"),
        (0.0004, b"1m"),  # rounded up: etcd gives up no sooner than the client
        (0.0, b"1m"),  # the value must be positive
        (2.0001, b"2001m"),
        (99_999.999, b"99999999m"),
        (100_000.0, b"100000S"),  # past 8 digits of milliseconds: seconds
        (1e9, b"16666667M"),
        (1e12, b"99999999H"),  # 277,777,778 hours: as long as gRPC can say
    ],
)
def test_grpc_timeout_is_at_most_8_digits_and_a_unit(seconds: float, header: bytes) -> None:
    assert transport_module.grpc_timeout(seconds) == header
    assert GRPC_TIMEOUT.fullmatch(header)


async def test_tls_member_calls_use_the_https_scheme() -> None:
    member = Member("etcd.example", 2379, "etcd.example:2379", tls=ssl.create_default_context())
    _conn, peer, task = await call_sent(member)
    assert peer.header(1)[b":scheme"] == b"https"
    assert peer.header(1)[b":authority"] == b"etcd.example:2379"
    await answer(peer, 1, task, b"y")


async def test_calls_of_one_loop_iteration_leave_in_one_write_on_their_own_streams() -> None:
    conn, peer = make()
    tasks = [
        asyncio.create_task(conn.unary(RANGE, range_request(b"k%d" % i), [], 5.0)) for i in range(3)
    ]
    await settle()
    assert len(peer.transport.written) == 1
    peer.receive()
    assert sorted(peer.headers) == [1, 3, 5]
    # Answered out of order: each call gets its own stream's answer.
    for stream_id in (5, 1, 3):
        peer.respond(stream_id, b"answer %d" % stream_id)
    assert await asyncio.gather(*tasks) == [b"answer 1", b"answer 3", b"answer 5"]


async def test_unary_answer_split_across_data_frames_counts_once_the_trailers_say_ok() -> None:
    conn, peer = make()
    task = asyncio.create_task(conn.unary(RANGE, range_request(), [], 5.0))
    await delivered(peer)
    answer = range_response(12345) + b"\x00" * 40
    body = prefixed(answer)
    peer.conn.send_headers(1, OK_HEADERS)
    for part in (body[:3], body[3:7], body[7:20], body[20:]):  # the prefix itself split too
        peer.conn.send_data(1, part)
    peer.send(chunk=7)
    await settle()
    assert not task.done()  # the whole message is there, but not yet the status
    peer.trailers(1, 0)
    peer.send()
    assert await asyncio.wait_for(task, 1) == answer


# -- streaming calls -------------------------------------------------------------------------


async def test_streaming_call_writes_and_reads_messages_in_order_and_ends_cleanly() -> None:
    conn, peer = make()
    call = conn.start(WATCH, [("token", "tok")], unary=False)
    call.write(b"first request")
    await delivered(peer)
    assert peer.header(1)[b"token"] == b"tok"
    assert peer.messages(1) == [b"first request"]
    assert peer.ended == set()  # the request side stays open
    call.write(b"second request", end=True)
    await delivered(peer)
    assert peer.messages(1) == [b"first request", b"second request"]
    assert peer.ended == {1}

    waiting = asyncio.create_task(call.read())
    await settle()
    assert not waiting.done()
    peer.conn.send_headers(1, OK_HEADERS)
    peer.conn.send_data(1, prefixed(b"one") + prefixed(b"two"))  # two messages, one frame
    third = prefixed(b"three" * 10)
    peer.conn.send_data(1, third[:8])
    peer.conn.send_data(1, third[8:])
    peer.send()
    assert await asyncio.wait_for(waiting, 1) == b"one"
    assert await call.read() == b"two"
    assert await call.read() == b"three" * 10
    peer.trailers(1, 0)
    peer.send()
    assert await asyncio.wait_for(call.read(), 1) is None
    assert await call.read() is None
    assert call.closed
    assert call.error is None
    assert conn.calls == {}


async def test_streaming_call_reads_its_messages_before_the_error_that_ended_it() -> None:
    conn, peer = make()
    call = conn.start(WATCH, [], unary=False)
    call.write(b"watch")
    await delivered(peer)
    peer.conn.send_headers(1, OK_HEADERS)
    peer.conn.send_data(1, prefixed(b"event"))
    peer.trailers(1, int(StatusCode.OUT_OF_RANGE), b"etcdserver: mvcc: required revision")
    peer.send()
    assert await call.read() == b"event"
    error = await failed(call.read(), StatusCode.OUT_OF_RANGE)
    assert error.details() == "etcdserver: mvcc: required revision"
    with pytest.raises(RpcError) as caught:
        call.write(b"more")
    assert caught.value is error


async def test_cancelling_a_streaming_call_resets_its_stream_only() -> None:
    conn, peer = make()
    watch = conn.start(WATCH, [], unary=False)
    watch.write(b"watch")
    other = conn.start(WATCH, [], unary=False)
    other.write(b"watch too")
    await settle()
    peer.pump()
    reader = asyncio.create_task(watch.read())
    await settle()
    watch.cancel()
    await failed(reader, StatusCode.CANCELLED)
    with pytest.raises(RpcError):
        watch.write(b"late")
    assert await resets(peer) == {1: h2.errors.ErrorCodes.CANCEL}
    # The connection and the other stream go on.
    peer.conn.send_headers(3, OK_HEADERS)
    peer.conn.send_data(3, prefixed(b"still here"))
    peer.send()
    assert await asyncio.wait_for(other.read(), 1) == b"still here"
    assert conn.usable
    assert list(conn.calls) == [3]


async def test_streaming_calls_keep_pings_going_until_none_is_open() -> None:
    conn, peer = make(ping_interval=0.02)
    # A unary call alone: no pings (etcd refuses pings without a stream open).
    pending = call(conn)
    await asyncio.sleep(0.08)
    peer.pump()
    assert peer.pings == 0

    watch = conn.start(WATCH, [], unary=False)
    watch.write(b"watch")
    await until(lambda: peer.pings >= 3, peer.pump)  # each one answered, so the next goes
    assert conn.usable

    watch.cancel()
    await settle()
    peer.pump()
    sent = peer.pings
    for _ in range(10):  # five intervals
        await asyncio.sleep(0.01)
        peer.pump()
    assert peer.pings == sent

    # The next streaming call starts them again.
    again = conn.start(WATCH, [], unary=False)
    again.write(b"watch")
    await until(lambda: peer.pings >= sent + 2, peer.pump)
    assert conn.usable
    peer.respond(1, b"y")
    assert await pending == b"y"


# -- errors ----------------------------------------------------------------------------------


async def test_trailers_only_error_fails_the_call_with_its_code_and_decoded_message() -> None:
    conn, peer = make()
    task = asyncio.create_task(conn.unary(RANGE, b"x", [("token", "stale")], 5.0))
    await delivered(peer)
    peer.conn.send_headers(
        1,
        [
            *OK_HEADERS,
            (b"grpc-status", b"16"),
            (b"grpc-message", b"etcdserver: invalid auth token%21"),
        ],
        end_stream=True,
    )
    peer.send()
    error = await failed(task, StatusCode.UNAUTHENTICATED)
    assert error.details() == "etcdserver: invalid auth token!"
    assert conn.usable  # a failed call, not a failed connection
    assert peer.resets == {}


async def test_http_error_status_without_grpc_status_is_unavailable() -> None:
    _conn, peer, task = await call_sent()
    peer.conn.send_headers(1, [(b":status", b"503")], end_stream=True)
    peer.send()
    error = await failed(task, StatusCode.UNAVAILABLE)
    assert "HTTP 503" in error.details()


async def test_http_error_status_with_a_body_coming_resets_the_stream() -> None:
    _conn, peer, task = await call_sent()
    peer.conn.send_headers(1, [(b":status", b"502"), (b"content-type", b"text/html")])
    peer.send()
    error = await failed(task, StatusCode.UNAVAILABLE)
    assert "HTTP 502" in error.details()
    assert await resets(peer) == {1: h2.errors.ErrorCodes.CANCEL}


async def test_stream_ended_without_grpc_status_is_internal() -> None:
    _conn, peer, task = await call_sent()
    peer.conn.send_headers(1, OK_HEADERS)
    peer.conn.send_data(1, prefixed(b"an answer, but no status"), end_stream=True)
    peer.send()
    error = await failed(task, StatusCode.INTERNAL)
    assert "without a status" in error.details()


async def test_ok_status_without_a_message_is_internal() -> None:
    _conn, peer, task = await call_sent()
    peer.respond(1)  # headers and trailers, no message
    await failed(task, StatusCode.INTERNAL)


async def test_compressed_answer_fails_the_call_and_resets_its_stream() -> None:
    _conn, peer, task = await call_sent()
    peer.conn.send_headers(1, OK_HEADERS)
    peer.conn.send_data(1, prefixed(b"gzipped", compressed=1))
    peer.send()
    error = await failed(task, StatusCode.INTERNAL)
    assert "compressed" in error.details()
    assert await resets(peer) == {1: h2.errors.ErrorCodes.CANCEL}


def test_the_largest_message_a_call_takes_is_64_mib() -> None:
    # Above grpc-go's 4 MiB default: a range of every unit body at 10,000 units is 20-30 MB.
    assert transport_module.MAX_MESSAGE == Connection.max_message == 64 * 1024 * 1024


async def test_a_message_over_the_limit_fails_its_call_on_its_prefix_and_spares_the_others() -> (
    None
):
    conn, peer = make()
    conn.max_message = 1000
    big = call(conn, b"big")
    other = call(conn, b"other")
    await delivered(peer)
    peer.conn.send_headers(1, OK_HEADERS)
    peer.conn.send_data(1, struct.pack(">BI", 0, 10_000_000) + b"x" * 95)  # 100 bytes of it
    peer.send()
    # Failed at once, on the prefix: not a byte of the rest is waited for or kept.
    error = await failed(big, StatusCode.RESOURCE_EXHAUSTED)
    assert error.details() == (
        "127.0.0.1:2379: etcd's answer is a message of 10000000 bytes, larger than the 1000"
        " bytes a call may receive"
    )
    assert list(conn.calls) == [3]
    assert await resets(peer) == {1: h2.errors.ErrorCodes.CANCEL}
    # What etcd sent of it before it saw the reset is dropped as it comes, and credited back.
    late = struct.pack(">I", 16_000)[1:] + struct.pack(">BBI", 0, 0, 1) + b"x" * 16_000
    conn.data_received(late * 3)  # (h2 sends nothing on a stream it knows is reset)
    peer.respond(3, b"a" * 1000)  # exactly the limit: taken
    assert await asyncio.wait_for(other, 1) == b"a" * 1000
    assert conn.usable
    assert not peer.transport.aborted


async def test_a_streaming_call_reads_its_messages_before_one_over_the_limit() -> None:
    conn, peer = make()
    conn.max_message = 1000
    watch = conn.start(WATCH, [], unary=False)
    watch.write(b"watch")
    await delivered(peer)
    peer.conn.send_headers(1, OK_HEADERS)
    peer.conn.send_data(1, prefixed(b"event") + struct.pack(">BI", 0, 1001))
    peer.send()
    assert await watch.read() == b"event"
    error = await failed(watch.read(), StatusCode.RESOURCE_EXHAUSTED)
    assert "1001 bytes" in error.details()
    assert conn.usable


async def test_stream_reset_by_etcd_is_unavailable() -> None:
    conn, peer, task = await call_sent()
    peer.conn.reset_stream(1, h2.errors.ErrorCodes.REFUSED_STREAM)
    peer.send()
    error = await failed(task, StatusCode.UNAVAILABLE)
    assert "reset" in error.details()
    assert conn.usable


# -- timeouts and cancellation ---------------------------------------------------------------


async def test_unary_timeout_resets_the_stream_and_an_unanswered_ping_drops_the_connection() -> (
    None
):
    conn, peer = make(timeout=0.1)
    slow = asyncio.create_task(conn.unary(RANGE, b"slow", [], 0.05))
    other = call(conn, b"other")
    await settle()
    watch = conn.start(WATCH, [], unary=False)
    watch.write(b"watch")
    await delivered(peer)
    assert sorted(peer.headers) == [1, 3, 5]
    assert peer.header(5)[b":path"] == WATCH

    error = await failed(slow, StatusCode.DEADLINE_EXCEEDED)
    assert "0.05s" in error.details()
    await settle()
    peer.receive()  # not answered: the peer's ping acknowledgement never leaves
    assert peer.resets == {1: h2.errors.ErrorCodes.CANCEL}
    assert peer.pings == 1
    assert not peer.transport.aborted

    # No answer to the ping within the connection's timeout: every call fails, at once.
    error = await failed(other, StatusCode.UNAVAILABLE)
    assert "ping" in error.details()
    lost = await failure(watch.read())
    assert lost.code() == StatusCode.UNAVAILABLE
    assert peer.transport.aborted
    assert not conn.usable
    with pytest.raises(RpcError):
        conn.start(RANGE, [], unary=True)


async def test_a_timed_out_call_brings_an_outstanding_pings_deadline_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A watch's ping is out with the connection's whole timeout to run; a call then times out:
    # the member now has only the probe's time to answer that ping.
    monkeypatch.setattr(transport_module, "PROBE_TIMEOUT", 0.05)
    conn, peer = make(timeout=5.0, ping_interval=0.01)
    watch = conn.start(WATCH, [], unary=False)
    watch.write(b"watch")
    await until(lambda: peer.pings == 1, peer.receive)  # not acknowledged
    slow = asyncio.create_task(conn.unary(RANGE, b"slow", [], 0.05))
    assert (await failure(slow)).code() == StatusCode.DEADLINE_EXCEEDED
    lost = await failure(watch.read(), limit=0.5)
    assert lost.code() == StatusCode.UNAVAILABLE
    assert "within 0.05s" in lost.details()
    assert peer.pings == 1  # the outstanding ping was the probe: no second one
    assert not await conn.responsive()


async def test_a_busy_loop_before_the_ping_leaves_does_not_fail_a_member_that_answers() -> None:
    # The probe's deadline runs from when the ping is written: a loop blocked for longer than
    # the deadline between asking for the ping and writing it (a large plan) must not count.
    conn, peer = make(timeout=5.0)
    conn._send_ping(0.05)
    time.sleep(0.1)  # noqa: ASYNC251  (the loop is busy on purpose: nothing written yet)
    await settle()
    peer.pump()  # the ping, answered as soon as it arrives
    assert await asyncio.wait_for(conn.responsive(), 1)
    await asyncio.sleep(0.1)
    assert conn.usable


async def test_unary_timeout_with_the_ping_answered_keeps_the_connection() -> None:
    conn, peer = make(timeout=0.1)
    slow = asyncio.create_task(conn.unary(RANGE, b"slow", [], 0.05))
    other = call(conn, b"other")
    await delivered(peer)
    await failed(slow, StatusCode.DEADLINE_EXCEEDED)
    await settle()
    peer.pump()  # the ping, acknowledged
    assert peer.pings == 1
    assert peer.resets == {1: h2.errors.ErrorCodes.CANCEL}
    assert await asyncio.wait_for(conn.responsive(), 1)
    await asyncio.sleep(0.15)  # past the ping's timeout
    assert conn.usable
    assert not peer.transport.aborted
    await answer(peer, 3, other, b"late but fine")
    # And new calls work.
    task = call(conn, b"next")
    await delivered(peer)
    await answer(peer, 5, task, b"next answer")


async def test_cancelling_a_unary_call_resets_its_stream_and_spares_the_others() -> None:
    conn, peer = make()
    first = call(conn, b"first")
    second = call(conn, b"second")
    await delivered(peer)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await resets(peer) == {1: h2.errors.ErrorCodes.CANCEL}
    assert list(conn.calls) == [3]
    await answer(peer, 3, second, b"second answer")
    assert conn.usable
    assert not peer.transport.aborted


# -- flow control ----------------------------------------------------------------------------


async def test_request_bigger_than_the_stream_window_waits_for_the_window_to_open() -> None:
    conn, peer = make(window=100)
    request = bytes(range(250))  # 255 bytes with the prefix
    task = asyncio.create_task(conn.unary(RANGE, request, [], 5.0))
    await delivered(peer)
    assert peer.frames == [(1, 100, False)]  # what the window allows, and no more
    await delivered(peer)
    assert peer.frames == [(1, 100, False)]

    peer.conn.increment_flow_control_window(100, stream_id=1)
    peer.send()
    peer.receive()
    assert peer.frames == [(1, 100, False), (1, 100, False)]
    assert peer.ended == set()

    peer.conn.increment_flow_control_window(1000, stream_id=1)
    peer.send()
    peer.receive()
    assert peer.frames == [(1, 100, False), (1, 100, False), (1, 55, True)]
    assert peer.messages(1) == [request]
    assert peer.ended == {1}
    await answer(peer, 1, task, b"done")


async def test_request_bigger_than_the_connection_window_waits_too() -> None:
    conn, peer = make(window=1 << 20)  # streams may take 1 MiB, the connection 64 KiB - 1
    request = b"v" * 70000
    task = asyncio.create_task(conn.unary(RANGE, request, [], 5.0))
    await delivered(peer)
    assert sum(n for _, n, _ in peer.frames) == 65535
    assert all(n <= 16384 for _, n, _ in peer.frames)  # the peer's largest frame size
    assert not any(end for _, _, end in peer.frames)

    peer.conn.increment_flow_control_window(100000)  # the connection's window
    peer.send()
    peer.receive()
    assert sum(n for _, n, _ in peer.frames) == 70005
    assert peer.frames[-1][2]
    assert peer.messages(1) == [request]
    await answer(peer, 1, task, b"done")


# -- etcd's limit on header lists -------------------------------------------------------------


def header_limited(size: int) -> tuple[Connection, Peer]:
    """A connection to a peer whose SETTINGS_MAX_HEADER_LIST_SIZE is `size`."""
    conn, peer = make()
    peer.conn.update_settings({h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: size})
    peer.send()
    peer.receive()
    return conn, peer


def request_size(metadata: list[tuple[str, str]], timeout: float | None = 5.0) -> int:
    headers = transport_module.request_headers(MEMBER, RANGE, metadata, timeout)
    return sum(len(name) + len(value) + 32 for name, value in headers)


async def test_a_call_whose_headers_are_over_etcds_header_list_limit_is_refused_unsent() -> None:
    token = [("token", "t" * 200)]
    size = request_size(token)
    conn, peer = header_limited(size - 1)
    with pytest.raises(RpcError) as caught:
        conn.start(RANGE, token, unary=True, timeout=5.0)
    error = caught.value
    assert error.code() == StatusCode.INTERNAL
    assert error.details() == (
        f"127.0.0.1:2379: the call's headers are {size} bytes as HTTP/2 counts them, more"
        f" than the {size - 1} etcd accepts (its SETTINGS_MAX_HEADER_LIST_SIZE); not sent"
    )
    assert not error.unprocessed  # sending it again would not change a byte of it
    await failed(conn.unary(RANGE, b"x", token, 5.0), StatusCode.INTERNAL)
    await delivered(peer)
    assert peer.headers == {}  # nothing went
    assert conn.calls == {}
    # The connection goes on: a call with smaller headers, the same size as the limit, is sent.
    fits = [("token", "t" * 199)]
    assert request_size(fits) == size - 1
    task = call_with(conn, fits)
    await delivered(peer)
    assert peer.header(1)[b"token"] == b"t" * 199
    await answer(peer, 1, task, b"y")
    assert conn.usable


def call_with(conn: Connection, metadata: list[tuple[str, str]]) -> asyncio.Task[bytes]:
    return asyncio.create_task(conn.unary(RANGE, b"x", metadata, 5.0))


async def test_before_etcds_settings_say_no_header_list_limit_is_assumed() -> None:
    conn = Connection(MEMBER, 5.0, 10.0)
    conn.connection_made(Transport())
    huge = conn.start(RANGE, [("token", "t" * 100_000)], unary=True)
    assert huge.stream_id == 1  # RFC 9113: unlimited until SETTINGS_MAX_HEADER_LIST_SIZE


async def test_a_waiting_call_over_a_header_limit_set_meanwhile_fails_when_its_turn_comes() -> None:
    conn, peer = limited(1)
    blocker = call(conn)
    await settle()
    big = asyncio.create_task(conn.unary(RANGE, b"big", [("token", "t" * 300)], 5.0))
    small = call(conn, b"small")
    await delivered(peer)
    peer.conn.update_settings({h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 400})
    peer.send()
    await answer(peer, 1, blocker, b"done")
    error = await failed(big, StatusCode.INTERNAL)
    assert "SETTINGS_MAX_HEADER_LIST_SIZE" in error.details()
    await delivered(peer)
    assert sorted(peer.headers) == [1, 3]
    assert peer.messages(3) == [b"small"]  # the next in line went instead
    await answer(peer, 3, small, b"small answer")


# -- etcd's limit on concurrent streams --------------------------------------------------------


def limited(streams: int, timeout: float = 5.0) -> tuple[Connection, Peer]:
    """A connection to a peer that allows `streams` streams at once (h2 enforces it: a
    stream more is a protocol error on its side)."""
    conn, peer = make(timeout=timeout)
    peer.conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: streams})
    peer.send()
    peer.receive()  # our acknowledgement: h2 holds us to the limit from now on
    return conn, peer


async def test_calls_beyond_the_stream_limit_wait_and_go_in_order_as_streams_end() -> None:
    conn, peer = limited(2)
    tasks = [asyncio.create_task(conn.unary(RANGE, b"call %d" % i, [], 5.0)) for i in range(5)]
    await delivered(peer)
    assert sorted(peer.headers) == [1, 3]  # no more than etcd allows
    assert len(conn.calls) == 2
    peer.respond(3, b"answer 1")
    await delivered(peer)
    assert sorted(peer.headers) == [1, 3, 5]
    assert peer.messages(5) == [b"call 2"]  # the oldest waiting call, its request whole
    peer.respond(1, b"answer 0")
    peer.respond(5, b"answer 2")
    await delivered(peer)
    assert sorted(peer.headers) == [1, 3, 5, 7, 9]
    assert [peer.messages(s) for s in (7, 9)] == [[b"call 3"], [b"call 4"]]
    peer.respond(9, b"answer 4")
    peer.respond(7, b"answer 3")
    assert await asyncio.gather(*tasks) == [b"answer %d" % i for i in range(5)]
    assert conn.calls == {}
    assert peer.resets == {}  # nothing refused, nothing reset
    assert conn.usable


async def test_streams_etcd_ends_by_reset_or_that_we_cancel_free_their_place_too() -> None:
    conn, peer = limited(1)
    watch = conn.start(WATCH, [], unary=False)
    watch.write(b"watch")
    first = call(conn, b"first")
    second = call(conn, b"second")
    await delivered(peer)
    assert sorted(peer.headers) == [1]
    watch.cancel()  # RST_STREAM first, then the next call's HEADERS
    assert await resets(peer) == {1: h2.errors.ErrorCodes.CANCEL}
    assert sorted(peer.headers) == [1, 3]
    peer.conn.reset_stream(3, h2.errors.ErrorCodes.INTERNAL_ERROR)
    peer.send()
    assert (await failure(first)).code() == StatusCode.UNAVAILABLE
    await delivered(peer)
    assert sorted(peer.headers) == [1, 3, 5]
    await answer(peer, 5, second, b"second answer")


async def test_a_streaming_call_written_while_waiting_sends_its_messages_once_open() -> None:
    conn, peer = limited(1)
    pending = call(conn)
    await settle()
    watch = conn.start(WATCH, [("token", "t")], unary=False)
    watch.write(b"one")
    watch.write(b"two")
    assert watch.stream_id == 0  # waiting: not on the wire yet
    await delivered(peer)
    assert sorted(peer.headers) == [1]
    await answer(peer, 1, pending, b"y")
    await delivered(peer)
    assert watch.stream_id == 3
    assert peer.header(3)[b"token"] == b"t"
    assert b"grpc-timeout" not in peer.header(3)
    assert peer.messages(3) == [b"one", b"two"]
    assert peer.ended == {1}  # the watch's request side stays open
    peer.conn.send_headers(3, OK_HEADERS)
    peer.conn.send_data(3, prefixed(b"event"))
    peer.send()
    assert await asyncio.wait_for(watch.read(), 1) == b"event"


async def test_a_call_that_waited_tells_etcd_the_time_it_has_left() -> None:
    conn, peer = limited(1)
    blocker = call(conn)
    await settle()
    waiting = call(conn, b"y")
    await asyncio.sleep(0.3)
    peer.receive()
    peer.respond(1, b"done")
    await asyncio.wait_for(blocker, 1)
    await delivered(peer)
    left = int(peer.header(3)[b"grpc-timeout"].removesuffix(b"m"))
    assert 4000 < left <= 4700
    await answer(peer, 3, waiting, b"done too")


async def test_a_call_that_times_out_waiting_for_a_stream_is_never_sent() -> None:
    conn, peer = limited(1)
    blocker = call(conn)
    await settle()
    late = asyncio.create_task(conn.unary(RANGE, b"late", [], 0.05))
    after = call(conn, b"after")
    error = await failed(late, StatusCode.DEADLINE_EXCEEDED)
    assert "not sent: etcd allows 1 streams at once" in error.details()
    await settle()
    peer.pump()  # the probe ping after a timeout, answered: the member is alive
    await answer(peer, 1, blocker, b"done")
    await delivered(peer)
    assert sorted(peer.headers) == [1, 3]
    assert peer.messages(3) == [b"after"]  # the timed-out call never went
    assert peer.resets == {}
    await answer(peer, 3, after, b"after answer")
    assert conn.usable


async def test_cancelling_a_waiting_call_takes_it_out_of_the_line() -> None:
    conn, peer = limited(1)
    blocker = call(conn)
    await settle()
    cancelled = call(conn, b"cancelled")
    after = call(conn, b"after")
    await settle()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    peer.receive()
    peer.respond(1, b"done")
    await asyncio.wait_for(blocker, 1)
    await delivered(peer)
    assert peer.messages(3) == [b"after"]
    assert peer.resets == {}
    await answer(peer, 3, after, b"after answer")


async def test_a_higher_limit_from_etcd_opens_the_waiting_calls() -> None:
    conn, peer = limited(1)
    tasks = [asyncio.create_task(conn.unary(RANGE, b"%d" % i, [], 5.0)) for i in range(3)]
    await delivered(peer)
    assert sorted(peer.headers) == [1]
    peer.conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 10})
    peer.send()
    await delivered(peer)
    assert sorted(peer.headers) == [1, 3, 5]
    for stream_id in (1, 3, 5):
        peer.respond(stream_id, b"answer")
    assert await asyncio.gather(*tasks) == [b"answer"] * 3


async def test_waiting_calls_fail_as_never_sent_on_goaway_or_a_lost_connection() -> None:
    conn, peer = limited(1)
    taken = call(conn, b"taken")
    await settle()
    waiting = asyncio.create_task(conn.unary(TXN, b"a write", [], 5.0))
    watch = conn.start(WATCH, [], unary=False)
    await delivered(peer)
    peer.conn.close_connection(last_stream_id=1)
    peer.send()
    for error in (await failure(waiting), await failure(watch.read())):
        assert error.code() == StatusCode.UNAVAILABLE
        assert "GOAWAY" in error.details()
        assert error.unprocessed  # etcd never saw them: the channel sends them elsewhere
    assert sorted(peer.headers) == [1]
    await settle()
    assert not taken.done()  # etcd took it: it may still answer (the GOAWAY tests)
    assert list(conn.calls) == [1]
    taken.cancel()

    conn, peer = limited(1)
    first = call(conn, b"first")
    await settle()
    second = asyncio.create_task(conn.unary(TXN, b"a write", [], 5.0))
    await settle()
    conn.connection_lost(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
    assert not (await failure(first)).unprocessed  # sent: etcd may have applied it
    lost = await failure(second)
    assert lost.code() == StatusCode.UNAVAILABLE
    assert "reset by peer" in lost.details()
    assert lost.unprocessed


async def test_until_etcd_says_its_limit_100_streams_are_assumed() -> None:
    conn = Connection(MEMBER, 5.0, 10.0)
    transport = Transport()
    conn.connection_made(transport)
    calls = [conn.start(RANGE, [], unary=True) for _ in range(101)]
    assert len(conn.calls) == 100
    assert calls[-1].stream_id == 0
    conn.data_received(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # SETTINGS naming no limit
    assert len(conn.calls) == 101  # then there is none
    assert calls[-1].stream_id == 201
    assert [conn.start(RANGE, [], unary=True).stream_id for _ in range(200)][-1] == 601


# -- the connection failing ------------------------------------------------------------------


class _GrpcServerStateMachine(h2.connection.H2ConnectionStateMachine):
    """h2's server closes itself on sending GOAWAY; grpc-go's goes on serving the calls it
    took (and pings), which is what etcd does."""

    def process_input(self, input_: h2.connection.ConnectionInputs) -> list[h2.events.Event]:
        if (
            input_ is h2.connection.ConnectionInputs.SEND_GOAWAY
            and self.state is h2.connection.ConnectionState.SERVER_OPEN
        ):
            return []
        return super().process_input(input_)


def draining_peer() -> tuple[Connection, Peer]:
    conn, peer = make()
    state = peer.conn.state_machine.state
    peer.conn.state_machine = _GrpcServerStateMachine()
    peer.conn.state_machine.state = state
    return conn, peer


async def test_goaway_fails_the_calls_etcd_did_not_take_and_drains_the_rest() -> None:
    conn, peer = draining_peer()
    unary = call(conn)
    await settle()
    watch = conn.start(WATCH, [], unary=False)
    watch.write(b"watch")
    await delivered(peer)
    assert conn.usable
    # etcd took stream 1 (the unary call), not stream 3 (the watch).
    peer.conn.close_connection(last_stream_id=1)
    peer.send()
    error = await failed(watch.read(), StatusCode.UNAVAILABLE)
    assert "GOAWAY" in error.details()
    assert error.unprocessed  # never seen by etcd: safe to send again
    assert not conn.usable
    with pytest.raises(RpcError, match="GOAWAY") as refused:
        conn.start(RANGE, [], unary=True)
    assert refused.value.unprocessed
    # The call etcd took still gets its answer (h2 alone would refuse every frame now),
    # then the drained connection is closed.
    assert not unary.done()
    assert not peer.transport.closed
    await answer(peer, 1, unary, b"answer")
    assert peer.transport.closed
    assert not peer.transport.aborted


async def test_graceful_goaway_and_ping_keep_calls_going() -> None:
    # grpc-go's graceful stop: GOAWAY naming the highest stream id, and a PING in the same
    # read. Nothing fails; the PING is answered.
    conn, peer = draining_peer()
    unary = call(conn)
    await delivered(peer)
    peer.conn.close_connection(last_stream_id=2**31 - 1)
    peer.conn.ping(b"drain\0\0\0")
    peer.send()
    await settle()
    acks = [
        e
        for e in peer.conn.receive_data(peer.transport.take())
        if isinstance(e, h2.events.PingAckReceived)
    ]
    assert len(acks) == 1
    assert not unary.done()
    assert not conn.usable
    await answer(peer, 1, unary, b"answer")
    assert peer.transport.closed


async def test_an_answer_before_a_bad_frame_in_the_same_read_counts() -> None:
    # As it would had the bad frame come in the next read: the call answered before it is
    # answered, the others fail with the connection.
    conn, peer = make()
    first = call(conn, b"1")
    second = call(conn, b"2")
    await delivered(peer)
    peer.conn.send_headers(1, OK_HEADERS)
    peer.conn.send_data(1, prefixed(b"answer"))
    peer.trailers(1, 0)
    conn.data_received(peer.conn.data_to_send() + b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
    assert await asyncio.wait_for(first, 1) == b"answer"
    error = await failed(second, StatusCode.UNAVAILABLE)
    assert "HTTP/2 protocol error: DATA on stream 0" in error.details()
    assert peer.transport.aborted


async def test_bytes_h2_rejects_before_any_frame_say_not_http2() -> None:
    fresh = Connection(MEMBER, 5.0, 10.0)
    transport = Transport()
    fresh.connection_made(transport)
    task = asyncio.create_task(fresh.unary(RANGE, b"x", [], 5.0))
    await settle()
    fresh.data_received(b"\x00" * 9)  # a DATA frame on stream 0: no HTTP/2 server sends it
    error = await failed(task, StatusCode.UNAVAILABLE)
    assert "without answering in HTTP/2" in error.details()
    assert transport.aborted


@pytest.mark.parametrize(
    "replies",
    [
        pytest.param([b"HTTP/1.1 400 Bad Request\r\n\r\n"], id="http1-reply-then-close"),
        pytest.param([b"\x00" * 4, b"\x00" * 5], id="rejected-frame-in-two-reads"),
    ],
)
async def test_bytes_that_are_not_http2_before_any_frame_say_not_http2(
    replies: list[bytes],
) -> None:
    conn = Connection(MEMBER, 5.0, 10.0)
    transport = Transport()
    conn.connection_made(transport)
    task = call(conn)
    await settle()
    for data in replies:
        conn.data_received(data)
    conn.connection_lost(None)  # the server hangs up after its answer
    error = await failed(task, StatusCode.UNAVAILABLE)
    assert "without answering in HTTP/2" in error.details()


async def lost_before_any_bytes(member: Member = MEMBER) -> tuple[Connection, RpcError]:
    """A connection to `member` the server closes before sending a byte, with a call under way:
    the connection and the call's failure (UNAVAILABLE)."""
    conn = Connection(member, 5.0, 10.0)
    conn.connection_made(Transport())
    task = call(conn)
    await settle()
    conn.connection_lost(None)
    return conn, await failed(task, StatusCode.UNAVAILABLE)


async def test_connection_lost_before_any_bytes_says_not_http2_on_plaintext() -> None:
    conn, error = await lost_before_any_bytes()
    assert "without answering in HTTP/2" in error.details()
    assert not conn.usable
    await asyncio.wait_for(conn.wait_closed(), 1)


async def test_connection_lost_before_any_bytes_on_tls_is_no_plaintext_hint() -> None:
    member = Member("etcd.example", 2379, "etcd.example:2379", tls=ssl.create_default_context())
    _conn, error = await lost_before_any_bytes(member)
    assert "plaintext" not in error.details()
    assert "before answering" in error.details()


async def test_connection_lost_after_answering_in_http2_is_no_plaintext_hint() -> None:
    conn, _peer, task = await call_sent()
    conn.connection_lost(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
    error = await failed(task, StatusCode.UNAVAILABLE)
    assert "HTTP/2" not in error.details()
    assert "reset by peer" in error.details()
    await asyncio.wait_for(conn.wait_closed(), 1)


# -- pushed streaming calls (a Listener) and the end of a request side -----------------------


async def test_ending_a_streaming_call_after_its_messages_left_sends_an_empty_end() -> None:
    conn, peer = make()
    call = conn.start(WATCH, [], unary=False)
    call.write(b"one")
    await delivered(peer)
    assert peer.ended == set()
    call.end()
    call.end()  # once is enough
    await delivered(peer)
    assert peer.frames == [(1, 8, False), (1, 0, True)]
    assert peer.messages(1) == [b"one"]
    assert peer.ended == {1}
    with pytest.raises(RpcError, match="request side is closed"):
        call.write(b"late")
    peer.respond(1, b"answer")
    assert await asyncio.wait_for(call.read(), 1) == b"answer"
    assert await call.read() is None
    assert conn.calls == {}


class Recorder:
    """A transport.Listener that keeps what it is given."""

    def __init__(self) -> None:
        self.found: list[bytes] = []
        self.ends: list[RpcError | None] = []

    def messages(self, found: list[bytes]) -> None:
        self.found += found

    def ended(self, error: RpcError | None) -> None:
        self.ends.append(error)


async def test_a_listener_is_pushed_each_message_as_read_and_the_end_once() -> None:
    conn, peer = make()
    listener = Recorder()
    call = conn.start(WATCH, [], unary=False, listener=listener)
    call.write(b"go")
    await delivered(peer)
    peer.conn.send_headers(1, OK_HEADERS)
    peer.conn.send_data(1, prefixed(b"one") + prefixed(b"two")[:4])
    peer.send()
    assert listener.found == [b"one"]  # at once, in the connection's own callback
    peer.conn.send_data(1, prefixed(b"two")[4:])
    peer.trailers(1, 0)
    peer.send()
    assert listener.found == [b"one", b"two"]
    assert listener.ends == [None]
    assert call.closed
    assert conn.calls == {}


async def test_a_listener_gets_the_messages_before_one_over_its_calls_own_limit() -> None:
    conn, peer = make()
    listener = Recorder()
    conn.start(WATCH, [], unary=False, listener=listener, max_message=10)
    other = conn.start(WATCH, [], unary=False)  # the connection's limit, 64 MiB
    await delivered(peer)
    for stream_id in (1, 3):
        peer.conn.send_headers(stream_id, OK_HEADERS)
        peer.conn.send_data(stream_id, prefixed(b"small") + prefixed(b"x" * 11))
    peer.send()
    assert listener.found == [b"small"]
    [error] = listener.ends
    assert error is not None
    assert error.code() == StatusCode.RESOURCE_EXHAUSTED
    assert not error.answered  # this client's verdict, not etcd's status
    assert "11 bytes, larger than the 10 bytes" in error.details()
    assert [await other.read(), await other.read()] == [b"small", b"x" * 11]
    assert await resets(peer) == {1: h2.errors.ErrorCodes.CANCEL}


async def test_a_call_that_does_not_drain_fails_at_a_goaway_that_took_it() -> None:
    conn, peer = draining_peer()
    listener = Recorder()
    conn.start(WATCH, [], unary=False, listener=listener, drains=False)
    watch = conn.start(WATCH, [], unary=False)
    watch.write(b"watch")
    await delivered(peer)
    peer.conn.close_connection(last_stream_id=3)  # etcd took both
    peer.send()
    [error] = listener.ends
    assert error is not None
    assert error.code() == StatusCode.UNAVAILABLE
    assert "GOAWAY" in error.details()
    assert not error.unprocessed  # etcd took it: its requests may have been served
    assert await resets(peer) == {1: h2.errors.ErrorCodes.CANCEL}
    assert list(conn.calls) == [3]  # the watch drains as before
    peer.conn.send_headers(3, OK_HEADERS)
    peer.conn.send_data(3, prefixed(b"event"))
    peer.send()
    assert await asyncio.wait_for(watch.read(), 1) == b"event"


async def test_etcds_own_status_is_marked_answered() -> None:
    conn, peer = make()
    listener = Recorder()
    conn.start(WATCH, [("token", "stale")], unary=False, listener=listener)
    await delivered(peer)
    peer.conn.send_headers(
        1, [*OK_HEADERS, (b"grpc-status", b"16"), (b"grpc-message", b"no")], end_stream=True
    )
    peer.send()
    [error] = listener.ends
    assert error is not None
    assert error.code() == StatusCode.UNAUTHENTICATED
    assert error.answered


# -- Channel, on real loopback sockets -------------------------------------------------------


class Site:
    """A tiny etcd stand-in on a loopback port: HTTP/2 server side, answering each unary call
    with its name, a colon and the request message."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.connections = 0
        self.going_away = False  # answer the next request with GOAWAY, not taking it
        self.frozen = False  # read nothing, answer nothing (a SIGSTOPped etcd: the kernel ACKs)
        self.transports: list[asyncio.Transport] = []
        self.server: asyncio.Server | None = None
        self.member = Member("127.0.0.1", 0, "not started")  # what start() listens as

    async def start(self, port: int = 0) -> Member:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _SiteProtocol(self), "127.0.0.1", port)
        port = self.server.sockets[0].getsockname()[1]
        self.member = Member("127.0.0.1", port, f"127.0.0.1:{port}")
        return self.member

    def fin_now(self) -> None:
        """Send FIN on every connection at once, not with the loop's next turn."""
        for transport in self.transports:
            transport.get_extra_info("socket").shutdown(socket.SHUT_WR)

    def hang_up(self) -> None:
        for transport in self.transports:
            transport.close()
        self.transports.clear()

    async def stop(self) -> None:
        self.hang_up()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class _SiteProtocol(asyncio.Protocol):
    def __init__(self, site: Site) -> None:
        self.site = site
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.bodies: dict[int, bytearray] = {}
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.site.connections += 1
        self.site.transports.append(transport)
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        if self.site.frozen:
            return
        if self.conn.state_machine.state is h2.connection.ConnectionState.CLOSED:
            return  # went away
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived) and self.site.going_away:
                self.site.going_away = False
                self.conn.close_connection(last_stream_id=0)  # took nothing
                break
            if isinstance(event, h2.events.RequestReceived):
                assert event.stream_id is not None
                self.bodies[event.stream_id] = bytearray()
            elif isinstance(event, h2.events.DataReceived):
                assert event.stream_id is not None
                assert event.data is not None
                self.bodies[event.stream_id] += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                assert event.stream_id is not None
                body = bytes(self.bodies.pop(event.stream_id))
                answer = self.site.name + b":" + body[5:]
                self.conn.send_headers(event.stream_id, OK_HEADERS)
                self.conn.send_data(event.stream_id, prefixed(answer))
                self.conn.send_headers(event.stream_id, [(b"grpc-status", b"0")], end_stream=True)
        assert self.transport is not None
        self.transport.write(self.conn.data_to_send())


@pytest.fixture
async def sites() -> AsyncIterator[Callable[[bytes], Site]]:
    made: list[Site] = []

    def site(name: bytes) -> Site:
        made.append(Site(name))
        return made[-1]

    yield site
    for one in made:
        await one.stop()


# `a_b`: a channel over sites A and B, and the two sites.
AB = tuple[Channel, Site, Site]
OverAB = Callable[..., AbstractAsyncContextManager[AB]]


@pytest.fixture
def a_b(sites: Callable[[bytes], Site], monkeypatch: pytest.MonkeyPatch) -> OverAB:
    """Two sites, A and B, and a channel over them in that order, closed on the way out:
    `call_timeout` is its calls' timeout, `probe` (if set) its probe ping's (PROBE_TIMEOUT)."""

    @contextlib.asynccontextmanager
    async def over(call_timeout: float = 1.0, probe: float | None = None) -> AsyncIterator[AB]:
        if probe is not None:
            monkeypatch.setattr(transport_module, "PROBE_TIMEOUT", probe)
        a, b = sites(b"A"), sites(b"B")
        async with opened([await a.start(), await b.start()], call_timeout) as channel:
            yield channel, a, b

    return over


@contextlib.asynccontextmanager
async def opened(members: list[Member], call_timeout: float = 1.0) -> AsyncIterator[Channel]:
    """A channel over `members`, closed on the way out."""
    channel = Channel(members, call_timeout)
    try:
        yield channel
    finally:
        await channel.close()


def dead_member(port: int) -> Member:
    return Member("127.0.0.1", port, f"127.0.0.1:{port}")


async def test_channel_skips_a_refused_member_and_calls_the_next(
    unused_tcp_port_factory: Callable[[], int], sites: Callable[[bytes], Site]
) -> None:
    live = sites(b"B")
    async with opened([dead_member(unused_tcp_port_factory()), await live.start()]) as channel:
        assert await channel.unary(RANGE, b"hello", []) == b"B:hello"
        assert await channel.unary(RANGE, b"again", []) == b"B:again"
        assert live.connections == 1  # one connection, many calls


async def test_channel_fails_fast_while_backing_off_then_tries_again(
    unused_tcp_port_factory: Callable[[], int], sites: Callable[[bytes], Site]
) -> None:
    ports = [unused_tcp_port_factory(), unused_tcp_port_factory()]
    async with opened([dead_member(p) for p in ports]) as channel:
        first = await failure(channel.unary(RANGE, b"x", []))
        assert first.code() == StatusCode.UNAVAILABLE
        assert first.details().count("connection refused") == 2
        assert f"127.0.0.1:{ports[0]}" in first.details()
        assert f"127.0.0.1:{ports[1]}" in first.details()

        # Something listens now, but the channel is backing off: it does not even try.
        site = sites(b"A")
        await site.start(ports[0])
        start = asyncio.get_running_loop().time()
        second = await failure(channel.unary(RANGE, b"x", []))
        assert asyncio.get_running_loop().time() - start < 0.1
        assert second.code() == StatusCode.UNAVAILABLE
        assert second.details() == first.details()
        await asyncio.sleep(0.01)
        assert site.connections == 0

        await asyncio.sleep(0.25)  # past the first backoff, 0.2 s
        assert await channel.unary(RANGE, b"x", []) == b"A:x"
        assert site.connections == 1


async def test_channel_backoff_doubles_while_members_keep_refusing(
    unused_tcp_port_factory: Callable[[], int], sites: Callable[[bytes], Site]
) -> None:
    port = unused_tcp_port_factory()
    async with opened([dead_member(port)]) as channel:
        first = await failure(channel.unary(RANGE, b"x", []))
        await asyncio.sleep(0.25)  # past 0.2 s: tried again, refused again
        second = await failure(channel.unary(RANGE, b"x", []))
        assert second is not first
        assert "connection refused" in second.details()

        site = sites(b"A")
        await site.start(port)
        await asyncio.sleep(0.25)  # not yet past 0.4 s
        assert await failure(channel.unary(RANGE, b"x", [])) is second
        await asyncio.sleep(0.01)
        assert site.connections == 0
        await asyncio.sleep(0.2)  # past 0.4 s
        assert await channel.unary(RANGE, b"x", []) == b"A:x"


async def test_channel_after_losing_a_connection_starts_with_the_next_member(a_b: OverAB) -> None:
    async with a_b() as (channel, a, b):
        assert await channel.unary(RANGE, b"1", []) == b"A:1"
        conn = await channel.connection()
        a.hang_up()
        await asyncio.wait_for(conn.wait_closed(), 1)
        assert not conn.usable
        assert await channel.unary(RANGE, b"2", []) == b"B:2"  # A still listens
        conn = await channel.connection()
        b.hang_up()
        await asyncio.wait_for(conn.wait_closed(), 1)
        assert await channel.unary(RANGE, b"3", []) == b"A:3"  # round again
        assert (a.connections, b.connections) == (2, 1)


async def test_channel_sends_a_call_etcd_did_not_take_again_on_a_new_connection(
    a_b: OverAB,
) -> None:
    # As gRPC's transparent retry: a GOAWAY that says etcd took no call means even a write
    # is safe to send again, so the caller sees no error.
    async with a_b() as (channel, a, b):
        assert await channel.unary(RANGE, b"1", []) == b"A:1"
        a.going_away = True
        assert await channel.unary(RANGE, b"2", []) == b"B:2"
        assert (a.connections, b.connections) == (1, 1)


async def test_channel_moves_off_a_frozen_member_within_the_probe_and_sends_a_read_again(
    a_b: OverAB,
) -> None:
    # A SIGSTOPped etcd (its raft leader, say): TCP is still up, nothing answers. The read that
    # timed out is sent again to the next member once the probe ping went unanswered; the
    # connection is dropped after the probe's second, not after a whole timeout more.
    loop = asyncio.get_running_loop()
    async with a_b(call_timeout=0.3, probe=0.05) as (channel, a, b):
        assert await channel.unary(RANGE, b"1", [], idempotent=True) == b"A:1"
        a.frozen = True
        start = loop.time()
        assert await channel.unary(RANGE, b"2", [], idempotent=True) == b"B:2"
        assert loop.time() - start < 0.3 + 0.05 + 0.2
        assert (a.connections, b.connections) == (1, 1)


async def test_channel_does_not_send_a_write_again_after_a_timeout(a_b: OverAB) -> None:
    # A write that timed out may yet be applied (etcd may read it once it runs again): the
    # caller sees the timeout; the connection is still dropped, so the next call goes on.
    async with a_b(call_timeout=0.2, probe=0.05) as (channel, a, b):
        assert await channel.unary(TXN, b"1", []) == b"A:1"
        conn = await channel.connection()
        a.frozen = True
        await failed(channel.unary(TXN, b"2", []), StatusCode.DEADLINE_EXCEEDED)
        assert b.connections == 0
        await asyncio.wait_for(conn.wait_closed(), 1)
        assert "within 0.05s" in str(conn.broken)
        assert await channel.unary(TXN, b"3", []) == b"B:3"


async def test_channel_sends_a_read_again_when_the_probe_fails_its_connection_under_it(
    a_b: OverAB,
) -> None:
    # A write times out on a frozen member; a read sent while the probe ping is still out
    # goes to the same connection, and fails with it when the probe does: sent again to B.
    async with a_b(call_timeout=0.2, probe=0.1) as (channel, a, _b):
        assert await channel.unary(RANGE, b"1", [], idempotent=True) == b"A:1"
        a.frozen = True
        assert (await failure(channel.unary(TXN, b"w", []))).code() == StatusCode.DEADLINE_EXCEEDED
        assert (await channel.connection()).usable  # the probe is still out
        assert await channel.unary(RANGE, b"r", [], idempotent=True) == b"B:r"
        assert await channel.unary(TXN, b"2", []) == b"B:2"  # and writes go on there


async def test_channel_with_one_member_does_not_send_a_timed_out_read_again(
    sites: Callable[[bytes], Site], monkeypatch: pytest.MonkeyPatch
) -> None:
    # There is nowhere else to go: a second try would only double the caller's wait.
    monkeypatch.setattr(transport_module, "PROBE_TIMEOUT", 0.05)
    a = sites(b"A")
    async with opened([await a.start()], 0.2) as channel:
        assert await channel.unary(RANGE, b"1", [], idempotent=True) == b"A:1"
        a.frozen = True
        await failed(channel.unary(RANGE, b"2", [], idempotent=True), StatusCode.DEADLINE_EXCEEDED)
        assert a.connections == 1


async def test_member_mute_tells_a_frozen_member_from_a_live_or_a_stopped_one(
    unused_tcp_port_factory: Callable[[], int], sites: Callable[[bytes], Site]
) -> None:
    live, frozen = sites(b"A"), sites(b"B")
    live_member, frozen_member = await live.start(), await frozen.start()
    frozen.frozen = True
    stopped = dead_member(unused_tcp_port_factory())  # refuses: down, not frozen
    loop = asyncio.get_running_loop()
    start = loop.time()
    mute = await asyncio.gather(
        *(member_mute(m, STATUS, b"", [], 0.2) for m in (live_member, frozen_member, stopped))
    )
    assert mute == [False, True, False]
    assert loop.time() - start < 0.2 + 0.2  # asked at once, each within the limit
    await until(lambda: not live.transports or all(t.is_closing() for t in live.transports), noop)


async def test_channel_leaves_a_member_found_mute_and_its_watch_fails_at_once(
    a_b: OverAB,
) -> None:
    async with a_b(call_timeout=5.0) as (channel, a, _b):
        assert await channel.unary(RANGE, b"1", []) == b"A:1"
        watch = await channel.stream(WATCH, [])
        channel.leave(["somewhere-else:2379"])
        assert (await channel.connection()).usable
        channel.leave([a.member.authority])
        error = await failed(watch.read(), StatusCode.UNAVAILABLE, limit=0.5)
        assert "mute" in error.details()
        assert await channel.unary(RANGE, b"2", []) == b"B:2"


async def test_member_mute_is_not_a_host_that_does_not_answer_the_connect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Dead, cut off or paused host: as good as a machine that died with its etcd member, whose
    # units must move; only a member that accepts and then says nothing is held for.
    async def never(*_: Any) -> Any:
        await asyncio.sleep(10)

    monkeypatch.setattr(transport_module, "_tcp_connect", never)
    start = asyncio.get_running_loop().time()
    assert not await member_mute(dead_member(1), STATUS, b"", [], 0.1)
    assert asyncio.get_running_loop().time() - start < 0.5


async def test_channel_calls_elsewhere_once_the_loop_took_in_etcd_closing_an_idle_connection(
    a_b: OverAB,
) -> None:
    # etcd closes a connection with no call on it (a member stopping): the loop, running all
    # along, takes the FIN in as it arrives, and the next call goes to the next member. (The
    # channel does not look at the socket itself before each call: a loop run only during
    # calls is its driver's to keep running, tests/functional/fleet_helpers.py.)
    async with a_b() as (channel, a, _b):
        assert await channel.unary(RANGE, b"1", []) == b"A:1"
        conn = await channel.connection()
        a.fin_now()
        await asyncio.wait_for(conn.wait_closed(), 1)
        assert not conn.usable
        assert await channel.unary(RANGE, b"2", []) == b"B:2"


async def test_closed_channel_refuses_calls(sites: Callable[[bytes], Site]) -> None:
    site = sites(b"A")
    channel = Channel([await site.start()], 1.0)
    assert await channel.unary(RANGE, b"x", []) == b"A:x"
    watch = await channel.stream(WATCH, [])
    await channel.close()
    await failed(watch.read(), StatusCode.CANCELLED)
    await failed(channel.unary(RANGE, b"x", []), StatusCode.CANCELLED)


async def test_channel_refused_on_a_name_with_two_addresses_says_connection_refused(
    unused_tcp_port_factory: Callable[[], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As "localhost" resolving to both ::1 and 127.0.0.1: here 127.0.0.1 and 127.0.0.2.
    loop = asyncio.get_running_loop()

    async def getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        assert host == "etcd.local"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))
            for address in ("127.0.0.1", "127.0.0.2")
        ]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    port = unused_tcp_port_factory()
    channel = Channel([Member("etcd.local", port, f"etcd.local:{port}")], 1.0)
    error = await failed(channel.unary(RANGE, b"x", []), StatusCode.UNAVAILABLE)
    assert "connection refused" in error.details()


async def test_each_member_is_connected_to_with_its_own_tls_server_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What the certificate is checked against, member by member; plaintext has none.
    loop = asyncio.get_running_loop()
    seen: list[tuple[str, Any, Any]] = []

    async def create_connection(_: Any, host: str, port: int, **kw: Any) -> Any:
        seen.append((host, kw["ssl"] is not None, kw["server_hostname"]))
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")

    monkeypatch.setattr(loop, "create_connection", create_connection)
    tls = ssl.create_default_context()
    members = [Member(h, 2379, f"{h}:2379", tls, h) for h in ("etcd-a", "etcd-b", "10.0.0.3")]
    await failed(
        transport_module.connect_first(members, 1, noop_protocol, 1.0), StatusCode.UNAVAILABLE
    )
    assert seen == [
        ("etcd-b", True, "etcd-b"),
        ("10.0.0.3", True, "10.0.0.3"),
        ("etcd-a", True, "etcd-a"),
    ]
    seen.clear()
    plain = Member("etcd-a", 2379, "etcd-a:2379", None, "etcd-a")
    await failed(
        transport_module.connect_first([plain], 0, noop_protocol, 1.0), StatusCode.UNAVAILABLE
    )
    assert seen == [("etcd-a", False, None)]


def noop_protocol(_: Member) -> asyncio.Protocol:
    return asyncio.Protocol()


# -- connect_error, status_error -------------------------------------------------------------


def test_connect_error_words() -> None:
    refused = connect_error(MEMBER, ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert refused.code() == StatusCode.UNAVAILABLE
    assert refused.details() == "127.0.0.1:2379: connection refused"
    timed_out = connect_error(MEMBER, TimeoutError())
    assert timed_out.code() == StatusCode.UNAVAILABLE
    assert "timed out" in timed_out.details()
    assert "127.0.0.1:2379" in timed_out.details()
    unreachable = connect_error(MEMBER, OSError(errno.EHOSTUNREACH, "No route to host"))
    assert unreachable.details() == "127.0.0.1:2379: No route to host"
    hostname = ssl.SSLCertVerificationError("certificate verify failed")
    hostname.verify_code = 62
    assert "hostname verification failed" in connect_error(MEMBER, hostname).details()


def test_status_error() -> None:
    assert status_error([(b":status", b"200"), (b"grpc-status", b"0")]) is None
    assert status_error([(b":status", b"200"), (b"content-type", b"application/grpc")]) is None
    assert status_error([]) is None
    error = status_error([(b"grpc-status", b"5"), (b"grpc-message", b"key%20not%20found")])
    assert error is not None
    assert error.code() == StatusCode.NOT_FOUND
    assert error.details() == "key not found"
    unknown = status_error([(b"grpc-status", b"99")])
    assert unknown is not None
    assert unknown.code() == StatusCode.UNKNOWN
    http = status_error([(b":status", b"404")])
    assert http is not None
    assert http.code() == StatusCode.UNAVAILABLE
    assert "HTTP 404" in http.details()
    # Also the exception's own words, as logged.
    assert str(RpcError(StatusCode.UNAVAILABLE, "gone")) == "UNAVAILABLE: gone"
