"""GATEWAY_TABLES: PostgreSQL's identifier syntax, and names that are safe all the way to the client.

The parser is checked on its own and against PostgreSQL's parse_ident(); then real gateways
serve tables whose names need quoting (mixed case, spaces, dots, quotes, non-ASCII), and one
whose names are built to break out of an SQL string while standard_conforming_strings is off.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import config
from gateway.config import ConfigError
from gateway.dev.demo import with_demo_table
from gateway.resolver import Resolver
from gateway.tables import TableEntry, display_ident, parse_tables, quote_ident

from .gwtest import running_gateway
from .pgconn import pg_pool

# --- the parser ----------------------------------------------------------------------------


def parsed(text: str) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(e.schema, e.table, e.columns) for e in parse_tables(text)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("public.items", [("public", "items", ())]),
        ("items", [("public", "items", ())]),
        # Unquoted names are folded to lower case, as PostgreSQL does: public.Orders is orders.
        ("Public.Items(ID, Title)", [("public", "items", ("id", "title"))]),
        ('"Orders"', [("public", "Orders", ())]),
        ('"Public"."ITEMS"("Id")', [("Public", "ITEMS", ("Id",))]),
        ('sales."line items"("unit price", qty)', [("sales", "line items", ("unit price", "qty"))]),
        ('"a""b"."c""d"("e""f", """")', [('a"b', 'c"d', ('e"f', '"'))]),
        # ; , . ( ) inside quotes are part of the name, not the syntax.
        (
            '"semi;colon"("x;y", "a,b", "(paren)", "p)")',
            [("public", "semi;colon", ("x;y", "a,b", "(paren)", "p)"))],
        ),
        ('"dot.ted"."a.b"("c.d")', [("dot.ted", "a.b", ("c.d",))]),
        ("public . items ( id ,\n\ttitle )", [("public", "items", ("id", "title"))]),
        (" a ;; b(x) ;\n", [("public", "a", ()), ("public", "b", ("x",))]),
        ("", []),
        (" ; ", []),
        # Non-ASCII letters need no quotes; only ASCII letters are folded (PostgreSQL in UTF-8).
        ("café(prix, Élan)", [("public", "café", ("prix", "Élan"))]),
        ("CAFÉ", [("public", "cafÉ", ())]),
        ('"CAFÉ"', [("public", "CAFÉ", ())]),
        ("訂單.項目", [("訂單", "項目", ())]),
        ("_x.b$1(c2$)", [("_x", "b$1", ("c2$",))]),
        # Keywords are names like any other: the gateway quotes every name it writes.
        ("public.select(from, order)", [("public", "select", ("from", "order"))]),
        # 63 bytes is PostgreSQL's limit: 31 two-byte letters and one ASCII one fit.
        ('"' + "é" * 31 + 'x"', [("public", "é" * 31 + "x", ())]),
        ("a" * 63, [("public", "a" * 63, ())]),
        ('"tab\there"', [("public", "tab\there", ())]),
    ],
)
def test_valid_entries(text: str, expected: list[tuple[str, str, tuple[str, ...]]]) -> None:
    assert parsed(text) == expected


