"""fleetctl's view of the cluster (`ClusterClient`) and the factory that picks a driver.

Two drivers implement the protocol, as in fleet (client/api.go): `RegistryClient` talks to
etcd through the shared `Registry`, `ApiClient` (fleetctl/api_client.py) to fleetd's HTTP API
v1. Commands never know which one they hold. Both return the same `fleetd.views` values,
so tables and waits behave the same whatever the driver.

Tests replace `make_client` (monkeypatch `fleetctl.client.make_client`) to hand commands a
`RegistryClient` over the in-memory KV.

Nothing here prints: what the factory has to tell the user while it connects (an ignored
endpoint, a cluster newer than this fleetctl) goes to the `warn` callback the command layer
passes (fleetctl/command.py: stderr).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from fleetctl import transport
from fleetctl.errors import CommandFailed
from fleetctl.settings import Driver, Settings, Target, select_target
from fleetd import __version__, whatif_load
from fleetd.engine.whatif import Explanation, Prediction, Start
from fleetd.errors import Conflict, FleetError, InvalidInput, NotFound
from fleetd.model import Cordon, TargetState
from fleetd.registry.instrumented import InstrumentedKV
from fleetd.registry.kv import KV
from fleetd.registry.migrations import version_key
from fleetd.registry.registry import Registry
from fleetd.unit.file import UnitFile
from fleetd.unit.names import UnitNameInfo
from fleetd.views import (
    MachineView,
    StateView,
    UnitView,
    load_machine_views,
    load_state_views,
    load_unit_view,
    load_unit_views,
)


class ClusterClient(Protocol):
    """What commands need from the cluster (fleet's client.API)."""

    async def machines(self) -> list[MachineView]:
        """Registered machines, sorted by id."""
        ...

    async def fleetd_versions(self) -> dict[str, str]:
        """machine id -> its fleetd's version; the API driver knows only the fleetd that
        answers it, under the id ""."""
        ...

    async def units(self) -> list[UnitView]:
        """Every unit, sorted by name."""
        ...

    async def unit(self, name: str) -> UnitView | None: ...

    async def unit_states(
        self, unit: str | None = None, machine_id: str | None = None
    ) -> list[StateView]:
        """Published systemd states, sorted by (unit, machine), filtered exactly."""
        ...

    async def create_unit(
        self, name: str, unit_file: UnitFile, desired_state: TargetState | None = None
    ) -> None:
        """Create `name`, or overwrite it (`--replace`); desired state `inactive` if None."""
        ...

    async def create_units(self, units: Sequence[tuple[str, UnitFile, TargetState | None]]) -> None:
        """`create_unit` for several units, all or nothing where the driver can: through etcd
        in one transaction (gc.py's chunks beyond 64 units); the API has no batch call, so
        there it is unit by unit."""
        ...

    async def set_target_state(self, name: str, state: TargetState) -> None:
        """Raises NotFound for a missing unit, InvalidInput for activating a template."""
        ...

    async def destroy_unit(self, name: str) -> bool:
        """Delete a unit; False if it did not exist."""
        ...

    async def set_machine_metadata(self, machine_id: str, key: str, value: str | None) -> None:
        """Set (or with None remove) one dynamic metadata key of a machine."""
        ...

    def corrupt_values(self) -> dict[str, str]:
        """key -> error of every stored value skipped so far because it does not decode
        (the etcd driver's; the API server skips them on its side and logs them)."""
        ...

    async def cordon(self, cordon: Cordon) -> None:
        """Cordon (or drain) a registered machine; NotFound if it is not registered, Conflict
        if a drain finds no free maintenance slot (the reason names who holds them)."""
        ...

    async def uncordon(self, machine_id: str) -> bool:
        """Make a machine schedulable again; False if it was not cordoned."""
        ...

    async def plan(
        self, starts: Sequence[Start], kill: Sequence[str], drain: Sequence[str] = ()
    ) -> Prediction:
        """What the engine would do if `starts` were started, the machines `kill` names
        went away and those `drain` names were drained (fleetd/engine/whatif.py), computed
        where the driver reads the cluster: here through etcd, in fleetd through the API.
        Writes nothing."""
        ...

    async def why(self, name: str) -> Explanation | None:
        """Why unit `name` is placed where it is, or not at all; None if it does not exist."""
        ...


def check_activation(name: str, state: TargetState) -> None:
    """fleet's API refuses to load or start a template (reference §2.4); both drivers do."""
    info = UnitNameInfo.parse(name)
    if state is not TargetState.INACTIVE and info is not None and info.is_template:
        raise InvalidInput(f'cannot activate template "{name}"')


class RegistryClient:
    """The etcd driver: the shared registry, and the views the API server also serves."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        # The command prints them once, as plain warnings (see command.run), not log lines.
        registry.log_corrupt = False

    async def machines(self) -> list[MachineView]:
        return await load_machine_views(self.registry)

    async def fleetd_versions(self) -> dict[str, str]:
        return {m.id: m.version for m in await self.registry.list_machines()}

    async def units(self) -> list[UnitView]:
        return await load_unit_views(self.registry)

    async def unit(self, name: str) -> UnitView | None:
        return await load_unit_view(self.registry, name)

    async def unit_states(
        self, unit: str | None = None, machine_id: str | None = None
    ) -> list[StateView]:
        return await load_state_views(self.registry, unit, machine_id)

    async def create_unit(
        self, name: str, unit_file: UnitFile, desired_state: TargetState | None = None
    ) -> None:
        state = desired_state or TargetState.INACTIVE
        check_activation(name, state)
        await self.registry.create_unit(name, unit_file, state, replace=True)

    async def create_units(self, units: Sequence[tuple[str, UnitFile, TargetState | None]]) -> None:
        chosen = [(name, body, state or TargetState.INACTIVE) for name, body, state in units]
        for name, _, state in chosen:
            check_activation(name, state)
        await self.registry.create_units(chosen)

    async def set_target_state(self, name: str, state: TargetState) -> None:
        check_activation(name, state)
        await self.registry.set_target_state(name, state)

    async def destroy_unit(self, name: str) -> bool:
        return await self.registry.destroy_unit(name)

    async def set_machine_metadata(self, machine_id: str, key: str, value: str | None) -> None:
        await self.registry.set_machine_metadata(machine_id, key, value)

    async def cordon(self, cordon: Cordon) -> None:
        if cordon.machine_id not in {m.id for m in await self.registry.list_machines()}:
            raise NotFound(f"machine {cordon.machine_id} is not registered")
        if not cordon.drain:
            await self.registry.cordon(cordon)
            return
        refused = await self.registry.drain(cordon)
        if refused is not None:
            raise Conflict(f"cannot drain {cordon.machine_id}: {refused}")

    async def uncordon(self, machine_id: str) -> bool:
        return await self.registry.uncordon(machine_id)

    async def plan(
        self, starts: Sequence[Start], kill: Sequence[str], drain: Sequence[str] = ()
    ) -> Prediction:
        return await whatif_load.predict(self.registry, starts, kill, drain=drain)

    async def why(self, name: str) -> Explanation | None:
        return await whatif_load.explain(self.registry, name)

    def corrupt_values(self) -> dict[str, str]:
        out = {}
        for key, error in self.registry.corrupt.items():
            unit = self.registry.unit_of_record(key)
            if unit is not None:  # say how to get rid of it
                error += f" (fleetctl destroy {unit} removes it)"
            out[key] = error
        return out


# ---- version check (fleet's checkVersion, etcd driver only) ------------------------------

OLD_VERSION_WARNING = """\
####################################################################
WARNING: fleetctl ({ours}) is older than the latest registered
version of fleet found in the cluster ({theirs}). You are strongly
recommended to upgrade fleetctl to prevent incompatibility issues.
####################################################################"""


def version_warning(ours: str, versions: Iterable[str]) -> str:
    """The banner if some registered fleetd is newer than this fleetctl, else ""."""
    mine = version_key(ours)
    newest = max(
        (v for v in versions if version_key(v) is not None),
        key=lambda v: version_key(v) or (),
        default=None,
    )
    if mine is None or newest is None or (version_key(newest) or ()) <= mine:
        return ""
    return OLD_VERSION_WARNING.format(ours=ours, theirs=newest)


Warn = Callable[[str], None]  # one message (maybe of several lines) for the user, on stderr


async def _warn_if_outdated(registry: Registry, warn: Warn) -> None:
    machines = await registry.list_machines()
    banner = version_warning(__version__, (m.version for m in machines if m.version))
    if banner:
        warn(banner)


# ---- the factory ---------------------------------------------------------------------------

# stdlib logging, as in fleetctl/ssh/: records show only once fleetctl's main() set up
# logging (and only with --debug); fleetctl used as a library stays silent.
log = logging.getLogger(__name__)


class _DebugObserver:
    """--debug: one event per etcd request fleetctl makes, with its duration."""

    def started(self, kind: str) -> None:
        del kind

    def finished(self, kind: str, seconds: float | None, failed: bool) -> None:
        ms = None if seconds is None else round(seconds * 1000, 2)
        log.debug("etcd_request kind=%s ms=%s failed=%s", kind, ms, failed)


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    """Verify the server (with --ca-file, else the system CAs), and present --cert-file and
    --key-file if given. fleet skipped verification unless a cert+key pair was set (§9.13)."""
    context = ssl.create_default_context(cafile=settings.ca_file or None)
    if settings.cert_file or settings.key_file:
        if not (settings.cert_file and settings.key_file):
            raise InvalidInput("--cert-file and --key-file go together: give both or neither")
        context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    default = 443 if parts.scheme == "https" else 80
    return parts.hostname or "127.0.0.1", parts.port or default


def _via(url: str, local: tuple[str, int]) -> str:
    """`url` with its host:port replaced by a local forwarded address."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{local[0]}:{local[1]}"))


async def _open(
    settings: Settings, target: Target, stack: AsyncExitStack, warn: Warn
) -> ClusterClient:
    tunnel = None
    if settings.tunnel:
        tunnel = transport.open_transport(transport.ssh_options(settings))
        stack.callback(tunnel.close)
    if target.driver is Driver.ETCD:
        # Imported here: the etcd client loads hpack and protobuf, which the API driver never
        # needs.
        from fleetd.etcd.client import EtcdConfig, EtcdKV

        endpoints = list(target.endpoints)
        if tunnel is not None:
            endpoints = [
                _via(url, stack.enter_context(tunnel.forward_tcp(*_host_port(url))))
                for url in endpoints
            ]
        config = EtcdConfig(
            endpoints=endpoints,
            ca_file=settings.ca_file or None,
            cert_file=settings.cert_file or None,
            key_file=settings.key_file or None,
            username=settings.etcd_username or None,
            password=settings.etcd_password or None,
            request_timeout=settings.request_timeout,
        )
        etcd = EtcdKV(config)
        stack.push_async_callback(etcd.close)
        kv: KV = etcd
        if settings.debug:
            kv = InstrumentedKV(etcd, _DebugObserver())
        registry = Registry(kv, settings.etcd_key_prefix)
        await _warn_if_outdated(registry, warn)
        return RegistryClient(registry)

    # Imported here: aiohttp takes a third of fleetctl's start-up, and etcd never needs it.
    from fleetctl.api_client import ApiClient

    url = target.endpoints[0]
    socket_path = target.unix_socket
    server_hostname = None
    if tunnel is not None:
        if socket_path is not None:
            local = stack.enter_context(tunnel.forward_unix(socket_path))
            url, socket_path = f"http://{local[0]}:{local[1]}/", None
        else:
            server_hostname = urlsplit(url).hostname
            url = _via(url, stack.enter_context(tunnel.forward_tcp(*_host_port(url))))
    tls = _ssl_context(settings) if url.startswith("https:") else None
    api = ApiClient(
        url,
        unix_socket=socket_path,
        ssl_context=tls,
        server_hostname=server_hostname,
        timeout=settings.request_timeout,
    )
    stack.push_async_callback(api.close)
    return api


@asynccontextmanager
async def _make_client(settings: Settings, warn: Warn) -> AsyncIterator[ClusterClient]:
    async with AsyncExitStack() as stack:
        target: Target | None = None
        try:
            target = select_target(settings)
            if target.warning:
                warn(f"WARNING: {target.warning}")
            log.debug(
                "endpoint_selected driver=%s endpoints=%s%s",
                target.driver.value,
                ",".join(target.endpoints),
                f" ({target.defaulted})" if target.defaulted else "",
            )
            client = await _open(settings, target, stack, warn)
        except (FleetError, OSError, ValueError) as e:
            message = f"Unable to initialize client: {e}"
            if target is not None and target.defaulted:
                message += f"\n{target.defaulted}; point it at the cluster with --endpoint"
            raise CommandFailed(message) from e
        yield client


def make_client(settings: Settings, *, warn: Warn) -> AbstractAsyncContextManager[ClusterClient]:
    """A connected client for the driver `settings` select, closed on exit. What the user
    should know about the connection (an ignored endpoint, an outdated fleetctl) goes to
    `warn` as it is found, before the command's own output."""
    return _make_client(settings, warn)
