"""The lease keepalive stream (fleetd/etcd/keepalive.py) against an in-memory HTTP/2 peer.

The stream is a streaming call on a transport.Connection of its own; the peer is h2's own
server side on that connection, driven by the test: it sees exactly the bytes the connection
writes and answers with the frames etcd would send (or would not). Against a real etcd the
stream is covered by tests/integration/test_kv_contract.py (plain, TLS, auth, outages).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from fleetd.errors import RegistryUnavailable
from fleetd.etcd import keepalive
from fleetd.etcd.etcdpb import rpc
from fleetd.etcd.keepalive import PATH, KeepAliveStream, open_stream
from fleetd.etcd.transport import Connection, Member, RpcError, StatusCode
from tests.unit.memory_transport import Transport, h2_server


class Peer:
    """etcd's side of the connection: an h2 server the test answers through."""

    def __init__(self, conn: Connection, window: int | None = None) -> None:
        self.client = conn
        self.transport = Transport()
        self.conn = h2_server(window)
        self.stream_id = 0
        self.headers: dict[bytes, bytes] = {}
        self.requests: list[int] = []
        self.ended = False
        self._inbox = bytearray()
        conn.connection_made(self.transport)
        self.pump()

    def pump(self) -> None:
        """Deliver what the stream wrote to the peer, and the peer's pending frames back."""
        for event in self.conn.receive_data(self.transport.take()):
            if isinstance(event, h2.events.RequestReceived):
                self.stream_id = event.stream_id
                self.headers = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self._inbox += event.data
                while len(self._inbox) >= 5:
                    _, n = struct.unpack(">BI", self._inbox[:5])
                    if len(self._inbox) < 5 + n:
                        break
                    body = bytes(self._inbox[5 : 5 + n])
                    del self._inbox[: 5 + n]
                    self.requests.append(int(rpc.LeaseKeepAliveRequest.FromString(body).ID))
            elif isinstance(event, h2.events.StreamEnded):
                self.ended = True
        self.deliver(self.conn.data_to_send())

    def deliver(self, data: bytes, chunk: int = 0) -> None:
        if not data:
            return
        if chunk <= 0:
            self.client.data_received(data)
            return
        for i in range(0, len(data), chunk):
            self.client.data_received(data[i : i + chunk])

    def respond_headers(self) -> None:
        self.conn.send_headers(
            self.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")]
        )

    def answer(self, lease: int, ttl: int, chunk: int = 0) -> None:
        body = rpc.LeaseKeepAliveResponse(ID=lease, TTL=ttl).SerializeToString()
        self.conn.send_data(self.stream_id, struct.pack(">BI", 0, len(body)) + body)
        self.deliver(self.conn.data_to_send(), chunk)


MEMBER = Member("127.0.0.1", 2379, "127.0.0.1:2379")


async def make(
    window: int | None = None, answer_within: float = 5.0
) -> tuple[KeepAliveStream, Peer]:
    """A stream on a connection to the peer, its request headers read by the peer; each
    answer due within `answer_within` seconds."""
    conn = keepalive.connection(MEMBER, answer_within)
    peer = Peer(conn, window)
    stream = KeepAliveStream(conn, "tok", answer_within)
    await settle()
    peer.pump()
    return stream, peer


async def settle() -> None:
    """Let call_soon callbacks (the connection's batched flush) run."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_request_is_a_grpc_call_with_the_token() -> None:
    stream, peer = await make()
    assert peer.headers[b":path"] == PATH
    assert peer.headers[b":method"] == b"POST"
    assert peer.headers[b"content-type"] == b"application/grpc"
    assert peer.headers[b"te"] == b"trailers"
    assert peer.headers[b"token"] == b"tok"
    assert peer.headers[b":authority"] == b"127.0.0.1:2379"
    assert stream.usable


async def test_the_streams_connection_is_its_own_and_never_pings() -> None:
    # Its answers are its liveness check (the answer timeout); a ping every 10 s on every
    # machine's keepalive connection would only add traffic to etcd's.
    stream, peer = await make()
    assert stream.conn.ping_interval is None
    assert list(stream.conn.calls) == [peer.stream_id]
    assert stream.conn._ping_timer is None


async def test_answers_matched_by_lease_in_order_even_split_byte_by_byte() -> None:
    stream, peer = await make()
    first = stream.send(7)
    second = stream.send(8)
    again = stream.send(7)
    await settle()
    peer.pump()
    assert peer.requests == [7, 8, 7]
    peer.respond_headers()
    peer.answer(8, 9, chunk=1)  # etcd answers in order; matching is still by lease id
    peer.answer(7, 10, chunk=1)
    peer.answer(7, 0, chunk=1)  # expired meanwhile: TTL 0, not an error
    assert (await second, await first, await again) == (9, 10, 0)
    assert not stream.waiting


async def test_keepalives_of_one_loop_iteration_leave_in_one_write() -> None:
    stream, peer = await make()
    peer.pump()  # the stream's acknowledgement of the peer's settings
    futures = [stream.send(lease) for lease in range(1, 51)]
    assert peer.transport.written == []  # nothing yet: flushed once, after this iteration
    await settle()
    assert len(peer.transport.written) == 1
    peer.pump()
    assert peer.requests == list(range(1, 51))
    for f in futures:
        f.cancel()


async def test_refused_stream_raises_the_grpc_status_for_etcdkv_to_map() -> None:
    stream, peer = await make()
    pending = stream.send(7)
    await settle()
    peer.pump()
    # A trailers-only answer, as etcd gives a stream it refuses.
    peer.conn.send_headers(
        peer.stream_id,
        [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", b"16"),
            (b"grpc-message", b"etcdserver: invalid auth token%21"),
        ],
        end_stream=True,
    )
    peer.deliver(peer.conn.data_to_send())
    with pytest.raises(RpcError) as caught:
        await pending
    assert caught.value.code() == StatusCode.UNAUTHENTICATED
    assert caught.value.details() == "etcdserver: invalid auth token!"
    assert not stream.usable
    assert peer.transport.aborted
    with pytest.raises(RpcError):
        await stream.send(8)  # a broken stream fails at once


async def test_stream_ended_by_etcd_fails_the_waiters() -> None:
    stream, peer = await make()
    pending = stream.send(7)
    await settle()
    peer.pump()
    peer.respond_headers()
    peer.conn.send_headers(peer.stream_id, [(b"grpc-status", b"0")], end_stream=True)
    peer.deliver(peer.conn.data_to_send())
    with pytest.raises(RegistryUnavailable, match="etcd ended the stream"):
        await pending


async def test_goaway_fails_the_stream_so_the_next_keepalive_opens_another() -> None:
    stream, peer = await make()
    pending = stream.send(7)
    await settle()
    peer.pump()
    peer.respond_headers()
    peer.conn.close_connection(last_stream_id=peer.stream_id)
    peer.deliver(peer.conn.data_to_send())
    with pytest.raises(RegistryUnavailable, match="going away"):
        await pending
    assert not stream.usable
    assert peer.transport.aborted


async def test_an_oversized_answer_fails_the_stream_after_the_answers_before_it() -> None:
    stream, peer = await make()
    first, second = stream.send(7), stream.send(8)
    await settle()
    peer.pump()
    peer.respond_headers()
    body = rpc.LeaseKeepAliveResponse(ID=7, TTL=30).SerializeToString()
    # An answer, then the prefix of one of 1 MiB: refused on its prefix, nothing waited for.
    data = struct.pack(">BI", 0, len(body)) + body + struct.pack(">BI", 0, 1 << 20) + b"x" * 100
    peer.conn.send_data(peer.stream_id, data)
    peer.deliver(peer.conn.data_to_send())
    assert await first == 30
    with pytest.raises(RegistryUnavailable, match="a message of 1048576 bytes, larger than"):
        await second
    assert peer.transport.aborted


async def test_flow_control_holds_requests_until_the_window_opens() -> None:
    # Each request is 5 bytes of prefix and 2-3 of protobuf: a 20-byte window takes 2.
    stream, peer = await make(window=20)
    peer.pump()  # the peer's settings reach the stream, which acknowledges them
    peer.pump()
    futures = [stream.send(lease) for lease in (1, 2, 3, 4)]
    await settle()
    peer.pump()
    assert peer.requests == [1, 2]  # the third would not fit; it waits, nothing is dropped
    peer.conn.increment_flow_control_window(1000, stream_id=peer.stream_id)
    peer.deliver(peer.conn.data_to_send())
    peer.pump()
    assert peer.requests == [1, 2, 3, 4]
    for f in futures:
        f.cancel()


async def test_an_overdue_answer_breaks_the_stream_as_timed_out() -> None:
    stream, peer = await make(answer_within=0.05)
    answered = stream.send(7)
    await settle()
    peer.pump()
    peer.respond_headers()
    peer.answer(7, 10)
    assert await answered == 10  # answered in time: no timeout later
    await asyncio.sleep(0.1)
    assert stream.broken is None
    mute = stream.send(8)
    with pytest.raises(RegistryUnavailable, match=r"no answer within 0\.05s"):
        await asyncio.wait_for(mute, 2)
    assert stream.timed_out
    assert peer.transport.aborted


async def test_half_close_ends_the_request_stream_after_what_was_queued() -> None:
    stream, peer = await make()
    pending = stream.send(7)
    stream.half_close()
    assert not stream.usable
    await settle()
    peer.pump()
    assert peer.requests == [7]
    assert peer.ended
    peer.respond_headers()
    peer.answer(7, 10)
    assert await pending == 10


async def test_connection_lost_before_any_answer_hints_at_tls() -> None:
    conn = keepalive.connection(MEMBER, 5.0)
    conn.connection_made(Transport())
    stream = KeepAliveStream(conn, None, 5.0)
    pending = stream.send(7)
    conn.connection_lost(None)
    with pytest.raises(RegistryUnavailable, match="does it serve TLS"):
        await pending


async def test_open_stream_tries_the_members_in_order_and_says_why_none_answered(
    unused_tcp_port_factory: Any,
) -> None:
    dead = [Member("127.0.0.1", p, f"127.0.0.1:{p}") for p in (unused_tcp_port_factory(),) * 2]
    with pytest.raises(RegistryUnavailable, match="cannot connect") as caught:
        await open_stream(dead, 1, None, 1.0)
    assert str(caught.value).count("127.0.0.1:") == 2

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    live = Member("127.0.0.1", port, f"127.0.0.1:{port}")
    stream, index = await open_stream([dead[0], live], 0, None, 1.0)
    assert index == 1
    assert stream.member == live
    stream.close()
    server.close()
    await server.wait_closed()
