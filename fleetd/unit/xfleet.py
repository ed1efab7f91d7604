"""The [X-Fleet] section: scheduling requirements read from a unit (`requirements`), and the
input checks fleetctl and the API make before storing one (`check_requirements`,
`validate_options`: unknown keys with a suggestion, malformed values, self references,
the strict round trip). Pure.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence

from fleetd.errors import UnitFileError
from fleetd.model import PartitionPolicy, Requirements
from fleetd.unit.file import XFLEET_SECTION, UnitFile, UnitOption, parse_unit
from fleetd.unit.glob import BadPattern, glob_match, path_match
from fleetd.unit.gotext import GO_SPACE_SET, go_fields, go_quote, preview
from fleetd.unit.names import UnitNameInfo

# [X-Fleet] keys (fleet job/job.go). Deprecated aliases are still honoured, as in fleet.
_MACHINE_ID_KEYS = ("MachineID", "X-ConditionMachineID", "X-ConditionMachineBootID")
_MACHINE_OF_KEYS = ("X-ConditionMachineOf", "MachineOf")
_METADATA_KEYS = ("X-ConditionMachineMetadata", "MachineMetadata")
_CONFLICTS_KEYS = ("X-Conflicts", "Conflicts")
_GLOBAL_KEY = "Global"
_REPLACES_KEY = "Replaces"
_PARTITION_POLICY_KEY = "PartitionPolicy"  # beyond fleet
_MIN_AVAILABLE_KEY = "MinAvailable"  # beyond fleet: a template's disruption budget
_KNOWN_XFLEET_KEYS = frozenset(
    {
        *_MACHINE_ID_KEYS,
        *_MACHINE_OF_KEYS,
        *_METADATA_KEYS,
        *_CONFLICTS_KEYS,
        _GLOBAL_KEY,
        _REPLACES_KEY,
        _PARTITION_POLICY_KEY,
        _MIN_AVAILABLE_KEY,
    }
)
_TRUTHY = frozenset({"true", "yes", "1", "on", "t"})
_FALSY = frozenset({"false", "no", "0", "off", "f"})


def _unit_printf(value: str, info: UnitNameInfo) -> str:
    """fleet's unitPrintf: %n %N %p %i, replaced in that order (plain string replacement)."""
    value = value.replace("%n", info.full_name)
    value = value.replace("%N", info.name)
    value = value.replace("%p", info.prefix)
    return value.replace("%i", info.instance)


def _xfleet(unit: UnitFile, unit_name: str | None) -> dict[str, list[str]]:
    """fleet's Job.requirements: [X-Fleet] values, expanded when the unit name has a "."."""
    values = unit.contents.get(XFLEET_SECTION, {})
    info = UnitNameInfo.parse(unit_name) if unit_name is not None else None
    if info is None:
        return values
    return {key: [_unit_printf(v, info) for v in vals] for key, vals in values.items()}


def _collect(values: Mapping[str, list[str]], keys: Sequence[str]) -> list[str]:
    return [v for key in keys for v in values.get(key, [])]


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _machine_id(values: Mapping[str, list[str]]) -> str | None:
    """fleet's RequiredTarget: the first value of the first key present, aliases last.

    As in fleet, an empty `MachineID=` is a requirement for the machine "" (matches none).
    """
    for key in _MACHINE_ID_KEYS:
        if values.get(key):
            return values[key][0]
    return None


def _peers(values: Mapping[str, list[str]]) -> tuple[str, ...]:
    return _unique(_collect(values, _MACHINE_OF_KEYS))


def _conflicts(values: Mapping[str, list[str]]) -> tuple[str, ...]:
    """Conflicts patterns; each value is also split on whitespace (strings.Fields)."""
    return _unique(f for v in _collect(values, _CONFLICTS_KEYS) for f in go_fields(v))


def _replaces(values: Mapping[str, list[str]]) -> tuple[str, ...]:
    return _unique(values.get(_REPLACES_KEY, []))


def _is_global(values: Mapping[str, list[str]]) -> bool:
    """The last Global value wins; truthy is true/yes/1/on/t in any case (isTruthyValue)."""
    found = values.get(_GLOBAL_KEY, [])
    return bool(found) and found[-1].lower() in _TRUTHY


def _metadata(values: Mapping[str, list[str]]) -> tuple[tuple[str, frozenset[str]], ...]:
    """MachineMetadata k=v pairs; anything not exactly two non-empty parts is ignored (fleet).

    So the unquoted `MachineMetadata=a=b c=d` is silently no constraint at all, as in fleet.
    """
    wanted: dict[str, set[str]] = {}
    for pair in _collect(values, _METADATA_KEYS):
        parts = pair.split("=")
        if len(parts) == 2 and parts[0] and parts[1]:
            wanted.setdefault(parts[0], set()).add(parts[1])
    return tuple((key, frozenset(wanted[key])) for key in sorted(wanted))


