"""The API driver: `ClusterClient` over fleetd's HTTP API v1 (reference §1.3, §6).

Request shapes are fleet's, so this client also works against an original fleetd:
`?alt=json` on every call, JSON bodies with `Content-Type: application/json`, list calls
follow `nextPageToken` until it is empty, and a 404 on `GET units/<n>` means "no such unit".
A unix endpoint is dialled directly (the HTTP Host is then `domain-sock`, as fleet's).

Unlike fleet's client, every request is bounded by `--request-timeout` (§9.22).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp

from fleetd import __version__
from fleetd.engine.whatif import (
    Explanation,
    Prediction,
    Start,
    explanation_from_api,
    prediction_from_api,
)
from fleetd.errors import Conflict, FleetError, InvalidInput, NotFound, RegistryUnavailable
from fleetd.model import Cordon, TargetState
from fleetd.unit.file import UnitFile
from fleetd.views import (
    MachineView,
    StateView,
    UnitView,
    machine_from_api,
    option_to_api,
    state_from_api,
    unit_from_api,
)

T = TypeVar("T")

API_PATH = "fleet/v1/"
# fleet's clients stop after this many pages; a server that keeps answering with tokens is
# broken, and following it forever would hang the command.
MAX_PAGES = 10_000

# stdlib logging, as in fleetctl/ssh/: records show only once fleetctl's main() set up
# logging (and only with --debug); fleetctl used as a library stays silent.
log = logging.getLogger(__name__)


class ApiError(FleetError):
    """The API answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        detail = message or "(no message)"
        super().__init__(f"API error {status}: {detail}")
        self.status = status
        self.message = detail


