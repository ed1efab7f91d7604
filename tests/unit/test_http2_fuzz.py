"""Hypothesis over the HTTP/2 frame parser (fleetd/etcd/http2.py `ClientConnection.receive`).

Whatever a server (or anything at the other end of the socket) sends, `receive()` returns
events or raises `http2.ProtocolError`: no other exception, no hang (each example has a
deadline). A valid conversation, built here frame by frame with the events it must give
(interleaved streams, CONTINUATION, padding, priorities, unknown frame types, control frames),
gives exactly those events in any chunking; cut short at any byte, a prefix of them and no
error. Bytes that break the protocol fail at the same frame in any chunking, after the same
events.
"""

from __future__ import annotations

import struct
from datetime import timedelta
from typing import Any

import hpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fleetd.etcd.http2 import (
    DATA,
    GOAWAY,
    HEADERS,
    MAX_FRAME,
    PING_ACK,
    RESET,
    ClientConnection,
    ProtocolError,
)
from tests.unit.http2_frames import Flag, Type, frame

Event = tuple[Any, ...]

FUZZ = settings(
    max_examples=200,
    deadline=timedelta(seconds=1),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

WINDOW = 1 << 20
STREAMS = (1, 3, 5, 7)


def client() -> ClientConnection:
    """A client with the streams a conversation uses open, its preface taken."""
    conn = ClientConnection(WINDOW)
    for _ in STREAMS:
        conn.open_stream(b"")
    conn.take()
    return conn


def feed(data: bytes, cuts: list[int]) -> tuple[list[Event], ProtocolError | None, bytes]:
    """`data` given to a new client in pieces cut at `cuts`: its events (also those before
    a failure), the failure, and what it would send."""
    conn = client()
    events: list[Event] = []
    start = 0
    for end in [*sorted(set(cuts)), len(data)]:
        try:
            events += conn.receive(data[start:end])
        except ProtocolError as e:
            events += e.events
            return events, e, conn.take()
        except Exception as e:  # pragma: no cover - what this module hunts for
            pytest.fail(f"receive() raised {type(e).__name__}, not ProtocolError: {e!r}")
        start = end
    return events, None, conn.take()


def cuts_for(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(data)), max_size=12)


# -- valid conversations ------------------------------------------------------------------

NAMES = st.sampled_from(
    [b":status", b"content-type", b"grpc-status", b"grpc-message", b"x-etcd", b"trace-bin"]
)
VALUES = st.binary(max_size=40) | st.sampled_from([b"200", b"0", b"application/grpc"])
HEADER_LISTS = st.lists(st.tuples(NAMES, VALUES), max_size=4)
SETTING_VALUES = {
    0x1: st.integers(0, 2**32 - 1),  # HEADER_TABLE_SIZE: ours to use, and we never do
    0x2: st.integers(0, 1),
    0x3: st.integers(0, 2**32 - 1),  # MAX_CONCURRENT_STREAMS
    0x4: st.integers(0, 2**31 - 1),  # INITIAL_WINDOW_SIZE
    0x5: st.integers(MAX_FRAME, 2**24 - 1),  # MAX_FRAME_SIZE
    0x6: st.integers(0, 2**32 - 1),  # MAX_HEADER_LIST_SIZE
}
SETTINGS_PAYLOADS = st.lists(
    st.one_of(
        *(st.tuples(st.just(key), values) for key, values in SETTING_VALUES.items()),
        st.tuples(st.integers(0x7, 0xFFFF), st.integers(0, 2**32 - 1)),  # unknown: ignored
    ),
    max_size=6,
).map(lambda pairs: b"".join(struct.pack(">HI", k, v) for k, v in pairs))


