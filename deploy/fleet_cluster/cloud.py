"""Machines configured by cloud-init from user-data, the way a cloud boots them.

`fleet-cluster up --cloud-config FILE` gives every machine Debian's cloud-init and a NoCloud
seed (`/var/lib/cloud/seed/nocloud/`: the user-data FILE and a meta-data with the machine's
instance-id and hostname), then lets cloud-init run its four stages through the machine's own
systemd. What the user-data asks for (etcd, fleet, units) is cloud-init's doing, not this tool's.

What stands in for the cloud:

- The image. cloud-init is not installed on the host (it would run at the host's next boot):
  its Debian package and the dependencies the host lacks are downloaded once (`apt-get
  --download-only`) and unpacked into each machine's root, with its units enabled there as the
  package's maintainer scripts would.
- The platform's network. The machines' address comes from the host (as a cloud's DHCP
  would), so cloud-init's own network configuration is off (`network: {config: disabled}`),
  and cloud-init starts once the address is up.
- The discovery service. etcd's public discovery service is out of reach, so the host's etcd
  serves etcd's v2 discovery protocol (`--enable-v2`): a token is a directory below
  `/v2/keys/_etcd/registry/` whose `_config/size` says how many members to wait for. The
  user-data's discovery URL is replaced with that token's URL; nothing else of the file changes.
- The wheels. The release's wheels, which a real deployment fetches from where it keeps them,
  are bound into every machine at /opt/fleet/wheels (install.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from . import rootfs
from .errors import ClusterError, PrerequisiteError
from .install import CACHE_ROOT
from .machine import exec_in

PACKAGE = "cloud-init"
SEED_DIR = "var/lib/cloud/seed/nocloud"
PLATFORM_CFG = "etc/cloud/cloud.cfg.d/90_fleet-cluster.cfg"
# The units cloud-init's package enables (its postinst: deb-systemd-helper enable).
UNITS = (
    "cloud-init-local.service",
    "cloud-init.service",
    "cloud-config.service",
    "cloud-final.service",
)
DISCOVERY_LINE = re.compile(r"(ETCD_DISCOVERY=)\"?[^\"\n]*\"?")
PLATFORM_TEXT = """\
# Written by fleet-cluster: the local platform's part, which a cloud's image would carry.
# The seed is NoCloud's directory; the network is configured by the platform (the host).
datasource_list: [NoCloud]
network:
  config: disabled
# The tool logs in as root with the cluster's key and checks the host keys it made: keep both
# (Debian's defaults would lock root out and regenerate the keys).
disable_root: false
ssh_deletekeys: false
ssh_genkeytypes: []
# The image's locale stays (a cloud image has en_US.UTF-8 generated; the host may not).
locale: false
"""


def debs(cache_root: Path = CACHE_ROOT) -> list[Path]:
    """cloud-init's package and the dependencies this host lacks, downloaded once."""
    folder = cache_root / "debs"
    marker = folder / ".complete"
    if marker.exists():
        return sorted(folder.glob("*.deb"))
    (folder / "partial").mkdir(parents=True, exist_ok=True)
    argv = [
        "apt-get",
        "install",
        "-qq",
        "--download-only",
        "--no-install-recommends",
        "-o",
        f"Dir::Cache::archives={folder}",
        PACKAGE,
    ]
    done = _run(argv)
    if done.returncode != 0:  # a fresh machine may have no package lists yet
        _run(["apt-get", "update", "-qq"])
        done = _run(argv)
    if done.returncode != 0:
        raise PrerequisiteError(f"cannot download {PACKAGE}'s packages: {done.stderr.strip()}")
    found = sorted(folder.glob("*.deb"))
    if not any(p.name.startswith(f"{PACKAGE}_") for p in found):
        # apt downloads nothing for an installed package: the host has cloud-init itself.
        raise PrerequisiteError(
            f"{PACKAGE} is installed on this host; the machines get it from its package "
            f"(remove it from the host, or put its .deb in {folder})"
        )
    marker.write_text("\n".join(p.name for p in found) + "\n")
    return found


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, env=env)


def unpack(root: Path, packages: list[Path]) -> None:
    """Unpack the packages into a machine's root and enable cloud-init's units there.

    Through tar with --keep-directory-symlink: Debian's /lib is a link to usr/lib, and a
    plain extraction of the package's ./lib/ would replace it with a directory.
    """
    for package in packages:
        with tempfile.TemporaryFile() as tar:
            subprocess.run(
                ["dpkg-deb", "--fsys-tarfile", str(package)], stdout=tar, check=True, timeout=120
            )
            tar.seek(0)
            subprocess.run(
                ["tar", "-x", "--keep-directory-symlink", "-C", str(root)],
                stdin=tar,
                check=True,
                timeout=120,
            )
    wants = root / "etc/systemd/system/cloud-init.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit in UNITS:
        link = wants / unit
        if not link.is_symlink():
            link.symlink_to(f"/lib/systemd/system/{unit}")


def user_data(template: str, discovery_url: str) -> str:
    """The user-data with its etcd discovery URL replaced; refuses a file without one."""
    if not template.startswith("#cloud-config"):
        raise ClusterError("the cloud-config must start with #cloud-config (cloud-init's marker)")
    replaced, count = DISCOVERY_LINE.subn(rf'\g<1>"{discovery_url}"', template)
    if count == 0:
        raise ClusterError(
            "the cloud-config sets no ETCD_DISCOVERY=...: the local cluster replaces that URL "
            "with its own discovery service"
        )
    return replaced


def seed(root: Path, name: str, text: str) -> None:
    """NoCloud's seed and the platform's configuration in a machine's root."""
    rootfs.write(root, f"{SEED_DIR}/user-data", text, 0o600)
    meta = f"instance-id: {name}-{uuid.uuid4().hex[:8]}\nlocal-hostname: {name}\n"
    rootfs.write(root, f"{SEED_DIR}/meta-data", meta)
    rootfs.write(root, PLATFORM_CFG, PLATFORM_TEXT)
    # cloud-init.service wants the image's sshd, whose port the tool's own sshd holds (the
    # platform's console, as it were): masked, so the machine does not boot degraded.
    for unit in ("ssh.service", "sshd.service"):
        rootfs.symlink(root, f"etc/systemd/system/{unit}", "/dev/null")


def new_discovery(client_url: str, size: int) -> str:
    """A discovery token for `size` members on the host etcd (v2 API); its URL path."""
    token = uuid.uuid4().hex
    path = f"/v2/keys/_etcd/registry/{token}"
    request = urllib.request.Request(
        f"{client_url}{path}/_config/size",
        data=f"value={size}".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        method="PUT",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            json.loads(response.read() or b"{}")
    except (OSError, urllib.error.URLError, ValueError) as exc:
        raise ClusterError(f"cannot create the discovery token on {client_url}: {exc}") from exc
    return path


def run(init_pid: int, timeout: float) -> str:
    """Start cloud-init's stages in the machine and wait for them; its status line.

    A failed module is reported by cloud-init as `status: error` with the reasons, which
    this raises with the tail of its log.
    """
    exec_in(init_pid, ["systemctl", "start", "--no-block", "cloud-init.target"], check=True)
    done = exec_in(init_pid, ["cloud-init", "status", "--wait", "--long"], timeout=timeout)
    if done.returncode != 0 or "status: done" not in done.stdout:
        log = exec_in(init_pid, ["tail", "-n", "40", "/var/log/cloud-init-output.log"])
        raise ClusterError(
            f"cloud-init did not finish cleanly:\n{done.stdout.strip()}\n{log.stdout.strip()}"
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("status:")]
    return lines[0] if lines else "status: done"
