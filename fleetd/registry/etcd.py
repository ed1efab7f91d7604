"""`EtcdKV`: the `KV` contract (fleetd/registry/kv.py) over etcd v3, through aetcd and gRPC.

With keepalive.py, this is the only module of the project that imports aetcd or grpc. It
keeps their untyped values at this boundary: every response is turned into the contract's
dataclasses and every gRPC failure into a `fleetd.errors` type before it leaves.

How it talks to etcd, and why:

- aetcd 1.0 can only open a plaintext channel to a single host:port. `_AetcdClient` overrides
  `aetcd.Client.connect` to build the `grpc.aio` channel itself: a `secure_channel` (CA, client
  certificate and key) for https endpoints, an insecure one for http, on one target naming every
  member (`ipv4:h1:p1,h2:p2`) with gRPC's `pick_first` policy, so a dead member is skipped.
- Requests go straight to the protobuf stubs aetcd sets up (`kvstub`, `leasestub`, ...), not
  through aetcd's convenience methods: those hide the gRPC status behind their own exception
  types, cannot retry after an expired auth token, and have no single-shot lease keepalive.
- Watches use one raw `Watch` stream per `watch()` call instead of aetcd's `Watcher`, which
  multiplexes every watch over a shared stream with callbacks and a bounded request queue: a
  private stream gives the contract's semantics directly (one async iterator, compaction seen
  as `compact_revision` on the response, any stream failure ends exactly that watch, and
  closing the iterator cancels exactly that stream).
- Lease keepalives share one long-lived `LeaseKeepAlive` stream per EtcdKV, matched to their
  answers by lease id: opening a stream per keepalive cost ~0.7 ms of CPU each. That stream is
  not gRPC's: fleetd/registry/keepalive.py speaks the one method over HTTP/2 itself (h2) at a
  sixth of grpc.aio's CPU per keepalive, the request a machine makes forever.
- `get_many` reads many keys in one round trip: a read-only transaction of range requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import ssl
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

# gRPC's C core logs a failed TLS handshake at INFO straight to stderr, ahead of (and in
# cruder words than) the error this module raises: fleetctl printed it before its own one-line
# message. Errors still show; GRPC_VERBOSITY set by the user wins. Must precede the import.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import aetcd
import grpc
import grpc.aio
from aetcd import rpc

from fleetd.errors import Compacted, ConfigError, NotFound, RegistryUnavailable
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
    # Imported when first used (h2 costs a client like fleetctl, which renews no lease,
    # 16 ms and 1.3 MB).
    from fleetd.registry.keepalive import KeepAliveStream
    from fleetd.registry.keepalive import Member as KeepAliveMember

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
        return _parse_endpoints(self.endpoints)[0] == "https"


@dataclass(frozen=True, slots=True)
class _Endpoint:
    host: str  # an IP literal (without brackets) or a DNS name
    port: int
    family: int  # socket.AF_INET, AF_INET6, or AF_UNSPEC for a DNS name


def _parse_endpoints(endpoints: Sequence[str]) -> tuple[str, list[_Endpoint]]:
    """The common scheme ("http" or "https") and the parsed endpoints."""
    if not endpoints:
        raise ConfigError("no etcd endpoints given")
    schemes: set[str] = set()
    parsed: list[_Endpoint] = []
    for url in endpoints:
        try:
            parts = urlsplit(url.strip())
            port = parts.port or DEFAULT_PORT
        except ValueError as e:
            raise ConfigError(f"bad etcd endpoint {url!r}: {e}") from None
        if parts.scheme not in ("http", "https"):
            raise ConfigError(
                f"bad etcd endpoint {url!r}: expected http://host:port or https://host:port"
            )
        if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"bad etcd endpoint {url!r}: expected scheme://host:port only")
        schemes.add(parts.scheme)
        try:
            ip = ipaddress.ip_address(parts.hostname)
        except ValueError:
            family = socket.AF_UNSPEC
        else:
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        parsed.append(_Endpoint(parts.hostname, port, family))
    if len(schemes) > 1:
        raise ConfigError(
            "etcd endpoints mix http:// and https://; one channel cannot be both plaintext"
            f" and TLS: {', '.join(endpoints)}"
        )
    return schemes.pop(), parsed


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _grpc_target(endpoints: list[_Endpoint]) -> str:
    """One gRPC target naming every member, for pick_first to walk in order.

    gRPC's `ipv4:`/`ipv6:` schemes take a comma-separated address list; `dns:` takes one name
    (whose every address pick_first then tries). Several names cannot share one target, so
    they are resolved here, once per channel: an address change needs a new EtcdKV.
    """
    if len(endpoints) == 1 and endpoints[0].family == socket.AF_UNSPEC:
        return f"dns:///{_hostport(endpoints[0].host, endpoints[0].port)}"
    loop = asyncio.get_running_loop()
    v4: list[str] = []
    v6: list[str] = []
    for ep in endpoints:
        if ep.family != socket.AF_UNSPEC:
            (v4 if ep.family == socket.AF_INET else v6).append(_hostport(ep.host, ep.port))
            continue
        try:
            infos = await loop.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise RegistryUnavailable(f"cannot resolve etcd endpoint {ep.host}: {e}") from e
        for family, _, _, _, sockaddr in infos:
            addr = _hostport(str(sockaddr[0]), ep.port)
            bucket = v4 if family == socket.AF_INET else v6
            if addr not in bucket:
                bucket.append(addr)
    # One target holds one address family; IPv4 wins when both are present.
    if v4:
        return "ipv4:" + ",".join(v4)
    return "ipv6:" + ",".join(v6)


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


def _channel_options(config: EtcdConfig, authority: str | None) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.lb_policy_name", "pick_first"),
        # A full range at simulator scale (10,000 units) can pass gRPC's 4 MiB receive limit.
        ("grpc.max_receive_message_length", -1),
        # After an etcd restart, reconnect within seconds, not after gRPC's default backoff
        # of up to 120 s (requests fail fast with UNAVAILABLE while the channel backs off).
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        # Notice a silently dead member under a long-lived watch. etcd refuses pings more
        # often than every 5 s (--grpc-keepalive-min-time) and, without a stream open,
        # at all; these values stay within that.
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", max(1_000, int(config.request_timeout * 1000))),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if authority is not None:
        options.append(("grpc.default_authority", authority))
    return options


class _AetcdClient(aetcd.Client):  # type: ignore[misc]  # aetcd is untyped
    """aetcd's client with our own channel (TLS, every member, pick_first) and token handling.

    The rest of aetcd (its stubs and attributes) stays as it expects, so its own methods still
    work on this client; EtcdKV itself calls the stubs directly.
    """

    def __init__(self, config: EtcdConfig) -> None:
        # aetcd's own username/password handling authenticates once and never again; we keep
        # the credentials to ourselves and re-authenticate when a token goes stale.
        super().__init__(timeout=config.request_timeout)
        self._config = config
        self._scheme, self._endpoints = _parse_endpoints(config.endpoints)
        self._ca = _read_pem(config.ca_file, "CA file")
        self._cert = _read_pem(config.cert_file, "client certificate")
        self._key = _read_pem(config.key_file, "client key")
        self._connect_lock = asyncio.Lock()
        self.token: str | None = None
        self.watchstub: Any = None

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        async with self._connect_lock:
            if self._connected.is_set():
                return
            if self.channel is None:
                self._open_channel(await _grpc_target(self._endpoints))
            if self._config.username is not None:
                await self._authenticate()
            self._connected.set()

    def _open_channel(self, target: str) -> None:
        if self._scheme == "https":
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self._ca,  # None: gRPC's default roots; never unverified
                private_key=self._key,
                certificate_chain=self._cert,
            )
            # gRPC checks the server certificate against the channel's authority, which for a
            # multi-address target is the whole address list and never matches. Name the first
            # endpoint instead: every member's certificate must then be valid for that host
            # (list every member in each server certificate's SANs, as etcd's TLS guide does).
            first = self._endpoints[0]
            authority = _hostport(first.host, first.port) if len(self._endpoints) > 1 else None
            self.channel = grpc.aio.secure_channel(
                target, credentials, options=_channel_options(self._config, authority)
            )
        else:
            self.channel = grpc.aio.insecure_channel(
                target, options=_channel_options(self._config, None)
            )
        self.auth_stub = rpc.AuthStub(self.channel)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self.watchstub = rpc.WatchStub(self.channel)

    async def _authenticate(self) -> None:
        request = rpc.AuthenticateRequest(
            name=self._config.username, password=self._config.password
        )
        try:
            response = await self.auth_stub.Authenticate(
                request, timeout=self._config.request_timeout
            )
        except grpc.aio.AioRpcError as e:
            details = e.details() or ""
            if "authentication is not enabled" in details:
                # As etcd's Go client does: credentials on a cluster without auth are no error.
                self.token = None
                self.metadata = None
                return
            if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED):
                raise ConfigError(
                    f"etcd refused the credentials of user {self._config.username!r}: {details}"
                ) from e
            raise _unavailable(e, "authenticate", self._config) from e
        self.token = str(response.token)
        self.metadata = (("token", self.token),)

    async def reauthenticate(self, stale_token: str | None) -> None:
        """Get a new token, unless a concurrent request already replaced `stale_token`."""
        async with self._connect_lock:
            if self.token == stale_token:
                await self._authenticate()

    def keepalive_members(self) -> list[KeepAliveMember]:
        """The members as the keepalive stream reaches them (fleetd/registry/keepalive.py),
        with the same TLS and the same name checked as the gRPC channel."""
        from fleetd.registry.keepalive import Member as KeepAliveMember
        from fleetd.registry.keepalive import tls_context as keepalive_tls

        tls = None
        if self._scheme == "https":
            try:
                tls = keepalive_tls(self._ca, self._config.cert_file, self._config.key_file)
            except (ssl.SSLError, OSError) as e:
                raise ConfigError(f"etcd TLS: cannot use the CA, certificate or key: {e}") from e
        first = self._endpoints[0]
        return [
            KeepAliveMember(
                ep.host,
                ep.port,
                _hostport(ep.host, ep.port),
                tls,
                # As for the channel: with several members, every certificate names the first.
                first.host if len(self._endpoints) > 1 else ep.host,
            )
            for ep in self._endpoints
        ]

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        self._init_channel_attrs()
        self.watchstub = None
        self._connected.clear()


def _hint(details: str, config: EtcdConfig) -> str:
    """A human reason for the usual ways a connection fails, from gRPC's details text."""
    d = details.lower()
    if "connection refused" in d:
        return "nothing is listening there"
    if "hostname verification" in d:
        return "the etcd server certificate does not name the host in the endpoint URL"
    if "certificate_verify_failed" in d or "handshake failed" in d:
        return "TLS handshake failed: the etcd server certificate is not signed by ca_file"
    if "unwrap failed" in d or "bad_certificate" in d or "certificate_required" in d:
        return (
            "etcd refused the TLS client: it needs a client certificate (cert_file, key_file)"
            " signed by a CA it trusts"
        )
    # Closed while connecting (not "Stream removed" on a member that went away): the usual
    # cause is a plaintext client at a TLS port.
    closed = "socket closed" in d or "connection reset" in d
    if "failed to connect" in d and closed and not config.tls:
        return "etcd closed a plaintext connection: does it serve TLS? then use https://"
    return ""


