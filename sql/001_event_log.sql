-- 001: the event log, the capture trigger and the publish functions.
--
-- A change on a published table appends one event per changed row to gateway.events,
-- in the same transaction as the change, and sends at most one NOTIFY per statement.
-- The NOTIFY is only a doorbell naming which events exist (topic, position, key):
-- never the row, so PostgreSQL's 8000-byte payload limit is never reached.
--
-- Positions are gap-free and in commit order per topic: the statement that appends to
-- a topic updates that topic's row in gateway.topics and holds its row lock until it
-- commits or rolls back, so the next writer to the same topic waits and then sees the
-- committed position. A rolled-back transaction leaves no event and no hole.
-- Every statement here is idempotent, so running the file twice changes nothing.

CREATE SCHEMA IF NOT EXISTS gateway;

CREATE OR REPLACE FUNCTION gateway.new_epoch() RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT substr(md5(random()::text || clock_timestamp()::text), 1, 8)
$$;

-- One row per topic: its epoch (the identity of its stream) and the last position used.
CREATE TABLE IF NOT EXISTS gateway.topics (
    topic text PRIMARY KEY,
    epoch text NOT NULL DEFAULT gateway.new_epoch(),
    pos   bigint NOT NULL DEFAULT 0
);

-- The durable log. `tbl`/`key` name the changed row; `data` holds hand-published events.
CREATE TABLE IF NOT EXISTS gateway.events (
    topic      text NOT NULL,
    pos        bigint NOT NULL,
    op         "char" NOT NULL CHECK (op IN ('i', 'u', 'd', 'm')),
    tbl        text,
    key        text,
    data       jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, pos)
);
-- Events are appended in time order, so a BRIN index makes age pruning cheap to keep.
CREATE INDEX IF NOT EXISTS events_created_at_brin ON gateway.events USING brin (created_at);

