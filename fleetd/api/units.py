"""`/units` and `/units/<name>`: list, get, create/replace/set-state (PUT), destroy.

PUT follows fleet's decision logic (api/units.go `set`, reference §6.3) and its messages,
with fleet's quirks fixed (reference §9.14):

- an invalid desiredState is a 400 on every path (fleet: a 500 on create, and on update it
  was stored, after which every read of that unit failed);
- a replacement (existing unit, different options) is validated like a creation (fleet
  skipped ValidateOptions there);
- a template cannot be created already loaded or launched (fleet only refused it on update);
- [X-Fleet] options fleet silently ignored (unknown keys, malformed values, see
  `fleetd.unit.xfleet.check_requirements`) are a 400 naming the option.

The decision is the pure `plan_put`; the handler only reads the body and applies the plan.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from fleetd.api.body import (
    check_content_type,
    decode_json,
    field,
    json_type,
    read_body,
    string_field,
)
from fleetd.api.context import ApiContext
from fleetd.api.errors import ApiError, json_bytes, json_response
from fleetd.api.pagination import find_page_token, page_of
from fleetd.api.snapshots import encode_page
from fleetd.errors import Conflict, InvalidInput, NotFound
from fleetd.model import TargetState
from fleetd.unit.file import UnitFile
from fleetd.unit.names import UnitNameInfo, validate_name
from fleetd.unit.xfleet import check_requirements, validate_options
from fleetd.views import UnitView, load_unit_view, unit_to_api

# A PUT body is the unit's options as JSON: each option costs ~40 bytes of framing
# ({"section":"","name":"","value":""},) against 2 in the unit text ("=" and a newline), so
# a unit of max_unit_bytes made of many tiny options needs up to ~12x that as JSON. Larger
# bodies are refused unread; the unit's own size is checked exactly once it is parsed.
JSON_FRAMING_FACTOR = 12
BODY_SLACK = 64 * 1024

STATES = ", ".join(s.value for s in TargetState)


def _q(text: str) -> str:
    """Go's %q for the names in fleet's messages (close enough: JSON string syntax)."""
    return json.dumps(text, ensure_ascii=False)


# ---- the PUT decision ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnitRequest:
    """A decoded PUT body: the name (from the body or the URL), the options if any were given
    (fleet: an empty list is "none"), and the desired state if one was given."""

    name: str
    unit: UnitFile | None
    desired: TargetState | None


@dataclass(frozen=True, slots=True)
class Create:
    unit: UnitFile
    state: TargetState
    replace: bool  # True: overwrite an existing unit whose options differ


@dataclass(frozen=True, slots=True)
class SetState:
    state: TargetState


PutPlan = Create | SetState


def _check_activation(name: str, state: TargetState) -> None:
    info = UnitNameInfo.parse(name)
    if state is not TargetState.INACTIVE and info is not None and info.is_template:
        raise ApiError(400, f"cannot activate template {_q(name)}")


def plan_put(request: UnitRequest, existing_hash: str | None) -> PutPlan:
    """What a PUT does, given the stored unit's hash (None: no such unit); ApiError if refused.

    Rows of fleet's table: not existing + no options -> 409; not existing -> create (201);
    existing + different options -> replace (201); otherwise a desired state is required (409)
    and is set (204). A replaced unit takes the request's state, or inactive, as in fleet.
    """
    name, unit, desired = request.name, request.unit, request.desired
    if existing_hash is None:
        if unit is None:
            raise ApiError(409, "unit does not exist and options field empty")
        state = desired or TargetState.INACTIVE
        _check_activation(name, state)
        return Create(unit, state, replace=False)
    if unit is not None and unit.hash != existing_hash:
        state = desired or TargetState.INACTIVE
        _check_activation(name, state)
        return Create(unit, state, replace=True)
    if desired is None:
        raise ApiError(409, "must provide DesiredState to update existing unit")
    _check_activation(name, desired)
    return SetState(desired)


# ---- decoding (runs in an executor: bodies may be megabytes) --------------------------------


def _options(value: Any) -> UnitFile | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValueError(f"Unit field 'options' must be an array, got {json_type(value)}")
    entries = []
    for index, entry in enumerate(value):
        if not isinstance(entry, Mapping):
            raise ValueError(f"option {index}: expected an object, got {json_type(entry)}")
        entity = f"option {index}"
        entries.append({k: string_field(entry, k, entity) for k in ("section", "name", "value")})
    return UnitFile.from_options(entries) if entries else None


def parse_unit_request(data: bytes, item: str) -> UnitRequest:
    """Decode and check a PUT body against the URL's unit name; ApiError 400 if bad."""
    try:
        obj = decode_json(data)
        if obj is None:  # Go decodes `null` into a struct as "no fields"
            obj = {}
        if not isinstance(obj, dict):
            raise ValueError(f"expected a Unit object, got {json_type(obj)}")
        name = string_field(obj, "name", "Unit")
        desired_text = string_field(obj, "desiredState", "Unit")
        # Read-only fields: ignored, as in fleet, but a wrong type was a decode error there.
        string_field(obj, "currentState", "Unit")
        string_field(obj, "machineID", "Unit")
        unit = _options(field(obj, "options"))
    except ValueError as e:  # includes UnitFileError from from_options
        raise ApiError(400, f"unable to decode body: {e}") from None
    name = name or item
    if name != item:
        raise ApiError(
            400, f"name in URL {_q(item)} differs from unit name in request body {_q(name)}"
        )
    try:
        validate_name(name)
    except InvalidInput as e:
        raise ApiError(400, str(e)) from None
    desired = None
    if desired_text:
        try:
            desired = TargetState(desired_text)
        except ValueError:
            raise ApiError(
                400, f"invalid desiredState {_q(desired_text)}: must be one of {STATES}"
            ) from None
    return UnitRequest(name, unit, desired)