@pytest.mark.parametrize(
    ("text", "entry", "problem"),
    [
        ('public."Orders', 'public."Orders', 'the quoted name "Orders has no closing "'),
        ('a; public."Orders;b', 'public."Orders;b', "has no closing"),
        ('""', '""', '"" is an empty name'),
        ('public.""', 'public.""', '"" is an empty name'),
        ("t()", "t()", "the column list () is empty"),
        ("t( )", "t( )", "the column list () is empty"),
        ("t(a,,b)", "t(a,,b)", "column 2 of the list is empty"),
        ("t(,a)", "t(,a)", "column 1 of the list is empty"),
        ("t(a,)", "t(a,)", "column 2 of the list is empty"),
        ("t(a, A)", "t(a, A)", "column a is listed twice"),
        ('t("x", x)', 't("x", x)', "column x is listed twice"),
        ("t(a", "t(a", "the column list has no closing )"),
        ("t(a;b)", "t(a", "the column list has no closing )"),
        ("t(a b)", "t(a b)", "expected ',' or ')' after column a, found 'b'"),
        ("db.public.t", "db.public.t", "db.public.t has 3 name parts: expected schema.table or table"),
        ('a."b.c".d', 'a."b.c".d', 'a."b.c".d has 3 name parts'),
        ("t(a) x", "t(a) x", "unexpected 'x' after the column list"),
        ("t(a)(b)", "t(a)(b)", "unexpected '(' after the column list"),
        ("public.bad-name", "public.bad-name", "after public.bad: unexpected '-'; a name holding"),
        ("t x", "t x", "after t: unexpected 'x'"),
        ('"a"b', '"a"b', "after a: unexpected 'b'"),
        ("public.", "public.", "expected a name after '.', found the end"),
        (".t", ".t", "expected a table name, found '.'"),
        ("(a)", "(a)", "expected a table name, found '('"),
        ("1t", "1t", "expected a table name, found '1'"),
        ("$t", "$t", "expected a table name, found '$'"),
        ("t(1)", "t(1)", "expected a column name, found '1'"),
        ("a" * 64, "a" * 64, "is 64 bytes long: PostgreSQL names are at most 63 bytes"),
        ('"' + "é" * 32 + '"', '"' + "é" * 32 + '"', "is 64 bytes long"),
        ('t("' + "c" * 64 + '")', 't("' + "c" * 64 + '")', "is 64 bytes long"),
        ("\u201corders\u201d", "\u201corders\u201d", "which is not a double quote"),
        ("a\u00a0b", "a\u00a0b", "(NO-BREAK SPACE), which may only stand in a name inside double quotes"),
        ('U&"d\\0061t"', 'U&"d\\0061t"', 'U&"..." escapes are not supported'),
    ],
)
def test_bad_entries_say_what_is_wrong_and_show_the_entry(text: str, entry: str, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_tables(text)
    message = str(exc.value)
    assert message.startswith(f"GATEWAY_TABLES entry {entry!r} is not valid: "), message
    assert problem in message, message


def test_a_table_listed_twice_is_refused_after_folding() -> None:
    with pytest.raises(
        ConfigError, match=r"lists public\.orders twice \('Orders' and 'public\.ORDERS\(id\)'\)"
    ):
        parse_tables("Orders; public.ORDERS(id)")
    # Quoted, "Orders" is another table than orders.
    assert len(parse_tables('orders; "Orders"')) == 2


def test_two_tables_that_events_would_name_alike_are_refused() -> None:
    # Events name a table schema.table, unquoted (sql/101_capture.sql): both would be a.b.c.
    with pytest.raises(
        ConfigError, match=r"lists \"a\.b\"\.c and a\.\"b\.c\", two tables that events both name 'a\.b\.c'"
    ):
        parse_tables('"a.b".c; a."b.c"')


def test_names_for_events_messages_and_sql() -> None:
    (e,) = parse_tables('"Sales Dept"."it\'s ""x"".v2"')
    assert e.event_name == 'Sales Dept.it\'s "x".v2'  # as the trigger writes it
    assert e.display == '"Sales Dept"."it\'s ""x"".v2"'
    assert e.sql_name == '"Sales Dept"."it\'s ""x"".v2"'
    assert TableEntry("public", "items").display == "public.items"
    assert TableEntry("public", "items").sql_name == '"public"."items"'
    assert quote_ident('a"b') == '"a""b"'
    assert quote_ident("select") == '"select"'
    for bad in ("", "a\x00b"):
        with pytest.raises(ValueError):
            quote_ident(bad)


# Any name PostgreSQL can hold: 1 to 63 bytes, no NUL (and no lone surrogate, which has no UTF-8).
NAMES = st.text(
    st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), min_size=1, max_size=63
).filter(lambda n: len(n.encode()) <= 63)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(NAMES, NAMES, st.lists(NAMES, max_size=4, unique=True)), min_size=1, max_size=3))
def test_every_name_written_as_displayed_reads_back_the_same(
    tables: list[tuple[str, str, list[str]]],
) -> None:
    """Whatever the names, the way the gateway shows them is a valid entry naming them."""
    entries = {(s, t): cols for s, t, cols in tables}
    if len({f"{s}.{t}" for s, t in entries}) < len(entries):
        return  # two tables events name alike: refused, tested above
    text = ";".join(
        TableEntry(s, t).display + (f"({', '.join(display_ident(c) for c in cols)})" if cols else "")
        for (s, t), cols in entries.items()
    )
    assert parsed(text) == [(s, t, tuple(cols)) for (s, t), cols in entries.items()]


@pytest.mark.parametrize(
    "text",
    [
        "Public.Items",
        '"Public"."Items"',
        'sales."line items"',
        '"a""b"."c.d"',
        "café.CAFÉ",
        "訂單.項目",
        "_x.b$1",
        "public.select",
        '"' + "é" * 31 + 'x".t',
        'public."semi;colon"',
        " public . items ",
    ],
)
async def test_names_are_read_as_postgresql_reads_them(db: asyncpg.Connection, text: str) -> None:
    (e,) = parse_tables(text)
    assert await db.fetchval("SELECT parse_ident($1)", text) == [e.schema, e.table]


def test_the_syntax_is_checked_when_the_settings_load() -> None:
    with pytest.raises(ConfigError, match=r"GATEWAY_TABLES entry 't\(\)' is not valid"):
        config.load({"GATEWAY_TABLES": "public.items; t()"})
    assert config.load({"GATEWAY_TABLES": '"a;b"'}).tables == '"a;b"'


