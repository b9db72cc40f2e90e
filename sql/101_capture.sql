-- Capture: gateway.publish() attaches to a table the triggers that log its changes.
--
--   SELECT gateway.publish('public.items', $$'user:' || owner_id$$);
--
-- Every INSERT, UPDATE, DELETE and TRUNCATE of a published table appends one event per
-- changed row to gateway.events (100_event_log.sql), in the writer's transaction, and wakes
-- the relay when it is quiet (102_relay.sql). The writer pays for this inside its own
-- transaction, so the generated row triggers are cut down to what measured cheapest: see
-- "Why the triggers look like this" above gateway.publish(), and docs/performance-history.md
-- for the measurements.

-- What gateway.publish() set up, per table: the gateway reads rows by this key column and
-- checks their topic with the generated row_topic function.
CREATE TABLE gateway.published (
    tbl        regclass PRIMARY KEY,
    key_column text NOT NULL,
    topic      text NOT NULL,
    row_topic  text NOT NULL
);

-- The longest prefix of p_text that is at most p_bytes bytes long, cut between characters
-- (byte lengths in the database's encoding, as PostgreSQL counts names).
CREATE FUNCTION gateway.clip_name(p_text text, p_bytes integer) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT CASE WHEN octet_length(p_text) <= p_bytes THEN p_text
                ELSE (SELECT left(p_text, max(k)) FROM generate_series(0, p_bytes) AS k
                      WHERE octet_length(left(p_text, k)) <= p_bytes)
           END
$$;

-- Name of a function publish() generates for a table: <kind>_<schema>_<table>_<hash>,
-- readable, and unique per table even where the readable part is cut. At most 63 bytes
-- (PostgreSQL's max_identifier_length, which counts bytes: 30 Cyrillic letters take 60, 30
-- CJK ones 90), whatever the table is called: the longest kind (capture_update, 14) + '_' +
-- 36 bytes cut between two characters + '_' + 8 hex digits = 60.
CREATE FUNCTION gateway.capture_name(p_table regclass, p_kind text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT p_kind || '_' || gateway.clip_name(n.nspname || '_' || c.relname, 36) || '_'
           || left(md5(n.nspname || '.' || c.relname), 8)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_table
$$;

-- The functions publish() generated for a table:
-- * the functions its capture triggers run;
-- * its row_topic function: the generated function taking a row of the table;
-- * the functions named as capture_name() names them: leftovers whose triggers are gone
--   would still keep publish() from creating functions of the same name;
-- * its topic function, called by name in the bodies of the others (PostgreSQL records no
--   dependency that would lead to it: its parameters are the columns' types).
CREATE FUNCTION gateway.generated_functions(p_table regclass) RETURNS SETOF regprocedure
LANGUAGE sql STABLE AS $$
    WITH names AS (
        SELECT gateway.capture_name(p_table, kind) AS name
        FROM unnest(ARRAY['topic', 'row_topic', 'capture_insert', 'capture_update', 'capture_delete']) AS kind
    ), found AS (
        SELECT p.oid, p.proname, p.prosrc
        FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
        WHERE t.tgrelid = p_table AND p.pronamespace = 'gateway'::regnamespace
          AND t.tgname IN ('gateway_capture_insert', 'gateway_capture_update', 'gateway_capture_delete')
        UNION
        SELECT p.oid, p.proname, p.prosrc
        FROM pg_proc p JOIN pg_class c ON c.oid = p_table
        WHERE p.pronamespace = 'gateway'::regnamespace AND p.proname LIKE 'row\_topic\_%'
          AND p.pronargs = 1 AND p.proargtypes[0] = c.reltype
        UNION
        SELECT p.oid, p.proname, p.prosrc
        FROM pg_proc p
        WHERE p.pronamespace = 'gateway'::regnamespace AND p.proname IN (SELECT names.name FROM names)
    ), called AS (
        -- publish() writes the topic function's name with format('gateway.%I'): unquote it.
        -- Not in the topic function itself: that is the caller's expression, whose functions
        -- are the caller's.
        SELECT CASE WHEN left(m[1], 1) = '"'
                    THEN replace(substr(m[1], 2, length(m[1]) - 2), '""', '"')
                    ELSE m[1] END AS name
        FROM found, regexp_matches(found.prosrc, 'gateway\.("(?:[^"]|"")+"|[a-z_][a-z0-9_]*)\(', 'g') AS m
        WHERE found.proname NOT LIKE 'topic\_%'
    )
    SELECT found.oid::regprocedure FROM found
    UNION
    SELECT p.oid::regprocedure
    FROM pg_proc p
    WHERE p.pronamespace = 'gateway'::regnamespace AND p.proname LIKE 'topic\_%'
      AND p.proname IN (SELECT called.name FROM called)
$$;

-- Stop publishing a table's changes: drops its triggers and generated functions (and, through
-- the trigger on gateway.published below, its TRUNCATE trigger).
CREATE FUNCTION gateway.unpublish(p_table regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    generated regprocedure[];
    f regprocedure;
    trigger_name name;
BEGIN
    IF p_table IS NULL THEN
        RAISE EXCEPTION 'gateway.unpublish: the table must not be NULL';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_class WHERE oid = p_table) THEN
        -- Dropped (its oid, from gateway.published): what is left of it goes, with a notice.
        PERFORM gateway.unpublish_dropped();
        RETURN;
    END IF;
    -- Before the triggers go: they lead to their functions.
    generated := ARRAY(SELECT gateway.generated_functions(p_table));
    -- The triggers there are, rather than DROP TRIGGER IF EXISTS: that says "does not exist,
    -- skipping" for each missing one, so a table's first publish() printed three notices.
    FOR trigger_name IN
        SELECT t.tgname FROM pg_trigger t
        WHERE t.tgrelid = p_table AND NOT t.tgisinternal
          AND t.tgname IN ('gateway_capture_insert', 'gateway_capture_update', 'gateway_capture_delete')
        ORDER BY t.tgname
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trigger_name, p_table);
    END LOOP;
    DELETE FROM gateway.published WHERE tbl = p_table;
    FOREACH f IN ARRAY generated LOOP
        EXECUTE format('DROP FUNCTION %s', f);
    END LOOP;
END
$$;

-- Forget the published tables that were dropped: DROP TABLE takes a table's triggers with it
-- (and, with CASCADE, its row_topic function), but not its row in gateway.published, whose
-- regclass is a bare oid, nor its other generated functions. republish_all() would fail on
-- them, and unpublish() cannot be given a dropped table's name. Each is reported with a notice
-- naming its generated functions (the table's name is gone with it). Returns how many. Needs no
-- superuser (an sql_drop event trigger would, so nothing here depends on one).
CREATE FUNCTION gateway.unpublish_dropped() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    f regprocedure;
    suffix text;
    n integer := 0;
BEGIN
    FOR r IN SELECT p.tbl, p.row_topic FROM gateway.published p
             WHERE NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = p.tbl)
             ORDER BY p.tbl::oid LOOP
        -- Every generated function's name ends as its row_topic function's (capture_name()).
        suffix := substr(r.row_topic, length('row_topic_') + 1);
        FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
                 WHERE p.pronamespace = 'gateway'::regnamespace
                   AND p.proname IN (SELECT kind || '_' || suffix FROM unnest(ARRAY['topic', 'row_topic',
                                     'capture_insert', 'capture_update', 'capture_delete']) AS kind)
                 ORDER BY p.oid LOOP
            EXECUTE format('DROP FUNCTION %s', f);
        END LOOP;
        DELETE FROM gateway.published WHERE tbl = r.tbl;
        RAISE NOTICE 'gateway: the published table with oid % (functions *_%) was dropped: its publication is removed',
            r.tbl::oid, suffix;
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

-- The same at once, at every DROP that can take a table, for whoever drops it (hence SECURITY
-- DEFINER): optional, since only a superuser may create the event trigger that calls it
-- (docs/sql.md, "Publish a table"); nothing depends on it.
--   CREATE EVENT TRIGGER gateway_unpublish_dropped ON sql_drop
--   WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED')
--   EXECUTE FUNCTION gateway.unpublish_dropped_at_drop();
CREATE FUNCTION gateway.unpublish_dropped_at_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM gateway.unpublish_dropped();
END
$$;

-- Appends one event of a row change and rings the relay when it is quiet: used for the rarer
-- events, the delete where an UPDATE moved a row from and the deletes of a TRUNCATE (the row
-- triggers do the same inline: a function call per changed row is measurable in the writer's
-- cost). Returns the position, or NULL when the topic is NULL (not published).
CREATE FUNCTION gateway.log_event(p_tbl text, p_op "char", p_topic text, p_key text) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_pos bigint;
BEGIN
    IF p_topic IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT a.pos INTO v_pos FROM gateway.advance(p_topic) AS a;
    INSERT INTO gateway.events (topic, pos, op, tbl, key) VALUES (p_topic, v_pos, p_op, p_tbl, p_key);
    PERFORM gateway.ring();
    RETURN v_pos;
END
$$;

-- Appends one event per topic of a row published on several topics (publish() with a topic
-- expression giving an array): each distinct topic, NULLs left out, in sorted order (as
-- lock_topics locks them: two writers of rows on the same topics cannot deadlock), and
-- rings the relay once. Returns how many events it appended.
CREATE FUNCTION gateway.log_events(p_tbl text, p_op "char", p_topics text[], p_key text) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_topic text;
    v_pos bigint;
    v_count integer := 0;
    v_x text;
BEGIN
    -- Inline, as in the row triggers (not gateway.advance() and gateway.ring()): a call per
    -- topic is measurable in the writer's cost.
    FOR v_topic IN SELECT DISTINCT t COLLATE "C" FROM unnest(p_topics) AS t WHERE t IS NOT NULL ORDER BY 1 LOOP
        UPDATE gateway.topics SET pos = pos + 1 WHERE topic = v_topic RETURNING pos INTO v_pos;
        IF NOT FOUND THEN
            INSERT INTO gateway.topics AS h (topic, pos) VALUES (v_topic, 1)
            ON CONFLICT (topic) DO UPDATE SET pos = h.pos + 1
            RETURNING h.pos INTO v_pos;
        END IF;
        INSERT INTO gateway.events (topic, pos, op, tbl, key) VALUES (v_topic, v_pos, p_op, p_tbl, p_key);
        v_count := v_count + 1;
    END LOOP;
    IF v_count > 0 AND coalesce(pg_sequence_last_value('gateway.relay_awake_until'), 0)
                       < date_part('epoch', clock_timestamp()) * 1000 THEN
        IF current_setting('gateway.ring', true) IS DISTINCT FROM 'off' THEN
            v_x := pg_notify('gateway_poll', '');
        END IF;
    END IF;
    RETURN v_count;
END
$$;

-- Fill the {name} placeholders of a template with the values p_values names so (a JSON object
-- of texts; a JSON null fills in nothing). One pass: a value is never searched for
-- placeholders itself, so a table named "a{op}" stays as it is. A placeholder with no value
-- is an error, so that a typo in a template cannot go unnoticed. Used by publish() below.
CREATE FUNCTION gateway.fill_template(p_template text, p_values jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    missing text;
BEGIN
    SELECT m[1] INTO missing
    FROM regexp_matches(p_template, '\{([a-z_]+)\}', 'g') AS m
    WHERE NOT p_values ? m[1]
    LIMIT 1;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'gateway.fill_template: no value for the placeholder {%}', missing;
    END IF;
    -- Each piece is a placeholder (m[2] its name), a run of text without braces, or a brace.
    RETURN coalesce((
        SELECT string_agg(CASE WHEN m[2] IS NULL THEN m[1] ELSE p_values ->> m[2] END, '' ORDER BY k)
        FROM regexp_matches(p_template, '(\{([a-z_]+)\}|[^{]+|\{)', 'g') WITH ORDINALITY AS r(m, k)
    ), '');
END
$$;

-- Attach the capture triggers to a table:
--   SELECT gateway.publish('public.items', $$'user:' || owner_id$$);
-- `p_topic` is an SQL expression over the row's columns giving its topic (rows where it
-- is NULL are not published). `p_key` is the key column (default: the primary key, which
-- must then have a single key column). Calling it again replaces the previous settings, and
-- keeps how the table's capture triggers were enabled (ENABLE ALWAYS, ENABLE REPLICA or
-- DISABLE, as an operator set them: see docs/sql.md); unpublish() then publish() starts
-- afresh.
--
-- It generates for this table, in schema gateway (names from capture_name()):
--   topic_<table>(the columns the expression uses): the expression as an SQL function;
--   row_topic_<table>(a row of the table): the same for a whole row (used by the gateway);
--   capture_insert_/capture_update_/capture_delete_<table>(): AFTER ... FOR EACH ROW
--     triggers appending the row's event(s) and ringing the relay when it is quiet: the
--     template `row_trigger` below, with `moved_row` in the update trigger;
-- and the TRUNCATE trigger comes with the row in gateway.published (capture_truncate below).
--
-- Why the triggers look like this (the measurements: docs/performance-history.md):
-- - Row triggers, not one statement trigger over transition tables: capturing transition
--   tables and querying them (CTEs, window functions, INSERT ... ON CONFLICT every time)
--   costs several times what two cached single-row statements cost.
-- - The position: UPDATE the topic row (one statement) and INSERT it only if missing. The
--   event: one INSERT. These two are the floor of a durable, gap-free log. A NULL topic
--   matches no head, so it is checked only when the UPDATE found none.
-- - No statement trigger and no doorbell list: each row trigger rings the relay itself, and
--   only when the relay is quiet (102_relay.sql); PostgreSQL sends a transaction's identical
--   notifications once, so a statement (or a whole transaction) of many rows still sends one
--   NOTIFY. The flag is read after the row's event is written, so the relay's switch to quiet
--   (gateway/relay.py) still covers every writer.
-- - PL/pgSQL sets up each expression or plan again in every new transaction, so the code runs
--   few statements: names and the table are constants, one function per operation instead of
--   branching on TG_OP; the rarer paths (several rows, moved rows) are in functions called
--   only then. Assignments instead of PERFORM where there is a choice: PERFORM starts an
--   executor; an expression does not.
-- - A statement of several rows is recognised by `PERFORM FROM <transition table> OFFSET 1;
--   IF FOUND` (cheaper than an EXISTS sub-select, and than counting), and only then uses a
--   transaction-local setting, gateway.rows_left_<table oid>_<i, u or d>: the first row locks
--   all the statement's topics in sorted order (gateway.lock_topics: two statements cannot
--   deadlock on them) and stores how many rows are left; the others count down, so the next
--   statement starts over at zero. Each trigger has its own setting: a MERGE or an upsert
--   fires them interleaved, in the order its rows come, and a shared one could be left above
--   zero, so that the next statement took its first rows for the MERGE's last ones and
--   locked their topics one by one, in row order. (Such a statement still locks its inserted
--   rows' topics and its updated rows' topics as two groups: docs/sql.md.)
-- - An update computes the old row's topic, to see whether the row moved, only when a column
--   the topic expression reads (or the key) changed. Equal columns give the same topic only
--   if equal means identical, which is not so for every type (numeric 1.0 = 1.00, but their
--   texts differ; a case-insensitive collation), so this is done only when every such column
--   is of a type where it is (integers, boolean, uuid, date, timestamps, and text or varchar
--   under a deterministic collation); otherwise the old topic is computed on every row. (A
--   topic is a function of the row's columns: the gateway already relies on that when it
--   checks, reading a row, that the row still belongs to its event's topic.) The old and new
--   topics are compared COLLATE "C": under a case-insensitive collation 'person:Ann' =
--   'person:ann', two topics. A row that moved touches two topics: they are locked in sorted
--   order too.
-- - The topic expression becomes an SQL function with parameters named like the columns: it
--   reads as written, and PostgreSQL inlines it into the trigger's cached expression. Its
--   body is SQL-standard (LANGUAGE sql RETURN ...), parsed once, when publish() creates it,
--   with publish()'s search_path: the names in it (a function of the application's own, a
--   type, an operator) mean what they meant then, whoever writes the row, and PostgreSQL
--   records what it calls, so dropping such a function while a topic uses it is refused
--   instead of breaking every write. (A COLLATE in its body would not make the topic compare
--   as bytes: PostgreSQL gives an inlined call the collation of its arguments.)
-- - The topics of rows are not checked against the gateway's rule for topics (as emit()'s
--   are): a check per row would cost every writer, and the expression is written once, by
--   whoever publishes the table.
-- - The row triggers are SECURITY DEFINER, owned by the schema's owner (publish() hands them
--   over), so that writers need no privilege on the log (see the end of 100_event_log.sql).
--   That costs nothing measurable. They have no SET search_path clause, unlike the other
--   SECURITY DEFINER functions: it cost about 14k instructions per changed row (PostgreSQL
--   saves, sets and restores the setting at every call), about 4 % of a single-row UPDATE.
--   So they run with the writer's search_path, and every name in them is written with its
--   schema: tables (without a fixed search_path a temporary table would be found first), types
--   (pg_catalog.text: a temporary type would be found first too), functions, operators
--   (`a OPERATOR(pg_catalog.=) b`; such operators all bind alike, hence the parentheses), the
--   collation (pg_catalog."C"). IS DISTINCT FROM and IN look `=` up in the search_path and
--   cannot be given a schema: they are written as NULL-safe comparisons with a named operator
--   (`NOT coalesce(a = b, a IS NULL AND b IS NULL)`), the key's with the `=` its type resolved
--   to when publish() ran. The transition tables (gateway_new, gateway_old) cannot be
--   qualified and need not be: PostgreSQL looks a trigger's transition tables up before any
--   schema. What they call that is not written so (lock_topics, log_event, log_events, and
--   the first-epoch trigger on gateway.topics) has the clause: those run only for multi-row
--   statements, moved rows, new topics and rows on several topics.
--   tests/test_capture.py plants a writer's object of every name they use and checks that
--   none of them runs. The topic function stays a plain SQL function: one with a SET clause
--   or SECURITY DEFINER would not be inlined; its body's names were bound when publish()
--   created it. A function of the application's that a topic expression calls runs as the
--   owner with the writer's search_path (docs/sql.md, "Writer roles", says what that asks of it).
-- A partitioned table is published through its parent; its row triggers fire for rows
-- written through a partition too.
CREATE FUNCTION gateway.publish(p_table regclass, p_topic text, p_key text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    tbl_name text;
    kind "char";
    key_type regtype;
    key_count bigint;
    key_list text;
    key_eq text;        -- the key type's `=`, as OPERATOR(schema.=)
    key_not_null boolean;
    key_same text;
    cols_changed text;
    topic_fn text;
    mark text;
    params text;
    new_args text;
    old_args text;
    row_args text;
    plain_args text;
    probe text;
    topic_call text;    -- the topic function called on a transition table's row (unnested when many)
    trigger_states jsonb;
    trigger_name text;
    trigger_state text;
    many boolean;       -- the expression gives an array: the row is on each of its topics
    risky text;         -- functions the expression calls that look names up at run time
    topic_type text;    -- text, or text[] when many
    schema_owner regrole;
    f regprocedure;
    op text;            -- the loop over the three row triggers: i, d, u
    trigger_kind text;  -- capture_insert, capture_delete, capture_update
    trigger_row text;   -- NEW, or OLD for a delete
    trigger_rows text;  -- its transition table
    -- What every row trigger does first: for a statement of several rows, lock all their
    -- topics in sorted order at the first row. {rows}: the transition table of the
    -- statement's rows (all of them are in it before the first AFTER ROW trigger fires);
    -- {rows_left}: the transaction-local setting counting the rows of a multi-row statement
    -- still to come; {statement_topics}: a query of the statement's topics.
    statement_lock text := $s$
            PERFORM FROM {rows} OFFSET 1;
            IF FOUND THEN
                -- Several rows: at the first, lock all their topics in sorted order.
                gw_x := pg_catalog.current_setting({rows_left}, true);
                IF gw_x IS NULL OR gw_x OPERATOR(pg_catalog.=) '' OR gw_x OPERATOR(pg_catalog.=) '0' THEN
                    PERFORM gateway.lock_topics(ARRAY({statement_topics}));
                    gw_x := (SELECT pg_catalog.count(*) FROM {rows})::pg_catalog.text;
                END IF;
                gw_x := pg_catalog.set_config({rows_left}, (gw_x::pg_catalog.int8 OPERATOR(pg_catalog.-) 1)::pg_catalog.text, true);
            END IF;
$s$;
    -- A row trigger. {function}: its name; {topic_fn}: the topic function and {row_args} the
    -- row's columns it reads (NEW.c or OLD.c); {statement_lock}: `statement_lock` above;
    -- {moved_row}: the update trigger's extra step, `moved_row` below ('' for the others);
    -- {op}: i, u or d; {table}: the table as events name it (schema.table, unquoted); {row}:
    -- NEW or OLD; {key}: the key column. Names and literals are quoted before they are filled in.
    row_trigger text := $t$
        CREATE FUNCTION gateway.{function}() RETURNS pg_catalog.trigger LANGUAGE plpgsql SECURITY DEFINER AS $body$
        DECLARE
            gw_topic pg_catalog.text := {topic_fn}({row_args});
            gw_pos pg_catalog.int8;
            gw_x pg_catalog.text;
        BEGIN{statement_lock}    {moved_row}
            UPDATE gateway.topics SET pos = pos OPERATOR(pg_catalog.+) 1 WHERE topic OPERATOR(pg_catalog.=) gw_topic
            RETURNING pos INTO gw_pos;
            IF NOT FOUND THEN
                IF gw_topic IS NULL THEN
                    RETURN NULL;  -- not published (no head has a NULL topic)
                END IF;
                INSERT INTO gateway.topics AS h (topic, pos) VALUES (gw_topic, 1)
                ON CONFLICT (topic) DO UPDATE SET pos = h.pos OPERATOR(pg_catalog.+) 1
                RETURNING h.pos INTO gw_pos;
            END IF;
            INSERT INTO gateway.events (topic, pos, op, tbl, key)
            VALUES (gw_topic, gw_pos, '{op}', {table}, ({row}.{key})::pg_catalog.text);
            -- gateway.ring(), inline: wake the relay unless it polls anyway.
            IF coalesce(pg_catalog.pg_sequence_last_value('gateway.relay_awake_until'), 0) OPERATOR(pg_catalog.<)
               (pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()) OPERATOR(pg_catalog.*) 1000) THEN
                IF NOT coalesce(pg_catalog.current_setting('gateway.ring', true) OPERATOR(pg_catalog.=) 'off', false) THEN
                    gw_x := pg_catalog.pg_notify('gateway_poll', '');
                END IF;
            END IF;
            RETURN NULL;
        END
    $body$
    $t$;
    -- The update trigger's step for a row that moved. {if_columns_changed} and {end_if}
    -- enclose it in `IF <the key or a column the topic reads changed> THEN ... END IF;` when
    -- the column types allow (see above), else are empty; {key_changed}: the key comparison;
    -- {old_args}: the old row's columns the topic function reads.
    moved_row text := $m$
            -- A row that moved to another topic (or got another key) is deleted where it was.
            -- It touches two topics: lock them in sorted order (a multi-row statement has).
            {if_columns_changed}
            IF {key_changed} OR NOT coalesce({topic_fn}({old_args}) COLLATE pg_catalog."C" OPERATOR(pg_catalog.=) gw_topic,
                                              {topic_fn}({old_args}) IS NULL AND gw_topic IS NULL) THEN
                PERFORM gateway.lock_topics(ARRAY[{topic_fn}({old_args}), gw_topic]);
                gw_pos := gateway.log_event({table}, 'd', {topic_fn}({old_args}), (OLD.{key})::pg_catalog.text);
            END IF;
            {end_if}
            $m$;
    -- The row trigger of a table whose rows are on several topics (the expression gives an
    -- array): one event per topic, through gateway.log_events (sorted, deduplicated, NULLs
    -- left out). The same placeholders as row_trigger; {moved_row} is `moved_rows` below.
    -- Not cut down like row_trigger: a row on several topics costs a loop and a call anyway.
    rows_trigger text := $t$
        CREATE FUNCTION gateway.{function}() RETURNS pg_catalog.trigger LANGUAGE plpgsql SECURITY DEFINER AS $body$
        DECLARE
            gw_topics pg_catalog.text[] := pg_catalog.array_remove(coalesce({topic_fn}({row_args}), '{}'), NULL);
            gw_left pg_catalog.text[];
            gw_n pg_catalog.int4;
            gw_x pg_catalog.text;
        BEGIN{statement_lock}    {moved_row}
            gw_n := gateway.log_events({table}, '{op}', gw_topics, ({row}.{key})::pg_catalog.text);
            RETURN NULL;
        END
    $body$
    $t$;
    -- The update trigger's step for a row on several topics: a delete on each topic it left
    -- (on all its old topics when its key changed), the topics it leaves and the ones it is on
    -- locked in sorted order first. Compared COLLATE "C", as moved_row does.
    moved_rows text := $m$
            {if_columns_changed}
            IF {key_changed} THEN
                gw_left := {topic_fn}({old_args});
            ELSE
                gw_left := ARRAY(SELECT t FROM pg_catalog.unnest({topic_fn}({old_args})) AS t
                                 WHERE t IS NOT NULL AND t COLLATE pg_catalog."C" OPERATOR(pg_catalog.<>) ALL (gw_topics));
            END IF;
            IF pg_catalog.cardinality(gw_left) OPERATOR(pg_catalog.>) 0 THEN
                PERFORM gateway.lock_topics(gw_left OPERATOR(pg_catalog.||) gw_topics);
                gw_n := gateway.log_events({table}, 'd', gw_left, (OLD.{key})::pg_catalog.text);
            END IF;
            {end_if}
            $m$;
