-- 009: a topic's first epoch is known before the topic has a row, so subscribing writes nothing.
--
-- Until now a subscribe to a topic nobody had written to created the topic's row in
-- gateway.topics, so that the subscriber learned the (random) epoch its first event would
-- carry. So every topic any client subscribed to stayed a row forever: a user allowed
-- `room:*` could grow the table by subscribing to room:1, room:2, ... And a subscribe was a
-- write, which waits for a writer whose open transaction creates the same row.
--
-- Now a topic's first epoch is derived from its name and a random salt made once per
-- installation (gateway.first_epoch). gateway.heads() reports (first epoch, position 0) for a
-- topic without a row, and the row a writer creates later starts with that same epoch, so
-- the subscriber's first event continues the stream it was told about. The salt makes a new
-- installation's first epochs differ from an old one's: a client resuming against a database
-- set up again from scratch is told "not recovered", as with random epochs.
--
-- gateway.reset_topic() now keeps the topic's row and gives it a new random epoch, so rows are
-- never deleted: a topic without a row has never been written to (or was reset before this
-- migration, when its row was deleted; a new epoch then, as a reset should give). Do not
-- delete rows of gateway.topics by hand: the topic would start over at position 1 under its
-- first epoch again.
-- Every statement here is idempotent.

CREATE TABLE IF NOT EXISTS gateway.installation (
    one  boolean PRIMARY KEY DEFAULT true CHECK (one),  -- at most one row
    salt text NOT NULL
);
INSERT INTO gateway.installation (salt) VALUES (md5(random()::text || clock_timestamp()::text))
ON CONFLICT DO NOTHING;

-- The epoch of a topic's stream until it is first reset.
CREATE OR REPLACE FUNCTION gateway.first_epoch(p_topic text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT substr(md5(i.salt || ':' || p_topic), 1, 8) FROM gateway.installation AS i
$$;

-- The head of each topic: its epoch and last position, (first epoch, 0) for a topic that has
-- no row. One index lookup per topic (the LIMIT keeps the planner from joining the whole of
-- gateway.topics, which has a row per topic ever written to).
CREATE OR REPLACE FUNCTION gateway.heads(p_topics text[], OUT topic text, OUT epoch text, OUT pos bigint)
RETURNS SETOF record
LANGUAGE sql STABLE AS $$
    SELECT u.topic, coalesce(h.epoch, gateway.first_epoch(u.topic)), coalesce(h.pos, 0)
    FROM (SELECT DISTINCT n.name FROM unnest(p_topics) AS n(name) WHERE n.name IS NOT NULL) AS u(topic)
    LEFT JOIN LATERAL (SELECT r.epoch, r.pos FROM gateway.topics AS r WHERE r.topic = u.topic LIMIT 1) AS h ON true
$$;

-- A new row starts with the topic's first epoch unless its INSERT names one (reset_topic).
-- Only INSERTs fire this, so the writers' hot path (an UPDATE of an existing row) does not.
CREATE OR REPLACE FUNCTION gateway.topic_first_epoch() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.epoch IS NULL THEN
        NEW.epoch := gateway.first_epoch(NEW.topic);
    END IF;
    RETURN NEW;
END
$$;
ALTER TABLE gateway.topics ALTER COLUMN epoch DROP DEFAULT;
DROP TRIGGER IF EXISTS gateway_first_epoch ON gateway.topics;
CREATE TRIGGER gateway_first_epoch BEFORE INSERT ON gateway.topics
FOR EACH ROW EXECUTE FUNCTION gateway.topic_first_epoch();

-- As in sql/001, but inserting only the rows that are missing: the trigger above would
-- otherwise run for every topic of every multi-topic statement, only to be discarded.
CREATE OR REPLACE FUNCTION gateway.lock_topics(p_topics text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT count(DISTINCT t) FROM unnest(p_topics) AS t) < 2 THEN
        RETURN;  -- one topic: its row trigger locks it, nothing to order
    END IF;
    INSERT INTO gateway.topics (topic)
    SELECT DISTINCT t FROM unnest(p_topics) AS t
    WHERE t IS NOT NULL AND NOT EXISTS (SELECT FROM gateway.topics AS h WHERE h.topic = t)
    ORDER BY 1
    ON CONFLICT DO NOTHING;
    PERFORM 1 FROM gateway.topics WHERE topic = ANY (p_topics) ORDER BY topic FOR UPDATE;
END
$$;

-- Start a topic's stream over: its events are deleted and its next event is position 1 of a
-- new random epoch, so clients resuming with the old epoch are told they cannot be recovered.
-- The head row is updated first: waiting for its lock waits out a writer still appending to
-- the topic, whose event the DELETE (a statement of its own, so a new snapshot) then sees.
-- Deleting first would miss that event, and the new stream would later collide with it.
CREATE OR REPLACE FUNCTION gateway.reset_topic(p_topic text) RETURNS void
LANGUAGE sql AS $$
    UPDATE gateway.topics SET epoch = gateway.new_epoch(), pos = 0 WHERE topic = p_topic;
    DELETE FROM gateway.events WHERE topic = p_topic;
$$;
