-- 004: a cheaper capture trigger (the writer cost of sql/003, measured again).
--
-- Instruction counts of one single-row UPDATE in its own transaction (callgrind, a
-- single-user backend; the same UPDATE on a table without triggers is about 150k):
--   the 003 triggers                                           406k
--   of which: the head UPDATE and the event INSERT             +161k over no trigger at all
--             counting the transition table (is it one row?)   +34k
--             the "first row" setting and the statement
--             trigger that reads, clears and rings             +45k
--   these triggers                                             ~358k (344k measured
--             without the BRIN index on created_at, which costs 14k)
-- So from here on:
-- * No statement trigger. Each row trigger rings the relay itself when it is quiet:
--   PostgreSQL sends a transaction's identical notifications once, so a statement (or a whole
--   transaction) of many rows still sends one NOTIFY. The flag is read after the row's event
--   is written, so the relay's switch to quiet (gateway/relay.py) still covers every writer.
-- * A statement of several rows is recognised by `EXISTS (SELECT 1 FROM <transition table>
--   OFFSET 1)` (a third of the count's price), and only then uses a transaction-local
--   setting: the first row locks the statement's topics in sorted order and stores how many
--   rows are left; the others count down, so the next statement starts over at zero.
-- Every statement here is idempotent.

-- The relay's read (sql/003), in PL/pgSQL with one generic plan: a LANGUAGE sql function
-- with a SET clause is planned again at every call, and so is a PL/pgSQL query whose custom
-- plans look cheaper than the generic one; planning cost more than running (0.5-0.9 ms of
-- the relay's backend per poll, 200 polls a second under load, against 0.15 ms).
-- The events are read after the snapshot is taken: every transaction visible in it has
-- committed by then, so its events are visible to the read.
CREATE OR REPLACE FUNCTION gateway.relay_poll(p_since text, p_limit integer, OUT snapshot text, OUT events text)
LANGUAGE plpgsql
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_since pg_snapshot := p_since::pg_snapshot;
    v_now pg_snapshot := pg_current_snapshot();
BEGIN
    snapshot := v_now::text;
    -- The epoch as a subquery per event, not a join: a join's generic plan hashes the whole
    -- of gateway.topics (one row per topic: millions with per-user topics) at every poll.
    SELECT coalesce(json_agg(json_build_array(
               e.topic, (SELECT t.epoch FROM gateway.topics AS t WHERE t.topic = e.topic),
               e.pos, e.op, e.tbl, e.key, date_part('epoch', e.created_at))), '[]')::text
    INTO events
    FROM (SELECT ev.topic, ev.pos, ev.op, ev.tbl, ev.key, ev.created_at FROM gateway.events AS ev
          WHERE ev.xid >= pg_snapshot_xmin(v_since)
            AND pg_visible_in_snapshot(ev.xid, v_now)
            AND NOT pg_visible_in_snapshot(ev.xid, v_since)
          LIMIT p_limit) AS e;
END
$$;

-- Wake the relay unless it polls anyway (sql/003). date_part, not extract: a float, not a
-- numeric, is cheaper to compute on every row.
CREATE OR REPLACE FUNCTION gateway.ring() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(pg_sequence_last_value('gateway.relay_awake_until'), 0)
       < date_part('epoch', clock_timestamp()) * 1000 THEN
        PERFORM pg_notify('gateway_poll', '');
    END IF;
END
$$;

-- Appends one event of a row change and rings: used by the generated update trigger for the
-- delete where a row moved from (see sql/003). Returns the position, or NULL when the topic
-- is NULL (not published).
CREATE OR REPLACE FUNCTION gateway.log_event(p_tbl text, p_op "char", p_topic text, p_key text) RETURNS bigint
LANGUAGE plpgsql AS $$
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

-- Attach the capture triggers to a table (this replaces the version of 003, whose comment
-- says why the triggers look as they do):
--   SELECT gateway.publish('public.items', $$'user:' || owner_id$$);
-- `p_topic` is an SQL expression over the row's columns giving its topic (rows where it
-- is NULL are not published). `p_key` is the key column (default: the primary key).
-- Calling it again replaces the previous settings.
--
-- It generates for this table, in schema gateway (names from capture_name()):
--   topic_<table>(the columns the expression uses): the expression as an SQL function;
--   row_topic_<table>(a row of the table): the same for a whole row (used by the gateway);
--   capture_insert_/capture_update_/capture_delete_<table>(): AFTER ... FOR EACH ROW
--     triggers appending the row's event(s) and ringing the relay when it is quiet.
-- A partitioned table is published through its parent; its row triggers fire for rows
-- written through a partition too.
CREATE OR REPLACE FUNCTION gateway.publish(p_table regclass, p_topic text, p_key text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    tbl_name text;
    kind "char";
    key_type regtype;
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
        SELECT string_agg(a.attname, ', ') INTO p_key
        FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
        WHERE i.indrelid = p_table AND i.indisprimary;
        IF p_key IS NULL THEN
            RAISE EXCEPTION 'gateway.publish: % has no primary key; pass the key column as the third argument', tbl_name;
        END IF;
        IF position(',' IN p_key) > 0 THEN
            RAISE EXCEPTION 'gateway.publish: % has a composite primary key (%); pass one unique column as the third argument', tbl_name, p_key;
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


-- Regenerate the triggers of every published table with the definitions above (unpublish,
-- called by publish, drops 003's statement triggers and their functions).
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT tbl, topic, key_column FROM gateway.published ORDER BY tbl::text LOOP
        PERFORM gateway.publish(r.tbl, r.topic, r.key_column);
    END LOOP;
END
$$;
