"""Feasibility: the rules of which units a machine may run, shared by the engine's scheduler
and the agent's planner (fleet's agent/state.go AbleToRun and hasConflict).

Pure functions of their input: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from fleetd.model import Machine, Requirements
from fleetd.unit.glob import glob_match

__all__ = [
    "MetadataRequirement",
    "conflict_between",
    "describe_metadata",
    "first_fit_by_name",
    "global_units_for",
    "is_literal",
    "matches_any",
    "metadata_misses",
    "metadata_ok",
]

# A MachineMetadata requirement as Requirements stores it: key -> the values any of which fits.
MetadataRequirement = tuple[tuple[str, frozenset[str]], ...]

# Characters that make a Conflicts/Replaces value a glob rather than a plain unit name.
_GLOB_SPECIALS = frozenset("*?[\\")


def metadata_ok(required: MetadataRequirement, have: Mapping[str, str]) -> bool:
    """Whether a machine with metadata `have` satisfies a MachineMetadata requirement: each
    key present with one of its values."""
    return all(have.get(key) in values for key, values in required)


def metadata_misses(
    required: MetadataRequirement, have: Mapping[str, str]
) -> list[tuple[str, frozenset[str], str | None]]:
    """The keys of a MachineMetadata requirement a machine with metadata `have` fails, in key
    order: (key, the values any of which fits, the machine's value or None)."""
    return [
        (key, values, have.get(key))
        for key, values in sorted(required)
        if have.get(key) not in values
    ]


def describe_metadata(metadata: MetadataRequirement) -> str:
    """A MachineMetadata requirement, keys sorted: `disk=ssd region=east|west`."""
    return " ".join(f"{key}={'|'.join(sorted(values))}" for key, values in sorted(metadata))


def is_literal(pattern: str) -> bool:
    """Whether a Conflicts/Replaces value names one unit rather than a glob."""
    return _GLOB_SPECIALS.isdisjoint(pattern)


def matches_any(patterns: Sequence[str], name: str) -> bool:
    return any(glob_match(pattern, name) for pattern in patterns)


def conflict_between(
    name: str, conflicts: Sequence[str], other: str, other_conflicts: Sequence[str]
) -> str | None:
    """Why two units may not share a machine (e.g. "a.service conflicts with b*"), or None.

    Conflicts are symmetric (fleet's agent/state.go hasConflict): either unit's patterns may
    match the other's name. A unit never conflicts with itself.
    """
    if name == other:
        return None
    for pattern in conflicts:
        if glob_match(pattern, other):
            return f"{name} conflicts with {pattern}"
    for pattern in other_conflicts:
        if glob_match(pattern, name):
            return f"{other} conflicts with {pattern}"
    return None


def first_fit_by_name(candidates: Mapping[str, Sequence[str]]) -> list[str]:
    """Of units (name -> their Conflicts patterns) wanted on one machine, those it runs: in
    name order, each that conflicts with none taken before it, as fleet's agent walks them."""
    taken: list[tuple[str, Sequence[str]]] = []
    for name in sorted(candidates):
        conflicts = candidates[name]
        if any(conflict_between(name, conflicts, other, theirs) for other, theirs in taken):
            continue
        taken.append((name, conflicts))
    return [name for name, _ in taken]


def global_units_for(machine: Machine, global_units: Mapping[str, Requirements]) -> list[str]:
    """The global units `machine` runs, in name order: those whose MachineMetadata it matches,
    two that conflict resolved by name (the first wins, `first_fit_by_name`). The caller
    passes only the global units whose target state is not inactive."""
    return first_fit_by_name(matching_globals(machine, global_units.items()))


def matching_globals(
    machine: Machine, global_units: Iterable[tuple[str, Requirements]]
) -> dict[str, Sequence[str]]:
    """The global units whose MachineMetadata `machine` matches: name -> Conflicts."""
    have = machine.metadata_dict
    return {name: req.conflicts for name, req in global_units if metadata_ok(req.metadata, have)}
