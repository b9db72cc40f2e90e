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

-- emit() and emit_many() of sql/008, patched in place by gateway.patch_function() (sql/012)
-- rather than restated: they take the topics as bytes (v_topic, v_topics) where they check
-- them (invalid_topic_reason's strpos() refuses a nondeterministic collation) and, in
-- emit_many, where they meet the heads. emit() passes its topic to advance(), fixed above.
SELECT gateway.patch_function('gateway.emit(text, jsonb)', '014_topics_as_bytes', 'v_topic text COLLATE "C"', ARRAY[[
    $o$    v_problem text := gateway.invalid_topic_reason(p_topic);$o$,
    $n$    v_topic text COLLATE "C" := p_topic;
    v_problem text := gateway.invalid_topic_reason(v_topic);$n$
]]);
SELECT gateway.patch_function('gateway.emit_many(text[], jsonb[])', '014_topics_as_bytes', 'v_topics text[] COLLATE "C"', ARRAY[
    [$o$    v_count bigint;$o$,
     $n$    v_topics text[] COLLATE "C" := p_topics;
    v_count bigint;$n$],
    [$o$FROM unnest(p_topics) WITH ORDINALITY AS t(topic, n)$o$,
     $n$FROM unnest(v_topics) WITH ORDINALITY AS t(topic, n)$n$],
    [$o$FROM unnest(p_topics, p_data) WITH ORDINALITY AS u(topic, data, n)$o$,
     $n$FROM unnest(v_topics, p_data) WITH ORDINALITY AS u(topic, data, n)$n$]
]);

-- The update trigger's "did the row move" comparison, as bytes: publish() patched in place by
-- gateway.patch_function() (sql/012), which skips it when it already has been.
SELECT gateway.patch_function('gateway.publish(regclass, text, text)', '014_topics_as_bytes', $n$IF %1$s OR %2$s(%3$s) COLLATE "C" IS DISTINCT FROM gw_topic THEN$n$, ARRAY[[
    $o$IF %1$s OR %2$s(%3$s) IS DISTINCT FROM gw_topic THEN$o$,
    $n$IF %1$s OR %2$s(%3$s) COLLATE "C" IS DISTINCT FROM gw_topic THEN$n$
]]);
SELECT gateway.republish_all();
