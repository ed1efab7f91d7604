"""Error types shared by fleetd, fleetctl and the API.

Every error a user can cause is an `InvalidInput` (or a subclass) whose message names the
problem; callers turn it into a non-zero exit or a 4xx without changing anything stored.
"""

from __future__ import annotations


class FleetError(Exception):
    """Base of every error fleet raises on purpose."""


class InvalidInput(FleetError, ValueError):
    """Bad user input: unit text, names, options, flags, API bodies, config."""


class UnitFileError(InvalidInput):
    """A unit file that cannot be parsed or whose options do not validate."""


class InvalidUnitName(InvalidInput):
    """A unit name that breaks fleet's naming rules."""


class ConfigError(InvalidInput):
    """A malformed fleet.conf, environment variable or flag."""


class NotFound(FleetError, LookupError):
    """The named unit, machine or state does not exist."""


class LeaseNotFound(NotFound):
    """A write named a lease etcd no longer has (it expired or was revoked): re-register."""


class Conflict(FleetError):
    """A compare-and-swap lost: someone else changed the key first."""


class RegistryUnavailable(FleetError):
    """etcd could not be reached or did not answer in time."""


class QuotaExceeded(RegistryUnavailable):
    """etcd's database reached its quota (--quota-backend-bytes) and raised the NOSPACE alarm:
    it refuses every write until an operator frees space and disarms the alarm. Reads still
    work. Retryable like any RegistryUnavailable: fleetd keeps running and its units too."""


class NotLeader(FleetError):
    """A fenced engine write was refused because this engine no longer holds leadership."""


class Compacted(FleetError):
    """A watch asked for a revision etcd has compacted away; the caller must resync."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted; oldest available is {compact_revision}")
        self.compact_revision = compact_revision
