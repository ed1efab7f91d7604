"""`/machines`: list (paginated) and PATCH of dynamic metadata (reference §6.4).

PATCH takes fleet's JSON-Patch-like list:
`[{"op": "add"|"remove"|"replace", "path": "/<machine-id>/metadata/<key>", "value": ...}]`.
fleet decoded `value` into a struct, so its clients send `{"value": "<str>"}`; its docs show a
bare string, which fleet refused. Both are accepted here. Every op is checked before any is
applied (fleet's order and messages), so a bad document changes nothing. Machines need not
exist (metadata may be set before a machine joins), as in fleet.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from fleetd.api.body import decode_json, field, json_type, read_body
from fleetd.api.context import ApiContext
from fleetd.api.errors import ApiError, json_response
from fleetd.api.pagination import find_page_token, page_of
from fleetd.api.snapshots import encode_page

# fleet's metadataPathRegex. `\Z`, not `$`: Python's `$` also matches before a final newline,
# which would let "/m/metadata/key\n" through (Go's `$` does not).
METADATA_PATH = re.compile(r"^/([^/]+)/metadata/([A-Za-z0-9_.-]+)\Z")
OPS = ("add", "remove", "replace")
PATCH_BODY_LIMIT = 1024 * 1024


@dataclass(frozen=True, slots=True)
class MetadataOp:
    machine_id: str
    key: str
    value: str | None  # None: remove


def _value(raw: Any, index: int) -> str:
    """The value of op `index`: a string, {"value": string} (fleet's clients), or absent."""
    if isinstance(raw, Mapping):
        raw = field(raw, "value")
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raise ApiError(
            400,
            f'invalid value in op {index}: expect a string or {{"value": string}},'
            f" got {json_type(raw)}",
        )
    return raw


def parse_patch(data: bytes) -> list[MetadataOp]:
    """Decode and validate a PATCH document; ApiError 400 with fleet's messages if bad."""
    try:
        doc = decode_json(data)
    except ValueError as e:
        raise ApiError(400, f"unable to decode body: {e}") from None
    if doc is None:  # Go decodes `null` into a nil slice: nothing to do
        return []
    if not isinstance(doc, list):
        raise ApiError(
            400, f"unable to decode body: expected an array of ops, got {json_type(doc)}"
        )
    ops = []
    for index, raw in enumerate(doc):
        if not isinstance(raw, Mapping):
            raise ApiError(400, f"unable to decode body: op {index} is {json_type(raw)}")
        op, path = field(raw, "op"), field(raw, "path")
        if op not in OPS:
            raise ApiError(400, "invalid op: expect add, remove, or replace")
        match = METADATA_PATH.match(path) if isinstance(path, str) else None
        if match is None:
            raise ApiError(400, "machine metadata path invalid")
        value = _value(field(raw, "value"), index)
        if op != "remove" and not value:
            raise ApiError(400, "invalid value: add and replace require a value")
        ops.append(MetadataOp(match[1], match[2], None if op == "remove" else value))
    return ops


async def list_machines(ctx: ApiContext, request: web.Request, item: str) -> web.StreamResponse:
    token = find_page_token(request.query, ctx.token_limit)
    listing = await ctx.live_items("machines")
    items, next_token = page_of(listing, token)
    # fleet's MachinePage lists the machines before the token.
    body = encode_page(
        items, "machines", next_token.encode() if next_token else None, token_first=False
    )
    return json_response(body)


async def patch_machines(ctx: ApiContext, request: web.Request, item: str) -> web.StreamResponse:
    # No Content-Type check: fleet had none here, and its clients rely on that.
    data = await read_body(request, PATCH_BODY_LIMIT, "request body")
    ops = await ctx.offload(parse_patch, data)
    for op in ops:
        await ctx.registry.set_machine_metadata(op.machine_id, op.key, op.value)
    return web.Response(status=204)
