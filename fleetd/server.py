"""fleetd's wiring: build the components from the config, run them, stop them well.

Shutdown has two meanings, told apart by asking systemd what job is pending on fleetd's own
unit (fleet could not tell them apart and always stopped every unit):

- `systemctl restart fleet` (or an upgrade): exit quickly and leave units running and the
  lease alive; the next fleetd adopts the lease and finds its units as they were.
- `systemctl stop fleet` (or a plain SIGTERM outside systemd): hand over at once: stop the
  units here, drop their states, release the engine lead and revoke the lease, so the engine
  elsewhere reschedules them immediately instead of after agent_ttl.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from fleetd import __version__
from fleetd.api import ApiContext, ApiServer, Metrics
from fleetd.config import Config, load_config
from fleetd.errors import ConfigError, FleetError
from fleetd.etcd.client import EtcdConfig, EtcdKV
from fleetd.log import configure_logging
from fleetd.machine import detect_public_ip, read_machine_id
from fleetd.model import Machine
from fleetd.node import NodeSettings, build_node
from fleetd.notify import Notifier
from fleetd.registry.instrumented import InstrumentedKV
from fleetd.registry.migrations import SchemaTooNew
from fleetd.registry.registry import Registry
from fleetd.systemd.dbus import DBusUnitManager
from fleetd.systemd.manager import UnitManager
from fleetd.watching import Backoff, sleep_or_stop

log = structlog.get_logger("fleetd.server")


def etcd_config(config: Config) -> EtcdConfig:
    return EtcdConfig(
        endpoints=list(config.etcd_servers),
        ca_file=config.etcd_cafile or None,
        cert_file=config.etcd_certfile or None,
        key_file=config.etcd_keyfile or None,
        username=config.etcd_username or None,
        password=config.etcd_password or None,
        request_timeout=config.etcd_request_timeout,
    )


def own_unit_name() -> str | None:
    """The systemd unit this process runs in, from its cgroup path (None outside systemd)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        path = line.split(":", 2)[-1]
        leaf = path.rstrip("/").rsplit("/", 1)[-1]
        if leaf.endswith(".service"):
            return leaf
    return None


async def supervise(
    name: str,
    run: Callable[[asyncio.Event], Awaitable[None]],
    stop: asyncio.Event,
    backoff: Backoff | None = None,
) -> None:
    """Run a component until stop; if it fails, log it and run it again after a backoff.

    Each component already retries what etcd does to it (unreachable, slow, lease gone,
    errors answered); this is the net under that: an error nobody foresaw costs that
    component a restart from a fresh read of etcd, never fleetd (whose exit would turn a
    fault in etcd into a machine failure). Only what a retry cannot fix ends fleetd: etcd
    refusing our credentials (ConfigError) and a newer release's layout (SchemaTooNew).
    """
    backoff = backoff or Backoff(initial=1.0, ceiling=30.0)
    while not stop.is_set():
        try:
            await run(stop)
            return
        except (ConfigError, SchemaTooNew):
            raise
        except Exception as e:
            wait = backoff.next()
            log.error("component_failed", component=name, error=repr(e), exc_info=e)
            log.info("component_restarting", component=name, retry_in=wait)
            await sleep_or_stop(stop, wait)


