"""`ApiServer`: the API app on its listeners, started and stopped by fleetd's wiring."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

import structlog
from aiohttp import web

from fleetd.api.app import make_app
from fleetd.api.context import ApiContext
from fleetd.api.listeners import (
    Listener,
    activated_sockets,
    close_listeners,
    forget_activation,
    plan_listeners,
    remove_socket_file,
    server_tls,
)
from fleetd.config import Config

log = structlog.get_logger("fleetd.api")

# Requests in flight get this long to finish when fleetd stops.
SHUTDOWN_SECONDS = 5.0


class ApiServer:
    def __init__(
        self,
        ctx: ApiContext,
        config: Config,
        environ: MutableMapping[str, str] | None = None,
    ) -> None:
        self.ctx = ctx
        self.config = config
        self._environ = os.environ if environ is None else environ
        self._runner: web.AppRunner | None = None
        self.listeners: list[Listener] = []

    async def start(self) -> None:
        """Listen and serve. Raises ConfigError (nothing left listening) if a listener cannot
        be set up: a half-served API is worse than a clear failure at start."""
        config = self.config
        activated = activated_sockets(self._environ)
        if activated:
            forget_activation(self._environ)
        tls = None
        if config.api_tls_cert:
            tls = server_tls(config.api_tls_cert, config.api_tls_key, config.api_tls_ca)
        self.listeners = plan_listeners(
            activated,
            api_socket=config.api_socket,
            api_socket_group=config.api_socket_group,
            tcp=config.api_tcp_address,
            tls=tls,
            insecure=config.api_tcp_insecure,
        )
        runner = web.AppRunner(
            make_app(self.ctx), access_log=None, shutdown_timeout=SHUTDOWN_SECONDS
        )
        try:
            await runner.setup()
            for listener in self.listeners:
                site = web.SockSite(runner, listener.sock, ssl_context=listener.tls)
                await site.start()
                log.info("api_listening", listener=listener.description)
        except BaseException:
            await runner.cleanup()
            close_listeners(self.listeners)
            raise
        self._runner = runner
        if not self.listeners:
            log.info("api_disabled", detail="no api_socket, no api_tcp and no activated sockets")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for listener in self.listeners:
            listener.sock.close()
            remove_socket_file(listener)
        self.listeners = []
