"""fleetctl/ssh/ against a real OpenSSH server (tests/integration/sshd_fixture.py).

Two sshd on 127.0.0.1 (A and B, different host keys) and a private ssh-agent holding the
client key are shared by the module; every test gets its own HOME, known_hosts file and
SSH_AUTH_SOCK. The sessions' PATH (sshd `SetEnv`) puts stub `systemctl`/`journalctl` first,
so the remote command lines of `status`/`journal` can be asserted exactly, and the venv
holding `fleetctl` (for `fd-forward` through `--tunnel`) after them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from fleetctl import remote
from fleetctl.known_hosts import HOST_CHANGED_WARNING, TRUST_PROMPT
from fleetctl.ssh import ParamikoTransport, make_transport
from fleetctl.ssh.auth import AUTH_SOCK_MISSING
from fleetctl.ssh.connections import DIAL_TIMEOUT
from fleetctl.transport import SshError, SshOptions
from tests.integration.sshd_fixture import (
    Agent,
    PublicKey,
    Sshd,
    free_port,
    keygen,
    ssh_available,
    write_stubs,
)
from tests.unit.test_fleetctl_harness import M1, Cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

USER = "root"  # sshd runs as root here; fleet's default "core" does not exist
VENV_BIN = os.path.dirname(sys.executable)


@dataclass
class Lab:
    a: Sshd
    b: Sshd
    agent: Agent
    client_key: Path  # in the agent and authorized
    spare_key: Path  # authorized, not in the agent: for identity-file tests
    stranger_key: Path  # not authorized


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    why = ssh_available()
    if why:
        pytest.skip(why)
    if not os.access(os.path.join(VENV_BIN, "fleetctl"), os.X_OK):
        pytest.skip(f"fleetctl is not installed in {VENV_BIN}")
    root = tmp_path_factory.mktemp("ssh")
    keys = root / "keys"
    keys.mkdir()
    client = keygen(keys / "client", "ed25519", "client@test")
    spare = keygen(keys / "spare", "rsa", "spare@test")
    stranger = keygen(keys / "stranger", "ed25519", "stranger@test")
    authorized = root / "authorized_keys"
    authorized.write_text(Path(f"{client}.pub").read_text() + Path(f"{spare}.pub").read_text())
    session_path = f"{write_stubs(root / 'stubs')}:{VENV_BIN}:/usr/bin:/bin"
    a = Sshd(root / "a", authorized, session_path)
    b = Sshd(root / "b", authorized, session_path)
    agent = Agent(root / "agent")
    try:
        a.start()
        b.start()
        agent.start(client)
        yield Lab(a, b, agent, client, spare, stranger)
    finally:
        agent.stop()
        b.stop()
        a.stop()


@dataclass
class Env:
    home: Path
    known_hosts: Path
    options: SshOptions


@pytest.fixture
def env(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SSH_AUTH_SOCK", lab.agent.socket)
    known_hosts = home / ".fleetctl" / "known_hosts"
    options = SshOptions(username=USER, known_hosts_file="~/.fleetctl/known_hosts", timeout=10)
    stdin(monkeypatch, "")
    return Env(home, known_hosts, options)


def stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))


def trust(env: Env, *lines: str) -> None:
    env.known_hosts.parent.mkdir(mode=0o700, exist_ok=True)
    with env.known_hosts.open("a") as f:
        f.writelines(lines)


@pytest.fixture
def transports() -> Iterator[list[ParamikoTransport]]:
    made: list[ParamikoTransport] = []
    yield made
    for t in made:
        t.close()


def connect(made: list[ParamikoTransport], options: SshOptions) -> ParamikoTransport:
    t = make_transport(options)
    made.append(t)
    return t


# ---- remote commands -------------------------------------------------------------------------


def test_command_output_and_exit_status(
    lab: Lab, env: Env, transports: list[ParamikoTransport], capsys: pytest.CaptureFixture[str]
) -> None:
    trust(env, lab.a.key().line(lab.a.host_id))
    t = connect(transports, env.options)
    code = t.run(lab.a.address, "echo out; echo err >&2; exit 7", tty=False, forward_agent=False)
    assert code == 7
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("out\n", "err\n")
    # The connection is reused for the next command on the same machine.
    assert t.run(lab.a.address, "cat", tty=False, forward_agent=False) == 0


def test_stdin_reaches_the_remote_command(
    lab: Lab,
    env: Env,
    transports: list[ParamikoTransport],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trust(env, lab.a.key().line(lab.a.host_id))
    stdin(monkeypatch, "line one\nline two\n")
    t = connect(transports, env.options)
    assert t.run(lab.a.address, "wc -l", tty=False, forward_agent=False) == 0
    assert capsys.readouterr().out.strip() == "2"


def test_stdin_after_a_prompt_answer_goes_to_the_command(
    lab: Lab,
    env: Env,
    transports: list[ParamikoTransport],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`fleetctl --tunnel A ssh ...`: the API tunnel's prompt takes one line, the remote
    command (on another transport) gets the rest of stdin."""
    stdin(monkeypatch, "yes\nhello\n")
    tunnel = connect(transports, replace(env.options, tunnel=lab.a.address))
    with tunnel.forward_tcp("127.0.0.1", 9):
        pass  # connecting the tunnel asked about A's key
    t = connect(transports, env.options)
    assert t.run(lab.a.address, "cat", tty=False, forward_agent=False) == 0
    assert capsys.readouterr().out == "hello\n"


