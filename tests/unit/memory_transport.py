"""An in-memory asyncio transport, and h2's server side, for protocol tests that play etcd's
side of a connection by hand."""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.settings


def h2_server(window: int | None = None) -> h2.connection.H2Connection:
    """An h2 server connection (raw bytes headers) with its preface sent; `window` sets the
    initial flow-control window it offers each stream."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    conn.initiate_connection()
    if window is not None:
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    return conn


class Transport(asyncio.Transport):
    """Collects what the protocol writes; records an abort (dropped) or a close (ended)."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.aborted = False
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        """What was written since the last take."""
        data = b"".join(self.written)
        self.written.clear()
        return data
