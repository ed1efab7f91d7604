"""`/cordons` (beyond fleet): machines taken out of placement, and drains.

`GET /fleet/v1/cordons` lists them ({"cordons": [{"machineID", "reason", "drain", "deadline",
"since"}]}); `PUT /fleet/v1/cordons/<machine id>` with {"reason", "drain", "deadline"} cordons
(or, with "drain": true, drains) a registered machine, answering 204; `DELETE` uncordons (also
ending a drain), 404 if it was not cordoned. The engine does the moving; this only records it.
"""

from __future__ import annotations

import time
from dataclasses import replace

from aiohttp import web

from fleetd.api.body import check_content_type, decode_json, read_body
from fleetd.api.context import ApiContext
from fleetd.api.errors import ApiError, json_bytes, json_response
from fleetd.errors import InvalidInput
from fleetd.views import cordon_from_api, cordon_to_api

CORDON_BODY_LIMIT = 4096


async def list_cordons(ctx: ApiContext, request: web.Request, item: str) -> web.StreamResponse:
    cordons = await ctx.registry.cordons()
    body = {
        "cordons": [
            {"machineID": machine_id, **cordon_to_api(cordons[machine_id])}
            for machine_id in sorted(cordons)
        ]
    }
    return json_response(json_bytes(body))


async def put_cordon(ctx: ApiContext, request: web.Request, item: str) -> web.StreamResponse:
    check_content_type(request)
    data = await read_body(request, CORDON_BODY_LIMIT, "request body")
    try:
        cordon = cordon_from_api(item, decode_json(data) if data.strip() else {})
    except InvalidInput as e:
        raise ApiError(400, str(e)) from None
    machines = {m.id for m in await ctx.registry.list_machines()}
    if item not in machines:
        raise ApiError(404, f"machine {item} is not registered")
    if not cordon.since:
        cordon = replace(cordon, since=time.time())
    if not cordon.drain:
        await ctx.registry.cordon(cordon)
        return web.Response(status=204)
    try:
        refused = await ctx.registry.drain(cordon)
    except InvalidInput as e:  # the cluster's maintenance-limit setting is unreadable
        raise ApiError(409, f"cannot drain {item}: {e}") from None
    if refused is not None:
        raise ApiError(409, f"cannot drain {item}: {refused}")
    return web.Response(status=204)


async def delete_cordon(ctx: ApiContext, request: web.Request, item: str) -> web.StreamResponse:
    if not await ctx.registry.uncordon(item):
        raise ApiError(404, f"machine {item} is not cordoned")
    return web.Response(status=204)