# ---- known_hosts -----------------------------------------------------------------------------


def test_unknown_host_accepted_with_yes(
    lab: Lab,
    env: Env,
    transports: list[ParamikoTransport],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stdin(monkeypatch, "YES\n")
    old_umask = os.umask(0o022)
    try:
        t = connect(transports, env.options)
        assert t.run(lab.a.address, "true", tty=False, forward_agent=False) == 0
    finally:
        os.umask(old_umask)
    key = lab.a.key()  # paramiko prefers ed25519 when nothing is known
    prompt = TRUST_PROMPT.format(addr=lab.a.host_id, algo="ssh-ed25519", fingerprint=key.md5)
    assert capsys.readouterr().err == (
        prompt + f"Warning: Permanently added '{lab.a.host_id}' (ssh-ed25519)"
        " to the list of known hosts.\n"
    )
    assert env.known_hosts.read_text() == key.line(lab.a.host_id)
    assert env.known_hosts.parent.stat().st_mode & 0o777 == 0o700
    assert env.known_hosts.stat().st_mode & 0o777 == 0o644
    # Known now: a new transport connects without asking.
    t2 = connect(transports, env.options)
    assert t2.run(lab.a.address, "true", tty=False, forward_agent=False) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("answer", ["no\n", "yess\n", ""])
def test_unknown_host_refused(
    answer: str,
    lab: Lab,
    env: Env,
    transports: list[ParamikoTransport],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stdin(monkeypatch, answer)  # "" is stdin at EOF: nobody to answer, refused
    t = connect(transports, env.options)
    with pytest.raises(SshError, match=r"^unauthorized host$"):
        t.run(lab.a.address, "true", tty=False, forward_agent=False)
    prompt = TRUST_PROMPT.format(
        addr=lab.a.host_id, algo="ssh-ed25519", fingerprint=lab.a.key().md5
    )
    assert capsys.readouterr().err == prompt + "Host key verification failed.\n"
    assert not env.known_hosts.exists()


def test_changed_host_key_is_refused(
    lab: Lab,
    env: Env,
    transports: list[ParamikoTransport],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    # What the file says A's ed25519 key is: another key, as after a host reinstall.
    other = PublicKey.read(Path(f"{keygen(tmp_path / 'old_host_key')}.pub"))
    trust(env, other.line(lab.a.host_id))
    t = connect(transports, env.options)
    with pytest.raises(SshError, match=r"^host key mismatch$"):
        t.run(lab.a.address, "true", tty=False, forward_agent=False)
    assert capsys.readouterr().err == HOST_CHANGED_WARNING.format(
        algo="ssh-ed25519", fingerprint=lab.a.key().md5, path=str(env.known_hosts)
    )
    assert "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @" in HOST_CHANGED_WARNING


def test_known_rsa_key_is_the_one_asked_for(
    lab: Lab, env: Env, transports: list[ParamikoTransport], capsys: pytest.CaptureFixture[str]
) -> None:
    """Only the RSA key is known: the server must be asked for it, not its ed25519 key."""
    trust(env, lab.a.key("rsa").line(lab.a.host_id))
    t = connect(transports, env.options)
    assert t.run(lab.a.address, "true", tty=False, forward_agent=False) == 0
    assert capsys.readouterr().err == ""


def test_patterns_hashed_names_and_comments(
    lab: Lab, env: Env, transports: list[ParamikoTransport], capsys: pytest.CaptureFixture[str]
) -> None:
    salt = os.urandom(20)
    digest = hmac.new(salt, lab.b.host_id.encode(), hashlib.sha1).digest()
    hashed = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
    trust(
        env,
        "# a comment\n",
        "\n",
        lab.a.key().line(f"!{lab.a.host_id},[127.0.0.?]:*"),  # negated: must not match A
        lab.a.key().line("[127.0.0.*]:*,other"),
        lab.b.key().line(hashed),
    )
    t = connect(transports, env.options)
    assert t.run(lab.a.address, "true", tty=False, forward_agent=False) == 0
    assert t.run(lab.b.address, "true", tty=False, forward_agent=False) == 0
    assert capsys.readouterr().err == ""


def test_not_strict_accepts_any_key_without_writing(
    lab: Lab, env: Env, transports: list[ParamikoTransport], capsys: pytest.CaptureFixture[str]
) -> None:
    t = connect(transports, replace(env.options, strict_host_key_checking=False))
    assert t.run(lab.a.address, "true", tty=False, forward_agent=False) == 0
    assert capsys.readouterr().err == ""
    assert not env.known_hosts.exists()


# ---- authentication --------------------------------------------------------------------------


def test_no_agent_and_no_identity_is_fleets_error(
    lab: Lab,
    env: Env,
    transports: list[ParamikoTransport],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK")
    t = connect(transports, replace(env.options, strict_host_key_checking=False))
    with pytest.raises(SshError) as error:
        t.run(lab.a.address, "true", tty=False, forward_agent=False)
    assert str(error.value) == AUTH_SOCK_MISSING


def test_refused_key_is_an_authentication_error(
    lab: Lab, env: Env, transports: list[ParamikoTransport], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK")
    ssh_dir = env.home / ".ssh"
    ssh_dir.mkdir()
    (ssh_dir / "id_ed25519").write_bytes(lab.stranger_key.read_bytes())
    t = connect(transports, replace(env.options, strict_host_key_checking=False))
    with pytest.raises(SshError, match=r"unable to authenticate as 'root': the server refused"):
        t.run(lab.a.address, "true", tty=False, forward_agent=False)


def test_empty_agent_and_encrypted_identity_are_explained(
    lab: Lab,
    env: Env,
    transports: list[ParamikoTransport],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    empty = Agent(tmp_path / "empty-agent")
    try:
        empty.start()
        monkeypatch.setenv("SSH_AUTH_SOCK", empty.socket)
        ssh_dir = env.home / ".ssh"
        ssh_dir.mkdir()
        key = ssh_dir / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(key)], check=True
        )
        t = connect(transports, replace(env.options, strict_host_key_checking=False))
        with pytest.raises(SshError) as error:
            t.run(lab.a.address, "true", tty=False, forward_agent=False)
        assert str(error.value) == (
            "ssh: unable to authenticate as 'root': no key to offer;"
            " ssh-agent holds no keys (add one with ssh-add);"
            f" {key} is encrypted (add it to ssh-agent)"
        )
    finally:
        empty.stop()


def test_ssh_config_host_port_user_identity(
    lab: Lab,
    env: Env,
    transports: list[ParamikoTransport],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No agent; ~/.ssh/config says where `mybox` is, who to be and which key to use."""
    monkeypatch.delenv("SSH_AUTH_SOCK")
    ssh_dir = env.home / ".ssh"
    ssh_dir.mkdir()
    (ssh_dir / "cluster_key").write_bytes(lab.spare_key.read_bytes())
    (ssh_dir / "config").write_text(
        f"Host mybox\n  HostName 127.0.0.1\n  Port {lab.a.port}\n  User {USER}\n"
        "  IdentityFile ~/.ssh/cluster_key\n"
    )
    stdin(monkeypatch, "y\n")
    # Default --ssh-username ("core") and port 22: the config's User and Port apply.
    t = connect(transports, replace(env.options, username="core"))
    assert t.run("mybox:22", "whoami", tty=False, forward_agent=False) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{USER}\n"
    # The host key is recorded under the real name and port (HostName/Port), as OpenSSH.
    assert f"The authenticity of host '{lab.a.host_id}'" in captured.err
    assert env.known_hosts.read_text() == lab.a.key().line(lab.a.host_id)


def test_default_identity_file_without_agent(
    lab: Lab, env: Env, transports: list[ParamikoTransport], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK")
    ssh_dir = env.home / ".ssh"
    ssh_dir.mkdir()
    (ssh_dir / "id_rsa").write_bytes(lab.spare_key.read_bytes())
    t = connect(transports, replace(env.options, strict_host_key_checking=False))
    assert t.run(lab.a.address, "true", tty=False, forward_agent=False) == 0


def test_agent_forwarding(
    lab: Lab, env: Env, transports: list[ParamikoTransport], capsys: pytest.CaptureFixture[str]
) -> None:
    options = replace(env.options, strict_host_key_checking=False)
    t = connect(transports, options)
    assert t.run(lab.a.address, "ssh-add -L", tty=False, forward_agent=True) == 0
    client = PublicKey.read(Path(f"{lab.client_key}.pub"))
    assert f"{client.key_type} {client.b64}" in capsys.readouterr().out
    # Without -A the remote side has no agent (ssh-add: exit 2, cannot connect). A new
    # connection: sshd keeps a forwarded agent for the rest of the connection once granted.
    t2 = connect(transports, options)
    assert t2.run(lab.a.address, "ssh-add -L", tty=False, forward_agent=False) == 2


# ---- failures --------------------------------------------------------------------------------


def test_connection_refused(lab: Lab, env: Env, transports: list[ParamikoTransport]) -> None:
    port = free_port()
    t = connect(transports, env.options)
    with pytest.raises(SshError, match=rf"^dial tcp 127\.0\.0\.1:{port}: Connection refused$"):
        t.run(f"127.0.0.1:{port}", "true", tty=False, forward_agent=False)


def test_silent_server_times_out(lab: Lab, env: Env, transports: list[ParamikoTransport]) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        t = connect(transports, replace(env.options, timeout=0.5))
        started = time.monotonic()
        with pytest.raises(SshError, match=f"^{DIAL_TIMEOUT}$"):
            t.run(f"127.0.0.1:{server.getsockname()[1]}", "true", tty=False, forward_agent=False)
        assert time.monotonic() - started < 5


# ---- --tunnel --------------------------------------------------------------------------------


def test_run_through_tunnel_checks_both_host_keys(
    lab: Lab,
    env: Env,
    transports: list[ParamikoTransport],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stdin(monkeypatch, "yes\nyes\n")
    t = connect(transports, replace(env.options, tunnel=lab.a.address))
    assert t.run(lab.b.address, "echo $SSH_CONNECTION", tty=False, forward_agent=False) == 0
    captured = capsys.readouterr()
    # B saw a connection from A's sshd (loopback), on B's port.
    assert captured.out.split()[2:] == ["127.0.0.1", str(lab.b.port)]
    assert captured.err.count("The authenticity of host") == 2
    assert env.known_hosts.read_text() == (
        lab.a.key().line(lab.a.host_id) + lab.b.key().line(lab.b.host_id)
    )


def test_tunnelled_machine_with_changed_key_is_refused(
    lab: Lab,
    env: Env,
    transports: list[ParamikoTransport],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # B is listed with A's key: the tunnel host is fine, the machine behind it is not.
    trust(env, lab.a.key().line(lab.a.host_id), lab.a.key().line(lab.b.host_id))
    t = connect(transports, replace(env.options, tunnel=lab.a.address))
    with pytest.raises(SshError, match=r"^host key mismatch$"):
        t.run(lab.b.address, "true", tty=False, forward_agent=False)
    assert (
        "The fingerprint for the ssh-ed25519 key sent by the remote host is\n"
        + (f"{lab.b.key().md5}.\n")
        in capsys.readouterr().err
    )


def test_tunnel_to_unreachable_machine(
    lab: Lab, env: Env, transports: list[ParamikoTransport]
) -> None:
    port = free_port()
    options = replace(env.options, tunnel=lab.a.address, strict_host_key_checking=False)
    t = connect(transports, options)
    with pytest.raises(SshError, match=r"^ssh: rejected: .*\(127\.0\.0\.1:\d+\)$"):
        t.run(f"127.0.0.1:{port}", "true", tty=False, forward_agent=False)


class EchoServer:
    """Echoes each connection's bytes until EOF, then closes (TCP or unix socket)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.listen()
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


def exchange(address: tuple[str, int], payload: bytes) -> bytes:
    with socket.create_connection(address, timeout=20) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)  # the half-close must travel through the tunnel
        received = b""
        while data := conn.recv(65536):
            received += data
        return received


def test_forward_tcp(lab: Lab, env: Env, transports: list[ParamikoTransport]) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    echo = EchoServer(server)
    try:
        t = connect(transports, replace(env.options, tunnel=lab.a.address))
        trust(env, lab.a.key().line(lab.a.host_id))
        with t.forward_tcp("127.0.0.1", server.getsockname()[1]) as local:
            assert local[0] == "127.0.0.1"
            payloads = [os.urandom(200_000), b"hello"]
            results: list[bytes] = [b""] * len(payloads)

            def go(i: int) -> None:
                results[i] = exchange(local, payloads[i])

            threads = [threading.Thread(target=go, args=(i,)) for i in range(len(payloads))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert results == payloads
        assert echo.connections == 2
        # Closed: the local port no longer accepts connections.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(local, timeout=2).close()
    finally:
        echo.close()


def test_forward_unix_runs_fd_forward_on_the_tunnel_host(
    lab: Lab, env: Env, transports: list[ParamikoTransport]
) -> None:
    path = str(env.home / "api.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    echo = EchoServer(server)
    try:
        trust(env, lab.a.key().line(lab.a.host_id))
        t = connect(transports, replace(env.options, tunnel=lab.a.address))
        with t.forward_unix(path) as local:
            assert exchange(local, b"GET / HTTP/1.0\r\n\r\n") == b"GET / HTTP/1.0\r\n\r\n"
            payload = os.urandom(100_000)
            assert exchange(local, payload) == payload
        assert echo.connections == 2
    finally:
        echo.close()


def test_forward_unix_reports_fd_forward_errors(
    lab: Lab, env: Env, transports: list[ParamikoTransport], capfd: pytest.CaptureFixture[str]
) -> None:
    options = replace(env.options, tunnel=lab.a.address, strict_host_key_checking=False)
    t = connect(transports, options)
    with t.forward_unix(str(env.home / "missing.sock")) as local:
        assert exchange(local, b"x") == b""
    # fd-forward's own message comes back on our stderr.
    deadline = time.monotonic() + 10
    err = ""
    while "Failed dialing remote address" not in err and time.monotonic() < deadline:
        time.sleep(0.05)
        err += capfd.readouterr().err
    assert "Failed dialing remote address" in err


# ---- the commands, through the CLI -----------------------------------------------------------


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Cluster:
    """M1 at 127.0.0.1 runs hello.service; this process is on no cluster machine."""
    cluster = Cluster().install(monkeypatch)
    cluster.add_machine(M1, "127.0.0.1")
    cluster.run_unit("hello.service", M1)
    monkeypatch.setattr(remote, "MACHINE_ID_FILE", str(tmp_path / "no-machine-id"))
    return cluster


def cli_flags(env: Env) -> list[str]:
    return ["--ssh-username", USER, "--known-hosts-file", str(env.known_hosts)]


def test_cli_status_runs_systemctl_remotely(lab: Lab, env: Env, cluster: Cluster) -> None:
    result = cluster.invoke(
        *cli_flags(env), "status", "--ssh-port", str(lab.a.port), "hello.service", input="yes\n"
    )
    assert result.stdout == "systemctl [status] [-l] [hello.service]\n"
    assert result.exit_code == 3  # the stub's, as systemctl's for an inactive unit
    assert "The authenticity of host" in result.stderr
    assert env.known_hosts.read_text() == lab.a.key().line(lab.a.host_id)


def test_cli_journal_through_tunnel(lab: Lab, env: Env, cluster: Cluster) -> None:
    trust(env, lab.a.key().line(lab.a.host_id), lab.b.key().line(lab.b.host_id))
    result = cluster.invoke(
        *cli_flags(env),
        "--tunnel",
        lab.a.address,
        "journal",
        "--ssh-port",
        str(lab.b.port),
        "--lines",
        "5",
        "hello.service",
    )
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == (
        "journalctl [--unit] [hello.service] [--no-pager] [-n] [5] [--output] [short]\n"
    )


def test_cli_ssh_runs_command_and_propagates_status(lab: Lab, env: Env, cluster: Cluster) -> None:
    trust(env, lab.a.key().line(lab.a.host_id))
    result = cluster.invoke(
        *cli_flags(env), "ssh", "--ssh-port", str(lab.a.port), M1[:8], "echo", "hi;", "exit", "4"
    )
    assert (result.exit_code, result.stdout, result.stderr) == (4, "hi\n", "")


def test_cli_ssh_failure_is_255(lab: Lab, env: Env, cluster: Cluster) -> None:
    trust(env, lab.a.key().line(lab.a.host_id))
    port = free_port()
    result = cluster.invoke(*cli_flags(env), "status", "--ssh-port", str(port), "hello.service")
    assert result.exit_code == 255
    assert result.stderr == (
        f"Unable to SSH to remote host: dial tcp 127.0.0.1:{port}: Connection refused\n"
    )


def test_cli_changed_key_refused(lab: Lab, env: Env, cluster: Cluster) -> None:
    trust(env, lab.b.key().line(lab.a.host_id))  # B's key where A's should be
    result = cluster.invoke(
        *cli_flags(env), "status", "--ssh-port", str(lab.a.port), "hello.service"
    )
    assert result.exit_code == 255
    assert result.stderr.endswith(
        "Host key verification failed.\nUnable to SSH to remote host: host key mismatch\n"
    )
    assert result.stdout == ""


def test_cli_no_strict_host_key_checking(lab: Lab, env: Env, cluster: Cluster) -> None:
    result = cluster.invoke(
        *cli_flags(env),
        "--strict-host-key-checking=false",
        "status",
        "--ssh-port",
        str(lab.a.port),
        "hello.service",
    )
    assert (result.exit_code, result.stderr) == (3, "")
    assert not env.known_hosts.exists()


# ---- --tunnel for the API driver, end to end ---------------------------------------------------


class FakeApi:
    """A fleet API answering GET /fleet/v1/machines, on a unix socket or a TCP port."""

    def __init__(self, unix_path: str | None = None) -> None:
        from aiohttp import web

        self.requests = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()

        async def machines(request: web.Request) -> web.Response:
            self.requests += 1
            return web.json_response({"machines": [{"id": M1, "primaryIP": "10.9.8.7"}]})

        async def start() -> web.AppRunner:
            app = web.Application()
            app.router.add_get("/fleet/v1/machines", machines)
            runner = web.AppRunner(app)
            await runner.setup()
            site: web.BaseSite
            if unix_path is not None:
                site = web.UnixSite(runner, unix_path)
            else:
                site = web.TCPSite(runner, "127.0.0.1", self.port)
            await site.start()
            return runner

        self.port = free_port()
        self._runner = self._loop.run_until_complete(start())
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> Cluster:
    """Only the CliRunner of the harness: the real client factory talks to FakeApi."""
    return Cluster()


@pytest.mark.parametrize("endpoint", ["unix", "http"])
def test_cli_api_driver_through_tunnel(
    endpoint: str, lab: Lab, env: Env, no_cluster: Cluster
) -> None:
    trust(env, lab.a.key().line(lab.a.host_id))
    path = str(env.home / "fleet.sock")
    api = FakeApi(path if endpoint == "unix" else None)
    try:
        url = f"unix://{path}" if endpoint == "unix" else f"http://127.0.0.1:{api.port}"
        result = no_cluster.invoke(
            *cli_flags(env), "--tunnel", lab.a.address, "--endpoint", url, "list-machines", "-l"
        )
        assert (result.exit_code, result.stderr) == (0, ""), result.output
        assert f"{M1}\t10.9.8.7" in result.stdout
        assert api.requests == 1
        # The remote `fleetctl fd-forward` ends with the connection it served.
        deadline = time.monotonic() + 10
        while fd_forwards(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fd_forwards(path) == []
    finally:
        api.close()


def fd_forwards(path: str) -> list[int]:
    """Pids of `fleetctl fd-forward <path>` processes (started by our sshd sessions)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fd-forward" in argv and path.encode() in argv:
            found.append(int(entry))
    return found


# ---- interactive shell ---------------------------------------------------------------------------

SHELL_SCRIPT = """
import sys
from fleetctl.ssh import make_transport
from fleetctl.transport import SshOptions

t = make_transport(SshOptions(username=sys.argv[1], strict_host_key_checking=False))
try:
    code = t.run(sys.argv[2], None, tty=True, forward_agent=False)
finally:
    t.close()
print(f"\\r\\nEXIT {code}", flush=True)
"""


def test_interactive_shell_on_a_pty(lab: Lab, env: Env) -> None:
    """A terminal on stdin: raw mode, a PTY xterm-256color, the shell's exit status back."""
    import pty

    controller, terminal = pty.openpty()
    environ = {**os.environ, "HOME": str(env.home), "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-c", SHELL_SCRIPT, USER, lab.a.address],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=environ,
        start_new_session=True,
    )
    os.close(terminal)
    output = b""
    try:
        # Typed ahead, before fleetctl is even running: raw mode must not discard it.
        os.write(controller, b"echo TERM=$TERM; tty; exit 5\n")
        deadline = time.monotonic() + 30
        while b"EXIT" not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    output += os.read(controller, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
    text = output.decode(errors="replace")
    assert "TERM=xterm-256color" in text
    assert "/dev/pts/" in text  # the remote shell has a terminal
    assert "EXIT 5" in text
    assert proc.returncode == 0
