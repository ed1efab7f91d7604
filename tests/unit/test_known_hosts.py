"""fleetctl/known_hosts.py: fleet's known_hosts rules, with no SSH server (reference §7.6)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from pathlib import Path

import pytest

from fleetctl.known_hosts import (
    HOST_CHANGED_WARNING,
    TRUST_PROMPT,
    HostKeyChecker,
    HostKeyError,
    KnownHostsFile,
    algo_label,
    first_word,
    host_id,
    match_host,
    match_pattern,
    md5_fingerprint,
    parse_line,
)
from fleetctl.ssh.connections import split_address
from fleetctl.transport import SshError


def blob(key_type: str, payload: bytes = b"") -> bytes:
    """Wire bytes shaped like a public key: the type as an SSH string, then anything."""
    name = key_type.encode()
    return struct.pack(">I", len(name)) + name + (payload or os.urandom(32))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


ED1, ED2 = blob("ssh-ed25519"), blob("ssh-ed25519")
RSA = blob("ssh-rsa")


class Console:
    """What the checker writes, and the answers it reads."""

    def __init__(self, *answers: str) -> None:
        self.written = ""
        self.answers = list(answers)
        self.asked = 0

    def write(self, text: str) -> None:
        self.written += text

    def ask(self) -> str:
        self.asked += 1
        return self.answers.pop(0) if self.answers else ""


def checker(path: Path, console: Console) -> HostKeyChecker:
    return HostKeyChecker(str(path), console.write, console.ask)


# ---- names and patterns ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("10.0.0.1", 22, "10.0.0.1"),
        ("10.0.0.1", 0, "10.0.0.1"),
        ("10.0.0.1", 2222, "[10.0.0.1]:2222"),
        ("fd00::1", 22, "[fd00::1]"),
        ("fd00::1", 2222, "[fd00::1]:2222"),
        ("core-1.example", 22, "core-1.example"),
    ],
)
def test_host_id(host: str, port: int, expected: str) -> None:
    assert host_id(host, port) == expected


@pytest.mark.parametrize(
    ("text", "pattern", "expected"),
    [
        ("abc", "abc", True),
        ("abc", "a?c", True),
        ("abc", "a*", True),
        ("abc", "*c", True),
        ("abc", "*", True),
        ("", "*", True),
        ("abc", "a*b*c", True),
        ("abc", "a*d", False),
        ("abc", "ab", False),
        ("ab", "abc", False),
        ("[10.0.0.1]:2222", "[10.0.0.*]:*", True),
        ("aaa", "*a*a*a*a", False),
    ],
)
def test_match_pattern(text: str, pattern: str, expected: bool) -> None:
    assert match_pattern(text, pattern) is expected


def test_match_host_lists_negation_and_case() -> None:
    assert match_host("web1", "db*,web?")
    assert not match_host("web12", "db*,web?")
    assert not match_host("web1", "web*,!web1")  # a matching negation wins
    assert match_host("web2", "web*,!web1")
    assert not match_host("web2", "!web1")  # only negations: no positive match
    assert match_host("Core.Example", "core.example")


def test_algo_labels_and_fingerprint() -> None:
    assert [algo_label(t) for t in ("ssh-rsa", "ssh-dss", "ecdsa-sha2-nistp384")] == [
        "RSA",
        "DSA",
        "ECDSA",
    ]
    assert algo_label("ssh-ed25519") == "ssh-ed25519"
    expected = hashlib.md5(ED1, usedforsecurity=False).hexdigest()
    assert md5_fingerprint(ED1) == ":".join(expected[i : i + 2] for i in range(0, 32, 2))


def test_first_word_is_what_scanf_read() -> None:
    assert [first_word(a) for a in ("yes\n", "  y please\n", "\n", "")] == ["yes", "y", "", ""]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.0.0.1:22", ("10.0.0.1", 22)),
        ("host:2222", ("host", 2222)),
        ("host", ("host", 22)),
        ("[fd00::1]:2222", ("fd00::1", 2222)),
        ("[fd00::1]", ("fd00::1", 22)),
        ("fd00::1", ("fd00::1", 22)),
    ],
)
def test_split_address(address: str, expected: tuple[str, int]) -> None:
    assert split_address(address) == expected


@pytest.mark.parametrize("address", ["host:port", ":22", "[]:22"])
def test_split_address_errors(address: str) -> None:
    with pytest.raises(SshError):
        split_address(address)


# ---- the file --------------------------------------------------------------------------------


def test_parse_line() -> None:
    assert parse_line("   ") is None
    assert parse_line("  # comment") is None
    entry = parse_line(f"a,b ssh-ed25519 {b64(ED1)} some comment")
    assert entry is not None
    assert (entry.hosts, entry.key_type, entry.blob, entry.revoked) == (
        "a,b",
        "ssh-ed25519",
        ED1,
        False,
    )
    revoked = parse_line(f"@revoked * ssh-ed25519 {b64(ED1)}")
    assert revoked is not None
    assert revoked.revoked
    for bad, why in [
        (f"@cert-authority * ssh-ed25519 {b64(ED1)}", "marker @cert-authority not supported"),
        ("host ssh-ed25519", "insufficient fields"),
        ("host ssh-ed25519 !!notbase64", "error parsing key"),
        (f"host ssh-rsa {b64(ED1)}", "holds a ssh-ed25519 key"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_line(bad)


def test_bad_lines_are_skipped_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(
        f"@cert-authority *.example ssh-ed25519 {b64(ED1)}\nbroken\ngood ssh-ed25519 {b64(ED1)}\n"
    )
    warnings: list[str] = []
    entries = KnownHostsFile(str(path), warnings.append).entries()
    assert [e.hosts for e in entries] == ["good"]
    assert warnings == [
        f"WARNING: {path}:1 - marker @cert-authority not supported\n",
        f"WARNING: {path}:2 - bad format (insufficient fields)\n",
    ]
    # Parsed once: no second round of warnings while the file is unchanged.
    file = KnownHostsFile(str(path), warnings.append)
    warnings.clear()
    file.entries()
    file.entries()
    assert len(warnings) == 2


def test_append_creates_private_directory_and_keeps_lines_apart(tmp_path: Path) -> None:
    path = tmp_path / "new" / "known_hosts"
    file = KnownHostsFile(str(path), lambda _: None)
    old = os.umask(0o022)
    try:
        file.append("h1", "ssh-ed25519", ED1)
    finally:
        os.umask(old)
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o644
    with path.open("a") as f:
        f.write("# no newline at the end")
    file.append("h2", "ssh-rsa", RSA)
    assert path.read_text() == (
        f"h1 ssh-ed25519 {b64(ED1)}\n# no newline at the end\nh2 ssh-rsa {b64(RSA)}\n"
    )


# ---- the checker -----------------------------------------------------------------------------


def test_known_key_passes_silently(tmp_path: Path) -> None:
    path = tmp_path / "kh"
    path.write_text(
        f"[10.0.0.1]:2222 ssh-ed25519 {b64(ED2)}\n[10.0.0.1]:2222 ssh-ed25519 {b64(ED1)}\n"
    )
    console = Console()
    checker(path, console).check(["[10.0.0.1]:2222"], "ssh-ed25519", ED1)
    assert (console.written, console.asked) == ("", 0)


def test_changed_key_prints_fleets_warning(tmp_path: Path) -> None:
    path = tmp_path / "kh"
    path.write_text(f"10.0.0.1 ssh-ed25519 {b64(ED2)}\n")
    console = Console("yes\n")
    with pytest.raises(HostKeyError, match=r"^host key mismatch$"):
        checker(path, console).check(["10.0.0.1"], "ssh-ed25519", ED1)
    assert console.asked == 0  # never offered to accept the new key
    assert console.written == HOST_CHANGED_WARNING.format(
        algo="ssh-ed25519", fingerprint=md5_fingerprint(ED1), path=str(path)
    )
    assert console.written.splitlines()[:4] == [
        "@" * 59,
        "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @",
        "@" * 59,
        "IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!",
    ]
    assert console.written.endswith("Host key verification failed.\n")


def test_unknown_host_prompt_and_answers(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "kh"
    prompt = TRUST_PROMPT.format(addr="10.0.0.1", algo="RSA", fingerprint=md5_fingerprint(RSA))
    assert prompt.endswith("Are you sure you want to continue connecting (yes/no)? ")

    console = Console("nope\n")
    with pytest.raises(HostKeyError, match=r"^unauthorized host$"):
        checker(path, console).check(["10.0.0.1"], "ssh-rsa", RSA)
    assert console.written == prompt + "Host key verification failed.\n"
    assert not path.exists()

    console = Console("Y\n")
    checker(path, console).check(["10.0.0.1", "10.0.0.9"], "ssh-rsa", RSA)
    assert console.written == (
        prompt + "Warning: Permanently added '10.0.0.1' (RSA) to the list of known hosts.\n"
    )
    assert path.read_text() == f"10.0.0.1 ssh-rsa {b64(RSA)}\n"


def test_host_known_by_its_ip(tmp_path: Path) -> None:
    """fleet recorded hosts by IP: such a line still vouches for the host dialled by name."""
    path = tmp_path / "kh"
    path.write_text(f"10.0.0.1 ssh-ed25519 {b64(ED1)}\n")
    console = Console()
    c = checker(path, console)
    assert c.known_key_types(["bastion", "10.0.0.1"]) == ["ssh-ed25519"]
    c.check(["bastion", "10.0.0.1"], "ssh-ed25519", ED1)
    assert console.written == ""


def test_hashed_host_names(tmp_path: Path) -> None:
    salt = os.urandom(20)
    digest = hmac.new(salt, b"[10.0.0.1]:2222", hashlib.sha1).digest()
    path = tmp_path / "kh"
    path.write_text(f"|1|{b64(salt)}|{b64(digest)} ssh-ed25519 {b64(ED1)}\n")
    console = Console()
    c = checker(path, console)
    c.check(["[10.0.0.1]:2222"], "ssh-ed25519", ED1)
    with pytest.raises(HostKeyError, match="mismatch"):
        c.check(["[10.0.0.1]:2222"], "ssh-ed25519", ED2)
    assert c.known_key_types(["[10.0.0.2]:2222"]) == []


def test_revoked_key_is_refused_even_if_listed(tmp_path: Path) -> None:
    path = tmp_path / "kh"
    path.write_text(f"@revoked * ssh-ed25519 {b64(ED1)}\n10.0.0.1 ssh-ed25519 {b64(ED1)}\n")
    console = Console()
    with pytest.raises(HostKeyError, match=r"^host key revoked$"):
        checker(path, console).check(["10.0.0.1"], "ssh-ed25519", ED1)
    assert "REVOKED HOST KEY DETECTED" in console.written


def test_known_key_types_follow_the_file(tmp_path: Path) -> None:
    path = tmp_path / "kh"
    path.write_text(
        f"h1 ssh-rsa {b64(RSA)}\nh1,h2 ssh-ed25519 {b64(ED1)}\nh1 ssh-rsa {b64(RSA)}\n"
        f"@revoked h3 ssh-ed25519 {b64(ED2)}\n"
    )
    c = checker(path, Console())
    assert c.known_key_types(["h1"]) == ["ssh-rsa", "ssh-ed25519"]
    assert c.known_key_types(["h2"]) == ["ssh-ed25519"]
    assert c.known_key_types(["h3"]) == []


def test_unwritable_file_still_trusts_the_key(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = blocker / "kh"  # its "directory" is a file: cannot be created
    console = Console("yes\n")
    checker(path, console).check(["h"], "ssh-ed25519", ED1)
    assert console.written.endswith(
        f"Failed to add the host to the list of known hosts ({path}).\n"
    )
