"""`EtcdKV`: the `KV` contract (fleetd/registry/kv.py) over etcd v3's gRPC API.

This is the only module of the project that speaks to etcd (with transport.py, its gRPC calls;
http2.py, their framing; keepalive.py, the lease keepalive stream; and etcdpb, etcd's protobuf
messages). It keeps their values at this boundary: every response is turned into the
contract's dataclasses and every failed call into a `fleetd.errors` type before it leaves.

How it talks to etcd, and why:

- Through `transport.Channel`, one HTTP/2 connection at a time to the first member that
  answers (every endpoint is a member; a dead one is skipped), with TLS (CA, client
  certificate and key) for https endpoints. Not through grpcio, whose C core was the largest
  single share of fleetd's memory and most of a request's CPU (transport.py says more).
- Requests are etcd's own protobuf messages; the auth token goes with each call, and a call
  refused for a stale token is repeated once after authenticating again.
- Every `watch()` is a `Watch` stream of its own: one async iterator, compaction seen as
  `compact_revision` on the response, any stream failure ends exactly that watch, and closing
  the iterator cancels exactly that stream.
- Lease keepalives share one long-lived `LeaseKeepAlive` stream per EtcdKV, on a connection of
  its own, matched to their answers by lease id (keepalive.py, a streaming call of
  transport.py's like a watch): it is the request a machine makes forever, and opening a
  stream per keepalive cost several times its CPU.
- `get_many` reads many keys in one round trip: a read-only transaction of range requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetd.errors import (
    Compacted,
    ConfigError,
    LeaseNotFound,
    NotFound,
    QuotaExceeded,
    RegistryUnavailable,
)
from fleetd.etcd.endpoints import EndpointError, Endpoints, Problem, parse_endpoints
from fleetd.etcd.etcdpb import Event, rpc
from fleetd.etcd.transport import (
    PROBE_TIMEOUT,
    Call,
    Channel,
    Member,
    RpcError,
    StatusCode,
    member_mute,
    tls_context,
)
from fleetd.registry.kv import (
    MAX_TXN_OPS,
    Compare,
    EventType,
    KeyValue,
    Op,
    Put,
    TxnResult,
    WatchEvent,
    check_txn_size,
)

if TYPE_CHECKING:
    from fleetd.etcd.keepalive import KeepAliveStream

DEFAULT_ENDPOINT = "http://127.0.0.1:2379"
DEFAULT_PORT = 2379

_TARGETS = {
    "value": rpc.Compare.VALUE,
    "version": rpc.Compare.VERSION,
    "create": rpc.Compare.CREATE,
    "mod": rpc.Compare.MOD,
}
_RESULTS = {
    "==": rpc.Compare.EQUAL,
    "!=": rpc.Compare.NOT_EQUAL,
    "<": rpc.Compare.LESS,
    ">": rpc.Compare.GREATER,
}

# etcd answers these when a token is no longer (or not yet) valid; the request is safe to
# repeat after authenticating again, because etcd refused it before doing anything.
_STALE_TOKEN_MESSAGES = (
    "invalid auth token",
    "revision of auth store is old",
    "user name is empty",
)


@dataclass(frozen=True, slots=True)
class EtcdConfig:
    """How to reach etcd. Validated on construction: a bad combination is a ConfigError."""

    endpoints: Sequence[str] = (DEFAULT_ENDPOINT,)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    request_timeout: float = 5.0

    def __post_init__(self) -> None:
        # Normalise to a tuple so the frozen config is really immutable (and hashable).
        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        _parse_endpoints(self.endpoints)  # raises ConfigError
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError(
                "etcd client certificate and key go together: give both cert_file and key_file"
                f" or neither (got cert_file={self.cert_file!r}, key_file={self.key_file!r})"
            )
        if (self.username is None) != (self.password is None):
            raise ConfigError("etcd username and password go together: give both or neither")
        if self.username == "":
            raise ConfigError("etcd username must not be empty")
        if not self.request_timeout > 0:
            raise ConfigError(f"etcd request_timeout must be > 0, got {self.request_timeout!r}")
        if not self.tls and (self.ca_file or self.cert_file or self.key_file):
            # Refuse rather than silently send plaintext when TLS material was configured.
            raise ConfigError(
                "etcd TLS files are set (ca_file/cert_file/key_file) but the endpoints are"
                " http://; use https:// endpoints"
            )

    @property
    def tls(self) -> bool:
        return _parse_endpoints(self.endpoints).tls


def _parse_endpoints(endpoints: Sequence[str]) -> Endpoints:
    """The endpoints by the shared rule (fleetd/etcd/endpoints.py), in the client's words; a
    missing port is etcd's 2379, and spaces around a URL are dropped."""
    try:
        return parse_endpoints([url.strip() for url in endpoints], default_port=DEFAULT_PORT)
    except EndpointError as e:
        raise ConfigError(_endpoint_error(e, endpoints)) from None


