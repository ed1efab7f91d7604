"""sd_notify messages reach a real datagram socket, as systemd's NOTIFY_SOCKET would get them."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

from fleetd.notify import Notifier


def receiver(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    return sock, path


def test_ready_and_status_messages(tmp_path: Path) -> None:
    sock, path = receiver(tmp_path)
    with sock:
        n = Notifier({"NOTIFY_SOCKET": path})
        n.ready("registering")
        assert sock.recv(4096) == b"READY=1\nSTATUS=registering"
        n.stopping()
        assert sock.recv(4096) == b"STOPPING=1"


def test_disabled_without_socket() -> None:
    n = Notifier({})
    assert not n.enabled
    n.ready("x")  # no socket: nothing happens, nothing raises


def test_watchdog_pings_at_half_interval(tmp_path: Path) -> None:
    sock, path = receiver(tmp_path)
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}
    n = Notifier(env)
    assert n.watchdog_interval == 0.1

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(n.watchdog(stop))
        await asyncio.sleep(0.12)
        stop.set()
        await task

    with sock:
        asyncio.run(run())
        pings = []
        sock.settimeout(0.2)
        while True:
            try:
                pings.append(sock.recv(64))
            except TimeoutError:
                break
    assert len(pings) >= 2
    assert set(pings) == {b"WATCHDOG=1"}


def test_watchdog_for_another_pid_is_ignored() -> None:
    n = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None