BEGIN
    IF p_table IS NULL THEN
        RAISE EXCEPTION 'gateway.publish: the table must not be NULL';
    END IF;
    SELECT format('%s.%s', n.nspname, c.relname), c.relkind INTO tbl_name, kind
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_table;
    IF kind IS NULL THEN
        RAISE EXCEPTION 'gateway.publish: no table has oid % (dropped?)', p_table::oid;
    END IF;
    IF kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'gateway.publish: % is not a table', tbl_name;
    END IF;
    IF p_topic IS NULL OR btrim(p_topic) = '' THEN
        RAISE EXCEPTION 'gateway.publish: the topic expression for % is empty', tbl_name;
    END IF;

    IF p_key IS NULL THEN
        -- Counted, not told apart by commas in the list of names: a name may hold a comma.
        -- Only the first indnkeyatts columns are the key; the rest are INCLUDE columns.
        SELECT count(*), min(a.attname::text), string_agg(quote_ident(a.attname), ', ' ORDER BY k.n)
        INTO key_count, p_key, key_list
        FROM pg_index i CROSS JOIN generate_series(0, i.indnkeyatts - 1) AS k(n)
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[k.n]
        WHERE i.indrelid = p_table AND i.indisprimary;
        IF key_count = 0 THEN
            RAISE EXCEPTION 'gateway.publish: % has no primary key; pass the key column as the third argument', tbl_name;
        END IF;
        IF key_count > 1 THEN
            RAISE EXCEPTION 'gateway.publish: % has a composite primary key (%); pass one unique column as the third argument', tbl_name, key_list;
        END IF;
    END IF;
    SELECT a.atttypid, a.attnotnull INTO key_type, key_not_null
    FROM pg_attribute a WHERE a.attrelid = p_table AND a.attname = p_key AND a.attnum > 0 AND NOT a.attisdropped;
    IF key_type IS NULL THEN
        RAISE EXCEPTION 'gateway.publish: % has no column %', tbl_name, p_key;
    END IF;
    -- An UPDATE compares the old and new key: with the type's own `=` (as publish()'s
    -- search_path finds it), named with its schema (the triggers have no search_path of their
    -- own: see above); as text when the type has none of its own (varchar and domains compare
    -- as text anyway). NULL-safe, as IS DISTINCT FROM, which cannot be given a schema, unless
    -- the column is NOT NULL (a smaller expression: PL/pgSQL sets each one up in every
    -- transaction). The same for the columns the topic reads, below.
    SELECT format('OPERATOR(%s.=)', o.oprnamespace::regnamespace) INTO key_eq
    FROM pg_operator o
    WHERE o.oid = to_regoperator(format('=(%s,%s)', key_type, key_type)) AND o.oprresult = 'bool'::regtype;
    key_same := format(CASE WHEN key_not_null THEN 'NOT (%s)' ELSE 'NOT coalesce(%s, OLD.%2$I IS NULL AND NEW.%2$I IS NULL)' END,
                       format(CASE WHEN key_eq IS NOT NULL THEN 'OLD.%1$I %2$s NEW.%1$I'
                                   ELSE '(OLD.%1$I)::pg_catalog.text OPERATOR(pg_catalog.=) (NEW.%1$I)::pg_catalog.text' END,
                              p_key, key_eq),
                       p_key);

    -- Fail now, with the table's name, if the expression does not work on this table. The
    -- probe view also tells which columns the expression uses: those it depends on.
    probe := 'gateway_publish_probe_' || pg_backend_pid();
    BEGIN
        EXECUTE format('CREATE TEMPORARY VIEW %I AS SELECT (%s) AS topic FROM %s', probe, p_topic, p_table);
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'gateway.publish: topic expression % does not work on %: %', p_topic, tbl_name, SQLERRM;
    END;
    SELECT string_agg(format('%I %s', a.attname, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY a.attnum),
           string_agg(format('NEW.%I', a.attname), ', ' ORDER BY a.attnum),
           string_agg(format('OLD.%I', a.attname), ', ' ORDER BY a.attnum),
           string_agg(format('($1).%I', a.attname), ', ' ORDER BY a.attnum),
           string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum),
           -- The columns' comparison for `moved_row`: NULL when a column's type does not allow
           -- it, '' when the key is the only one (or there is none: a constant topic).
           CASE WHEN coalesce(bool_and(
                    a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype, 'bool'::regtype,
                                   'uuid'::regtype, 'date'::regtype, 'timestamp'::regtype,
                                   'timestamptz'::regtype, 'text'::regtype, 'varchar'::regtype)
                    AND (a.attcollation = 0 OR co.collisdeterministic)), true)
                -- the other columns, each as ' OR <OLD.c IS DISTINCT FROM NEW.c>' (the key is
                -- compared anyway), pg_catalog's `=` being every one of these types' equality
                THEN coalesce(string_agg(format(CASE WHEN a.attnotnull THEN ' OR NOT (OLD.%1$I OPERATOR(pg_catalog.=) NEW.%1$I)'
                                                     ELSE ' OR NOT coalesce(OLD.%1$I OPERATOR(pg_catalog.=) NEW.%1$I, '
                                                          'OLD.%1$I IS NULL AND NEW.%1$I IS NULL)' END, a.attname), ''
                                         ORDER BY a.attnum) FILTER (WHERE a.attname <> p_key), '')
           END
    INTO params, new_args, old_args, row_args, plain_args, cols_changed
    FROM pg_attribute a LEFT JOIN pg_collation co ON co.oid = a.attcollation
    WHERE a.attrelid = p_table AND a.attnum > 0 AND NOT a.attisdropped AND a.attnum IN (
        SELECT d.refobjsubid FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
        WHERE d.classid = 'pg_rewrite'::regclass AND r.ev_class = format('pg_temp.%I', probe)::regclass
          AND d.refclassid = 'pg_class'::regclass AND d.refobjid = p_table);
    -- An array (of text, or of anything cast to text) puts each row on several topics.
    SELECT t.typcategory = 'A' INTO many
    FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
    WHERE a.attrelid = format('pg_temp.%I', probe)::regclass AND a.attname = 'topic';
    topic_type := CASE WHEN many THEN 'text[]' ELSE 'text' END;
    EXECUTE format('DROP VIEW pg_temp.%I', probe);

    -- How the triggers are enabled when not as by default ('O'), set again on the new ones
    -- below (the TRUNCATE trigger is created again by the INSERT into gateway.published).
    SELECT coalesce(jsonb_object_agg(t.tgname, t.tgenabled::text), '{}') INTO trigger_states
    FROM pg_trigger t
    WHERE t.tgrelid = p_table AND t.tgenabled <> 'O'
      AND t.tgname IN ('gateway_capture_insert', 'gateway_capture_update', 'gateway_capture_delete',
                       'gateway_capture_truncate');
    PERFORM gateway.unpublish(p_table);
    topic_fn := format('gateway.%I', gateway.capture_name(p_table, 'topic'));
    mark := 'gateway.rows_left_' || p_table::oid;
    topic_call := format(CASE WHEN many THEN 'pg_catalog.unnest(%s(%s))' ELSE '%s(%s)' END, topic_fn, plain_args);
    -- Not STRICT and VOLATILE (the default): the expression keeps its meaning whatever it
    -- calls, and an SQL function declared so is still inlined. A SQL-standard body: its names
    -- are bound now, not at each write.
    BEGIN
        EXECUTE format('CREATE FUNCTION %s(%s) RETURNS %s LANGUAGE sql RETURN (%s)::%s',
                       topic_fn, coalesce(params, ''), topic_type, p_topic, topic_type);
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'gateway.publish: topic expression % does not work on %: %', p_topic, tbl_name, SQLERRM;
    END;
    -- Functions of the application's that the expression calls run as the owner, in every
    -- write, with the writer's search_path (see "Writer roles" in docs/sql.md). One whose
    -- body is a string and that fixes no search_path looks its names up in the writer's
    -- search_path, where a writer could put its own function first and have it run as the
    -- owner: warn, naming them (PostgreSQL records what an SQL-standard body calls).
    SELECT string_agg(f.oid::regprocedure::text, ', ' ORDER BY f.oid::regprocedure::text) INTO risky
    FROM pg_depend d JOIN pg_proc f ON f.oid = d.refobjid
    WHERE d.classid = 'pg_proc'::regclass AND d.refclassid = 'pg_proc'::regclass
      AND d.objid = (SELECT t.oid FROM pg_proc t
                     WHERE t.pronamespace = 'gateway'::regnamespace
                       AND t.proname = gateway.capture_name(p_table, 'topic'))
      AND f.pronamespace <> 'pg_catalog'::regnamespace
      AND f.prosqlbody IS NULL
      AND f.prolang NOT IN (SELECT l.oid FROM pg_language l WHERE l.lanname IN ('internal', 'c'))
      AND NOT EXISTS (SELECT FROM unnest(f.proconfig) AS c WHERE c LIKE 'search\_path=%');
    IF risky IS NOT NULL THEN
        RAISE WARNING 'gateway.publish: the topic expression of % calls %, which will run as the owner of schema gateway with the search_path of whoever writes the table',
            tbl_name, risky
            USING HINT = 'Give each a SQL-standard body (RETURN ... or BEGIN ATOMIC ... END) or SET search_path = pg_catalog, pg_temp, with its tables named with their schema: see "Writer roles" in docs/sql.md.';
    END IF;
    -- The topic of a whole row: the gateway checks, when it reads a row to send it, that the
    -- row still belongs to the event's topic (it may have moved since the event was written).
    EXECUTE format('CREATE FUNCTION gateway.%I(%s) RETURNS %s LANGUAGE sql AS %L',
                   gateway.capture_name(p_table, 'row_topic'), p_table, topic_type,
                   format('SELECT %s(%s)', topic_fn, coalesce(row_args, '')));
    INSERT INTO gateway.published (tbl, key_column, topic, row_topic)
    VALUES (p_table, p_key, p_topic, gateway.capture_name(p_table, 'row_topic'));

    -- The three row triggers: what differs between them is the operation's row (NEW, or OLD
    -- for a delete), its transition table, and the update's moved-row step.
    FOR op, trigger_kind, trigger_row, trigger_rows IN
        VALUES ('i', 'capture_insert', 'NEW', 'gateway_new'), ('d', 'capture_delete', 'OLD', 'gateway_old'),
               ('u', 'capture_update', 'NEW', 'gateway_new')
    LOOP
        EXECUTE gateway.fill_template(CASE WHEN many THEN rows_trigger ELSE row_trigger END, jsonb_build_object(
            'function', quote_ident(gateway.capture_name(p_table, trigger_kind)),
            'topic_fn', topic_fn,
            'row_args', CASE trigger_row WHEN 'NEW' THEN new_args ELSE old_args END,
            'statement_lock', gateway.fill_template(statement_lock, jsonb_build_object(
                'rows', trigger_rows,
                'rows_left', quote_literal(mark || '_' || op),
                -- An update's rows may move: it touches the topics of its old rows too.
                'statement_topics', CASE op
                    WHEN 'u' THEN format('SELECT %1$s FROM gateway_new UNION ALL SELECT %1$s FROM gateway_old', topic_call)
                    ELSE format('SELECT %s FROM %s', topic_call, trigger_rows) END)),
            'moved_row', CASE op WHEN 'u' THEN gateway.fill_template(CASE WHEN many THEN moved_rows ELSE moved_row END, jsonb_build_object(
                'if_columns_changed', CASE WHEN cols_changed IS NOT NULL
                                           THEN format('IF %s%s THEN  -- only then can the topic differ',
                                                       key_same, cols_changed) END,
                'key_changed', key_same,
                'topic_fn', topic_fn,
                'old_args', old_args,
                'table', quote_literal(tbl_name),
                'key', quote_ident(p_key),
                'end_if', CASE WHEN cols_changed IS NOT NULL THEN 'END IF;' END)) ELSE '' END,
            'op', op,
            'table', quote_literal(tbl_name),
            'row', trigger_row,
            'key', quote_ident(p_key)));
    END LOOP;

    -- The generated functions belong to the schema's owner whoever calls publish() (a
    -- superuser, say): the capture functions are SECURITY DEFINER and run as their owner,
    -- which may write the log.
    SELECT n.nspowner::regrole INTO schema_owner FROM pg_namespace n WHERE n.nspname = 'gateway';
    FOR f IN SELECT g.f FROM gateway.generated_functions(p_table) AS g(f)
             JOIN pg_proc p ON p.oid = g.f WHERE p.proowner <> schema_owner ORDER BY 1 LOOP
        BEGIN
            EXECUTE format('ALTER FUNCTION %s OWNER TO %s', f, schema_owner);
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE EXCEPTION 'gateway.publish: the functions it generates must belong to %, the owner of schema gateway, and % cannot give them to it: call publish() as %',
                schema_owner, current_user, schema_owner;
        END;
    END LOOP;

    EXECUTE format('CREATE TRIGGER gateway_capture_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS gateway_new '
                   'FOR EACH ROW EXECUTE FUNCTION gateway.%I()',
                   p_table, gateway.capture_name(p_table, 'capture_insert'));
    EXECUTE format('CREATE TRIGGER gateway_capture_update AFTER UPDATE ON %s '
                   'REFERENCING OLD TABLE AS gateway_old NEW TABLE AS gateway_new '
                   'FOR EACH ROW EXECUTE FUNCTION gateway.%I()',
                   p_table, gateway.capture_name(p_table, 'capture_update'));
    EXECUTE format('CREATE TRIGGER gateway_capture_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS gateway_old '
                   'FOR EACH ROW EXECUTE FUNCTION gateway.%I()',
                   p_table, gateway.capture_name(p_table, 'capture_delete'));
    FOR trigger_name, trigger_state IN SELECT e.key, e.value FROM jsonb_each_text(trigger_states) AS e LOOP
        EXECUTE format('ALTER TABLE %s %s TRIGGER %I', p_table,
                       CASE trigger_state WHEN 'A' THEN 'ENABLE ALWAYS' WHEN 'R' THEN 'ENABLE REPLICA' ELSE 'DISABLE' END,
                       trigger_name);
    END LOOP;
