"""The client side of HTTP/2 (RFC 9113) that etcd's gRPC API needs, and nothing more.

Why not the h2 package (the unit tests' etcd side): h2 is a complete, general implementation,
and paid for it with about 100 us of Python per request (a state machine per stream and per
connection, an event object per frame, HPACK encoding of the same headers every time, a walk
over every open stream to count them). The simulator's 1,000 machines share one connection
and one core, and at that cost placement fell to half of what grpcio reached. This framer
does what a gRPC client of one server needs in a few microseconds per request:

- requests: HEADERS from a header block the caller encoded once (`encode_headers`, literal
  fields only, so the server's table never matters), DATA within the flow-control windows;
- answers: frames parsed with struct, header blocks decoded by hpack (the server does use
  its dynamic table), DATA credited back in large window updates;
- the connection: SETTINGS (acknowledged and applied; `max_streams` and `max_header_list`
  are the server's SETTINGS_MAX_CONCURRENT_STREAMS and SETTINGS_MAX_HEADER_LIST_SIZE, for the
  caller to respect; ours say MAX_HEADER_LIST), PING (answered; ours reported),
  GOAWAY and RST_STREAM (reported), CONTINUATION, padding; no server push (refused in our
  SETTINGS), no priorities (ignored).

It does no I/O: `receive(bytes)` returns events, and what to send accumulates until `take()`.
Events are tuples, the first item saying which: (HEADERS, stream, headers, end_stream),
(DATA, stream, payload, end_stream), (RESET, stream, code), (GOAWAY, last_stream, code,
debug), (PING_ACK, opaque).

Whatever the bytes, `receive` returns events or raises ProtocolError (carrying the events of
the frames before the bad one, so the events never depend on how the bytes were cut into
reads); after that the connection stays failed. Header blocks are bounded (MAX_HEADER_BLOCK
bytes as sent, MAX_HEADER_LIST decoded), frames by MAX_FRAME. tests/unit/test_http2_fuzz.py
holds it to that.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_WINDOW = 65_535
MAX_FRAME = 16_384  # the largest frame we accept (SETTINGS_MAX_FRAME_SIZE left at its default)

# Frame types and flags.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Event kinds (first item of each event tuple).
RESET, PING_ACK = "reset", "ping_ack"

# Error codes (RFC 9113 section 7) by number, for messages.
ERROR_CODES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}
CANCEL = 0x8
REFUSED_STREAM = 0x7

_FRAME = struct.Struct(">BHBBI")  # length (24 bits as 8 + 16), type, flags, stream id
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")
_GOAWAY = struct.Struct(">II")
_MAX_WINDOW = 2**31 - 1

# SETTINGS identifiers.
_HEADER_TABLE_SIZE, _ENABLE_PUSH, _MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
_INITIAL_WINDOW_SIZE, _MAX_FRAME_SIZE, _MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6
# The streams the server is taken to allow open at once until its SETTINGS say (grpc-go's
# client assumes the same): a burst of calls on a new connection then waits one round trip
# at most, instead of being refused by a server that allows fewer. A server whose SETTINGS
# name no limit has none (RFC 9113 6.5.2).
ASSUMED_MAX_STREAMS = 100
UNLIMITED_STREAMS = 2**32 - 1


# The most header block bytes (HEADERS and its CONTINUATIONs) taken in before they end: the
# decoded list is bounded anyway (MAX_HEADER_LIST), but without a bound a server that never
# ends a block (a CONTINUATION flood) would have every byte it sends kept.
MAX_HEADER_BLOCK = 256 * 1024
# The largest header list we take, as HTTP/2 counts it (RFC 9113 6.5.2: each field's name and
# value plus 32), told to the server in our SETTINGS (grpc-go, etcd's server, then fails a
# stream whose answer would be larger instead of sending it). etcd's answers carry a status, a
# content type and a short message: hundreds of bytes. hpack's own default, made explicit.
MAX_HEADER_LIST = 64 * 1024
# The server allows any header list until its SETTINGS_MAX_HEADER_LIST_SIZE says (RFC 9113).
UNLIMITED_HEADER_LIST = 2**32 - 1


class ProtocolError(Exception):
    """The server broke HTTP/2 (or is not speaking it): the connection is unusable.

    `events` are those of the frames before the bad one in the same `receive()` call, so that
    what was reported does not depend on how the bytes were cut into reads."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.events: list[tuple[Any, ...]] = []


