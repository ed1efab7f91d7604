"""`POST /plan` and `GET /why/<name>`: the engine's planner asked "what if?" (beyond fleet).

`plan` answers what starting some units (`units`: API Unit objects, as PUT takes them) and
losing some machines (`kill`: machine ids or unique prefixes) would do, computed by the
engine's own planner on a snapshot of the registry (fleetd/engine/whatif.py); `why` explains,
machine by machine, why a unit is placed where it is or not at all. Neither writes anything.

A Unit in `units` is checked as a PUT's would be (name, size, options, [X-Fleet]); without
options it names a unit already stored, whose body is used. `desiredState` defaults to
`launched` (what `fleetctl start` sets). The planning runs in the executor: at 10,000 units it
costs a few hundred milliseconds of CPU, which must not stall the agent and engine sharing this
loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from fleetd import whatif_load
from fleetd.api.body import check_content_type, decode_json, field, json_type, read_body
from fleetd.api.context import ApiContext
from fleetd.api.errors import ApiError, json_bytes, json_response
from fleetd.api.units import BODY_SLACK, JSON_FRAMING_FACTOR, STATES, check_new_unit
from fleetd.engine.whatif import (
    Explanation,
    Prediction,
    Start,
    explanation_to_api,
    prediction_to_api,
)
from fleetd.errors import InvalidInput
from fleetd.model import TargetState
from fleetd.unit.file import UnitFile
from fleetd.unit.names import validate_name


@dataclass(frozen=True, slots=True)
class PlanRequest:
    starts: tuple[Start, ...]
    kill: tuple[str, ...]
    drain: tuple[str, ...] = ()


def _string(obj: Mapping[str, Any], name: str, entity: str) -> str:
    value = field(obj, name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ApiError(400, f"{entity}: field {name!r} must be a string, got {json_type(value)}")
    return value


def _start(obj: Any, index: int, max_unit_bytes: int) -> Start:
    entity = f"units[{index}]"
    if not isinstance(obj, Mapping):
        raise ApiError(400, f"{entity}: expected a Unit object, got {json_type(obj)}")
    name = _string(obj, "name", entity)
    if not name:
        raise ApiError(400, f"{entity}: field 'name' is required")
    try:
        validate_name(name)
    except InvalidInput as e:
        raise ApiError(400, f"{entity}: {e}") from None
    desired = _string(obj, "desiredState", entity) or TargetState.LAUNCHED.value
    try:
        state = TargetState(desired)
    except ValueError:
        raise ApiError(
            400, f"{entity}: invalid desiredState {desired!r}: must be one of {STATES}"
        ) from None
    options = field(obj, "options")
    if options is not None and not isinstance(options, list):
        raise ApiError(400, f"{entity}: field 'options' must be an array")
    body = None
    if options:
        entries = []
        for i, option in enumerate(options):
            if not isinstance(option, Mapping):
                raise ApiError(400, f"{entity}: option {i}: expected an object")
            entries.append({k: _string(option, k, f"{entity} option {i}") for k in _OPTION})
        try:
            body = UnitFile.from_options(entries)
        except InvalidInput as e:
            raise ApiError(400, f"{entity}: {e}") from None
        check_new_unit(name, body, max_unit_bytes)  # 413 / 400, as a PUT of it would be
    return Start(name, body, state)


_OPTION = ("section", "name", "value")


def parse_plan_request(data: bytes, max_unit_bytes: int) -> PlanRequest:
    """Decode and check a plan body; ApiError (400, 413) if it is bad."""
    try:
        obj = decode_json(data)
    except ValueError as e:
        raise ApiError(400, f"unable to decode body: {e}") from None
    if obj is None:
        obj = {}
    if not isinstance(obj, Mapping):
        raise ApiError(400, f"unable to decode body: expected an object, got {json_type(obj)}")
    units = field(obj, "units")
    kill = field(obj, "kill")
    drain = field(obj, "drain")
    units = [] if units is None else units
    kill = [] if kill is None else kill
    drain = [] if drain is None else drain
    if not isinstance(units, list):
        raise ApiError(400, "field 'units' must be an array of Unit objects")
    if not isinstance(kill, list) or not all(isinstance(k, str) for k in kill):
        raise ApiError(400, "field 'kill' must be an array of machine IDs")
    if not isinstance(drain, list) or not all(isinstance(k, str) for k in drain):
        raise ApiError(400, "field 'drain' must be an array of machine IDs")
    starts = tuple(_start(u, i, max_unit_bytes) for i, u in enumerate(units))
    return PlanRequest(starts, tuple(kill), tuple(drain))


async def post_plan(ctx: ApiContext, request: web.Request, item: str) -> web.StreamResponse:
    check_content_type(request)
    limit = ctx.max_unit_bytes * JSON_FRAMING_FACTOR + BODY_SLACK
    data = await read_body(request, limit, "request body")
    plan_request = await ctx.offload(parse_plan_request, data, ctx.max_unit_bytes)
    try:
        prediction = await whatif_load.predict(
            ctx.registry,
            plan_request.starts,
            plan_request.kill,
            drain=plan_request.drain,
            offload=ctx.offload,
        )
    except InvalidInput as e:  # an unknown machine or unit, bad [X-Fleet] options
        raise ApiError(400, str(e)) from None
    return json_response(await ctx.offload(_encode_prediction, prediction))


async def get_why(ctx: ApiContext, request: web.Request, item: str) -> web.StreamResponse:
    explanation = await whatif_load.explain(ctx.registry, item, offload=ctx.offload)
    if explanation is None:
        raise ApiError(404, "unit does not exist")
    return json_response(await ctx.offload(_encode_explanation, explanation))


def _encode_prediction(prediction: Prediction) -> bytes:
    return json_bytes(prediction_to_api(prediction))


def _encode_explanation(explanation: Explanation) -> bytes:
    return json_bytes(explanation_to_api(explanation))
