"""status, journal, ssh and fd-forward, over a fake SSH transport and a fake local runner."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_fleetctl_harness import GLOBAL, M1, M2, Cluster

from fleetctl import remote, transport
from fleetctl.remote import journal_argv, ssh_address
from fleetctl.transport import SshError, SshOptions
from fleetd.model import TargetState

M1_IP = "172.17.8.103"
M2_IP = "172.17.8.102"


@dataclass
class FakeTransport:
    """Records what would run over SSH; answers with scripted exit codes."""

    options: SshOptions
    log: list[tuple[str, str | None, bool, bool]] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    fail: str = ""
    closed: bool = False

    def run(self, address: str, command: str | None, *, tty: bool, forward_agent: bool) -> int:
        if self.fail:
            raise SshError(self.fail)
        self.log.append((address, command, tty, forward_agent))
        return self.codes.pop(0) if self.codes else 0

    @contextlib.contextmanager
    def forward_tcp(self, host: str, port: int) -> Iterator[tuple[str, int]]:
        yield ("127.0.0.1", 1)

    @contextlib.contextmanager
    def forward_unix(self, path: str) -> Iterator[tuple[str, int]]:
        yield ("127.0.0.1", 1)

    def close(self) -> None:
        self.closed = True


@dataclass
class Remote:
    transports: list[FakeTransport] = field(default_factory=list)
    local: list[list[str]] = field(default_factory=list)
    local_code: int = 0
    codes: list[int] = field(default_factory=list)
    fail: str = ""

    def open(self, options: SshOptions) -> FakeTransport:
        fake = FakeTransport(options, codes=self.codes, fail=self.fail)
        self.transports.append(fake)
        return fake

    async def run_local(self, argv: Sequence[str]) -> int:
        self.local.append(list(argv))
        return self.local_code

    @property
    def commands(self) -> list[tuple[str, str | None, bool, bool]]:
        return [entry for t in self.transports for entry in t.log]


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Cluster:
    cluster = Cluster().install(monkeypatch)
    cluster.add_machine(M1, M1_IP)
    cluster.add_machine(M2, M2_IP)
    return cluster


@pytest.fixture
def fake_remote(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Remote:
    fake = Remote()
    monkeypatch.setattr(transport, "open_transport", fake.open)
    monkeypatch.setattr(remote, "run_local", fake.run_local)
    machine_id = tmp_path / "machine-id"
    machine_id.write_text(f"{M2}\n")  # this process runs "on" M2
    monkeypatch.setattr(remote, "MACHINE_ID_FILE", str(machine_id))
    return fake


# ---- pure helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("10.0.0.1", 22, "10.0.0.1:22"),
        ("10.0.0.1", 2222, "10.0.0.1:2222"),
        ("10.0.0.1:2200", 2222, "10.0.0.1:2200"),
        ("fd00::1", 22, "[fd00::1]:22"),
    ],
)
def test_ssh_address(host: str, port: int, expected: str) -> None:
    assert ssh_address(host, port) == expected


def test_journal_command_lines() -> None:
    assert journal_argv("a.service", 10, "short", False, False) == [
        "journalctl",
        "--unit",
        "a.service",
        "--no-pager",
        "-n",
        "10",
        "--output",
        "short",
    ]
    assert journal_argv("a.service", 5, "json", True, True)[:2] == ["sudo", "journalctl"]
    assert journal_argv("a.service", 5, "json", True, True)[-1] == "-f"


# ---- status ----------------------------------------------------------------------------------


def test_status_remote_and_local(cluster: Cluster, fake_remote: Remote) -> None:
    cluster.run_unit("a.service", M1)
    cluster.run_unit("b.service", M2)
    result = cluster.invoke(
        "--ssh-username", "admin", "--tunnel", "bastion", "status", "a", "b", "--ssh-port", "2222"
    )
    assert result.exit_code == 0, result.output
    assert fake_remote.commands == [
        (f"{M1_IP}:2222", "systemctl status -l a.service", False, False)
    ]
    assert fake_remote.local == [["systemctl", "status", "-l", "b.service"]]
    assert result.stdout == "\n"  # the blank line between two units
    options = fake_remote.transports[0].options
    assert (options.username, options.tunnel) == ("admin", "bastion:22")
    assert fake_remote.transports[0].closed


def test_status_exit_code_is_the_commands(cluster: Cluster, fake_remote: Remote) -> None:
    cluster.run_unit("a.service", M1)
    cluster.run_unit("b.service", M1)
    fake_remote.codes.extend([3])
    result = cluster.invoke("status", "a.service", "b.service")
    assert result.exit_code == 3
    assert len(fake_remote.commands) == 1  # stops at the first failure, as fleet


def test_status_errors(cluster: Cluster, fake_remote: Remote) -> None:
    cluster.add_unit("idle.service")
    result = cluster.invoke("status", "idle.service")
    assert (result.exit_code, result.stderr) == (
        1,
        "Unit idle.service does not appear to be loaded.\n",
    )
    result = cluster.invoke("status", "nope.service")
    assert result.exit_code == 1
    assert result.stderr.startswith("Unit nope.service not found\n")


def test_status_ssh_failure_is_255(cluster: Cluster, fake_remote: Remote) -> None:
    cluster.run_unit("a.service", M1)
    fake_remote.fail = "connection refused"
    result = cluster.invoke("status", "a.service")
    assert (result.exit_code, result.stderr) == (
        255,
        "Unable to SSH to remote host: connection refused\n",
    )


def test_status_of_global_unit_runs_on_every_machine(cluster: Cluster, fake_remote: Remote) -> None:
    cluster.add_unit("global.service", GLOBAL, TargetState.LAUNCHED)
    cluster.publish("global.service", M1)
    cluster.publish("global.service", M2)
    result = cluster.invoke("status", "global.service")
    assert result.exit_code == 0, result.output
    assert [c[1] for c in fake_remote.commands] == ["systemctl status -l global.service"]
    assert fake_remote.local == [["systemctl", "status", "-l", "global.service"]]


def test_status_globs(cluster: Cluster, fake_remote: Remote) -> None:
    cluster.run_unit("web@1.service", M1)
    cluster.run_unit("web@2.service", M1)
    assert cluster.invoke("status", "web@*").exit_code == 0
    assert [c[1] for c in fake_remote.commands] == [
        "systemctl status -l web@1.service",
        "systemctl status -l web@2.service",
    ]


# ---- journal ---------------------------------------------------------------------------------


def test_journal_remote(cluster: Cluster, fake_remote: Remote) -> None:
    cluster.run_unit("a.service", M1)
    result = cluster.invoke("journal", "-n", "20", "-f", "--sudo", "--output=cat", "a")
    assert result.exit_code == 0, result.output
    assert fake_remote.commands == [
        (
            f"{M1_IP}:22",
            "sudo journalctl --unit a.service --no-pager -n 20 --output cat -f",
            False,
            False,
        )
    ]


def test_journal_local_and_flag_spellings(cluster: Cluster, fake_remote: Remote) -> None:
    cluster.run_unit("b.service", M2)
    fake_remote.local_code = 1
    result = cluster.invoke("journal", "--lines=3", "--follow", "b.service")
    assert result.exit_code == 1
    assert fake_remote.local == [
        ["journalctl", "--unit", "b.service", "--no-pager", "-n", "3", "--output", "short", "-f"]
    ]
    assert cluster.invoke("journal", "--f", "b.service").exit_code == 1


def test_journal_errors(cluster: Cluster, fake_remote: Remote) -> None:
    cluster.add_unit("global.service", GLOBAL, TargetState.LAUNCHED)
    cluster.add_unit("idle.service")
    cases = [
        (["nope"], 1, "Unit nope.service does not exist.\n"),
        (["global"], 1, "Unable to retrieve journal of global unit global.service.\n"),
        (["idle"], 1, "Unit idle.service does not appear to be running.\n"),
    ]
    for args, code, message in cases:
        result = cluster.invoke("journal", *args)
        assert (result.exit_code, result.stderr) == (code, message)
    result = cluster.invoke("journal")
    assert result.exit_code == 2
    assert "One unit file must be provided." in result.stderr


# ---- ssh -------------------------------------------------------------------------------------


def test_ssh_to_machine_prefix_with_command(cluster: Cluster, fake_remote: Remote) -> None:
    fake_remote.codes.append(7)
    result = cluster.invoke("ssh", "-A", "113f", "uptime", "-p")
    assert result.exit_code == 7
    assert fake_remote.commands == [(f"{M1_IP}:22", "uptime -p", False, True)]


def test_ssh_to_unit_and_dashes(cluster: Cluster, fake_remote: Remote) -> None:
    cluster.run_unit("hello.service", M2)
    result = cluster.invoke("ssh", "--ssh-port", "2222", "hello", "--", "ls", "-la")
    assert result.exit_code == 0, result.output
    assert fake_remote.commands == [(f"{M2_IP}:2222", "ls -la", False, False)]
    result = cluster.invoke("ssh", "--unit", "hello.service", "--A")
    assert fake_remote.commands[-1] == (f"{M2_IP}:22", None, False, True)  # a shell


def test_ssh_flags_pick_the_kind(cluster: Cluster, fake_remote: Remote) -> None:
    cluster.run_unit("e793.service", M1)  # a unit named like M2's id prefix
    result = cluster.invoke("ssh", "e793")
    assert result.exit_code == 1
    assert result.stderr == (
        "Unable to proceed: ambiguous argument, both machine and unit found for `e793`.\n"
        "Please use flag `-m` or `-u` to refine the search\n"
    )
    assert cluster.invoke("ssh", "-m", "e793", "true").exit_code == 0
    assert fake_remote.commands[-1][0] == f"{M2_IP}:22"
    assert cluster.invoke("ssh", "-u", "e793", "true").exit_code == 0
    assert fake_remote.commands[-1][0] == f"{M1_IP}:22"


@pytest.mark.parametrize(
    ("setup", "args", "code", "message"),
    [
        (None, ["-m", "a", "-u", "b"], 1, "Both machine and unit flags provided"),
        (None, ["zzz"], 1, "Unable to proceed: could not find matching unit or machine"),
        (None, ["-m", "zzz"], 1, "Unable to proceed: machine does not exist"),
        ("two", ["-m", "ab"], 1, "Unable to proceed: found more than one machine"),
        ("global", ["global.service"], 1, "Unable to proceed: global units unsupported"),
        ("noip", ["-m", "00noip"], 1, "Could not determine address of machine."),
        (None, [], 2, "Provide a machine or unit to connect to"),
    ],
)
def test_ssh_errors(
    cluster: Cluster,
    fake_remote: Remote,
    setup: str | None,
    args: list[str],
    code: int,
    message: str,
) -> None:
    if setup == "two":
        cluster.add_machine("ab01", "10.0.0.1")
        cluster.add_machine("ab02", "10.0.0.2")
    elif setup == "global":
        cluster.add_unit("global.service", GLOBAL, TargetState.LAUNCHED)
    elif setup == "noip":
        cluster.add_machine("00noip")
    result = cluster.invoke("ssh", *args)
    assert result.exit_code == code
    assert message in result.stderr
    assert fake_remote.commands == []


def test_ssh_connection_failure(cluster: Cluster, fake_remote: Remote) -> None:
    fake_remote.fail = "handshake failed"
    result = cluster.invoke("ssh", "113f")
    assert (result.exit_code, result.stderr) == (
        1,
        "Failed building SSH client: handshake failed\n",
    )


def test_ssh_without_the_paramiko_module(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without fleetctl/ssh/, SSH commands fail with a clear message.
    import builtins

    real_import = builtins.__import__

    def no_ssh(name: str, *args: object, **kwargs: object) -> object:
        if name == "fleetctl.ssh":
            raise ImportError("No module named 'fleetctl.ssh'")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_ssh)
    monkeypatch.setattr("importlib.import_module", lambda name: no_ssh(name))
    result = cluster.invoke("ssh", "113f")
    assert result.exit_code == 1
    assert result.stderr.startswith("Failed building SSH client: SSH support is not available")


# ---- fd-forward ------------------------------------------------------------------------------


@contextlib.contextmanager
def echo_server() -> Iterator[str]:
    """A unix socket server that answers each connection with "<request>!" then closes."""
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "api.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while chunk := conn.recv(1024):
                data += chunk
            conn.sendall(data + b"!")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        thread.join(5)
        server.close()
        os.unlink(path)
        os.rmdir(directory)


def test_fd_forward_proxies_stdin_and_stdout(cluster: Cluster) -> None:
    with echo_server() as path:
        result = cluster.invoke("fd-forward", path, input=b"GET / HTTP/1.0\r\n\r\n\x00\xff")
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == b"GET / HTTP/1.0\r\n\r\n\x00\xff!"  # bytes, untouched
    assert cluster.settings == []  # no cluster client needed


def test_fd_forward_errors(cluster: Cluster, tmp_path: Path) -> None:
    result = cluster.invoke("fd-forward", str(tmp_path / "missing.sock"))
    assert result.exit_code == 1
    assert result.stderr.startswith("Failed dialing remote address: ")
    result = cluster.invoke("fd-forward")
    assert result.exit_code == 2
    assert "Provide a single argument" in result.stderr
