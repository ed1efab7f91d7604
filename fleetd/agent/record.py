"""The agent's record of what it did, persisted in a file under /run.

What the agent did is recorded (unit -> hash and loaded/launched), so a restarted fleetd plans
against the truth and leaves healthy units alone: no restart, same PID. The record also keeps
each unit's PartitionPolicy=stop, so a fleetd restarted during an etcd outage still fences what
it inherited (fleetd.agent.fence).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from fleetd.agent.plan import CurrentUnit
from fleetd.model import PartitionPolicy, TargetState

log = structlog.get_logger("fleetd.agent")  # one logger name for all of the agent's events


@dataclass
class AgentRecord:
    """What this agent has done: unit -> (hash, loaded|launched). Persisted across restarts.

    `stop_policy` names the recorded units whose file says PartitionPolicy=stop, so a fleetd
    restarted while etcd is unreachable still knows which units to fence.
    """

    units: dict[str, CurrentUnit] = field(default_factory=dict)
    path: Path | None = None
    stop_policy: set[str] = field(default_factory=set)

    def policies(self) -> dict[str, PartitionPolicy]:
        return {n: PartitionPolicy.STOP for n in self.stop_policy if n in self.units}

    @classmethod
    def load(cls, path: Path | None) -> AgentRecord:
        record = cls(path=path)
        if path is None or not path.exists():
            return record
        try:
            raw = json.loads(path.read_text())
            for name, entry in raw.items():
                record.units[name] = CurrentUnit(
                    name, str(entry["hash"]), TargetState(entry["state"])
                )
                if entry.get("partition") == PartitionPolicy.STOP.value:
                    record.stop_policy.add(name)
        except (OSError, ValueError, KeyError, TypeError) as e:
            # A damaged record only costs a re-load of the units; say so and go on.
            log.warning("agent_record_unreadable", path=str(path), error=str(e))
        return record

    def save(self) -> None:
        if self.path is None:
            return
        data: dict[str, dict[str, str]] = {}
        for n, u in sorted(self.units.items()):
            data[n] = {"hash": u.hash, "state": u.state.value}
            if n in self.stop_policy:
                data[n]["partition"] = PartitionPolicy.STOP.value
        tmp = self.path.with_suffix(".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, separators=(",", ":")))
        os.replace(tmp, self.path)
