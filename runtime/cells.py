"""What a text cell of ``i2p-detect``'s output may hold: names from strangers, shown safely and kept exactly.

- ``path_cell``: the file's exact path as one inert cell, readable back with
  ``os.fsdecode(urllib.parse.unquote_to_bytes(cell))`` (``read_path``): ``%``, control, format (Unicode Cf:
  U+202E and other bidi controls, zero-width characters), separator, surrogate and unassigned characters,
  bytes that are not UTF-8, and a first character a spreadsheet would run as a formula (``=``, ``+``,
  ``-``, ``@``) are percent-encoded as their UTF-8 (or raw) bytes. Ordinary names are written as they are.
- ``display``: every other text cell and every table cell: undecodable bytes as ``\\xNN``, the same
  characters escaped (``\\n``, ``\\x1b``, ``\\u202e``), so a name cannot forge a row, a terminal sequence
  or reorder the text around it; ``csv_cell``: a leading ``'`` on cells a spreadsheet would run as a
  formula (OWASP).
"""

from __future__ import annotations

import os
import re
import unicodedata
import urllib.parse
from typing import Any

Row = dict[str, Any]
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp", "Cn"})
_ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ASCII_UNSAFE = re.compile(r"[%\x00-\x1f\x7f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _hidden(ch: str) -> bool:
    """A character that must not reach a cell raw: control, format (bidi, zero-width), separator, unassigned."""
    return unicodedata.category(ch) in _HIDDEN_CATEGORIES


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    return f"\\x{code:02x}" if code < 256 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def display(text: str) -> str:
    """``text`` as valid UTF-8 on one line: undecodable bytes as ``\\xNN``, hidden characters escaped."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte (from an API caller)
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if text.isascii():
        return _ASCII_CONTROL.sub(lambda m: _escape(m.group()), text)
    return "".join(_escape(c) if _hidden(c) else c for c in text)


def safe_row(row: Row) -> Row:
    """Every string cell through ``display`` (the table)."""
    return {k: display(v) if isinstance(v, str) else v for k, v in row.items()}


def csv_cell(value: Any) -> Any:
    """A cell a spreadsheet shows as text: formula-like strings get a leading apostrophe."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def path_cell(path: str) -> str:
    """The exact path as one inert cell, percent-encoded where needed (see the module docstring)."""
    if path.isascii() and not _ASCII_UNSAFE.search(path) and not path.startswith(FORMULA_STARTS):
        return path
    return "".join(
        "".join(f"%{b:02X}" for b in _raw_bytes(c))
        if c == "%" or _hidden(c) or (not i and c in "=+-@")
        else c
        for i, c in enumerate(path)
    )


def read_path(cell: str) -> str:
    """The path a ``path`` cell holds (the inverse of ``path_cell`` for any name a file system can hold)."""
    return os.fsdecode(urllib.parse.unquote_to_bytes(cell))


def _raw_bytes(ch: str) -> bytes:
    try:
        return ch.encode("utf-8", "surrogateescape")  # a byte that was not UTF-8 is that byte again
    except UnicodeEncodeError:  # a lone surrogate from an API caller: no file system holds it anyway
        return ch.encode("utf-8", "surrogatepass")
