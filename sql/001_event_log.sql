-- 001: the event log, the capture triggers and the publish functions.
--
-- A change on a published table appends one event per changed row to gateway.events,
-- in the same transaction as the change, and sends at most one NOTIFY per statement.
-- The NOTIFY is only a doorbell naming which events exist (topic, position, key):
-- never the row, so PostgreSQL's 8000-byte payload limit is never reached.
--
-- Positions are gap-free and in commit order per topic: appending to a topic updates that
-- topic's row in gateway.topics and holds its row lock until the transaction commits or
-- rolls back, so the next writer to the same topic waits and then sees the committed
-- position. A rolled-back transaction leaves no event and no hole.
-- Every statement here is idempotent, so running the file twice changes nothing.
--
-- The writer pays for all this inside its own transaction, so the hot path is cut down to
-- what measured cheapest: see "Why the triggers look like this" above gateway.publish().

CREATE SCHEMA IF NOT EXISTS gateway;

CREATE OR REPLACE FUNCTION gateway.new_epoch() RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT substr(md5(random()::text || clock_timestamp()::text), 1, 8)
$$;

-- One row per topic: its epoch (the identity of its stream) and the last position used.
-- Topics are names, compared byte by byte: COLLATE "C" spares every index comparison a
-- locale-aware strcoll(). Every writer of a topic updates its row, so rows are spread over
-- pages (fillfactor): writers of different topics then seldom wait on the same page, and
-- each update finds room on its page for the new version (a HOT update, no index change).
CREATE TABLE IF NOT EXISTS gateway.topics (
    topic text COLLATE "C" PRIMARY KEY,
    epoch text NOT NULL DEFAULT gateway.new_epoch(),
    pos   bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 10);
ALTER TABLE gateway.topics SET (fillfactor = 10);

-- The durable log. `tbl`/`key` name the changed row; `data` holds hand-published events.
-- `op` is 'i', 'u', 'd' (row changes) or 'm' (gateway.emit). Only the functions below write
-- it and they write nothing else; there is no CHECK constraint because every INSERT
-- statement prepares its CHECK expressions anew, which measured as 5% of a trigger's cost.
CREATE TABLE IF NOT EXISTS gateway.events (
    topic      text COLLATE "C" NOT NULL,
    pos        bigint NOT NULL,
    op         "char" NOT NULL,
    tbl        text,
    key        text,
    data       jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, pos)
);
ALTER TABLE gateway.events DROP CONSTRAINT IF EXISTS events_op_check;
-- Events are appended in time order, so a BRIN index makes age pruning cheap to keep.
CREATE INDEX IF NOT EXISTS events_created_at_brin ON gateway.events USING brin (created_at);

-- What gateway.publish() set up, per table: the gateway reads rows by this key column and
-- checks their topic with the generated row_topic function.
CREATE TABLE IF NOT EXISTS gateway.published (
    tbl        regclass PRIMARY KEY,
    key_column text NOT NULL,
    topic      text NOT NULL,
    row_topic  text NOT NULL
);

-- The doorbell of a statement is collected by its row triggers in a transaction-local
-- setting, gateway.bell_<table oid>, and rung once by its statement trigger (AFTER
-- STATEMENT triggers fire after all AFTER ROW triggers of their statement). Being a local
-- setting, it is undone with the (sub)transaction that set it, exactly like the events.
-- A statement run by a trigger of another statement on the same table rings what has been
-- collected so far, which are events of this transaction too: doorbells only have to name
-- every event once the transaction commits. The value:
--   ''                                     nothing yet
--   '[topic,epoch,pos,op,key],...'         every event, while that list is short
--   'r[topic,epoch,first_pos],...'         one entry per topic, once the list grew too long
--   's'                                    too many topics even for that
-- The last two are padded with spaces to 7600 bytes, so that the row triggers and the
-- statement trigger tell them apart by length alone (each function call counts, see below).

-- The per-topic entries ('r' form, unpadded) for an event list: each topic's first position;
-- 's' when they do not fit either.
CREATE OR REPLACE FUNCTION gateway.bell_ranges(p_events text) RETURNS text
LANGUAGE sql AS $$
    SELECT CASE WHEN octet_length(r) > 7000 THEN 's' ELSE 'r' || r END
    FROM (SELECT string_agg(json_build_array(s.topic, s.epoch, s.first)::text, ',') AS r
          FROM (SELECT e ->> 0 AS topic, e ->> 1 AS epoch, min((e ->> 2)::bigint) AS first
                FROM json_array_elements(('[' || p_events || ']')::json) AS e
                GROUP BY 1, 2) s) t