def _endpoint_error(e: EndpointError, endpoints: Sequence[str]) -> str:
    bad = f"bad etcd endpoint {e.url!r}"
    match e.problem:
        case Problem.NONE:
            return "no etcd endpoints given"
        case Problem.UNPARSABLE:
            return f"{bad}: {e.detail}"
        case Problem.SCHEME | Problem.EMPTY:
            return f"{bad}: expected http://host:port or https://host:port"
        case Problem.HOST_PORT | Problem.PATH:
            return f"{bad}: expected scheme://host:port only"
        case Problem.WHITESPACE:
            return f"{bad}: contains whitespace or control characters"
        case Problem.CREDENTIALS:
            return f"{bad}: credentials do not go in the URL; give the etcd username and password"
        case Problem.MIXED:
            return (
                "etcd endpoints mix http:// and https://; one channel cannot be both plaintext"
                f" and TLS: {', '.join(endpoints)}"
            )


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _read_pem(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read etcd {what} {path!r}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"etcd {what} {path!r} is not a PEM file")
    return data


def _members(config: EtcdConfig) -> list[Member]:
    """The members as the channel and the keepalive stream reach them. Reads the TLS files:
    a missing or broken one is a ConfigError now, not at the first request."""
    parsed = _parse_endpoints(config.endpoints)
    endpoints = parsed.members
    ca = _read_pem(config.ca_file, "CA file")
    _read_pem(config.cert_file, "client certificate")
    _read_pem(config.key_file, "client key")
    tls = None
    if parsed.tls:
        try:
            tls = tls_context(ca, config.cert_file, config.key_file)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"etcd TLS: cannot use the CA, certificate or key: {e}") from e
    # Each member's certificate is checked against the host of that member's own endpoint:
    # a cluster whose members each have a certificate of their own (one per machine, naming
    # that machine) works, and no certificate must name another member's host. (These
    # endpoints are all the client knows of the cluster: it discovers no members.)
    return [Member(ep.host, ep.port, _hostport(ep.host, ep.port), tls, ep.host) for ep in endpoints]


class _Session:
    """The channel to etcd and the auth token its calls carry."""

    def __init__(self, config: EtcdConfig) -> None:
        self._config = config
        self.members = _members(config)
        self.channel = Channel(self.members, config.request_timeout)
        self.token: str | None = None
        self._authenticated = config.username is None
        self._auth_lock: asyncio.Lock | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("token", self.token),) if self.token is not None else ()

    async def ensure(self) -> None:
        """Authenticate once, when a user is configured."""
        if not self._authenticated:
            await self.reauthenticate(None)

    async def _authenticate(self) -> None:
        request = rpc.AuthenticateRequest(
            name=self._config.username, password=self._config.password
        )
        try:
            answer = await self.channel.unary(
                b"/etcdserverpb.Auth/Authenticate", request.SerializeToString(), ()
            )
        except RpcError as e:
            details = e.details()
            if "authentication is not enabled" in details:
                # As etcd's Go client does: credentials on a cluster without auth are no error.
                self.token = None
                self._authenticated = True
                return
            if e.code() in (StatusCode.INVALID_ARGUMENT, StatusCode.PERMISSION_DENIED):
                raise ConfigError(
                    f"etcd refused the credentials of user {self._config.username!r}: {details}"
                ) from e
            raise _unavailable(e, "authenticate", self._config) from e
        self.token = str(rpc.AuthenticateResponse.FromString(answer).token)
        self._authenticated = True

    async def reauthenticate(self, stale_token: str | None) -> None:
        """Get a new token, unless a concurrent request already replaced `stale_token`."""
        if self._auth_lock is None:
            self._auth_lock = asyncio.Lock()
        async with self._auth_lock:
            if self.token == stale_token:
                await self._authenticate()

    async def close(self) -> None:
        await self.channel.close()


