"""Row resolution: which tables and columns are exposed, and batched SELECTs of changed rows.

The allow-list (``GATEWAY_TABLES``, parsed by gateway/tables.py) is checked against the catalog
at startup, and each table's SELECT is built then, once. Every name in it, the allow-list's
and the catalog's (key column, row_topic function), is a quoted identifier: there are no
string literals in it, so no name can break out, whatever ``standard_conforming_strings``
says. Nothing a client sends ever becomes part of a query: keys are passed as parameters.

One SELECT per table per batch (``WHERE key = ANY($1)``); PostgreSQL returns each row as
JSON text, which is embedded as-is into the event frame (msgspec.Raw): no decode and
re-encode in Python.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import asyncpg

from .errors import ConfigError
from .tables import TableEntry, display_ident, quote_ident

log = logging.getLogger("gateway.resolver")

# A listed table whose SELECT fails for a reason of its own (renamed, dropped, a listed column
# gone, SELECT revoked, a key that no longer casts): its events go out without rows, like an
# unlisted table's, and the SELECT is tried again after this many seconds. Every other table
# keeps its rows; treating this as "database unreachable" would stall every topic until a
# restart.
UNREADABLE_RETRY = 30.0
_TABLE_ERRORS = (asyncpg.SyntaxOrAccessError, asyncpg.DataError)

# Tables and their names as the capture triggers write them in events (sql/101_capture.sql, publish()).
_PUBLISHED = (
    "SELECT c.oid, n.nspname, c.relname FROM gateway.published p "
    "JOIN pg_class c ON c.oid = p.tbl JOIN pg_namespace n ON n.oid = c.relnamespace"
)


@dataclass(frozen=True)
class TableSpec:
    entry: TableEntry
    key: str  # the key column, from gateway.published
    select: str  # the prepared SQL text

    @property
    def name(self) -> str:
        return self.entry.event_name


def build_select(entry: TableEntry, key: str, key_type: str, row_topic: str, many: bool = False) -> str:
    """The SELECT of rows by key: (key as text, row as JSON text, the row's topics now, an array).

    ``many``: the table is published on several topics per row (its row_topic function gives
    an array, docs/sql.md); otherwise the one topic is put in an array of one.

    ``key_type`` is format_type()'s output, already SQL. A column list becomes a subquery
    whose output columns are named by quoted identifiers, and row_to_json() takes its keys
    from them: a column's name reaches the JSON without ever being an SQL string. ``t.*`` is
    the whole row even if the table has a column named ``t``. ``ONLY``: the rows of the table
    itself, as its capture triggers log them, not those of its inheritance children (whose
    changes are not logged, and whose keys may repeat the table's)."""
    qkey = "t." + quote_ident(key)
    if entry.columns:
        cols = ", ".join(f"t.{quote_ident(c)} AS {quote_ident(c)}" for c in entry.columns)
        source = f"ONLY {entry.sql_name} AS t CROSS JOIN LATERAL (SELECT {cols}) AS r"
        row = "row_to_json(r.*)"
    else:
        source = f"ONLY {entry.sql_name} AS t"
        row = "row_to_json(t.*)"
    # The row's topics now: a row may have moved to another topic since its event was
    # written, and must then not be sent to the event's (old) topic.
    topics = f"gateway.{quote_ident(row_topic)}(t.*)"
    if not many:
        topics = f"ARRAY[{topics}]"
    return (
        f"SELECT {qkey}::text, {row}::text, {topics} FROM {source} "
        f"WHERE {qkey} = ANY($1::text[]::{key_type}[])"
    )


def key_column_gone_fix(entry: TableEntry, topic: str | None) -> str:
    """How to repair a published table whose key column was dropped or renamed. Until then its
    capture triggers fail every write to it (``record "new" has no field ...``, docs/sql.md)."""
    table = "'" + entry.display.replace("'", "''") + "'"
    if topic is None:
        expression = "<topic expression>"
    elif "$$" not in topic:
        expression = "$$" + topic + "$$"  # as docs/sql.md writes them: its quotes stay as they are
    else:
        expression = "'" + topic.replace("'", "''") + "'"
    return (
        "Publish it again with another unique column as its key, "
        f"SELECT gateway.publish({table}, {expression}, '<column>'), or stop publishing it, "
        f"SELECT gateway.unpublish({table}) (and remove it from GATEWAY_TABLES); then restart the gateway"
    )


class Resolver:
    def __init__(self, pool: asyncpg.Pool, entries: list[TableEntry]) -> None:
        self._pool = pool
        self._entries = entries
        self._tables: dict[str, TableSpec] = {}  # by event name
        self._warned: set[str] = set()
        self._unreadable: dict[str, float] = {}  # listed tables whose SELECT failed: retry time

    @property
    def tables(self) -> dict[str, TableSpec]:
        """The checked tables by the name their events carry (empty before check())."""
        return self._tables

    async def check(self) -> None:
        """Validate every listed table and column against the catalog and build the SELECTs."""
        checked: dict[str, TableSpec] = {}
        async with self._pool.acquire() as conn:
            published = [
                (r["oid"], TableEntry(r["nspname"], r["relname"])) for r in await conn.fetch(_PUBLISHED)
            ]
            for entry in self._entries:
                oid = await self._find_table(conn, entry)
                # Events name a table by schema and name joined with a dot, unquoted: "a.b".c
                # and a."b.c" are both a.b.c. A listed table's events must be its own only,
                # or the gateway would send one table's row for the other's change.
                for other_oid, other in published:
                    if other.event_name == entry.event_name and other_oid != oid:
                        raise ConfigError(
                            f"GATEWAY_TABLES lists {entry.display}, whose events name it "
                            f"{entry.event_name!r}, as they name the published table {other.display}: "
                            "the gateway could not tell their rows apart. Rename one of the two "
                            "tables (or unpublish the other)"
                        )
                checked[entry.event_name] = await self._build(conn, entry, oid)
        self._tables = checked

    @staticmethod
    async def _find_table(conn: asyncpg.Connection, entry: TableEntry) -> int:
        # By the names themselves, not a parsed text: nothing to quote, nothing to misread.
        oid: int | None = await conn.fetchval(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND c.relname = $2",
            entry.schema,
            entry.table,
        )
        if oid is not None:
            return oid
        # Unquoted names are folded to lower case: public.Orders is public.orders, which
        # may not exist while public."Orders" does. Name the table the user meant.
        near = await conn.fetch(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE lower(n.nspname) = lower($1) AND lower(c.relname) = lower($2) AND c.relkind IN ('r', 'p') "
            "ORDER BY 1, 2 LIMIT 3",
            entry.schema,
            entry.table,
        )
        hint = ""
        if near:
            names = " or ".join(f"{display_ident(r['nspname'])}.{display_ident(r['relname'])}" for r in near)
            hint = (
                f" (did you mean {names}? Unquoted names are folded to lower case; "
                'double-quote a name to keep its case, e.g. public."Orders")'
            )
        raise ConfigError(f"GATEWAY_TABLES lists {entry.display}, but no such table exists{hint}")

    @staticmethod
    async def _build(conn: asyncpg.Connection, entry: TableEntry, oid: int) -> TableSpec:
        cols = {
            r["attname"]: r["t"]
            for r in await conn.fetch(
                "SELECT attname, format_type(atttypid, atttypmod) AS t FROM pg_attribute "
                "WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
                oid,
            )
        }
        for c in entry.columns:
            if c not in cols:
                near = [n for n in cols if n.lower() == c.lower()]
                hint = (
                    f" (it has {display_ident(near[0])}: double-quote a name to keep its case)"
                    if near
                    else ""
                )
                raise ConfigError(f"GATEWAY_TABLES: {entry.display} has no column {c!r}{hint}")
        published = await conn.fetchrow(
            "SELECT key_column, row_topic, topic, (SELECT f.prorettype = 'text[]'::regtype FROM pg_proc f "
            "WHERE f.oid = format('gateway.%I(%s)', row_topic, tbl)::regprocedure) AS many "
            "FROM gateway.published WHERE tbl = $1::oid::regclass",
            oid,
        )
        if published is None:
            literal = "'" + entry.display.replace("'", "''") + "'"
            raise ConfigError(
                f"GATEWAY_TABLES lists {entry.display}, but it is not published: run "
                f"SELECT gateway.publish({literal}, <topic expression>) first"
            )
        key, row_topic = published["key_column"], published["row_topic"]
        if key not in cols:
            raise ConfigError(
                f"GATEWAY_TABLES: {entry.display} is published with key column {key!r}, which it no "
                f"longer has. {key_column_gone_fix(entry, published['topic'])}"
            )
        select = build_select(entry, key, cols[key], row_topic, bool(published["many"]))
        # Run once with no key: any error in the statement (or a missing SELECT privilege)
        # shows now, naming the table, not at the first change of a row.
        try:
            await conn.fetch(select, [])
        except asyncpg.PostgresError as exc:
            raise ConfigError(f"GATEWAY_TABLES: cannot read rows of {entry.display}: {exc}") from None
        # A row the gateway's role may not see looks deleted: its insert or update would reach
        # the topic's subscribers as a delete. Row-level security must not apply to that role.
        if await conn.fetchval("SELECT row_security_active($1::oid::regclass)", oid):
            raise ConfigError(
                f"GATEWAY_TABLES: row-level security applies to the gateway's role on {entry.display}: "
                "rows its policies hide would reach subscribers as deletes. Give the role BYPASSRLS "
                "(ALTER ROLE ... BYPASSRLS), or connect as the table's owner (without FORCE ROW LEVEL "
                "SECURITY)"
            )
        return TableSpec(entry, key, select)

    def allowed(self, table: str) -> bool:
        """Whether the events of ``table`` carry rows (listed, and readable last time)."""
        if table in self._tables:
            retry = self._unreadable.get(table)
            return retry is None or time.monotonic() >= retry
        if table not in self._warned:
            self._warned.add(table)
            log.warning(
                "table %s is published by a trigger but not listed in GATEWAY_TABLES: its events carry no row",
                table,
            )
        return False

    async def fetch(self, wanted: dict[str, set[str]]) -> dict[tuple[str, str], tuple[str, frozenset[str]]]:
        """Current rows as (JSON text, the row's topics now), keyed by (table, key).
        Keys with no row are absent."""
        out: dict[tuple[str, str], tuple[str, frozenset[str]]] = {}
        if not wanted:
            return out
        async with self._pool.acquire() as conn:
            for table, keys in wanted.items():
                spec = self._tables.get(table)
                if spec is None or not keys:
                    continue
                try:
                    found = await conn.fetch(spec.select, list(keys))
                except _TABLE_ERRORS as exc:
                    self._cannot_read(spec, exc)
                    continue
                if self._unreadable.pop(table, None) is not None:
                    log.warning("rows of %s can be read again", spec.entry.display)
                for key, row, topics in found:
                    out[(table, key)] = (row, frozenset(t for t in topics or () if t is not None))
        return out

    def _cannot_read(self, spec: TableSpec, exc: Exception) -> None:
        if spec.name in self._unreadable:
            pass  # said once; said again only after the table was readable in between
        elif isinstance(exc, asyncpg.UndefinedColumnError) and exc.args[:1] == (
            f"column t.{spec.key} does not exist",  # the message; str() adds a HINT when there is one
        ):
            log.error(
                "cannot read rows of %s: its key column %s is gone, so every write to the table "
                "fails until it is published again, and its events already in the log are sent "
                "without rows. %s",
                spec.entry.display,
                display_ident(spec.key),
                key_column_gone_fix(spec.entry, None),
            )
        else:
            log.error(
                "cannot read rows of %s (%s: %s): its events are sent without rows, and reading is "
                "tried again every %g s. If it was renamed or dropped, or a listed column is gone, "
                "correct GATEWAY_TABLES (and publish it again) and restart the gateway",
                spec.entry.display,
                type(exc).__name__,
                exc,
                UNREADABLE_RETRY,
            )
        self._unreadable[spec.name] = time.monotonic() + UNREADABLE_RETRY
