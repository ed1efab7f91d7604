"""Responses of the HTTP API: JSON bodies and fleet's error format (reference §6.5).

Every 4xx/5xx the API sends is `{"error":{"code":N,"message":"..."}}` with
`Content-Type: application/json`, as fleet's `sendError` wrote it, so fleet's clients (googleapi
and fleetctl's API driver) read our errors as they read fleet's. Handlers raise `ApiError`; the
app's middleware turns it, and anything unexpected, into that body.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

JSON = "application/json"


class ApiError(Exception):
    """An HTTP error answer: status, the message clients show, and extra headers (Allow)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


# One encoder for every call: json.dumps with non-default options builds a new encoder per
# call, which dominated encoding a listing of many small objects.
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def json_bytes(obj: Any) -> bytes:
    """Compact JSON, as Go's json.Marshal writes it.

    ASCII-escaped: a message may quote user input holding lone surrogates (valid in JSON
    text, not encodable as UTF-8), and escaping is the one encoding that cannot fail.
    """
    return _ENCODE(obj).encode("ascii")


def json_response(body: bytes, status: int = 200) -> web.Response:
    # content_type without charset: exactly what fleet sent (aiohttp adds none for bytes).
    return web.Response(body=body, status=status, content_type=JSON)


def error_body(status: int, message: str) -> bytes:
    return json_bytes({"error": {"code": status, "message": message}})


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    response = json_response(error_body(status, message), status)
    response.headers.update(headers or {})
    return response


def method_not_allowed(allowed: tuple[str, ...], message: str) -> ApiError:
    """405 with fleet's message and the Allow header HTTP requires (fleet sent none)."""
    return ApiError(405, message, {"Allow": ", ".join(allowed)})