def error_name(code: int) -> str:
    return ERROR_CODES.get(code, f"error {code:#x}")


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME.pack(n >> 16, n & 0xFFFF, kind, flags, stream) + payload


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """HPACK's integer with an N-bit prefix (RFC 7541 5.1); `first` holds the pattern bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes) -> bytes:
    return _integer(len(data), 7, 0) + data  # not Huffman-coded


# Static-table indexes (RFC 7541 appendix A) of the names and fields requests use.
_STATIC_FIELDS = {(b":method", b"POST"): 3, (b":scheme", b"http"): 6, (b":scheme", b"https"): 7}
_STATIC_NAMES = {b":authority": 1, b":path": 4, b"content-type": 31, b"user-agent": 58}


def header_list_size(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """The size of a header list as SETTINGS_MAX_HEADER_LIST_SIZE counts it (RFC 9113 6.5.2):
    its fields uncompressed, each name and value plus 32 bytes."""
    return sum(len(name) + len(value) + 32 for name, value in headers)


def encode_headers(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A header block that leaves the server's dynamic table alone: static-table fields, and
    literals "without indexing" (RFC 7541 6.2.2). Encoded once per distinct request kind."""
    out = bytearray()
    for name, value in headers:
        index = _STATIC_FIELDS.get((name, value))
        if index is not None:
            out += _integer(index, 7, 0x80)
            continue
        name_index = _STATIC_NAMES.get(name)
        if name_index is not None:
            out += _integer(name_index, 4, 0x00)
        else:
            out += b"\x00" + _string(name)
        out += _string(value)
    return bytes(out)


