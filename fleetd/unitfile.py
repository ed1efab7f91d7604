"""Unit files as fleet sees them: parse, serialize, HASH, names, [X-Fleet] requirements, globs.

Pure code, no I/O. Everything here must agree with CoreOS fleet byte for byte where users or
scripts can see it, because the unit HASH (sha1 of the serialized options) is the identity of a
unit body: it is shown in `list-unit-files`, compared by `--replace`, and used as the
content-addressed etcd key of the body. A one-byte difference in parsing or serialization would
make every existing unit look changed. So the parser is a faithful port of the go-systemd
`unit.Deserialize` fleet vendored (see `_Lexer`), including its quirks, and the serializer is
go-systemd's `Serialize`.

Where this module goes beyond fleet, it says so in a comment (hardening of names, a body size
limit, the strict round-trip check in `validate_options`, the `PartitionPolicy` option).
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, Protocol

from fleetd.errors import InvalidUnitName, UnitFileError
from fleetd.model import PartitionPolicy, Requirements

__all__ = [
    "LINE_MAX",
    "MAX_UNIT_BYTES",
    "RECOGNIZED_UNIT_TYPES",
    "TEMPLATE_UNIT_TYPES",
    "UNIT_NAME_MAX",
    "VALID_UNIT_TYPES",
    "XFLEET_SECTION",
    "UnitFile",
    "UnitNameInfo",
    "UnitOption",
    "UnknownXFleetOption",
    "check_requirements",
    "glob_match",
    "is_recognized_type",
    "make_instance_name",
    "mangle_name",
    "maybe_append_default_type",
    "parse_multivalue",
    "parse_unit",
    "parse_unit_bytes",
    "requirements",
    "unknown_xfleet_keys",
    "validate_name",
    "validate_options",
]

# ---------------------------------------------------------------------------------------------
# Limits and vocabularies
# ---------------------------------------------------------------------------------------------

#: go-systemd's SYSTEMD_LINE_MAX: systemd silently truncates longer lines, so fleet refuses them.
LINE_MAX = 2048
#: Beyond fleet: a unit body larger than this is refused before parsing (API bodies, etcd values).
MAX_UNIT_BYTES = 1 << 20
#: The longest unit name, in bytes. systemd refuses a name of UNIT_NAME_MAX (256) or more and
#: the unit is a file in the agent's units directory (NAME_MAX 255), so 255. Beyond fleet:
#: its api.unitNameMax let a 256-byte name in, which no machine could then run. The agent's
#: own check (fleetd.systemd.manager) imports this constant.
UNIT_NAME_MAX = 255

#: Types the API accepts (fleet api/units.go validUnitTypes).
VALID_UNIT_TYPES = frozenset(
    {
        "automount",
        "busname",
        "device",
        "mount",
        "path",
        "scope",
        "service",
        "slice",
        "snapshot",
        "socket",
        "swap",
        "target",
        "timer",
    }
)
#: Types allowed for a name containing "@" (templates and instances).
TEMPLATE_UNIT_TYPES = frozenset({"path", "service", "socket", "target", "timer"})
#: fleet's unit.RecognizedUnitType: a subset of the valid types, in fleet's order. fleetctl
#: appends ".service" to anything else (so "foo.target" becomes "foo.target.service").
RECOGNIZED_UNIT_TYPES = ("service", "socket", "timer", "path", "device", "mount", "automount")

_VALID_NAME_CHARS = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" + ":-_.\\@"
)

XFLEET_SECTION = "X-Fleet"

# [X-Fleet] keys (fleet job/job.go). Deprecated aliases are still honoured, as in fleet.
_MACHINE_ID_KEYS = ("MachineID", "X-ConditionMachineID", "X-ConditionMachineBootID")
_MACHINE_OF_KEYS = ("X-ConditionMachineOf", "MachineOf")
_METADATA_KEYS = ("X-ConditionMachineMetadata", "MachineMetadata")
_CONFLICTS_KEYS = ("X-Conflicts", "Conflicts")
_GLOBAL_KEY = "Global"
_REPLACES_KEY = "Replaces"
_PARTITION_POLICY_KEY = "PartitionPolicy"  # beyond fleet
_KNOWN_XFLEET_KEYS = frozenset(
    {
        *_MACHINE_ID_KEYS,
        *_MACHINE_OF_KEYS,
        *_METADATA_KEYS,
        *_CONFLICTS_KEYS,
        _GLOBAL_KEY,
        _REPLACES_KEY,
        _PARTITION_POLICY_KEY,
    }
)
_TRUTHY = frozenset({"true", "yes", "1", "on", "t"})
_FALSY = frozenset({"false", "no", "0", "off", "f"})

# Go's unicode.IsSpace set. strings.TrimSpace / strings.Fields in fleet use it; Python's
# str.isspace differs (it also counts \x1c-\x1f), so it cannot be used for byte-exact trimming.
_GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_GO_SPACE_SET = frozenset(_GO_SPACE)
_GO_FIELDS_SPLIT = re.compile("[" + re.escape(_GO_SPACE) + "]+")


def _go_trim(text: str) -> str:
    """strings.TrimSpace."""
    return text.strip(_GO_SPACE)


def _go_fields(text: str) -> list[str]:
    """strings.Fields: split on runs of Go whitespace, dropping empty fields."""
    return [field for field in _GO_FIELDS_SPLIT.split(text) if field]


# ---------------------------------------------------------------------------------------------
# Go-compatible quoting, so error messages read exactly like fleet's (%q)
# ---------------------------------------------------------------------------------------------

_GO_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
}


def _go_escape_char(ch: str, quote: str) -> str:
    if ch in (quote, "\\"):
        return "\\" + ch
    if ch.isprintable():  # same classes as Go's unicode.IsPrint: L, M, N, P, S and ' '
        return ch
    if ch in _GO_ESCAPES:
        return _GO_ESCAPES[ch]
    code = ord(ch)
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02x}"
    if 0xD800 <= code <= 0xDFFF:  # Go cannot hold a lone surrogate: it becomes U+FFFD
        return "\\ufffd"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _go_quote(text: str) -> str:
    """strconv.Quote (Go's %q for a string)."""
    return '"' + "".join(_go_escape_char(ch, '"') for ch in text) + '"'


def _preview(text: str, limit: int = 64) -> str:
    """A quoted, shortened piece of input for an error message."""
    return _go_quote(text[:limit]) + ("..." if len(text) > limit else "")


def _go_quote_rune(ch: str) -> str:
    """strconv.QuoteRune (Go's %q for a rune)."""
    return "'" + _go_escape_char(ch, "'") + "'"


# ---------------------------------------------------------------------------------------------
# Options and unit files
# ---------------------------------------------------------------------------------------------


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
        text = _go_trim(garbage.decode("utf-8"))
        if text:
            raise self.fail(
                f"found garbage after section name [{self.pending_section}]: {_preview(text)}",
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
        if rune in _GO_SPACE_SET:
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
            raise self.fail(f"unexpected end of file while parsing option name {_preview(raw)}")
        if found.group() != b"=":
            raise self.fail("unexpected newline encountered while parsing option name")
        self.name = _go_trim(self.data[self.pos : found.start()].decode("utf-8"))
        self.value = bytearray()
        self.pos = found.end()
        return self.option_value

    def option_value(self) -> _Step | None:
        """One physical line of a value; a trailing "\\" asks for the next line as well."""
        line, eof = self.to_eol()
        if _go_trim(line.decode("utf-8")):
            self.value += line
            if line.endswith(b"\\"):
                if not eof:
                    self.value += b"\n"
                return self.option_value
        value = self.value.decode("utf-8")
        # A continuation followed by a blank line leaves a final "\n", which go-systemd keeps.
        value = _go_trim(value) + "\n" if value.endswith("\n") else _go_trim(value)
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
            or _go_trim(name) != name
            or _go_trim(value) != value
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


# ---------------------------------------------------------------------------------------------
# Unit names
# ---------------------------------------------------------------------------------------------


def validate_name(name: str) -> None:
    """fleet's api.ValidateName, same checks in the same order and the same messages.

    Raises InvalidUnitName describing the first problem. fleet's character check already keeps
    "/", NUL and control characters out. Beyond fleet, names starting with "." (hidden files,
    or nothing before the type) and names containing ".." are refused too, after fleet's checks
    so fleet's messages win where both apply.
    """
    length = len(name.encode("utf-8", "surrogatepass"))  # Go counts bytes
    if length == 0:
        raise InvalidUnitName("unit name cannot be empty")
    if length > UNIT_NAME_MAX:
        raise InvalidUnitName(f"unit name exceeds maximum length ({UNIT_NAME_MAX})")
    dot = name.rfind(".")
    if dot == -1:
        raise InvalidUnitName('unit name must contain "."')
    if dot == len(name) - 1:
        raise InvalidUnitName('unit name cannot end in "."')
    suffix = name[dot + 1 :]
    if suffix not in VALID_UNIT_TYPES:
        raise InvalidUnitName(f"invalid unit type: {_go_quote(suffix)}")
    if "@" in name and suffix not in TEMPLATE_UNIT_TYPES:
        raise InvalidUnitName(f"invalid unit type for template: {_go_quote(suffix)}")
    for char in name[:dot]:
        if char not in _VALID_NAME_CHARS:
            raise InvalidUnitName(f"invalid character {_go_quote_rune(char)} in unit name")
    if name.startswith("@"):
        raise InvalidUnitName('unit name cannot start in "@"')
    if name.startswith("."):
        raise InvalidUnitName('unit name cannot start in "."')
    if ".." in name:
        raise InvalidUnitName('unit name cannot contain ".."')


@dataclass(frozen=True, slots=True)
class UnitNameInfo:
    """The anatomy of a unit name (fleet's unit.UnitNameInfo).

    foo@bar.service: name "foo@bar", prefix "foo", template "foo@.service", instance "bar".
    """

    full_name: str
    name: str  # everything before the last "."
    prefix: str  # everything before the first "@" (the whole name without one)
    template: str = ""  # "<prefix>@.<type>" when the name has an "@"
    instance: str = ""  # between the first "@" and the last "."

    @staticmethod
    def parse(unit_name: str) -> UnitNameInfo | None:
        """fleet's NewUnitNameInfo: None when the name has no "." at all."""
        dot = unit_name.rfind(".")
        if dot == -1:
            return None
        name, suffix = unit_name[:dot], unit_name[dot:]
        at = name.find("@")
        if at == -1:
            return UnitNameInfo(unit_name, name, name)
        prefix = name[:at]
        return UnitNameInfo(unit_name, name, prefix, f"{prefix}@{suffix}", name[at + 1 :])

    @property
    def is_instance(self) -> bool:
        return bool(self.instance)

    @property
    def is_template(self) -> bool:
        return bool(self.template) and not self.is_instance


def make_instance_name(template: str, instance: str) -> str:
    """Name an instance of a template: "foo@.service" + "bar" -> "foo@bar.service"."""
    info = UnitNameInfo.parse(template)
    if info is None or not info.is_template:
        raise InvalidUnitName(f"{_go_quote(template)} is not a template unit name")
    return f"{info.name}{instance}{template[len(info.name) :]}"


def is_recognized_type(name: str) -> bool:
    """fleet's unit.RecognizedUnitType: does the name end in a type fleetctl knows?"""
    return any(name.endswith("." + unit_type) for unit_type in RECOGNIZED_UNIT_TYPES)


def maybe_append_default_type(arg: str) -> str:
    """fleetctl's maybeAppendDefaultUnitType: add ".service" unless the type is recognized.

    The path, if any, is kept (this is the name of the local file fleetctl looks for).
    """
    return arg if is_recognized_type(arg) else arg + ".service"


def _go_path_base(path: str) -> str:
    """Go's path.Base."""
    if path == "":
        return "."
    path = path.rstrip("/")
    if path == "":
        return "/"
    return path[path.rfind("/") + 1 :]


def mangle_name(arg: str) -> str:
    """fleetctl's unitNameMangle: the file name of `arg`, with ".service" unless recognized.

    "foo" -> "foo.service", "foo.1" -> "foo.1.service", "foo/bar.socket" -> "bar.socket",
    "foo.target" -> "foo.target.service" (target is valid but not recognized, as in fleet).
    """
    return maybe_append_default_type(_go_path_base(arg))


# ---------------------------------------------------------------------------------------------
# [X-Fleet]
# ---------------------------------------------------------------------------------------------


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
    return _unique(f for v in _collect(values, _CONFLICTS_KEYS) for f in _go_fields(v))


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
                f"invalid value {_go_quote(value)} for {_PARTITION_POLICY_KEY} in [X-Fleet]"
                ' section: must be "keep" or "stop"'
            ) from None
    return policy


def requirements(unit: UnitFile, unit_name: str) -> Requirements:
    """The scheduling requirements of `unit` submitted as `unit_name`, specifiers expanded.

    Raises UnitFileError only for an invalid PartitionPolicy (fleet's own options never fail:
    malformed ones are ignored, as fleet does). Lenient on purpose: this reads stored bodies,
    which may predate the input checks of `check_requirements`.
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
        _path_match(pattern.encode("utf-8", "surrogatepass"), b"")
    except _BadPattern:
        return True
    return False


def _metadata_problem(value: str) -> str:
    parts = value.split("=")
    if len(parts) == 2 and parts[0] and parts[1]:
        return ""
    problem = 'expected one key=value pair (a single "=", both sides non-empty)'
    if len(parts) > 2 and any(ch in _GO_SPACE_SET for ch in value):
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
        for pattern in _go_fields(value):
            if _is_bad_pattern(pattern):
                return f"malformed glob pattern {_go_quote(pattern)}"
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
                f"unknown option {_go_quote(key)} in [X-Fleet] section{_suggestion(key)}", key
            )
    raw = unit.contents.get(XFLEET_SECTION, {})
    info = UnitNameInfo.parse(unit_name)
    expanded = _xfleet(unit, None if info is not None and info.is_template else unit_name)
    for key, values in expanded.items():
        for written, value in zip(raw[key], values, strict=True):
            problem = _value_problem(key, value, unit_name)
            if problem:
                shown = _go_quote(written)
                if written != value:
                    shown += f" (expanded: {_go_quote(value)})"
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
                f"option [{option.section}] {_preview(option.name)}={_preview(option.value)}"
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
                    f"peer {_go_quote(peer)} matches conflict {_go_quote(conflict)}"
                )
        for replace in replaces:
            if glob_match(replace, peer):
                raise UnitFileError(
                    "unresolvable requirements: "
                    f"peer {_go_quote(peer)} matches replace {_go_quote(replace)}"
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


# ---------------------------------------------------------------------------------------------
# Globs: Go's path.Match, on UTF-8 bytes like Go
# ---------------------------------------------------------------------------------------------


class _BadPattern(Exception):
    """path.ErrBadPattern."""


_RUNE_ERROR = 0xFFFD
_GLOB_SPECIALS = frozenset("*?[\\")


def _decode_rune(data: bytes) -> tuple[int, int]:
    """utf8.DecodeRune: (rune, size); (RuneError, 1) for an invalid byte, (RuneError, 0) at end."""
    if not data:
        return _RUNE_ERROR, 0
    lead = data[0]
    if lead < 0x80:
        return lead, 1
    size = 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if lead <= 0xF4 else 0
    if size == 0 or len(data) < size:
        return _RUNE_ERROR, 1
    try:
        return ord(data[:size].decode("utf-8")), size
    except UnicodeDecodeError:
        return _RUNE_ERROR, 1


def _scan_chunk(pattern: bytes) -> tuple[bool, bytes, bytes]:
    """Split off leading stars and the chunk up to the next star outside a class."""
    stripped = pattern.lstrip(b"*")
    star = len(stripped) != len(pattern)
    in_range = False
    i = 0
    while i < len(stripped):
        char = stripped[i : i + 1]
        if char == b"\\":
            if i + 1 < len(stripped):
                i += 1
        elif char == b"[":
            in_range = True
        elif char == b"]":
            in_range = False
        elif char == b"*" and not in_range:
            break
        i += 1
    return star, stripped[:i], stripped[i:]


def _get_esc(chunk: bytes) -> tuple[int, bytes]:
    """One possibly escaped rune of a character class."""
    if not chunk or chunk[:1] in (b"-", b"]"):
        raise _BadPattern
    if chunk[:1] == b"\\":
        chunk = chunk[1:]
        if not chunk:
            raise _BadPattern
    rune, size = _decode_rune(chunk)
    if rune == _RUNE_ERROR and size == 1:
        raise _BadPattern
    rest = chunk[size:]
    if not rest:
        raise _BadPattern
    return rune, rest


def _match_class(chunk: bytes, rune: int) -> tuple[bool, bytes]:
    """A "[...]" class (chunk starts after "["): (rune matched, rest of chunk)."""
    negated = chunk[:1] == b"^"
    if negated:
        chunk = chunk[1:]
    matched = False
    ranges = 0
    while True:
        if chunk[:1] == b"]" and ranges > 0:
            return matched != negated, chunk[1:]
        low, chunk = _get_esc(chunk)
        high = low
        if chunk[:1] == b"-":
            high, chunk = _get_esc(chunk[1:])
        matched = matched or low <= rune <= high
        ranges += 1


def _match_chunk(chunk: bytes, name: bytes) -> bytes | None:
    """Match a star-free chunk at the start of name: the rest of name, or None.

    Like Go, it keeps scanning the chunk after a mismatch so malformed patterns are reported.
    """
    failed = False
    while chunk:
        failed = failed or not name
        head = chunk[:1]
        if head == b"[":
            rune = 0
            if not failed:
                rune, size = _decode_rune(name)
                name = name[size:]
            ok, chunk = _match_class(chunk[1:], rune)
            failed = failed or not ok
        elif head == b"?":
            if not failed:
                failed = name[:1] == b"/"
                name = name[max(_decode_rune(name)[1], 1) :]
            chunk = chunk[1:]
        else:
            if head == b"\\":
                chunk = chunk[1:]
                if not chunk:
                    raise _BadPattern
            if not failed:
                failed = chunk[:1] != name[:1]
                name = name[1:]
            chunk = chunk[1:]
    return None if failed else name


def _path_match(pattern: bytes, name: bytes) -> bool:
    """Go's path.Match, raising _BadPattern like Go returns ErrBadPattern."""
    while pattern:
        star, chunk, pattern = _scan_chunk(pattern)
        if star and not chunk:
            return b"/" not in name  # a trailing * matches the rest unless it has a /
        rest = _match_chunk(chunk, name)
        if rest is not None and (not rest or pattern):
            name = rest
            continue
        skipped = _skip_to_match(chunk, pattern, name) if star else None
        if skipped is not None:
            name = skipped
            continue
        _check_rest(pattern)
        return False
    return not name


def _skip_to_match(chunk: bytes, pattern: bytes, name: bytes) -> bytes | None:
    """Let the star eat 1.. bytes (never a "/") until chunk matches; the rest of name."""
    i = 0
    while i < len(name) and name[i : i + 1] != b"/":
        rest = _match_chunk(chunk, name[i + 1 :])
        if rest is not None and not (not pattern and rest):
            return rest
        i += 1
    return None


def _check_rest(pattern: bytes) -> None:
    """Before answering "no match", Go checks the rest of the pattern is well formed."""
    while pattern:
        _, chunk, pattern = _scan_chunk(pattern)
        _match_chunk(chunk, b"")


def _class_char(pattern: str, i: int) -> tuple[str, int]:
    """Go's getEsc on an ASCII pattern: one possibly escaped class character."""
    if i >= len(pattern) or pattern[i] in "-]":
        raise _BadPattern
    if pattern[i] == "\\":
        i += 1
        if i >= len(pattern):
            raise _BadPattern
    if i + 1 >= len(pattern):  # a class must still be closed
        raise _BadPattern
    return pattern[i], i + 1


def _class_regex(pattern: str, i: int) -> tuple[str, int]:
    """Translate the class whose "[" is just before `i`: (regex, index after its "]")."""
    negated = pattern[i : i + 1] == "^"
    i += negated
    ranges: list[str] = []
    count = 0
    while not (pattern[i : i + 1] == "]" and count > 0):
        low, i = _class_char(pattern, i)
        high = low
        if pattern[i] == "-":
            high, i = _class_char(pattern, i + 1)
        if low <= high:  # Go accepts an empty range; it just never matches
            ranges.append(f"{re.escape(low)}-{re.escape(high)}")
        count += 1
    if not ranges:
        return ("[\\s\\S]" if negated else "(?!)"), i + 1
    return f"[{'^' if negated else ''}{''.join(ranges)}]", i + 1


@lru_cache(maxsize=4096)
def _glob_regex(pattern: str) -> re.Pattern[str] | None:
    """An ASCII pattern as an equivalent regex, or None when Go would say ErrBadPattern."""
    parts: list[str] = []
    i = 0
    try:
        while i < len(pattern):
            char = pattern[i]
            i += 1
            if char == "*":
                parts.append("[^/]*")
            elif char == "?":
                parts.append("[^/]")
            elif char == "[":
                regex, i = _class_regex(pattern, i)
                parts.append(regex)
            else:
                if char == "\\":
                    if i >= len(pattern):
                        raise _BadPattern
                    char, i = pattern[i], i + 1
                parts.append(re.escape(char))
    except _BadPattern:
        return None
    return re.compile("".join(parts))


def glob_match(pattern: str, name: str) -> bool:
    """Go's path.Match(pattern, name), with a malformed pattern matching nothing (as fleet).

    `*` matches any run of non-"/" characters, `?` one non-"/" character, `[...]` / `[^...]`
    a class with ranges, and `\\` escapes the next character.

    The scheduler calls this in its inner loops, so ASCII input (every valid unit name) goes
    through a cached regex translation; anything else through a byte-level port of Go's code,
    which is exact where Go's byte-wise `*` can stop inside a multi-byte character.
    """
    if _GLOB_SPECIALS.isdisjoint(pattern):  # the common case: a plain unit name
        return pattern == name
    if pattern.isascii() and name.isascii():
        regex = _glob_regex(pattern)
        return regex is not None and regex.fullmatch(name) is not None
    try:
        return _path_match(
            pattern.encode("utf-8", "surrogatepass"), name.encode("utf-8", "surrogatepass")
        )
    except _BadPattern:
        return False
