"""The aiohttp application: fleet's routing (api/mux.go, reference §6.1), 503 until the
machine is registered, the `Server` header, and errors as fleet's JSON.

Routing is one catch-all route and the pure `resolve`, not aiohttp's router: fleet's rules
(404 vs 405 per path, exact paths only, no trailing slashes, an item is one path segment of
the *decoded* path, as Go's ServeMux matched) are simpler to state, and to test as a table,
than to coax out of a router. Resources are mounted under `/fleet/v1` and `/v1-alpha`.

| path (under each prefix) | methods | else |
| --- | --- | --- |
| `` (the prefix itself), and `/` | none | 405 |
| `/discovery`, `/discovery.json` (ours) | GET | 405 (fleet: 400) |
| `/openapi.json` (ours: fleetd/api/openapi.json) | GET | 405 |
| `/units` | GET | 405 |
| `/units/<name>` | GET PUT DELETE | 405 |
| `/state` | GET | 405 |
| `/state/<name>` | GET | 405 |
| `/machines` | GET PATCH | 405 |
| `/plan` (ours: what-if, fleetd/api/whatif.py) | POST | 405 |
| `/why/<name>` (ours) | GET | 405 |
| `/metrics` (as fleet), `/health` (ours): top level, also before registering | GET HEAD | 405 |
| anything else | | 404 |
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from aiohttp import web

from fleetd.api import cordons, discovery, machines, openapi, state, units, whatif
from fleetd.api.context import ApiContext
from fleetd.api.errors import ApiError, error_response, json_bytes, method_not_allowed
from fleetd.errors import QuotaExceeded, RegistryUnavailable

log = structlog.get_logger("fleetd.api")

PREFIXES = ("/fleet/v1", "/v1-alpha")
UNAVAILABLE = "fleet server unable to communicate with etcd"
CONTEXT_KEY = web.AppKey("fleet_api_context", ApiContext)

Handler = Callable[[ApiContext, web.Request, str], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Resource:
    name: str
    methods: dict[str, Handler]
    refused: str  # fleet's 405 message
    gated: bool = True  # answers 503 until the machine is registered


@dataclass(frozen=True, slots=True)
class Route:
    resource: Resource | None  # None: 404
    item: str = ""


async def _metrics(ctx: ApiContext, request: web.Request, item: str) -> web.StreamResponse:
    if ctx.metrics is None:
        raise ApiError(404, "metrics are not enabled")
    await ctx.metrics.refresh(ctx.registry)
    body = ctx.metrics.render()
    response = web.Response(body=body)
    # Set as a header: prometheus' type has a version parameter aiohttp's content_type refuses.
    response.headers["Content-Type"] = ctx.metrics.content_type
    return response


async def _health(ctx: ApiContext, request: web.Request, item: str) -> web.StreamResponse:
    registered = ctx.registered()
    body = {
        "status": "ok" if registered else "unavailable",
        "machine": ctx.machine_id,
        "registered": registered,
        "leader": ctx.is_leader(),
    }
    if not registered:
        body["reason"] = UNAVAILABLE
    return web.Response(
        body=json_bytes(body), status=200 if registered else 503, content_type="application/json"
    )


_ONLY_GET = "only GET supported against this resource"
DISCOVERY = Resource(
    "discovery", {"GET": discovery.get_discovery}, "only HTTP GET supported against this resource"
)
OPENAPI = Resource("openapi", {"GET": openapi.get_openapi}, _ONLY_GET)
UNITS = Resource("units", {"GET": units.list_units}, _ONLY_GET)
UNIT = Resource(
    "unit",
    {"GET": units.get_unit, "PUT": units.put_unit, "DELETE": units.delete_unit},
    "only GET, PUT and DELETE supported against this resource",
)
STATES = Resource("states", {"GET": state.list_states}, _ONLY_GET)
STATE = Resource("state", {"GET": state.get_state}, _ONLY_GET)
MACHINES = Resource(
    "machines",
    {"GET": machines.list_machines, "PATCH": machines.patch_machines},
    "only GET and PATCH supported against this resource",
)
CORDONS = Resource("cordons", {"GET": cordons.list_cordons}, _ONLY_GET)
CORDON = Resource(
    "cordon",
    {"PUT": cordons.put_cordon, "DELETE": cordons.delete_cordon},
    "only PUT and DELETE supported against this resource",
)
PLAN = Resource("plan", {"POST": whatif.post_plan}, "only POST supported against this resource")
WHY = Resource("why", {"GET": whatif.get_why}, _ONLY_GET)
ROOT = Resource("root", {}, "method not allowed: the fleet API is under /fleet/v1/")
METRICS = Resource(
    "metrics", {"GET": _metrics, "HEAD": _metrics}, "only GET supported", gated=False
)
HEALTH = Resource("health", {"GET": _health, "HEAD": _health}, "only GET supported", gated=False)

_COLLECTIONS = {"units": UNITS, "state": STATES, "machines": MACHINES, "cordons": CORDONS}
_ITEMS = {"units": UNIT, "state": STATE, "why": WHY, "cordons": CORDON}
_FIXED = {
    "discovery": DISCOVERY,
    "discovery.json": DISCOVERY,
    "openapi.json": OPENAPI,
    "plan": PLAN,
} | _COLLECTIONS
_TOP = {"/": ROOT, "/metrics": METRICS, "/health": HEALTH}


def route_table(prefix: str = PREFIXES[0]) -> list[tuple[str, Resource]]:
    """Every path `resolve` serves under `prefix` (and at the top level), an item as `{}`:
    what the OpenAPI document must describe (tests/unit/test_api_openapi.py)."""
    table = [*_TOP.items(), (prefix, ROOT)]
    table += [(f"{prefix}/{name}", resource) for name, resource in _FIXED.items()]
    table += [(f"{prefix}/{name}/{{}}", resource) for name, resource in _ITEMS.items()]
    return table


def resolve(path: str) -> Route:
    """The resource a decoded request path names (see the module docstring)."""
    if path in _TOP:
        return Route(_TOP[path])
    for prefix in PREFIXES:
        if path == prefix:
            return Route(ROOT)
        if not path.startswith(prefix + "/"):
            continue
        rest = path[len(prefix) + 1 :]
        if rest in _FIXED:
            return Route(_FIXED[rest])
        collection, slash, item = rest.partition("/")
        if slash and item and "/" not in item and collection in _ITEMS:
            return Route(_ITEMS[collection], item)
        break
    return Route(None)


async def dispatch(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT_KEY]
    route = resolve(request.path)
    resource = route.resource
    if resource is None:
        raise ApiError(404, "not found")
    if resource.gated and not ctx.registered():
        raise ApiError(503, UNAVAILABLE)
    handler = resource.methods.get(request.method)
    if handler is None:
        raise method_not_allowed(tuple(resource.methods), resource.refused)
    return await handler(ctx, request, route.item)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure becomes fleet's JSON error; nothing unexpected leaks its details."""
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e.status, e.message, e.headers)
    except QuotaExceeded as e:
        # etcd answered, so "unable to communicate" would mislead: its own words and the fix.
        log.warning("api_registry_full", path=request.path, error=str(e))
        return error_response(503, str(e))
    except RegistryUnavailable as e:
        log.warning("api_registry_unavailable", path=request.path, error=str(e))
        return error_response(503, f"{UNAVAILABLE}: {e}")
    except web.HTTPException as e:
        # aiohttp's own refusals (e.g. a malformed request line it still dispatched).
        allow = e.headers.get("Allow")
        return error_response(e.status, e.reason, {"Allow": allow} if allow else None)
    except ConnectionResetError:
        raise  # the client went away mid-request: nobody to answer, nothing to report
    except Exception:
        log.exception("api_internal_error", method=request.method, path=request.path)
        return error_response(500, "internal server error (see fleetd's log)")


def make_app(ctx: ApiContext) -> web.Application:
    app = web.Application(middlewares=[errors_middleware])
    app[CONTEXT_KEY] = ctx
    app.router.add_route("*", "/{tail:.*}", dispatch)
    server = f"fleetd/{ctx.version}"

    async def server_header(request: web.Request, response: web.StreamResponse) -> None:
        # On every response, errors included (fleet's serverInfoMiddleware).
        response.headers["Server"] = server

    app.on_response_prepare.append(server_header)

    async def close_context(app: web.Application) -> None:
        await ctx.close()

    app.on_cleanup.append(close_context)
    return app