def _hint(details: str, config: EtcdConfig) -> str:
    """A human reason for the usual ways a connection fails, from the transport's words."""
    d = details.lower()
    if "connection refused" in d:
        return "nothing is listening there"
    if "hostname verification" in d:
        return "the etcd server certificate does not name the host in the endpoint URL"
    if "certificate_verify_failed" in d:
        return "TLS handshake failed: the etcd server certificate is not signed by ca_file"
    if "bad_certificate" in d or "certificate_required" in d or "unknown_ca" in d:
        return (
            "etcd refused the TLS client: it needs a client certificate (cert_file, key_file)"
            " signed by a CA it trusts"
        )
    if "without answering in http/2" in d and not config.tls:
        return "etcd closed a plaintext connection: does it serve TLS? then use https://"
    return ""


def _unavailable(e: RpcError, what: str, config: EtcdConfig) -> RegistryUnavailable:
    details = e.details()
    where = ", ".join(config.endpoints)
    if e.code() == StatusCode.DEADLINE_EXCEEDED:
        msg = f"etcd {what}: no answer from {where} within {config.request_timeout:g}s"
    else:
        msg = f"etcd {what} failed on {where}: {e.code().name}: {details}"
    hint = _hint(details, config)
    return RegistryUnavailable(f"{msg} ({hint})" if hint else msg)


# etcd's words (rpctypes.ErrGRPCNoSpace) for a write refused under its NOSPACE alarm.
NOSPACE_DETAILS = "database space exceeded"


def nospace_message(what: str, config: EtcdConfig) -> str:
    """What to tell whoever met the NOSPACE alarm: what happened, and the way out."""
    where = ", ".join(config.endpoints)
    return (
        f"etcd {what} refused on {where}: etcd's database is full (NOSPACE alarm: mvcc:"
        " database space exceeded, the size set by --quota-backend-bytes); reads still work,"
        " every write fails until an operator frees space and disarms the alarm:"
        " `etcdctl endpoint status -w json` (its revision), `etcdctl compact <revision>`,"
        " `etcdctl defrag`, `etcdctl alarm disarm` (docs/troubleshooting.md)"
    )


def _map_error(e: RpcError, what: str, config: EtcdConfig) -> Exception:
    """Turn a failed call into the error the contract promises."""
    code = e.code()
    details = e.details()
    if config.username is None and _is_stale_token(e):
        return ConfigError(f"etcd requires authentication: set username and password ({details})")
    if code == StatusCode.NOT_FOUND and "lease not found" in details:
        return LeaseNotFound(f"etcd {what}: {details}")
    if code == StatusCode.OUT_OF_RANGE:
        # Compacting a revision etcd has not reached yet.
        return ValueError(f"etcd refused the {what} request: {details}")
    if code == StatusCode.INVALID_ARGUMENT:
        # A malformed request (too many ops, duplicate keys in a txn, ...): a caller bug.
        return ValueError(f"etcd refused the {what} request: {details}")
    if code == StatusCode.PERMISSION_DENIED:
        return ConfigError(f"etcd user {config.username!r} is not allowed to {what}: {details}")
    if code == StatusCode.RESOURCE_EXHAUSTED and NOSPACE_DETAILS in details:
        return QuotaExceeded(nospace_message(what, config))
    # UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, other RESOURCE_EXHAUSTED, INTERNAL, ...:
    # nothing the caller can fix by changing the request; it retries later.
    return _unavailable(e, what, config)


def _is_stale_token(e: RpcError) -> bool:
    details = e.details()
    return any(m in details for m in _STALE_TOKEN_MESSAGES)


def _enc(text: str) -> bytes:
    # surrogateescape: a foreign non-UTF-8 key read through _dec is written back unchanged.
    return text.encode("utf-8", "surrogateescape")


def _dec(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _prefix_range(prefix: str) -> tuple[bytes, bytes]:
    """etcd's (key, range_end) for every key starting with `prefix`."""
    key = _enc(prefix)
    end = bytearray(key)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return key, bytes(end)
        end.pop()
    # Empty prefix, or only 0xff bytes: range_end "\0" means "every key >= key".
    return (key or b"\0"), b"\0"


def _kv(kv: Any) -> KeyValue:
    return KeyValue(
        key=_dec(kv.key),
        value=_dec(kv.value),
        create_revision=int(kv.create_revision),
        mod_revision=int(kv.mod_revision),
        version=int(kv.version),
        lease=int(kv.lease),
    )


def _compare(c: Compare) -> Any:
    target = _TARGETS.get(c.target)
    result = _RESULTS.get(c.op)
    if target is None or result is None:
        raise ValueError(f"bad compare {c!r}: unknown target or op")
    msg = rpc.Compare(key=_enc(c.key), target=target, result=result)
    if c.target == "value":
        if not isinstance(c.operand, str):
            raise TypeError(f"compare on value needs a str operand: {c!r}")
        msg.value = _enc(c.operand)
    else:
        if not isinstance(c.operand, int) or isinstance(c.operand, bool):
            raise TypeError(f"compare on {c.target} needs an int operand: {c!r}")
        if c.target == "version":
            msg.version = c.operand
        elif c.target == "create":
            msg.create_revision = c.operand
        else:
            msg.mod_revision = c.operand
    return msg


def _request_op(op: Op) -> Any:
    if isinstance(op, Put):
        return rpc.RequestOp(
            request_put=rpc.PutRequest(key=_enc(op.key), value=_enc(op.value), lease=op.lease)
        )
    if op.prefix:
        key, end = _prefix_range(op.key)
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key, range_end=end))
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=_enc(op.key)))


