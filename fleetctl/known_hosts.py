"""fleet's known_hosts checking (reference §7.6), independent of the SSH library.

A host key is handled as `(key_type, blob)`: the key's SSH wire bytes and the type name they
start with. fleetctl/ssh/ hands over what the server presented; nothing here imports
paramiko, so the rules are testable without a server.

The file is OpenSSH's format, one `<patterns> <keytype> <base64> [comment]` per line, and the
texts printed (prompt, warnings) are fleet's byte for byte. Beyond fleet, which skipped them
with a warning:

- hashed host names (`|1|salt|hash`, what `ssh-keygen -H` and Debian's `HashKnownHosts`
  write) are matched, so lines copied from ~/.ssh/known_hosts work;
- `@revoked` lines are honoured: a revoked key is refused even if another line lists it.
  `@cert-authority` lines are still skipped with a warning (no host certificates).

A host is looked up by every name it is known as (the name dialled and, for a direct
connection, the IP it resolved to: fleet matched on the IP); the first name is the one shown
in the prompt and written to the file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fleetctl.transport import SshError

DEFAULT_SSH_PORT = 22
HASH_MAGIC = "|1|"

HOST_CHANGED_WARNING = """\
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
Someone could be eavesdropping on you right now (man-in-the-middle attack)!
It is also possible that a host key has just been changed.
The fingerprint for the {algo} key sent by the remote host is
{fingerprint}.
Please contact your system administrator.
Add correct host key in {path} to get rid of this message.
Host key verification failed.
"""
REVOKED_WARNING = """\
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@       WARNING: REVOKED HOST KEY DETECTED!               @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
The {algo} host key for {addr} is marked as revoked in {path}.
This could mean that a stolen key is being used to impersonate this host.
Host key verification failed.
"""
TRUST_PROMPT = (
    "The authenticity of host '{addr}' can't be established.\n"
    "{algo} key fingerprint is {fingerprint}.\n"
    "Are you sure you want to continue connecting (yes/no)? "
)
VERIFICATION_FAILED = "Host key verification failed.\n"
ADDED = "Warning: Permanently added '{addr}' ({algo}) to the list of known hosts.\n"
NOT_ADDED = "Failed to add the host to the list of known hosts ({path}).\n"

# fleet's errors (ssh/known_hosts.go), which callers print after "Unable to SSH ...: ".
UNTRUSTED = "unauthorized host"
MISMATCH = "host key mismatch"
REVOKED = "host key revoked"


class HostKeyError(SshError):
    """The host key was refused (changed, revoked, or not accepted by the user)."""


# ---- names, patterns, fingerprints -----------------------------------------------------------


def host_id(host: str, port: int) -> str:
    """How a host is written in known_hosts: `host` on port 22 (or 0), else `[host]:port`.

    OpenSSH's put_host_port, as fleet's addrToHostPort: an IPv6 address on the default port
    is bracketed too.
    """
    if port in (0, DEFAULT_SSH_PORT):
        return f"[{host}]" if ":" in host else host
    return f"[{host}]:{port}"


def match_pattern(text: str, pattern: str) -> bool:
    """OpenSSH's match_pattern: `*` is any run of characters, `?` any one character."""
    # Iterative glob with single-star backtracking: linear enough for host names, and no
    # recursion depth to worry about on hostile input.
    t = p = 0
    star_p, star_t = -1, 0
    while t < len(text):
        if p < len(pattern) and (pattern[p] == "?" or pattern[p] == text[t]):
            t += 1
            p += 1
        elif p < len(pattern) and pattern[p] == "*":
            star_p, star_t = p, t
            p += 1
        elif star_p >= 0:
            star_t += 1
            t, p = star_t, star_p + 1
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def match_host(host: str, patterns: str) -> bool:
    """A comma-separated pattern list; any matching `!negation` rules the host out.

    Case-insensitive, as OpenSSH's match_hostname (fleet compared case-sensitively, so a
    host name typed in another case looked unknown).
    """
    host = host.lower()
    found = False
    for sub in patterns.lower().split(","):
        if sub.startswith("!"):
            if match_pattern(host, sub[1:]):
                return False
        elif match_pattern(host, sub):
            found = True
    return found


def match_hashed(host: str, hashed: str) -> bool:
    """`|1|<base64 salt>|<base64 HMAC-SHA1(salt, host)>`, as written by `ssh-keygen -H`."""
    try:
        salt_b64, digest_b64 = hashed[len(HASH_MAGIC) :].split("|", 1)
        salt = base64.b64decode(salt_b64, validate=True)
        digest = base64.b64decode(digest_b64, validate=True)
    except (ValueError, binascii.Error):
        return False
    mac = hmac.new(salt, host.lower().encode(), hashlib.sha1).digest()
    return hmac.compare_digest(mac, digest)


def algo_label(key_type: str) -> str:
    """fleet's algoString: RSA, DSA, ECDSA (any curve), else the raw type name."""
    if key_type == "ssh-rsa":
        return "RSA"
    if key_type == "ssh-dss":
        return "DSA"
    if key_type.startswith("ecdsa-sha2-nistp"):
        return "ECDSA"
    return key_type


def md5_fingerprint(blob: bytes) -> str:
    """MD5 of the key's wire bytes, colon-separated lowercase hex (fleet's md5String)."""
    return ":".join(f"{b:02x}" for b in hashlib.md5(blob, usedforsecurity=False).digest())


def key_type_of(blob: bytes) -> str:
    """The type name a public key's wire bytes start with; ValueError if malformed."""
    if len(blob) < 4:
        raise ValueError("truncated key")
    (length,) = struct.unpack(">I", blob[:4])
    if length == 0 or len(blob) < 4 + length:
        raise ValueError("truncated key")
    return blob[4 : 4 + length].decode("ascii", errors="replace")


