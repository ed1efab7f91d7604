"""What the host must provide, checked up front so a missing piece is named, not stumbled on."""

from __future__ import annotations

import os
import shutil

from .errors import PrerequisiteError

# binary -> Debian package that ships it
BINARIES = {
    "systemd-nspawn": "systemd-container",
    "etcd": "etcd-server",
    "sshd": "openssh-server",
    "ssh-keygen": "openssh-client",
    "ip": "iproute2",
    "nsenter": "util-linux",
    "setsid": "util-linux",
    "mount": "mount",
    "umount": "mount",
}
# only some commands need these
SSH_CLIENT = {"ssh": "openssh-client"}

SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def require_root() -> None:
    if os.geteuid() != 0:
        raise PrerequisiteError(
            "fleet-cluster must run as root: it mounts overlays, creates a bridge and cgroups "
            "and boots containers (try: sudo fleet-cluster ...)"
        )


def missing_binaries(needed: dict[str, str] | None = None) -> dict[str, str]:
    """The binaries of `needed` (default: all that `up` uses) not found, with their package."""
    wanted = BINARIES if needed is None else needed
    return {
        binary: package
        for binary, package in wanted.items()
        if shutil.which(binary, path=SEARCH_PATH) is None
    }


def require_binaries(needed: dict[str, str] | None = None) -> None:
    missing = missing_binaries(needed)
    if missing:
        packages = " ".join(sorted(set(missing.values())))
        names = ", ".join(sorted(missing))
        raise PrerequisiteError(f"missing {names}; install with: apt-get install -y {packages}")


def check_host() -> None:
    """Everything `up` needs that can be checked without touching anything."""
    require_root()
    require_binaries()