def test_the_demo_adds_its_table_unless_listed() -> None:
    assert with_demo_table("") == "public.demo_tasks"
    assert with_demo_table("public.items") == "public.items;public.demo_tasks"
    for listed in ('"public".DEMO_TASKS', "demo_tasks(id)", 'a; "x;y"; public.demo_tasks'):
        assert with_demo_table(listed) == listed
    assert with_demo_table('"Demo_Tasks"') == '"Demo_Tasks";public.demo_tasks'


# --- against the catalog --------------------------------------------------------------------


async def check(dsn: str, tables: str) -> dict[str, Any]:
    pool = await pg_pool(dsn, min_size=1, max_size=1)
    try:
        resolver = Resolver(pool, parse_tables(tables))
        await resolver.check()
        return resolver.tables
    finally:
        await pool.close()


async def test_a_folded_name_that_misses_points_to_the_quoted_table(dsn: str, db: asyncpg.Connection) -> None:
    await db.execute("""CREATE TABLE "Orders" (id int PRIMARY KEY, "Total" int)""")
    with pytest.raises(ConfigError) as exc:
        await check(dsn, "public.Orders")
    assert str(exc.value) == (
        'GATEWAY_TABLES lists public.orders, but no such table exists (did you mean public."Orders"? '
        'Unquoted names are folded to lower case; double-quote a name to keep its case, e.g. public."Orders")'
    )
    with pytest.raises(ConfigError, match=r"public\.\"Orders\" has no column 'total' \(it has \"Total\""):
        await check(dsn, '"Orders"(id, Total)')


async def test_the_hint_to_publish_is_sql_that_works(dsn: str, db: asyncpg.Connection) -> None:
    await db.execute("""CREATE TABLE "it's here" (id int PRIMARY KEY)""")
    with pytest.raises(ConfigError) as exc:
        await check(dsn, '"it\'s here"')
    message = str(exc.value)
    assert (
        "it is not published: run SELECT gateway.publish('public.\"it''s here\"', <topic expression>)"
        in message
    )
    hint = message.split("run ", 1)[1].removesuffix(" first").replace("<topic expression>", "$$'user:1'$$")
    await db.execute(hint)
    assert await check(dsn, '"it\'s here"')


async def test_a_published_table_that_events_would_name_alike_is_refused(
    dsn: str, db: asyncpg.Connection
) -> None:
    await db.execute(
        """CREATE SCHEMA "a.b"; CREATE TABLE "a.b".c (id int PRIMARY KEY);
        CREATE SCHEMA a; CREATE TABLE a."b.c" (id int PRIMARY KEY);
        SELECT gateway.publish('"a.b".c', $$'user:1'$$)"""
    )
    assert list(await check(dsn, '"a.b".c')) == ["a.b.c"]
    # Listed or not, a.\"b.c\" would share a.b.c with the published "a.b".c.
    await db.execute("""SELECT gateway.publish('a."b.c"', $$'user:1'$$)""")
    with pytest.raises(ConfigError) as exc:
        await check(dsn, '"a.b".c')
    assert str(exc.value) == (
        "GATEWAY_TABLES lists \"a.b\".c, whose events name it 'a.b.c', as they name the published table "
        'a."b.c": the gateway could not tell their rows apart. Rename one of the two tables (or unpublish the other)'
    )
    await db.execute("""SELECT gateway.unpublish('a."b.c"')""")
    assert list(await check(dsn, '"a.b".c')) == ["a.b.c"]


# --- through the gateway ---------------------------------------------------------------------


async def test_a_mixed_case_table_is_served_apart_from_its_lower_case_namesake(
    dsn: str, db: asyncpg.Connection
) -> None:
    await db.execute(
        """CREATE TABLE "Orders" ("Id" bigserial PRIMARY KEY, "OwnerId" int, "Total" int, secret text);
        CREATE TABLE orders (id bigserial PRIMARY KEY, owner int, total int);
        SELECT gateway.publish('"Orders"', $$'user:' || "OwnerId"$$);
        SELECT gateway.publish('orders', $$'user:' || owner$$)"""
    )
    async with running_gateway(dsn, tables='public."Orders"("Id", "Total")') as gw:
        alice = await gw.connect("1")
        await alice.subscribe("user:1")
        await db.execute("""INSERT INTO "Orders" ("OwnerId", "Total", secret) VALUES (1, 10, 'x')""")
        await db.execute("INSERT INTO orders (owner, total) VALUES (1, 20)")
        first, second = await alice.events(2)
        assert (first["table"], first["key"], first["row"]) == ("public.Orders", "1", {"Id": 1, "Total": 10})
        # The lower-case table is not listed: its event carries no row.
        assert (second["table"], second["key"], "row" in second) == ("public.orders", "1", False)
        await alice.close()


