"""Real etcd processes for integration tests: single member, TLS, and a 3-member cluster.

Everything listens on loopback ports picked free at start-up, keeps its data in a temporary
directory and is torn down by the fixture that made it (see tests/conftest.py), also when the
test fails. Readiness is polled on etcd's /health endpoint against a deadline, never slept for.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ETCD_BIN = "/usr/bin/etcd"  # Debian 12's etcd-server: 3.4
# etcd 3.5, Debian 13's package unpacked by deploy/fetch-etcd35.sh: the contract suites run
# against every etcd version the project supports.
ETCD35_BIN = os.environ.get("FLEET_ETCD35_BIN", "/opt/fleet/etcd-3.5/etcd")

# Short raft timings: a single member elects itself at once, a 3-member cluster re-elects
# within ~250 ms when its leader is killed (yet does not flap on a loaded test machine), and
# the minimum lease TTL etcd grants (1.5 election timeouts, rounded up to whole seconds)
# drops from 2 s to 1 s.
_FAST_RAFT = ("--heartbeat-interval=25", "--election-timeout=250")
START_DEADLINE = 30.0
STOP_DEADLINE = 10.0


# Every etcd this module started and has not reaped: killed at interpreter exit if a fixture's
# own teardown never ran (and each child also dies with pytest through PR_SET_PDEATHSIG).
_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(OSError):
            proc.kill()
            proc.wait(timeout=STOP_DEADLINE)
    _LIVE.clear()


# util-linux's setpriv execs etcd with PR_SET_PDEATHSIG set: Linux SIGKILLs etcd when its
# parent goes, so even a SIGKILLed pytest leaves no etcd behind. Not a preexec_fn: that makes
# subprocess fork() instead of vfork(), and gRPC's fork handlers in the child of a process
# with live gRPC threads were seen to abort it (SIGABRT) before it reached exec.
SETPRIV = shutil.which("setpriv")


def etcd_available(binary: str = ETCD_BIN) -> bool:
    return os.access(binary, os.X_OK)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    condition: Callable[[], bool], deadline: float, what: str, interval: float = 0.02
) -> None:
    """Poll `condition` until true or `deadline` (time.monotonic()) passes."""
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


@dataclass(frozen=True)
class TLSFiles:
    """A CA, a server cert for 127.0.0.1 signed by it, and a client cert signed by it.

    `other_ca` is an unrelated CA: a client trusting it must refuse the server.
    """

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def make_tls_files(directory: Path) -> TLSFiles:
    """Generate the PKI with the `cryptography` package (EC P-256 keys: fast to make)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)

    def write_cert(path: Path, cert: x509.Certificate) -> None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def make_ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cert, key

    def make_leaf(
        cn: str,
        ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
        ips: Sequence[str],
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca[0].subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # Both usages: etcd's embedded gRPC gateway dials its own port with the server
            # certificate as a client certificate when --client-cert-auth is on.
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if ips:
            # Only the IP: a client reaching the server as "localhost" must fail the
            # hostname check, which the TLS tests use to prove verification happens.
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(i)) for i in ips]),
                critical=False,
            )
        return builder.sign(ca[1], hashes.SHA256()), key

    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca("fleet-test-ca")
    other = make_ca("fleet-test-other-ca")
    server = make_leaf("etcd-server", ca, ["127.0.0.1"])
    client = make_leaf("root", ca, [])
    files = TLSFiles(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
        other_ca=directory / "other-ca.pem",
    )
    write_cert(files.ca, ca[0])
    write_cert(files.other_ca, other[0])
    write_cert(files.server_cert, server[0])
    write_key(files.server_key, server[1])
    write_cert(files.client_cert, client[0])
    write_key(files.client_key, client[1])
    return files