class Conversation:
    """A server's side of a valid conversation, and the events the client must report."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.events: list[Event] = []
        self.encoder = hpack.Encoder()  # in emission order: the blocks share its table
        self.credit = 0  # WINDOW_UPDATE increments to the connection so far

    def add(self, kind: int, flags: int, stream: int, payload: bytes = b"") -> None:
        self.data += frame(kind, flags, stream, payload)


@st.composite
def padded(draw: st.DrawFn, payload: bytes, room: int) -> tuple[bytes, bool]:
    """`payload`, padded (a pad length byte and that many bytes) if drawn and it fits."""
    if room < 1 or not draw(st.booleans()):
        return payload, False
    pad = draw(st.integers(0, min(255, room - 1)))
    return bytes([pad]) + payload + draw(st.binary(min_size=pad, max_size=pad)), True


@st.composite
def header_block(
    draw: st.DrawFn, talk: Conversation, stream: int, headers: list[tuple[bytes, bytes]], end: bool
) -> None:
    """A header block on `stream`: a HEADERS frame (maybe padded, maybe with priority
    fields), then CONTINUATION frames if the block is drawn split."""
    block = talk.encoder.encode(headers)
    splits = sorted(draw(st.lists(st.integers(0, len(block)), max_size=3)))
    pieces = [block[a:b] for a, b in zip([0, *splits], [*splits, len(block)], strict=True)]
    first = pieces[0]
    flags = Flag.END_STREAM if end else 0
    if draw(st.booleans()):
        flags |= Flag.PRIORITY
        first = struct.pack(">IB", draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 255))) + (
            first
        )
    first, was_padded = draw(padded(first, MAX_FRAME - len(first)))
    if was_padded:
        flags |= Flag.PADDED
    if len(pieces) == 1:
        flags |= Flag.END_HEADERS
    talk.add(Type.HEADERS, flags, stream, first)
    for i, piece in enumerate(pieces[1:], 2):
        talk.add(Type.CONTINUATION, Flag.END_HEADERS if i == len(pieces) else 0, stream, piece)
    talk.events.append((HEADERS, stream, headers, end))


@st.composite
def stream_steps(draw: st.DrawFn, stream: int) -> list[tuple[str, Any]]:
    """What the server says on one stream, in order: an answer (headers, data, trailers),
    a trailers-only answer, or a reset, maybe after some data."""
    shape = draw(st.sampled_from(["answer", "trailers-only", "reset", "data-then-reset"]))
    steps: list[tuple[str, Any]] = []
    if shape == "trailers-only":
        return [("headers", (draw(HEADER_LISTS), True))]
    if shape != "reset":
        if shape == "answer":
            steps.append(("headers", (draw(HEADER_LISTS), False)))
        for payload in draw(st.lists(st.binary(max_size=100), max_size=4)):
            steps.append(("data", (payload, False)))
    if shape == "answer":
        if draw(st.booleans()):
            steps.append(("headers", (draw(HEADER_LISTS), True)))
        else:
            steps.append(("data", (draw(st.binary(max_size=50)), True)))
    else:
        steps.append(("reset", draw(st.integers(0, 2**32 - 1))))
    return steps


CONTROLS = st.sampled_from(
    ["ping", "ping-ack", "settings", "settings-ack", "window", "priority", "unknown", "goaway"]
)


@st.composite
def control(draw: st.DrawFn, talk: Conversation, kind: str) -> None:
    if kind == "ping":
        talk.add(Type.PING, 0, 0, draw(st.binary(min_size=8, max_size=8)))  # answered, no event
    elif kind == "ping-ack":
        opaque = draw(st.binary(min_size=8, max_size=8))
        talk.add(Type.PING, Flag.ACK, 0, opaque)
        talk.events.append((PING_ACK, opaque))
    elif kind == "settings":
        talk.add(Type.SETTINGS, 0, 0, draw(SETTINGS_PAYLOADS))
    elif kind == "settings-ack":
        talk.add(Type.SETTINGS, Flag.ACK, 0)
    elif kind == "window":
        stream = draw(st.sampled_from((0, *STREAMS, 99)))
        increment = draw(st.integers(1, 1 << 20))
        if stream == 0:
            talk.credit += increment
        talk.add(Type.WINDOW_UPDATE, 0, stream, struct.pack(">I", increment))
    elif kind == "priority":
        stream = draw(st.sampled_from((*STREAMS, 2, 99)))
        talk.add(Type.PRIORITY, 0, stream, struct.pack(">IB", draw(st.integers(0, 2**32 - 1)), 16))
    elif kind == "unknown":
        talk.add(
            draw(st.integers(10, 255)),
            draw(st.integers(0, 255)),
            draw(st.integers(0, 2**32 - 1)),
            draw(st.binary(max_size=64)),
        )
    else:
        last, code = draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 2**32 - 1))
        debug = draw(st.binary(max_size=30))
        reserved = draw(st.sampled_from([0, 1 << 31]))  # the reserved bit: ignored
        talk.add(Type.GOAWAY, 0, 0, struct.pack(">II", last | reserved, code) + debug)
        talk.events.append((GOAWAY, last, code, debug))


@st.composite
def conversations(draw: st.DrawFn) -> Conversation:
    """A valid conversation: the server's SETTINGS, then its streams' frames interleaved
    (each stream's in order, a header block never interrupted) with control frames."""
    talk = Conversation()
    talk.add(Type.SETTINGS, 0, 0, draw(SETTINGS_PAYLOADS))
    queues = {
        s: draw(stream_steps(s)) for s in draw(st.lists(st.sampled_from(STREAMS), unique=True))
    }
    controls = draw(st.lists(CONTROLS, max_size=6))
    while any(queues.values()) or controls:
        choices = [s for s, steps in queues.items() if steps] + (["control"] if controls else [])
        pick = draw(st.sampled_from(choices))
        if pick == "control":
            draw(control(talk, controls.pop(0)))
            continue
        assert isinstance(pick, int)
        step, arg = queues[pick].pop(0)
        if step == "headers":
            headers, end = arg
            draw(header_block(talk, pick, headers, end))
        elif step == "data":
            payload, end = arg
            body, was_padded = draw(padded(payload, MAX_FRAME - len(payload)))
            flags = (Flag.END_STREAM if end else 0) | (Flag.PADDED if was_padded else 0)
            talk.add(Type.DATA, flags, pick, body)
            talk.events.append((DATA, pick, payload, end))
        else:
            talk.add(Type.RST, 0, pick, struct.pack(">I", arg))
            talk.events.append((RESET, pick, arg))
    assume(65_535 + talk.credit <= 2**31 - 1)  # the connection's send window stays valid
    return talk


def normalised(events: list[Event]) -> list[Event]:
    """Header lists as plain tuples of bytes (hpack returns its own tuple type)."""
    out: list[Event] = []
    for event in events:
        if event[0] == HEADERS:
            _, stream, headers, end = event
            event = (HEADERS, stream, [(bytes(k), bytes(v)) for k, v in headers], end)
        out.append(event)
    return out


@FUZZ
@given(st.data())
def test_a_valid_conversation_gives_its_events_in_any_chunking(data: st.DataObject) -> None:
    talk = data.draw(conversations())
    whole = bytes(talk.data)
    events, error, sent = feed(whole, [])
    assert error is None
    assert normalised(events) == talk.events
    cuts = data.draw(cuts_for(whole))
    split_events, split_error, split_sent = feed(whole, cuts)
    assert split_error is None
    assert split_events == events
    assert split_sent == sent  # the same SETTINGS and PING acks, the same window updates


@FUZZ
@given(st.data())
def test_a_valid_conversation_cut_short_gives_a_prefix_of_its_events(
    data: st.DataObject,
) -> None:
    talk = data.draw(conversations())
    whole = bytes(talk.data)
    end = data.draw(st.integers(0, len(whole)))
    events, error, _ = feed(whole[:end], data.draw(cuts_for(whole[:end])))
    assert error is None
    assert normalised(events) == talk.events[: len(events)]


# -- bytes that break the protocol -----------------------------------------------------------


def same_in_any_chunking(data: bytes, cuts: list[int]) -> tuple[list[Event], ProtocolError | None]:
    """Whatever `data` is, the client reports the same events, and fails (or not) alike,
    fed whole or cut at `cuts`; returns the events and the failure."""
    events, error, sent = feed(data, [])
    split_events, split_error, split_sent = feed(data, cuts)
    assert split_events == events
    assert (split_error is None) == (error is None)
    if error is not None:
        assert split_error is not None
        assert str(split_error) == str(error)
    assert split_sent == sent
    return events, error


@FUZZ
@given(st.data())
def test_garbage_is_a_protocol_error_or_events(data: st.DataObject) -> None:
    raw = data.draw(st.binary(max_size=200))
    if data.draw(st.booleans()):
        raw = frame(Type.SETTINGS, 0, 0) + raw  # past the first-frame check
    same_in_any_chunking(raw, data.draw(cuts_for(raw)))


ANY_FRAME = st.builds(
    frame,
    st.integers(0, 12) | st.integers(13, 255),
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 3, 5, 0x8000_0001, 2**32 - 1]),
    st.binary(max_size=40),
)


@FUZZ
@given(st.data())
def test_arbitrary_frames_are_a_protocol_error_or_events(data: st.DataObject) -> None:
    raw = frame(Type.SETTINGS, 0, 0) + b"".join(data.draw(st.lists(ANY_FRAME, max_size=8)))
    same_in_any_chunking(raw, data.draw(cuts_for(raw)))


@FUZZ
@given(st.data())
def test_a_mangled_conversation_is_a_protocol_error_or_events(data: st.DataObject) -> None:
    raw = bytearray(data.draw(conversations()).data)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    same_in_any_chunking(bytes(raw), data.draw(cuts_for(bytes(raw))))


@FUZZ
@given(st.data())
def test_oversized_lengths_fail_from_the_frame_header_alone(data: st.DataObject) -> None:
    talk = data.draw(conversations())
    length = data.draw(st.integers(MAX_FRAME + 1, 2**24 - 1))
    header = struct.pack(">I", length)[1:] + struct.pack(
        ">BBI", data.draw(st.integers(0, 255)), data.draw(st.integers(0, 255)), 1
    )
    raw = bytes(talk.data) + header + data.draw(st.binary(max_size=30))
    events, error = same_in_any_chunking(raw, data.draw(cuts_for(raw)))
    assert error is not None
    assert str(length) in str(error)
    assert normalised(events) == talk.events  # every frame before it counts


