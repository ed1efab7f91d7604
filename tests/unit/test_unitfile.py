"""fleetd.unit: parsing, serialization, HASH, [X-Fleet] requirements, option validation, globs.

Expected values come from fleet (unit/unit_test.go, api/units.go, job/job.go) and from the
feature inventory's verified vectors; parser cases marked "go-systemd" were cross-checked
against go-systemd's own Deserialize (v22, the same lexer fleet vendored).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fleetd.errors import UnitFileError
from fleetd.model import PartitionPolicy, Requirements
from fleetd.unit import file as unit_file
from fleetd.unit import glob as unit_glob
from fleetd.unit import xfleet as unit_xfleet
from fleetd.unit.file import (
    LINE_MAX,
    MAX_UNIT_BYTES,
    UnitFile,
    UnitOption,
    parse_multivalue,
    parse_unit,
    parse_unit_bytes,
)
from fleetd.unit.glob import glob_match
from fleetd.unit.xfleet import (
    UnknownXFleetOption,
    check_requirements,
    requirements,
    unknown_xfleet_keys,
    validate_options,
)

REPO = Path(__file__).resolve().parents[2]

# fleet's examples/hello.service, byte for byte.
HELLO = (
    "[Unit]\n"
    "Description=Hello World\n"
    "\n"
    "[Service]\n"
    'ExecStart=/bin/bash -c "while true; do echo \\"Hello, world\\"; sleep 1; done"\n'
)
# fleet's functional/fixtures/units/hello.service and hello@.service.
FIXTURE_HELLO = (
    '[Service]\nExecStart=/bin/bash -c "while true; do echo Hello, World!; sleep 1; done"\n'
)
FIXTURE_HELLO_AT = (
    '[Service]\nExecStart=/bin/bash -c "while true; do echo Hello, World %i!; sleep 1; done"\n'
)
COMMENT_VECTOR = (
    "# comment\n[Unit]\nDescription = Foo  \n\n[Service]\nExecStart=/bin/a \\\n  --b\n"
    '[Unit]\nAfter=x\n[X-Fleet]\nConflicts="a*" "b*"\n'
)
COMMENT_VECTOR_SERIALIZED = (
    "[Unit]\nDescription=Foo\nAfter=x\n\n[Service]\nExecStart=/bin/a \\\n  --b\n\n"
    '[X-Fleet]\nConflicts="a*" "b*"\n'
)


def opt(section: str, name: str, value: str) -> UnitOption:
    return UnitOption(section, name, value)


def unit(*options: tuple[str, str, str]) -> UnitFile:
    return UnitFile(tuple(UnitOption(*o) for o in options))


def xfleet(*lines: str) -> UnitFile:
    """A unit with a [Service] and the given [X-Fleet] lines."""
    return parse_unit("[Service]\nExecStart=/bin/true\n[X-Fleet]\n" + "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# HASH vectors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(HELLO, "e55c0aeb44ba0b68004ceb8a200e685194448b45", id="examples/hello"),
        pytest.param("", "da39a3ee5e6b4b0d3255bfef95601890afd80709", id="empty"),
        pytest.param(FIXTURE_HELLO, "3750b3e9f3962a56c7582929426e9abb012754cf", id="fixture"),
        pytest.param(FIXTURE_HELLO_AT, "79699e32624ad46c366ef37de89006ae9da617cd", id="template"),
        pytest.param(COMMENT_VECTOR, "528c618892ce906a393983296fa34a03f5aa4910", id="comments"),
        # fleet unit/unit_test.go TestUnitHash
        pytest.param(
            "[Service]\nExecStart=/bin/sleep 100\n",
            "1c6fb6f3684bafb0c173d8b8b957ceff031180c1",
            id="TestUnitHash",
        ),
    ],
)
def test_hash_vectors(text: str, expected: str) -> None:
    parsed = parse_unit(text)
    assert parsed.hash == expected
    assert parsed.short_hash == expected[:7]


def test_hello_example_in_units_dir_hashes_like_fleet() -> None:
    path = REPO / "units" / "hello.service"
    assert path.read_text() == HELLO
    assert parse_unit_bytes(path.read_bytes()).short_hash == "e55c0ae"


def test_comment_vector_serializes_byte_exact() -> None:
    assert parse_unit(COMMENT_VECTOR).serialize() == COMMENT_VECTOR_SERIALIZED


def test_hash_is_sha1_of_serialized_utf8() -> None:
    parsed = parse_unit("[Unit]\nDescription=caf\u00e9 \u2603\n")
    assert parsed.hash == hashlib.sha1(parsed.serialize().encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Serializer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "text"),
    [
        ((), ""),
        ((("Unit", "A", "1"),), "[Unit]\nA=1\n"),
        ((("Unit", "A", ""),), "[Unit]\nA=\n"),
        ((("A", "x", "1"), ("B", "y", "2")), "[A]\nx=1\n\n[B]\ny=2\n"),
        # repeated sections are merged into the first, options keep their order
        (
            (("A", "x", "1"), ("B", "y", "2"), ("A", "z", "3"), ("C", "w", "4")),
            "[A]\nx=1\nz=3\n\n[B]\ny=2\n\n[C]\nw=4\n",
        ),
        ((("S", "k", "v"), ("S", "k", "v")), "[S]\nk=v\nk=v\n"),
    ],
)
def test_serialize(options: tuple[tuple[str, str, str], ...], text: str) -> None:
    assert unit(*options).serialize() == text


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", [], id="empty"),
        pytest.param("no sections at all\n", [], id="only-preamble"),
        pytest.param("This=Ignored\n[S]\nA=1\n", [("S", "A", "1")], id="preamble-skipped"),
        # go-systemd: a "[" anywhere before the first section opens one
        pytest.param("junk [S]\nA=1\n", [("S", "A", "1")], id="bracket-in-preamble"),
        pytest.param("[S]\n  A  =  b  \n", [("S", "A", "b")], id="trimmed"),
        pytest.param("[S]\nA=\n", [("S", "A", "")], id="empty-value"),
        pytest.param("[S]\n=v\n", [("S", "", "v")], id="empty-name"),
        pytest.param("[S]\nA=b=c\n", [("S", "A", "b=c")], id="equals-in-value"),
        pytest.param("[S]\nA=1", [("S", "A", "1")], id="no-final-newline"),
        pytest.param("[S]\r\nA=1\r\n", [("S", "A", "1")], id="crlf"),
        pytest.param("[S]\n\n\n\t A=1\n", [("S", "A", "1")], id="blank-lines"),
        pytest.param("[S]  \nA=1\n", [("S", "A", "1")], id="space-after-section"),
        pytest.param("[]\nA=1\n", [("", "A", "1")], id="empty-section-name"),
        pytest.param("[S]\n[T]\nA=1\n", [("T", "A", "1")], id="empty-section"),
        pytest.param(
            "# c \\\nstill comment\n[S]\nA=1\n; x\\ \nB=2\n[T]\n",
            [("S", "A", "1")],
            id="comment-continuation",
        ),
        pytest.param("[S]\n  # c\nA=1 # not a comment\n", [("S", "A", "1 # not a comment")]),
        pytest.param("[S]\nA=foo \\\n  --b\n", [("S", "A", "foo \\\n  --b")], id="continuation"),
        # go-systemd: a continuation followed by a blank line keeps a final "\n"
        pytest.param(
            "[S]\nA=foo \\\n\nB=x\n", [("S", "A", "foo \\\n"), ("S", "B", "x")], id="cont-blank"
        ),
        pytest.param("[S]\nA=foo \\", [("S", "A", "foo \\")], id="cont-at-eof"),
        # go-systemd: "\r\n" leaves "\r" in the line, so the backslash is not last: no continuation
        pytest.param(
            "[S]\nA=foo \\\r\nB=x\r\n", [("S", "A", "foo \\"), ("S", "B", "x")], id="cont-crlf"
        ),
        # go-systemd trims with Go's unicode.IsSpace: NEL and ideographic space, not \x1c
        pytest.param("[S]\nA=\x85x\u3000\n", [("S", "A", "x")], id="go-space"),
        pytest.param("[S]\nA=\x1cx\x1c\n", [("S", "A", "\x1cx\x1c")], id="not-go-space"),
        pytest.param("[S]\nA=caf\u00e9\n", [("S", "A", "caf\u00e9")], id="utf8"),
    ],
)
def test_parse(text: str, expected: list[tuple[str, str, str]]) -> None:
    assert [(o.section, o.name, o.value) for o in parse_unit(text).options] == expected


def test_fleet_test_deserialize() -> None:
    """fleet unit/unit_test.go TestDeserialize."""
    text = (
        "\nThis=Ignored\n[Unit]\n;ignore this guy\nDescription = Foo\n\n[Service]\n"
        'ExecStart=echo "ping";\nExecStop=echo "pong"\n# ignore me, too\nExecStop=echo post\n\n'
        "[X-Fleet]\nMachineMetadata=foo=bar\nMachineMetadata=baz=qux\n"
    )
    assert parse_unit(text).contents == {
        "Unit": {"Description": ["Foo"]},
        "Service": {"ExecStart": ['echo "ping";'], "ExecStop": ['echo "pong"', "echo post"]},
        "X-Fleet": {"MachineMetadata": ["foo=bar", "baz=qux"]},
    }


def test_fleet_test_deserialized_unit_garbage() -> None:
    """fleet TestDeserializedUnitGarbage: any line with "=" is passed through."""
    text = (
        "\n>>>>>>>>>>>>>\n[Service]\nExecStart=jim\n"
        "# As long as a line has an equals sign, systemd is happy, so we should pass it through\n"
        "<<<<<<<<<<<=bar\n"
    )
    assert parse_unit(text).contents == {"Service": {"ExecStart": ["jim"], "<<<<<<<<<<<": ["bar"]}}


def test_escaped_multilines() -> None:
    """fleet TestDeserializeEscapedMultilines, with the backslash-newline semantics fleet master
    vendored (checked against go-systemd Deserialize): comments inside a value are kept."""
    text = (
        '\n[Service]\nExecStart=echo \\\n  "pi\\\n  ng"\nExecStop=\\\necho "po\\\nng"\n'
        "# comments within continuation should not be ignored\n"
        "ExecStopPre=echo\\\n#pang\nExecStopPost=echo\\\n#peng\\\npung\n"
    )
    assert parse_unit(text).contents == {
        "Service": {
            "ExecStart": ['echo \\\n  "pi\\\n  ng"'],
            "ExecStop": ['\\\necho "po\\\nng"'],
            "ExecStopPre": ["echo\\\n#pang"],
            "ExecStopPost": ["echo\\\n#peng\\\npung"],
        }
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # fleet TestBadUnitsFail
        ("\n[Unit]\n\n[Service]\n<<<<<<<<<<<<<<<<\n", "line 5: unexpected newline encountered"),
        ("\n[Unit]\nnonsense upon stilts\n", "line 3: unexpected newline encountered"),
        ("[S]\nA", "line 2: unexpected end of file while parsing option name"),
        ("[S]\nA\r=1\n", "line 2: unexpected newline encountered while parsing option name"),
        ("[S", "line 1: unable to find end of section"),
        ("[S] x\n", 'line 1: found garbage after section name [S]: "x"'),
        ("[A]\n[S]]\n", 'line 2: found garbage after section name [S]: "]"'),
        # beyond fleet: go-systemd would take "S\nT" as a section name
        ("[S\nT]\nA=1\n", "line 1: unexpected newline encountered while parsing section name"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(UnitFileError, match="^" + re.escape(message)):
        parse_unit(text)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("[S]\nA=" + "x" * (LINE_MAX - 3) + "\n", True),  # a 2047-byte line
        ("[S]\nA=" + "x" * (LINE_MAX - 2) + "\n", False),  # a 2048-byte line
        ("[S]\nA=" + "x" * (LINE_MAX - 2), False),  # ... without a final newline
        ("[S]\nA=" + "x" * (LINE_MAX - 3), True),
        ("[S]\nA=" + "\u00e9" * 1024 + "\n", False),  # bytes are counted, not characters
        ("[S]\n# " + "x" * 3000 + "\nA=1\n", False),  # comments too
        ("x" * 3000 + "\n[S]\nA=1\n", False),  # and text before the first section
        ("[S]\nA=" + "x" * 2000 + " \\\n" + "y" * 2000 + "\n", True),  # per physical line
        ("[S]\n" + "A=b\n" * 2000, True),  # a long file of short lines
        # blank lines between options are steps too
        ("[S]\n" + " " * (LINE_MAX - 1) + "\nA=1\n", True),
        ("[S]\n" + " " * LINE_MAX + "\nA=1\n", False),
        ("[S]\n\n" + "\t" * 3000 + "\n\nA=1\n", False),
        ("[S]\n \n" + " " * 1500 + "A=" + "x" * 600 + "\n", False),
        ("[S]\n" + " \r\n" * 3000 + "A=1\n", True),
        ("[S]\n" + "\u3000" * 700 + "A=1\n", False),
    ],
)
def test_line_length_limit(text: str, ok: bool) -> None:
    if ok:
        parse_unit(text)
    else:
        with pytest.raises(UnitFileError, match=r"line too long \(max 2048 bytes\)"):
            parse_unit(text)


def test_line_too_long_names_the_line() -> None:
    with pytest.raises(UnitFileError, match=r"^line 3: line too long"):
        parse_unit("[S]\nA=1\nB=" + "x" * 4000 + "\n")


def test_size_limit() -> None:
    body = "[S]\n" + "A=b\n" * 10
    assert len(parse_unit(body, max_bytes=len(body)).options) == 10
    with pytest.raises(UnitFileError, match=r"too large: 45 bytes \(max 44\)"):
        parse_unit(body + "\n", max_bytes=len(body))
    with pytest.raises(UnitFileError, match="too large"):
        parse_unit_bytes(b"#" * (MAX_UNIT_BYTES + 1))


def test_default_size_limit_allows_large_units() -> None:
    body = "[Service]\n" + "Environment=K=V\n" * 60000  # ~960 KB
    assert len(parse_unit(body).options) == 60000


@pytest.mark.parametrize(
    "data", [b"[S]\nA=\xff\n", b"[S]\nA=\xc3\n", b"[S]\nA=\xed\xa0\x80\n", b"\xc0\xaf"]
)
def test_invalid_utf8_rejected(data: bytes) -> None:
    with pytest.raises(UnitFileError, match="not valid UTF-8"):
        parse_unit_bytes(data)


def test_unencodable_text_rejected() -> None:
    with pytest.raises(UnitFileError, match="not valid UTF-8"):
        parse_unit("[S]\nA=\udc80\n")


def test_parse_bytes_equals_parse_text() -> None:
    assert parse_unit_bytes(COMMENT_VECTOR.encode()) == parse_unit(COMMENT_VECTOR)


# ---------------------------------------------------------------------------------------------
# Parsed views and the API form
# ---------------------------------------------------------------------------------------------


def test_contents_splits_only_xfleet_values() -> None:
    parsed = parse_unit('[Service]\nExecStart="a" "b"\n[X-Fleet]\nConflicts="a" "b"\n')
    assert parsed.contents == {
        "Service": {"ExecStart": ['"a" "b"']},
        "X-Fleet": {"Conflicts": ["a", "b"]},
    }


def test_contents_is_a_fresh_copy() -> None:
    parsed = parse_unit("[Unit]\nDescription=x\n")
    parsed.contents["Unit"]["Description"].append("y")
    assert parsed.contents == {"Unit": {"Description": ["x"]}}


@pytest.mark.parametrize(
    ("text", "description"),
    [
        ("[Unit]\nDescription = Foo\n\n[Service]\nExecStart=echo\n", "Foo"),  # TestDescription
        ("[Unit]\n\n[Service]\nExecStart=echo\n", ""),  # TestDescriptionNotDefined
        ("[Unit]\nDescription=first\nDescription=second\n", "first"),
        ("[Service]\nDescription=wrong section\n", ""),
    ],
)
def test_description(text: str, description: str) -> None:
    assert parse_unit(text).description == description


@pytest.mark.parametrize(
    ("text", "has_install"),
    [
        ("[Service]\nExecStart=x\n", False),
        ("[Service]\nExecStart=x\n[Install]\n", False),  # as fleet: an empty header is nothing
        ("[Service]\nExecStart=x\n[Install]\nWantedBy=multi-user.target\n", True),
    ],
)
def test_has_install_section(text: str, has_install: bool) -> None:
    assert parse_unit(text).has_install_section is has_install


def test_from_options_and_back() -> None:
    api = [
        {"section": "Service", "name": "ExecStart", "value": "/bin/true"},
        {"section": "X-Fleet", "name": "Global", "value": "true", "extra": "ignored"},
    ]
    built = UnitFile.from_options(api)
    assert built.options == (
        opt("Service", "ExecStart", "/bin/true"),
        opt("X-Fleet", "Global", "true"),
    )
    assert built.to_options() == [{k: v for k, v in o.items() if k != "extra"} for o in api]
    assert UnitFile.from_options(built.to_options()) == built


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["nope"], "option 0: expected an object"),
        ([{"section": "S", "name": "N"}], "option 0: 'value' must be a string"),
        ([{"section": "S", "name": "N", "value": "v"}, {"section": 1}], "option 1: 'section'"),
        ([{"section": "S", "name": "N", "value": "\udc80"}], "option 0: 'value' is not valid"),
    ],
)
def test_from_options_rejects_malformed(entries: list[object], message: str) -> None:
    with pytest.raises(UnitFileError, match=re.escape(message)):
        UnitFile.from_options(entries)  # type: ignore[arg-type]


def test_unit_file_is_hashable_value() -> None:
    a, b = parse_unit(HELLO), parse_unit(HELLO + "\n# trailing comment\n")
    assert a == b
    assert hash(a) == hash(b)
    assert a.hash == b.hash
    assert {a: 1}[b] == 1


# ---------------------------------------------------------------------------------------------
# [X-Fleet]
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # fleet unit/unit_test.go TestParseMultivalueLine, every row
        ('"bar" "ping" "pong"', ["bar", "ping", "pong"]),
        ('"bar"', ["bar"]),
        ("", [""]),
        ('""', [""]),
        ('"bar', ['"bar']),
        ('bar"', ['bar"']),
        ('foo\\"bar', ['foo\\"bar']),
        ('"bar" "', ["bar", ""]),
        ('"foo\\"bar"', ["foo\\bar"]),
        # more
        ('"a=b c=d"', ["a=b c=d"]),
        ("a b", ["a b"]),
        ('"a"  "b"', ["a", "", "b"]),
        ('"', [""]),
    ],
)
def test_parse_multivalue(value: str, expected: list[str]) -> None:
    assert parse_multivalue(value) == expected


def test_requirements_default() -> None:
    assert requirements(parse_unit("[Service]\nExecStart=x\n"), "a.service") == Requirements()


@pytest.mark.parametrize(
    ("lines", "machine_id"),
    [
        (["MachineID=abc"], "abc"),
        (["MachineID=first", "MachineID=second"], "first"),
        (['MachineID="one" "two"'], "one"),
        (["X-ConditionMachineID=old"], "old"),
        (["X-ConditionMachineBootID=boot"], "boot"),
        # lookup order: MachineID, then X-ConditionMachineID, then X-ConditionMachineBootID
        (["X-ConditionMachineBootID=boot", "X-ConditionMachineID=old", "MachineID=new"], "new"),
        (["X-ConditionMachineBootID=boot", "X-ConditionMachineID=old"], "old"),
        # as fleet: an empty MachineID= is a requirement no machine meets
        (["MachineID="], ""),
        (["MachineID=%p"], "web"),
    ],
)
def test_machine_id(lines: list[str], machine_id: str) -> None:
    assert requirements(xfleet(*lines), "web@1.service").machine_id == machine_id


def test_machine_of_combines_both_keys() -> None:
    parsed = xfleet("MachineOf=a.service", "X-ConditionMachineOf=b.service", 'MachineOf="c" "d"')
    assert requirements(parsed, "x.service").machine_of == ("b.service", "a.service", "c", "d")


def test_machine_of_is_not_split_unquoted() -> None:
    parsed = xfleet("MachineOf=a.service b.service")
    assert requirements(parsed, "x.service").machine_of == ("a.service b.service",)


@pytest.mark.parametrize(
    ("lines", "metadata"),
    [
        (["MachineMetadata=region=us"], {"region": {"us"}}),
        (["MachineMetadata=region=us", "MachineMetadata=region=eu"], {"region": {"us", "eu"}}),
        (['MachineMetadata="region=us" "disk=ssd"'], {"region": {"us"}, "disk": {"ssd"}}),
        (["X-ConditionMachineMetadata=a=b", "MachineMetadata=c=d"], {"a": {"b"}, "c": {"d"}}),
        # silently ignored, as fleet: not exactly two non-empty parts
        (["MachineMetadata=region=us disk=ssd"], {}),
        (["MachineMetadata=region"], {}),
        (["MachineMetadata==us"], {}),
        (["MachineMetadata=region="], {}),
        (["MachineMetadata=a=b=c"], {}),
        (["MachineMetadata=name=%i"], {"name": {"1"}}),
    ],
)
def test_machine_metadata(lines: list[str], metadata: dict[str, set[str]]) -> None:
    got = requirements(xfleet(*lines), "web@1.service").metadata
    assert {key: set(values) for key, values in got} == metadata
    assert [key for key, _ in got] == sorted(metadata)


@pytest.mark.parametrize(
    ("lines", "conflicts"),
    [
        (["Conflicts=a*"], ("a*",)),
        (["Conflicts=a.service b.service"], ("a.service", "b.service")),  # whitespace splits
        (['Conflicts="a*" "b*"'], ("a*", "b*")),
        (["X-Conflicts=old*", "Conflicts=new*"], ("old*", "new*")),
        (["Conflicts=a*", "Conflicts=a*"], ("a*",)),
        (["Conflicts="], ()),
        (["Conflicts=%p@*"], ("web@*",)),
    ],
)
def test_conflicts(lines: list[str], conflicts: tuple[str, ...]) -> None:
    assert requirements(xfleet(*lines), "web@1.service").conflicts == conflicts


@pytest.mark.parametrize(
    ("lines", "is_global"),
    [
        ([], False),
        (["Global=true"], True),
        (["Global=TRUE"], True),
        (["Global=yes"], True),
        (["Global=1"], True),
        (["Global=on"], True),
        (["Global=t"], True),
        (["Global=T"], True),
        (["Global=y"], False),
        (["Global=false"], False),
        (["Global="], False),
        (["Global=true", "Global=false"], False),  # the last value wins
        (["Global=false", "Global=yes"], True),
        (['Global="true" "no"'], False),
    ],
)
def test_global(lines: list[str], is_global: bool) -> None:
    assert requirements(xfleet(*lines), "x.service").is_global is is_global


def test_replaces() -> None:
    parsed = xfleet("Replaces=old.service", 'Replaces="a*" "%n"')
    assert requirements(parsed, "new.service").replaces == ("old.service", "a*", "new.service")


@pytest.mark.parametrize(
    ("name", "value", "expanded"),
    [
        ("foo@bar.service", "%n|%N|%p|%i", "foo@bar.service|foo@bar|foo|bar"),
        ("foo.service", "%n|%N|%p|%i", "foo.service|foo|foo|"),
        ("foo@.service", "%p-%i", "foo-"),
        ("a@b@c.socket", "%i", "b@c"),
        ("foo.service", "%%n %x", "%foo.service %x"),
        # no "." in the name: fleet expands nothing
        ("noname", "%n", "%n"),
    ],
)
def test_specifier_expansion(name: str, value: str, expanded: str) -> None:
    assert requirements(xfleet(f"MachineOf={value}"), name).machine_of == (expanded,)


def test_specifiers_expand_in_order() -> None:
    # %n is replaced first, so a "%p" that %n's expansion produced is expanded in turn.
    assert requirements(xfleet("MachineOf=%n"), "a%p.service").machine_of == ("aa%p.service",)


@pytest.mark.parametrize(
    ("lines", "policy"),
    [
        ([], PartitionPolicy.KEEP),
        (["PartitionPolicy=stop"], PartitionPolicy.STOP),
        (["PartitionPolicy=STOP"], PartitionPolicy.STOP),
        (["PartitionPolicy=keep"], PartitionPolicy.KEEP),
        (["PartitionPolicy=stop", "PartitionPolicy=keep"], PartitionPolicy.KEEP),
        (["PartitionPolicy=stop", "PartitionPolicy="], PartitionPolicy.KEEP),
    ],
)
def test_partition_policy(lines: list[str], policy: PartitionPolicy) -> None:
    assert requirements(xfleet(*lines), "x.service").partition_policy is policy


@pytest.mark.parametrize("value", ["maybe", "stopp", "keep stop"])
def test_partition_policy_invalid(value: str) -> None:
    parsed = xfleet(f"PartitionPolicy={value}")
    with pytest.raises(UnitFileError, match=r'invalid value ".*" for PartitionPolicy'):
        requirements(parsed, "x.service")
    with pytest.raises(UnitFileError, match="PartitionPolicy"):
        validate_options(parsed)


def test_unknown_xfleet_keys() -> None:
    parsed = xfleet(
        "MachineID=a",
        "Weight=3",
        "MachineOf=b",
        "Bogus=1",
        "Weight=4",
        "PartitionPolicy=stop",
        "X-ConditionMachineMetadata=a=b",
    )
    assert unknown_xfleet_keys(parsed) == ["Weight", "Bogus"]
    assert unknown_xfleet_keys(parse_unit("[Service]\nBogus=1\n")) == []


# ---------------------------------------------------------------------------------------------
# check_requirements: the input-boundary checks (beyond fleet)
# ---------------------------------------------------------------------------------------------

_BOOLEAN = "expected a boolean: true, yes, 1, on, t or false, no, 0, off, f (any case)"
_PAIR = 'expected one key=value pair (a single "=", both sides non-empty)'


@pytest.mark.parametrize(
    ("line", "name", "message"),
    [
        (
            "MachineMetdata=region=east",
            "x.service",
            'unknown option "MachineMetdata" in [X-Fleet] section (did you mean MachineMetadata?)',
        ),
        (
            "global=true",  # keys are case-sensitive, the suggestion is not
            "x.service",
            'unknown option "global" in [X-Fleet] section (did you mean Global?)',
        ),
        ("Weight=3", "x.service", 'unknown option "Weight" in [X-Fleet] section'),
        ("MachineMetadata=region", "x.service", 'invalid value "region" for MachineMetadata'),
        ("MachineMetadata==x", "x.service", '"=x" for MachineMetadata'),
        ("MachineMetadata=a=", "x.service", '"a=" for MachineMetadata'),
        ("X-ConditionMachineMetadata=a=b=c", "x.service", "X-ConditionMachineMetadata"),
        (
            "MachineMetadata=region=east disk=ssd",
            "x.service",
            f'"region=east disk=ssd" for MachineMetadata in [X-Fleet] section: {_PAIR};'
            ' for several pairs on one line quote each: "a=b" "c=d"',
        ),
        (
            'MachineMetadata="region=east" "disk"',
            "x.service",
            f'invalid value "disk" for MachineMetadata in [X-Fleet] section: {_PAIR}',
        ),
        (
            "Global=perhaps",
            "x.service",
            f'invalid value "perhaps" for Global in [X-Fleet] section: {_BOOLEAN}',
        ),
        (
            "Conflicts=[",
            "x.service",
            'invalid value "[" for Conflicts in [X-Fleet] section: malformed glob pattern "["',
        ),
        ("Conflicts=ok*.service [a-", "x.service", 'malformed glob pattern "[a-"'),
        ("X-Conflicts=a\\ b", "x.service", 'malformed glob pattern "a\\\\"'),
        ("Replaces=[^]", "x.service", "for Replaces in [X-Fleet] section: malformed glob"),
        (
            "MachineOf=x.service",
            "x.service",
            'invalid value "x.service" for MachineOf in [X-Fleet] section: a unit cannot be a'
            " MachineOf peer of itself",
        ),
        (
            "X-ConditionMachineOf=%p@%i.service",
            "web@1.service",
            'invalid value "%p@%i.service" (expanded: "web@1.service") for'
            " X-ConditionMachineOf in [X-Fleet] section: a unit cannot be a MachineOf peer of"
            " itself",
        ),
        (
            "Replaces=%n",
            "web@1.service",
            'invalid value "%n" (expanded: "web@1.service") for Replaces in [X-Fleet] section:'
            " a unit cannot replace itself",
        ),
    ],
)
def test_check_requirements_refuses(line: str, name: str, message: str) -> None:
    parsed = xfleet(line)
    with pytest.raises(UnitFileError) as caught:
        check_requirements(parsed, name)
    assert message in str(caught.value)
    # Stored bodies stay readable: the engine's and agents' reading never raises for these.
    requirements(parsed, name)


@pytest.mark.parametrize(
    ("lines", "name"),
    [
        ([], "x.service"),
        (["MachineMetadata=region=east", 'MachineMetadata="disk=ssd" "rack=1"'], "x.service"),
        (["Global=TRUE", "Global=no", "Global=t", "Global=Off", "Global=0"], "x.service"),
        (["Global=yes", "Global="], "x.service"),  # empty: systemd's reset to the default
        (["Conflicts=web@*.service other.service", "Conflicts="], "web@1.service"),
        (["Replaces=web@*.service"], "web@1.service"),  # a glob that also matches itself
        (["MachineOf=db.service", "MachineID=", "PartitionPolicy=stop"], "x.service"),
        # A template is checked unexpanded: "rack=%i" is "rack=" only for the template.
        (["MachineMetadata=rack=%i", "MachineOf=%p-db@%i.service"], "web@.service"),
        (["MachineMetadata=rack=%i"], "web@3.service"),
    ],
)
def test_check_requirements_accepts(lines: list[str], name: str) -> None:
    check_requirements(xfleet(*lines), name)


def test_check_requirements_expands_specifiers_except_for_templates() -> None:
    parsed = xfleet("MachineMetadata=rack=%i")
    check_requirements(parsed, "web@.service")  # the template: only its instances are used
    check_requirements(parsed, "web@3.service")
    # Not a template, so %i is "" as the scheduler would see it: no constraint was meant.
    with pytest.raises(UnitFileError, match=r'"rack=%i" \(expanded: "rack="\)'):
        check_requirements(parsed, "web.service")


def test_check_requirements_allow_unknown() -> None:
    parsed = xfleet("Frobnicate=1", "MachineMetadata=a=b")
    with pytest.raises(UnknownXFleetOption) as caught:
        check_requirements(parsed, "x.service")
    assert caught.value.key == "Frobnicate"
    check_requirements(parsed, "x.service", allow_unknown=True)
    # The flag lets unknown keys in, never a malformed known one.
    with pytest.raises(UnitFileError, match="Global"):
        check_requirements(xfleet("Frobnicate=1", "Global=maybe"), "x.service", allow_unknown=True)


@given(st.text(st.sampled_from("*?[]^-\\/abc.z@"), max_size=10))
def test_prop_malformed_pattern_is_what_never_matches(pattern: str) -> None:
    """A pattern is refused exactly when Go's path.Match calls it malformed (ErrBadPattern),
    which glob_match turns into "matches nothing": the regex translation agrees."""
    assert unit_xfleet._is_bad_pattern(pattern) is (unit_glob._glob_regex(pattern) is None)


# ---------------------------------------------------------------------------------------------
# validate_options
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines",
    [
        [],
        ["Global=true", "MachineMetadata=role=web"],
        ["Global=true", "Conflicts=x*"],  # allowed in fleet master
        ["MachineID=abc", "MachineMetadata=a=b"],
        ["MachineOf=a.service", "Conflicts=b*"],
        ["MachineOf=a.service", "Replaces=b*"],
        ["Global=false", "MachineID=abc"],
        ["Conflicts=[", "MachineOf=a"],  # a malformed glob matches nothing
        ["Weight=1"],  # unknown keys only warn
    ],
)
def test_validate_options_accepts(lines: list[str]) -> None:
    validate_options(xfleet(*lines))


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ["MachineOf=web.service", "Conflicts=web*"],
            'unresolvable requirements: peer "web.service" matches conflict "web*"',
        ),
        (
            ["X-ConditionMachineOf=db.service", "X-Conflicts=db.service"],
            'unresolvable requirements: peer "db.service" matches conflict "db.service"',
        ),
        (
            ["MachineOf=web.service", "Replaces=*.service"],
            'unresolvable requirements: peer "web.service" matches replace "*.service"',
        ),
        (["MachineID=a", "MachineOf=b"], "MachineID cannot be used with Peers"),
        (["X-ConditionMachineBootID=a", "MachineOf=b"], "MachineID cannot be used with Peers"),
        (["MachineID=a", "Conflicts=b"], "MachineID cannot be used with Conflicts"),
        (["MachineID=a", "Global=true"], "MachineID cannot be used with Global"),
        (["MachineID=a", "Replaces=b"], "MachineID cannot be used with Replaces"),
        (["Global=yes", "MachineOf=b"], "Global cannot be used with Peers"),
        (["Global=1", "Replaces=b"], "Global cannot be used with Replaces"),
        (["Conflicts=a", "Replaces=b"], "Conflicts cannot be used with Replaces"),
        # fleet's order: peer matching first, then the switch in order
        (
            ["MachineID=a", "MachineOf=b", "Conflicts=b"],
            'unresolvable requirements: peer "b" matches conflict "b"',
        ),
        (["MachineID=a", "Global=true", "Conflicts=c"], "MachineID cannot be used with Conflicts"),
        (["Global=true", "MachineOf=p", "Replaces=r"], "Global cannot be used with Peers"),
        # values are checked unexpanded: "%n" is not "a.service"
        (
            ["MachineOf=%n", "Conflicts=%n"],
            'unresolvable requirements: peer "%n" matches conflict "%n"',
        ),
        # fleet quotes with Go's %q
        (
            ['MachineOf=a"b', 'Conflicts=a"b'],
            'unresolvable requirements: peer "a\\"b" matches conflict "a\\"b"',
        ),
    ],
)
def test_validate_options_rejects(lines: list[str], message: str) -> None:
    with pytest.raises(UnitFileError, match="^" + re.escape(message) + "$"):
        validate_options(xfleet(*lines))


def test_validate_options_checks_unexpanded_values() -> None:
    # With the name "a.service" these would collide, but no name is known at validation time.
    validate_options(xfleet("MachineOf=%n", "Conflicts=a.service"))


def test_validate_options_roundtrip_applies_line_limit() -> None:
    api = UnitFile((opt("Service", "ExecStart", "x" * 3000),))
    with pytest.raises(UnitFileError, match="line too long"):
        validate_options(api)
    with pytest.raises(UnitFileError, match="line too long"):
        validate_options(api, strict=False)


@pytest.mark.parametrize(
    "option",
    [
        opt("Service", "ExecStart", " leading space"),
        opt("Service", "ExecStart", "trailing space "),
        opt("Service", "ExecStart", "two\nlines=x"),
        opt("Service", "ExecStart", "ends in backslash \\"),
        opt("Service", "Exec=Start", "x"),
        opt("Service", " Name", "x"),
        opt("Serv]ice", "Name", "x"),
    ],
)
def test_validate_options_strict_roundtrip(option: UnitOption) -> None:
    """Beyond fleet: options that would change when stored as text and read back."""
    api = UnitFile((opt("Unit", "Description", "d"), option))
    with pytest.raises(UnitFileError):
        validate_options(api)


def test_validate_options_non_strict_is_fleet() -> None:
    validate_options(UnitFile((opt("Service", "ExecStart", " x "),)), strict=False)


def test_strict_roundtrip_message_names_the_option() -> None:
    api = UnitFile((opt("Service", "ExecStart", "a\nb=c"),))
    with pytest.raises(UnitFileError, match=r'^option \[Service\] "ExecStart"="a\\nb=c" does not'):
        validate_options(api)
    # A value whose second line is not an option fails fleet's own round trip first.
    with pytest.raises(UnitFileError, match="unexpected newline"):
        validate_options(UnitFile((opt("Service", "ExecStart", "a\nb"),)))


def test_parsed_units_validate() -> None:
    for text in (HELLO, FIXTURE_HELLO, FIXTURE_HELLO_AT, COMMENT_VECTOR):
        validate_options(parse_unit(text))


# ---------------------------------------------------------------------------------------------
# Globs (Go path.Match)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "matched"),
    [
        # Go's own path.Match test table (src/path/match_test.go); errors count as no match
        ("abc", "abc", True),
        ("*", "abc", True),
        ("*c", "abc", True),
        ("a*", "a", True),
        ("a*", "abc", True),
        ("a*", "ab/c", False),
        ("a*/b", "abc/b", True),
        ("a*/b", "a/c/b", False),
        ("a*b*c*d*e*/f", "axbxcxdxe/f", True),
        ("a*b*c*d*e*/f", "axbxcxdxexxx/f", True),
        ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", False),
        ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", False),
        ("a*b?c*x", "abxbbxdbxebxczzx", True),
        ("a*b?c*x", "abxbbxdbxebxczzy", False),
        ("ab[c]", "abc", True),
        ("ab[b-d]", "abc", True),
        ("ab[e-g]", "abc", False),
        ("ab[^c]", "abc", False),
        ("ab[^b-d]", "abc", False),
        ("ab[^e-g]", "abc", True),
        ("a\\*b", "a*b", True),
        ("a\\*b", "ab", False),
        ("a?b", "a\u263ab", True),
        ("a[^a]b", "a\u263ab", True),
        ("a???b", "a\u263ab", False),
        ("a[^a][^a][^a]b", "a\u263ab", False),
        ("[a-\u03b6]*", "\u03b1", True),
        ("*[a-\u03b6]", "A", False),
        ("a?b", "a/b", False),
        ("a*b", "a/b", False),
        ("[\\]a]", "]", True),
        ("[\\-]", "-", True),
        ("[x\\-]", "x", True),
        ("[x\\-]", "-", True),
        ("[x\\-]", "z", False),
        ("[\\-x]", "x", True),
        ("[\\-x]", "-", True),
        ("[\\-x]", "a", False),
        ("[]a]", "]", False),
        ("[-]", "-", False),
        ("[x-]", "x", False),
        ("[x-]", "-", False),
        ("[x-]", "z", False),
        ("[-x]", "x", False),
        ("[-x]", "-", False),
        ("[-x]", "a", False),
        ("\\", "a", False),
        ("[a-b-c]", "a", False),
        ("[", "a", False),
        ("[^", "a", False),
        ("[^bc", "a", False),
        ("a[", "a", False),
        ("a[", "ab", False),
        ("a[", "x", False),
        ("a/b[", "x", False),
        ("*x", "xxx", True),
        # fleet-style unit patterns
        ("*.service", "web@1.service", True),
        ("web@*.service", "web@1.service", True),
        ("web@*.service", "db@1.service", False),
        ("", "", True),
        ("", "a", False),
    ],
)
def test_glob_match(pattern: str, name: str, matched: bool) -> None:
    assert glob_match(pattern, name) is matched


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

_SAFE_TEXT = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
_sections = st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters="-_"))
_names = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="=[#;"),
    min_size=1,
).filter(lambda n: n[0] not in "[#;")
_values = (
    st.text(st.one_of(_SAFE_TEXT, st.sampled_from(" \t\u00e9\u2603")), max_size=40)
    .map(lambda v: v.strip(" \t"))
    .filter(lambda v: not v.endswith("\\"))
)
_options = st.lists(st.builds(UnitOption, _sections, _names, _values), max_size=12)


@given(_options)
def test_prop_serialize_roundtrip(options: list[UnitOption]) -> None:
    built = UnitFile(tuple(options))
    reparsed = parse_unit(built.serialize())
    assert reparsed.serialize() == built.serialize()
    assert reparsed.hash == built.hash


@given(_options)
def test_prop_serialization_only_regroups(options: list[UnitOption]) -> None:
    """Grouping options by first-seen section is the only change serialization makes."""
    first_seen = {o.section: i for i, o in reversed(list(enumerate(options)))}
    grouped = sorted(options, key=lambda o: first_seen[o.section])
    built = UnitFile(tuple(options))
    assert parse_unit(built.serialize()).options == tuple(grouped)
    validate_options(UnitFile(tuple(grouped)))


_UNIT_ALPHABET = st.sampled_from(
    [
        *("[", "]", "#", ";", "=", "\\", " ", "\t", "\n", "\r", "\r\n", "a", "b", "Unit"),
        *("X-Fleet", "\x85", "\u3000", "\xa0", "\u00e9", '"', "\x00", "\x1c", "\v", "\f"),
        "\udc80",
    ]
)


@given(st.lists(_UNIT_ALPHABET, max_size=60).map("".join))
def test_prop_parse_raises_only_unit_file_error(text: str) -> None:
    with contextlib.suppress(UnitFileError):
        parse_unit(text)


@given(st.binary(max_size=200))
def test_prop_parse_bytes_raises_only_unit_file_error(data: bytes) -> None:
    with contextlib.suppress(UnitFileError):
        parse_unit_bytes(data)


@given(st.lists(_UNIT_ALPHABET.filter(lambda c: c != "\udc80"), max_size=60).map("".join))
def test_prop_parsed_text_roundtrips(text: str) -> None:
    """parse(serialize(parse(t))) == parse(t), except for a value ending in a backslash
    (go-systemd then reads the next line as a continuation; the strict check catches it)."""
    try:
        parsed = parse_unit(text)
    except UnitFileError:
        return
    assume(not any(o.value.endswith("\\") for o in parsed.options))
    assert parse_unit(parsed.serialize()) == parsed
    validate_options(parsed)


def _lexed(text: str) -> UnitFile | None:
    """What the lexer alone makes of `text` (None if it refuses it)."""
    try:
        return UnitFile(tuple(unit_file._Lexer(text.encode()).run()))
    except UnitFileError:
        return None


# Text shaped like a serialization, from pieces that each change how the lexer reads a line.
_PIECES = st.sampled_from(
    ["a", "B", "=", "[", "]", "#", ";", " ", "\t", "\\", "\r", "\x85", "\u3000", "\x00", "\u00e9"]
)
_WORDS = st.lists(_PIECES, max_size=4).map("".join)
_LINES = st.one_of(
    st.builds(lambda n, v: f"{n}={v}", _WORDS, _WORDS),
    _WORDS.map(lambda n: f"[{n}]"),
    _WORDS,
    st.just(""),
)
_BLOCKS = st.lists(
    st.tuples(_WORDS, st.lists(st.tuples(_WORDS, _WORDS), max_size=3)), min_size=1, max_size=3
)
# Laid out exactly as `serialize` lays out sections and options, from words it would not write.
_SERIALIZED_LAYOUT = _BLOCKS.map(
    lambda blocks: "\n".join(
        f"[{s}]\n" + "".join(f"{n}={v}\n" for n, v in opts) for s, opts in blocks
    )
)
_NEAR_SERIALIZED = (
    _SERIALIZED_LAYOUT
    | st.lists(_LINES, max_size=8).map(lambda ls: "".join(f"{x}\n" for x in ls))
    | st.lists(_LINES, min_size=1, max_size=8).map("\n".join)
)


@given(_NEAR_SERIALIZED | st.lists(_UNIT_ALPHABET.filter(lambda c: c != "\udc80")).map("".join))
def test_prop_serialized_split_agrees_with_lexer(text: str) -> None:
    """The lexer-free split answers only for text the lexer reads the same way: it may
    decline, and never disagrees."""
    split = unit_file._parse_serialized(text)
    if split is not None:
        assert split == _lexed(text)


@given(_options)
def test_prop_serializations_take_the_split(options: list[UnitOption]) -> None:
    """What etcd holds (serializations) is split without the lexer, to the lexer's result."""
    text = UnitFile(tuple(options)).serialize()
    split = unit_file._parse_serialized(text)
    assert split is not None
    assert split == _lexed(text) == parse_unit(text)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("[S]\nA=1 \\\nB=2\n", id="continuation"),
        pytest.param("[S]\r\nA=1\r\n", id="crlf"),
        pytest.param("[S]\n A=1\n", id="indented-name"),
        pytest.param("[S]\nA= 1\n", id="spaced-value"),
        pytest.param("[S]\nA=1\u3000\n", id="go-space-after-value"),
        pytest.param("[S]\n#A=1\n", id="comment"),
        pytest.param("[S]\n;A=1\n", id="semicolon-comment"),
        pytest.param("A=1\n[S]\nB=2\n", id="preamble"),
        pytest.param("[S]\n[T]\nA=1\n", id="empty-section"),
        pytest.param("[S]\nA=1\n[T]\nB=2\n", id="no-blank-between-sections"),
        pytest.param("[S]\nA=1\n\n[S]\nB=2\n", id="repeated-section"),
        pytest.param("[S]\nA=1", id="no-final-newline"),
        pytest.param("[S]\nA\n", id="no-equals"),
        pytest.param("[S] x\nA=1\n", id="garbage-after-section"),
        pytest.param("[S]\nA=" + "x" * LINE_MAX + "\n", id="line-too-long"),
    ],
)
def test_serialized_split_declines(text: str) -> None:
    """Text that is not exactly a serialization goes to the lexer, whatever it makes of it."""
    assert unit_file._parse_serialized(text) is None


