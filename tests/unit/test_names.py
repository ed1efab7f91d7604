"""fleetd.unit.names: fleet's ValidateName, NewUnitNameInfo, fleetctl's name mangling.

fleet's api/units_test.go TestValidateName could not be read at fleet's final commit; the cases
below are its categories (empty, too long, no ".", trailing ".", bad type, case-sensitive type,
bad characters, leading "@", template types) with fleet's messages from the feature inventory.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetd.errors import InvalidUnitName
from fleetd.systemd.manager import UnitManagerError, check_unit_name
from fleetd.unit.names import (
    RECOGNIZED_UNIT_TYPES,
    UNIT_NAME_MAX,
    VALID_UNIT_TYPES,
    UnitNameInfo,
    is_recognized_type,
    make_instance_name,
    mangle_name,
    maybe_append_default_type,
    validate_name,
)

GOOD_NAMES = [
    "foo.service",
    "hello.socket",
    "foo.1.service",
    "foo-bar_baz:qux.service",
    "yes@no.service",
    "yes@no\\.service",  # fleet allows a backslash (the docs do not)
    "foo@.service",
    "foo@bar@baz.service",
    "ssh@.socket",
    "ssh@1.socket",
    "t@x.timer",
    "p@x.path",
    "g@x.target",
    "ALLCAPS.service",
    "a" * 247 + ".service",  # exactly 255 bytes (systemd's and NAME_MAX's limit)
    *(f"x.{unit_type}" for unit_type in sorted(VALID_UNIT_TYPES)),
]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names(name: str) -> None:
    validate_name(name)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "unit name cannot be empty"),
        ("a" * 248 + ".service", "unit name exceeds maximum length (255)"),  # 256 bytes
        ("\u00e9" * 124 + ".service", "unit name exceeds maximum length (255)"),  # bytes count
        ("fooservice", 'unit name must contain "."'),
        ("foo.service.", 'unit name cannot end in "."'),
        (".", 'unit name cannot end in "."'),
        ("foo.bar", 'invalid unit type: "bar"'),
        ("foo.servICE", 'invalid unit type: "servICE"'),
        ("foo.", 'unit name cannot end in "."'),
        ("foo.serv\x00", 'invalid unit type: "serv\\x00"'),
        ("foo.s\u00e9rvice", 'invalid unit type: "s\u00e9rvice"'),
        ("foo@.scope", 'invalid unit type for template: "scope"'),
        ("foo@bar.device", 'invalid unit type for template: "device"'),
        ("foo@bar.slice", 'invalid unit type for template: "slice"'),
        ("@foo.mount", 'invalid unit type for template: "mount"'),
        ("foo%.service", "invalid character '%' in unit name"),
        ("foo$$.service", "invalid character '$' in unit name"),
        ("foo bar.service", "invalid character ' ' in unit name"),
        ("foo/bar.service", "invalid character '/' in unit name"),
        ("../etc.service", "invalid character '/' in unit name"),
        ("foo\x00.service", "invalid character '\\x00' in unit name"),
        ("foo\n.service", "invalid character '\\n' in unit name"),
        ("foo\x7f.service", "invalid character '\\x7f' in unit name"),
        ("foo'.service", "invalid character '\\'' in unit name"),
        ('foo".service', "invalid character '\"' in unit name"),
        ("caf\u00e9.service", "invalid character '\u00e9' in unit name"),
        ("a\u200bb.service", "invalid character '\\u200b' in unit name"),
        ("a\udc80.service", "invalid character '\\ufffd' in unit name"),
        ("@foo.service", 'unit name cannot start in "@"'),
        ("@.service", 'unit name cannot start in "@"'),
        # the checks run in fleet's order: the type before the characters
        ("foo%.bar", 'invalid unit type: "bar"'),
        ("@foo%.service", "invalid character '%' in unit name"),
        # beyond fleet
        (".service", 'unit name cannot start in "."'),
        (".hidden.service", 'unit name cannot start in "."'),
        ("..service", 'unit name cannot start in "."'),
        ("foo..service", 'unit name cannot contain ".."'),
        ("a..b.socket", 'unit name cannot contain ".."'),
    ],
)
def test_bad_names(name: str, message: str) -> None:
    with pytest.raises(InvalidUnitName) as caught:
        validate_name(name)
    assert str(caught.value) == message


@given(st.text(max_size=300))
def test_prop_validate_name_raises_only_invalid_unit_name(name: str) -> None:
    try:
        validate_name(name)
    except InvalidUnitName:
        return
    # Whatever passes is safe as a file name and a key component.
    assert "/" not in name
    assert "\x00" not in name
    assert ".." not in name
    assert name.isascii()
    assert name.isprintable()
    assert not name.startswith((".", "@"))


@given(
    st.text(st.sampled_from("abcXYZ019:-_\\"), min_size=1, max_size=20),
    st.sampled_from(sorted(VALID_UNIT_TYPES)),
)
def test_prop_plain_names_are_valid(stem: str, unit_type: str) -> None:
    validate_name(f"{stem}.{unit_type}")


@pytest.mark.parametrize(
    ("full", "name", "prefix", "template", "instance", "is_instance", "is_template"),
    [
        # fleet unit/unit_test.go TestNamedUnit
        ("foo.service", "foo", "foo", "", "", False, False),
        ("foo@.service", "foo@", "foo", "foo@.service", "", False, True),
        ("foo@bar.service", "foo@bar", "foo", "foo@.service", "bar", True, False),
        ("foo@bar@baz.service", "foo@bar@baz", "foo", "foo@.service", "bar@baz", True, False),
        ("foo.1@.service", "foo.1@", "foo.1", "foo.1@.service", "", False, True),
        ("foo.1@2.service", "foo.1@2", "foo.1", "foo.1@.service", "2", True, False),
        ("ssh@.socket", "ssh@", "ssh", "ssh@.socket", "", False, True),
        ("ssh@1.socket", "ssh@1", "ssh", "ssh@.socket", "1", True, False),
    ],
)
def test_unit_name_info(
    full: str,
    name: str,
    prefix: str,
    template: str,
    instance: str,
    is_instance: bool,
    is_template: bool,
) -> None:
    info = UnitNameInfo.parse(full)
    assert info == UnitNameInfo(full, name, prefix, template, instance)
    assert info.is_instance is is_instance
    assert info.is_template is is_template


@pytest.mark.parametrize("name", ["foo", "bar@baz", ""])
def test_unit_name_info_needs_a_dot(name: str) -> None:
    assert UnitNameInfo.parse(name) is None


@pytest.mark.parametrize(
    ("template", "instance", "expected"),
    [
        ("foo@.service", "bar", "foo@bar.service"),
        ("foo.1@.socket", "2", "foo.1@2.socket"),
        ("web@.service", "a@b", "web@a@b.service"),
    ],
)
def test_make_instance_name(template: str, instance: str, expected: str) -> None:
    made = make_instance_name(template, instance)
    assert made == expected
    info = UnitNameInfo.parse(made)
    assert info is not None
    assert info.template == template
    assert info.instance == instance


@pytest.mark.parametrize("not_template", ["foo.service", "foo@bar.service", "foo"])
def test_make_instance_name_needs_a_template(not_template: str) -> None:
    with pytest.raises(InvalidUnitName, match="is not a template unit name"):
        make_instance_name(not_template, "x")


@pytest.mark.parametrize(
    ("arg", "mangled"),
    [
        # fleetctl/fleetctl_test.go
        ("foo", "foo.service"),
        ("foo.1", "foo.1.service"),
        ("foo/bar.socket", "bar.socket"),
        # more, from fleet's rules
        ("foo.service", "foo.service"),
        ("foo.target", "foo.target.service"),  # valid but not recognized
        ("foo.slice", "foo.slice.service"),
        ("/abs/path/web@1.service", "web@1.service"),
        ("dir/", "dir.service"),
        ("/", "/.service"),
        ("", "..service"),
        *((f"x.{t}", f"x.{t}") for t in RECOGNIZED_UNIT_TYPES),
    ],
)
def test_mangle_name(arg: str, mangled: str) -> None:
    assert mangle_name(arg) == mangled


@pytest.mark.parametrize(
    ("name", "recognized"),
    [
        # fleet unit/unit_test.go TestRecognizedUnitTypes
        ("foo.service", True),
        ("foo.socket", True),
        ("foo.path", True),
        ("foo.timer", True),
        ("foo.mount", True),
        ("foo.automount", True),
        ("foo.device", True),
        ("foo.swap", False),
        ("foo.target", False),
        ("foo.snapshot", False),
        ("foo.network", False),
        ("foo.netdev", False),
        ("foo.link", False),
        ("foo.unknown", False),
    ],
)
def test_recognized_types(name: str, recognized: bool) -> None:
    assert is_recognized_type(name) is recognized


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("foo", "foo.service"),
        ("units/foo", "units/foo.service"),  # the path is kept
        ("units/foo.socket", "units/foo.socket"),
        ("foo.link", "foo.link.service"),
    ],
)
def test_maybe_append_default_type(arg: str, expected: str) -> None:
    assert maybe_append_default_type(arg) == expected


def test_the_agent_and_the_clients_share_one_name_limit() -> None:
    """fleetctl and the API (validate_name) and the agent (check_unit_name) agree: the longest
    name one accepts, the other accepts, and one byte more both refuse."""
    longest = "a" * (UNIT_NAME_MAX - len(".service")) + ".service"
    assert len(longest.encode()) == UNIT_NAME_MAX == 255
    validate_name(longest)
    assert check_unit_name(longest) == longest
    with pytest.raises(InvalidUnitName, match=r"maximum length \(255\)"):
        validate_name("a" + longest)
    with pytest.raises(UnitManagerError, match="256 > 255 bytes"):
        check_unit_name("a" + longest)
