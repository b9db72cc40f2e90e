-- 008: names that publish() and emit() get right: generated function names that fit
-- whatever the table is called, a one-column primary key whatever its name, and only topics
-- a client can subscribe to.
--
-- 1. Generated function names. gateway.publish() names the functions it generates after the
--    table (capture_name(), sql/001), cutting the readable schema_table part to 36
--    characters to stay within PostgreSQL's 63-byte names (max_identifier_length). That
--    limit counts bytes: with a long non-ASCII name (30 Cyrillic letters take 60 bytes, 30
--    CJK ones 90) the names came out longer, and PostgreSQL cut them, hash included, with
--    only a NOTICE. unpublish() then looked for the uncut names, found nothing and left the
--    functions behind, so publishing the table again failed ("function ... already exists"),
--    as would any migration that re-publishes every table; and two tables whose names begin
--    alike could not both be published. From here on:
--    * capture_name() cuts the readable part to 36 bytes, between two characters: every name
--      fits, and ASCII names are exactly what they were.
--    * unpublish() finds a table's generated functions from the table (generated_functions():
--      what its triggers run, the row_topic function taking its rows, the topic function
--      those call) and by name under the new and the old naming, so it drops functions made
--      under either.
--    * Every published table is re-published at the end: the functions of a non-ASCII table
--      get names that fit and the old ones are dropped. The trigger bodies are unchanged.
-- 2. The default key column. publish() took the primary key for a composite one when the list
--    of its column names held a comma: a one-column key named "a,b" was refused, and so was
--    any key with INCLUDE columns (they were listed too). It now counts the key columns
--    (pg_index.indnkeyatts). publish() is restated for that; what it generates is unchanged.
-- 3. Topics of emit() and emit_many(). They took any non-empty text, so events could go to
--    topics the gateway refuses to subscribe to (bad_topic), never to be delivered. They now
--    refuse those, saying what is wrong, by the gateway's own rule (invalid_topic_reason()).
--    The capture triggers do not check the topics of rows: a check per row would cost every
--    writer, and the topic expression is written once, by whoever publishes the table.
-- Every statement here is idempotent.

