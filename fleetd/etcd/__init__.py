"""fleetd's etcd v3 client: the registry's `KV` contract (fleetd/registry/kv.py) on a real etcd.

- `client`: `EtcdKV`, every KV method as etcd calls, answers turned into the contract's
  dataclasses and failures into `fleetd.errors` at this boundary.
- `transport`: the gRPC subset over HTTP/2: `Connection` (one member, many calls), `Channel`
  (the first member that answers, failover, backoff), liveness pings, `member_mute`.
- `http2`: the HTTP/2 framing (RFC 9113) a gRPC client of one server needs.
- `keepalive`: the one long-lived `LeaseKeepAlive` stream (a streaming call of transport's,
  on a connection of its own), keepalives matched to answers.
- `endpoints`: the endpoint URL rule (http or https, one scheme for all, host and port only),
  which fleet.conf's `etcd_servers` and the client both apply.
- `etcdpb`: etcd's protobuf messages, generated.

The protocol subset it speaks, and what it leaves out on purpose:

- gRPC unary calls and server/bidirectional streams over HTTP/2 with prior knowledge
  (plaintext) or TLS with ALPN h2; `application/grpc`, uncompressed length-prefixed messages
  of at most 64 MiB received (transport.MAX_MESSAGE: a larger one fails its call as
  RESOURCE_EXHAUSTED), status and message from the trailers (or a trailers-only answer);
  a unary call's deadline sent as grpc-timeout, so etcd gives up on it when the client does;
  no more streams open than etcd's SETTINGS_MAX_CONCURRENT_STREAMS (100 assumed until its
  SETTINGS arrive), calls beyond it waiting in order; no request headers over its
  SETTINGS_MAX_HEADER_LIST_SIZE (refused unsent), none taken over our own 64 KiB (told to
  etcd in our SETTINGS). TLS verifies each member's certificate against its own endpoint's
  host.
- etcd services and methods: KV Range, Txn, Compact; Lease LeaseGrant, LeaseRevoke,
  LeaseKeepAlive; Watch Watch; Auth Authenticate (the token in each call's metadata, renewed
  once when etcd calls it stale); Maintenance Status (to find mute members).
- Liveness: HTTP/2 PING on connections with a stream open (every 10 s, at most as often as
  etcd allows), and after a call times out (answered within a second or the connection is
  dropped); not the keepalive stream's connection, whose answers are due within the request
  timeout. GOAWAY: calls etcd did not take are sent again on a new connection.
- Left out: message compression, gRPC retries and hedging beyond the above (writes are never
  sent twice; reads once, on another member, when theirs was lost), service config, name
  resolution beyond the listed endpoints, HTTP/2 server push and priorities, and every etcd
  service fleet does not use (Cluster, the rest of Maintenance, Election, Lock).
"""