class ClientConnection:
    """HTTP/2 framing for one client connection (see the module's docstring)."""

    def __init__(self, receive_window: int) -> None:
        self.out = bytearray(PREFACE)
        self.heard = False  # the server's SETTINGS arrived: it speaks HTTP/2
        self.next_stream_id = 1
        self.max_frame = MAX_FRAME  # the largest frame the server accepts
        self.max_streams = ASSUMED_MAX_STREAMS  # streams the server allows open at once
        self.max_header_list = UNLIMITED_HEADER_LIST  # the largest header list it takes
        self.send_window = DEFAULT_WINDOW  # the connection's, for our DATA
        self._stream_window = DEFAULT_WINDOW  # a new stream's, for our DATA
        self._send_windows: dict[int, int] = {}
        self._receive_window = receive_window
        self._conn_unacked = 0
        self._unacked: dict[int, int] = {}
        self._inbox = bytearray()
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        self._block: tuple[int, bytearray, bool] | None = None  # headers awaiting CONTINUATION
        self._failed: ProtocolError | None = None  # once broken, always (the state is unknown)
        settings = (
            _SETTING.pack(_ENABLE_PUSH, 0)
            + _SETTING.pack(_INITIAL_WINDOW_SIZE, receive_window)
            + _SETTING.pack(_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST)
        )
        self.out += _frame(SETTINGS, 0, 0, settings)
        if receive_window > DEFAULT_WINDOW:
            self.out += _frame(WINDOW_UPDATE, 0, 0, _U32.pack(receive_window - DEFAULT_WINDOW))

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data

    # -- sending ------------------------------------------------------------------------

    def open_stream(self, block: bytes, *, end_stream: bool = False) -> int:
        """A new stream with its request headers; returns its id. (The caller keeps to
        `max_streams` and `max_header_list`: the block is sent as it is.)"""
        stream = self.next_stream_id
        if stream > _MAX_WINDOW:
            raise ProtocolError("HTTP/2 stream ids used up")
        self.next_stream_id += 2
        self._send_windows[stream] = self._stream_window
        self._unacked[stream] = 0
        flags = END_STREAM if end_stream else 0
        if len(block) <= self.max_frame:
            self.out += _frame(HEADERS, flags | END_HEADERS, stream, block)
        else:
            self.out += _frame(HEADERS, flags, stream, block[: self.max_frame])
            rest = block[self.max_frame :]
            while rest:
                chunk, rest = rest[: self.max_frame], rest[self.max_frame :]
                last = END_HEADERS if not rest else 0
                self.out += _frame(CONTINUATION, last, stream, chunk)
        return stream

    def window(self, stream: int) -> int:
        """How many DATA bytes the stream may send now (0 for a closed stream)."""
        return min(self.send_window, self._send_windows.get(stream, 0), self.max_frame)

    def data(self, stream: int, payload: bytes, *, end_stream: bool = False) -> None:
        """DATA within `window(stream)` (the caller checks)."""
        n = len(payload)
        self.send_window -= n
        self._send_windows[stream] -= n
        self.out += _frame(DATA, END_STREAM if end_stream else 0, stream, payload)

    def reset(self, stream: int, code: int = CANCEL) -> None:
        self.out += _frame(RST_STREAM, 0, stream, _U32.pack(code))
        self.close_stream(stream)

    def close_stream(self, stream: int) -> None:
        """Forget the stream's windows (frames for it still count for the connection's)."""
        self._send_windows.pop(stream, None)
        self._unacked.pop(stream, None)

    def ping(self, opaque: bytes) -> None:
        self.out += _frame(PING, 0, 0, opaque)

    # -- receiving ----------------------------------------------------------------------

    def receive(self, data: bytes) -> list[tuple[Any, ...]]:
        """Take in bytes from the server: the events of every whole frame among them.

        Raises ProtocolError (with the events of the frames before it) when they break
        HTTP/2, and again on every later call."""
        if self._failed is not None:
            raise ProtocolError(str(self._failed))  # its events were reported with it
        inbox = self._inbox
        inbox += data
        events: list[tuple[Any, ...]] = []
        offset = 0
        size = len(inbox)
        try:
            while size - offset >= 9:
                high, low, kind, flags, stream = _FRAME.unpack_from(inbox, offset)
                length = (high << 16) | low
                stream &= _MAX_WINDOW
                if length > MAX_FRAME:
                    raise ProtocolError(f"frame of {length} bytes (at most {MAX_FRAME})")
                if size - offset < 9 + length:
                    break
                payload = bytes(inbox[offset + 9 : offset + 9 + length])
                offset += 9 + length
                if not self.heard:
                    if kind != SETTINGS or flags & ACK:
                        raise ProtocolError("the server did not start with SETTINGS")
                    self.heard = True
                    self.max_streams = UNLIMITED_STREAMS  # unless these SETTINGS say
                if self._block is not None and kind != CONTINUATION:
                    raise ProtocolError("headers interrupted before CONTINUATION ended them")
                self._frame(kind, flags, stream, payload, length, events)
        except ProtocolError as e:
            e.events = events
            self._failed = e
            inbox.clear()
            raise
        if offset:
            del inbox[:offset]
        return events

    def _frame(
        self,
        kind: int,
        flags: int,
        stream: int,
        payload: bytes,
        length: int,
        events: list[tuple[Any, ...]],
    ) -> None:
        if kind == DATA:
            if stream == 0:
                raise ProtocolError("DATA on stream 0")
            self._credit(stream, length)
            if flags & PADDED:
                payload = self._unpad(payload)
            events.append((DATA, stream, payload, bool(flags & END_STREAM)))
        elif kind == HEADERS:
            if stream == 0:
                raise ProtocolError("HEADERS on stream 0")
            if flags & PADDED:
                payload = self._unpad(payload)
            if flags & PRIORITY_FLAG:
                if len(payload) < 5:
                    raise ProtocolError("HEADERS too short for its priority fields")
                payload = payload[5:]
            self._block = (stream, bytearray(payload), bool(flags & END_STREAM))
            if flags & END_HEADERS:
                self._headers_done(events)
        elif kind == CONTINUATION:
            if self._block is None or self._block[0] != stream:
                raise ProtocolError("CONTINUATION without the HEADERS it continues")
            block = self._block[1]
            block += payload
            if len(block) > MAX_HEADER_BLOCK:
                raise ProtocolError(f"header block over {MAX_HEADER_BLOCK} bytes")
            if flags & END_HEADERS:
                self._headers_done(events)
        elif kind == RST_STREAM:
            if length != 4 or stream == 0:
                raise ProtocolError("bad RST_STREAM frame")
            self.close_stream(stream)
            events.append((RESET, stream, _U32.unpack(payload)[0]))
        elif kind == SETTINGS:
            if stream != 0 or length % 6 or (flags & ACK and length):
                raise ProtocolError("bad SETTINGS frame")
            if not flags & ACK:
                self._settings(payload)
                self.out += _frame(SETTINGS, ACK, 0)
        elif kind == PING:
            if length != 8 or stream != 0:
                raise ProtocolError("bad PING frame")
            if flags & ACK:
                events.append((PING_ACK, payload))
            else:
                self.out += _frame(PING, ACK, 0, payload)
        elif kind == GOAWAY:
            if length < 8 or stream != 0:
                raise ProtocolError("bad GOAWAY frame")
            last, code = _GOAWAY.unpack_from(payload)
            events.append((GOAWAY, last & _MAX_WINDOW, code, payload[8:]))
        elif kind == WINDOW_UPDATE:
            if length != 4:
                raise ProtocolError("bad WINDOW_UPDATE frame")
            increment = _U32.unpack(payload)[0] & _MAX_WINDOW
            if stream == 0:
                self.send_window += increment
                if self.send_window > _MAX_WINDOW:
                    raise ProtocolError("connection flow-control window over 2^31-1")
            elif stream in self._send_windows:
                self._send_windows[stream] += increment
        elif kind == PUSH_PROMISE:
            raise ProtocolError("PUSH_PROMISE, though push is disabled")
        # PRIORITY and unknown frame types: ignored, as RFC 9113 says.

    def _headers_done(self, events: list[tuple[Any, ...]]) -> None:
        assert self._block is not None
        stream, block, end = self._block
        self._block = None
        try:
            # Every block is decoded, even for a forgotten stream: it may change the table.
            headers = self._decoder.decode(bytes(block), raw=True)
        except hpack.OversizedHeaderListError as e:
            # The table may be half updated: the connection's header state is lost with it.
            why = f"header list over {MAX_HEADER_LIST} bytes (our SETTINGS_MAX_HEADER_LIST_SIZE)"
            raise ProtocolError(why) from e
        except hpack.HPACKError as e:
            raise ProtocolError(f"bad header block: {e}") from e
        events.append((HEADERS, stream, headers, end))

    def _unpad(self, payload: bytes) -> bytes:
        if not payload or payload[0] >= len(payload):
            raise ProtocolError("bad padding")
        return payload[1 : len(payload) - payload[0]]

    def _credit(self, stream: int, length: int) -> None:
        """Give received DATA back to the windows, in large updates (half the window)."""
        half = self._receive_window // 2
        self._conn_unacked += length
        if self._conn_unacked >= half:
            self.out += _frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._conn_unacked))
            self._conn_unacked = 0
        unacked = self._unacked.get(stream)
        if unacked is not None:
            unacked += length
            if unacked >= half:
                self.out += _frame(WINDOW_UPDATE, 0, stream, _U32.pack(unacked))
                unacked = 0
            self._unacked[stream] = unacked

    def _settings(self, payload: bytes) -> None:
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == _INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    raise ProtocolError("SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1")
                delta = value - self._stream_window
                self._stream_window = value
                for stream in self._send_windows:
                    self._send_windows[stream] += delta
            elif key == _MAX_FRAME_SIZE:
                if not MAX_FRAME <= value <= 2**24 - 1:
                    raise ProtocolError(f"bad SETTINGS_MAX_FRAME_SIZE {value}")
                self.max_frame = value
            elif key == _MAX_CONCURRENT_STREAMS:
                self.max_streams = value  # the caller opens no more than that (transport.py)
            elif key == _MAX_HEADER_LIST_SIZE:
                self.max_header_list = value  # the caller sends no larger list (transport.py)
            # HEADER_TABLE_SIZE: our blocks never use the server's table. The rest: nothing
            # this client needs to change.
