"""A cluster's options, checked before anything is built: names, counts, metadata, cloud-config.

Every check here only reads its arguments (and, for a cloud-config, that the file exists), so a
bad option fails `Cluster(...)` at once, with nothing to tear down.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import ClusterError
from .fleet_service import parse_metadata

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,9}$")


def check_sizes(name: str, n: int, etcd_members: int) -> None:
    """The cluster's name (it names the bridge and the machines), machine and member counts."""
    if not NAME_PATTERN.match(name):
        raise ClusterError(
            f"bad cluster name {name!r}: 1-10 characters, lowercase letters, digits and "
            "dashes, starting with a letter (it names the bridge and the machines)"
        )
    if not 1 <= n <= 200:
        raise ClusterError(f"machine count {n} out of range 1..200")
    if etcd_members not in (1, 3, 5):
        raise ClusterError(f"etcd member count {etcd_members}: use 1, 3 or 5")


def machine_metadata(
    metadata: Mapping[str, Mapping[str, str]] | None, n: int, name: str
) -> dict[str, dict[str, str]]:
    """Metadata by machine reference (`1`, `m1`, `<name>1`, or `*` for all), as plain dicts;
    a reference to a machine the cluster will not have is refused."""
    result = {str(k): dict(v) for k, v in (metadata or {}).items()}
    refs = {r for i in range(1, n + 1) for r in (str(i), f"m{i}", f"{name}{i}")}
    unknown = set(result) - refs - {"*"}
    if unknown:
        raise ClusterError(f"metadata for unknown machines: {', '.join(sorted(unknown))}")
    return result


def check_cloud_config(
    cloud_config: Path,
    *,
    etcd_members: int,
    agent_ttl: str | None,
    metadata: Mapping[str, Mapping[str, str]] | None,
    etcd_key_prefix: str,
    fleetd: bool,
) -> None:
    """The user-data file exists, and no option it decides itself was given."""
    if not cloud_config.is_file():
        raise ClusterError(f"no cloud-config file {cloud_config}")
    # What the user-data's own files decide is not the tool's to set; said, not ignored.
    given = [
        flag
        for flag, used in (
            ("--etcd-members", etcd_members != 1),
            ("--agent-ttl", agent_ttl is not None),
            ("--metadata", bool(metadata)),
            ("--etcd-key-prefix", etcd_key_prefix != "/fleet/"),
            ("--no-fleetd", not fleetd),
        )
        if used
    ]
    if given:
        raise ClusterError(
            f"{', '.join(given)} cannot be combined with --cloud-config: the user-data "
            "configures etcd and fleet (edit its /etc/default/etcd and fleet.conf)"
        )


def parse_machine_metadata(specs: Sequence[str]) -> dict[str, dict[str, str]]:
    """CLI `--metadata` values: `m1:k=v,k2=v2` for one machine, `k=v` for all of them."""
    result: dict[str, dict[str, str]] = {}
    for spec in specs:
        head, sep, rest = spec.partition(":")
        if sep and "=" not in head:
            target, pairs = head.strip(), rest
        else:
            target, pairs = "*", spec
        result.setdefault(target, {}).update(parse_metadata(pairs))
    return result
