"""Go's text rules fleet's messages and parsing depend on: strings.TrimSpace/Fields on Go's
whitespace set, and %q quoting, so error messages read exactly like fleet's. Pure.
"""

from __future__ import annotations

import re

# Go's unicode.IsSpace set. strings.TrimSpace / strings.Fields in fleet use it; Python's
# str.isspace differs (it also counts \x1c-\x1f), so it cannot be used for byte-exact trimming.
GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
GO_SPACE_SET = frozenset(GO_SPACE)
_GO_FIELDS_SPLIT = re.compile("[" + re.escape(GO_SPACE) + "]+")


def go_trim(text: str) -> str:
    """strings.TrimSpace."""
    return text.strip(GO_SPACE)


def go_fields(text: str) -> list[str]:
    """strings.Fields: split on runs of Go whitespace, dropping empty fields."""
    return [field for field in _GO_FIELDS_SPLIT.split(text) if field]


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


def go_quote(text: str) -> str:
    """strconv.Quote (Go's %q for a string)."""
    return '"' + "".join(_go_escape_char(ch, '"') for ch in text) + '"'


def preview(text: str, limit: int = 64) -> str:
    """A quoted, shortened piece of input for an error message."""
    return go_quote(text[:limit]) + ("..." if len(text) > limit else "")


def go_quote_rune(ch: str) -> str:
    """strconv.QuoteRune (Go's %q for a rune)."""
    return "'" + _go_escape_char(ch, "'") + "'"