END
$$;

-- TRUNCATE empties a table without firing its row triggers, yet it is a committed change like
-- any other (docs/guarantees.md): each published table also gets a BEFORE TRUNCATE statement
-- trigger that appends a delete event for each of its rows, in the TRUNCATE's transaction,
-- before the rows go. It costs nothing on the writers' per-row path; a TRUNCATE costs what a
-- DELETE of the same rows would cost in events (it is no longer O(1) for the log). Its
-- function is one generic function, not generated per table: it reads the key column and
-- row_topic function of the table from gateway.published.
-- SECURITY DEFINER like the row triggers; row_security = off: the owner reads the rows, and
-- should a policy of the table apply to it, the TRUNCATE fails rather than log the deletes of
-- only the rows the policy shows.
CREATE FUNCTION gateway.capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET row_security = off AS $$
DECLARE
    p gateway.published;
    n bigint;
    many boolean;
BEGIN
    SELECT * INTO p FROM gateway.published WHERE tbl = TG_RELID;
    IF NOT FOUND THEN
        RETURN NULL;  -- unpublished meanwhile
    END IF;
    -- A table whose rows are on several topics (its row_topic function gives an array).
    SELECT f.prorettype = 'text[]'::regtype INTO many FROM pg_proc f
    WHERE f.oid = format('gateway.%I(%s)', p.row_topic, p.tbl)::regprocedure;
    IF many THEN
        EXECUTE format('SELECT gateway.lock_topics(ARRAY(SELECT DISTINCT x FROM ONLY %s AS t, unnest(gateway.%I(t)) AS x))',
                       p.tbl, p.row_topic);
        EXECUTE format('SELECT sum(gateway.log_events(%L, ''d'', gateway.%I(t), (t.%I)::text)) FROM ONLY %s AS t',
                       TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, p.row_topic, p.key_column, p.tbl)
        INTO n;
        RETURN NULL;
    END IF;
    -- ONLY: the rows of this table; an inheritance child truncated with it fires its own.
    -- Its topics are locked in sorted order first, like a multi-row statement's (publish()).
    EXECUTE format('SELECT gateway.lock_topics(ARRAY(SELECT DISTINCT gateway.%I(t) FROM ONLY %s AS t))',
                   p.row_topic, p.tbl);
    -- The table as the row triggers name it (publish(): schema.table, unquoted). log_event
    -- skips rows whose topic is NULL (not published) and rings the relay when it is quiet.
    EXECUTE format('SELECT count(gateway.log_event(%L, ''d'', gateway.%I(t), (t.%I)::text)) FROM ONLY %s AS t',
                   TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, p.row_topic, p.key_column, p.tbl)
    INTO n;
    RETURN NULL;
