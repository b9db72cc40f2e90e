-- 003: writers stop paying for NOTIFY under load. The relay.
--
-- Up to 002 every writing statement rang its own NOTIFY inside the writer's transaction.
-- PostgreSQL lets only one notifying transaction commit at a time (a cluster-wide lock held
-- across the commit's WAL flush), so under load writers queued behind each other: single-row
-- UPDATEs on a published table kept 0.43 of their untriggered rate. From here on:
--
-- * Every event records the id of the transaction that wrote it (gateway.events.xid).
-- * One gateway replica at a time, the relay (its lease is the row of gateway.relay), reads
--   the events whose transactions committed since it last looked (visible in its snapshot,
--   not in the previous one, as PgQ does) and rings their doorbells on channel `gateway`,
--   many events per NOTIFY, from its own transaction: writers never wait for it.
-- * Under load the relay looks every few milliseconds and says so by keeping
--   gateway.relay_awake_until (unix milliseconds) in the future; writers then send nothing.
--   When it is quiet, a writing statement sends one NOTIFY on channel `gateway_poll` (empty
--   payload; PostgreSQL folds a transaction's identical notifications into one), which wakes
--   the relay at once. Either way every committed event is rung: see gateway/relay.py for
--   why none can slip between the two modes.
--
-- The flag is a sequence because a sequence's value is not transactional: a writer sees the
-- current value whatever its snapshot (a REPEATABLE READ transaction that began long ago
-- included), and reading it takes no lock that could make writers wait on each other.
-- Every statement here is idempotent.

-- No value for the events already there (adding a column with a volatile default would
-- rewrite the table): they were rung by the triggers of 001.
ALTER TABLE gateway.events ADD COLUMN IF NOT EXISTS xid xid8;
ALTER TABLE gateway.events ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
CREATE INDEX IF NOT EXISTS events_xid ON gateway.events (xid);

CREATE SEQUENCE IF NOT EXISTS gateway.relay_awake_until MINVALUE 0 START 0;

-- The relay's lease, and the snapshot of its last poll: the events of every transaction
-- visible in it have been rung. A replica that takes the lease over starts there, so a relay
-- that died loses nothing (ringing an event twice is harmless: the gateway delivers each
-- position once).
CREATE TABLE IF NOT EXISTS gateway.relay (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    holder      text,
    lease_until timestamptz NOT NULL DEFAULT '-infinity',
    snapshot    pg_snapshot
);
INSERT INTO gateway.relay DEFAULT VALUES ON CONFLICT DO NOTHING;

-- The relay's read (gateway/relay.py): the snapshot now, and the events of every transaction
-- visible in it but not in p_since (at most p_limit of them), as a JSON array of
-- [topic, epoch, pos, op, tbl, key, created_at]. One statement, so one snapshot for both.
-- Sequential scans are off inside it: it runs every few milliseconds and must be an index
-- range on events.xid, but gateway.events grows faster than autovacuum refreshes its
-- statistics, and with stale ones the planner scans the table whole (measured: 30 ms at
-- 70,000 events, against 0.06 ms through the index).
CREATE OR REPLACE FUNCTION gateway.relay_poll(p_since text, p_limit integer, OUT snapshot text, OUT events text)
LANGUAGE sql
SET enable_seqscan = off
AS $$
    WITH cur AS MATERIALIZED (SELECT pg_current_snapshot() AS s)
    SELECT (SELECT s::text FROM cur),
           (SELECT coalesce(json_agg(json_build_array(e.topic, t.epoch, e.pos, e.op, e.tbl, e.key,
                                                      extract(epoch FROM e.created_at)::float8)), '[]')::text
            FROM (SELECT ev.* FROM gateway.events AS ev, cur
                  WHERE ev.xid >= pg_snapshot_xmin(p_since::pg_snapshot)
                    AND pg_visible_in_snapshot(ev.xid, cur.s)
                    AND NOT pg_visible_in_snapshot(ev.xid, p_since::pg_snapshot)
                  LIMIT p_limit) AS e
            LEFT JOIN gateway.topics AS t ON t.topic = e.topic)
$$;

-- Ring for the events this transaction wrote, unless the relay is polling anyway.
CREATE OR REPLACE FUNCTION gateway.ring() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(pg_sequence_last_value('gateway.relay_awake_until'), 0)
       < extract(epoch FROM clock_timestamp()) * 1000 THEN
        PERFORM pg_notify('gateway_poll', '');
    END IF;
END
$$;

-- The doorbell lists of 001 are gone: the relay reads what to ring from the log.
DROP FUNCTION IF EXISTS gateway.log_event(text, text, "char", text, text);
DROP FUNCTION IF EXISTS gateway.bell_add(text, text, text, text, bigint, "char", text);
DROP FUNCTION IF EXISTS gateway.big_doorbell(text);
DROP FUNCTION IF EXISTS gateway.bell_ranges(text);

-- Appends one event of a row change. The generated row triggers do the same inline (a
-- function call per changed row is measurable in the writer's cost); they call this for the
-- rarer second event of a row, the delete where an UPDATE moved a row from. Returns the
-- position, or NULL when the topic is NULL (not published).
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
    RETURN v_pos;
END
$$;

-- Publish an event by hand: `SELECT gateway.emit('room:7', '{"text": "hello"}');`
-- Returns the event's position in the topic.
CREATE OR REPLACE FUNCTION gateway.emit(p_topic text, p_data jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_pos bigint;
BEGIN
    IF p_topic IS NULL OR p_topic = '' THEN
        RAISE EXCEPTION 'gateway.emit: topic must be a non-empty text';
    END IF;
    SELECT a.pos INTO v_pos FROM gateway.advance(p_topic) AS a;
    INSERT INTO gateway.events (topic, pos, op, data) VALUES (p_topic, v_pos, 'm', p_data);
    PERFORM gateway.ring();
    RETURN v_pos;
END
$$;

-- Publish several events by hand in one call: element i of p_data goes to topic p_topics[i]
-- (NULL topics are skipped). Topics are locked in sorted order, so concurrent calls cannot
-- deadlock on each other. Used by presence (sql/002).
CREATE OR REPLACE FUNCTION gateway.emit_many(p_topics text[], p_data jsonb[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_count bigint;
BEGIN
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

-- Attach the capture triggers to a table (this replaces the version of 001):
--   SELECT gateway.publish('public.items', $$'user:' || owner_id$$);
-- `p_topic` is an SQL expression over the row's columns giving its topic (rows where it
-- is NULL are not published). `p_key` is the key column (default: the primary key).
-- Calling it again replaces the previous settings.
--
-- It generates for this table, in schema gateway (names from capture_name()):
--   topic_<table>(the columns the expression uses): the expression as an SQL function;
--   row_topic_<table>(a row of the table): the same for a whole row (used by the gateway);
--   capture_insert_/capture_update_/capture_delete_<table>(): AFTER ... FOR EACH ROW
--     triggers appending the row's event(s);
--   doorbell_<table>(): the AFTER ... FOR EACH STATEMENT trigger that rings the relay when
--     it is not polling anyway (see the top of this file).
--
-- Why the triggers look like this. Measured on single-row UPDATEs (pgbench, and instruction
-- counts under callgrind); a plain UPDATE is about 95k instructions:
-- - Row triggers, not one statement trigger over transition tables: capturing transition
--   tables and querying them (CTEs, window functions, INSERT ... ON CONFLICT every time)
--   cost several times what two cached single-row statements cost.
-- - The position: UPDATE the topic row (one statement, ~55k) and INSERT it only if missing.
--   The event: one INSERT (~60k). These two are the floor of a durable, gap-free log.
-- - No doorbell list: building one per statement (JSON in a transaction-local setting) cost
--   as much again as the event; the relay reads what to ring from the log instead.
-- - PL/pgSQL prepares each expression again in every transaction (~1-2k instructions per
--   function call in it), so the code avoids expressions: names and the table are
--   constants, one function per operation instead of branching on TG_OP; the rarer paths
--   (several topics, moved rows) are in functions called only then.
-- - Assignments instead of PERFORM: PERFORM starts an executor; an expression does not.
-- - The topic expression becomes an SQL function with parameters named like the columns:
--   it reads as written, and PostgreSQL inlines it into the trigger's cached expression.
-- Statements touching many topics lock them in row order; two such statements ordering the
-- same topics differently can deadlock (PostgreSQL aborts one), just as when they update the
-- same rows in different orders.
-- A partitioned table is published through its parent: write through the parent, as a
-- statement on a partition itself does not fire the parent's statement trigger (its events
-- are logged; the relay rings them when it next polls: at once under load, else with the
-- next statement that wakes it, or within GATEWAY_RELAY_IDLE_POLL).
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
    multi text;
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
            RETURN NULL;
        END
    $t$;
    -- %4$L: the transaction-local setting marking "this statement has written a row": set at
    -- its first row, cleared by the statement trigger (AFTER STATEMENT triggers fire after
    -- all AFTER ROW triggers of their statement), undone with a rolled-back (sub)transaction.
    head text := $h$
        CREATE FUNCTION gateway.%1$I() RETURNS trigger LANGUAGE plpgsql AS $body$
        DECLARE
            gw_topic text := %2$s(%3$s);
            gw_pos bigint;
            gw_set text;
        BEGIN
            IF current_setting(%4$L, true) IS DISTINCT FROM '1' THEN
                gw_set := set_config(%4$L, '1', true);
                -- First row of the statement: order the topic locks if it touches several.
                IF %5$s THEN
                    PERFORM gateway.lock_topics(ARRAY(%6$s));
                END IF;
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
    mark := 'gateway.wrote_' || p_table::oid;
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

    -- Whether the statement changed more than one row (a quick look at the transition table).
    multi := '(SELECT count(*) FROM (SELECT 1 FROM %s LIMIT 2) AS x) > 1';
    EXECUTE format(head, gateway.capture_name(p_table, 'capture_insert'), topic_fn, coalesce(new_args, ''), mark,
                   format(multi, 'gateway_new'),
                   format('SELECT %s(%s) FROM gateway_new', topic_fn, coalesce(plain_args, '')))
            || format(tail, 'i', 'NEW', tbl_name, p_key) || '$body$';
    EXECUTE format(head, gateway.capture_name(p_table, 'capture_delete'), topic_fn, coalesce(old_args, ''), mark,
                   format(multi, 'gateway_old'),
                   format('SELECT %s(%s) FROM gateway_old', topic_fn, coalesce(plain_args, '')))
            || format(tail, 'd', 'OLD', tbl_name, p_key) || '$body$';
    -- An UPDATE also touches two topics with one row when the row moves.
    EXECUTE format(head, gateway.capture_name(p_table, 'capture_update'), topic_fn, coalesce(new_args, ''), mark,
                   format('(%s OR %s(%s) IS DISTINCT FROM gw_topic)', format(multi, 'gateway_new'), topic_fn,
                          coalesce(old_args, '')),
                   format('SELECT %1$s(%2$s) FROM gateway_new UNION ALL SELECT %1$s(%2$s) FROM gateway_old',
                          topic_fn, coalesce(plain_args, '')))
            || format($u$
            -- A row that moved to another topic (or got another key) is deleted where it was.
            IF %1$s OR %2$s(%3$s) IS DISTINCT FROM gw_topic THEN
                gw_pos := gateway.log_event(%4$L, 'd', %2$s(%3$s), (OLD.%5$I)::text);
            END IF;
            $u$, key_same, topic_fn, coalesce(old_args, ''), tbl_name, p_key)
            || format(tail, 'u', 'NEW', tbl_name, p_key) || '$body$';

    -- The relay flag is read inline: calling gateway.ring() per statement costs measurably.
    EXECUTE format($f$
        CREATE FUNCTION gateway.%1$I() RETURNS trigger LANGUAGE plpgsql AS $body$
        DECLARE
            done text;
        BEGIN
            IF current_setting(%2$L, true) = '1' THEN
                done := set_config(%2$L, '', true);
                IF coalesce(pg_sequence_last_value('gateway.relay_awake_until'), 0)
                   < extract(epoch FROM clock_timestamp()) * 1000 THEN
                    done := pg_notify('gateway_poll', '');
                END IF;
            END IF;
            RETURN NULL;
        END
        $body$
    $f$, gateway.capture_name(p_table, 'doorbell'), mark);

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
    EXECUTE format('CREATE TRIGGER gateway_doorbell AFTER INSERT OR UPDATE OR DELETE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION gateway.%I()', p_table, gateway.capture_name(p_table, 'doorbell'));
END
$$;

-- Regenerate the triggers of every published table with the definitions above.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT tbl, topic, key_column FROM gateway.published ORDER BY tbl::text LOOP
        PERFORM gateway.publish(r.tbl, r.topic, r.key_column);
    END LOOP;
END
$$;