async def test_names_with_spaces_quotes_dots_and_non_ascii_reach_the_client_as_they_are(
    dsn: str, db: asyncpg.Connection
) -> None:
    await db.execute(
        """CREATE SCHEMA "Sales Dept";
        CREATE TABLE "Sales Dept"."line ""items"".v2; (x)" (
            "the key" bigserial PRIMARY KEY, "owner" int, "unit price" numeric, "a""b" text, "x.y" int,
            café text, "semi;colon" text, "(paren)" text, t int, "hidden" text);
        SELECT gateway.publish('"Sales Dept"."line ""items"".v2; (x)"', $$'user:' || owner$$)"""
    )
    listed = '"Sales Dept"."line ""items"".v2; (x)"("the key", "unit price", "a""b", "x.y", CAFÉ, "semi;colon", "(paren)", t)'
    # CAFÉ: unquoted, only ASCII letters are folded, so it names cafÉ, which does not exist.
    with pytest.raises(ConfigError, match="has no column 'cafÉ'"):
        await check(dsn, listed)
    listed = listed.replace("CAFÉ", "Café")
    async with running_gateway(dsn, tables=listed) as gw:
        alice = await gw.connect("1")
        await alice.subscribe("user:1")
        await db.execute(
            """INSERT INTO "Sales Dept"."line ""items"".v2; (x)"
               (owner, "unit price", "a""b", "x.y", café, "semi;colon", "(paren)", t, hidden)
               VALUES (1, 2.50, 'q"uote', 7, 'crème', ';', ')', 3, 'not listed')"""
        )
        (event,) = await alice.events(1)
        assert event["table"] == 'Sales Dept.line "items".v2; (x)'
        assert event["key"] == "1"
        assert event["row"] == {
            "the key": 1,
            "unit price": 2.50,
            'a"b': 'q"uote',
            "x.y": 7,
            "café": "crème",
            "semi;colon": ";",
            "(paren)": ")",
            "t": 3,
        }
        await alice.close()
    # Every column (row_to_json of the whole row), with a column named like the row's alias.
    async with running_gateway(dsn, tables='"Sales Dept"."line ""items"".v2; (x)"') as gw:
        alice = await gw.connect("1")
        await alice.subscribe("user:1")
        await db.execute("""UPDATE "Sales Dept"."line ""items"".v2; (x)" SET t = 4""")
        (event,) = await alice.events(1)
        assert event["op"] == "update" and event["row"]["t"] == 4 and event["row"]["hidden"] == "not listed"
        await alice.close()


HOSTILE = [
    "x'); DROP TABLE victim; --",
    "x', (SELECT secret FROM victim)) --",
    "back\\",
    "q\\'); DROP TABLE victim; --",
    'dq"); DROP TABLE victim; --',
]


async def test_hostile_names_inject_nothing_even_without_standard_conforming_strings(
    dsn: str, db: asyncpg.Connection
) -> None:
    """Names that close an SQL string or identifier early, where a backslash escapes a quote."""
    dbname = await db.fetchval("SELECT current_database()")
    await db.execute(f"""ALTER DATABASE {quote_ident(dbname)} SET standard_conforming_strings = off;
        ALTER DATABASE {quote_ident(dbname)} SET escape_string_warning = off""")
    cols = ", ".join(f"{quote_ident(c)} text" for c in HOSTILE)
    key = "k\\'); DROP TABLE victim; --"
    await db.execute(
        f"""CREATE TABLE victim (secret text); INSERT INTO victim VALUES ('s3cret');
        CREATE TABLE "h'; DROP TABLE victim; --\\" ({quote_ident(key)} int PRIMARY KEY, owner int, {cols})"""
    )
    await db.fetchval(
        "SELECT gateway.publish($1, $2, $3)",
        quote_ident("h'; DROP TABLE victim; --\\"),
        "'user:' || owner",
        key,
    )
    listed = f'"h\'; DROP TABLE victim; --\\"({", ".join(quote_ident(c) for c in [key, *HOSTILE])})'
    async with running_gateway(dsn, tables=listed) as gw:
        assert await gw.state.pool.fetchval("SHOW standard_conforming_strings") == "off"
        alice = await gw.connect("1")
        await alice.subscribe("user:1")
        await db.execute(
            f"""INSERT INTO "h'; DROP TABLE victim; --\\" VALUES (1, 1, {", ".join("$" + str(i + 1) for i in range(len(HOSTILE)))})""",
            *HOSTILE,
        )
        (event,) = await alice.events(1)
        assert event["table"] == "public.h'; DROP TABLE victim; --\\"
        assert event["row"] == {key: 1, **{c: c for c in HOSTILE}}
        await alice.close()
    assert await db.fetchval("SELECT secret FROM victim") == "s3cret"