def _partition_policy(values: Mapping[str, list[str]]) -> PartitionPolicy:
    """Beyond fleet: `PartitionPolicy=keep|stop` (case-insensitive, last value wins).

    An empty value resets to the default (keep), as an empty assignment does in systemd.
    """
    policy = PartitionPolicy.KEEP
    for value in values.get(_PARTITION_POLICY_KEY, []):
        if value == "":
            policy = PartitionPolicy.KEEP
            continue
        try:
            policy = PartitionPolicy(value.lower())
        except ValueError:
            raise UnitFileError(
                f"invalid value {go_quote(value)} for {_PARTITION_POLICY_KEY} in [X-Fleet]"
                ' section: must be "keep" or "stop"'
            ) from None
    return policy


def _min_available(values: Mapping[str, list[str]]) -> int:
    """Beyond fleet: `MinAvailable=N` (a template's): at least N of its instances stay active
    during a drain. Last value wins; empty resets to 0 (no budget)."""
    budget = 0
    for value in values.get(_MIN_AVAILABLE_KEY, []):
        if value == "":
            budget = 0
        elif value.isdecimal() and value.isascii() and len(value) <= 6:
            budget = int(value)
        else:
            raise UnitFileError(
                f"invalid value {go_quote(value)} for {_MIN_AVAILABLE_KEY} in [X-Fleet]"
                " section: must be a whole number of instances (0 or more)"
            )
    return budget


def requirements(unit: UnitFile, unit_name: str) -> Requirements:
    """The scheduling requirements of `unit` submitted as `unit_name`, specifiers expanded.

    Raises UnitFileError only for an invalid PartitionPolicy or MinAvailable (fleet's own
    options never fail: malformed ones are ignored, as fleet does). Lenient on purpose: this
    reads stored bodies, which may predate the input checks of `check_requirements`.
    """
    values = _xfleet(unit, unit_name)
    return Requirements(
        machine_id=_machine_id(values),
        machine_of=_peers(values),
        metadata=_metadata(values),
        conflicts=_conflicts(values),
        is_global=_is_global(values),
        replaces=_replaces(values),
        partition_policy=_partition_policy(values),
        min_available=_min_available(values),
    )


def unknown_xfleet_keys(unit: UnitFile) -> list[str]:
    """[X-Fleet] keys fleet does not know, in file order.

    fleet's fleetctl only warned about them; here `check_requirements` refuses them at the
    input boundary, and `migrate-from-fleet` still only warns (fleet's stored units).
    """
    keys = (o.name for o in unit.options if o.section == XFLEET_SECTION)
    return [key for key in dict.fromkeys(keys) if key not in _KNOWN_XFLEET_KEYS]


class UnknownXFleetOption(UnitFileError):
    """An [X-Fleet] key fleet does not know (`check_requirements` without `allow_unknown`)."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def _suggestion(key: str) -> str:
    """ " (did you mean X?)" for the known key closest to `key`, ignoring case, or ""."""
    by_lower = {known.lower(): known for known in sorted(_KNOWN_XFLEET_KEYS)}
    close = difflib.get_close_matches(key.lower(), list(by_lower), n=1)
    return f" (did you mean {by_lower[close[0]]}?)" if close else ""


def _is_bad_pattern(pattern: str) -> bool:
    """Would Go's path.Match return ErrBadPattern? Matching "" walks the whole pattern."""
    try:
        path_match(pattern.encode("utf-8", "surrogatepass"), b"")
    except BadPattern:
        return True
    return False


def _metadata_problem(value: str) -> str:
    parts = value.split("=")
    if len(parts) == 2 and parts[0] and parts[1]:
        return ""
    problem = 'expected one key=value pair (a single "=", both sides non-empty)'
    if len(parts) > 2 and any(ch in GO_SPACE_SET for ch in value):
        problem += '; for several pairs on one line quote each: "a=b" "c=d"'
    return problem


def _value_problem(key: str, value: str, unit_name: str) -> str:
    """What is wrong with one (expanded) [X-Fleet] value, or "" if nothing."""
    if key in _METADATA_KEYS:
        return _metadata_problem(value)
    if key == _GLOBAL_KEY:
        # Empty is systemd's reset to the default (fleet reads it as false): allowed.
        if value == "" or value.lower() in _TRUTHY or value.lower() in _FALSY:
            return ""
        return "expected a boolean: true, yes, 1, on, t or false, no, 0, off, f (any case)"
    if key in _MACHINE_OF_KEYS and value == unit_name:
        return "a unit cannot be a MachineOf peer of itself"
    if key in (*_CONFLICTS_KEYS, _REPLACES_KEY):
        for pattern in go_fields(value):
            if _is_bad_pattern(pattern):
                return f"malformed glob pattern {go_quote(pattern)}"
        if key == _REPLACES_KEY and value == unit_name:
            return "a unit cannot replace itself"
    return ""