def check_new_unit(name: str, unit: UnitFile, max_bytes: int) -> None:
    """What a unit must pass before it is stored as `name`: the size limit (413), then
    fleet's ValidateOptions and (beyond fleet) the [X-Fleet] input checks (400).

    The API has no opt-out for unknown [X-Fleet] options (fleetctl's --allow-unknown-options
    works with the etcd driver only): a client that misspells an option learns it here."""
    size = len(unit.serialize().encode("utf-8"))
    if size > max_bytes:
        raise ApiError(413, f"unit file too large: {size} bytes (max {max_bytes})")
    try:
        validate_options(unit)
        check_requirements(unit, name)
    except InvalidInput as e:
        raise ApiError(400, str(e)) from None


def _encode_unit(view: UnitView) -> bytes:
    return json_bytes(unit_to_api(view))


# ---- handlers --------------------------------------------------------------------------------


async def list_units(ctx: ApiContext, request: web.Request, item: str) -> web.StreamResponse:
    token = find_page_token(request.query, ctx.token_limit)
    listing = await ctx.live_items("units")
    items, next_token = page_of(listing, token)
    # An empty page is `{}`, as fleet's omitempty writes it.
    body = encode_page(items, "units", next_token.encode() if next_token else None)
    return json_response(body)


async def get_unit(ctx: ApiContext, request: web.Request, item: str) -> web.StreamResponse:
    view = await load_unit_view(ctx.registry, item)
    if view is None:
        raise ApiError(404, "unit does not exist")
    return json_response(await ctx.offload(_encode_unit, view))


async def delete_unit(ctx: ApiContext, request: web.Request, item: str) -> web.StreamResponse:
    if not await ctx.registry.destroy_unit(item):
        raise ApiError(404, "unit does not exist")
    return web.Response(status=204)


async def put_unit(ctx: ApiContext, request: web.Request, item: str) -> web.StreamResponse:
    check_content_type(request)
    limit = ctx.max_unit_bytes * JSON_FRAMING_FACTOR + BODY_SLACK
    data = await read_body(request, limit, "request body")
    unit_request = await ctx.offload(parse_unit_request, data, item)
    name = unit_request.name
    existing = await ctx.registry.get_unit(name)
    plan = plan_put(unit_request, existing.hash if existing is not None else None)
    if isinstance(plan, SetState):
        try:
            await ctx.registry.set_target_state(name, plan.state)
        except NotFound:
            raise ApiError(404, "unit does not exist") from None  # destroyed meanwhile
        except Conflict as e:
            raise ApiError(409, str(e)) from None
        return web.Response(status=204)
    await ctx.offload(check_new_unit, name, plan.unit, ctx.max_unit_bytes)
    if not await ctx.registry.create_unit(name, plan.unit, plan.state, replace=plan.replace):
        # Only a create (not a replace) can lose: someone created the unit meanwhile.
        raise ApiError(409, f"unit {_q(name)} was created by another request meanwhile; retry")
    return web.Response(status=201)
