"""Helpers for tests that boot local clusters (fleet_cluster): host checks, names, subnets.

Names and subnets come from the test session's pid, so two sessions on one host (two
developers, or CI beside a developer) boot clusters that do not collide.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Callable

import pytest
from fleet_cluster.network import overlap
from fleet_cluster.prereqs import missing_binaries


def cluster_unavailable_reason() -> str | None:
    """Why a cluster cannot be booted on this host, or None if it can."""
    if os.geteuid() != 0:
        return "functional tests need root (overlay mounts, a bridge, cgroups, systemd-nspawn)"
    missing = missing_binaries()
    if missing:
        packages = " ".join(sorted(set(missing.values())))
        return f"missing {', '.join(sorted(missing))} (apt-get install -y {packages})"
    return None


def require_cluster_host() -> None:
    reason = cluster_unavailable_reason()
    if reason:
        pytest.skip(reason)


def session_name(suffix: str = "") -> str:
    """A cluster name unique to this test session (it also names bridge and machines)."""
    return os.environ.get("FLEET_TEST_CLUSTER_NAME", f"ft{os.getpid() % 100000}{suffix}-")


def free_subnet(offset: int = 0) -> str:
    """A /24 in 10.77.100-249 that no host address or route overlaps, chosen from our pid."""
    if "FLEET_TEST_SUBNET" in os.environ and offset == 0:
        return os.environ["FLEET_TEST_SUBNET"]
    for attempt in range(150):
        third = 100 + (os.getpid() + offset + attempt) % 150
        subnet = f"10.77.{third}.0/24"
        if overlap(ipaddress.IPv4Network(subnet)) is None:
            return subnet
    raise RuntimeError("no free /24 in 10.77.100.0-10.77.249.0")


def progress_printer(prefix: str) -> Callable[[str, str], None]:
    def progress(subject: str, message: str) -> None:
        # Captured by pytest and shown for a failing test: the boot log of the cluster.
        print(f"[{prefix}] {subject:<12} {message}", file=sys.stderr)

    return progress
