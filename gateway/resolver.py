"""Row resolution: which tables and columns are exposed, and batched SELECTs of changed rows.

The allow-list (``GATEWAY_TABLES``) is parsed and every identifier is checked against a
strict pattern, then against the catalog at startup; only then is it quoted into SQL.
Nothing a client sends ever becomes part of a query: table names come from the
allow-list and keys are passed as parameters.

One SELECT per table per batch (``WHERE key = ANY($1)``); PostgreSQL returns each row as
JSON text, which is embedded as-is into the event frame (msgspec.Raw): no decode and
re-encode in Python.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import asyncpg

from .config import ConfigError

log = logging.getLogger("gateway.resolver")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_ENTRY = re.compile(r"^\s*([^()\s]+)\s*(?:\(([^()]*)\))?\s*$")


@dataclass(frozen=True)
class TableSpec:
    name: str  # schema.table, as the trigger names it
    columns: tuple[str, ...]  # empty: all columns
    key: str = ""  # filled from the catalog
    key_type: str = ""
    select: str = ""  # the prepared SQL text


def quote_ident(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"{name!r} is not a valid identifier")
    return '"' + name.replace('"', '""') + '"'


def parse_tables(text: str) -> list[TableSpec]:
    """Parse ``schema.table`` / ``schema.table(col1,col2)`` entries separated by ``;``."""
    specs: list[TableSpec] = []
    for raw in text.split(";"):
        if not raw.strip():
            continue
        m = _ENTRY.match(raw)
        if not m:
            raise ConfigError(
                f"GATEWAY_TABLES entry {raw.strip()!r} is not valid: expected schema.table(col1,col2)"
            )
        name, cols = m.group(1), m.group(2)
        parts = name.split(".")
        if len(parts) == 1:
            parts = ["public", *parts]
        if len(parts) != 2 or not all(_IDENT.match(p) for p in parts):
            raise ConfigError(
                f"GATEWAY_TABLES entry {name!r} is not valid: expected schema.table with letters, digits and _"
            )
        columns = tuple(c.strip() for c in (cols or "").split(",") if c.strip())
        for c in columns:
            if not _IDENT.match(c):
                raise ConfigError(f"GATEWAY_TABLES column {c!r} of {name} is not a valid identifier")
        full = ".".join(parts)
        if any(s.name == full for s in specs):
            raise ConfigError(f"GATEWAY_TABLES lists {full} twice")
        specs.append(TableSpec(full, columns))
    return specs


class Resolver:
    def __init__(self, pool: asyncpg.Pool, specs: list[TableSpec]) -> None:
        self._pool = pool
        self._tables: dict[str, TableSpec] = {s.name: s for s in specs}
        self._warned: set[str] = set()

    @property
    def tables(self) -> dict[str, TableSpec]:
        return self._tables

    async def check(self) -> None:
        """Validate every listed table and column against the catalog and build the SELECTs."""
        checked: dict[str, TableSpec] = {}
        async with self._pool.acquire() as conn:
            for spec in self._tables.values():
                schema, table = spec.name.split(".")
                oid = await conn.fetchval(
                    "SELECT to_regclass($1)", f"{quote_ident(schema)}.{quote_ident(table)}"
                )
                if oid is None:
                    raise ConfigError(f"GATEWAY_TABLES lists {spec.name}, but no such table exists")
                cols = {
                    r["attname"]: r["t"]
                    for r in await conn.fetch(
                        "SELECT attname, format_type(atttypid, atttypmod) AS t FROM pg_attribute "
                        "WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped",
                        oid,
                    )
                }
                missing = [c for c in spec.columns if c not in cols]
                if missing:
                    raise ConfigError(f"GATEWAY_TABLES: {spec.name} has no column {missing[0]!r}")
                published = await conn.fetchrow(
                    "SELECT key_column, row_topic FROM gateway.published WHERE tbl = $1::regclass", oid
                )
                if published is None:
                    raise ConfigError(
                        f"GATEWAY_TABLES lists {spec.name}, but it is not published: run "
                        f"SELECT gateway.publish('{spec.name}', <topic expression>) first"
                    )
                key, row_topic = published["key_column"], published["row_topic"]
                if not _IDENT.match(key) or not _IDENT.match(row_topic):
                    raise ConfigError(
                        f"GATEWAY_TABLES: {spec.name} is published with key column {key!r}, which the "
                        "gateway cannot quote safely: use letters, digits and _ only"
                    )
                qtable = f"{quote_ident(schema)}.{quote_ident(table)}"
                qkey = quote_ident(key)
                if spec.columns:
                    body = (
                        "json_build_object("
                        + ", ".join(f"'{c}', {quote_ident(c)}" for c in spec.columns)
                        + ")"
                    )
                else:
                    body = "row_to_json(t)"
                # The row's topic now: a row may have moved to another topic since its event
                # was written, and must then not be sent to the event's (old) topic.
                select = (
                    f"SELECT {qkey}::text, {body}::text, gateway.{quote_ident(row_topic)}(t) FROM {qtable} AS t "
                    f"WHERE {qkey} = ANY($1::text[]::{cols[key]}[])"
                )
                checked[spec.name] = TableSpec(spec.name, spec.columns, key, cols[key], select)
        self._tables = checked

    def allowed(self, table: str) -> bool:
        if table in self._tables:
            return True
        if table not in self._warned:
            self._warned.add(table)
            log.warning(
                "table %s is published by a trigger but not listed in GATEWAY_TABLES: its events carry no row",
                table,
            )
        return False

    async def fetch(self, wanted: dict[str, set[str]]) -> dict[tuple[str, str], tuple[str, str | None]]:
        """Current rows as (JSON text, the row's topic now), keyed by (table, key).
        Keys with no row are absent."""
        out: dict[tuple[str, str], tuple[str, str | None]] = {}
        if not wanted:
            return out
        async with self._pool.acquire() as conn:
            for table, keys in wanted.items():
                spec = self._tables.get(table)
                if spec is None or not keys:
                    continue
                for key, row, topic in await conn.fetch(spec.select, list(keys)):
                    out[(table, key)] = (row, topic)
        return out
