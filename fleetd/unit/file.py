"""Unit files: `UnitFile` (options, fleet's serialization and HASH) and the parser, a faithful
port of the go-systemd `unit.Deserialize` fleet vendored (see `_Lexer`), quirks included, and
its `Serialize`. The HASH (sha1 of the serialized options) is a unit body's identity, so this
must agree with fleet byte for byte. Pure.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

from fleetd.errors import UnitFileError
from fleetd.unit.gotext import GO_SPACE_SET, go_trim, preview

#: go-systemd's SYSTEMD_LINE_MAX: systemd silently truncates longer lines, so fleet refuses them.
LINE_MAX = 2048
#: Beyond fleet: a unit body larger than this is refused before parsing (API bodies, etcd values).
MAX_UNIT_BYTES = 1 << 20
#: The section fleet reads scheduling requirements from (fleetd.unit.xfleet).
XFLEET_SECTION = "X-Fleet"


@dataclass(frozen=True, slots=True)
class UnitOption:
    """One `Name=Value` line of a unit file, with the section it belongs to."""

    section: str
    name: str
    value: str


@dataclass(frozen=True)
class UnitFile:
    """A unit file as an ordered list of options (go-systemd's []*UnitOption).

    The options, not the text, are the unit: comments, blank lines and whitespace around `=`
    are gone after parsing, and `serialize()` gives the canonical text whose sha1 is the HASH.
    """

    options: tuple[UnitOption, ...] = ()

    @staticmethod
    def from_options(options: Iterable[Mapping[str, Any]]) -> UnitFile:
        """Build a unit from API v1 options: `[{"section": s, "name": n, "value": v}, ...]`.

        Raises UnitFileError when an entry is not such a mapping of strings (bad API bodies
        must be a 4xx, not a crash).
        """
        return UnitFile(tuple(_api_option(index, entry) for index, entry in enumerate(options)))

    def to_options(self) -> list[dict[str, str]]:
        """The API v1 form of the options (inverse of `from_options`)."""
        return [{"section": o.section, "name": o.name, "value": o.value} for o in self.options]

    def serialize(self) -> str:
        """go-systemd Serialize: sections in first-seen order, repeated sections merged into the
        first, a blank line between sections and none after the last; no options gives ""."""
        return self._serialized

    @cached_property
    def _serialized(self) -> str:
        blocks: dict[str, list[str]] = {}
        for o in self.options:
            blocks.setdefault(o.section, [f"[{o.section}]\n"]).append(f"{o.name}={o.value}\n")
        return "\n".join("".join(lines) for lines in blocks.values())

    @cached_property
    def hash(self) -> str:
        """fleet's unit HASH: 40 lowercase hex chars of sha1(serialize())."""
        return hashlib.sha1(self.serialize().encode("utf-8")).hexdigest()

    @property
    def short_hash(self) -> str:
        """The 7-char form shown by `fleetctl list-unit-files` (unit.Hash.Short)."""
        return self.hash[:7]

    @property
    def contents(self) -> dict[str, dict[str, list[str]]]:
        """fleet's UnitFile.Contents: section -> name -> values, in file order.

        [X-Fleet] values are split with `parse_multivalue`, as fleet does; other sections keep
        each value whole. A fresh dict is returned on each call so callers cannot corrupt it.
        """
        contents: dict[str, dict[str, list[str]]] = {}
        for option in self.options:
            values = contents.setdefault(option.section, {}).setdefault(option.name, [])
            if option.section == XFLEET_SECTION:
                values.extend(parse_multivalue(option.value))
            else:
                values.append(option.value)
        return contents

    @property
    def description(self) -> str:
        """The first [Unit] Description, or "" (fleet's UnitFile.Description)."""
        for option in self.options:
            if option.section == "Unit" and option.name == "Description":
                return option.value
        return ""

    @property
    def has_install_section(self) -> bool:
        """True when an [Install] option exists: the agent must then also enable the unit.

        Like fleet (Contents["Install"]), an [Install] header without options does not count.
        """
        return any(option.section == "Install" for option in self.options)


def _api_option(index: int, entry: object) -> UnitOption:
    if not isinstance(entry, Mapping):
        raise UnitFileError(f"option {index}: expected an object, got {repr(entry)[:64]}")
    fields = []
    for key in ("section", "name", "value"):
        item = entry.get(key)
        if not isinstance(item, str):
            raise UnitFileError(f"option {index}: {key!r} must be a string, got {repr(item)[:64]}")
        if not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:  # JSON can carry lone surrogates ("\\udc80")
                raise UnitFileError(f"option {index}: {key!r} is not valid UTF-8") from None
        fields.append(item)
    return UnitOption(*fields)


# ---------------------------------------------------------------------------------------------
# Parser: a port of go-systemd unit.Deserialize (the version with SYSTEMD_LINE_MAX)
# ---------------------------------------------------------------------------------------------


class _Step(Protocol):
    def __call__(self) -> _Step | None: ...


_NEWLINES = re.compile(rb"[\r\n]")
_PRE_SECTION_SPECIAL = re.compile(rb"[\[#;\r\n]")
_ASCII_SPACE_RUN = re.compile(rb"[\t\n\v\f\r ]+")
_LONG_BLANK_LINE = re.compile(rb"[\t\v\f ]{%d}" % LINE_MAX)
_OPTION_NAME_END = re.compile(rb"[=\r\n]")


def _rune_at(data: bytes, pos: int) -> str:
    """Decode the UTF-8 rune at `pos` (input was validated, so this cannot fail)."""
    lead = data[pos]
    size = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return data[pos : pos + size].decode("utf-8")


class _Lexer:
    """go-systemd's lexer, step for step.

    go-systemd is a state machine of "lex steps"; before every step it refuses to go on if the
    next LINE_MAX bytes hold no newline. The steps are kept here with the same granularity
    (one rune outside options, one option name, one physical value line, one whole comment)
    because that granularity decides which long lines are errors. Go only checks when its
    4 KiB read buffer happens to hold LINE_MAX bytes; this port always checks, so it is
    deterministic and at least as strict.

    Quirks kept on purpose (they decide HASHes): text before the first section is skipped rune
    by rune, so a "[" anywhere in it opens a section; a value line ending in "\\" keeps the
    backslash and continues on the next line after a "\\n"; a "\\r\\n" line ending leaves the
    "\\r" in the line (it is then trimmed, but it stops a continuation).
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.options: list[UnitOption] = []
        self.section = ""
        self.pending_section = ""
        self.name = ""
        self.value = bytearray()
        self.after_comment: _Step = self.next_section
        self._newline_at = -1  # cached index of the first \r or \n at or after pos

    # -- driver ---------------------------------------------------------------------------

    def run(self) -> list[UnitOption]:
        step: _Step | None = self.next_section
        while step is not None:
            self.check_line_length()
            step = step()
        return self.options

    def fail(self, message: str, pos: int | None = None) -> UnitFileError:
        where = self.pos if pos is None else pos
        line = self.data.count(b"\n", 0, min(where, len(self.data))) + 1
        return UnitFileError(f"line {line}: {message}")

    def check_line_length(self) -> None:
        if len(self.data) - self.pos < LINE_MAX:
            return
        if self._newline_at < self.pos:
            found = _NEWLINES.search(self.data, self.pos)
            self._newline_at = found.start() if found else len(self.data)
        if self._newline_at - self.pos >= LINE_MAX:
            raise self.fail(f"line too long (max {LINE_MAX} bytes)")

    def to_eol(self) -> tuple[bytes, bool]:
        """Read to the end of the line: (line without "\\n" and then "\\r", at end of file)."""
        end = self.data.find(b"\n", self.pos)
        if end == -1:
            line, self.pos, eof = self.data[self.pos :], len(self.data), True
        else:
            line, self.pos, eof = self.data[self.pos : end + 1], end + 1, False
        # Go trims "\r" first and "\n" second, so "a\r\n" leaves "a\r": keep that order.
        return line.removesuffix(b"\r").removesuffix(b"\n"), eof

    # -- steps ----------------------------------------------------------------------------

    def next_section(self) -> _Step | None:
        """Before the first section: skip everything but "[" and comments."""
        if self.pos >= len(self.data):
            return None
        byte = self.data[self.pos : self.pos + 1]
        if byte == b"[":
            self.pos += 1
            return self.section_name
        if byte in (b"#", b";"):
            self.pos += 1
            self.after_comment = self.next_section
            return self.ignore_line
        if byte in (b"\r", b"\n"):
            self.pos += 1
        else:
            # A run of ordinary runes: Go steps through them one by one, but on one line the
            # length check can only fail at the first of them, so skip the run at once.
            found = _PRE_SECTION_SPECIAL.search(self.data, self.pos)
            self.pos = found.start() if found else len(self.data)
        return self.next_section

    def section_name(self) -> _Step | None:
        end = self.data.find(b"]", self.pos)
        if end == -1:
            raise self.fail("unable to find end of section")
        raw = self.data[self.pos : end]
        if b"\n" in raw or b"\r" in raw:
            # Beyond fleet: go-systemd would accept "[a\nb]" as a section named "a\nb".
            raise self.fail("unexpected newline encountered while parsing section name")
        self.pending_section = raw.decode("utf-8")
        self.pos = end + 1
        return self.section_suffix

    def section_suffix(self) -> _Step | None:
        start = self.pos
        garbage, _ = self.to_eol()
        text = go_trim(garbage.decode("utf-8"))
        if text:
            raise self.fail(
                f"found garbage after section name [{self.pending_section}]: {preview(text)}",
                start,
            )
        self.section = self.pending_section
        return self.section_or_option

    def ignore_line(self) -> _Step | None:
        """A comment: skip it, and the following lines while it ends in "\\" (or "\\ ")."""
        while True:
            line, _ = self.to_eol()
            if not line.removesuffix(b" ").endswith(b"\\"):
                return self.after_comment

    def section_or_option(self) -> _Step | None:
        if self.pos >= len(self.data):
            return None
        rune = _rune_at(self.data, self.pos)
        if rune in GO_SPACE_SET:
            self.skip_spaces(rune)
            return self.section_or_option
        if rune == "[":
            self.pos += 1
            return self.section_name
        if rune in ("#", ";"):
            self.pos += 1
            self.after_comment = self.section_or_option
            return self.ignore_line
        return self.option_name

    def skip_spaces(self, rune: str) -> None:
        """Skip whitespace between options, checking line lengths as Go's rune steps would.

        Go takes one step (and one length check) per rune. A check at a newline always passes,
        and on one line the first blank dominates the ones after it, so a run of ASCII
        whitespace costs one regex search instead of a step per byte: lines wholly inside the
        run fail only if they hold LINE_MAX blanks, and the run's last line is left to the
        next step, whose check stands for all of it.
        """
        run = _ASCII_SPACE_RUN.match(self.data, self.pos)
        if run is None:  # a non-ASCII space: one rune, one step
            self.pos += len(rune.encode("utf-8"))
            return
        last_break = max(
            self.data.rfind(b"\n", self.pos, run.end()), self.data.rfind(b"\r", self.pos, run.end())
        )
        if last_break == -1:
            self.pos = run.end()
            return
        blanks = _LONG_BLANK_LINE.search(self.data, self.pos, last_break)
        if blanks is not None:
            raise self.fail(f"line too long (max {LINE_MAX} bytes)", blanks.start())
        self.pos = last_break + 1

    def option_name(self) -> _Step | None:
        found = _OPTION_NAME_END.search(self.data, self.pos)
        if found is None:
            raw = self.data[self.pos :].decode("utf-8")
            raise self.fail(f"unexpected end of file while parsing option name {preview(raw)}")
        if found.group() != b"=":
            raise self.fail("unexpected newline encountered while parsing option name")
        self.name = go_trim(self.data[self.pos : found.start()].decode("utf-8"))
        self.value = bytearray()
        self.pos = found.end()
        return self.option_value

    def option_value(self) -> _Step | None:
        """One physical line of a value; a trailing "\\" asks for the next line as well."""
        line, eof = self.to_eol()
        if go_trim(line.decode("utf-8")):
            self.value += line
            if line.endswith(b"\\"):
                if not eof:
                    self.value += b"\n"
                return self.option_value
        value = self.value.decode("utf-8")
        # A continuation followed by a blank line leaves a final "\n", which go-systemd keeps.
        value = go_trim(value) + "\n" if value.endswith("\n") else go_trim(value)
        self.options.append(UnitOption(self.section, self.name, value))
        return self.section_or_option


def parse_unit_bytes(data: bytes, *, max_bytes: int = MAX_UNIT_BYTES) -> UnitFile:
    """Parse a unit file given as bytes (a file, an etcd value, an HTTP body).

    Beyond fleet: bodies larger than `max_bytes` and invalid UTF-8 are refused, so every unit
    can be shown, stored as JSON and hashed the same way everywhere.
    """
    if len(data) > max_bytes:
        raise UnitFileError(f"unit file too large: {len(data)} bytes (max {max_bytes})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UnitFileError(
            f"line {line}: unit file is not valid UTF-8 (byte offset {err.start})"
        ) from None
    serialized = _parse_serialized(text)
    if serialized is not None:
        return serialized
    return UnitFile(tuple(_Lexer(data).run()))


def _parse_serialized(text: str) -> UnitFile | None:
    """`text` split without the lexer, if it is exactly what `UnitFile.serialize` writes;
    None for anything else, which the lexer then reads.

    Every body in etcd is a serialization (clients store `serialize()`), and the lexer costs
    about 15 us a body: 0.14 s of a 10,000-unit `list-unit-files`, and a share of every agent's
    and the engine's work. Why the answer is the lexer's: the split refuses what would make
    the lexer read a line differently (a backslash ending a line, which continues it; "\r";
    names or values with surrounding whitespace; lines starting a comment; lines near
    LINE_MAX), and keeps its result only if it serializes back to `text` byte for byte, so
    `text` is `serialize(options)`; for such options the lexer gives back `options`
    (test_prop_serialization_only_regroups, and test_prop_serialized_split_agrees_with_lexer
    compares the two directly).
    """
    if "\r" in text:
        return None
    options: list[UnitOption] = []
    section: str | None = None
    for line in text.split("\n"):
        if not line:
            continue
        if line[-1] == "\\":
            return None
        if len(line) * 4 >= LINE_MAX and len(line.encode("utf-8")) >= LINE_MAX:
            return None
        if line[0] == "[":
            name = line[1:-1]
            if line[-1] != "]" or "]" in name:
                return None
            section = name
            continue
        name, equals, value = line.partition("=")
        if (
            section is None
            or not equals
            or name[:1] in ("#", ";")
            or go_trim(name) != name
            or go_trim(value) != value
        ):
            return None
        options.append(UnitOption(section, name, value))
    unit = UnitFile(tuple(options))
    return unit if unit.serialize() == text else None


def parse_unit(text: str, *, max_bytes: int = MAX_UNIT_BYTES) -> UnitFile:
    """Parse unit file text with go-systemd Deserialize semantics; see `_Lexer`.

    All errors are UnitFileError with a line number.
    """
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UnitFileError(
            f"unit file is not valid UTF-8 (unencodable character at offset {err.start})"
        ) from None
    return parse_unit_bytes(data, max_bytes=max_bytes)


def parse_multivalue(value: str) -> list[str]:
    """fleet's parseMultivalueLine for [X-Fleet] values.

    Only a value that starts and ends with '"' is split, on spaces outside quotes, with the
    quotes dropped: '"a=b" "c=d"' -> ["a=b", "c=d"]. Anything else is one value, unchanged.
    Backslashes are not escapes ('"foo\\"bar"' -> ['foo\\bar']), as in fleet.
    """
    if not (value.startswith('"') and value.endswith('"')):
        return [value]
    values: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        elif char == " " and not quoted:
            values.append("".join(current))
            current = []
        else:
            current.append(char)
    values.append("".join(current))
    return values