-- Append events (one per array element) and ring the doorbell once.
-- Topics are locked in sorted order so two statements touching the same topics
-- cannot deadlock on each other.
CREATE OR REPLACE FUNCTION gateway.append(
    p_tbl text, p_ops "char"[], p_topics text[], p_keys text[], p_data jsonb[] DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    payload text;
BEGIN
    WITH ch AS (
        SELECT u.op, u.topic, u.key, u.data,
               row_number() OVER (PARTITION BY u.topic ORDER BY u.n) AS rn
        FROM unnest(p_ops, p_topics, p_keys, p_data) WITH ORDINALITY AS u(op, topic, key, data, n)
        WHERE u.topic IS NOT NULL
    ), counts AS (
        SELECT ch.topic, count(*) AS c FROM ch GROUP BY ch.topic
    ), heads AS (
        INSERT INTO gateway.topics AS h (topic, pos)
        SELECT counts.topic, counts.c FROM counts ORDER BY counts.topic
        ON CONFLICT (topic) DO UPDATE SET pos = h.pos + excluded.pos
        RETURNING h.topic, h.epoch, h.pos
    ), ins AS (
        INSERT INTO gateway.events (topic, pos, op, tbl, key, data)
        SELECT ch.topic, heads.pos - counts.c + ch.rn, ch.op, p_tbl, ch.key, ch.data
        FROM ch JOIN counts USING (topic) JOIN heads USING (topic)
        RETURNING topic, pos, op, key
    )
    SELECT CASE
        WHEN count(*) = 0 THEN NULL
        -- Hand-published events carry data of any size: the gateway reads them from the log.
        WHEN bool_or(ins.op = 'm') OR count(*) > 40 THEN NULL
        ELSE json_build_object(
            'v', 1, 'tb', p_tbl,
            'ev', json_agg(json_build_array(ins.topic, heads.epoch, ins.pos, ins.op, ins.key)))::text
        END
    INTO payload
    FROM ins JOIN heads USING (topic);

    IF payload IS NULL OR octet_length(payload) > 7900 THEN
        -- Too big to name each event: name the position range of each topic instead.
        SELECT json_build_object('v', 1, 'rg', json_agg(json_build_array(h.topic, h.epoch, h.pos - c.c + 1, h.pos)))::text
        INTO payload
        FROM (SELECT topic, count(*) AS c FROM unnest(p_topics) AS t(topic) WHERE topic IS NOT NULL GROUP BY topic) c
        JOIN gateway.topics h USING (topic);
        IF payload IS NULL THEN
            RETURN;  -- nothing had a topic
        END IF;
        IF octet_length(payload) > 7900 THEN
            -- Too many topics even for ranges: every gateway re-reads the heads of its topics.
            payload := '{"v":1,"sync":true}';
        END IF;
    END IF;
    PERFORM pg_notify('gateway', payload);
END
$$;

-- Publish an event by hand: `SELECT gateway.emit('room:7', '{"text": "hello"}');`
-- Returns the event's position in the topic.
CREATE OR REPLACE FUNCTION gateway.emit(p_topic text, p_data jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    result bigint;
BEGIN
    IF p_topic IS NULL OR p_topic = '' THEN
        RAISE EXCEPTION 'gateway.emit: topic must be a non-empty text';
    END IF;
    PERFORM gateway.append(NULL, ARRAY['m'::"char"], ARRAY[p_topic], ARRAY[NULL::text], ARRAY[p_data]);
    SELECT pos INTO result FROM gateway.topics WHERE topic = p_topic;
    RETURN result;
END
$$;

-- Start a topic's stream over: its events are deleted and its next event starts a new
-- epoch, so clients resuming with the old epoch are told they cannot be recovered.
CREATE OR REPLACE FUNCTION gateway.reset_topic(p_topic text) RETURNS void
LANGUAGE sql AS $$
    DELETE FROM gateway.events WHERE topic = p_topic;
    DELETE FROM gateway.topics WHERE topic = p_topic;
$$;

-- Attach the capture trigger to a table:
--   SELECT gateway.publish('public.items', $$'user:' || owner_id$$);
-- `p_topic` is an SQL expression over the row's columns giving its topic (rows where it
-- is NULL are not published). `p_key` is the key column (default: the primary key).
-- It generates a small trigger function with the expression compiled in, so the plan is
-- cached and each statement costs one INSERT into the log and one NOTIFY.
CREATE OR REPLACE FUNCTION gateway.publish(p_table regclass, p_topic text, p_key text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    tbl_name text;
    fn text;
    key_expr text;
    topic_expr text;
BEGIN
    SELECT format('%s.%s', n.nspname, c.relname) INTO tbl_name
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_table;

    IF p_key IS NULL THEN
        SELECT string_agg(a.attname, ',') INTO p_key
        FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
        WHERE i.indrelid = p_table AND i.indisprimary;
        IF p_key IS NULL THEN
            RAISE EXCEPTION 'gateway.publish: % has no primary key; pass the key column as the third argument', tbl_name;
        END IF;
        IF position(',' IN p_key) > 0 THEN
            RAISE EXCEPTION 'gateway.publish: % has a composite primary key (%); pass one unique column as the third argument', tbl_name, p_key;
        END IF;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = p_table AND attname = p_key AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'gateway.publish: % has no column %', tbl_name, p_key;
    END IF;
    key_expr := format('(%I)::text', p_key);
    topic_expr := format('(%s)::text', p_topic);
    -- Fail now, with the table's name, if the expression does not work on this table.
    BEGIN
        EXECUTE format('SELECT %s FROM %s LIMIT 0', topic_expr, p_table);
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'gateway.publish: topic expression % does not work on %: %', p_topic, tbl_name, SQLERRM;
    END;

    fn := format('gateway.%I', 'capture_' || replace(tbl_name, '.', '_'));
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION %1$s() RETURNS trigger LANGUAGE plpgsql AS $body$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                PERFORM gateway.append(%2$L, array_agg('i'::"char"), array_agg(%3$s), array_agg(%4$s))
                FROM gateway_new;
            ELSIF TG_OP = 'DELETE' THEN
                PERFORM gateway.append(%2$L, array_agg('d'::"char"), array_agg(%3$s), array_agg(%4$s))
                FROM gateway_old;
            ELSE
                -- A row that moved to another topic is a delete on its old topic.
                PERFORM gateway.append(%2$L, array_agg(x.op), array_agg(x.topic), array_agg(x.key))
                FROM (
                    SELECT 'u'::"char" AS op, %3$s AS topic, %4$s AS key FROM gateway_new
                    UNION ALL
                    SELECT 'd'::"char", o.topic, o.key
                    FROM (SELECT %3$s AS topic, %4$s AS key FROM gateway_old) o
                    WHERE o.topic IS NOT NULL AND NOT EXISTS (
                        SELECT 1 FROM (SELECT %3$s AS topic, %4$s AS key FROM gateway_new) n
                        WHERE n.key = o.key AND n.topic = o.topic)
                ) x;
            END IF;
            RETURN NULL;
        END
        $body$
    $f$, fn, tbl_name, topic_expr, key_expr);

    EXECUTE format('DROP TRIGGER IF EXISTS gateway_capture_insert ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS gateway_capture_update ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS gateway_capture_delete ON %s', p_table);
    EXECUTE format('CREATE TRIGGER gateway_capture_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS gateway_new '
                   'FOR EACH STATEMENT EXECUTE FUNCTION %s()', p_table, fn);
    EXECUTE format('CREATE TRIGGER gateway_capture_update AFTER UPDATE ON %s '
                   'REFERENCING OLD TABLE AS gateway_old NEW TABLE AS gateway_new '
                   'FOR EACH STATEMENT EXECUTE FUNCTION %s()', p_table, fn);
    EXECUTE format('CREATE TRIGGER gateway_capture_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS gateway_old '
                   'FOR EACH STATEMENT EXECUTE FUNCTION %s()', p_table, fn);
END
$$;

-- Stop publishing a table's changes.
CREATE OR REPLACE FUNCTION gateway.unpublish(p_table regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS gateway_capture_insert ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS gateway_capture_update ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS gateway_capture_delete ON %s', p_table);
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