$$;

-- Adds an event to a statement's doorbell that already holds one (the row triggers set the
-- first one themselves: all a one-row statement needs). Returns the setting's new value.
CREATE OR REPLACE FUNCTION gateway.bell_add(
    p_var text, p_acc text, p_topic text, p_epoch text, p_pos bigint, p_op "char", p_key text
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v text;
BEGIN
    IF p_acc = '' THEN
        v := json_build_array(p_topic, p_epoch, p_pos, p_op, p_key)::text;
    ELSIF left(p_acc, 1) = '[' THEN
        v := p_acc || ',' || json_build_array(p_topic, p_epoch, p_pos, p_op, p_key)::text;
        IF octet_length(v) > 7000 THEN
            -- Too many events to name one by one: name each topic's first position instead
            -- (the statement trigger adds the last).
            v := rpad(gateway.bell_ranges(v), 7600);
        END IF;
    ELSIF left(p_acc, 1) = 'r' THEN
        -- '["topic",' can only start an entry: inside a JSON string a quote is escaped.
        IF strpos(p_acc, '[' || to_json(p_topic)::text || ',') > 0 THEN
            RETURN p_acc;
        END IF;
        v := rtrim(p_acc) || ',' || json_build_array(p_topic, p_epoch, p_pos)::text;
        IF octet_length(v) > 7000 THEN
            v := 's';
        END IF;
        v := rpad(v, 7600);
    ELSE
        RETURN p_acc;  -- 's': nothing more to collect
    END IF;
    RETURN set_config(p_var, v, true);
END
$$;

-- The doorbell of a statement whose event list does not fit one payload: per-topic
-- position ranges, or, with too many topics, the request to re-read every head.
CREATE OR REPLACE FUNCTION gateway.big_doorbell(p_acc text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    payload text;
BEGIN
    IF left(p_acc, 1) = '[' THEN
        p_acc := gateway.bell_ranges(p_acc);
    END IF;
    IF left(p_acc, 1) = 'r' THEN
        -- This transaction holds each topic's row lock, so the head is its last position.
        SELECT '{"v":1,"rg":['
               || string_agg(json_build_array(e ->> 0, e ->> 1, (e ->> 2)::bigint, h.pos)::text, ',') || ']}'
        INTO payload
        FROM json_array_elements(('[' || rtrim(substr(p_acc, 2)) || ']')::json) AS e
        JOIN gateway.topics h ON h.topic = e ->> 0;
        IF octet_length(payload) < 7990 THEN
            RETURN payload;
        END IF;
    END IF;
    RETURN '{"v":1,"sync":true}';
END
$$;

-- Takes the next position of a topic (creating its head row), holding the head's row lock
-- until the transaction ends. The generated row triggers do the same inline, because a
-- function call per changed row is measurable in the writer's cost; the rarer paths call this.
CREATE OR REPLACE FUNCTION gateway.advance(p_topic text, OUT epoch text, OUT pos bigint)
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE gateway.topics AS h SET pos = h.pos + 1 WHERE h.topic = p_topic RETURNING h.epoch, h.pos INTO epoch, pos;
    IF NOT FOUND THEN
        INSERT INTO gateway.topics AS h (topic, pos) VALUES (p_topic, 1)
        ON CONFLICT (topic) DO UPDATE SET pos = h.pos + 1
        RETURNING h.epoch, h.pos INTO epoch, pos;
    END IF;
END
$$;

-- Appends one event of a row change and adds it to the statement's doorbell (p_var names
-- the setting): the general form of what the generated row triggers do inline. They call it
-- for the rarer second event of a row, the delete where an UPDATE moved a row from. Returns
-- the position, or NULL when the topic is NULL (not published).
CREATE OR REPLACE FUNCTION gateway.log_event(
    p_tbl text, p_var text, p_op "char", p_topic text, p_key text
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_epoch text;
    v_pos bigint;
    v_acc text;
BEGIN
    IF p_topic IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT a.epoch, a.pos INTO v_epoch, v_pos FROM gateway.advance(p_topic) AS a;
    INSERT INTO gateway.events (topic, pos, op, tbl, key) VALUES (p_topic, v_pos, p_op, p_tbl, p_key);
    v_acc := gateway.bell_add(p_var, coalesce(current_setting(p_var, true), ''), p_topic, v_epoch, v_pos, p_op, p_key);
    RETURN v_pos;
END
$$;

-- Publish an event by hand: `SELECT gateway.emit('room:7', '{"text": "hello"}');`
-- Returns the event's position in the topic. Its data can be of any size, so its doorbell
-- always names a position range: the gateway reads the event from the log.
CREATE OR REPLACE FUNCTION gateway.emit(p_topic text, p_data jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_epoch text;
    v_pos bigint;
    v_payload text;
BEGIN
    IF p_topic IS NULL OR p_topic = '' THEN
        RAISE EXCEPTION 'gateway.emit: topic must be a non-empty text';
    END IF;
    SELECT a.epoch, a.pos INTO v_epoch, v_pos FROM gateway.advance(p_topic) AS a;
    INSERT INTO gateway.events (topic, pos, op, data) VALUES (p_topic, v_pos, 'm', p_data);
    v_payload := '{"v":1,"rg":[' || json_build_array(p_topic, v_epoch, v_pos, v_pos)::text || ']}';
    IF octet_length(v_payload) >= 7990 THEN
        v_payload := '{"v":1,"sync":true}';  -- a topic name too long to fit
    END IF;
    PERFORM pg_notify('gateway', v_payload);
    RETURN v_pos;
END
$$;

-- Publish several events by hand in one call, with one doorbell: element i of p_data goes
-- to topic p_topics[i] (NULL topics are skipped). Topics are locked in sorted order, so
-- concurrent calls cannot deadlock on each other. Used by presence (sql/002).
CREATE OR REPLACE FUNCTION gateway.emit_many(p_topics text[], p_data jsonb[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_payload text;
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
        RETURNING h.topic, h.epoch, h.pos
    ), ins AS (
        INSERT INTO gateway.events (topic, pos, op, data)
        SELECT ch.topic, heads.pos - counts.c + ch.rn, 'm', ch.data
        FROM ch JOIN counts USING (topic) JOIN heads USING (topic)
    )
    SELECT '{"v":1,"rg":[' || string_agg(
               json_build_array(heads.topic, heads.epoch, heads.pos - counts.c + 1, heads.pos)::text, ',')
           || ']}'
    INTO v_payload
    FROM heads JOIN counts USING (topic);
    IF v_payload IS NULL THEN
        RETURN;  -- no topic: nothing published
    END IF;
    IF octet_length(v_payload) >= 7990 THEN
        v_payload := '{"v":1,"sync":true}';  -- too many topics to name
    END IF;
    PERFORM pg_notify('gateway', v_payload);
END
$$;

-- Start a topic's stream over: its events are deleted and its next event starts a new
-- epoch, so clients resuming with the old epoch are told they cannot be recovered.
CREATE OR REPLACE FUNCTION gateway.reset_topic(p_topic text) RETURNS void
LANGUAGE sql AS $$
    DELETE FROM gateway.events WHERE topic = p_topic;
    DELETE FROM gateway.topics WHERE topic = p_topic;
$$;

-- Name of a function publish() generates for a table: readable, and unique per table even
-- where the readable part is cut to fit PostgreSQL's 63-byte names.
CREATE OR REPLACE FUNCTION gateway.capture_name(p_table regclass, p_kind text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT p_kind || '_' || left(n.nspname || '_' || c.relname, 36) || '_'
           || left(md5(n.nspname || '.' || c.relname), 8)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_table
$$;

-- Stop publishing a table's changes: drops its triggers and generated functions.
CREATE OR REPLACE FUNCTION gateway.unpublish(p_table regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    f regprocedure;
BEGIN
    IF p_table IS NULL THEN
        RAISE EXCEPTION 'gateway.unpublish: the table must not be NULL';
    END IF;
    EXECUTE format('DROP TRIGGER IF EXISTS gateway_capture_insert ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS gateway_capture_update ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS gateway_capture_delete ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS gateway_doorbell ON %s', p_table);
    DELETE FROM gateway.published WHERE tbl = p_table;
    FOR f IN
        SELECT p.oid FROM pg_proc p
        WHERE p.pronamespace = 'gateway'::regnamespace
          AND p.proname IN (SELECT gateway.capture_name(p_table, k)
                            FROM unnest(ARRAY['topic', 'row_topic', 'capture_insert', 'capture_update',
                                              'capture_delete', 'doorbell']) AS k)
    LOOP
        EXECUTE format('DROP FUNCTION %s', f);
    END LOOP;
END
$$;

-- Lock the heads of every topic a statement will append to, in sorted order, creating the
-- missing ones. The row triggers call it at a statement's first row when the statement
-- touches several topics: the heads are then locked in one global order, so two statements
-- writing the same topics in different row orders cannot deadlock on them. (Transactions of
-- several statements still lock statement by statement, as with any row locks.)
CREATE OR REPLACE FUNCTION gateway.lock_topics(p_topics text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT count(DISTINCT t) FROM unnest(p_topics) AS t) < 2 THEN
        RETURN;  -- one topic: its row trigger locks it, nothing to order
    END IF;
    INSERT INTO gateway.topics (topic)
    SELECT DISTINCT t FROM unnest(p_topics) AS t WHERE t IS NOT NULL ORDER BY 1
    ON CONFLICT DO NOTHING;
    PERFORM 1 FROM gateway.topics WHERE topic = ANY (p_topics) ORDER BY topic FOR UPDATE;
END
$$;

-- Attach the capture triggers to a table:
--   SELECT gateway.publish('public.items', $$'user:' || owner_id$$);
-- `p_topic` is an SQL expression over the row's columns giving its topic (rows where it
-- is NULL are not published). `p_key` is the key column (default: the primary key).
-- Calling it again replaces the previous settings.
--
-- It generates for this table, in schema gateway (names from capture_name()):
--   topic_<table>(the columns the expression uses): the expression as an SQL function;
--   row_topic_<table>(a row of the table): the same for a whole row (used by the gateway);
--   capture_insert_/capture_update_/capture_delete_<table>(): AFTER ... FOR EACH ROW
--     triggers appending the row's event(s) and collecting the statement's doorbell;
--   doorbell_<table>(): the AFTER ... FOR EACH STATEMENT trigger that rings it.
--
-- Why the triggers look like this. Measured on single-row UPDATEs (pgbench, and instruction
-- counts under callgrind); a plain UPDATE is about 95k instructions:
-- - Row triggers, not one statement trigger over transition tables: capturing transition
--   tables and querying them (CTEs, window functions, INSERT ... ON CONFLICT every time)
--   cost several times what two cached single-row statements cost.
-- - The position: UPDATE the topic row (one statement, ~55k) and INSERT it only if missing.
--   The event: one INSERT (~60k). These two are the floor of a durable, gap-free log.
-- - PL/pgSQL prepares each expression again in every transaction (~1-2k instructions per
--   function call in it), so the code avoids expressions: names and the table are
--   constants, one function per operation instead of branching on TG_OP, a one-row
--   statement's doorbell entry is one json_build_array and its doorbell one concatenation;
--   the rest (long lists, moved rows) is in functions called only then.
-- - Assignments instead of PERFORM: PERFORM starts an executor; an expression does not.
-- - The topic expression becomes an SQL function with parameters named like the columns:
--   it reads as written, and PostgreSQL inlines it into the trigger's cached expression.
-- Statements touching many topics lock them in row order; two such statements ordering the
-- same topics differently can deadlock (PostgreSQL aborts one), just as when they update the
-- same rows in different orders.
-- A partitioned table is published through its parent: write through the parent, as a
-- statement on a partition itself does not fire the parent's statement trigger (its events
-- are logged; its doorbell rings with the transaction's next statement on the parent, else
-- the gateway finds the events when it next reads the topic).
CREATE OR REPLACE FUNCTION gateway.publish(p_table regclass, p_topic text, p_key text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    tbl_name text;
    kind "char";
    key_type regtype;
    key_same text;
    topic_fn text;
    bell text;
    params text;
    new_args text;
    old_args text;
    row_args text;
    plain_args text;
    multi text;
    probe text;
    -- The part shared by the three row triggers: append the event, collect the doorbell.
    -- %1$s: 'i'/'u'/'d'; %2$s: NEW/OLD; %3$L: table name; %4$I: key column; %5$L: setting.
    tail text := $t$
            IF gw_topic IS NULL THEN
                RETURN NULL;
            END IF;
            UPDATE gateway.topics SET pos = pos + 1 WHERE topic = gw_topic RETURNING epoch, pos INTO gw_epoch, gw_pos;
            IF NOT FOUND THEN
                INSERT INTO gateway.topics AS h (topic, pos) VALUES (gw_topic, 1)
                ON CONFLICT (topic) DO UPDATE SET pos = h.pos + 1
                RETURNING h.epoch, h.pos INTO gw_epoch, gw_pos;
            END IF;
            INSERT INTO gateway.events (topic, pos, op, tbl, key) VALUES (gw_topic, gw_pos, '%1$s', %3$L, (%2$s.%4$I)::text);
            gw_acc := coalesce(current_setting(%5$L, true), '');
            IF gw_acc = '' THEN
                gw_acc := set_config(%5$L, json_build_array(gw_topic, gw_epoch, gw_pos, '%1$s'::text, (%2$s.%4$I)::text)::text, true);
            ELSE
                gw_acc := gateway.bell_add(%5$L, gw_acc, gw_topic, gw_epoch, gw_pos, '%1$s', (%2$s.%4$I)::text);
            END IF;
            RETURN NULL;
        END
    $t$;
    head text := $h$
        CREATE FUNCTION gateway.%1$I() RETURNS trigger LANGUAGE plpgsql AS $body$
        DECLARE
            gw_topic text := %2$s(%3$s);
            gw_epoch text;
            gw_pos bigint;
            gw_acc text;
        BEGIN
            -- First row of the statement: order the topic locks if it touches several.
            IF coalesce(current_setting(%4$L, true), '') = '' AND %5$s THEN
                PERFORM gateway.lock_topics(ARRAY(%6$s));
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
    bell := 'gateway.bell_' || p_table::oid;
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
    EXECUTE format(head, gateway.capture_name(p_table, 'capture_insert'), topic_fn, coalesce(new_args, ''), bell,
                   format(multi, 'gateway_new'),
                   format('SELECT %s(%s) FROM gateway_new', topic_fn, coalesce(plain_args, '')))
            || format(tail, 'i', 'NEW', tbl_name, p_key, bell) || '$body$';
    EXECUTE format(head, gateway.capture_name(p_table, 'capture_delete'), topic_fn, coalesce(old_args, ''), bell,
                   format(multi, 'gateway_old'),
                   format('SELECT %s(%s) FROM gateway_old', topic_fn, coalesce(plain_args, '')))
            || format(tail, 'd', 'OLD', tbl_name, p_key, bell) || '$body$';
    -- An UPDATE also touches two topics with one row when the row moves.
    EXECUTE format(head, gateway.capture_name(p_table, 'capture_update'), topic_fn, coalesce(new_args, ''), bell,
                   format('(%s OR %s(%s) IS DISTINCT FROM gw_topic)', format(multi, 'gateway_new'), topic_fn,
                          coalesce(old_args, '')),
                   format('SELECT %1$s(%2$s) FROM gateway_new UNION ALL SELECT %1$s(%2$s) FROM gateway_old',
                          topic_fn, coalesce(plain_args, '')))
            || format($u$
            -- A row that moved to another topic (or got another key) is deleted where it was.
            IF %1$s OR %2$s(%3$s) IS DISTINCT FROM gw_topic THEN
                gw_pos := gateway.log_event(%4$L, %5$L, 'd', %2$s(%3$s), (OLD.%6$I)::text);
            END IF;
            $u$, key_same, topic_fn, coalesce(old_args, ''), tbl_name, bell, p_key)
            || format(tail, 'u', 'NEW', tbl_name, p_key, bell) || '$body$';

    EXECUTE format($f$
        CREATE FUNCTION gateway.%1$I() RETURNS trigger LANGUAGE plpgsql AS $body$
        DECLARE
            acc text := current_setting(%2$L, true);
            done text;
        BEGIN
            IF acc <> '' THEN
                done := set_config(%2$L, '', true);
                -- 7600 bytes and the table's name (at most 2 x 63 bytes, escaped) fit 8000.
                IF octet_length(acc) < 7600 THEN
                    -- ts: when the statement ended, just before its commit (for latency metrics).
                    done := pg_notify('gateway', %3$L || acc || '],"ts":' || extract(epoch FROM clock_timestamp()) || '}');
                ELSE
                    done := pg_notify('gateway', gateway.big_doorbell(acc));
                END IF;
            END IF;
            RETURN NULL;
        END
        $body$
    $f$, gateway.capture_name(p_table, 'doorbell'), bell, '{"v":1,"tb":' || to_json(tbl_name)::text || ',"ev":[');

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

-- Topic authorization for topics the token does not grant. The gateway calls it once per
-- subscription (and again on token refresh) and caches the answer briefly.
-- This default grants nothing more; replace it with your own rules, e.g.
--   CREATE OR REPLACE FUNCTION gateway.authorize(user_id text, topic text, claims jsonb)
--   RETURNS boolean LANGUAGE sql STABLE AS $$
--       SELECT EXISTS (SELECT 1 FROM room_members m
--                      WHERE 'room:' || m.room_id = topic AND m.user_id = authorize.user_id)
--   $$;
-- It is created only when missing, so re-running migrations keeps your version.
DO $$
BEGIN
    IF to_regprocedure('gateway.authorize(text, text, jsonb)') IS NULL THEN
        CREATE FUNCTION gateway.authorize(user_id text, topic text, claims jsonb) RETURNS boolean
        LANGUAGE sql STABLE AS 'SELECT false';
    END IF;
END
$$;
