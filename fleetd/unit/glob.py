"""Globs as fleet matches them: Go's path.Match, on UTF-8 bytes like Go, with a cached regex
translation for ASCII input (the scheduler's inner loops). Pure.
"""

from __future__ import annotations

import re
from functools import lru_cache


class BadPattern(Exception):
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
        raise BadPattern
    if chunk[:1] == b"\\":
        chunk = chunk[1:]
        if not chunk:
            raise BadPattern
    rune, size = _decode_rune(chunk)
    if rune == _RUNE_ERROR and size == 1:
        raise BadPattern
    rest = chunk[size:]
    if not rest:
        raise BadPattern
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
                    raise BadPattern
            if not failed:
                failed = chunk[:1] != name[:1]
                name = name[1:]
            chunk = chunk[1:]
    return None if failed else name


def path_match(pattern: bytes, name: bytes) -> bool:
    """Go's path.Match, raising BadPattern like Go returns ErrBadPattern."""
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
        raise BadPattern
    if pattern[i] == "\\":
        i += 1
        if i >= len(pattern):
            raise BadPattern
    if i + 1 >= len(pattern):  # a class must still be closed
        raise BadPattern
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
                        raise BadPattern
                    char, i = pattern[i], i + 1
                parts.append(re.escape(char))
    except BadPattern:
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
        return path_match(
            pattern.encode("utf-8", "surrogatepass"), name.encode("utf-8", "surrogatepass")
        )
    except BadPattern:
        return False