-- The longest prefix of p_text that is at most p_bytes bytes long, cut between characters
-- (byte lengths in the database's encoding, as PostgreSQL counts names).
CREATE OR REPLACE FUNCTION gateway.clip_name(p_text text, p_bytes integer) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT CASE WHEN octet_length(p_text) <= p_bytes THEN p_text
                ELSE (SELECT left(p_text, max(k)) FROM generate_series(0, p_bytes) AS k
                      WHERE octet_length(left(p_text, k)) <= p_bytes)
           END
$$;

-- Name of a function publish() generates for a table: <kind>_<schema>_<table>_<hash>,
-- readable, and unique per table even where the readable part is cut. At most 63 bytes:
-- the longest kind (capture_update, 14) + '_' + 36 + '_' + 8 hex digits = 60.
CREATE OR REPLACE FUNCTION gateway.capture_name(p_table regclass, p_kind text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT p_kind || '_' || gateway.clip_name(n.nspname || '_' || c.relname, 36) || '_'
           || left(md5(n.nspname || '.' || c.relname), 8)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_table
$$;

-- The functions publish() generated for a table, however they were named:
-- * the functions its capture triggers (and 003's statement trigger) run;
-- * its row_topic function: the generated function taking a row of the table;
-- * the functions named as capture_name() names them now, and as it named them before this
--   migration (cut by characters, then cut again to 63 bytes by PostgreSQL): leftovers whose
--   triggers are gone still keep publish() from creating functions of the same name;
-- * its topic function, called by name in the bodies of the others (PostgreSQL records no
--   dependency that would lead to it: its parameters are the columns' types).
CREATE OR REPLACE FUNCTION gateway.generated_functions(p_table regclass) RETURNS SETOF regprocedure
LANGUAGE sql STABLE AS $$
    WITH kinds AS (
        SELECT unnest(ARRAY['topic', 'row_topic', 'capture_insert', 'capture_update', 'capture_delete',
                            'doorbell']) AS kind
    ), names AS (
        SELECT gateway.capture_name(p_table, kinds.kind) AS name FROM kinds
        UNION
        SELECT gateway.clip_name(kinds.kind || '_' || left(n.nspname || '_' || c.relname, 36) || '_'
                                 || left(md5(n.nspname || '.' || c.relname), 8),
                                 current_setting('max_identifier_length')::integer)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, kinds
        WHERE c.oid = p_table
    ), found AS (
        SELECT p.oid, p.proname, p.prosrc
        FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
        WHERE t.tgrelid = p_table AND p.pronamespace = 'gateway'::regnamespace
          AND t.tgname IN ('gateway_capture_insert', 'gateway_capture_update', 'gateway_capture_delete',
                           'gateway_doorbell')
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
        -- publish() writes the topic function's name with format('gateway.%I'), uncut: unquote
        -- it and cut it as PostgreSQL did when it created the function. Not in the topic
        -- function itself: that is the caller's expression, whose functions are the caller's.
        SELECT gateway.clip_name(CASE WHEN left(m[1], 1) = '"'
                                      THEN replace(substr(m[1], 2, length(m[1]) - 2), '""', '"')
                                      ELSE m[1] END,
                                 current_setting('max_identifier_length')::integer) AS name
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

-- Stop publishing a table's changes: drops its triggers and generated functions.
CREATE OR REPLACE FUNCTION gateway.unpublish(p_table regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    generated regprocedure[];
    f regprocedure;
BEGIN
    IF p_table IS NULL THEN
        RAISE EXCEPTION 'gateway.unpublish: the table must not be NULL';
    END IF;
    -- Before the triggers go: they lead to their functions.
    generated := ARRAY(SELECT gateway.generated_functions(p_table));
    EXECUTE format('DROP TRIGGER IF EXISTS gateway_capture_insert ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS gateway_capture_update ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS gateway_capture_delete ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS gateway_doorbell ON %s', p_table);
    DELETE FROM gateway.published WHERE tbl = p_table;
    FOREACH f IN ARRAY generated LOOP
        EXECUTE format('DROP FUNCTION %s', f);
    END LOOP;
END
$$;

-- Attach the capture triggers to a table:
--   SELECT gateway.publish('public.items', $$'user:' || owner_id$$);
-- `p_topic` is an SQL expression over the row's columns giving its topic (rows where it
-- is NULL are not published). `p_key` is the key column (default: the primary key, which
-- must then have a single key column). Calling it again replaces the previous settings.
-- The version of sql/004, whose comments say what it generates and why the triggers look as
-- they do, but for the default key: decided by the number of key columns, not by a comma in
-- the list of their names.
CREATE OR REPLACE FUNCTION gateway.publish(p_table regclass, p_topic text, p_key text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    tbl_name text;
    kind "char";
    key_type regtype;
    key_count bigint;
    key_list text;
    key_same text;
    topic_fn text;
    mark text;
    params text;
    new_args text;
    old_args text;
    row_args text;
    plain_args text;
    probe text;
    -- The part shared by the three row triggers: append the event.
    -- %1$s: 'i'/'u'/'d'; %2$s: NEW/OLD; %3$L: table name; %4$I: key column.
    tail text := $t$
            IF gw_topic IS NULL THEN
                RETURN NULL;
            END IF;
            UPDATE gateway.topics SET pos = pos + 1 WHERE topic = gw_topic RETURNING pos INTO gw_pos;
            IF NOT FOUND THEN
                INSERT INTO gateway.topics AS h (topic, pos) VALUES (gw_topic, 1)
                ON CONFLICT (topic) DO UPDATE SET pos = h.pos + 1
                RETURNING h.pos INTO gw_pos;
            END IF;
            INSERT INTO gateway.events (topic, pos, op, tbl, key) VALUES (gw_topic, gw_pos, '%1$s', %3$L, (%2$s.%4$I)::text);
            -- gateway.ring(), inline: wake the relay unless it polls anyway.
            IF coalesce(pg_sequence_last_value('gateway.relay_awake_until'), 0)
               < date_part('epoch', clock_timestamp()) * 1000 THEN
                gw_x := pg_notify('gateway_poll', '');
            END IF;
            RETURN NULL;
        END
    $t$;
    -- %4$L: the transaction-local setting counting the rows of a multi-row statement still to
    -- come; %5$s: the transition table (all the statement's rows are in it before the first
    -- AFTER ROW trigger fires); %6$s: a query of the statement's topics.
    head text := $h$
        CREATE FUNCTION gateway.%1$I() RETURNS trigger LANGUAGE plpgsql AS $body$
        DECLARE
            gw_topic text := %2$s(%3$s);
            gw_pos bigint;
            gw_x text;
        BEGIN
            IF EXISTS (SELECT 1 FROM %5$s OFFSET 1) THEN
                -- Several rows: at the first, lock all their topics in sorted order.
                gw_x := current_setting(%4$L, true);
                IF gw_x IS NULL OR gw_x IN ('', '0') THEN
                    PERFORM gateway.lock_topics(ARRAY(%6$s));
                    gw_x := (SELECT count(*) FROM %5$s)::text;
                END IF;
                gw_x := set_config(%4$L, (gw_x::bigint - 1)::text, true);
            END IF;
    $h$;
BEGIN
    IF p_table IS NULL THEN
        RAISE EXCEPTION 'gateway.publish: the table must not be NULL';
    END IF;
    SELECT format('%s.%s', n.nspname, c.relname), c.relkind INTO tbl_name, kind
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_table;
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
    SELECT a.atttypid INTO key_type
    FROM pg_attribute a WHERE a.attrelid = p_table AND a.attname = p_key AND a.attnum > 0 AND NOT a.attisdropped;
    IF key_type IS NULL THEN
        RAISE EXCEPTION 'gateway.publish: % has no column %', tbl_name, p_key;
    END IF;
    -- An UPDATE compares the old and new key: directly if the type has an equality, else as text.
    BEGIN
        EXECUTE format('SELECT NULL::%s IS DISTINCT FROM NULL::%s', key_type, key_type);
        key_same := format('OLD.%1$I IS DISTINCT FROM NEW.%1$I', p_key);
    EXCEPTION WHEN OTHERS THEN
        key_same := format('(OLD.%1$I)::text IS DISTINCT FROM (NEW.%1$I)::text', p_key);
    END;

    -- Fail now, with the table's name, if the expression does not work on this table. The
    -- probe view also tells which columns the expression uses: those it depends on.
    probe := 'gateway_publish_probe_' || pg_backend_pid();
    BEGIN
        EXECUTE format('CREATE TEMPORARY VIEW %I AS SELECT (%s)::text AS topic FROM %s', probe, p_topic, p_table);
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'gateway.publish: topic expression % does not work on %: %', p_topic, tbl_name, SQLERRM;
    END;
    SELECT string_agg(format('%I %s', a.attname, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY a.attnum),
           string_agg(format('NEW.%I', a.attname), ', ' ORDER BY a.attnum),
           string_agg(format('OLD.%I', a.attname), ', ' ORDER BY a.attnum),
           string_agg(format('($1).%I', a.attname), ', ' ORDER BY a.attnum),
           string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum)
    INTO params, new_args, old_args, row_args, plain_args
    FROM pg_attribute a
    WHERE a.attrelid = p_table AND a.attnum > 0 AND NOT a.attisdropped AND a.attnum IN (
        SELECT d.refobjsubid FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
        WHERE d.classid = 'pg_rewrite'::regclass AND r.ev_class = format('pg_temp.%I', probe)::regclass
          AND d.refclassid = 'pg_class'::regclass AND d.refobjid = p_table);
    EXECUTE format('DROP VIEW pg_temp.%I', probe);

    PERFORM gateway.unpublish(p_table);
    topic_fn := format('gateway.%I', gateway.capture_name(p_table, 'topic'));
    mark := 'gateway.rows_left_' || p_table::oid;
    -- Not STRICT and VOLATILE (the default): the expression keeps its meaning whatever it
    -- calls, and an SQL function declared so is still inlined.
    BEGIN
        EXECUTE format('CREATE FUNCTION %s(%s) RETURNS text LANGUAGE sql AS %L',
                       topic_fn, coalesce(params, ''), format('SELECT (%s)::text', p_topic));
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'gateway.publish: topic expression % does not work on %: %', p_topic, tbl_name, SQLERRM;
    END;
    -- The topic of a whole row: the gateway checks, when it reads a row to send it, that the
    -- row still belongs to the event's topic (it may have moved since the event was written).
    EXECUTE format('CREATE FUNCTION gateway.%I(%s) RETURNS text LANGUAGE sql AS %L',
                   gateway.capture_name(p_table, 'row_topic'), p_table,
                   format('SELECT %s(%s)', topic_fn, coalesce(row_args, '')));
    INSERT INTO gateway.published (tbl, key_column, topic, row_topic)
    VALUES (p_table, p_key, p_topic, gateway.capture_name(p_table, 'row_topic'));

    EXECUTE format(head, gateway.capture_name(p_table, 'capture_insert'), topic_fn, coalesce(new_args, ''), mark,
                   'gateway_new', format('SELECT %s(%s) FROM gateway_new', topic_fn, coalesce(plain_args, '')))
            || format(tail, 'i', 'NEW', tbl_name, p_key) || '$body$';
    EXECUTE format(head, gateway.capture_name(p_table, 'capture_delete'), topic_fn, coalesce(old_args, ''), mark,
                   'gateway_old', format('SELECT %s(%s) FROM gateway_old', topic_fn, coalesce(plain_args, '')))
            || format(tail, 'd', 'OLD', tbl_name, p_key) || '$body$';
    EXECUTE format(head, gateway.capture_name(p_table, 'capture_update'), topic_fn, coalesce(new_args, ''), mark,
                   'gateway_new',
                   format('SELECT %1$s(%2$s) FROM gateway_new UNION ALL SELECT %1$s(%2$s) FROM gateway_old',
                          topic_fn, coalesce(plain_args, '')))
            || format($u$
            -- A row that moved to another topic (or got another key) is deleted where it was.
            -- It touches two topics: lock them in sorted order (a multi-row statement has).
            IF %1$s OR %2$s(%3$s) IS DISTINCT FROM gw_topic THEN
                PERFORM gateway.lock_topics(ARRAY[%2$s(%3$s), gw_topic]);
                gw_pos := gateway.log_event(%4$L, 'd', %2$s(%3$s), (OLD.%5$I)::text);
            END IF;
            $u$, key_same, topic_fn, coalesce(old_args, ''), tbl_name, p_key)
            || format(tail, 'u', 'NEW', tbl_name, p_key) || '$body$';

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
END
$$;

-- Why no client could subscribe to a topic, or NULL if one can. This is the gateway's own
-- rule for subscribe (validate_topic() in gateway/authz.py, which answers bad_topic
-- otherwise; docs/protocol.md): kind:id, at most 200 characters, printable ASCII without
-- spaces (! to ~), no *. The checks run in the same order, and tests/test_sql_names.py
-- checks that both sides agree.
CREATE OR REPLACE FUNCTION gateway.invalid_topic_reason(p_topic text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_topic IS NULL THEN 'the topic is NULL'
        WHEN p_topic = '' THEN 'the topic is empty'
        WHEN length(p_topic) > 200 THEN 'the topic is longer than 200 characters'
        -- COLLATE "C": the range is by character code, whatever the database's collation.
        WHEN p_topic COLLATE "C" !~ '^[!-~]+$'
            THEN 'the topic may only contain printable ASCII characters without spaces'
        WHEN strpos(p_topic, '*') > 0
            THEN 'the topic contains ''*'': wildcards are only for grants in tokens'
        WHEN strpos(p_topic, ':') IN (0, 1) OR strpos(p_topic, ':') = length(p_topic)
            THEN 'the topic must look like kind:id, such as user:42 or room:7'
    END
$$;

-- The error of emit() and emit_many() for a topic no client could subscribe to: its events
-- would sit in the log, never delivered. p_caller names the function (and the element).
CREATE OR REPLACE FUNCTION gateway.refuse_topic(p_caller text, p_topic text, p_problem text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%: bad topic %: %. No client can subscribe to it: a topic is kind:id, such as room:7, of at most 200 printable ASCII characters, without spaces or *',
        p_caller,
        CASE WHEN length(p_topic) > 60 THEN quote_literal(left(p_topic, 60)) || '...' ELSE quote_nullable(p_topic) END,
        p_problem;
END
$$;

-- Publish an event by hand: `SELECT gateway.emit('room:7', '{"text": "hello"}');`
-- Returns the event's position in the topic. As in sql/003, but the topic must be one a
-- client can subscribe to.
CREATE OR REPLACE FUNCTION gateway.emit(p_topic text, p_data jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_pos bigint;
    v_problem text := gateway.invalid_topic_reason(p_topic);
BEGIN
    IF v_problem IS NOT NULL THEN
        PERFORM gateway.refuse_topic('gateway.emit', p_topic, v_problem);
    END IF;
    SELECT a.pos INTO v_pos FROM gateway.advance(p_topic) AS a;
    INSERT INTO gateway.events (topic, pos, op, data) VALUES (p_topic, v_pos, 'm', p_data);
    PERFORM gateway.ring();
    RETURN v_pos;
END
$$;

-- Publish several events by hand in one call: element i of p_data goes to topic p_topics[i]
-- (NULL topics are skipped). Topics are locked in sorted order, so concurrent calls cannot
-- deadlock on each other. Used by presence (sql/002). As in sql/003, but every topic must be
-- one a client can subscribe to: else nothing is published.
CREATE OR REPLACE FUNCTION gateway.emit_many(p_topics text[], p_data jsonb[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_count bigint;
    v_bad record;
BEGIN
    SELECT u.n, u.topic, u.problem INTO v_bad
    FROM (SELECT t.n, t.topic, gateway.invalid_topic_reason(t.topic) AS problem
          FROM unnest(p_topics) WITH ORDINALITY AS t(topic, n)
          WHERE t.topic IS NOT NULL) AS u
    WHERE u.problem IS NOT NULL
    ORDER BY u.n
    LIMIT 1;
    IF FOUND THEN
        PERFORM gateway.refuse_topic(format('gateway.emit_many (element %s)', v_bad.n), v_bad.topic, v_bad.problem);
    END IF;
    WITH ch AS (
        SELECT u.topic, u.data, row_number() OVER (PARTITION BY u.topic ORDER BY u.n) AS rn
        FROM unnest(p_topics, p_data) WITH ORDINALITY AS u(topic, data, n)
        WHERE u.topic IS NOT NULL
    ), counts AS (
        SELECT ch.topic, count(*) AS c FROM ch GROUP BY ch.topic
    ), heads AS (
        INSERT INTO gateway.topics AS h (topic, pos)
        SELECT counts.topic, counts.c FROM counts ORDER BY counts.topic
        ON CONFLICT (topic) DO UPDATE SET pos = h.pos + excluded.pos
        RETURNING h.topic, h.pos
    ), ins AS (
        INSERT INTO gateway.events (topic, pos, op, data)
        SELECT ch.topic, heads.pos - counts.c + ch.rn, 'm', ch.data
        FROM ch JOIN counts USING (topic) JOIN heads USING (topic)
        RETURNING 1
    )
    SELECT count(*) INTO v_count FROM ins;
    IF v_count > 0 THEN
        PERFORM gateway.ring();
    END IF;
END
$$;

-- Regenerate the triggers of every published table: the functions of a table with a long
-- non-ASCII name get names that fit, and the old ones are dropped (see unpublish above).
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT tbl, topic, key_column FROM gateway.published ORDER BY tbl::text LOOP
        PERFORM gateway.publish(r.tbl, r.topic, r.key_column);
    END LOOP;
END
$$;
