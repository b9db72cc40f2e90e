"""The syntax of ``GATEWAY_TABLES`` (entries naming tables and columns) and of the other
settings that name a database object (``GATEWAY_AUTHZ_FUNCTION``), as PostgreSQL writes names.

``public.items; "Orders"(id, "Total €"); sales."line items"`` -- entries separated by ``;``,
each ``schema.table`` or ``table`` (schema ``public``, not the search_path: the allow-list
must not change with a role's settings), optionally followed by a column list.

Names follow PostgreSQL's identifier syntax, so an entry means what the same text means in
SQL:

* unquoted names are folded to lower case (``Orders`` is ``orders``), ASCII letters only, as
  PostgreSQL folds them in a UTF-8 database. They may hold letters, digits, ``_`` and ``$``
  and not start with a digit or ``$``. Non-ASCII letters, marks and digits are allowed too,
  as in PostgreSQL (``café``); any other non-ASCII character (a no-break space, a curly
  quote pasted from a document) is refused outside double quotes, where PostgreSQL would
  silently make it part of the name.
* double-quoted names are taken as written, case included, with ``""`` for a ``"``: any
  character may appear inside, ``;``, ``,``, ``.`` and parentheses too.
* a name is at most 63 bytes (UTF-8): PostgreSQL cuts longer ones, which would then name
  another table than the one written, so they are refused.

This module knows nothing of the database; gateway/resolver.py checks the names against the
catalog and builds the SELECTs.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from .errors import ConfigError

# NAMEDATALEN - 1: the longest name PostgreSQL keeps (in bytes of the database's encoding).
MAX_NAME_BYTES = 63
DEFAULT_SCHEMA = "public"
_SPACE = " \t\n\r\f\v"  # what PostgreSQL's scanner takes for whitespace
_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# Look like a double quote, but are identifier characters to PostgreSQL: pasted from a
# document, “Orders” would name the table “orders” (curly quotes included).
_LOOKALIKE_QUOTES = "\u201c\u201d\u201e\u201f\u2033\u2036\uff02"


def quote_ident(name: str) -> str:
    """``name`` as an SQL identifier, always quoted: ``"`` is doubled, nothing else can break
    out. Quoting even plain names keeps their case and makes keywords harmless."""
    if not name or "\x00" in name:
        raise ValueError(f"{name!r} cannot be an identifier")
    return '"' + name.replace('"', '""') + '"'


def display_ident(name: str) -> str:
    """``name`` as a user writes it: bare when that reads back the same, else quoted.
    Valid in GATEWAY_TABLES and as regclass text (neither minds keywords)."""
    plain = (
        name
        and (name[0] == "_" or "a" <= name[0] <= "z")
        and all(c == "_" or "a" <= c <= "z" or "0" <= c <= "9" for c in name)
    )
    return name if plain else quote_ident(name)


@dataclass(frozen=True)
class TableEntry:
    """One entry of GATEWAY_TABLES, names as they are in the catalog (unquoted, folded)."""

    schema: str
    table: str
    columns: tuple[str, ...] = ()  # empty: every column

    @property
    def event_name(self) -> str:
        """How the capture triggers name the table in events (sql/101_capture.sql, publish():
        ``format('%s.%s', nspname, relname)``, unquoted): what clients see as ``table``."""
        return f"{self.schema}.{self.table}"

    @property
    def display(self) -> str:
        """The table as SQL text, quoted where needed: for logs and error messages."""
        return f"{display_ident(self.schema)}.{display_ident(self.table)}"

    @property
    def sql_name(self) -> str:
        """The table as SQL text, every part quoted: for statements."""
        return f"{quote_ident(self.schema)}.{quote_ident(self.table)}"


class _Bad(Exception):
    """A syntax error in the entry being read; parse_tables() adds the entry to the message."""


class _Reader:
    """A cursor over the whole setting: entries are split by the grammar, not by a search
    for ``;``, which may stand inside a quoted name."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0

    def peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def skip_space(self) -> None:
        while self.i < len(self.text) and self.text[self.i] in _SPACE:
            self.i += 1

    def at_entry_end(self) -> bool:
        return self.peek() in ("", ";")

    def name(self, what: str) -> str:
        """One identifier, as the catalog spells it; ``what`` says which name was expected."""
        self.skip_space()
        c = self.peek()
        if c == '"':
            return self._quoted()
        if _starts_name(c):
            return self._unquoted()
        raise _Bad(f"expected {what}, found {_describe(c)}")

    def _quoted(self) -> str:
        start = self.i
        self.i += 1
        parts: list[str] = []
        while True:
            end = self.text.find('"', self.i)
            if end < 0:
                self.i = len(self.text)
                raise _Bad(f'the quoted name {self.text[start:]} has no closing "')
            parts.append(self.text[self.i : end])
            self.i = end + 1
            if self.peek() != '"':
                break
            parts.append('"')  # "" inside quotes is one "
            self.i += 1
        name = "".join(parts)
        if not name:
            raise _Bad('"" is an empty name')
        if "\x00" in name:
            raise _Bad("a name cannot hold a NUL character")
        return _checked_length(name)

    def _unquoted(self) -> str:
        start = self.i
        self.i += 1
        while self.i < len(self.text) and _continues_name(self.text[self.i]):
            self.i += 1
        word = self.text[start : self.i]
        if word in ("U", "u") and self.peek() == "&":
            raise _Bad('U&"..." escapes are not supported: write the characters themselves, in double quotes')
        return _checked_length(word.translate(_FOLD))


def _starts_name(c: str) -> bool:
    if c.isascii():
        return c == "_" or c.isalpha()
    return unicodedata.category(c).startswith("L")


