"""~/.ssh/config for the tunnel and every machine (beyond fleet: a top request of its users).

`HostName`, `Port`, `User` and `IdentityFile` are honoured:

- `HostName` replaces the name dialled (and the name the host key is recorded under);
- `Port` applies when the address carries the default port 22 (fleetctl always has a port:
  `--tunnel host` means `host:22`, `--ssh-port` defaults to 22, so 22 counts as "not chosen");
- `User` applies when `--ssh-username`/FLEETCTL_SSH_USERNAME is the default `core`; so
  `--ssh-username core` cannot override a config `User` (the flag's value is all we get);
- identity files are offered after the agent's keys (fleetctl/ssh/auth.py):
  `--ssh-identity-file` (also beyond fleet), then those named by `IdentityFile`, else
  OpenSSH's defaults (~/.ssh/id_ed25519, id_ecdsa, id_rsa).

Other ssh_config options (ProxyJump, ProxyCommand, StrictHostKeyChecking, UserKnownHostsFile,
...) are ignored: fleetctl's own flags govern those. A config that cannot be read costs a
warning, never the connection.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import paramiko

from fleetctl.known_hosts import DEFAULT_SSH_PORT
from fleetctl.ssh.stdio import write_stderr

DEFAULT_USER = "core"
SSH_CONFIG = "~/.ssh/config"
DEFAULT_IDENTITIES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")


@dataclass(frozen=True, slots=True)
class Destination:
    """Where to connect, after ~/.ssh/config."""

    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]


class SshConfig:
    """~/.ssh/config, read once (lazily: HOME is looked up when first needed)."""

    def __init__(self, path: str = SSH_CONFIG) -> None:
        self._path = path
        self._config: paramiko.SSHConfig | None = None
        self._loaded = False

    def _load(self) -> paramiko.SSHConfig | None:
        if not self._loaded:
            self._loaded = True
            path = os.path.expanduser(self._path)
            if os.path.exists(path):
                try:
                    self._config = paramiko.SSHConfig.from_path(path)
                except (OSError, paramiko.SSHException, ValueError) as e:
                    write_stderr(f"WARNING: ignoring {path}: {e}\n")
        return self._config

    def resolve(self, host: str, port: int, user: str, identity_file: str = "") -> Destination:
        config = self._load()
        options: dict[str, Any] = {}
        if config is not None:
            try:
                options = dict(config.lookup(host))
            # `Match exec` needs the optional `invoke` package; anything the parser or the
            # matcher trips on only costs the config, never the connection.
            except Exception as e:
                write_stderr(f"WARNING: ignoring ssh config for {host}: {e}\n")
        hostname = str(options.get("hostname") or host)
        if port == DEFAULT_SSH_PORT and "port" in options:
            try:
                port = int(options["port"])
            except ValueError:
                write_stderr(f"WARNING: ignoring bad Port {options['port']!r} for {host}\n")
        if user == DEFAULT_USER and options.get("user"):
            user = str(options["user"])
        identities = tuple(options.get("identityfile") or DEFAULT_IDENTITIES)
        if identity_file:  # --ssh-identity-file: first after the agent's keys
            identities = (identity_file, *(i for i in identities if i != identity_file))
        return Destination(hostname, port, user, identities)
