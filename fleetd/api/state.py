"""`/state` (paginated, filtered) and `/state/<unit>`: systemd states the agents publish.

Filters are fleet's: `machineID` and `unitName` match exactly, only the first value of each
counts, and an empty value means no filter. `GET /state/<unit>` answers the state from the
first machine (by id) that publishes one; fleet crashed the connection when there was none
(reference §9.14), here it is a 404.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from fleetd.api.context import ApiContext
from fleetd.api.errors import ApiError, json_bytes, json_response
from fleetd.api.pagination import find_page_token, page_of
from fleetd.views import load_state_views, state_to_api


def _encode_page(states: list[dict[str, str]], token: str | None) -> bytes:
    page: dict[str, Any] = {}
    if token:
        page["nextPageToken"] = token
    if states:
        page["states"] = states
    return json_bytes(page)


async def list_states(ctx: ApiContext, request: web.Request, item: str) -> web.StreamResponse:
    token = find_page_token(request.query, ctx.token_limit)
    unit = request.query.get("unitName") or None
    machine = request.query.get("machineID") or None
    views = await load_state_views(ctx.registry, unit, machine)
    if unit is not None:
        # The registry reads the unit's key prefix; a name holding "/" must not reach into
        # another unit's keys, so match the name exactly as well.
        views = [v for v in views if v.name == unit]
    items, next_token = page_of(views, token)
    body = _encode_page(
        [state_to_api(v) for v in items], next_token.encode() if next_token else None
    )
    return json_response(body)


async def get_state(ctx: ApiContext, request: web.Request, item: str) -> web.StreamResponse:
    views = [v for v in await load_state_views(ctx.registry, item) if v.name == item]
    if not views:
        raise ApiError(404, "unit state does not exist")
    return json_response(json_bytes(state_to_api(views[0])))