def _unavailable(e: grpc.aio.AioRpcError, what: str, config: EtcdConfig) -> RegistryUnavailable:
    details = e.details() or ""
    where = ", ".join(config.endpoints)
    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        msg = f"etcd {what}: no answer from {where} within {config.request_timeout:g}s"
    else:
        msg = f"etcd {what} failed on {where}: {e.code().name}: {details}"
    hint = _hint(details, config)
    return RegistryUnavailable(f"{msg} ({hint})" if hint else msg)


def _map_error(e: grpc.aio.AioRpcError, what: str, config: EtcdConfig) -> Exception:
    """Turn a gRPC failure into the error the contract promises."""
    code = e.code()
    details = e.details() or ""
    if config.username is None and _is_stale_token(e):
        return ConfigError(f"etcd requires authentication: set username and password ({details})")
    if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
        return NotFound(f"etcd {what}: {details}")
    if code == grpc.StatusCode.OUT_OF_RANGE:
        # Compacting a revision etcd has not reached yet.
        return ValueError(f"etcd refused the {what} request: {details}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # A malformed request (too many ops, duplicate keys in a txn, ...): a caller bug.
        return ValueError(f"etcd refused the {what} request: {details}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return ConfigError(f"etcd user {config.username!r} is not allowed to {what}: {details}")
    # UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, RESOURCE_EXHAUSTED (quota), INTERNAL, ...:
    # nothing the caller can fix by changing the request; it retries later.
    return _unavailable(e, what, config)


def _is_stale_token(e: grpc.aio.AioRpcError) -> bool:
    details = e.details() or ""
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


class EtcdKV:
    """The KV contract on a real etcd v3 cluster.

    Create it anywhere; it connects lazily, on the first request, and its gRPC channel then
    belongs to that event loop: use one EtcdKV per loop, and `close()` it (or `async with`).
    Failed requests are not retried here (a write may or may not have been applied when its
    answer is lost); callers retry on RegistryUnavailable.
    """

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self._client = _AetcdClient(config)  # reads the TLS files: ConfigError now, not later
        self._timeout = config.request_timeout
        self.stats: Counter[str] = Counter()
        self._closed = False
        self._keepalives: KeepAliveStream | None = None
        self._keepalive_lock = asyncio.Lock()
        self._keepalive_members: list[KeepAliveMember] | None = None
        self._keepalive_member = 0  # index of the member to try first

    @property
    def client(self) -> Any:
        """The underlying aetcd client (connected after the first request)."""
        return self._client

    async def _ensure(self) -> _AetcdClient:
        if self._closed:
            raise RegistryUnavailable("etcd client is closed")
        try:
            await self._client.connect()
        except grpc.aio.AioRpcError as e:
            raise _map_error(e, "connect", self.config) from e
        return self._client

    async def _call(self, what: str, call: Callable[[_AetcdClient], Awaitable[Any]]) -> Any:
        """One unary request with the per-request timeout, the auth token, one re-authentication
        if etcd calls the token stale, and errors mapped to the contract's."""
        self.stats[what] += 1
        client = await self._ensure()
        token = client.token
        try:
            return await call(client)
        except grpc.aio.AioRpcError as e:
            if not (self.config.username is not None and _is_stale_token(e)):
                raise _map_error(e, what, self.config) from e
        try:
            await client.reauthenticate(token)
        except grpc.aio.AioRpcError as e:
            raise _map_error(e, what, self.config) from e
        try:
            return await call(client)
        except grpc.aio.AioRpcError as e:
            raise _map_error(e, what, self.config) from e

    async def get(self, key: str) -> KeyValue | None:
        request = rpc.RangeRequest(key=_enc(key))
        response = await self._call(
            "get",
            lambda c: c.kvstub.Range(request, timeout=self._timeout, metadata=c.metadata),
        )
        return _kv(response.kvs[0]) if response.kvs else None

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        key, end = _prefix_range(prefix)
        # etcd sorts by key, ascending, when no sort order is asked for.
        request = rpc.RangeRequest(key=key, range_end=end)
        response = await self._call(
            "range",
            lambda c: c.kvstub.Range(request, timeout=self._timeout, metadata=c.metadata),
        )
        return [_kv(kv) for kv in response.kvs], int(response.header.revision)

    async def current_revision(self) -> int:
        # A count-only range of one key: etcd answers with just the header and a count.
        request = rpc.RangeRequest(key=b"\0", count_only=True)
        response = await self._call(
            "revision",
            lambda c: c.kvstub.Range(request, timeout=self._timeout, metadata=c.metadata),
        )
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
        response = await self._call(
            "txn",
            lambda c: c.kvstub.Txn(request, timeout=self._timeout, metadata=c.metadata),
        )
        return TxnResult(bool(response.succeeded), int(response.header.revision))

    async def grant(self, ttl: int) -> int:
        request = rpc.LeaseGrantRequest(TTL=ttl, ID=0)
        response = await self._call(
            "grant",
            lambda c: c.leasestub.LeaseGrant(request, timeout=self._timeout, metadata=c.metadata),
        )
        if response.error:
            raise RegistryUnavailable(f"etcd lease grant failed: {response.error}")
        return int(response.ID)

    async def keepalive(self, lease: int) -> int:
        async def once(c: _AetcdClient) -> int:
            stream = await self._keepalive_stream(c)
            try:
                return await stream.send(lease)  # the stream times its answers out itself
            except RegistryUnavailable:
                if stream.timed_out and self._keepalives is stream:
                    self._keepalives = None
                    self._keepalive_member += 1  # that member went quiet: try the next first
                raise

        result: int = await self._call("keepalive", once)
        return result

    async def _keepalive_stream(self, c: _AetcdClient) -> KeepAliveStream:
        stream = self._keepalives
        if stream is not None and stream.usable and stream.token == c.token:
            return stream
        async with self._keepalive_lock:  # one new stream, however many keepalives wait
            stream = self._keepalives
            if stream is not None and stream.usable and stream.token == c.token:
                return stream
            if stream is not None and stream.broken is None:
                stream.half_close()  # a new token: its answers still arrive, then it ends
            if self._keepalive_members is None:
                self._keepalive_members = c.keepalive_members()
            from fleetd.registry.keepalive import open_stream as open_keepalive_stream

            stream, self._keepalive_member = await open_keepalive_stream(
                self._keepalive_members, self._keepalive_member, c.token, self._timeout
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

            def read(c: _AetcdClient, r: Any = request) -> Awaitable[Any]:
                return c.kvstub.Txn(r, timeout=self._timeout, metadata=c.metadata)  # type: ignore[no-any-return]

            response = await self._call("get_many", read)
            for op in response.responses:
                for kv in op.response_range.kvs:
                    item = _kv(kv)
                    out[item.key] = item
        return out

    async def revoke(self, lease: int) -> None:
        request = rpc.LeaseRevokeRequest(ID=lease)
        # Already expired or revoked: the contract calls that no error.
        with contextlib.suppress(NotFound):
            await self._call(
                "revoke",
                lambda c: c.leasestub.LeaseRevoke(
                    request, timeout=self._timeout, metadata=c.metadata
                ),
            )

    async def compact(self, revision: int) -> None:
        request = rpc.CompactionRequest(revision=revision, physical=False)

        async def compact(c: _AetcdClient) -> None:
            try:
                await c.kvstub.Compact(request, timeout=self._timeout, metadata=c.metadata)
            except grpc.aio.AioRpcError as e:
                # Compacting at or below the compacted revision again: done already.
                if e.code() != grpc.StatusCode.OUT_OF_RANGE or "compacted" not in (
                    e.details() or ""
                ):
                    raise

        await self._call("compact", compact)

    def watch(self, prefix: str, start_revision: int) -> AsyncGenerator[list[WatchEvent], None]:
        return self._watch(prefix, start_revision)

    async def _watch(
        self, prefix: str, start_revision: int
    ) -> AsyncGenerator[list[WatchEvent], None]:
        self.stats["watch"] += 1
        client = await self._ensure()
        key, end = _prefix_range(prefix)
        next_revision = max(0, start_revision)  # 0: from now on
        reauthenticated = False
        while True:  # runs again only after re-authenticating
            token = client.token
            call = await self._open_watch(client, key, end, next_revision)
            try:
                response = await self._first_watch_response(call)
                if response is not grpc.aio.EOF and next_revision == 0:
                    # "From now on" is fixed by etcd's answer; a re-created stream keeps it.
                    next_revision = int(response.header.revision) + 1
                while True:
                    if response is grpc.aio.EOF:
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
                    if response.events:
                        batch = [_event(ev) for ev in response.events]
                        next_revision = batch[-1].mod_revision + 1
                        yield batch
                    try:
                        response = await call.read()
                    except grpc.aio.AioRpcError as e:
                        raise _map_error(e, "watch", self.config) from e
            finally:
                # Consumer stopped (aclose, break, cancellation) or the stream failed: end
                # this stream only; etcd drops its watcher with it.
                call.cancel()
            reauthenticated = True
            await client.reauthenticate(token)

    async def _open_watch(
        self, client: _AetcdClient, key: bytes, end: bytes, start_revision: int
    ) -> Any:
        # "hasleader": a member cut off from its cluster ends the stream (so we resume
        # elsewhere) instead of keeping it open and silent, as etcd's Go client does.
        metadata = (*(client.metadata or ()), ("hasleader", "true"))
        call = client.watchstub.Watch(metadata=metadata)
        create = rpc.WatchCreateRequest(key=key, range_end=end, start_revision=start_revision)
        try:
            await call.write(rpc.WatchRequest(create_request=create))
        except grpc.aio.AioRpcError as e:
            call.cancel()
            raise _map_error(e, "watch", self.config) from e
        except BaseException:
            call.cancel()
            raise
        return call

    async def _first_watch_response(self, call: Any) -> Any:
        # The stream is long-lived, but creating it is a request like any other: bounded by
        # the request timeout, so an unreachable or mute etcd cannot hang the caller.
        try:
            return await asyncio.wait_for(call.read(), self._timeout)
        except TimeoutError:
            raise RegistryUnavailable(
                f"etcd watch: no answer from {', '.join(self.config.endpoints)}"
                f" within {self._timeout:g}s"
            ) from None
        except grpc.aio.AioRpcError as e:
            raise _map_error(e, "watch", self.config) from e

    async def close(self) -> None:
        self._closed = True
        if self._keepalives is not None:
            self._keepalives.close()
            self._keepalives = None
        await self._client.close()

    async def __aenter__(self) -> EtcdKV:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _event(ev: Any) -> WatchEvent:
    kind = EventType.DELETE if ev.type == rpc.Event.DELETE else EventType.PUT
    return WatchEvent(
        type=kind,
        key=_dec(ev.kv.key),
        value="" if kind is EventType.DELETE else _dec(ev.kv.value),
        mod_revision=int(ev.kv.mod_revision),
    )
