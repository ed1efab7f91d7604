"""SSH into the machines: a cluster-wide user key, a host key per machine, sshd as a service.

fleetctl's `--tunnel`, `ssh`, `status` and `journal` reach machines over SSH as root, so every
machine runs sshd with public-key authentication only. The tool knows every host key it made,
so it writes a known_hosts file and connects with strict host key checking.
"""

from __future__ import annotations

import contextlib
import os
import pwd
from collections.abc import Sequence
from pathlib import Path

from . import procs
from .state import Layout

SSHD_CONFIG = "etc/fleet-cluster/sshd_config"
HOST_KEY = "etc/ssh/ssh_host_ed25519_key"
SSHD_UNIT = "fleet-cluster-sshd.service"

# The host's own host keys are visible through the overlay; a machine must not carry them.
HOST_KEYS_TO_HIDE = (
    "etc/ssh/ssh_host_rsa_key",
    "etc/ssh/ssh_host_rsa_key.pub",
    "etc/ssh/ssh_host_ecdsa_key",
    "etc/ssh/ssh_host_ecdsa_key.pub",
    "etc/ssh/ssh_host_ed25519_key",
    "etc/ssh/ssh_host_ed25519_key.pub",
)

# A complete config of our own rather than the host's /etc/ssh/sshd_config (which anyone may
# have customised): keys only, root allowed, no PAM (no login session to set up in a machine).
SSHD_CONFIG_TEXT = f"""\
# Written by fleet-cluster.
Port 22
HostKey /{HOST_KEY}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AuthorizedKeysFile .ssh/authorized_keys
PrintMotd no
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
"""


def keygen(path: Path, comment: str) -> str:
    """Make an ed25519 key pair at `path` (overwriting); return the public key line."""
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".pub").unlink(missing_ok=True)
    procs.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return path.with_name(path.name + ".pub").read_text().strip()


def ensure_user_key(layout: Layout, cluster: str) -> str:
    public = layout.user_key.with_name(layout.user_key.name + ".pub")
    if layout.user_key.exists() and public.exists():
        return public.read_text().strip()
    return keygen(layout.user_key, f"fleet-cluster@{cluster}")


def invoking_user_keys() -> list[str]:
    """Public keys of whoever ran the tool (through sudo: the sudoer's, not root's)."""
    home = Path.home()
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user:
        with contextlib.suppress(KeyError):
            home = Path(pwd.getpwnam(sudo_user).pw_dir)
    keys = []
    for path in sorted((home / ".ssh").glob("id_*.pub")):
        try:
            keys.append(path.read_text().strip())
        except OSError:
            continue
    return [k for k in keys if k]


def known_hosts_line(names: Sequence[str], host_public_key: str) -> str:
    key_type, key = host_public_key.split()[:2]
    return f"{','.join(names)} {key_type} {key}"


def client_argv(
    layout: Layout, address: str, command: Sequence[str] = (), *, tty: bool = False
) -> list[str]:
    """An `ssh` command line into a machine as root with the cluster key."""
    argv = [
        "ssh",
        "-i",
        str(layout.user_key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        f"UserKnownHostsFile={layout.known_hosts}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "ConnectTimeout=5",
        "-o",
        "LogLevel=ERROR",
    ]
    if not tty:
        argv += ["-o", "BatchMode=yes"]
    return [*argv, f"root@{address}", *command]
