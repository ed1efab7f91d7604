"""A real etcd for the benchmarks, and its own request and byte counters.

The server is the integration tests' `EtcdServer` (tests/integration/etcd_fixture.py): loopback
ports picked free, data in a temporary directory, SIGKILLed with the benchmark (PDEATHSIG) and
always torn down by `bench_etcd()`. The flags are tuned for this box and for the benchmark's
size: a backend quota well above 10,000 units' keys and history, and --max-txn-ops left at
etcd's default 128, which is what fleetd's registry chunks its transactions to.

What a scenario cost etcd is read from etcd's own Prometheus counters (`/metrics`) before and
after: independent of our client and authoritative.

- requests by kind: `grpc_server_handled_total` for unary calls (Range, Txn, LeaseGrant, ...)
  and `grpc_server_msg_received_total` for streams (a Watch message is a watch created or
  cancelled; a LeaseKeepAlive message is one keepalive);
- streams opened: `grpc_server_started_total` for Watch and LeaseKeepAlive;
- bytes: `etcd_network_client_grpc_received_bytes_total` / `..._sent_bytes_total`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.etcd_fixture import EtcdServer, etcd_available

# 8 GiB: etcd's documented maximum suggested quota; the default 2 GiB is also plenty for
# 10,000 units, but a long run of `all` keeps every revision (no compaction) and must never hit
# the NOSPACE alarm in the middle of a figure.
TUNING = (
    "--quota-backend-bytes=8589934592",
    "--max-txn-ops=128",
    "--snapshot-count=100000",
    "--auto-compaction-mode=revision",
    "--auto-compaction-retention=200000",
)

_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\}\s+([0-9.e+-]+)$|^(\w+)\s+([0-9.e+-]+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')

UNARY_METHODS = {"Range", "Txn", "Put", "DeleteRange", "LeaseGrant", "LeaseRevoke", "Compact"}
STREAM_METHODS = {"Watch", "LeaseKeepAlive"}


@dataclass
class EtcdCounters:
    """A reading of etcd's counters; subtract two to get what happened in between."""

    requests: Counter[str] = field(default_factory=Counter)  # by kind
    streams: Counter[str] = field(default_factory=Counter)  # Watch / LeaseKeepAlive opened
    sent_messages: Counter[str] = field(default_factory=Counter)  # e.g. Watch responses
    received_bytes: int = 0  # client -> etcd
    sent_bytes: int = 0  # etcd -> clients

    def __sub__(self, other: EtcdCounters) -> EtcdCounters:
        return EtcdCounters(
            requests=self.requests - other.requests,
            streams=self.streams - other.streams,
            sent_messages=self.sent_messages - other.sent_messages,
            received_bytes=self.received_bytes - other.received_bytes,
            sent_bytes=self.sent_bytes - other.sent_bytes,
        )

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def total_bytes(self) -> int:
        return self.received_bytes + self.sent_bytes

    def as_dict(self, seconds: float | None = None) -> dict[str, object]:
        out: dict[str, object] = {
            "requests": dict(sorted(self.requests.items())),
            "requests_total": self.total_requests,
            "streams_opened": dict(sorted(self.streams.items())),
            "watch_responses": self.sent_messages.get("Watch", 0),
            "bytes_received": self.received_bytes,
            "bytes_sent": self.sent_bytes,
            "bytes_total": self.total_bytes,
        }
        if seconds:
            out["requests_per_s"] = round(self.total_requests / seconds, 1)
            out["bytes_per_s"] = round(self.total_bytes / seconds, 1)
        return out

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.requests.items()) if v)
        return (
            f"{self.total_requests} requests ({kinds or 'none'}); "
            f"{_size(self.received_bytes)} in, {_size(self.sent_bytes)} out"
        )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def parse_metrics(text: str) -> EtcdCounters:
    c = EtcdCounters()
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        if m.group(4):
            name, value = m.group(4), float(m.group(5))
            if name == "etcd_network_client_grpc_received_bytes_total":
                c.received_bytes = int(value)
            elif name == "etcd_network_client_grpc_sent_bytes_total":
                c.sent_bytes = int(value)
            continue
        name, labels, value = m.group(1), dict(_LABEL.findall(m.group(2))), float(m.group(3))
        method = labels.get("grpc_method", "")
        unary = name == "grpc_server_handled_total" and method in UNARY_METHODS
        streamed = name == "grpc_server_msg_received_total" and method in STREAM_METHODS
        if unary or streamed:
            c.requests[method] += int(value)
        elif name == "grpc_server_started_total" and method in STREAM_METHODS:
            c.streams[method] += int(value)
        elif name == "grpc_server_msg_sent_total" and method in STREAM_METHODS:
            c.sent_messages[method] += int(value)
    return c


def read_counters(client_url: str) -> EtcdCounters:
    with urllib.request.urlopen(f"{client_url}/metrics", timeout=10) as r:
        return parse_metrics(r.read().decode())


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children: none for etcd), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class BenchEtcd:
    """One etcd member for a benchmark run."""

    def __init__(self, server: EtcdServer, tmp: Path) -> None:
        self.server = server
        self.tmp = tmp

    @property
    def endpoint(self) -> str:
        return self.server.client_url

    @property
    def pid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    def counters(self) -> EtcdCounters:
        return read_counters(self.endpoint)

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)


@contextlib.contextmanager
def bench_etcd() -> Iterator[BenchEtcd]:
    """A fresh etcd on random loopback ports in a temporary directory; always torn down."""
    if not etcd_available():
        raise SystemExit("benchmarks need etcd at /usr/bin/etcd (apt-get install etcd-server)")
    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-etcd-"))
    server = EtcdServer(tmp / "data", extra_args=TUNING)
    try:
        server.start()
        yield BenchEtcd(server, tmp)
    finally:
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)
