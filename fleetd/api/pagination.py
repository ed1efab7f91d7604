"""fleet's page tokens (api/pagination.go, reference §6.6), byte for byte.

A token is Go's `PageToken{Limit uint16; Page uint16}` written little-endian (4 bytes) and
base64-encoded with the URL-safe alphabet and padding: limit 100, page 2 is `ZAACAA==`.
Clients treat tokens as opaque and send back what they were given, but fleet's own tests pin
the encoding, and a client of an original fleetd may hold one across an upgrade.

Pages are fleet's too: page p holds items [(p-1)*limit, p*limit), and a page that ends exactly
at (or before) the last item carries a token for the next one, so a total that is an exact
multiple of the limit ends with one empty page (`{}`), as in fleet. Unlike fleet, the index
arithmetic is not done in uint16, so a large page number cannot wrap around to an earlier page.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from multidict import MultiMapping

from fleetd.api.errors import ApiError

T = TypeVar("T")

TOKEN_PARAM = "nextPageToken"
_UINT16_MAX = 0xFFFF
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_DECODE: Mapping[str, int] = {c: i for i, c in enumerate(_ALPHABET)}


@dataclass(frozen=True, slots=True)
class PageToken:
    limit: int
    page: int

    def encode(self) -> str:
        data = struct.pack("<HH", self.limit, self.page)
        return _b64url_encode(data)

    def next(self) -> PageToken:
        return PageToken(self.limit, self.page + 1)


class BadToken(ValueError):
    """A page token that does not decode; the message is shown to the client."""


def _b64url_encode(data: bytes) -> str:
    out = []
    for start in range(0, len(data), 3):
        chunk = data[start : start + 3]
        bits = int.from_bytes(chunk.ljust(3, b"\0"), "big")
        chars = [_ALPHABET[(bits >> shift) & 0x3F] for shift in (18, 12, 6, 0)]
        keep = len(chunk) + 1
        out.append("".join(chars[:keep]) + "=" * (4 - keep))
    return "".join(out)


def b64url_decode(text: str) -> bytes:
    """Go's base64.URLEncoding.DecodeString, including its error offsets.

    Python's urlsafe_b64decode silently drops characters outside the alphabet, so it would
    accept tokens fleet refuses. Go skips CR and LF anywhere, and wants full padding.
    """
    # Go works on bytes: error offsets count UTF-8 bytes, so index a byte-per-char string.
    text = text.encode("utf-8", "surrogatepass").decode("latin-1")
    out = bytearray()
    i = 0
    n = len(text)
    while True:
        quantum: list[int] = []
        padded = False
        while len(quantum) < 4:
            if i == n:
                if not quantum:
                    return bytes(out)
                # A partial quantum at the end: Go reports where that quantum began.
                raise BadToken(f"illegal base64 data at input byte {i - len(quantum)}")
            char = text[i]
            i += 1
            if char in "\r\n":
                continue
            if char in _DECODE:
                quantum.append(_DECODE[char])
                continue
            if char != "=" or len(quantum) < 2:
                raise BadToken(f"illegal base64 data at input byte {i - 1}")
            i = _consume_padding(text, i, len(quantum))
            padded = True
            break
        _append_quantum(out, quantum)
        if padded:
            return bytes(out)


def _consume_padding(text: str, i: int, have: int) -> int:
    """After the first "=" (at i-1) of a quantum holding `have` chars: the rest of the padding,
    then nothing but line breaks. Returns the end index."""
    n = len(text)
    if have == 2:
        while i < n and text[i] in "\r\n":
            i += 1
        if i == n:
            raise BadToken(f"illegal base64 data at input byte {n}")
        if text[i] != "=":
            raise BadToken(f"illegal base64 data at input byte {i - 1}")
        i += 1
    while i < n and text[i] in "\r\n":
        i += 1
    if i < n:
        raise BadToken(f"illegal base64 data at input byte {i}")
    return i


def _append_quantum(out: bytearray, quantum: list[int]) -> None:
    bits = 0
    for value in quantum:
        bits = (bits << 6) | value
    bits <<= 6 * (4 - len(quantum))
    out.extend(bits.to_bytes(3, "big")[: len(quantum) - 1])


def decode_token(text: str) -> PageToken:
    """A token from its text; BadToken for bad base64 or a length other than 4 bytes.

    fleet read the first 4 bytes and ignored the rest; a longer token is refused here, since
    no server ever made one.
    """
    data = b64url_decode(text)
    if len(data) != 4:
        raise BadToken(f"page token must decode to 4 bytes, got {len(data)}")
    limit, page = struct.unpack("<HH", data)
    return PageToken(limit, page)


def find_page_token(query: MultiMapping[str], token_limit: int) -> PageToken:
    """The token a list request asks for, or the first page; ApiError 400 on a bad one.

    The checks and their messages are fleet's (findNextPageToken, validatePageToken), except
    that decoding errors say which parameter was wrong instead of a bare Go error.
    """
    values = query.getall(TOKEN_PARAM, [])
    if len(values) > 1:
        raise ApiError(400, "too many values for page token")
    if not values:
        return PageToken(token_limit, 1)
    try:
        token = decode_token(values[0])
    except BadToken as e:
        raise ApiError(400, f"invalid {TOKEN_PARAM}: {e}") from None
    if token.limit != token_limit:
        raise ApiError(400, f"token limit must be {token_limit}")
    if token.page == 0:
        raise ApiError(400, "token page must be greater than zero")
    return token


def page_of(items: Sequence[T], token: PageToken) -> tuple[Sequence[T], PageToken | None]:
    """fleet's extract*PageData: the token's slice of `items`, and the next page's token."""
    total = len(items)
    start = (token.page - 1) * token.limit
    stop = token.page * token.limit
    if start >= total:
        return (), None
    if stop > total:
        return items[start:total], None
    # A page number past uint16 cannot be encoded; fleet's would have wrapped to page 0.
    next_token = token.next() if token.page < _UINT16_MAX else None
    return items[start:stop], next_token
