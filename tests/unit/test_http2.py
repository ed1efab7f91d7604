"""The HTTP/2 client framer (fleetd/etcd/http2.py) against an independent implementation.

Most tests connect a `ClientConnection` to h2's server side by hand, shuttling the bytes each
writes to the other. Cases h2 will not produce (padding, CONTINUATION, priorities, frames that
break the protocol) are built byte by byte with struct.
"""

from __future__ import annotations

import struct
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest

from fleetd.etcd.http2 import (
    CANCEL,
    DATA,
    GOAWAY,
    HEADERS,
    MAX_HEADER_LIST,
    PING_ACK,
    PREFACE,
    RESET,
    ClientConnection,
    ProtocolError,
    encode_headers,
    error_name,
    header_list_size,
)
from tests.unit.http2_frames import Flag, Type, frame
from tests.unit.memory_transport import h2_server

Event = tuple[Any, ...]
Headers = list[tuple[bytes, bytes]]

WINDOW = 1 << 20
REQUEST: Headers = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/etcdserverpb.KV/Range"),
    (b":authority", b"127.0.0.1:2379"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]
RESPONSE: Headers = [
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-encoding", b"identity"),
]
TRAILERS: Headers = [(b"grpc-status", b"0"), (b"grpc-message", b"all fine")]