class EtcdServer:
    """One etcd member as a child process. `start()` after `stop()`/`kill()` reuses the same
    data directory and ports, so the store (and its revisions) survive a restart."""

    def __init__(
        self,
        data_dir: Path,
        *,
        name: str = "default",
        client_port: int | None = None,
        peer_port: int | None = None,
        tls: TLSFiles | None = None,
        initial_cluster: str | None = None,
        cluster_token: str | None = None,
        extra_args: Sequence[str] = (),
        binary: str = ETCD_BIN,
    ) -> None:
        self.binary = binary
        self.name = name
        self.data_dir = data_dir
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.tls = tls
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.cluster_token = cluster_token or f"fleet-test-{self.peer_port}"
        self.extra_args = tuple(extra_args)
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def endpoints(self) -> list[str]:
        return [self.client_url]

    def command(self) -> list[str]:
        cmd = [
            self.binary,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={self.cluster_token}",
            "--logger=zap",
            "--log-outputs=stderr",
            *_FAST_RAFT,
        ]
        if self.tls:
            cmd += [
                f"--cert-file={self.tls.server_cert}",
                f"--key-file={self.tls.server_key}",
                f"--trusted-ca-file={self.tls.ca}",
                "--client-cert-auth",
            ]
        return cmd + list(self.extra_args)

    def spawn(self) -> None:
        """Start the process without waiting for it to be healthy (see wait_healthy)."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = self.command()
        # The parent that counts is the spawning *thread*: only the main thread lives as long
        # as pytest (a worker thread's exit would kill etcd under the test).
        if SETPRIV and threading.current_thread() is threading.main_thread():
            command = [SETPRIV, "--pdeathsig", "KILL", "--", *command]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group: a Ctrl-C on pytest must not race our teardown.
                start_new_session=True,
            )
        _LIVE.add(self.proc)

    def start(self, deadline: float = START_DEADLINE) -> None:
        self.spawn()
        self.wait_healthy(time.monotonic() + deadline)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"etcd {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )
        try:
            url = f"{self.client_url}/health"
            with urllib.request.urlopen(url, timeout=1, context=self._ssl_context()) as r:
                body = json.loads(r.read())
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return body.get("health") in ("true", True)

    def wait_healthy(self, deadline: float) -> None:
        try:
            wait_until(self.healthy, deadline, f"etcd {self.name} on {self.client_url}")
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{self.log_tail()}") from None

    def _end(self, sig: signal.Signals) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is not None:
            _LIVE.discard(proc)
            return
        try:
            proc.send_signal(sig)
            proc.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_DEADLINE)
        finally:
            _LIVE.discard(proc)

    def stop(self) -> None:
        """Graceful stop (SIGTERM)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Crash (SIGKILL)."""
        self._end(signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls.ca))
        ctx.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        return ctx

    def gateway(self, path: str, body: dict[str, object], token: str | None = None) -> object:
        """POST to etcd's JSON gRPC gateway (e.g. "/v3/auth/user/add"): the test suite's
        admin tool, so tests need neither etcdctl nor a second etcd client library."""
        req = urllib.request.Request(
            f"{self.client_url}{path}",
            data=json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                **({"Authorization": token} if token else {}),
            },
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10, context=self._ssl_context()) as r:
            return json.loads(r.read())

    def enable_auth(self, root_password: str) -> None:
        """Turn on etcd RBAC with a `root` user (etcd requires root to hold the root role)."""
        self.gateway("/v3/auth/user/add", {"name": "root", "password": root_password})
        self.gateway("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self.gateway("/v3/auth/enable", {})


class EtcdCluster:
    """Three (or n) members on loopback forming one cluster."""

    def __init__(self, base_dir: Path, size: int = 3) -> None:
        names = [f"m{i}" for i in range(size)]
        peers = {n: free_port() for n in names}
        initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in peers.items())
        self.members = [
            EtcdServer(
                base_dir / n,
                name=n,
                peer_port=peers[n],
                initial_cluster=initial,
                cluster_token=f"fleet-test-cluster-{peers[names[0]]}",
            )
            for n in names
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self, deadline: float = START_DEADLINE) -> None:
        # All members must be up before any can reach quorum, so spawn all, then wait.
        for m in self.members:
            m.spawn()
        end = time.monotonic() + deadline
        for m in self.members:
            m.wait_healthy(end)

    def stop(self) -> None:
        for m in self.members:
            m.stop()


@contextlib.contextmanager
def running(server: EtcdServer | EtcdCluster) -> Iterator[None]:
    """Start, and always tear down (also when start-up itself fails half-way)."""
    try:
        server.start()
        yield
    finally:
        if isinstance(server, EtcdCluster):
            for m in server.members:
                m.kill()
        else:
            server.kill()
