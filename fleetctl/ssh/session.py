"""A command (or a shell) on a machine, with this process's stdin, stdout and stderr.

What `fleetctl ssh`, `status` and `journal` run remotely: `run` gives the remote command this
process's standard streams and returns its exit status; with a terminal and no command, a
shell on a PTY `xterm-256color` in raw mode; `-A` forwards the agent.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator

import paramiko
from paramiko.agent import AgentRequestHandler

from fleetctl.ssh.stdio import CHUNK, binary_writer, stdin_hub, write_stderr
from fleetctl.transport import SshError

TERM = "xterm-256color"
SIGPIPE_STATUS = 141  # what a shell reports for a command killed by SIGPIPE


def run(
    transport: paramiko.Transport,
    command: str | None,
    *,
    tty: bool,
    forward_agent: bool,
    timeout: float,
    agent_socket: str,
) -> int:
    """`command` (a shell if None) over `transport`; its exit status (SshError if not run)."""
    try:
        channel = transport.open_session(timeout=timeout)
    except (paramiko.SSHException, EOFError, OSError) as e:
        raise SshError(f"ssh: cannot open a session: {e}") from None
    agent_handler = None
    try:
        if forward_agent:
            if not agent_socket:
                write_stderr("WARNING: no ssh-agent to forward (SSH_AUTH_SOCK is not set)\n")
            agent_handler = AgentRequestHandler(channel)
        terminal = _Terminal.of_stdin() if tty else None
        if terminal is not None:
            width, height = terminal.size()
            channel.get_pty(TERM, width, height)
        if command is None:
            channel.invoke_shell()
        else:
            channel.exec_command(command)
    except (paramiko.SSHException, EOFError, OSError) as e:
        channel.close()
        if agent_handler is not None:
            agent_handler.close()
        raise SshError(f"ssh: {e}") from None
    try:
        return _session(channel, terminal)
    finally:
        channel.close()
        if agent_handler is not None:
            agent_handler.close()


def _session(channel: paramiko.Channel, terminal: _Terminal | None) -> int:
    """Copy stdin/stdout/stderr until the remote side is done; its exit status."""
    out = binary_writer(sys.stdout)
    err = binary_writer(sys.stderr)
    stop = threading.Event()
    feeder = threading.Thread(
        target=stdin_hub().pump, args=(channel, stop), name="fleetctl-stdin-feed", daemon=True
    )
    errors = threading.Thread(
        target=_copy, args=(channel.recv_stderr, err), name="fleetctl-stderr", daemon=True
    )
    # A timeout on the channel lets the loop below notice terminal resizes.
    channel.settimeout(0.25 if terminal is not None else None)
    with terminal.raw() if terminal is not None else contextlib.nullcontext():
        feeder.start()
        errors.start()
        try:
            broken = _copy(channel.recv, out, terminal, channel)
        finally:
            stop.set()
        errors.join()
    if broken:
        return SIGPIPE_STATUS
    status = channel.recv_exit_status()
    # No exit-status: killed by a signal (paramiko drops exit-signal) or the server gave
    # none; either way the command failed, and -1 is what fleet turned into 255.
    return status if status >= 0 else 255


def _copy(
    read: Callable[[int], bytes],
    write: Callable[[bytes], None],
    terminal: _Terminal | None = None,
    channel: paramiko.Channel | None = None,
) -> bool:
    """Copy until EOF; True if the local side is a broken pipe (`... | head`)."""
    while True:
        if terminal is not None and channel is not None:
            terminal.follow_size(channel)
        try:
            data = read(CHUNK)
        except TimeoutError:
            continue
        except (OSError, EOFError, paramiko.SSHException):
            return False
        if not data:
            return False
        try:
            write(data)
        except BrokenPipeError:
            if channel is not None:
                channel.close()
            return True


class _Terminal:
    """This process's terminal, for an interactive shell."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._size = self.size()

    @classmethod
    def of_stdin(cls) -> _Terminal | None:
        stdin = sys.stdin
        try:
            if stdin is not None and stdin.isatty():
                return cls(stdin.fileno())
        except (OSError, ValueError):
            pass
        return None

    def size(self) -> tuple[int, int]:
        try:
            columns, lines = os.get_terminal_size(self.fd)
        except OSError:
            return 80, 24
        return columns, lines

    def follow_size(self, channel: paramiko.Channel) -> None:
        """Tell the server about a resize (polled: SIGWINCH handlers need the main thread)."""
        size = self.size()
        if size != self._size:
            self._size = size
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                channel.resize_pty(*size)

    @contextlib.contextmanager
    def raw(self) -> Iterator[None]:
        import termios
        import tty

        saved = termios.tcgetattr(self.fd)
        # TCSADRAIN, not setraw's default TCSAFLUSH: what was typed ahead is kept (as ssh).
        tty.setraw(self.fd, termios.TCSADRAIN)
        try:
            yield
        finally:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
