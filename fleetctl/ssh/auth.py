"""Who fleetctl is to an SSH server: the ssh-agent's keys, then identity files (fleet's auth).

As fleet: every key of the ssh-agent at SSH_AUTH_SOCK, offered as `--ssh-username` (or the
`User` of ~/.ssh/config, fleetctl/ssh/config.py). Beyond fleet: then the identity files,
`--ssh-identity-file` first (with it no agent is needed), then ~/.ssh/config's
`IdentityFile`s or OpenSSH's defaults. Encrypted ones are skipped (there is no passphrase
prompt: put them in the agent). Without an agent *and* without any identity file, the error
is fleet's `SSH_AUTH_SOCK environment variable is not set...`, before anything is dialled.
"""

from __future__ import annotations

import os
import socket
import threading

import paramiko
from paramiko.agent import Agent
from paramiko.pkey import UnknownKeyType

from fleetctl.ssh.config import DEFAULT_IDENTITIES, Destination
from fleetctl.transport import SshError

AUTH_SOCK_MISSING = (
    "SSH_AUTH_SOCK environment variable is not set. Verify ssh-agent is running. See"
    " https://github.com/coreos/fleet/blob/master/Documentation/using-the-client.md for help."
)


class Credentials:
    """The agent's keys and the identity files, loaded once per transport."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._agent: Agent | None = None
        self._agent_error: str | None = None  # None: not tried yet
        self._files: dict[str, paramiko.PKey | str] = {}  # path -> key, or why not usable

    @property
    def agent_socket(self) -> str:
        return os.environ.get("SSH_AUTH_SOCK", "")

    def agent_keys(self) -> list[paramiko.PKey]:
        with self._lock:
            if self._agent_error is None:
                self._agent_error = self._open_agent()
            return list(self._agent.get_keys()) if self._agent is not None else []

    def _open_agent(self) -> str:
        sock = self.agent_socket
        if not sock:
            return "SSH_AUTH_SOCK is not set"
        # paramiko's Agent swallows a connection failure; try first to be able to say why.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(sock)
        except OSError as e:
            return f"dial unix {sock}: {e.strerror or e}"
        try:
            self._agent = Agent()
        except paramiko.SSHException as e:
            return f"ssh-agent at {sock}: {e}"
        return ""

    @property
    def agent_problem(self) -> str:
        return self._agent_error or ""

    def identity(self, path: str) -> paramiko.PKey | str:
        """The key in `path`, or why it cannot be used."""
        with self._lock:
            if path not in self._files:
                self._files[path] = self._load(path)
            return self._files[path]

    @staticmethod
    def _load(path: str) -> paramiko.PKey | str:
        full = os.path.expanduser(path)
        try:
            return paramiko.PKey.from_path(full)
        # cryptography, which paramiko loads keys with, says "password missing" as TypeError.
        except (paramiko.PasswordRequiredException, TypeError):
            return f"{full} is encrypted (add it to ssh-agent)"
        except FileNotFoundError:
            return f"{full} does not exist"
        except (OSError, paramiko.SSHException, UnknownKeyType, ValueError) as e:
            return f"{full}: {e}"

    def check_usable(self, dest: Destination) -> None:
        """Fail before dialing when there is nothing to authenticate with (fleet's check)."""
        self.agent_keys()
        if self._agent is not None:
            return
        if any(os.path.exists(os.path.expanduser(p)) for p in dest.identity_files):
            return
        if not self.agent_socket:
            raise SshError(AUTH_SOCK_MISSING)
        raise SshError(self.agent_problem)


def authenticate(transport: paramiko.Transport, dest: Destination, creds: Credentials) -> None:
    """Offer the agent's keys, then the identity files, until the server accepts one."""
    offered: set[bytes] = set()
    notes: list[str] = []
    tried = 0

    def attempt(key: paramiko.PKey) -> bool:
        nonlocal tried
        if key.asbytes() in offered:
            return False
        offered.add(key.asbytes())
        tried += 1
        try:
            transport.auth_publickey(dest.user, key)
        except paramiko.BadAuthenticationType as e:
            raise SshError(
                f"ssh: unable to authenticate as {dest.user!r}: the server does not accept"
                f" public keys (it allows: {', '.join(e.allowed_types) or 'nothing'})"
            ) from None
        except paramiko.AuthenticationException:
            return False
        return transport.is_authenticated()

    agent_keys = creds.agent_keys()
    for key in agent_keys:
        if attempt(key):
            return
    if creds.agent_problem:
        notes.append(f"no ssh-agent: {creds.agent_problem}")
    elif not agent_keys:
        notes.append("ssh-agent holds no keys (add one with ssh-add)")
    for path in dest.identity_files:
        key_or_reason = creds.identity(path)
        if isinstance(key_or_reason, str):
            # Missing default files are normal; anything else is worth telling.
            if path in DEFAULT_IDENTITIES and key_or_reason.endswith("does not exist"):
                continue
            notes.append(key_or_reason)
        elif attempt(key_or_reason):
            return
    detail = f"the server refused the {tried} key(s) offered" if tried else "no key to offer"
    if notes:
        detail += "; " + "; ".join(notes)
    raise SshError(f"ssh: unable to authenticate as {dest.user!r}: {detail}")
