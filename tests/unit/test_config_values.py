"""fleetd.config_values: Go's value syntax as fleet's flags read it, and fleet's list forms."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetd.config_values import (
    parse_bool,
    parse_duration,
    parse_int,
    parse_metadata,
    parse_string_slice,
)
from fleetd.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("10s", 10.0),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("1h2m3s4ms", 3723.004),
        ("2m", 120.0),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("+3s", 3.0),
        ("-3s", -3.0),
        ("0", 0.0),
        ("-0", 0.0),
        ("1500us", 0.0015),
        ("1500\u00b5s", 0.0015),
        ("1500\u03bcs", 0.0015),
        ("2000000ns", 0.002),
        ("3s500ms", 3.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", 'invalid duration ""'),
        ("+", 'invalid duration "+"'),
        ("s", 'invalid duration "s"'),
        (".s", 'invalid duration ".s"'),
        ("10", 'missing unit in duration "10"'),
        ("1m30", 'missing unit in duration "1m30"'),
        ("3x", 'unknown unit "x" in duration "3x"'),
        ("3 s", 'unknown unit " s"'),
        ("3S", 'unknown unit "S"'),
        ("1d", 'unknown unit "d"'),
        ("30s ", 'unknown unit "s "'),
        ("9999999999h", "out of range"),
        ("1..5s", "missing unit in duration"),  # as Go: "1." then no unit before "."
    ],
)
def test_parse_duration_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["ms", "s", "m", "h"]))
def test_parse_duration_whole_units(number: int, unit: str) -> None:
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    assert parse_duration(f"{number}{unit}") == pytest.approx(number * scale)


@given(st.text(max_size=30))
def test_parse_duration_raises_only_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('["http://a:2379", "http://b:4001"]', ("http://a:2379", "http://b:4001")),
        ('["http://a:2379","http://b:4001"]', ("http://a:2379", "http://b:4001")),
        ("http://a:2379,http://b:4001", ("http://a:2379", "http://b:4001")),
        ("http://a:2379, http://b:4001", ("http://a:2379", "http://b:4001")),
        ("http://a:2379", ("http://a:2379",)),
        ('"http://a:2379"', ("http://a:2379",)),
        ("[http://a:2379]", ("http://a:2379",)),
        ("", ("",)),
        ("a,,b", ("a", "", "b")),
    ],
)
def test_parse_string_slice(text: str, expected: tuple[str, ...]) -> None:
    assert parse_string_slice(text) == expected


@pytest.mark.parametrize(
    ("text", "expected", "warnings"),
    [
        ("", {}, []),
        ("region=us-west", {"region": "us-west"}, []),
        ("region=us-west,az=us-west-1", {"region": "us-west", "az": "us-west-1"}, []),
        (" region = us-west , az = 1 ", {"region": "us-west", "az": "1"}, []),
        ("a=1,a=2", {"a": "2"}, []),  # a later duplicate wins
        ("a=", {"a": ""}, []),
        ("a=b=c", {"a": "b=c"}, []),  # split on the first "="
        ("disk.type=ssd,rack_no=4,x-y=z", {"disk.type": "ssd", "rack_no": "4", "x-y": "z"}, []),
        ("a=1,,", {"a": "1"}, []),  # empty entries are not worth a warning
        ("a=1,ssd", {"a": "1"}, ['metadata entry "ssd" has no "=" - ignoring']),
    ],
)
def test_parse_metadata(text: str, expected: dict[str, str], warnings: list[str]) -> None:
    got: list[str] = []
    assert parse_metadata(text, got) == expected
    assert got == warnings


@pytest.mark.parametrize("text", ["=v", " =v", "a b=c", "a/b=c", "k:=v", "ü=1"])
def test_parse_metadata_bad_keys(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid metadata key"):
        parse_metadata(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        *((t, True) for t in ["1", "t", "T", "TRUE", "true", "True"]),
        *((t, False) for t in ["0", "f", "F", "FALSE", "false", "False"]),
    ],
)
def test_parse_bool(text: str, expected: bool) -> None:
    assert parse_bool(text) is expected


@pytest.mark.parametrize("text", ["yes", "no", "on", "TrUe", "2", " true", "y", ""])
def test_parse_bool_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid boolean"):
        parse_bool(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0), ("2", 2), ("-1", -1), ("+7", 7), ("0x10", 16), ("010", 8), ("0o10", 8),
     ("0b11", 3), ("1_000", 1000)],
)  # fmt: skip
def test_parse_int_go_syntax(text: str, expected: int) -> None:
    assert parse_int(text) == expected


@pytest.mark.parametrize("text", ["", " 1", "1 ", "1.5", "one", "08", "1__0", "\u0661", "9" * 30])
def test_parse_int_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_int(text)
