"""etcd v3's protobuf messages: the generated code of etcd's rpc.proto, kv.proto and auth.proto.

Copied unchanged from aetcd 1.0.0 (Apache-2.0, https://github.com/martyanov/aetcd), which
generated them from etcd's protos without the gogoproto and HTTP-gateway annotations. aetcd
itself is not a dependency: importing any part of it imports grpc, whose cost in fleetd
(memory, CPU per request) fleetd/etcd/transport.py gives; that module sends these messages
instead. Regenerate them with
protoc from etcd's protos (same package names) if etcd's API ever needs more.
"""

from typing import Any

from fleetd.etcd.etcdpb import kv_pb2, rpc_pb2

# protoc's Python classes are made at import time, unseen by mypy: Any, at this one boundary.
rpc: Any = rpc_pb2
Event: Any = getattr(kv_pb2, "Event")  # noqa: B009  (made at import time)

__all__ = ["Event", "rpc"]