@FUZZ
@given(st.data())
def test_bad_padding_is_a_protocol_error(data: st.DataObject) -> None:
    # The pad length must be less than the payload (its own byte included), or no payload.
    kind = data.draw(st.sampled_from([Type.DATA, Type.HEADERS]))
    body = data.draw(st.binary(max_size=40))
    pad = data.draw(st.integers(len(body) + 1, 255))
    payload = bytes([pad]) + body if data.draw(st.booleans()) else b""
    flags = Flag.PADDED | (Flag.END_HEADERS if kind == Type.HEADERS else 0)
    raw = frame(Type.SETTINGS, 0, 0) + frame(kind, flags, 1, payload)
    _, error = same_in_any_chunking(raw, data.draw(cuts_for(raw)))
    assert error is not None
    assert "padding" in str(error)


@FUZZ
@given(st.data())
def test_unknown_frame_types_change_nothing(data: st.DataObject) -> None:
    talk = data.draw(conversations())
    whole = bytes(talk.data)
    # Unknown frames between (not inside) the conversation's frames.
    frames = []
    offset = 0
    while offset < len(whole):
        (length,) = struct.unpack(">I", b"\0" + whole[offset : offset + 3])
        frames.append(whole[offset : offset + 9 + length])
        offset += 9 + length
    mixed = bytearray(frames[0])
    inside_block = False
    for f in frames[1:]:
        if not inside_block and data.draw(st.booleans()):
            mixed += frame(
                data.draw(st.integers(10, 255)),
                data.draw(st.integers(0, 255)),
                data.draw(st.integers(0, 2**31 - 1)),
                data.draw(st.binary(max_size=30)),
            )
        mixed += f
        kind, flags = f[3], f[4]
        if kind in (Type.HEADERS, Type.CONTINUATION):
            inside_block = not flags & Flag.END_HEADERS
    events, error, _ = feed(bytes(mixed), data.draw(cuts_for(bytes(mixed))))
    assert error is None
    assert normalised(events) == talk.events
