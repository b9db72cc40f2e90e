-- 014: topics compare as bytes, whatever the collation of the text they were made from.
--
-- A text value carries the collation of the column it came from, and so does a topic made
-- from it: `'person:' || name` where `name text COLLATE "POSIX"` (or "en-x-icu", or any
-- collation but the database's default and "C"). gateway.topics.topic is COLLATE "C", and
-- PostgreSQL cannot compare two texts of two different collations ("could not determine
-- which collation to use for string comparison"). So, on such a table:
-- * every statement of several rows, and every update moving a row to another topic, failed:
--   the application's write was refused (gateway.lock_topics() and gateway.advance());
-- * gateway.emit(), emit_many() and reset_topic() failed when given such a topic;
-- * under a case-insensitive collation ('Ann' = 'ann'), an update changing a row's topic only
--   in case ('person:Ann' to 'person:ann') was taken as not moving the row: no delete on the
--   old topic, whose subscribers kept the row.
-- Now every function that takes topics compares them COLLATE "C" (the values are the same;
-- the gateway and the heads compare them so already), and the update trigger compares the
-- old and new topics that way. A COLLATE in the generated topic function's body would not
-- do: PostgreSQL gives an inlined call the collation of its arguments.
-- Every statement here is idempotent.

-- As in sql/001, comparing the head's topic as bytes.
CREATE OR REPLACE FUNCTION gateway.advance(p_topic text, OUT epoch text, OUT pos bigint)
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE gateway.topics AS h SET pos = h.pos + 1 WHERE h.topic = p_topic COLLATE "C"
    RETURNING h.epoch, h.pos INTO epoch, pos;
    IF NOT FOUND THEN
        INSERT INTO gateway.topics AS h (topic, pos) VALUES (p_topic, 1)
        ON CONFLICT (topic) DO UPDATE SET pos = h.pos + 1
        RETURNING h.epoch, h.pos INTO epoch, pos;
    END IF;
END
$$;

-- As in sql/009, with the topics taken as bytes first (under a case-insensitive collation
-- DISTINCT would also have merged 'Ann' and 'ann', two topics).
CREATE OR REPLACE FUNCTION gateway.lock_topics(p_topics text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_topics text[] COLLATE "C" := ARRAY(SELECT DISTINCT t COLLATE "C" FROM unnest(p_topics) AS t WHERE t IS NOT NULL);
BEGIN
    IF cardinality(v_topics) < 2 THEN
        RETURN;  -- one topic: its row trigger locks it, nothing to order
    END IF;
    INSERT INTO gateway.topics (topic)
    SELECT t FROM unnest(v_topics) AS t
    WHERE NOT EXISTS (SELECT FROM gateway.topics AS h WHERE h.topic = t)
    ORDER BY 1
    ON CONFLICT DO NOTHING;
    PERFORM 1 FROM gateway.topics WHERE topic = ANY (v_topics) ORDER BY topic FOR UPDATE;
END
$$;

-- As in sql/009.
CREATE OR REPLACE FUNCTION gateway.reset_topic(p_topic text) RETURNS void
LANGUAGE sql AS $$
    UPDATE gateway.topics SET epoch = gateway.new_epoch(), pos = 0 WHERE topic = p_topic COLLATE "C";
    DELETE FROM gateway.events WHERE topic = p_topic COLLATE "C";
$$;

-- As in sql/008, with the topic taken as bytes (v_topic).
CREATE OR REPLACE FUNCTION gateway.emit(p_topic text, p_data jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_topic text COLLATE "C" := p_topic;
    v_pos bigint;
    v_problem text := gateway.invalid_topic_reason(v_topic);
BEGIN
    IF v_problem IS NOT NULL THEN
        PERFORM gateway.refuse_topic('gateway.emit', v_topic, v_problem);
    END IF;
    SELECT a.pos INTO v_pos FROM gateway.advance(v_topic) AS a;
    INSERT INTO gateway.events (topic, pos, op, data) VALUES (v_topic, v_pos, 'm', p_data);
    PERFORM gateway.ring();
    RETURN v_pos;
END
$$;

-- As in sql/008, with the topics taken as bytes (v_topics).
CREATE OR REPLACE FUNCTION gateway.emit_many(p_topics text[], p_data jsonb[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_topics text[] COLLATE "C" := p_topics;
    v_count bigint;
    v_bad record;
BEGIN
    SELECT u.n, u.topic, u.problem INTO v_bad
    FROM (SELECT t.n, t.topic, gateway.invalid_topic_reason(t.topic) AS problem
          FROM unnest(v_topics) WITH ORDINALITY AS t(topic, n)
          WHERE t.topic IS NOT NULL) AS u
    WHERE u.problem IS NOT NULL
    ORDER BY u.n
    LIMIT 1;
    IF FOUND THEN
        PERFORM gateway.refuse_topic(format('gateway.emit_many (element %s)', v_bad.n), v_bad.topic, v_bad.problem);
    END IF;
    WITH ch AS (
        SELECT u.topic, u.data, row_number() OVER (PARTITION BY u.topic ORDER BY u.n) AS rn
        FROM unnest(v_topics, p_data) WITH ORDINALITY AS u(topic, data, n)
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

-- The update trigger's "did the row move" comparison, as bytes: publish() patched in place by
-- gateway.patch_function() (sql/012), which skips it when it already has been.
SELECT gateway.patch_function('gateway.publish(regclass, text, text)', '014_topics_as_bytes', $n$IF %1$s OR %2$s(%3$s) COLLATE "C" IS DISTINCT FROM gw_topic THEN$n$, ARRAY[[
    $o$IF %1$s OR %2$s(%3$s) IS DISTINCT FROM gw_topic THEN$o$,
    $n$IF %1$s OR %2$s(%3$s) COLLATE "C" IS DISTINCT FROM gw_topic THEN$n$
]]);
SELECT gateway.republish_all();
