"""HTTP/2 frame types and flags (RFC 9113 section 6), and a framer, for tests that build frames
byte by byte.

Spelled out here rather than taken from the module under test (fleetd/etcd/http2.py), so a
wrong number there is caught rather than copied. Both are ints (IntEnum, IntFlag): they pack,
compare and combine as the numbers on the wire.
"""

from __future__ import annotations

import enum
import struct


class Type(enum.IntEnum):
    DATA = 0
    HEADERS = 1
    PRIORITY = 2
    RST = 3
    SETTINGS = 4
    PUSH = 5
    PING = 6
    GOAWAY = 7
    WINDOW_UPDATE = 8
    CONTINUATION = 9


class Flag(enum.IntFlag):
    END_STREAM = 0x1
    ACK = 0x1
    END_HEADERS = 0x4
    PADDED = 0x8
    PRIORITY = 0x20


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One frame: its 9-byte header (24-bit length, type, flags, stream) and `payload`."""
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload
