"""fleetctl's table output: Go text/tabwriter emulation, machine legends, field parsing."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fleetctl_harness import golden

from fleetctl.errors import CommandFailed
from fleetctl.output import (
    Field,
    machine_full_legend,
    machine_id_legend,
    machine_legend,
    parse_fields,
    render_json,
    render_table,
    tabwrite,
)
from fleetd.views import MachineView


@pytest.mark.parametrize(
    ("rows", "golden_file"),
    [
        (
            [
                ["UNIT", "HASH", "DSTATE", "STATE", "TARGET"],
                ["hello.service", "e55c0ae", "launched", "launched", "113f16a7.../172.17.8.103"],
            ],
            "list-unit-files.txt",
        ),
        (
            [
                ["UNIT", "MACHINE", "ACTIVE", "SUB"],
                ["hello.service", "113f16a7.../172.17.8.103", "active", "running"],
            ],
            "list-units.txt",
        ),
        (
            [
                ["MACHINE", "IP", "METADATA"],
                ["113f16a7...", "172.17.8.103", "az=us-west-1b,region=us-west"],
                ["e793afb9...", "-", "-"],
            ],
            "list-machines.txt",
        ),
    ],
)
def test_tabwrite_matches_fleet_bytes(rows: list[list[str]], golden_file: str) -> None:
    assert tabwrite(rows) == golden(golden_file)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([], ""),
        ([["only"]], "only\n"),  # the last cell of a line is never padded
        ([["a", "b"]], "a\tb\n"),  # width 1+1 rounds up to 8: one tab
        ([["1234567", "x"]], "1234567\tx\n"),  # 7+1 = 8 exactly: one tab
        ([["12345678", "x"]], "12345678\tx\n"),  # 8+1 rounds to 16: one tab gets there
        ([["a", "b"], ["abcdefghij", "c"]], "a\t\tb\nabcdefghij\tc\n"),
        ([["", "x"]], "\tx\n"),  # an empty cell is padded too
        ([["äöü", "x"]], "äöü\tx\n"),  # widths count characters, not bytes
    ],
)
def test_tabwrite_padding(rows: list[list[str]], expected: str) -> None:
    assert tabwrite(rows) == expected


def test_tabwrite_column_blocks_like_go() -> None:
    # Go aligns a column only across consecutive lines that have it: the short middle line
    # ends the first block, so the last line's column is sized on its own.
    rows = [["aaaaaaaaaaaa", "b", "c"], ["x"], ["y", "z"]]
    assert tabwrite(rows) == "aaaaaaaaaaaa\tb\tc\nx\ny\tz\n"


@pytest.mark.parametrize(
    ("machine_id", "ip", "full", "expected"),
    [
        ("113f16a7f2c54d35", "172.17.8.103", False, "113f16a7.../172.17.8.103"),
        ("113f16a7f2c54d35", "172.17.8.103", True, "113f16a7f2c54d35/172.17.8.103"),
        ("113f16a7f2c54d35", "", False, "113f16a7..."),
        ("abc", "", False, "abc..."),  # short ids keep the ellipsis (fleet's ShortID)
    ],
)
def test_machine_legends(machine_id: str, ip: str, full: bool, expected: str) -> None:
    assert machine_full_legend(machine_id, ip, full) == expected


def test_machine_legend_unknown_machine_shows_only_the_id() -> None:
    known = {"m1": MachineView("m1", "10.0.0.1")}
    assert machine_legend("m1", known, False) == "m1.../10.0.0.1"
    assert machine_legend("m2", known, False) == "m2..."
    assert machine_id_legend("0123456789", True) == "0123456789"


def test_parse_fields_messages() -> None:
    valid = {"unit": 1, "hash": 1}
    assert parse_fields("unit,hash", valid) == ["unit", "hash"]
    with pytest.raises(CommandFailed, match=r"^Must define output format$"):
        parse_fields("", valid)
    with pytest.raises(CommandFailed, match=r'^Invalid key in output format: "bogus"$'):
        parse_fields("unit,bogus", valid)


COLUMNS: dict[str, Field[dict[str, str], None]] = {
    "name": Field(lambda item, _: item["name"], lambda item, _: item["name"]),
    "ip": Field(lambda item, _: item["ip"], lambda item, _: item["ip"] or None),
}


def test_render_table_dash_for_empty_and_legend_switch() -> None:
    items = [{"name": "a", "ip": ""}]
    assert render_table(["name", "ip"], COLUMNS, items, None, legend=True) == "NAME\tIP\na\t-\n"
    assert render_table(["name", "ip"], COLUMNS, items, None, legend=False) == "a\t-\n"


def test_render_json_uses_null_for_absent() -> None:
    items = [{"name": "a", "ip": ""}]
    assert json.loads(render_json(["name", "ip"], COLUMNS, items, None)) == [
        {"name": "a", "ip": None}
    ]


# fleet never prints an empty cell (it shows "-"), so cells here are non-empty.
cells = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1)


@given(st.integers(1, 5).flatmap(lambda n: st.lists(st.lists(cells, min_size=n, max_size=n))))
def test_tabwrite_columns_line_up_on_a_terminal(rows: list[list[str]]) -> None:
    # Invariant: shown with 8-column tab stops, each column starts at the same position on
    # every row, at least one blank after the widest cell of the column before it.
    lines = tabwrite(rows).splitlines()
    assert len(lines) == len(rows)
    starts = [
        [len(line[: m.start()].expandtabs(8)) for m in re.finditer(r"[^\t]+", line)]
        for line in lines
    ]
    assert [
        [line[m.start() : m.end()] for m in re.finditer(r"[^\t]+", line)] for line in lines
    ] == rows
    for j in range(1, len(rows[0]) if rows else 0):
        column = {row_starts[j] for row_starts in starts}
        assert len(column) == 1
        widest = max(len(row[j - 1]) for row in rows)
        assert column.pop() >= starts[0][j - 1] + widest + 1
