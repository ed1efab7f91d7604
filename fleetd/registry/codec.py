"""JSON encodings of the values stored in etcd.

Compact (no spaces, sorted keys) so the same value always encodes to the same bytes, which
lets writers skip a put when nothing changed. Decoders raise CorruptValue on anything
unexpected, so one bad key is logged and skipped instead of crashing a loop.
"""

from __future__ import annotations

import json
from typing import Any

from fleetd.errors import FleetError
from fleetd.model import Cordon, Machine, TargetState, UnitState


class CorruptValue(FleetError):
    """A stored value that does not decode; the key is skipped and logged."""


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


def _load(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise CorruptValue(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CorruptValue("not a JSON object")
    return obj


def _str(obj: dict[str, Any], name: str, default: str | None = None) -> str:
    value = obj.get(name, default)
    if not isinstance(value, str):
        raise CorruptValue(f"field {name!r} missing or not a string")
    return value


def _state(obj: dict[str, Any], name: str) -> TargetState:
    try:
        return TargetState(_str(obj, name))
    except ValueError:
        raise CorruptValue(f"field {name!r} is not a target state") from None


def encode_desired(hash_: str, target_state: TargetState) -> str:
    """units/<name>, schedule/<m>/<name> and global/<name> all hold this."""
    return _dump({"hash": hash_, "target_state": target_state.value})


def decode_desired(text: str) -> tuple[str, TargetState]:
    obj = _load(text)
    return _str(obj, "hash"), _state(obj, "target_state")


def encode_cordon(cordon: Cordon) -> str:
    return _dump(
        {
            "reason": cordon.reason,
            "since": cordon.since,
            "drain": cordon.drain,
            "deadline": cordon.deadline,
            "include_global": cordon.include_global,
        }
    )


def _number(obj: dict[str, Any], name: str) -> float:
    value = obj.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CorruptValue(f"field {name!r} is not a number")
    return float(value)


def decode_cordon(machine_id: str, text: str) -> Cordon:
    obj = _load(text)
    drain = obj.get("drain", False)
    include_global = obj.get("include_global", False)
    if not isinstance(drain, bool) or not isinstance(include_global, bool):
        raise CorruptValue("field 'drain' or 'include_global' is not a boolean")
    return Cordon(
        machine_id,
        reason=_str(obj, "reason", ""),
        since=_number(obj, "since"),
        drain=drain,
        deadline=_number(obj, "deadline"),
        include_global=include_global,
    )


def encode_machine(machine: Machine) -> str:
    return _dump(
        {
            "id": machine.id,
            "public_ip": machine.public_ip,
            "metadata": dict(machine.metadata),
            "version": machine.version,
            "disable_engine": machine.disable_engine,
        }
    )


def decode_machine(text: str) -> Machine:
    obj = _load(text)
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptValue("field 'metadata' is not a string map")
    return Machine.make(
        id=_str(obj, "id"),
        public_ip=_str(obj, "public_ip", ""),
        metadata=metadata,
        version=_str(obj, "version", ""),
        disable_engine=bool(obj.get("disable_engine", False)),
    )


def encode_state(state: UnitState) -> str:
    """A published state. `failed_task` and `error` are written only when set, so a healthy
    unit's state is byte for byte what earlier releases wrote, and their decoders (which read
    named fields and ignore the rest) read a failed one too."""
    obj: dict[str, Any] = {
        "load": state.load_state,
        "active": state.active_state,
        "sub": state.sub_state,
        "hash": state.hash,
        "agent_state": state.agent_state.value,
    }
    if state.failed_task:
        obj["failed_task"] = state.failed_task
    if state.error:
        obj["error"] = state.error
    return _dump(obj)


def decode_state(name: str, machine_id: str, text: str) -> UnitState:
    obj = _load(text)
    return UnitState(
        name=name,
        machine_id=machine_id,
        load_state=_str(obj, "load", ""),
        active_state=_str(obj, "active", ""),
        sub_state=_str(obj, "sub", ""),
        hash=_str(obj, "hash", ""),
        agent_state=_state(obj, "agent_state"),
        failed_task=_str(obj, "failed_task", ""),
        error=_str(obj, "error", ""),
    )


def encode_placement(machine_id: str | None, reason: str = "") -> str:
    """{"machine"} for a placed unit, {"reason"} for one that cannot be placed; both for a
    unit kept on a draining machine because no other can take it (why it stays)."""
    if machine_id is not None:
        return _dump(
            {"machine": machine_id, "reason": reason} if reason else {"machine": machine_id}
        )
    return _dump({"reason": reason})


def decode_placement(text: str) -> tuple[str | None, str]:
    obj = _load(text)
    machine = obj.get("machine")
    if machine is not None and not isinstance(machine, str):
        raise CorruptValue("field 'machine' is not a string")
    return machine, _str(obj, "reason", "")
