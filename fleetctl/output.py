"""Table and JSON output, byte-for-byte with fleet where scripts read it.

fleet prints tables through Go's text/tabwriter configured as (minwidth 0, tabwidth 8,
padding 1, padchar TAB, flags 0) (reference §1.7). `tabwrite` is a port of that algorithm,
column blocks included, so columns line up exactly as fleet's do and `cut -f`/`awk -F'\\t'`
pipelines keep working.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fleetctl.errors import CommandFailed
from fleetd.views import MachineView

TAB_WIDTH = 8
PADDING = 1

# ---- Go text/tabwriter ---------------------------------------------------------------------


def _padding(text_width: int, cell_width: int) -> str:
    """tabwriter.writePadding with padchar '\\t': tabs up to the cell width rounded up to 8."""
    cell_width = (cell_width + TAB_WIDTH - 1) // TAB_WIDTH * TAB_WIDTH
    return "\t" * ((cell_width - text_width + TAB_WIDTH - 1) // TAB_WIDTH)


def tabwrite(rows: Sequence[Sequence[str]]) -> str:
    """Render rows as fleet's tabwriter does; each row ends with a newline.

    A cell is terminated by a tab except the last of its row, which is never padded. Column
    widths are computed per *column block* (consecutive rows that have that column), as Go
    does; with rows of equal length that is simply the whole table.
    """
    lines = [list(row) for row in rows]
    out: list[str] = []

    def write_lines(start: int, end: int, widths: list[int]) -> None:
        for line in lines[start:end]:
            parts = []
            for j, cell in enumerate(line):
                parts.append(cell)
                if j < len(widths):
                    parts.append(_padding(len(cell), widths[j]))
            out.append("".join(parts) + "\n")

    def format_block(start: int, end: int, widths: list[int]) -> None:
        column = len(widths)
        this = start
        while this < end:
            if column >= len(lines[this]) - 1:
                this += 1
                continue
            write_lines(start, this, widths)
            start = this
            width = 0
            while this < end and column < len(lines[this]) - 1:
                width = max(width, len(lines[this][column]) + PADDING)
                this += 1
            format_block(start, this, [*widths, width])
            start = this
        write_lines(start, end, widths)

    format_block(0, len(lines), [])
    return "".join(out)


# ---- machine legends (fleetctl machineIDLegend / machineFullLegend) -----------------------


def machine_id_legend(machine_id: str, full: bool) -> str:
    """The full id with --full, else the first 8 chars and "..." (even for short ids)."""
    return machine_id if full else f"{machine_id[:8]}..."


def machine_full_legend(machine_id: str, ip: str, full: bool) -> str:
    legend = machine_id_legend(machine_id, full)
    return f"{legend}/{ip}" if ip else legend


def machine_legend(machine_id: str, machines: Mapping[str, MachineView], full: bool) -> str:
    """The legend of a machine by id: with its IP when the machine is known."""
    known = machines.get(machine_id)
    return machine_full_legend(machine_id, known.primary_ip if known else "", full)


# ---- field-driven tables -------------------------------------------------------------------

T = TypeVar("T")
C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class Field(Generic[T, C]):
    """One `--fields` column: how to show an item in the table and in JSON.

    `C` is the command's rendering context (machines, --full, ...).
    """

    text: Callable[[T, C], str]
    json: Callable[[T, C], Any]


def parse_fields(spec: str, valid: Mapping[str, object]) -> list[str]:
    """Split `--fields`; fleet's messages for an empty spec and for an unknown key."""
    if not spec:
        raise CommandFailed("Must define output format")
    fields = spec.split(",")
    for key in fields:
        if key not in valid:
            raise CommandFailed(f'Invalid key in output format: "{key}"')
    return fields


def render_table(
    fields: Sequence[str],
    columns: Mapping[str, Field[T, C]],
    items: Sequence[T],
    context: C,
    *,
    legend: bool,
) -> str:
    rows: list[list[str]] = [[f.upper() for f in fields]] if legend else []
    for item in items:
        # fleet shows an empty value as "-" so every row has every column.
        rows.append([columns[f].text(item, context) or "-" for f in fields])
    return tabwrite(rows)


def render_json(
    fields: Sequence[str], columns: Mapping[str, Field[T, C]], items: Sequence[T], context: C
) -> str:
    """A JSON array of objects keyed by field name, values unabbreviated, null when absent."""
    objects = [{f: columns[f].json(item, context) for f in fields} for item in items]
    return json.dumps(objects, indent=2) + "\n"
