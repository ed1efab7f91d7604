"""Hypothesis over [X-Fleet] option parsing, API option lists and name mangling.

test_unitfile.py fuzzes the parser itself (only UnitFileError, parse/serialize round trips,
stable HASH) and test_names.py `validate_name`; this covers what a unit's options and names
go through after parsing: `requirements` (what the engine and agent schedule by),
`validate_options` (what fleetctl and the API check on create), `parse_multivalue`,
`UnitFile.from_options` (API bodies) and fleetctl's `mangle_name`.
"""

from __future__ import annotations

import contextlib
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from fleetd.errors import InvalidUnitName, UnitFileError
from fleetd.model import PartitionPolicy
from fleetd.unit.file import UnitFile, UnitOption, parse_multivalue, parse_unit
from fleetd.unit.names import RECOGNIZED_UNIT_TYPES, UnitNameInfo, mangle_name, validate_name
from fleetd.unit.xfleet import requirements, validate_options

XFLEET_KEYS = st.sampled_from(
    [
        "MachineID",
        "X-ConditionMachineID",
        "X-ConditionMachineBootID",
        "MachineOf",
        "X-ConditionMachineOf",
        "MachineMetadata",
        "X-ConditionMachineMetadata",
        "Conflicts",
        "X-Conflicts",
        "Global",
        "Replaces",
        "PartitionPolicy",
        "Weight",  # unknown: only warned about
    ]
)
# Values made of what the option parsers look at: quotes, spaces, "=", globs, specifiers.
VALUE_PIECES = st.sampled_from(
    [
        *('"', " ", "=", "*", "?", "[", "]", "\\", "@", ".", "/", "%n", "%N", "%p", "%i", "%"),
        *("a", "b", "web", ".service", "true", "yes", "0", "keep", "stop", "STOP", "\u00e9"),
        *("\t", "\u3000", "\x00"),
    ]
)
VALUES = st.lists(VALUE_PIECES, max_size=8).map("".join)
XFLEET_OPTIONS = st.lists(
    st.builds(UnitOption, st.just("X-Fleet"), XFLEET_KEYS, VALUES), max_size=6
)
SERVICE = (UnitOption("Service", "ExecStart", "/bin/true"),)
NAMES = st.sampled_from(
    ["web.service", "web@1.service", "web@.service", "a.b@c@d.socket", "noext", "", "%n.service"]
) | st.text(max_size=12)


def unit(options: list[UnitOption]) -> UnitFile:
    return UnitFile((*SERVICE, *options))


@given(XFLEET_OPTIONS, NAMES)
def test_requirements_fail_only_on_a_bad_partition_policy(
    options: list[UnitOption], name: str
) -> None:
    """fleet's own options never fail (malformed ones are ignored, as in fleet); only our
    PartitionPolicy can, and then with an error naming it."""
    error = None
    try:
        reqs = requirements(unit(options), name)
    except UnitFileError as e:
        error = str(e)
    if error is not None:
        assert "PartitionPolicy" in error
        assert any(o.name == "PartitionPolicy" for o in options)
        return
    assert isinstance(reqs.partition_policy, PartitionPolicy)
    # A second look gives the same answer (the engine and agent both compute it).
    assert requirements(unit(options), name) == reqs


@given(XFLEET_OPTIONS)
def test_validate_options_raises_only_unit_file_error(options: list[UnitOption]) -> None:
    with contextlib.suppress(UnitFileError):
        validate_options(unit(options))
    with contextlib.suppress(UnitFileError):
        validate_options(unit(options), strict=False)


@given(XFLEET_OPTIONS, st.sampled_from(["web.service", "web@1.service", "db@x.socket"]))
def test_a_validated_unit_schedules_the_same_once_stored(
    options: list[UnitOption], name: str
) -> None:
    """What passed validation on create parses to the same requirements from its stored text
    (bodies are stored as text and parsed again by the engine and agent), and never fails."""
    built = unit(options)
    try:
        validate_options(built)
    except UnitFileError:
        return
    stored = parse_unit(built.serialize())
    assert requirements(stored, name) == requirements(built, name)
    validate_options(stored)


@given(st.lists(st.text(st.characters(blacklist_characters='"'), max_size=8), min_size=1))
def test_parse_multivalue_splits_what_quoting_joined(values: list[str]) -> None:
    joined = '"' + '" "'.join(values) + '"'
    assert parse_multivalue(joined) == values


@given(st.text(max_size=30))
def test_parse_multivalue_keeps_an_unquoted_value_whole(value: str) -> None:
    parsed = parse_multivalue(value)
    if value.startswith('"') and value.endswith('"'):
        assert all('"' not in part for part in parsed)
    else:
        assert parsed == [value]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
API_OPTIONS = st.lists(
    st.fixed_dictionaries(
        {"section": st.text(max_size=8), "name": st.text(max_size=8), "value": st.text(max_size=8)}
    )
    | st.dictionaries(st.sampled_from(["section", "name", "value", "x"]), JSON)
    | JSON,
    max_size=4,
)


@given(API_OPTIONS)
def test_api_options_raise_only_unit_file_error(entries: list[Any]) -> None:
    try:
        built = UnitFile.from_options(entries)
    except UnitFileError:
        return
    assert UnitFile.from_options(built.to_options()) == built
    with contextlib.suppress(UnitFileError):
        validate_options(built)


@given(st.text(max_size=40))
def test_mangle_name_never_raises(arg: str) -> None:
    assert isinstance(mangle_name(arg), str)


VALID_STEMS = st.text(st.sampled_from("abcXYZ019:-_@"), min_size=1, max_size=20).filter(
    lambda s: not s.startswith("@")
)


@given(
    st.lists(st.sampled_from(["..", ".", "units", "a b", "/"]), max_size=4),
    VALID_STEMS,
    st.sampled_from(RECOGNIZED_UNIT_TYPES),
)
def test_a_path_to_a_valid_unit_file_names_its_base_name(
    dirs: list[str], stem: str, unit_type: str
) -> None:
    """fleetctl takes a path and names the unit by its base name: "../x/web.service" names
    web.service, never anything with a directory in it."""
    name = f"{stem}.{unit_type}"
    try:
        validate_name(name)
    except InvalidUnitName:
        return
    path = "/".join([*dirs, name])
    assert mangle_name(path) == name
    info = UnitNameInfo.parse(name)
    assert info is not None
    assert info.full_name == name