END
$$;

-- publish() records a table in gateway.published after attaching its row triggers, and
-- unpublish() deletes the record: attach and remove the TRUNCATE trigger with it.
CREATE FUNCTION gateway.published_truncate_trigger() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        -- A table dropped since has no triggers left to drop (nor one whose TRUNCATE trigger
        -- was dropped by hand: checked first, so that nothing says "does not exist, skipping").
        IF EXISTS (SELECT FROM pg_trigger WHERE tgrelid = OLD.tbl AND tgname = 'gateway_capture_truncate') THEN
            EXECUTE format('DROP TRIGGER gateway_capture_truncate ON %s', OLD.tbl);
        END IF;
        RETURN NULL;
    END IF;
    EXECUTE format('CREATE OR REPLACE TRIGGER gateway_capture_truncate BEFORE TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION gateway.capture_truncate()', NEW.tbl);
    RETURN NULL;
END
$$;
CREATE TRIGGER gateway_truncate_trigger AFTER INSERT OR DELETE ON gateway.published
FOR EACH ROW EXECUTE FUNCTION gateway.published_truncate_trigger();

-- Regenerate the triggers of every published table with the current publish(): a migration
-- that changes what publish() generates restates publish() and then calls this.
-- Tables dropped since they were published are forgotten first (unpublish_dropped()). A table
-- that lost its key column cannot be published again as it was: that stops the migration,
-- saying what to do.
CREATE FUNCTION gateway.republish_all() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    PERFORM gateway.unpublish_dropped();
    FOR r IN SELECT tbl, topic, key_column FROM gateway.published ORDER BY tbl::text LOOP
        IF NOT EXISTS (SELECT FROM pg_attribute a
                       WHERE a.attrelid = r.tbl AND a.attname = r.key_column AND a.attnum > 0
                         AND NOT a.attisdropped) THEN
            RAISE EXCEPTION 'gateway.republish_all: % is published with key column %, which it no longer has (every write to it fails until this is fixed)',
                r.tbl, quote_ident(r.key_column)
                USING HINT = format('Publish it again with another unique column as its key, SELECT gateway.publish(%L, %L, ''<column>''), or SELECT gateway.unpublish(%L); then run this again.',
                                    r.tbl::text, r.topic, r.tbl::text);
        END IF;
        PERFORM gateway.publish(r.tbl, r.topic, r.key_column);
    END LOOP;
END
$$;

-- Who may do what (see the end of 100_event_log.sql). The generated capture functions and
-- capture_truncate are SECURITY DEFINER: writers of a published table need no privilege on the
-- log. publish() runs the topic expression it is given as the schema's owner, in every write
-- of the table: only the owner (and superusers) may call it and the functions that change
-- what is published.
REVOKE EXECUTE ON FUNCTION
    gateway.unpublish(regclass), gateway.unpublish_dropped(), gateway.unpublish_dropped_at_drop(),
    gateway.log_event(text, "char", text, text), gateway.log_events(text, "char", text[], text),
    gateway.fill_template(text, jsonb), gateway.publish(regclass, text, text), gateway.capture_truncate(),
    gateway.published_truncate_trigger(), gateway.republish_all()
FROM PUBLIC;
