"""A real OpenSSH server and ssh-agent for the SSH integration tests (test_ssh.py).

Each `Sshd` is Debian's /usr/sbin/sshd on 127.0.0.1 and a free port, with its own host keys
(ed25519 and RSA), its own sshd_config (authorized keys from a temporary file, no PAM, no
strict modes, pid file in the temporary directory) and a PATH for sessions set with `SetEnv`
(stub `systemctl`/`journalctl` first, then the venv holding `fleetctl`). `Agent` is a private
`ssh-agent -D`. Everything is torn down by the fixture that made it: only the processes
started here (and the per-connection sshd children of our listeners) are signalled.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SSH_AGENT = shutil.which("ssh-agent") or "/usr/bin/ssh-agent"
SSH_ADD = shutil.which("ssh-add") or "/usr/bin/ssh-add"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
PRIVSEP_DIR = "/run/sshd"  # compiled into Debian's sshd; it refuses to start without it
SETPRIV = shutil.which("setpriv")
START_DEADLINE = 10.0

STUB = """#!/bin/sh
# Stands in for {name}: shows its arguments one per bracket, so tests see the quoting.
printf '%s' {name}
for arg in "$@"; do printf ' [%s]' "$arg"; done
printf '\\n'
exit {code}
"""


def ssh_available() -> str:
    """Why these tests cannot run here, or "" if they can."""
    if os.geteuid() != 0:
        return "sshd must run as root"
    for tool in (SSHD, SSH_AGENT, SSH_ADD, SSH_KEYGEN):
        if not os.access(tool, os.X_OK):
            return f"{tool} is not installed (Debian openssh-server/openssh-client)"
    return ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def keygen(path: Path, kind: str = "ed25519", comment: str = "") -> Path:
    """A new unencrypted key pair at `path` (and `path`.pub); returns the private key path."""
    args = [SSH_KEYGEN, "-q", "-t", kind, "-N", "", "-C", comment or path.name, "-f", str(path)]
    if kind == "rsa":
        args += ["-b", "2048"]
    subprocess.run(args, check=True, stdin=subprocess.DEVNULL)
    return path


@dataclass(frozen=True)
class PublicKey:
    key_type: str
    b64: str

    @classmethod
    def read(cls, pub: Path) -> PublicKey:
        key_type, b64 = pub.read_text().split()[:2]
        return cls(key_type, b64)

    @property
    def blob(self) -> bytes:
        return base64.b64decode(self.b64)

    @property
    def md5(self) -> str:
        digest = hashlib.md5(self.blob, usedforsecurity=False).digest()
        return ":".join(f"{b:02x}" for b in digest)

    def line(self, hosts: str) -> str:
        return f"{hosts} {self.key_type} {self.b64}\n"


def _descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (sshd forks one child per connection), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _spawn(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    # setpriv sets PR_SET_PDEATHSIG, which fires when the *thread* that forked exits: only
    # from the main thread does "dies with pytest" mean what it says.
    if SETPRIV and threading.current_thread() is threading.main_thread():
        command = [SETPRIV, "--pdeathsig", "KILL", "--", *command]
    with open(log, "ab") as out:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM `proc` and its descendants (ours only), then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    tree = _descendants(proc.pid)
    for pid in [proc.pid, *tree]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    deadline = time.monotonic() + 5
    for pid in tree:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Sshd:
    """One sshd listening on 127.0.0.1:`port`."""

    directory: Path
    authorized_keys: Path
    session_path: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ed25519 = keygen(self.directory / "host_ed25519", "ed25519")
        self.rsa = keygen(self.directory / "host_rsa", "rsa")
        self.config = self.directory / "sshd_config"
        self.log = self.directory / "sshd.log"
        self.config.write_text(
            f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.ed25519}
HostKey {self.rsa}
AuthorizedKeysFile {self.authorized_keys}
UsePAM no
StrictModes no
PidFile {self.directory / "sshd.pid"}
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowAgentForwarding yes
AllowTcpForwarding yes
UseDNS no
SetEnv PATH={self.session_path}
LogLevel VERBOSE
"""
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def host_id(self) -> str:
        return f"[127.0.0.1]:{self.port}"

    def key(self, kind: str = "ed25519") -> PublicKey:
        return PublicKey.read(Path(f"{self.ed25519 if kind == 'ed25519' else self.rsa}.pub"))

    def start(self) -> None:
        os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        self.proc = _spawn([SSHD, "-D", "-e", "-f", str(self.config)], self.log, env)
        deadline = time.monotonic() + START_DEADLINE
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}:\n{self.log_tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"sshd did not listen on {self.port}:\n{self.log_tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Agent:
    """A private ssh-agent (foreground, so its pid is ours) holding the given keys."""

    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return str(self.directory / "agent.sock")

    def start(self, *keys: Path) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        env = {"PATH": "/usr/bin:/bin"}
        self.proc = _spawn([SSH_AGENT, "-D", "-a", self.socket], self.directory / "agent.log", env)
        deadline = time.monotonic() + START_DEADLINE
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ssh-agent did not start")
            time.sleep(0.02)
        for key in keys:
            subprocess.run(
                [SSH_ADD, "-q", str(key)],
                check=True,
                env={"SSH_AUTH_SOCK": self.socket, "PATH": "/usr/bin:/bin"},
                stdin=subprocess.DEVNULL,
                capture_output=True,
            )

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


def write_stubs(directory: Path) -> Path:
    """`systemctl` (exit 3, as for an inactive unit) and `journalctl` (exit 0) stubs."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, code in (("systemctl", 3), ("journalctl", 0)):
        path = directory / name
        path.write_text(STUB.format(name=name, code=code))
        path.chmod(0o755)
    return directory
