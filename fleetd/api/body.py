"""Reading request bodies: size limits, fleet's Content-Type rule, and Go-like JSON fields.

fleet decoded bodies with Go's encoding/json into structs, so clients grew used to two of its
habits, which we keep: object keys match struct fields case-insensitively (fleet's own PATCH
documents send `"path"` for the field `Path`), and `null` means "not given". Unknown keys are
ignored. Everything else that Go would refuse (a wrong type) is a 400 here too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from fleetd.api.errors import JSON, ApiError


async def read_body(request: web.Request, limit: int, what: str) -> bytes:
    """The whole body, or 413 once it exceeds `limit` bytes (before reading it all).

    Read from the stream rather than with request.read(), whose client_max_size error is a
    plain-text page instead of fleet's JSON error.
    """
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(413, f"{what} too large: {length} bytes (max {limit})")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"{what} too large: more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_content_type(request: web.Request) -> None:
    """fleet's validateContentType: exactly one Content-Type header, media type JSON (415)."""
    values = request.headers.getall("Content-Type", [])
    if len(values) != 1:
        raise ApiError(415, f"expected 1 Content-Type, got {len(values)}")
    if values[0].split(";", 1)[0].strip() != JSON:
        raise ApiError(415, f"only acceptable Content-Type is {JSON}")


def decode_json(data: bytes) -> Any:
    """Parse a JSON body; ValueError (with the position) for anything that is not JSON.

    Stricter than Go's json.Decoder, which read one value and ignored what followed it.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"body is not UTF-8 (bad byte at offset {e.start})") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e}") from None


def _refuse_constant(name: str) -> Any:
    # Python accepts NaN and Infinity; JSON (and Go) do not.
    raise ValueError(f"invalid JSON: {name} is not a JSON value")


def field(obj: Mapping[str, Any], name: str) -> Any:
    """`obj[name]` matched as Go matches struct fields: exact or case-insensitive, the last
    matching key in the document winning; None when absent or null."""
    found = None
    wanted = name.lower()
    for key, value in obj.items():
        if key.lower() == wanted:
            found = value
    return found


def string_field(obj: Mapping[str, Any], name: str, entity: str) -> str:
    """A string field, "" when absent or null; ValueError naming the field otherwise."""
    value = field(obj, name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{entity} field {name!r} must be a string, got {json_type(value)}")
    return value


def json_type(value: Any) -> str:
    """How a decoded JSON value is named in messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string"