def parse(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Frames as (type, flags, stream, payload); the bytes must hold whole frames only."""
    found = []
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack(">I", b"\0" + data[offset : offset + 3])
        kind, flags, stream = struct.unpack(">BBI", data[offset + 3 : offset + 9])
        found.append((kind, flags, stream, data[offset + 9 : offset + 9 + length]))
        offset += 9 + length
    assert offset == len(data)
    return found


def window_updates(data: bytes) -> dict[int, int]:
    """The WINDOW_UPDATE frames among `data`: increment by stream (0 the connection)."""
    updates: dict[int, int] = {}
    for kind, _, stream, payload in parse(data):
        if kind == Type.WINDOW_UPDATE:
            assert stream not in updates
            updates[stream] = struct.unpack(">I", payload)[0]
    return updates


def heard(window: int = WINDOW) -> ClientConnection:
    """A client that has heard an (empty) SETTINGS frame, with nothing left to send."""
    client = ClientConnection(window)
    assert client.receive(frame(Type.SETTINGS, 0, 0)) == []
    client.take()
    return client


class Pair:
    """Our client and h2's server, connected by hand. The server never acknowledges received
    data by itself, so our send windows only open when a test opens them."""

    def __init__(self, window: int = WINDOW) -> None:
        self.client = ClientConnection(window)
        self.server = h2_server()
        self.transcript = bytearray()  # every byte the server sent
        self.to_server()
        assert self.to_client() == []  # its SETTINGS, and the ACK of ours
        self.to_server()  # our ACK of its SETTINGS

    def to_server(self) -> list[h2.events.Event]:
        return self.server.receive_data(self.client.take())

    def to_client(self) -> list[Event]:
        data = self.server.data_to_send()
        self.transcript += data
        return self.client.receive(data)

    def request(self, headers: Headers = REQUEST, body: bytes = b"x") -> int:
        """A whole request, received by the server; returns its stream id."""
        stream = self.client.open_stream(encode_headers(headers))
        self.client.data(stream, body, end_stream=True)
        events = self.to_server()
        assert [type(e) for e in events] == [
            h2.events.RequestReceived,
            h2.events.DataReceived,
            h2.events.StreamEnded,
        ]
        return stream

    def answered(self) -> int:
        """A whole request and the server's response headers to it (not yet sent to the
        client); returns its stream id."""
        stream = self.request()
        self.server.send_headers(stream, RESPONSE)
        return stream

    def open(self, headers: Headers = REQUEST) -> int:
        """A stream with its request headers only (the client may still send DATA)."""
        stream = self.client.open_stream(encode_headers(headers))
        (event,) = self.to_server()
        assert isinstance(event, h2.events.RequestReceived)
        return stream


# -- the connection's start ---------------------------------------------------------------


def test_preface_and_settings_are_accepted_by_h2() -> None:
    client = ClientConnection(WINDOW)
    data = client.take()
    assert data.startswith(PREFACE)
    assert client.take() == b""
    server = h2_server()
    events = server.receive_data(data)
    assert [type(e) for e in events] == [
        h2.events.RemoteSettingsChanged,
        h2.events.WindowUpdated,
    ]
    assert server.remote_settings.initial_window_size == WINDOW
    assert server.remote_settings.enable_push == 0
    assert server.outbound_flow_control_window == WINDOW  # the connection's window, raised


def test_small_window_sends_no_connection_update() -> None:
    client = ClientConnection(1000)
    kinds = [kind for kind, _, _, _ in parse(client.take()[len(PREFACE) :])]
    assert kinds == [Type.SETTINGS]
    pair = Pair(1000)
    assert pair.server.remote_settings.initial_window_size == 1000
    assert pair.server.outbound_flow_control_window == 65_535
    stream = pair.open()
    assert pair.server.local_flow_control_window(stream) == 1000


def test_heard_only_after_server_settings() -> None:
    client = ClientConnection(WINDOW)
    client.take()
    server_settings = frame(Type.SETTINGS, 0, 0, struct.pack(">HI", 0x3, 100))
    assert client.receive(server_settings[:9]) == []
    assert not client.heard
    assert client.take() == b""
    assert client.receive(server_settings[9:]) == []
    assert client.heard
    assert parse(client.take()) == [(Type.SETTINGS, Flag.ACK, 0, b"")]


def test_settings_ack_is_not_a_first_settings() -> None:
    client = ClientConnection(WINDOW)
    with pytest.raises(ProtocolError, match="SETTINGS"):
        client.receive(frame(Type.SETTINGS, Flag.ACK, 0))


@pytest.mark.parametrize(
    "first",
    [
        frame(Type.PING, 0, 0, b"12345678"),
        frame(Type.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)),
        frame(Type.HEADERS, Flag.END_HEADERS, 1, b"\x88"),
    ],
)
def test_first_frame_must_be_settings(first: bytes) -> None:
    client = ClientConnection(WINDOW)
    with pytest.raises(ProtocolError):
        client.receive(first + frame(Type.SETTINGS, 0, 0))
    assert not client.heard


def test_http1_reply_fails_at_once() -> None:
    client = ClientConnection(WINDOW)
    with pytest.raises(ProtocolError, match="frame of"):
        client.receive(b"HTTP/1.1 400 Bad Request\r\n\r\n")


def test_server_settings_are_acknowledged_through_h2() -> None:
    client = ClientConnection(WINDOW)
    server = h2_server()
    server.receive_data(client.take())
    assert client.receive(server.data_to_send()) == []
    acks = [f for f in parse(client.take()) if f[0] == Type.SETTINGS]
    assert acks == [(Type.SETTINGS, Flag.ACK, 0, b"")]
    # h2 changes its settings only when they are acknowledged: the ACK reached it.
    server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 7})
    client.receive(server.data_to_send())
    events = server.receive_data(client.take())
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in events)
    assert server.local_settings.max_concurrent_streams == 7
    assert client.max_streams == 7


def test_max_streams_is_assumed_until_the_server_says() -> None:
    client = ClientConnection(WINDOW)
    assert client.max_streams == 100  # as grpc-go's client assumes before the SETTINGS
    client.receive(frame(Type.SETTINGS, 0, 0, struct.pack(">HI", 0x4, 1000)))
    assert client.max_streams == 2**32 - 1  # SETTINGS that name no limit: there is none
    client.receive(frame(Type.SETTINGS, 0, 0, struct.pack(">HI", 0x3, 3)))
    assert client.max_streams == 3
    client.receive(frame(Type.SETTINGS, 0, 0, struct.pack(">HI", 0x4, 1000)))
    assert client.max_streams == 3  # later SETTINGS without it leave it
    limited = ClientConnection(WINDOW)
    limited.receive(frame(Type.SETTINGS, 0, 0, struct.pack(">HI", 0x3, 0)))
    assert limited.max_streams == 0


# -- encoding request headers --------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 126, 127, 128, 300, 16_511, 20_000])
def test_encode_headers_round_trip(length: int) -> None:
    headers: Headers = [
        *REQUEST,
        (b":scheme", b"https"),
        (b"token", b"t" * length),
        (b"hasleader", b"true"),
        (b"user-agent", b"fleetd/" + b"u" * length),
        (b"x" * max(length, 1), b"v"),
        (b"empty", b""),
    ]
    decoder = hpack.Decoder()
    decoder.max_header_list_size = 1 << 20
    assert decoder.decode(encode_headers(headers), raw=True) == headers
    assert len(decoder.header_table.dynamic_entries) == 0  # literals without indexing


def test_encode_headers_uses_static_table() -> None:
    block = encode_headers([(b":method", b"POST"), (b":scheme", b"http"), (b":scheme", b"https")])
    assert block == bytes([0x80 | 3, 0x80 | 6, 0x80 | 7])


def test_h2_receives_request() -> None:
    headers: Headers = [
        *((name, b"https" if name == b":scheme" else value) for name, value in REQUEST),
        (b"token", b"k" * 130),
        (b"hasleader", b"true"),
        (b"x-long", b"l" * 300),
        (b"x-empty", b""),
    ]
    pair = Pair()
    stream = pair.client.open_stream(encode_headers(headers))
    pair.client.data(stream, b"payload", end_stream=True)
    received, data, ended = pair.to_server()
    assert isinstance(received, h2.events.RequestReceived)
    assert received.stream_id == stream
    assert received.headers == headers
    assert isinstance(data, h2.events.DataReceived)
    assert (data.stream_id, data.data) == (stream, b"payload")
    assert isinstance(ended, h2.events.StreamEnded)
    assert ended.stream_id == stream


def test_request_with_end_stream_on_headers() -> None:
    pair = Pair()
    stream = pair.client.open_stream(encode_headers(REQUEST), end_stream=True)
    received, ended = pair.to_server()
    assert isinstance(received, h2.events.RequestReceived)
    assert isinstance(ended, h2.events.StreamEnded)
    assert received.stream_id == ended.stream_id == stream


def test_stream_ids_are_odd_and_increasing() -> None:
    pair = Pair()
    streams = [pair.request() for _ in range(4)]
    assert streams == [1, 3, 5, 7]
    assert pair.client.next_stream_id == 9


def test_large_header_block_uses_continuation() -> None:
    pair = Pair()
    headers = [*REQUEST, (b"token", b"t" * 40_000)]
    block = encode_headers(headers)
    stream = pair.client.open_stream(block)
    pair.client.data(stream, b"", end_stream=True)
    out = pair.client.take()
    frames = parse(out)
    assert [(k, f) for k, f, _, _ in frames] == [
        (Type.HEADERS, 0),
        (Type.CONTINUATION, 0),
        (Type.CONTINUATION, Flag.END_HEADERS),
        (Type.DATA, Flag.END_STREAM),
    ]
    assert all(s == stream for _, _, s, _ in frames)
    assert all(len(p) <= 16_384 for _, _, _, p in frames)
    assert b"".join(p for k, _, _, p in frames if k != Type.DATA) == block
    received, _, _ = pair.server.receive_data(out)
    assert isinstance(received, h2.events.RequestReceived)
    assert received.headers == headers


def test_large_header_block_with_end_stream() -> None:
    pair = Pair()
    headers = [*REQUEST, (b"token", b"t" * 20_000)]
    stream = pair.client.open_stream(encode_headers(headers), end_stream=True)
    received, ended = pair.to_server()
    assert isinstance(received, h2.events.RequestReceived)
    assert received.headers == headers
    assert isinstance(ended, h2.events.StreamEnded)
    assert ended.stream_id == stream


# -- responses -----------------------------------------------------------------------------


def respond(pair: Pair, stream: int, body: bytes = b"answer") -> None:
    pair.server.send_headers(stream, RESPONSE)
    pair.server.send_data(stream, body)
    pair.server.send_headers(stream, TRAILERS, end_stream=True)


def test_response_events() -> None:
    pair = Pair()
    stream = pair.request()
    respond(pair, stream)
    assert pair.to_client() == [
        (HEADERS, stream, RESPONSE, False),
        (DATA, stream, b"answer", False),
        (HEADERS, stream, TRAILERS, True),
    ]


def test_response_data_with_end_stream() -> None:
    pair = Pair()
    stream = pair.answered()
    pair.server.send_data(stream, b"a")
    pair.server.send_data(stream, b"b", end_stream=True)
    assert pair.to_client() == [
        (HEADERS, stream, RESPONSE, False),
        (DATA, stream, b"a", False),
        (DATA, stream, b"b", True),
    ]


def test_response_headers_through_dynamic_table() -> None:
    pair = Pair()
    first, second = pair.request(), pair.request()
    pair.server.send_headers(first, RESPONSE)
    pair.server.send_headers(second, RESPONSE)
    data = pair.server.data_to_send()
    blocks = [p for k, _, _, p in parse(data) if k == Type.HEADERS]
    assert len(blocks) == 2
    assert len(blocks[1]) < len(blocks[0])  # the second refers to the server's table
    assert pair.client.receive(data) == [
        (HEADERS, first, RESPONSE, False),
        (HEADERS, second, RESPONSE, False),
    ]


def test_bad_header_block() -> None:
    client = heard()
    client.open_stream(encode_headers(REQUEST))
    with pytest.raises(ProtocolError, match="header block"):
        client.receive(frame(Type.HEADERS, Flag.END_HEADERS, 1, b"\xff\xff\xff\xff"))


def test_input_one_byte_at_a_time() -> None:
    pair = Pair()
    streams = [pair.request(), pair.request()]
    for stream in streams:
        respond(pair, stream, b"b" * 100)
    pair.server.ping(b"pingping")
    whole = pair.to_client()
    assert len(whole) == 6
    transcript = bytes(pair.transcript)

    split = ClientConnection(WINDOW)
    split.take()
    events: list[Event] = []
    for i in range(len(transcript)):
        events += split.receive(transcript[i : i + 1])
    assert events == whole
    assert split.heard
    assert (Type.PING, Flag.ACK, 0, b"pingping") in parse(split.take())


# -- padding and CONTINUATION --------------------------------------------------------------


def test_padded_data() -> None:
    client = heard(1000)
    stream = client.open_stream(b"")
    client.take()
    payload = bytes([5]) + b"hello" + b"\0" * 5
    assert client.receive(frame(Type.DATA, Flag.PADDED | Flag.END_STREAM, stream, payload)) == [
        (DATA, stream, b"hello", True)
    ]
    # all of the frame counts for flow control, the padding too: 11 + 489 = 500
    assert client.receive(frame(Type.DATA, 0, stream, b"z" * 489)) == [
        (DATA, stream, b"z" * 489, False)
    ]
    assert window_updates(client.take()) == {0: 500, stream: 500}


def test_padding_only() -> None:
    client = heard()
    stream = client.open_stream(b"")
    payload = bytes([3]) + b"\0" * 3
    assert client.receive(frame(Type.DATA, Flag.PADDED, stream, payload)) == [
        (DATA, stream, b"", False)
    ]


def test_padded_headers_with_priority() -> None:
    client = heard()
    stream = client.open_stream(b"")
    block = hpack.Encoder().encode(RESPONSE)
    priority = struct.pack(">IB", 0x8000_0000 | 3, 200)
    payload = bytes([4]) + priority + block + b"\0" * 4
    flags = Flag.PADDED | Flag.PRIORITY | Flag.END_HEADERS
    assert client.receive(frame(Type.HEADERS, flags, stream, payload)) == [
        (HEADERS, stream, RESPONSE, False)
    ]
    # PRIORITY alone, unpadded
    block = hpack.Encoder().encode(TRAILERS)
    flags = Flag.PRIORITY | Flag.END_HEADERS | Flag.END_STREAM
    assert client.receive(frame(Type.HEADERS, flags, stream, priority + block)) == [
        (HEADERS, stream, TRAILERS, True)
    ]


def test_padded_headers() -> None:
    client = heard()
    stream = client.open_stream(b"")
    block = hpack.Encoder().encode(RESPONSE)
    payload = bytes([7]) + block + b"\0" * 7
    assert client.receive(frame(Type.HEADERS, Flag.PADDED | Flag.END_HEADERS, stream, payload)) == [
        (HEADERS, stream, RESPONSE, False)
    ]


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        (Type.DATA, b""),
        (Type.DATA, bytes([1])),
        (Type.DATA, bytes([5]) + b"abcd"),
        (Type.DATA, bytes([200]) + b"abc"),
        (Type.HEADERS, b""),
        (Type.HEADERS, bytes([3]) + b"\x88\0"),
    ],
)
def test_bad_padding(kind: int, payload: bytes) -> None:
    client = heard()
    stream = client.open_stream(b"")
    flags = Flag.PADDED | (Flag.END_HEADERS if kind == Type.HEADERS else 0)
    with pytest.raises(ProtocolError, match="padding"):
        client.receive(frame(kind, flags, stream, payload))


def test_continuation() -> None:
    client = heard()
    stream = client.open_stream(b"")
    block = hpack.Encoder().encode([*RESPONSE, (b"x-big", b"b" * 50)])
    data = (
        frame(Type.HEADERS, Flag.END_STREAM, stream, block[:10])
        + frame(Type.CONTINUATION, 0, stream, block[10:20])
        + frame(Type.CONTINUATION, 0, stream, b"")
        + frame(Type.CONTINUATION, Flag.END_HEADERS, stream, block[20:])
    )
    assert client.receive(data[:20]) == []
    assert client.receive(data[20:]) == [
        (HEADERS, stream, [*RESPONSE, (b"x-big", b"b" * 50)], True)
    ]
    # the connection goes on: later frames parse as usual
    assert client.receive(frame(Type.DATA, 0, stream, b"after")) == [
        (DATA, stream, b"after", False)
    ]


@pytest.mark.parametrize(
    "between",
    [
        frame(Type.DATA, 0, 1, b"data"),
        frame(Type.PING, 0, 0, b"12345678"),
        frame(Type.HEADERS, Flag.END_HEADERS, 1, b"\x88"),
        frame(Type.PRIORITY, 0, 1, struct.pack(">IB", 0, 1)),
        frame(0xFA, 0, 0, b"unknown"),
    ],
)
def test_continuation_interrupted(between: bytes) -> None:
    client = heard()
    stream = client.open_stream(b"")
    block = hpack.Encoder().encode(RESPONSE)
    client.receive(frame(Type.HEADERS, 0, stream, block[:3]))
    with pytest.raises(ProtocolError, match="CONTINUATION"):
        client.receive(between + frame(Type.CONTINUATION, Flag.END_HEADERS, stream, block[3:]))


def test_continuation_on_another_stream() -> None:
    client = heard()
    client.open_stream(b"")
    client.open_stream(b"")
    block = hpack.Encoder().encode(RESPONSE)
    client.receive(frame(Type.HEADERS, 0, 1, block[:3]))
    with pytest.raises(ProtocolError, match="CONTINUATION"):
        client.receive(frame(Type.CONTINUATION, Flag.END_HEADERS, 3, block[3:]))


def test_continuation_out_of_the_blue() -> None:
    client = heard()
    stream = client.open_stream(b"")
    block = hpack.Encoder().encode(RESPONSE)
    with pytest.raises(ProtocolError, match="CONTINUATION"):
        client.receive(frame(Type.CONTINUATION, Flag.END_HEADERS, stream, block))


def test_continuation_after_headers_ended() -> None:
    client = heard()
    stream = client.open_stream(b"")
    encoder = hpack.Encoder()
    assert len(
        client.receive(frame(Type.HEADERS, Flag.END_HEADERS, stream, encoder.encode(RESPONSE)))
    )
    with pytest.raises(ProtocolError, match="CONTINUATION"):
        client.receive(frame(Type.CONTINUATION, Flag.END_HEADERS, stream, encoder.encode(TRAILERS)))


# -- flow control: sending -----------------------------------------------------------------


def test_send_window() -> None:
    pair = Pair()
    client, server = pair.client, pair.server
    stream = pair.open()
    assert client.max_frame == 16_384
    assert client.window(stream) == 16_384  # the frame size limits it
    for _ in range(3):
        client.data(stream, b"d" * client.window(stream))
    assert client.send_window == 65_535 - 3 * 16_384
    assert client.window(stream) == 16_383
    client.data(stream, b"d" * 16_383)
    assert client.window(stream) == 0
    events = pair.to_server()  # h2 would refuse DATA beyond the windows
    assert sum(len(e.data or b"") for e in events if isinstance(e, h2.events.DataReceived)) == (
        65_535
    )
    assert server.remote_flow_control_window(stream) == 0

    server.increment_flow_control_window(1000)  # the connection's window
    assert pair.to_client() == []
    assert client.send_window == 1000
    assert client.window(stream) == 0  # the stream's is still shut
    server.increment_flow_control_window(300, stream_id=stream)
    assert pair.to_client() == []
    assert client.window(stream) == 300
    server.increment_flow_control_window(5000, stream_id=stream)
    pair.to_client()
    assert client.window(stream) == 1000  # now the connection's limits it

    other = pair.open()  # a new stream starts with the server's initial window
    assert client.window(other) == 1000
    client.data(other, b"o" * 600)
    assert client.send_window == 400
    assert client.window(stream) == 400
    client.data(stream, b"s" * 400)
    assert client.window(stream) == client.window(other) == 0
    pair.to_server()
    assert server.remote_flow_control_window(stream) == 0


def test_closed_stream_has_no_window() -> None:
    pair = Pair()
    stream = pair.open()
    assert pair.client.window(stream) > 0
    pair.client.close_stream(stream)
    assert pair.client.window(stream) == 0
    assert pair.client.window(99) == 0
    # a WINDOW_UPDATE for a forgotten stream is ignored
    pair.client.receive(frame(Type.WINDOW_UPDATE, 0, stream, struct.pack(">I", 100)))
    assert pair.client.window(stream) == 0


def test_initial_window_change_applies_to_open_streams() -> None:
    pair = Pair()
    client, server = pair.client, pair.server
    server.increment_flow_control_window(1_000_000)
    pair.to_client()

    def settle(initial: int) -> None:
        server.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial})
        assert pair.to_client() == []
        pair.to_server()  # the ACK: h2 now counts with the new setting

    def send(stream: int, n: int) -> None:
        for _ in range(n // 16_384):
            client.data(stream, b"d" * 16_384)
        client.data(stream, b"d" * (n % 16_384))
        events = pair.to_server()  # h2 would refuse DATA beyond the window
        assert sum(len(e.data or b"") for e in events if isinstance(e, h2.events.DataReceived))

    first = pair.open()
    send(first, 59_152)
    assert client.window(first) == server.remote_flow_control_window(first) == 6_383
    settle(60_000)
    assert client.window(first) == server.remote_flow_control_window(first) == 848
    second = pair.open()  # starts with the new initial window
    send(second, 49_152)
    assert client.window(second) == server.remote_flow_control_window(second) == 10_848
    settle(55_000)
    assert client.window(second) == server.remote_flow_control_window(second) == 5_848
    assert client.window(first) <= 0  # 848 - 5_000: below zero, as RFC 9113 6.9.2 allows
    assert client.window(first) == server.remote_flow_control_window(first)
    send(second, 5_848)
    assert client.window(second) == 0
    settle(70_000)
    assert client.window(first) == server.remote_flow_control_window(first) == 10_848
    assert client.window(second) == server.remote_flow_control_window(second) == 15_000
    send(first, 10_848)
    send(second, 15_000)
    assert client.window(first) == client.window(second) == 0


def test_max_frame_size_setting() -> None:
    pair = Pair()
    client, server = pair.client, pair.server
    server.increment_flow_control_window(1_000_000)
    server.update_settings(
        {
            h2.settings.SettingCodes.MAX_FRAME_SIZE: 40_000,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1_000_000,
        }
    )
    pair.to_client()
    pair.to_server()
    assert client.max_frame == 40_000
    headers = [*REQUEST, (b"token", b"t" * 30_000)]
    stream = client.open_stream(encode_headers(headers))
    assert client.window(stream) == 40_000
    client.data(stream, b"d" * 40_000, end_stream=True)
    out = client.take()
    assert [(k, len(p)) for k, _, _, p in parse(out)][1:] == [(Type.DATA, 40_000)]
    received, data, _ = server.receive_data(out)
    assert isinstance(received, h2.events.RequestReceived)
    assert received.headers == headers
    assert isinstance(data, h2.events.DataReceived)
    assert data.data == b"d" * 40_000


@pytest.mark.parametrize("value", [0, 16_383, 2**24])
def test_bad_max_frame_size(value: int) -> None:
    client = ClientConnection(WINDOW)
    with pytest.raises(ProtocolError, match="MAX_FRAME_SIZE"):
        client.receive(frame(Type.SETTINGS, 0, 0, struct.pack(">HI", 0x5, value)))


@pytest.mark.parametrize("value", [16_384, 2**24 - 1])
def test_max_frame_size_limits(value: int) -> None:
    client = ClientConnection(WINDOW)
    client.receive(frame(Type.SETTINGS, 0, 0, struct.pack(">HI", 0x5, value)))
    assert client.max_frame == value


def test_bad_initial_window_size() -> None:
    client = ClientConnection(WINDOW)
    with pytest.raises(ProtocolError, match="INITIAL_WINDOW_SIZE"):
        client.receive(frame(Type.SETTINGS, 0, 0, struct.pack(">HI", 0x4, 2**31)))


def test_connection_window_overflow() -> None:
    client = heard()
    client.receive(frame(Type.WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1 - 65_535)))
    assert client.send_window == 2**31 - 1
    with pytest.raises(ProtocolError, match="window"):
        client.receive(frame(Type.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)))


@pytest.mark.parametrize(
    "bad",
    [
        frame(Type.SETTINGS, 0, 1, b""),
        frame(Type.SETTINGS, 0, 0, b"\0\x03\0\0\0"),
        frame(Type.SETTINGS, Flag.ACK, 0, struct.pack(">HI", 0x3, 1)),
        frame(Type.WINDOW_UPDATE, 0, 0, b"\0\0\0"),
        frame(Type.PING, 0, 0, b"1234567"),
        frame(Type.PING, 0, 1, b"12345678"),
        frame(Type.GOAWAY, 0, 0, b"\0" * 7),
        frame(Type.GOAWAY, 0, 1, b"\0" * 8),
        frame(Type.RST, 0, 0, b"\0\0\0\x08"),
        frame(Type.RST, 0, 1, b"\0\0\x08"),
    ],
)
def test_malformed_control_frames(bad: bytes) -> None:
    client = heard()
    client.open_stream(b"")
    with pytest.raises(ProtocolError):
        client.receive(bad)


# -- flow control: receiving ---------------------------------------------------------------


def test_receive_window_credited_at_half() -> None:
    pair = Pair(1000)
    client, server = pair.client, pair.server
    stream = pair.answered()
    server.send_data(stream, b"a" * 400)
    assert pair.to_client()[-1] == (DATA, stream, b"a" * 400, False)
    assert client.take() == b""  # 400 of 1000: not yet
    assert server.local_flow_control_window(stream) == 600
    with pytest.raises(h2.exceptions.FlowControlError):
        server.send_data(stream, b"b" * 601)
    server.send_data(stream, b"b" * 100)
    assert pair.to_client() == [(DATA, stream, b"b" * 100, False)]
    out = client.take()
    assert window_updates(out) == {0: 500, stream: 500}
    assert server.local_flow_control_window(stream) == 500
    events = server.receive_data(out)
    assert {e.stream_id for e in events if isinstance(e, h2.events.WindowUpdated)} == {0, stream}
    assert server.local_flow_control_window(stream) == 1000
    server.send_data(stream, b"c" * 1000, end_stream=True)  # more than it had seen before
    assert pair.to_client() == [(DATA, stream, b"c" * 1000, True)]
    assert window_updates(client.take()) == {0: 1000, stream: 1000}


def test_receive_window_large() -> None:
    pair = Pair(200_000)
    client, server = pair.client, pair.server
    stream = pair.answered()
    for _ in range(6):
        server.send_data(stream, b"a" * 16_384)  # 98_304 bytes
    pair.to_client()
    assert client.take() == b""
    assert server.local_flow_control_window(stream) == 200_000 - 98_304
    server.send_data(stream, b"a" * 2000)
    pair.to_client()
    assert window_updates(client.take()) == {0: 100_304, stream: 100_304}


def test_receive_credit_for_unknown_or_closed_stream() -> None:
    client = heard(1000)
    stream = client.open_stream(b"")
    client.take()
    assert client.receive(frame(Type.DATA, 0, 99, b"u" * 300)) == [(DATA, 99, b"u" * 300, False)]
    client.receive(frame(Type.DATA, 0, stream, b"s" * 100))
    assert client.take() == b""
    client.close_stream(stream)
    client.receive(frame(Type.DATA, 0, stream, b"s" * 100))
    assert window_updates(client.take()) == {0: 500}  # the connection's only


def test_reset_stream_credits_connection_only() -> None:
    pair = Pair(1000)
    client, server = pair.client, pair.server
    stream = pair.answered()
    server.send_data(stream, b"a" * 300)
    pair.to_client()
    client.reset(stream)
    pair.to_server()
    client.receive(frame(Type.DATA, 0, stream, b"late" * 100))  # in flight when we reset it
    assert window_updates(client.take()) == {0: 700}


# -- PING, RST_STREAM, GOAWAY --------------------------------------------------------------


def test_server_ping_is_answered() -> None:
    pair = Pair()
    pair.server.ping(b"\x00\x01opaque")
    assert pair.to_client() == []
    out = pair.client.take()
    assert parse(out) == [(Type.PING, Flag.ACK, 0, b"\x00\x01opaque")]
    (event,) = pair.server.receive_data(out)
    assert isinstance(event, h2.events.PingAckReceived)
    assert event.ping_data == b"\x00\x01opaque"


def test_our_ping_is_reported() -> None:
    pair = Pair()
    pair.client.ping(b"fleetd!\xff")
    (event,) = pair.to_server()
    assert isinstance(event, h2.events.PingReceived)
    assert pair.to_client() == [(PING_ACK, b"fleetd!\xff")]
    assert pair.client.take() == b""  # an ACK is not answered


def test_server_reset() -> None:
    pair = Pair()
    stream = pair.open()
    pair.server.reset_stream(stream, h2.errors.ErrorCodes.REFUSED_STREAM)
    assert pair.to_client() == [(RESET, stream, 0x7)]
    assert pair.client.window(stream) == 0


def test_our_reset() -> None:
    pair = Pair()
    stream = pair.open()
    pair.client.reset(stream)
    assert pair.client.window(stream) == 0
    (event,) = pair.to_server()
    assert isinstance(event, h2.events.StreamReset)
    assert event.stream_id == stream
    assert event.error_code == CANCEL == h2.errors.ErrorCodes.CANCEL
    assert event.remote_reset


def test_our_reset_with_code() -> None:
    pair = Pair()
    stream = pair.open()
    pair.client.reset(stream, 0x2)
    (event,) = pair.to_server()
    assert isinstance(event, h2.events.StreamReset)
    assert event.error_code == h2.errors.ErrorCodes.INTERNAL_ERROR


def test_goaway() -> None:
    pair = Pair()
    pair.request()
    pair.request()
    pair.server.close_connection(
        error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
        additional_data=b"too many requests",
        last_stream_id=3,
    )
    assert pair.to_client() == [(GOAWAY, 3, 0xB, b"too many requests")]


def test_goaway_without_debug_data() -> None:
    pair = Pair()
    pair.request()
    pair.server.close_connection()
    assert pair.to_client() == [(GOAWAY, 1, 0, b"")]


def test_goaway_reserved_bit_is_ignored() -> None:
    client = heard()
    payload = struct.pack(">II", 0x8000_0000 | 5, 0x2) + b"debug"
    assert client.receive(frame(Type.GOAWAY, 0, 0, payload)) == [(GOAWAY, 5, 0x2, b"debug")]


def test_error_name() -> None:
    assert error_name(8) == "CANCEL"
    assert error_name(0) == "NO_ERROR"
    assert error_name(0xD) == "HTTP_1_1_REQUIRED"
    assert error_name(0x1234) == "error 0x1234"
    assert error_name(0xE) == "error 0xe"


# -- frames refused or ignored -------------------------------------------------------------


def test_push_promise_is_refused() -> None:
    client = heard()
    stream = client.open_stream(b"")
    payload = struct.pack(">I", 2) + hpack.Encoder().encode(REQUEST)
    with pytest.raises(ProtocolError, match="PUSH_PROMISE"):
        client.receive(frame(Type.PUSH, Flag.END_HEADERS, stream, payload))


@pytest.mark.parametrize(
    "bad",
    [
        frame(Type.DATA, 0, 0, b"data"),
        frame(Type.HEADERS, Flag.END_HEADERS, 0, b"\x88"),
        frame(Type.DATA, 0, 0x8000_0000, b"reserved bit"),
    ],
)
def test_stream_zero(bad: bytes) -> None:
    client = heard()
    with pytest.raises(ProtocolError, match="stream 0"):
        client.receive(bad)


def test_unknown_frames_are_ignored() -> None:
    client = heard()
    stream = client.open_stream(b"")
    client.take()
    data = (
        frame(0xFA, 0xFF, 0, b"whatever")
        + frame(0x0A, 0, stream, b"an ALTSVC")
        + frame(0x10, 0, stream)
        + frame(Type.DATA, 0, stream, b"still here")
    )
    assert client.receive(data) == [(DATA, stream, b"still here", False)]
    assert window_updates(client.take()) == {}


def test_priority_frame_is_ignored() -> None:
    client = heard()
    stream = client.open_stream(b"")
    client.take()
    data = frame(Type.PRIORITY, 0, stream, struct.pack(">IB", 0x8000_0000 | 5, 16)) + frame(
        Type.PRIORITY, 0, 99, struct.pack(">IB", 0, 0)
    )
    assert client.receive(data) == []
    assert client.take() == b""
    assert client.receive(frame(Type.DATA, 0, stream, b"ok")) == [(DATA, stream, b"ok", False)]


def test_oversized_frame() -> None:
    client = heard()
    client.open_stream(b"")
    header = struct.pack(">I", 16_385)[1:] + struct.pack(">BBI", Type.DATA, 0, 1)
    with pytest.raises(ProtocolError, match="16385"):
        client.receive(header)  # refused from its header alone


def test_frame_of_max_size() -> None:
    client = heard(1 << 20)
    stream = client.open_stream(b"")
    assert client.receive(frame(Type.DATA, 0, stream, b"m" * 16_384)) == [
        (DATA, stream, b"m" * 16_384, False)
    ]


# -- failures ------------------------------------------------------------------------------


def test_events_before_a_bad_frame_come_with_the_error() -> None:
    # The same events whether the bad frame comes in the same read or the next one.
    client = heard()
    stream = client.open_stream(b"")
    good = frame(Type.DATA, 0, stream, b"before") + frame(Type.PING, Flag.ACK, 0, b"12345678")
    with pytest.raises(ProtocolError, match="stream 0") as caught:
        client.receive(good + frame(Type.DATA, 0, 0, b"bad"))
    assert caught.value.events == [(DATA, stream, b"before", False), (PING_ACK, b"12345678")]


def test_a_broken_connection_stays_broken() -> None:
    client = heard()
    stream = client.open_stream(b"")
    with pytest.raises(ProtocolError, match="stream 0"):
        client.receive(frame(Type.DATA, 0, 0, b"bad"))
    # Later bytes, good or not, are not parsed from a state nobody knows: the same error,
    # without the events it reported already.
    with pytest.raises(ProtocolError, match="stream 0") as again:
        client.receive(frame(Type.DATA, 0, stream, b"late"))
    assert again.value.events == []


def test_headers_too_short_for_their_priority_fields() -> None:
    client = heard()
    stream = client.open_stream(b"")
    with pytest.raises(ProtocolError, match="priority"):
        client.receive(frame(Type.HEADERS, Flag.END_HEADERS | Flag.PRIORITY, stream, b"\0\0\0"))
    padded = heard()
    stream = padded.open_stream(b"")
    # Four bytes left once the padding is off: one short.
    payload = bytes([2]) + b"\0\0\0\x01" + b"\0\0"
    with pytest.raises(ProtocolError, match="priority"):
        padded.receive(
            frame(Type.HEADERS, Flag.END_HEADERS | Flag.PRIORITY | Flag.PADDED, stream, payload)
        )


def test_a_header_block_that_never_ends_is_refused_at_its_bound() -> None:
    # A CONTINUATION flood: without a bound every byte of it would be kept, waiting for an
    # END_HEADERS that never comes.
    client = heard()
    stream = client.open_stream(b"")
    piece = b"\0" * 16_384
    client.receive(frame(Type.HEADERS, 0, stream, piece))
    for _ in range(15):  # 256 KiB so far: not yet refused
        assert client.receive(frame(Type.CONTINUATION, 0, stream, piece)) == []
    with pytest.raises(ProtocolError, match="header block over 262144 bytes"):
        client.receive(frame(Type.CONTINUATION, 0, stream, b"\0"))


def test_a_large_header_block_within_the_bound_is_decoded() -> None:
    client = heard()
    stream = client.open_stream(b"")
    headers = [(b"x-h%d" % i, b"v" * 500) for i in range(100)]  # 50 KB: hpack's 64 KiB list
    block = hpack.Encoder().encode(headers, huffman=False)
    pieces = [block[i : i + 1000] for i in range(0, len(block), 1000)]
    data = frame(Type.HEADERS, 0, stream, pieces[0])
    for i, piece in enumerate(pieces[1:], 2):
        data += frame(Type.CONTINUATION, Flag.END_HEADERS if i == len(pieces) else 0, stream, piece)
    assert client.receive(data) == [(HEADERS, stream, headers, False)]


# -- header list sizes (SETTINGS_MAX_HEADER_LIST_SIZE) ---------------------------------------


def test_header_list_size_counts_each_field_and_32_bytes_more() -> None:
    assert header_list_size([]) == 0
    assert header_list_size([(b"te", b"trailers")]) == 2 + 8 + 32
    assert header_list_size(REQUEST) == sum(len(k) + len(v) + 32 for k, v in REQUEST)


def test_our_settings_tell_the_server_the_largest_header_list_we_take() -> None:
    client = ClientConnection(WINDOW)
    server = h2_server()
    server.receive_data(client.take())
    assert server.remote_settings.max_header_list_size == MAX_HEADER_LIST == 65_536


def test_the_servers_header_list_limit_is_none_until_its_settings_say() -> None:
    client = ClientConnection(WINDOW)
    assert client.max_header_list == 2**32 - 1  # RFC 9113: unlimited until said
    client.receive(frame(Type.SETTINGS, 0, 0, struct.pack(">HI", 0x4, 1000)))
    assert client.max_header_list == 2**32 - 1
    client.receive(frame(Type.SETTINGS, 0, 0, struct.pack(">HI", 0x6, 300)))
    assert client.max_header_list == 300
    client.receive(frame(Type.SETTINGS, 0, 0, struct.pack(">HI", 0x3, 5)))
    assert client.max_header_list == 300  # later SETTINGS without it leave it
    pair = Pair()
    pair.server.update_settings({h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 4096})
    pair.to_client()
    assert pair.client.max_header_list == 4096


def header_block(client: ClientConnection, headers: Headers) -> list[Event]:
    """`headers` as the server's answer on a new stream of `client`, in frames of 16 KiB."""
    stream = client.open_stream(b"")
    block = hpack.Encoder().encode(headers, huffman=False)
    pieces = [block[i : i + 16_384] for i in range(0, len(block), 16_384)]
    data = frame(Type.HEADERS, Flag.END_HEADERS if len(pieces) == 1 else 0, stream, pieces[0])
    for i, piece in enumerate(pieces[1:], 2):
        data += frame(Type.CONTINUATION, Flag.END_HEADERS if i == len(pieces) else 0, stream, piece)
    return client.receive(data)


def test_a_header_list_of_our_limit_is_taken_and_one_byte_more_fails_the_connection() -> None:
    # One field of (name, value) filling the list to the byte: 32 + 1 + value.
    exact = [(b"x", b"v" * (MAX_HEADER_LIST - 33))]
    assert header_list_size(exact) == MAX_HEADER_LIST
    client = heard()
    [(kind, _, headers, _)] = header_block(client, exact)
    assert (kind, headers) == (HEADERS, exact)
    over = heard()
    with pytest.raises(ProtocolError, match="header list over 65536 bytes"):
        header_block(over, [(b"x", b"v" * (MAX_HEADER_LIST - 32))])
    with pytest.raises(ProtocolError):  # its header state is lost: so is the connection
        over.receive(frame(Type.PING, 0, 0, b"12345678"))