_RANGE = b"/etcdserverpb.KV/Range"
_TXN = b"/etcdserverpb.KV/Txn"
_COMPACT = b"/etcdserverpb.KV/Compact"
_GRANT = b"/etcdserverpb.Lease/LeaseGrant"
_REVOKE = b"/etcdserverpb.Lease/LeaseRevoke"
_WATCH = b"/etcdserverpb.Watch/Watch"
_STATUS = b"/etcdserverpb.Maintenance/Status"


class EtcdKV:
    """The KV contract on a real etcd v3 cluster.

    Create it anywhere; it connects lazily, on the first request, and its connections then
    belong to that event loop: use one EtcdKV per loop, and `close()` it (or `async with`).
    Failed writes are not retried here (a write may or may not have been applied when its
    answer is lost), reads only once on another member when theirs is lost or mute
    (transport.Channel.unary); callers retry on RegistryUnavailable.
    """

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self._session = _Session(config)  # reads the TLS files: ConfigError now, not later
        self._timeout = config.request_timeout
        self.stats: Counter[str] = Counter()
        self._raft_term = 0
        self._mute_before: set[str] = set()  # members the last mute_members found mute
        self._closed = False
        self._keepalives: KeepAliveStream | None = None
        self._keepalive_lock = asyncio.Lock()
        self._keepalive_member = 0  # index of the member to try first

    @property
    def session(self) -> _Session:
        """The channel and auth token (tests make the token stale through it)."""
        return self._session

    async def _call(self, what: str, call: Callable[[_Session], Awaitable[Any]]) -> Any:
        """One request with the auth token, one re-authentication if etcd calls the token
        stale, and errors mapped to the contract's."""
        self.stats[what] += 1
        if self._closed:
            raise RegistryUnavailable("etcd client is closed")
        session = self._session
        await session.ensure()
        token = session.token
        try:
            return await call(session)
        except RpcError as e:
            if not (self.config.username is not None and _is_stale_token(e)):
                raise _map_error(e, what, self.config) from e
        try:
            await session.reauthenticate(token)
        except RpcError as e:
            raise _map_error(e, what, self.config) from e
        try:
            return await call(session)
        except RpcError as e:
            raise _map_error(e, what, self.config) from e

    async def _unary(
        self, what: str, path: bytes, request: Any, answer: Any, *, read: bool = False
    ) -> Any:
        """A unary call: `request` out, an `answer` message (its class) back. A `read` may
        be sent twice (Channel.unary)."""
        body = request.SerializeToString()

        async def once(s: _Session) -> bytes:
            return await s.channel.unary(path, body, s.metadata, idempotent=read)

        response = answer.FromString(await self._call(what, once))
        header = getattr(response, "header", None)
        if header is not None:
            self._saw_term(int(header.raft_term))
        return response

    async def get(self, key: str) -> KeyValue | None:
        request = rpc.RangeRequest(key=_enc(key))
        response = await self._unary("get", _RANGE, request, rpc.RangeResponse, read=True)
        return _kv(response.kvs[0]) if response.kvs else None

    async def range(self, prefix: str, *, keys_only: bool = False) -> tuple[list[KeyValue], int]:
        key, end = _prefix_range(prefix)
        # etcd sorts by key, ascending, when no sort order is asked for.
        request = rpc.RangeRequest(key=key, range_end=end, keys_only=keys_only)
        response = await self._unary("range", _RANGE, request, rpc.RangeResponse, read=True)
        return [_kv(kv) for kv in response.kvs], int(response.header.revision)

    async def current_revision(self) -> int:
        # A count-only range of one key: etcd answers with just the header and a count.
        request = rpc.RangeRequest(key=b"\0", count_only=True)
        response = await self._unary("revision", _RANGE, request, rpc.RangeResponse, read=True)
        return int(response.header.revision)

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        check_txn_size(compares, success, failure)
        request = rpc.TxnRequest(
            compare=[_compare(c) for c in compares],
            success=[_request_op(op) for op in success],
            failure=[_request_op(op) for op in failure],
        )
        response = await self._unary("txn", _TXN, request, rpc.TxnResponse)
        return TxnResult(bool(response.succeeded), int(response.header.revision))

    async def grant(self, ttl: int) -> int:
        request = rpc.LeaseGrantRequest(TTL=ttl, ID=0)
        response = await self._unary("grant", _GRANT, request, rpc.LeaseGrantResponse)
        if response.error:
            raise RegistryUnavailable(f"etcd lease grant failed: {response.error}")
        return int(response.ID)

    async def keepalive(self, lease: int) -> int:
        async def once(s: _Session) -> int:
            stream = await self._keepalive_stream(s)
            try:
                return await stream.send(lease)  # the stream times its answers out itself
            except RegistryUnavailable:
                if stream.timed_out and self._keepalives is stream:
                    self._keepalives = None
                    self._keepalive_member += 1  # that member went quiet: try the next first
                raise

        result: int = await self._call("keepalive", once)
        stream = self._keepalives
        if stream is not None:
            self._saw_term(stream.raft_term)
        return result

    @property
    def raft_term(self) -> int:
        return self._raft_term

    async def mute_members(self) -> list[str]:
        """The configured members that do not answer a Status call within
        transport.PROBE_TIMEOUT (each asked on a connection of its own, all at once). The
        channel's connection is dropped if it is to one found mute by the call before too,
        so the watches and calls on it go on from another member."""
        session = self._session
        await session.ensure()
        body = rpc.StatusRequest().SerializeToString()
        limit = min(self._timeout, PROBE_TIMEOUT)
        mute = await asyncio.gather(
            *(member_mute(m, _STATUS, body, session.metadata, limit) for m in session.members)
        )
        found = [m.authority for m, silent in zip(session.members, mute, strict=True) if silent]
        # Left when found mute twice in a row: one probe that a busy loop made late is no
        # reason to drop a connection, and every watch on it.
        session.channel.leave([a for a in found if a in self._mute_before])
        self._mute_before = set(found)
        return found

    def _saw_term(self, term: int) -> None:
        self._raft_term = max(self._raft_term, term)

    async def _keepalive_stream(self, s: _Session) -> KeepAliveStream:
        stream = self._keepalives
        if stream is not None and stream.usable and stream.token == s.token:
            return stream
        async with self._keepalive_lock:  # one new stream, however many keepalives wait
            stream = self._keepalives
            if stream is not None and stream.usable and stream.token == s.token:
                return stream
            if stream is not None and stream.broken is None:
                stream.half_close()  # a new token: its answers still arrive, then it ends
            from fleetd.etcd.keepalive import open_stream as open_keepalive_stream

            stream, self._keepalive_member = await open_keepalive_stream(
                s.members, self._keepalive_member, s.token, self._timeout
            )
            self._keepalives = stream
            return stream

    async def get_many(self, keys: Sequence[str]) -> dict[str, KeyValue]:
        """The keys that exist among `keys`, by key: one read-only transaction of range
        requests per MAX_TXN_OPS keys instead of a round trip per key."""
        out: dict[str, KeyValue] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), MAX_TXN_OPS):
            request = rpc.TxnRequest(
                success=[
                    rpc.RequestOp(request_range=rpc.RangeRequest(key=_enc(k)))
                    for k in unique[start : start + MAX_TXN_OPS]
                ]
            )
            response = await self._unary("get_many", _TXN, request, rpc.TxnResponse, read=True)
            for op in response.responses:
                for kv in op.response_range.kvs:
                    item = _kv(kv)
                    out[item.key] = item
        return out

    async def revoke(self, lease: int) -> None:
        request = rpc.LeaseRevokeRequest(ID=lease)
        # Already expired or revoked: the contract calls that no error.
        with contextlib.suppress(NotFound):
            await self._unary("revoke", _REVOKE, request, rpc.LeaseRevokeResponse)

    async def compact(self, revision: int) -> None:
        body = rpc.CompactionRequest(revision=revision, physical=False).SerializeToString()

        async def compact(s: _Session) -> None:
            try:
                await s.channel.unary(_COMPACT, body, s.metadata)
            except RpcError as e:
                # Compacting at or below the compacted revision again: done already.
                if e.code() != StatusCode.OUT_OF_RANGE or "compacted" not in e.details():
                    raise

        await self._call("compact", compact)

    def watch(self, prefix: str, start_revision: int) -> AsyncGenerator[list[WatchEvent], None]:
        return self._watch(prefix, start_revision)

    async def _watch(
        self, prefix: str, start_revision: int
    ) -> AsyncGenerator[list[WatchEvent], None]:
        self.stats["watch"] += 1
        if self._closed:
            raise RegistryUnavailable("etcd client is closed")
        session = self._session
        try:
            await session.ensure()
        except RpcError as e:
            raise _map_error(e, "watch", self.config) from e
        key, end = _prefix_range(prefix)
        next_revision = max(0, start_revision)  # 0: from now on
        reauthenticated = False
        while True:  # runs again only after re-authenticating
            token = session.token
            call = await self._open_watch(session, key, end, next_revision)
            try:
                response = await self._first_watch_response(call)
                if response is not None and next_revision == 0:
                    # "From now on" is fixed by etcd's answer; a re-created stream keeps it.
                    next_revision = int(response.header.revision) + 1
                while True:
                    if response is None:
                        raise RegistryUnavailable("etcd ended the watch stream")
                    if response.compact_revision:
                        raise Compacted(int(response.compact_revision))
                    if response.canceled:
                        reason = str(response.cancel_reason)
                        if any(m in reason for m in _STALE_TOKEN_MESSAGES):
                            if self.config.username is None:
                                raise ConfigError(
                                    f"etcd requires authentication: set username and password"
                                    f" ({reason})"
                                )
                            if not reauthenticated:
                                break  # re-authenticate, then watch again from next_revision
                        raise RegistryUnavailable(
                            f"etcd cancelled the watch on {prefix!r}: {reason}"
                        )
                    self._saw_term(int(response.header.raft_term))
                    if response.events:
                        batch = [_event(ev) for ev in response.events]
                        next_revision = batch[-1].mod_revision + 1
                        yield batch
                    try:
                        message = await call.read()
                    except RpcError as e:
                        raise _map_error(e, "watch", self.config) from e
                    response = None if message is None else rpc.WatchResponse.FromString(message)
            finally:
                # Consumer stopped (aclose, break, cancellation) or the stream failed: end
                # this stream only; etcd drops its watcher with it.
                call.cancel()
            reauthenticated = True
            try:
                await session.reauthenticate(token)
            except RpcError as e:
                raise _map_error(e, "watch", self.config) from e

    async def _open_watch(
        self, session: _Session, key: bytes, end: bytes, start_revision: int
    ) -> Call:
        # "hasleader": a member cut off from its cluster ends the stream (so we resume
        # elsewhere) instead of keeping it open and silent, as etcd's Go client does.
        metadata = (*session.metadata, ("hasleader", "true"))
        create = rpc.WatchCreateRequest(key=key, range_end=end, start_revision=start_revision)
        try:
            call = await session.channel.stream(_WATCH, metadata)
        except RpcError as e:
            raise _map_error(e, "watch", self.config) from e
        call.write(rpc.WatchRequest(create_request=create).SerializeToString())
        return call

    async def _first_watch_response(self, call: Call) -> Any:
        # The stream is long-lived, but creating it is a request like any other: bounded by
        # the request timeout, so an unreachable or mute etcd cannot hang the caller.
        try:
            message = await asyncio.wait_for(call.read(), self._timeout)
        except TimeoutError:
            raise RegistryUnavailable(
                f"etcd watch: no answer from {', '.join(self.config.endpoints)}"
                f" within {self._timeout:g}s"
            ) from None
        except RpcError as e:
            raise _map_error(e, "watch", self.config) from e
        return None if message is None else rpc.WatchResponse.FromString(message)

    async def close(self) -> None:
        self._closed = True
        if self._keepalives is not None:
            self._keepalives.close()
            self._keepalives = None
        await self._session.close()

    async def __aenter__(self) -> EtcdKV:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _event(ev: Any) -> WatchEvent:
    kind = EventType.DELETE if ev.type == Event.DELETE else EventType.PUT
    return WatchEvent(
        type=kind,
        key=_dec(ev.kv.key),
        value="" if kind is EventType.DELETE else _dec(ev.kv.value),
        mod_revision=int(ev.kv.mod_revision),
    )