def _continues_name(c: str) -> bool:
    if c.isascii():
        return c in "_$" or c.isalnum()
    return unicodedata.category(c)[0] in "LMN"


def _describe(c: str) -> str:
    """A character found where it cannot stand, and what to do about it."""
    if c == "":
        return "the end"
    if c in _LOOKALIKE_QUOTES:
        return f'{c!r}, which is not a double quote: write quoted names in straight quotes (")'
    if not c.isascii():
        what = unicodedata.name(c, f"U+{ord(c):04X}")
        return f"{c!r} ({what}), which may only stand in a name inside double quotes"
    return repr(c)


def _quote_hint(c: str) -> str:
    """After an ASCII character that cannot continue a name: how to write such a name.
    (_describe() already says it for lookalike quotes and other non-ASCII characters.)"""
    if c in _LOOKALIKE_QUOTES or not c.isascii():
        return ""
    return '; a name holding characters other than letters, digits, _ and $ must be double-quoted, e.g. "order-items"'


def _checked_length(name: str) -> str:
    size = len(name.encode())
    if size > MAX_NAME_BYTES:
        raise _Bad(
            f"the name {display_ident(name)} is {size} bytes long: PostgreSQL names are at most "
            f"{MAX_NAME_BYTES} bytes (it would cut this one and mean another)"
        )
    return name


def _qualified(r: _Reader, what: str) -> list[str]:
    """``name`` or ``schema.name``; ``what`` names the object, as in "a table"."""
    parts = [r.name(f"{what} name")]
    r.skip_space()
    while r.peek() == ".":
        r.i += 1
        parts.append(r.name("a name after '.'"))
        r.skip_space()
    if len(parts) > 2:
        shown = ".".join(display_ident(p) for p in parts)
        noun = what.split()[-1]
        raise _Bad(f"{shown} has {len(parts)} name parts: expected schema.{noun} or {noun}")
    return parts


def _entry(r: _Reader) -> TableEntry:
    parts = _qualified(r, "a table")
    schema, table = parts if len(parts) == 2 else (DEFAULT_SCHEMA, parts[0])
    columns: list[str] = []
    if r.peek() == "(":
        r.i += 1
        r.skip_space()
        if r.peek() == ")":
            raise _Bad("the column list () is empty: leave out the parentheses to send every column")
        while True:
            if r.peek() in (",", ")"):
                raise _Bad(f"column {len(columns) + 1} of the list is empty")
            column = r.name("a column name")
            if column in columns:
                raise _Bad(f"column {display_ident(column)} is listed twice")
            columns.append(column)
            r.skip_space()
            c = r.peek()
            r.i += 1
            if c == ")":
                break
            if c == ",":
                r.skip_space()
                continue
            r.i -= 1
            if c in ("", ";"):
                raise _Bad("the column list has no closing )")
            raise _Bad(f"expected ',' or ')' after column {display_ident(column)}, found {_describe(c)}")
        r.skip_space()
        if not r.at_entry_end():
            raise _Bad(f"unexpected {_describe(r.peek())} after the column list")
    elif not r.at_entry_end():
        c = r.peek()
        shown = ".".join(display_ident(p) for p in parts)
        raise _Bad(f"after {shown}: unexpected {_describe(c)}{_quote_hint(c)}")
    return TableEntry(schema, table, tuple(columns))


def _entry_text(text: str, start: int) -> str:
    """The entry starting at ``start``, up to its ``;`` (outside quotes) or the end."""
    quoted = False
    for i in range(start, len(text)):
        if text[i] == '"':
            quoted = not quoted  # "" toggles twice: still the same quoted name
        elif text[i] == ";" and not quoted:
            return text[start:i].strip(_SPACE)
    return text[start:].strip(_SPACE)


def parse_tables(text: str) -> list[TableEntry]:
    """The entries of GATEWAY_TABLES, in order; ConfigError naming the entry and what is
    wrong with it. Empty entries (``a;;b``, a trailing ``;``) are skipped."""
    r = _Reader(text)
    seen: list[tuple[TableEntry, str]] = []  # with its text, for messages
    while True:
        r.skip_space()
        if r.peek() == ";":
            r.i += 1
            continue
        if r.peek() == "":
            break
        start = r.i
        try:
            entry = _entry(r)
        except _Bad as exc:
            raise ConfigError(
                f"GATEWAY_TABLES entry {_entry_text(text, start)!r} is not valid: {exc}"
            ) from None
        here = _entry_text(text, start)
        for other, there in seen:
            if (other.schema, other.table) == (entry.schema, entry.table):
                raise ConfigError(f"GATEWAY_TABLES lists {entry.display} twice ({there!r} and {here!r})")
            if other.event_name == entry.event_name:
                raise ConfigError(
                    f"GATEWAY_TABLES lists {other.display} and {entry.display}, two tables that events "
                    f"both name {entry.event_name!r} (schema and table joined by a dot): the gateway "
                    "could not tell their rows apart. Rename one of them"
                )
        seen.append((entry, here))
    return [entry for entry, _ in seen]


def parse_name(text: str, setting: str, what: str) -> tuple[str, ...]:
    """The parts of a name written as in SQL, ``name`` or ``schema.name`` (unquoted parts
    folded to lower case, quoted ones as written), as the catalog spells them; ConfigError
    naming ``setting`` otherwise. ``what`` names the object: "a function"."""
    r = _Reader(text)
    try:
        parts = _qualified(r, what)
        if r.peek() != "":
            c = r.peek()
            raise _Bad(f"unexpected {_describe(c)} after the name{_quote_hint(c)}")
    except _Bad as exc:
        raise ConfigError(f"{setting}={text!r} is not valid: {exc}") from None
    return tuple(parts)