# ---- the file --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    hosts: str  # the pattern list, or one `|1|...` hashed name
    key_type: str
    blob: bytes
    revoked: bool = False

    def matches(self, name: str) -> bool:
        if self.hosts.startswith(HASH_MAGIC):
            return match_hashed(name, self.hosts)
        return match_host(name, self.hosts)


def parse_line(line: str) -> Entry | None:
    """One known_hosts line; None for a blank line or a comment, ValueError if unusable."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    revoked = False
    if line.startswith("@"):
        marker, _, line = line.partition(" ")
        if marker != "@revoked":
            raise ValueError(f"marker {marker} not supported")
        revoked = True
    fields = line.split()
    if len(fields) < 3:
        raise ValueError("bad format (insufficient fields)")
    hosts, key_type, encoded = fields[:3]
    try:
        blob = base64.b64decode(encoded, validate=True)
        embedded = key_type_of(blob)
    except (ValueError, binascii.Error) as e:
        raise ValueError(f"error parsing key: {e}") from None
    if embedded != key_type:
        raise ValueError(f"error parsing key: type {key_type} holds a {embedded} key")
    return Entry(hosts, key_type, blob, revoked)


def _ends_without_newline(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False


class KnownHostsFile:
    """The file: parsed on demand (again only when it changed), appended to on acceptance."""

    def __init__(self, path: str, warn: Callable[[str], None]) -> None:
        self.path = os.path.expanduser(path)
        self._warn = warn
        self._stamp: tuple[int, int] | None = None
        self._entries: list[Entry] = []

    def entries(self) -> list[Entry]:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return []
        except OSError as e:
            self._warn(f"WARNING: Failed to read known_hosts file {self.path}: {e}\n")
            return []
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._entries = self._read()
            self._stamp = stamp
        return self._entries

    def _read(self) -> list[Entry]:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError as e:
            self._warn(f"WARNING: Failed to read known_hosts file {self.path}: {e}\n")
            return []
        entries = []
        for number, line in enumerate(lines, start=1):
            try:
                entry = parse_line(line)
            except ValueError as e:
                # fleet's log line "<path>:<n> - <why>"; the line is skipped.
                self._warn(f"WARNING: {self.path}:{number} - {e}\n")
                continue
            if entry is not None:
                entries.append(entry)
        return entries

    def append(self, addr: str, key_type: str, blob: bytes) -> None:
        """Add `<addr> <keytype> <base64>`; the directory is made 0700, the file 0644."""
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        # fleet appended blindly; a last line without its newline would swallow ours.
        lead = "\n" if _ends_without_newline(self.path) else ""
        line = f"{lead}{addr} {key_type} {base64.b64encode(blob).decode()}\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(line)


# ---- the checker -----------------------------------------------------------------------------


def first_word(answer: str) -> str:
    """What fleet's `fmt.Scanf("%s\\n")` made of an answer line: its first word."""
    words = answer.split()
    return words[0] if words else ""


class HostKeyChecker:
    """fleet's HostKeyChecker: known key -> OK, other key -> refused, unknown -> ask.

    `ask` prints nothing itself: it returns the user's answer line ("" if there is none,
    e.g. stdin at EOF), after the checker has written the prompt through `write`.
    """

    def __init__(self, path: str, write: Callable[[str], None], ask: Callable[[], str]) -> None:
        self.file = KnownHostsFile(path, write)
        self._write = write
        self._ask = ask
        # One prompt at a time, and no two acceptances appending the same host at once.
        self._lock = threading.Lock()

    def known_key_types(self, names: Sequence[str]) -> list[str]:
        """The key types known for any of `names`, in file order (fleet's
        GetHostKeyAlgorithms), so the server is asked for a key we can check."""
        with self._lock:
            types: list[str] = []
            for entry in self.file.entries():
                if entry.revoked or entry.key_type in types:
                    continue
                if any(entry.matches(name) for name in names):
                    types.append(entry.key_type)
            return types

    def check(self, names: Sequence[str], key_type: str, blob: bytes) -> None:
        """Accept the key `blob` presented by the host known as `names` or raise HostKeyError."""
        addr = names[0]
        algo = algo_label(key_type)
        fingerprint = md5_fingerprint(blob)
        with self._lock:
            matching = [e for e in self.file.entries() if any(e.matches(n) for n in names)]
            if any(e.revoked and e.blob == blob for e in matching):
                self._write(REVOKED_WARNING.format(algo=algo, addr=addr, path=self.file.path))
                raise HostKeyError(REVOKED)
            known = [e for e in matching if not e.revoked]
            # Any line listing this key for this host is a success, whatever the others say.
            if any(e.key_type == key_type and e.blob == blob for e in known):
                return
            if known:
                self._write(
                    HOST_CHANGED_WARNING.format(
                        algo=algo, fingerprint=fingerprint, path=self.file.path
                    )
                )
                raise HostKeyError(MISMATCH)
            self._write(TRUST_PROMPT.format(addr=addr, algo=algo, fingerprint=fingerprint))
            if first_word(self._ask()).lower() not in ("yes", "y"):
                self._write(VERIFICATION_FAILED)
                raise HostKeyError(UNTRUSTED)
            try:
                self.file.append(addr, key_type, blob)
            except OSError:
                # As fleet: the key is still trusted for this connection.
                self._write(NOT_ADDED.format(path=self.file.path))
                return
            self._write(ADDED.format(addr=addr, algo=algo))


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