def base_url(endpoint: str, unix_socket: str | None) -> str:
    """`<endpoint path>/fleet/v1/`; for a unix socket the host is fleet's `domain-sock`."""
    if unix_socket is not None:
        return f"http://domain-sock/{API_PATH}"
    parts = urlsplit(endpoint)
    path = parts.path.rstrip("/") + "/" + API_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class ApiClient:
    def __init__(
        self,
        endpoint: str,
        *,
        unix_socket: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = 3.0,
    ) -> None:
        self.base = base_url(endpoint, unix_socket)
        self._unix_socket = unix_socket
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self.server = ""  # the last answer's Server header: `fleetd/<version>`

    def _open(self) -> aiohttp.ClientSession:
        # Created on first use: an aiohttp session belongs to the running event loop.
        if self._session is None:
            connector: aiohttp.BaseConnector
            if self._unix_socket is not None:
                connector = aiohttp.UnixConnector(path=self._unix_socket)
            else:
                connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl else True)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                headers={"User-Agent": f"fleetctl/{__version__}"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
    ) -> tuple[int, Any]:
        """(status, decoded JSON or None) of a 2xx or 404; ApiError for other statuses."""
        session = self._open()
        query = {"alt": "json", **(params or {})}
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body, separators=(",", ":"))
            headers["Content-Type"] = "application/json"
        extra: dict[str, Any] = {}
        if self._server_hostname is not None:
            extra["server_hostname"] = self._server_hostname
        started = time.perf_counter()
        try:
            async with session.request(
                method, self.base + path, params=query, data=data, headers=headers, **extra
            ) as response:
                text = await response.text()
                status = response.status
                self.server = response.headers.get("Server", "")
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            where = self._unix_socket or self.base
            log.debug("api_request method=%s path=%s error=%s", method, path, e)
            raise RegistryUnavailable(f"unable to reach the fleet API at {where}: {e}") from e
        ms = round((time.perf_counter() - started) * 1000, 2)
        log.debug("api_request method=%s path=%s status=%s ms=%s", method, path, status, ms)
        decoded = _decode(text)
        if status < 300 or status == 404:
            return status, decoded
        raise ApiError(status, _error_message(decoded, text))

    async def _list(
        self, path: str, key: str, parse: Callable[[Any], T], **filters: str
    ) -> list[T]:
        items: list[T] = []

        def fetch(token: str) -> asyncio.Task[tuple[int, Any]]:
            params = dict(filters)
            if token:
                params["nextPageToken"] = token
            return asyncio.ensure_future(self._request("GET", path, params=params))

        # The next page is asked for before this one's items are decoded, so the server
        # works on it meanwhile (about a quarter off a 10,000-unit listing).
        pending = fetch("")
        try:
            for _ in range(MAX_PAGES):
                status, page = await pending
                if status == 404 or not isinstance(page, dict):
                    raise ApiError(status, f"unexpected answer to GET {path}")
                token = page.get("nextPageToken") or ""
                if token:
                    pending = fetch(token)
                    await asyncio.sleep(0)  # let it send the request before decoding
                items.extend(parse(obj) for obj in page.get(key) or [])
                if not token:
                    return items
            raise ApiError(200, f"GET {path} kept returning page tokens")
        finally:
            if not pending.done():  # an error above: nobody will read the next page
                pending.cancel()
                await asyncio.wait([pending])  # reaped, without raising its CancelledError

    # ---- ClusterClient -------------------------------------------------------------------

    async def machines(self) -> list[MachineView]:
        return await self._list("machines", "machines", machine_from_api)

    async def fleetd_versions(self) -> dict[str, str]:
        await self._request("GET", "machines")
        name, _, found = self.server.partition("/")
        return {"": found} if name == "fleetd" and found else {}

    async def units(self) -> list[UnitView]:
        return await self._list("units", "units", unit_from_api)

    async def unit(self, name: str) -> UnitView | None:
        status, obj = await self._request("GET", _unit_path(name))
        return None if status == 404 else unit_from_api(obj)

    async def unit_states(
        self, unit: str | None = None, machine_id: str | None = None
    ) -> list[StateView]:
        filters = {}
        if unit is not None:
            filters["unitName"] = unit
        if machine_id is not None:
            filters["machineID"] = machine_id
        return await self._list("state", "states", state_from_api, **filters)

    async def create_unit(
        self, name: str, unit_file: UnitFile, desired_state: TargetState | None = None
    ) -> None:
        body: dict[str, Any] = {
            "name": name,
            "options": [option_to_api(o) for o in unit_file.options],
        }
        if desired_state is not None:
            body["desiredState"] = desired_state.value
        await self._put(name, body)

    async def create_units(self, units: Sequence[tuple[str, UnitFile, TargetState | None]]) -> None:
        # API v1 has no call that creates several units: one PUT each, in order.
        for name, unit_file, state in units:
            await self.create_unit(name, unit_file, state)

    async def set_target_state(self, name: str, state: TargetState) -> None:
        try:
            await self._put(name, {"desiredState": state.value, "name": name})
        except ApiError as e:
            # fleet answers 409 "unit does not exist and options field empty".
            if e.status == 409:
                raise NotFound(f"unit {name} does not exist") from e
            raise

    async def _put(self, name: str, body: dict[str, Any]) -> None:
        try:
            status, _ = await self._request("PUT", _unit_path(name), body=body)
        except ApiError as e:
            if e.status == 400:
                raise InvalidInput(str(e)) from e
            raise
        if status == 404:
            raise NotFound(f"unit {name} does not exist")

    async def destroy_unit(self, name: str) -> bool:
        status, _ = await self._request("DELETE", _unit_path(name))
        return status != 404

    def corrupt_values(self) -> dict[str, str]:
        return {}  # the API server skips corrupt values on its side (and logs them)

    async def plan(
        self, starts: Sequence[Start], kill: Sequence[str], drain: Sequence[str] = ()
    ) -> Prediction:
        units = []
        for start in starts:
            unit: dict[str, Any] = {"name": start.name, "desiredState": start.state.value}
            if start.body is not None:
                unit["options"] = [option_to_api(o) for o in start.body.options]
            units.append(unit)
        try:
            status, answer = await self._request(
                "POST", "plan", body={"units": units, "kill": list(kill), "drain": list(drain)}
            )
        except ApiError as e:
            if e.status == 400:
                raise InvalidInput(str(e)) from e
            raise
        if status == 404:
            raise ApiError(404, "this fleetd has no plan endpoint (it predates fleet-py 0.2.0)")
        return prediction_from_api(answer)

    async def why(self, name: str) -> Explanation | None:
        status, answer = await self._request("GET", "why/" + quote(name, safe="@:"))
        if status == 404:
            if _error_message(answer, "") == "not found":  # the router's: no such endpoint
                raise ApiError(404, "this fleetd has no why endpoint (it predates fleet-py 0.2.0)")
            return None
        return explanation_from_api(answer)

    async def set_machine_metadata(self, machine_id: str, key: str, value: str | None) -> None:
        path = f"/{machine_id}/metadata/{key}"
        op: dict[str, Any] = {"op": "remove", "path": path}
        if value is not None:
            op = {"op": "add", "path": path, "value": {"value": value}}
        status, _ = await self._request("PATCH", "machines", body=[op])
        if status == 404:
            raise NotFound(f"machine {machine_id} does not exist")

    async def cordon(self, cordon: Cordon) -> None:
        body = {
            "reason": cordon.reason,
            "drain": cordon.drain,
            "deadline": cordon.deadline,
            "includeGlobal": cordon.include_global,
        }
        try:
            status, _ = await self._request("PUT", f"cordons/{cordon.machine_id}", body=body)
        except ApiError as e:
            if e.status == 409:
                raise Conflict(e.message) from None
            raise
        if status == 404:
            raise NotFound(f"machine {cordon.machine_id} is not registered")

    async def uncordon(self, machine_id: str) -> bool:
        status, _ = await self._request("DELETE", f"cordons/{machine_id}")
        return status != 404


def _unit_path(name: str) -> str:
    return "units/" + quote(name, safe="@:")


def _decode(text: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _error_message(decoded: Any, text: str) -> str:
    """fleet's error body is {"error": {"code": n, "message": "..."}}; else the raw text."""
    if isinstance(decoded, dict):
        error = decoded.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    return text.strip()
