"""`/state` (paginated, filtered) and `/state/<unit>`: systemd states the agents publish.

Filters are fleet's: `machineID` and `unitName` match exactly, only the first value of each
counts, and an empty value means no filter. `GET /state/<unit>` answers the state from the
first machine (by id) that publishes one; fleet crashed the connection when there was none
(reference §9.14), here it is a 404.
"""

from __future__ import annotations

from aiohttp import web

from fleetd.api.context import ApiContext
from fleetd.api.errors import ApiError, json_bytes, json_response
from fleetd.api.pagination import find_page_token, page_of
from fleetd.api.snapshots import encode_page
from fleetd.views import load_state_views, state_to_api


async def _state_listing(ctx: ApiContext, unit: str | None, machine: str | None) -> list[bytes]:
    views = await load_state_views(ctx.registry, unit, machine)
    # The registry reads the unit's key prefix; a name holding "/" must not reach into
    # another unit's keys, so match the name exactly as well.
    return [json_bytes(state_to_api(v)) for v in views if unit is None or v.name == unit]


async def list_states(ctx: ApiContext, request: web.Request, item: str) -> web.StreamResponse:
    token = find_page_token(request.query, ctx.token_limit)
    unit = request.query.get("unitName") or None
    machine = request.query.get("machineID") or None
    if unit is None and machine is None:
        listing = await ctx.live_items("states")
    else:
        listing = await ctx.listings.items(
            "states", (unit, machine), ctx.revision, lambda: _state_listing(ctx, unit, machine)
        )
    items, next_token = page_of(listing, token)
    body = encode_page(items, "states", next_token.encode() if next_token else None)
    return json_response(body)


async def get_state(ctx: ApiContext, request: web.Request, item: str) -> web.StreamResponse:
    views = [v for v in await load_state_views(ctx.registry, item) if v.name == item]
    if not views:
        raise ApiError(404, "unit state does not exist")
    return json_response(json_bytes(state_to_api(views[0])))
