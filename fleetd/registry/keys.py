"""The etcd schema, in one place. Every key fleet reads or writes is built here.

Layout under the prefix (default `/fleet/`):

    schema                          schema version ("1"), so a later release can migrate
    units/<unit>                    desired state, written by clients: {"hash", "target_state"}
    bodies/<sha1>                   unit file text, content-addressed, create-only
    schedule/<machine>/<unit>       engine-owned: what one machine must run {"hash", "target_state"}
    global/<unit>                   engine-owned: global units every matching machine runs
    placements/<unit>               engine-owned: {"machine": id} or {"reason": why unplaced}
    machines/<machine>              presence, on the machine's lease
    machine-meta/<machine>/<key>    dynamic metadata (API PATCH), no lease
    cordons/<machine>               cordoned (or draining) machines, no lease: {"reason", ...}
    maintenance/<slot>              a draining machine's id: at most maintenance-limit at once
    settings/maintenance-limit      how many machines may drain at once (absent: 1)
    states/<unit>/<machine>         systemd state published by the agent, on the machine's lease
    engine/leader                   the engine leader's machine id, on its lease

Why per-machine schedule keys: each agent watches only `schedule/<its id>/` and `global/`, so a
placement wakes one agent, not the cluster (fleet's thundering herd). Why separate bodies: a
desired-state change rewrites ~80 bytes, and template instances share one body.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetd.errors import ConfigError

SCHEMA_VERSION = 1
DEFAULT_PREFIX = "/fleet/"


def normalize_prefix(prefix: str) -> str:
    if not prefix.startswith("/"):
        raise ConfigError(f"etcd key prefix must start with '/': {prefix!r}")
    return prefix if prefix.endswith("/") else prefix + "/"


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    @property
    def schema(self) -> str:
        return f"{self.prefix}schema"

    # desired state
    @property
    def units(self) -> str:
        return f"{self.prefix}units/"

    def unit(self, name: str) -> str:
        return f"{self.units}{name}"

    @property
    def bodies(self) -> str:
        return f"{self.prefix}bodies/"

    def body(self, hash_: str) -> str:
        return f"{self.bodies}{hash_}"

    # engine-owned projections
    @property
    def schedule(self) -> str:
        return f"{self.prefix}schedule/"

    def machine_schedule(self, machine_id: str) -> str:
        return f"{self.schedule}{machine_id}/"

    def scheduled(self, machine_id: str, unit: str) -> str:
        return f"{self.schedule}{machine_id}/{unit}"

    @property
    def globals(self) -> str:
        return f"{self.prefix}global/"

    def global_unit(self, name: str) -> str:
        return f"{self.globals}{name}"

    @property
    def placements(self) -> str:
        return f"{self.prefix}placements/"

    def placement(self, name: str) -> str:
        return f"{self.placements}{name}"

    # machines
    @property
    def machines(self) -> str:
        return f"{self.prefix}machines/"

    def machine(self, machine_id: str) -> str:
        return f"{self.machines}{machine_id}"

    @property
    def machine_meta(self) -> str:
        return f"{self.prefix}machine-meta/"

    def machine_meta_of(self, machine_id: str) -> str:
        return f"{self.machine_meta}{machine_id}/"

    def machine_meta_key(self, machine_id: str, key: str) -> str:
        return f"{self.machine_meta}{machine_id}/{key}"

    @property
    def cordons(self) -> str:
        return f"{self.prefix}cordons/"

    def cordon(self, machine_id: str) -> str:
        return f"{self.cordons}{machine_id}"

    @property
    def maintenance(self) -> str:
        return f"{self.prefix}maintenance/"

    def maintenance_slot(self, slot: int) -> str:
        return f"{self.maintenance}{slot}"

    @property
    def maintenance_limit(self) -> str:
        return f"{self.prefix}settings/maintenance-limit"

    # published states
    @property
    def states(self) -> str:
        return f"{self.prefix}states/"

    def unit_states(self, unit: str) -> str:
        return f"{self.states}{unit}/"

    def state(self, unit: str, machine_id: str) -> str:
        return f"{self.states}{unit}/{machine_id}"

    # engine
    @property
    def leader(self) -> str:
        return f"{self.prefix}engine/leader"

    def tail(self, key: str, under: str) -> str:
        """The part of `key` after the `under` prefix."""
        return key[len(under) :]