def check_requirements(unit: UnitFile, unit_name: str, *, allow_unknown: bool = False) -> None:
    """Beyond fleet: refuse [X-Fleet] options that fleet silently ignores or misreads.

    An unknown key (fleet: ignored; fleetctl warned), a MachineMetadata value that is not one
    key=value pair (fleet: no constraint at all), a Global that is not a boolean (fleet:
    false), a malformed Conflicts or Replaces glob (fleet: matches nothing), a MachineOf or
    Replaces naming the unit itself. Values are checked with the specifiers expanded for
    `unit_name`, except for a template, whose values are only ever used expanded for an
    instance (`MachineMetadata=rack=%i` is fine): its instances are checked when created.

    Run at the input boundary only (fleetctl before it writes, the API's PUT), after
    `validate_options`. `requirements` stays lenient, so a body stored by an older version
    never stops the engine or an agent. Raises UnknownXFleetOption (unless `allow_unknown`)
    or UnitFileError naming the option and the value.
    """
    if not allow_unknown:
        for key in unknown_xfleet_keys(unit):
            raise UnknownXFleetOption(
                f"unknown option {go_quote(key)} in [X-Fleet] section{_suggestion(key)}", key
            )
    raw = unit.contents.get(XFLEET_SECTION, {})
    info = UnitNameInfo.parse(unit_name)
    expanded = _xfleet(unit, None if info is not None and info.is_template else unit_name)
    for key, values in expanded.items():
        for written, value in zip(raw[key], values, strict=True):
            problem = _value_problem(key, value, unit_name)
            if problem:
                shown = go_quote(written)
                if written != value:
                    shown += f" (expanded: {go_quote(value)})"
                raise UnitFileError(
                    f"invalid value {shown} for {key} in [X-Fleet] section: {problem}"
                )


def _check_roundtrip(unit: UnitFile) -> UnitFile:
    """Serialize then parse, as fleet does, so e.g. the line-length limit applies to API input."""
    return parse_unit(unit.serialize())


def _grouped(options: Sequence[UnitOption]) -> tuple[UnitOption, ...]:
    """The options in serialization order: by first-seen section, file order within one."""
    by_section: dict[str, list[UnitOption]] = {}
    for option in options:
        by_section.setdefault(option.section, []).append(option)
    return tuple(option for group in by_section.values() for option in group)


def _check_strict_roundtrip(unit: UnitFile, reparsed: UnitFile) -> None:
    """Beyond fleet: the options must come back unchanged from their own text.

    Unit bodies are stored as text under their HASH and parsed again when read; an option that
    does not survive that (a value with a newline, surrounding spaces or a trailing backslash,
    a name with "=" ...) would silently change meaning and HASH after storage.
    """
    expected = _grouped(unit.options)
    if reparsed.options == expected:
        return
    for index, option in enumerate(expected):
        if index >= len(reparsed.options) or reparsed.options[index] != option:
            raise UnitFileError(
                f"option [{option.section}] {preview(option.name)}={preview(option.value)}"
                " does not survive serialization (check for newlines, leading or trailing"
                ' whitespace, a trailing "\\", or "=" in the name)'
            )
    raise UnitFileError("unit options do not survive serialization")


def _check_peers(peers: Sequence[str], conflicts: Sequence[str], replaces: Sequence[str]) -> None:
    for peer in peers:
        for conflict in conflicts:
            if glob_match(conflict, peer):
                raise UnitFileError(
                    "unresolvable requirements: "
                    f"peer {go_quote(peer)} matches conflict {go_quote(conflict)}"
                )
        for replace in replaces:
            if glob_match(replace, peer):
                raise UnitFileError(
                    "unresolvable requirements: "
                    f"peer {go_quote(peer)} matches replace {go_quote(replace)}"
                )


def _check_combinations(values: Mapping[str, list[str]]) -> None:
    """fleet's ValidateOptions switch, in fleet's order."""
    has_target = _machine_id(values) is not None
    has_peers = bool(_peers(values))
    has_conflicts = bool(_conflicts(values))
    has_replaces = bool(_replaces(values))
    is_global = _is_global(values)
    forbidden = (
        (has_target and has_peers, "MachineID cannot be used with Peers"),
        (has_target and has_conflicts, "MachineID cannot be used with Conflicts"),
        (has_target and is_global, "MachineID cannot be used with Global"),
        (has_target and has_replaces, "MachineID cannot be used with Replaces"),
        (is_global and has_peers, "Global cannot be used with Peers"),
        (is_global and has_replaces, "Global cannot be used with Replaces"),
        (has_conflicts and has_replaces, "Conflicts cannot be used with Replaces"),
    )
    for broken, message in forbidden:
        if broken:
            raise UnitFileError(message)


def validate_options(unit: UnitFile, *, strict: bool = True) -> None:
    """fleet's api.ValidateOptions, run on create by the API and by fleetctl.

    In order: the Serialize/Deserialize round trip (line length, ...); with `strict` (beyond
    fleet, see `_check_strict_roundtrip`) the options must survive it unchanged; peers that
    match a Conflicts or Replaces glob; the forbidden option combinations; and (beyond fleet)
    a valid PartitionPolicy. Values are checked unexpanded, as in fleet: no name is known.
    Raises UnitFileError with fleet's message.
    """
    reparsed = _check_roundtrip(unit)
    if strict:
        _check_strict_roundtrip(unit, reparsed)
    values = _xfleet(unit, None)
    _check_peers(_peers(values), _conflicts(values), _replaces(values))
    _check_combinations(values)
    _partition_policy(values)
    _min_available(values)
