"""sd_notify: tell systemd we are ready, what we are doing, and that the loop is alive.

fleet.service is Type=notify with WatchdogSec: READY=1 once the components run (not once etcd
answers: fleetd must keep retrying an unreachable etcd while counting as started, or systemd
would kill it and, with it, nothing else; units keep running either way), STATUS= lines for
`systemctl status fleet`, and WATCHDOG=1 from the event loop, so a wedged loop gets restarted.
Without NOTIFY_SOCKET (not run by systemd) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import structlog

log = structlog.get_logger("fleetd.notify")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading '@' and addressed with a NUL byte.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError as e:
            log.warning("sd_notify_failed", error=str(e))

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    async def watchdog(self, stop: asyncio.Event) -> None:
        """Ping systemd's watchdog at half its interval until `stop`."""
        if not self.address or self.watchdog_interval is None:
            return
        while not stop.is_set():
            self.send("WATCHDOG=1")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.watchdog_interval / 2)


def _watchdog_interval(env: dict[str, str] | os._Environ[str]) -> float | None:
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for another process
    return int(usec) / 1_000_000
