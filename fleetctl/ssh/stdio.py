"""This process's side of SSH: the one reader of stdin, and writers to stdout and stderr.

Remote commands, the host-key prompt and the forwarders' messages all use this process's
standard streams; they are looked up when used, not when imported, because click's test
runner (and click itself) swaps `sys.stdin`, `sys.stdout` and `sys.stderr`.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import IO, Any

import paramiko

CHUNK = 65536  # one read of stdin, a channel or a forwarded connection


def write_stderr(text: str) -> None:
    """Write to this process's stderr as it is now (tests and click swap sys.stderr)."""
    stream = sys.stderr
    if stream is not None:
        stream.write(text)
        stream.flush()


def binary_writer(stream: IO[str] | None) -> Callable[[bytes], None]:
    """Raw bytes to a text stream: through its binary buffer when it has one."""
    if stream is None:
        return lambda data: None
    buffer: IO[bytes] | None = getattr(stream, "buffer", None)
    stream.flush()  # what was printed as text (click.echo) goes out first

    if buffer is not None:
        target = buffer

        def write(data: bytes) -> None:
            target.write(data)
            target.flush()

        return write

    def write_text(data: bytes) -> None:
        stream.write(data.decode(errors="replace"))
        stream.flush()

    return write_text


class StdinHub:
    """The single reader of this process's stdin, for the host-key prompt and remote commands.

    A blocking read cannot be taken back, so one daemon thread owns stdin and queues what it
    reads; whoever needs input takes it from the queue, and what one consumer left (a command
    that ended, the rest of a prompt's line) stays for the next. Without this, the reader
    thread of `status`'s first remote command would swallow the answer to the host-key prompt
    of the second machine. There is one hub per stdin stream (`stdin_hub`), shared by every
    transport: fleetctl may hold two (the `--tunnel` one of the API client and the one of
    status/journal/ssh).
    """

    def __init__(self, stream: object) -> None:
        self.stream = stream
        self._cond = threading.Condition()
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._started = False

    def _start(self) -> None:
        with self._cond:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._read_loop, name="fleetctl-stdin", daemon=True).start()

    def _read_loop(self) -> None:
        stream: Any = self.stream
        read: Callable[[], bytes]
        buffer = getattr(stream, "buffer", None)
        if stream is None:
            read = bytes
        elif buffer is not None and hasattr(buffer, "read1"):
            # read1: at most one read(2), so keystrokes and pipe data go out as they arrive.
            read = lambda: buffer.read1(CHUNK)  # noqa: E731
        else:
            read = lambda: stream.read(CHUNK).encode()  # noqa: E731
        try:
            while data := read():
                with self._cond:
                    self._chunks.append(data)
                    self._cond.notify_all()
        except (OSError, ValueError):  # closed or unreadable stdin: same as EOF
            pass
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def read_line(self) -> str:
        """The next line ("" at EOF without one), leaving what follows it queued."""
        self._start()
        with self._cond:
            while True:
                data = b"".join(self._chunks)
                newline = data.find(b"\n")
                if newline >= 0 or self._eof:
                    self._chunks.clear()
                    end = newline + 1 if newline >= 0 else len(data)
                    if data[end:]:
                        self._chunks.append(data[end:])
                    return data[:end].decode(errors="replace")
                self._cond.wait()

    def take(self, stop: threading.Event) -> bytes | None:
        """The next chunk; b"" at EOF; None once `stop` is set (nothing is consumed then)."""
        self._start()
        with self._cond:
            while not self._chunks and not self._eof and not stop.is_set():
                self._cond.wait(0.1)
            if stop.is_set():
                return None
            return self._chunks.popleft() if self._chunks else b""

    def pump(self, channel: paramiko.Channel, stop: threading.Event) -> None:
        """Feed stdin to a remote command until EOF (then EOF it) or `stop`."""
        try:
            while (data := self.take(stop)) is not None:
                if not data:
                    channel.shutdown_write()
                    return
                while data:
                    try:
                        sent = channel.send(data)
                    except TimeoutError:
                        # An interactive channel has a short timeout (for resize polling);
                        # a full window only means the remote side is slow to read.
                        continue
                    if not sent:
                        return  # closed
                    data = data[sent:]
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the channel went away: the command's end is reported by `run`


_hub_lock = threading.Lock()
_hub: StdinHub | None = None


def stdin_hub() -> StdinHub:
    """The hub of `sys.stdin` as it is now (click's test runner swaps it per invocation)."""
    global _hub
    with _hub_lock:
        if _hub is None or _hub.stream is not sys.stdin:
            _hub = StdinHub(sys.stdin)
        return _hub
