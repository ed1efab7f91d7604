"""An in-memory asyncio transport for protocol tests that play the other side by hand."""

from __future__ import annotations

import asyncio


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