@given(_options)
def test_prop_hash_stable(options: list[UnitOption]) -> None:
    first, second = UnitFile(tuple(options)), UnitFile(tuple(options))
    assert first.hash == second.hash == hashlib.sha1(first.serialize().encode()).hexdigest()
    assert len(first.hash) == 40
    assert first.short_hash == first.hash[:7]


@given(st.text(max_size=12), st.text(max_size=12))
def test_prop_glob_never_raises(pattern: str, name: str) -> None:
    assert isinstance(glob_match(pattern, name), bool)


@given(st.text(st.characters(blacklist_characters="*?[\\"), max_size=20))
def test_prop_glob_literal_matches_itself(text: str) -> None:
    assert glob_match(text, text)


_GLOB_ASCII = st.text(st.sampled_from("*?[]^-\\/abc.z@"), max_size=10)


@given(_GLOB_ASCII, st.text(st.sampled_from("abc/.-]^z\\*["), max_size=8))
def test_prop_glob_regex_path_equals_go_port(pattern: str, name: str) -> None:
    """ASCII input takes the cached-regex path; it must agree with the line-by-line port of
    Go's path.Match (which was cross-checked against Go itself)."""
    from fleetd.unit.glob import BadPattern, path_match

    try:
        expected = path_match(pattern.encode(), name.encode())
    except BadPattern:
        expected = False
    assert glob_match(pattern, name) is expected
