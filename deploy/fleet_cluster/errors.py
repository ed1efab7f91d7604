"""Errors the cluster tool raises on purpose; the CLI prints their message and exits non-zero."""

from __future__ import annotations


class ClusterError(Exception):
    """Something the cluster tool could not do; the message says what and, if known, why."""


class PrerequisiteError(ClusterError):
    """The host lacks something the tool needs (root, a binary, a cgroup hierarchy)."""


class ClusterExists(ClusterError):
    """`up` on a cluster whose state directory already exists."""


class NoSuchCluster(ClusterError):
    """An operation on a cluster that is not up."""


class NoSuchMachine(ClusterError):
    """A machine reference that names no machine of the cluster."""


class MachineNotRunning(ClusterError):
    """An operation that needs a running machine, on one that is killed or stopped."""


class TeardownIncomplete(ClusterError):
    """`down` tried every step but some left something behind (listed in the message)."""
