"""The OpenAPI 3.0 document of the API, served at `/fleet/v1/openapi.json` beside fleet's
discovery document.

The document is hand-written (fleetd/api/openapi.json, shipped as package data) and read once,
at the first request; tests/unit/test_api_openapi.py checks it against the routing table and
the responses the handlers give.
"""

from __future__ import annotations

import functools
from importlib import resources

from aiohttp import web

from fleetd.api.context import ApiContext
from fleetd.api.errors import json_response

RESOURCE = "openapi.json"


@functools.cache
def document() -> bytes:
    """The document's bytes, as shipped."""
    return resources.files("fleetd.api").joinpath(RESOURCE).read_bytes()


async def get_openapi(ctx: ApiContext, request: web.Request, item: str) -> web.StreamResponse:
    return json_response(document())