class Server:
    def __init__(
        self, config: Config, config_path: str | None = None, manager: UnitManager | None = None
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.machine_id = read_machine_id(config)
        self._public_ip = config.public_ip or detect_public_ip()
        # ---- API and metrics (fleetd/api): every etcd request is counted for /metrics ----
        self.metrics = Metrics()
        self.kv = InstrumentedKV(EtcdKV(etcd_config(config)), self.metrics.etcd)
        self._api: ApiServer | None = None
        # ---- end API and metrics ----
        self.registry = Registry(self.kv, config.etcd_key_prefix)
        # DBusUnitManager connects on its first call, in run(): building it here costs nothing.
        self._manager = manager or DBusUnitManager(
            Path(config.units_directory), user=config.systemd_user
        )
        self.stop = asyncio.Event()
        self.notifier = Notifier()
        self.keep_units = False  # set when systemd is restarting us
        # Presence, agent and engine, wired in fleetd/node.py (the simulator builds its
        # machines there too).
        self.node = build_node(
            self.registry, self._manager, self.machine, NodeSettings.from_config(config)
        )
        self.presence = self.node.presence

    def machine(self) -> Machine:
        return Machine.make(
            id=self.machine_id,
            public_ip=self._public_ip,
            metadata=self.config.metadata,
            version=__version__,
            disable_engine=self.config.disable_engine,
        )

    async def run(self) -> int:
        agent, engine = self.node.agent, self.node.engine
        self._install_signals()
        log.info("fleetd_starting", version=__version__, machine=self.machine_id)
        # ---- API (fleetd/api): answers 503 until registered; a listener that cannot be set
        # up (socket in use, bad TLS files) stops fleetd here, before anything runs ----
        self.metrics.attach(engine=engine, agent=agent, registered=self.presence.registered.is_set)
        self._api = ApiServer(
            ApiContext(
                self.registry,
                machine_id=self.machine_id,
                token_limit=self.config.token_limit,
                max_unit_bytes=self.config.max_unit_bytes,
                registered=self.presence.registered.is_set,
                is_leader=lambda: engine is not None and engine.is_leader,
                metrics=self.metrics,
            ),
            self.config,
        )
        await self._api.start()
        # ---- end API ----
        try:
            await self.registry.ensure_schema()
        except SchemaTooNew as e:
            # A newer release's layout: acting on it could corrupt it. Refuse, leaving the
            # units running; systemd retries, and the upgrade of this machine fixes it.
            log.error("schema_too_new", error=str(e))
            self.keep_units = True
            await self._shutdown([])
            return 1
        except FleetError:
            # etcd unreachable at start: the components wait for it themselves, and the check
            # is retried beside them until etcd answers (a newer layout then stops fleetd).
            schema_pending = True
        else:
            schema_pending = False
        tasks: list[asyncio.Future[None]] = [
            asyncio.ensure_future(supervise(name, run, self.stop))
            for name, run in self.node.components()
        ]
        tasks += [
            asyncio.ensure_future(self.notifier.watchdog(self.stop)),
            asyncio.ensure_future(self._report_registration()),
        ]
        if schema_pending:
            tasks.append(asyncio.ensure_future(self._check_schema_when_reachable()))
        self.notifier.ready(f"machine {self.machine_id}: registering in etcd")
        failure = await self._until_stop_or_failure(tasks)
        if failure is not None:
            # A failure no retry fixes (etcd refused our credentials: ConfigError; a newer
            # layout: SchemaTooNew; other errors restart their component in _supervise).
            # Exit non-zero with the reason, as on a restart: units keep running, the lease
            # is kept, and the operator (or systemd) brings fleetd back once it is fixed.
            # Units must not stop merely because etcd refused us.
            if isinstance(failure, FleetError):
                log.error("fleetd_failed", error=str(failure))
            else:
                log.error("fleetd_failed", error=repr(failure), exc_info=failure)
            self.keep_units = True
            self.stop.set()
        self.notifier.stopping()
        await self._shutdown(tasks)
        return 0 if failure is None else 1

    async def _check_schema_when_reachable(self) -> None:
        """ensure_schema, retried until etcd answers; SchemaTooNew ends fleetd (units kept)."""
        backoff = Backoff()
        while not self.stop.is_set():
            try:
                await self.registry.ensure_schema()
                return
            except SchemaTooNew as e:
                log.error("schema_too_new", error=str(e))
                raise
            except FleetError as e:
                wait = backoff.next()
                log.info("schema_check_waiting", error=str(e), retry_in=wait)
                await sleep_or_stop(self.stop, wait)

    async def _until_stop_or_failure(
        self, tasks: list[asyncio.Future[None]]
    ) -> BaseException | None:
        """Wait for the stop event; return early with the error of a task that raised.

        Tasks that return (the registration report, a watchdog without systemd) are fine."""
        stop_task = asyncio.ensure_future(self.stop.wait())
        pending: set[asyncio.Future[Any]] = {stop_task, *tasks}
        try:
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if stop_task in done:
                    return None
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        return task.exception()
        finally:
            stop_task.cancel()

    async def _report_registration(self) -> None:
        stop_task = asyncio.ensure_future(self.stop.wait())
        registered = asyncio.ensure_future(self.presence.registered.wait())
        await asyncio.wait({stop_task, registered}, return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        registered.cancel()
        if self.presence.registered.is_set():
            self.notifier.status(f"machine {self.machine_id}: registered in etcd")

    async def _shutdown(self, tasks: list[asyncio.Future[None]]) -> None:
        if self.keep_units:
            log.info(
                "fleetd_restarting", detail="units keep running; lease kept for the next fleetd"
            )
        else:
            log.info("fleetd_graceful_stop", detail="handing units over")
        if self._api is not None:  # ---- API (fleetd/api): no new requests from here on ----
            await self._api.stop()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=10)
            for t in pending:
                t.cancel()
        if not self.keep_units:
            await self.node.agent.purge()
            await self.presence.release()
        await self.kv.close()
        await self._manager.close()
        log.info("fleetd_stopped")

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop_soon, sig)
        loop.add_signal_handler(signal.SIGHUP, self._reload)

    def _stop_soon(self, sig: signal.Signals) -> None:
        self._stopping = asyncio.ensure_future(self._on_stop(sig))

    async def _on_stop(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            return
        unit = own_unit_name()
        job = None
        if unit is not None:
            with contextlib.suppress(FleetError):
                job = await self._manager.own_job_type(unit)
        self.keep_units = job == "restart"
        log.info("fleetd_signal", signal=sig.name, unit=unit, pending_job=job)
        self.stop.set()

    def _reload(self) -> None:
        """SIGHUP: re-read the config; metadata and public_ip take effect at the next renew."""
        log.info("fleetd_reloading_config", path=self.config_path)
        try:
            fresh = load_config(self.config_path, os.environ, {})
        except FleetError as e:
            log.error("fleetd_reload_failed", error=str(e))
            return
        self.config = replace(
            self.config,
            metadata=fresh.metadata,
            public_ip=fresh.public_ip,
            verbosity=fresh.verbosity,
        )
        self._public_ip = self.config.public_ip or detect_public_ip()
        configure_logging(self.config.verbosity)


def run(config: Config, config_path: str | None = None) -> int:
    configure_logging(config.verbosity)
    for warning in config.warnings:
        log.warning("config_warning", detail=warning)
    try:
        return asyncio.run(Server(config, config_path).run())
    except FleetError as e:
        log.error("fleetd_failed", error=str(e))
        return 1
